//! The Responses API's request: validated, and turned into the chat request it amounts
//! to (messages from input items, nested function tools, tool choice, sampling fields),
//! so that one path renders, samples and parses tool calls for both APIs.

use serde_json::{json, Map, Value};

use super::fields::{as_object, check_route_fields, Fields, Route};
use super::ApiError;

/// A validated `POST /v1/responses` body.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    /// The new input as items (ids added), as `input_items` lists them.
    pub input_items: Vec<Value>,
    /// The new input as chat messages (without `instructions`).
    pub messages: Vec<Value>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub stream: bool,
    /// Chat-request fields: tools (nested), tool_choice, sampling.
    chat_fields: Map<String, Value>,
    /// Call ids of the `function_call_output` items, checked against the calls made.
    outputs_for: Vec<(usize, String)>,
    /// Call ids of the `function_call` items of this input.
    calls_made: Vec<String>,
    /// Request fields the response object repeats.
    pub echo: Map<String, Value>,
}

/// The fields this parser reads itself. Every other field the table
/// (`fields::FIELD_TABLE`) gives the Responses API is passed to the chat request as it
/// is (sampling fields and vLLM's extras), where it is checked and acted on.
const OWN: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "text",
    "metadata",
    "store",
    "previous_response_id",
    "stream",
    "stream_options",
    "truncation",
    "reasoning",
    "include",
    "background",
    "conversation",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    "user",
    "safety_identifier",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

pub fn parse_responses_request(
    body: &Value,
    new_id: &mut dyn FnMut(&str) -> String,
) -> Result<ResponsesRequest, ApiError> {
    let map = as_object(body)?;
    check_route_fields(map, Route::Responses)?;
    let f = Fields { map };
    f.check_strings(&[
        "user",
        "safety_identifier",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
    ])?;
    f.get::<i64>("max_tool_calls")?;
    f.get::<Map<String, Value>>("stream_options")?;
    if f.get::<bool>("background")? == Some(true) {
        return Err(invalid(
            "background",
            "`background: true` is not supported: responses run in the foreground",
        ));
    }
    if f.get::<i64>("top_logprobs")?.is_some_and(|k| k != 0) {
        return Err(invalid(
            "top_logprobs",
            "`top_logprobs` is not supported in Responses output yet (only 0)",
        ));
    }
    if f.get::<Vec<Value>>("include")?.is_some_and(|i| !i.is_empty()) {
        return Err(invalid("include", "`include` is not supported"));
    }
    match f.get::<String>("truncation")?.as_deref() {
        None | Some("disabled") => {}
        Some(other) => {
            return Err(invalid(
                "truncation",
                format!("`truncation: {other}` is not supported (only `disabled`: an input too long is an error)"),
            ))
        }
    }
    let text = f.get::<Value>("text")?;
    let response_format = match &text {
        Some(text) => super::structured::responses_text_format(text)?,
        None => None,
    };
    let metadata = f.get::<Map<String, Value>>("metadata")?.unwrap_or_default();
    if metadata.len() > 16
        || metadata
            .iter()
            .any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512))
    {
        return Err(invalid(
            "metadata",
            "`metadata` holds at most 16 string values (keys up to 64 characters, values up to 512)",
        ));
    }
    let instructions = f.get::<String>("instructions")?;
    let store = f.get::<bool>("store")?.unwrap_or(true);
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let previous_response_id = f.get::<String>("previous_response_id")?;
    let input = map
        .get("input")
        .filter(|v| !v.is_null())
        .ok_or_else(|| invalid("input", "`input` is required"))?;
    let converted = convert_input(input, new_id)?;

    let mut chat_fields = Map::new();
    for (key, value) in map {
        if !OWN.contains(&key.as_str()) {
            chat_fields.insert(key.clone(), value.clone());
        }
    }
    if let Some(v) = map.get("max_output_tokens") {
        chat_fields.insert("max_completion_tokens".into(), v.clone());
    }
    let tools = match map.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => Some(
            tools
                .iter()
                .enumerate()
                .map(|(i, t)| nested_tool(i, t))
                .collect::<Result<Vec<Value>, ApiError>>()?,
        ),
        Some(_) => return Err(invalid("tools", "`tools` must be a list")),
    };
    if let Some(tools) = tools {
        chat_fields.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = map.get("tool_choice").filter(|v| !v.is_null()) {
        let nested = match choice {
            Value::String(_) => choice.clone(),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = o
                    .get("name")
                    .or_else(|| o.get("function").and_then(|f| f.get("name")))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({"type": "function", "function": {"name": name}})
            }
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "`tool_choice` must be `none`, `auto`, `required` or `{\"type\": \"function\", \"name\": ...}`",
                ))
            }
        };
        chat_fields.insert("tool_choice".into(), nested);
    }

    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(instructions));
    echo.insert("metadata".into(), Value::Object(metadata));
    for key in ["temperature", "top_p", "max_output_tokens", "previous_response_id"] {
        echo.insert(key.into(), map.get(key).cloned().unwrap_or(Value::Null));
    }
    echo.insert(
        "tools".into(),
        map.get("tools").cloned().filter(|t| !t.is_null()).unwrap_or(json!([])),
    );
    echo.insert(
        "tool_choice".into(),
        map.get("tool_choice")
            .cloned()
            .filter(|t| !t.is_null())
            .unwrap_or(json!("auto")),
    );
    echo.insert(
        "parallel_tool_calls".into(),
        json!(f.get::<bool>("parallel_tool_calls")?.unwrap_or(true)),
    );
    echo.insert("store".into(), json!(store));
    // The format as asked (OpenAI repeats it), plain text by default.
    let mut text_echo = text.clone().and_then(|t| t.as_object().cloned()).unwrap_or_default();
    if text_echo.get("format").is_none_or(Value::is_null) {
        text_echo.insert("format".into(), json!({"type": "text"}));
    }
    echo.insert("text".into(), Value::Object(text_echo));
    if let Some(format) = response_format {
        chat_fields.insert("response_format".into(), format);
    }
    echo.insert("truncation".into(), json!("disabled"));
    echo.insert("user".into(), map.get("user").cloned().unwrap_or(Value::Null));

    Ok(ResponsesRequest {
        model: f.get("model")?,
        input_items: converted.items,
        messages: converted.messages,
        instructions,
        previous_response_id,
        store,
        stream,
        chat_fields,
        outputs_for: converted.outputs_for,
        calls_made: converted.calls_made,
        echo,
    })
}

impl ResponsesRequest {
    /// The chat-completions body this request amounts to, after the conversation of a
    /// previous response (`history`, chat messages). Every `function_call_output` must
    /// answer a call made in that conversation or in this input.
    pub fn chat_body(&self, history: &[Value]) -> Result<Value, ApiError> {
        let earlier = history
            .iter()
            .flat_map(|m| m["tool_calls"].as_array().into_iter().flatten())
            .filter_map(|c| c["id"].as_str());
        let known: Vec<&str> = earlier.chain(self.calls_made.iter().map(String::as_str)).collect();
        for (i, call_id) in &self.outputs_for {
            if !known.contains(&call_id.as_str()) {
                return Err(invalid(
                    format!("input[{i}].call_id"),
                    format!("no function call with call_id `{call_id}` precedes this function_call_output"),
                ));
            }
        }
        let mut messages: Vec<Value> = Vec::new();
        if let Some(instructions) = &self.instructions {
            messages.push(json!({"role": "system", "content": instructions}));
        }
        messages.extend(history.iter().cloned());
        messages.extend(self.messages.iter().cloned());
        let mut body = self.chat_fields.clone();
        if let Some(model) = &self.model {
            body.insert("model".into(), json!(model));
        }
        body.insert("messages".into(), Value::Array(messages));
        Ok(Value::Object(body))
    }
}

/// An error from the chat request's checks, naming the Responses field instead.
pub fn rename_param(mut error: ApiError) -> ApiError {
    if let Some(param) = &error.param {
        let renamed = match param.as_str() {
            "max_completion_tokens" => Some("max_output_tokens".to_owned()),
            // Chat's `response_format` is what `text.format` became.
            p if p.starts_with("response_format") => Some("text.format".to_owned()),
            // A chat image part's `image_url.url` / `image_url.detail` are an
            // `input_image`'s `image_url` / `detail`.
            p if p.starts_with("messages") => Some(format!(
                "input{}",
                p["messages".len()..]
                    .replace(".image_url.url", ".image_url")
                    .replace(".image_url.detail", ".detail")
            )),
            _ => None,
        };
        if let Some(renamed) = renamed {
            error.message = error
                .message
                .replace("max_completion_tokens", "max_output_tokens")
                .replace("`response_format.json_schema", "`text.format")
                .replace("`response_format", "`text.format")
                .replace("`messages", "`input");
            error.param = Some(renamed);
        }
    }
    error
}

/// A Responses function tool (`{"type": "function", "name", "parameters"}`) in the
/// chat shape; the chat shape itself is accepted too.
fn nested_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    if tool.get("function").is_some() {
        return Ok(tool.clone());
    }
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(
            format!("tools[{i}]"),
            format!(
                "`tools[{i}]`: only function tools are supported (`{{\"type\": \"function\", \"name\": ..., \"parameters\": ...}}`)"
            ),
        ));
    }
    let mut function = Map::new();
    for key in ["name", "description", "parameters", "strict"] {
        if let Some(v) = tool.get(key) {
            function.insert(key.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

struct Converted {
    items: Vec<Value>,
    messages: Vec<Value>,
    outputs_for: Vec<(usize, String)>,
    calls_made: Vec<String>,
}

/// `input` (a string, or items) as input items and as chat messages.
fn convert_input(input: &Value, new_id: &mut dyn FnMut(&str) -> String) -> Result<Converted, ApiError> {
    let mut out = Converted {
        items: Vec::new(),
        messages: Vec::new(),
        outputs_for: Vec::new(),
        calls_made: Vec::new(),
    };
    let items = match input {
        Value::String(text) => {
            out.items.push(
                json!({"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": text}]}),
            );
            out.messages.push(json!({"role": "user", "content": text}));
            return Ok(out);
        }
        Value::Array(items) if !items.is_empty() => items,
        Value::Array(_) => return Err(invalid("input", "`input` must not be empty")),
        _ => return Err(invalid("input", "`input` must be a string or a list of items")),
    };
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(invalid(
                format!("input[{i}]"),
                format!("`input[{i}]` must be an object"),
            ));
        };
        let kind = match obj.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None if obj.contains_key("role") => "message",
            None => {
                return Err(invalid(
                    format!("input[{i}].type"),
                    format!("`input[{i}]` has no `type`"),
                ))
            }
        };
        let text_field = |key: &str| -> Result<String, ApiError> {
            obj.get(key).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
                invalid(
                    format!("input[{i}].{key}"),
                    format!("`input[{i}].{key}` must be a string"),
                )
            })
        };
        let mut stored = item.clone();
        match kind {
            "message" => {
                let role = text_field("role")?;
                let role = match role.as_str() {
                    "user" | "system" | "assistant" => role,
                    "developer" => "system".into(),
                    other => {
                        return Err(invalid(
                            format!("input[{i}].role"),
                            format!("unknown role `{other}` (user, system, developer or assistant)"),
                        ))
                    }
                };
                let content = message_content(i, obj.get("content"))?;
                let mut message = json!({"role": role, "content": content});
                if role == "assistant" {
                    if let Some(r) = reasoning.take() {
                        message["reasoning_content"] = json!(r);
                    }
                }
                out.messages.push(message);
                stored["type"] = json!("message");
                if stored.get("id").is_none() {
                    stored["id"] = json!(new_id("msg"));
                }
            }
            "function_call" => {
                let (call_id, name) = (text_field("call_id")?, text_field("name")?);
                let arguments = obj.get("arguments").and_then(Value::as_str).unwrap_or("{}").to_owned();
                let call =
                    json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls following an assistant message belong to it.
                match out.messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        let calls = last
                            .as_object_mut()
                            .map(|m| m.entry("tool_calls").or_insert_with(|| json!([])));
                        if let Some(Value::Array(calls)) = calls {
                            calls.push(call);
                        }
                    }
                    _ => {
                        let mut message = json!({"role": "assistant", "content": null, "tool_calls": [call]});
                        if let Some(r) = reasoning.take() {
                            message["reasoning_content"] = json!(r);
                        }
                        out.messages.push(message);
                    }
                }
                out.calls_made.push(call_id);
                if stored.get("id").is_none() {
                    stored["id"] = json!(new_id("fc"));
                }
            }
            "function_call_output" => {
                let call_id = text_field("call_id")?;
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => message_text(i, Some(v))?,
                    _ => {
                        return Err(invalid(
                            format!("input[{i}].output"),
                            format!("`input[{i}].output` must be a string"),
                        ))
                    }
                };
                out.messages
                    .push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
                out.outputs_for.push((i, call_id));
                if stored.get("id").is_none() {
                    stored["id"] = json!(new_id("fco"));
                }
            }
            "reasoning" => {
                let text: String = obj
                    .get("content")
                    .or_else(|| obj.get("summary"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["text"].as_str())
                    .collect();
                reasoning = Some(text);
                if stored.get("id").is_none() {
                    stored["id"] = json!(new_id("rs"));
                }
            }
            other => {
                return Err(invalid(
                    format!("input[{i}].type"),
                    format!(
                    "unsupported input item type `{other}` (message, function_call, function_call_output, reasoning)"
                ),
                ))
            }
        }
        out.items.push(stored);
    }
    Ok(out)
}

/// A message's content for chat: its text, or, when it has `input_image` parts, its
/// parts in the chat shape (`text` and `image_url`), which the chat route checks.
fn message_content(i: usize, content: Option<&Value>) -> Result<Value, ApiError> {
    let parts = match content {
        Some(Value::Array(parts)) if parts.iter().any(|p| p["type"] == "input_image") => parts,
        _ => return message_text(i, content).map(Value::String),
    };
    parts
        .iter()
        .enumerate()
        .map(|(j, part)| match part["type"].as_str() {
            Some("input_image") => {
                let url = part.get("image_url").and_then(Value::as_str).ok_or_else(|| {
                    invalid(
                        format!("input[{i}].content[{j}].image_url"),
                        "an `input_image` needs an `image_url` (a data: URL or an http(s) URL; file ids are not supported)",
                    )
                })?;
                let mut image = json!({"url": url});
                if let Some(detail) = part.get("detail").filter(|d| !d.is_null()) {
                    image["detail"] = detail.clone();
                }
                Ok(json!({"type": "image_url", "image_url": image}))
            }
            _ => message_text(i, Some(&Value::Array(vec![part.clone()])))
                .map(|text| json!({"type": "text", "text": text}))
                .map_err(|mut e| {
                    e.param = Some(format!("input[{i}].content[{j}]"));
                    e
                }),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// A message's content: a string, or text parts (`input_text`, `output_text`, `text`).
fn message_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (Some(kind), _) => {
                        return Err(invalid(
                            format!("input[{i}].content[{j}]"),
                            format!("content part type `{kind}` is not supported (input_text, output_text)"),
                        ))
                    }
                    (None, _) => {
                        return Err(invalid(
                            format!("input[{i}].content[{j}]"),
                            "a content part needs a `type`",
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid(
            format!("input[{i}].content"),
            format!("`input[{i}].content` must be a string or a list of text parts"),
        )),
    }
}
