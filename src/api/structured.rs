//! Structured-output requests: OpenAI's `response_format` (and the Responses API's
//! `text.format`), vLLM's `structured_outputs` and its older `guided_*` fields, read
//! into one constraint (`text::GrammarSpec`) that the model's grammar compiler turns
//! into token masks. At most one of them per request.

use serde_json::{Map, Value};

use super::fields::{check_fields, Fields};
use super::ApiError;
use crate::text::{GrammarSpec, JsonStyle};

/// A request's output constraint, and the field it came from (errors name it).
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredRequest {
    pub spec: GrammarSpec,
    pub style: JsonStyle,
    pub param: &'static str,
}

/// The constraint a chat or completions body asks for, if any.
pub(crate) fn structured_request(f: &Fields<'_>) -> Result<Option<StructuredRequest>, ApiError> {
    let mut found = Vec::new();
    if let Some(r) = response_format(f)? {
        found.push(r);
    }
    if let Some(r) = structured_outputs(f)? {
        found.push(r);
    }
    if let Some(r) = guided_fields(f)? {
        found.push(r);
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|r| r.param).collect();
        return Err(ApiError::invalid(
            found[1].param,
            format!("give one output constraint, not several ({})", names.join(" and ")),
        ));
    }
    // What can be checked without the model's tokenizer is checked now, so that a bad
    // constraint never costs a model load.
    if let Some(r) = found.first() {
        r.spec
            .check(&r.style)
            .map_err(|e| ApiError::invalid(r.param, format!("`{}`: {e}", r.param)))?;
    }
    Ok(found.pop())
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with a `schema`.
fn response_format(f: &Fields<'_>) -> Result<Option<StructuredRequest>, ApiError> {
    const P: &str = "response_format";
    let Some(format) = f.get::<Map<String, Value>>(P)? else {
        return Ok(None);
    };
    let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
    let json = |spec| {
        Ok(Some(StructuredRequest {
            spec,
            style: JsonStyle::default(),
            param: P,
        }))
    };
    match kind {
        "text" => {
            check_fields(&format, &["type"]).map_err(|e| ApiError::invalid(P, format!("{P}: {}", e.message)))?;
            Ok(None)
        }
        "json_object" => {
            check_fields(&format, &["type"]).map_err(|e| ApiError::invalid(P, format!("{P}: {}", e.message)))?;
            json(GrammarSpec::JsonObject)
        }
        "json_schema" => {
            check_fields(&format, &["type", "json_schema"])
                .map_err(|e| ApiError::invalid(P, format!("{P}: {}", e.message)))?;
            let inner = format.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object with a `name` and a `schema`",
                )
            })?;
            json(json_schema_object(inner, "response_format.json_schema")?)
        }
        "structural_tag" => Err(ApiError::invalid(
            P,
            "`response_format` type `structural_tag` is not supported: send a `json_schema`, or a grammar in `structured_outputs`",
        )),
        _ => Err(ApiError::invalid(
            P,
            "`response_format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// The `{name, schema, strict, description}` object of a JSON-schema format (nested in
/// chat's `response_format.json_schema`, flat in the Responses API's `text.format`).
pub(crate) fn json_schema_object(object: &Map<String, Value>, param: &str) -> Result<GrammarSpec, ApiError> {
    check_fields(object, &["name", "schema", "strict", "description", "type"])
        .map_err(|e| ApiError::invalid(param, format!("{param}: {}", e.message)))?;
    let g = Fields { map: object };
    // OpenAI requires the name (no schema means any JSON object).
    let name = g
        .get::<String>("name")
        .map_err(|e| renamed(e, param))?
        .unwrap_or_default();
    let ok = (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(ApiError::invalid(
            format!("{param}.name"),
            format!("`{param}.name` is required: 1 to 64 letters, digits, `_` or `-`"),
        ));
    }
    g.get::<bool>("strict").map_err(|e| renamed(e, param))?;
    g.get::<String>("description").map_err(|e| renamed(e, param))?;
    match object.get("schema") {
        // OpenAI's default when no schema is given: any JSON object.
        None | Some(Value::Null) => Ok(GrammarSpec::JsonObject),
        Some(schema @ Value::Object(_)) => Ok(GrammarSpec::JsonSchema(schema.clone())),
        Some(_) => Err(ApiError::invalid(
            format!("{param}.schema"),
            format!("`{param}.schema` must be a JSON schema object"),
        )),
    }
}

/// An error about a field of a nested object, renamed to its full path.
fn renamed(mut e: ApiError, parent: &str) -> ApiError {
    if let Some(p) = &e.param {
        e.message = e.message.replace(&format!("`{p}`"), &format!("`{parent}.{p}`"));
        e.param = Some(format!("{parent}.{p}"));
    }
    e
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`,
/// `json_object`, with layout options.
fn structured_outputs(f: &Fields<'_>) -> Result<Option<StructuredRequest>, ApiError> {
    const P: &str = "structured_outputs";
    let Some(object) = f.get::<Map<String, Value>>(P)? else {
        return Ok(None);
    };
    if object.get("structural_tag").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "structured_outputs.structural_tag",
            "`structured_outputs.structural_tag` is not supported: send `json`, `regex`, `choice` or `grammar`",
        ));
    }
    check_fields(
        &object,
        &[
            "json",
            "regex",
            "choice",
            "grammar",
            "json_object",
            "disable_any_whitespace",
            "disable_additional_properties",
            "whitespace_pattern",
            "disable_fallback",
            "structural_tag",
        ],
    )
    .map_err(|e| ApiError::invalid(P, format!("{P}: {}", e.message)))?;
    let g = Fields { map: &object };
    let spec = constraint_of(
        &g,
        ["json", "regex", "choice", "grammar"],
        g.get::<bool>("json_object").map_err(|e| renamed(e, P))? == Some(true),
        P,
    )?
    .ok_or_else(|| {
        ApiError::invalid(
            P,
            "`structured_outputs` must give one of `json`, `regex`, `choice`, `grammar` or `json_object: true`",
        )
    })?;
    g.get::<bool>("disable_fallback").map_err(|e| renamed(e, P))?;
    let any_whitespace = g.get::<bool>("disable_any_whitespace").map_err(|e| renamed(e, P))? == Some(false);
    let whitespace_pattern = g.get::<String>("whitespace_pattern").map_err(|e| renamed(e, P))?;
    let spec = match (
        spec,
        g.get::<bool>("disable_additional_properties")
            .map_err(|e| renamed(e, P))?,
    ) {
        (GrammarSpec::JsonSchema(mut schema), Some(true)) => {
            close_objects(&mut schema);
            GrammarSpec::JsonSchema(schema)
        }
        (spec, _) => spec,
    };
    Ok(Some(StructuredRequest {
        spec,
        style: JsonStyle {
            any_whitespace,
            whitespace_pattern,
        },
        param: P,
    }))
}

/// vLLM's older top-level spelling (`guided_json`, `guided_regex`, `guided_choice`,
/// `guided_grammar`, `guided_whitespace_pattern`), still sent by older clients.
fn guided_fields(f: &Fields<'_>) -> Result<Option<StructuredRequest>, ApiError> {
    const KEYS: [&str; 4] = ["guided_json", "guided_regex", "guided_choice", "guided_grammar"];
    let Some(param) = KEYS.into_iter().find(|k| f.map.get(*k).is_some_and(|v| !v.is_null())) else {
        if f.map.get("guided_whitespace_pattern").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                "guided_whitespace_pattern",
                "`guided_whitespace_pattern` needs `guided_json`",
            ));
        }
        return Ok(None);
    };
    let Some(spec) = constraint_of(f, KEYS, false, "")? else {
        return Ok(None);
    };
    Ok(Some(StructuredRequest {
        spec,
        style: JsonStyle {
            any_whitespace: false,
            whitespace_pattern: f.get::<String>("guided_whitespace_pattern")?,
        },
        param,
    }))
}

/// The one constraint among `keys` (JSON schema, regex, choices, grammar, in that
/// order) or `json_object`. `parent`: the object they are in ("" at top level).
fn constraint_of(
    f: &Fields<'_>,
    keys: [&str; 4],
    json_object: bool,
    parent: &str,
) -> Result<Option<GrammarSpec>, ApiError> {
    let path = |k: &str| {
        if parent.is_empty() {
            k.to_owned()
        } else {
            format!("{parent}.{k}")
        }
    };
    let given: Vec<&str> = keys
        .into_iter()
        .filter(|k| f.map.get(*k).is_some_and(|v| !v.is_null()))
        .chain(json_object.then_some("json_object"))
        .collect();
    if given.len() > 1 {
        let names: Vec<String> = given.iter().map(|k| format!("`{}`", path(k))).collect();
        return Err(ApiError::invalid(
            path(given[1]),
            format!("give one output constraint, not several ({})", names.join(" and ")),
        ));
    }
    let Some(&key) = given.first() else {
        return Ok(None);
    };
    let p = path(key);
    let value = f.map.get(key).cloned().unwrap_or(Value::Null);
    let spec = match keys.iter().position(|k| *k == key) {
        // A schema as an object, or as a JSON string (how vLLM documents it too).
        Some(0) => match value {
            Value::Object(_) => GrammarSpec::JsonSchema(value),
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Object(_)) => GrammarSpec::JsonSchema(v),
                _ => {
                    return Err(ApiError::invalid(
                        p.clone(),
                        format!("`{p}` must be a JSON schema: an object, or a string holding one"),
                    ))
                }
            },
            _ => {
                return Err(ApiError::invalid(
                    p.clone(),
                    format!("`{p}` must be a JSON schema object"),
                ))
            }
        },
        Some(1) => GrammarSpec::Regex(
            value
                .as_str()
                .ok_or_else(|| ApiError::invalid(p.clone(), format!("`{p}` must be a string")))?
                .to_owned(),
        ),
        Some(2) => GrammarSpec::Choice(
            value
                .as_array()
                .and_then(|items| items.iter().map(|v| v.as_str().map(str::to_owned)).collect())
                .ok_or_else(|| ApiError::invalid(p.clone(), format!("`{p}` must be a list of strings")))?,
        ),
        Some(3) => GrammarSpec::Grammar(
            value
                .as_str()
                .ok_or_else(|| ApiError::invalid(p.clone(), format!("`{p}` must be a string (Lark or GBNF)")))?
                .to_owned(),
        ),
        _ => GrammarSpec::JsonObject,
    };
    Ok(Some(spec))
}

/// vLLM's `disable_additional_properties`: objects that do not say otherwise take no
/// properties besides those they list.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object = map.get("type").and_then(Value::as_str) == Some("object") || map.contains_key("properties");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for value in map.values_mut() {
                close_objects(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// The Responses API's `text` (`format` and `verbosity`) as the chat body's
/// `response_format`: `None` for plain text.
pub fn responses_text_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(object) = text.as_object() else {
        return Err(ApiError::invalid("text", "`text` must be an object"));
    };
    check_fields(object, &["format", "verbosity"])
        .map_err(|e| ApiError::invalid("text", format!("text: {}", e.message)))?;
    let format = match object.get("format") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(f)) => f,
        Some(_) => return Err(ApiError::invalid("text.format", "`text.format` must be an object")),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(serde_json::json!({"type": "json_object"}))),
        Some("json_schema") => {
            // Checked here so that errors name `text.format`.
            json_schema_object(format, "text.format")?;
            let mut inner = format.clone();
            inner.remove("type");
            Ok(Some(serde_json::json!({"type": "json_schema", "json_schema": inner})))
        }
        _ => Err(ApiError::invalid(
            "text.format.type",
            "`text.format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}
