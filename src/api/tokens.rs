//! The token-level request of a worker in a distributed deployment: NVIDIA Dynamo's
//! `PreprocessedRequest` (its frontend has applied the chat template and tokenized;
//! it detokenizes and applies stop strings itself). Token ids in, token ids out:
//! `POST /inferd/v1/generate` reads this, and the `inferd-dynamo` worker sends it.
//!
//! The sampling fields are Dynamo's groups (`sampling_options`, `stop_conditions`,
//! `output_options`), whose names are vLLM's: they are read by the same rules as the
//! OpenAI routes' fields (`sampling::sampling_request`), so one field means one thing
//! everywhere. A field inferd cannot honour is refused, never dropped.

use serde_json::{Map, Value};

use super::fields::{as_object, Fields};
use super::sampling::{sampling_request, SamplingRequest};
use super::structured::{structured_request, StructuredRequest};
use super::ApiError;

/// A token request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRequest {
    pub token_ids: Vec<u32>,
    /// The model the frontend routed for (the served name), if it says.
    pub model: Option<String>,
    pub sampling: SamplingRequest,
    pub structured: Option<StructuredRequest>,
}

/// Fields of each group inferd reads, under the name `sampling_request` takes.
const SAMPLING: &[(&str, &str)] = &[
    ("n", "n"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("seed", "seed"),
    ("logit_bias", "logit_bias"),
    ("allowed_token_ids", "allowed_token_ids"),
    ("guided_decoding", "structured_outputs"),
];
const STOP: &[(&str, &str)] = &[
    ("max_tokens", "max_tokens"),
    ("min_tokens", "min_tokens"),
    ("ignore_eos", "ignore_eos"),
    ("stop_token_ids", "stop_token_ids"),
    ("stop_token_ids_hidden", "stop_token_ids"),
];
/// Fields the frontend sends that are the frontend's to apply (stop strings,
/// detokenization), or that change nothing here when they hold their neutral value.
const FRONTEND_ONLY: &[&str] = &[
    "stop",
    "skip_special_tokens",
    "formatted_prompt",
    "include_stop_str_in_output",
    "spaces_between_special_tokens",
];

impl TokenRequest {
    pub fn parse(body: &Value) -> Result<TokenRequest, ApiError> {
        let top = as_object(body)?;
        let f = Fields { map: top };
        let token_ids: Vec<u32> = f
            .get("token_ids")?
            .ok_or_else(|| ApiError::invalid("token_ids", "`token_ids` is required: the prompt's token ids"))?;
        let model = f.get::<String>("model")?;
        let empty = |v: &Value| {
            v.is_null() || v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty)
        };
        for key in [
            "multi_modal_data",
            "mm_processor_kwargs",
            "prefill_result",
            "bootstrap_info",
            "encoder_result",
            "batch_token_ids",
        ] {
            if top.get(key).is_some_and(|v| !empty(v)) {
                return Err(ApiError::invalid(
                    key,
                    format!("`{key}` is not supported: this worker serves text, aggregated (no disaggregated prefill, no media)"),
                ));
            }
        }
        // The groups, flattened into the names the OpenAI routes read.
        let mut flat = Map::new();
        // Where each flattened field came from, for errors: `stop_conditions.max_tokens`.
        let mut origin: Vec<(&str, String)> = Vec::new();
        let groups: [(&str, &[(&str, &str)]); 2] = [("sampling_options", SAMPLING), ("stop_conditions", STOP)];
        for (group, fields) in groups {
            let mut members = group_of(top, group)?;
            // Sampling options a client passed through Dynamo's `nvext` arrive in
            // `extra_args.sampling_options` and win, as Dynamo's own workers apply them.
            if group == "sampling_options" {
                let extra = top.get("extra_args").and_then(|e| e.get("sampling_options"));
                match extra {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(more)) => members.extend(more.clone()),
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "extra_args.sampling_options",
                            "`extra_args.sampling_options` must be an object",
                        ))
                    }
                }
            }
            for (key, value) in &members {
                if value.is_null() {
                    continue;
                }
                let param = format!("{group}.{key}");
                if let Some((_, name)) = fields.iter().find(|(k, _)| *k == key) {
                    if !origin.iter().any(|(n, _)| n == name) {
                        origin.push((name, param.clone()));
                    }
                    let value = match *name {
                        // Dynamo spells out every option of the constraint, unset ones null.
                        "structured_outputs" => without_nulls(value, &["backend"]),
                        _ => value.clone(),
                    };
                    // Stop ids come visible and hidden (the frontend hides the latter):
                    // inferd stops at both.
                    match (flat.get_mut(*name), value) {
                        (Some(Value::Array(ids)), Value::Array(more)) => ids.extend(more),
                        (None, value) => {
                            flat.insert((*name).to_owned(), value);
                        }
                        // The first is not a list: its error (naming it) comes first.
                        (Some(_), _) => {}
                    }
                } else if !FRONTEND_ONLY.contains(&key.as_str()) && !neutral(key.as_str(), value) {
                    return Err(ApiError::invalid(param.clone(), format!("`{param}` is not supported")));
                }
            }
        }
        // The client's `nvext.cache_salt`, which Dynamo's preprocessor carries in
        // `extra_args` (vLLM's token-in-token-out requests: `extra_args.vllm_tito`).
        if let Some(salt) = cache_salt(top)? {
            flat.insert("cache_salt".into(), Value::String(salt));
            origin.push(("cache_salt", "extra_args.nvext.cache_salt".into()));
        }
        let renamed = |e: ApiError, group: &str| {
            let key = e.param.clone().unwrap_or_default();
            let wire = origin
                .iter()
                .find(|(name, _)| *name == key)
                .map_or_else(|| format!("{group}.{key}"), |(_, wire)| wire.clone());
            ApiError {
                message: e.message.replace(&format!("`{key}`"), &format!("`{wire}`")),
                param: Some(wire),
                ..e
            }
        };
        let fields = Fields { map: &flat };
        let mut sampling = sampling_request(&fields, &["max_tokens"]).map_err(|e| renamed(e, "sampling_options"))?;
        let structured = structured_request(&fields).map_err(|e| renamed(e, "sampling_options"))?;
        let output = group_of(top, "output_options")?;
        for (key, value) in &output {
            let neutral = value.is_null() || value == &Value::Bool(false);
            if !neutral && !OUTPUT.contains(&key.as_str()) {
                let param = format!("output_options.{key}");
                return Err(ApiError::invalid(param.clone(), format!("`{param}` is not supported")));
            }
        }
        let o = Fields { map: &output };
        if let Some(k) = o.get::<i64>("logprobs").map_err(|e| renamed(e, "output_options"))? {
            sampling.set_logprobs("output_options.logprobs", k)?;
        }
        if let Some(k) = o
            .get::<i64>("prompt_logprobs")
            .map_err(|e| renamed(e, "output_options"))?
        {
            sampling.set_prompt_logprobs("output_options.prompt_logprobs", k)?;
        }
        Ok(TokenRequest {
            token_ids,
            model,
            sampling,
            structured,
        })
    }
}

/// `output_options` inferd reads, or leaves to the frontend (detokenization).
const OUTPUT: &[&str] = &["logprobs", "prompt_logprobs", "skip_special_tokens", "formatted_prompt"];

/// The cache salt a request carries, wherever Dynamo put it.
fn cache_salt(top: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let extra = top.get("extra_args").and_then(Value::as_object);
    let sources = [
        ("nvext.cache_salt", top.get("nvext")),
        ("extra_args.nvext.cache_salt", extra.and_then(|e| e.get("nvext"))),
        (
            "extra_args.vllm_tito.cache_salt",
            extra.and_then(|e| e.get("vllm_tito")),
        ),
    ];
    for (param, source) in sources {
        match source.and_then(|s| s.get("cache_salt")) {
            None | Some(Value::Null) => {}
            Some(Value::String(salt)) if !salt.is_empty() => return Ok(Some(salt.clone())),
            Some(_) => {
                return Err(ApiError::invalid(
                    param,
                    format!("`{param}` must be a non-empty string"),
                ))
            }
        }
    }
    Ok(None)
}

/// A group object (absent or null: empty).
fn group_of(top: &Map<String, Value>, group: &str) -> Result<Map<String, Value>, ApiError> {
    match top.get(group) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(_) => Err(ApiError::invalid(group, format!("`{group}` must be an object"))),
    }
}

/// An object without its null members (and without `drop`).
fn without_nulls(value: &Value, drop: &[&str]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, v)| !v.is_null() && !drop.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Options inferd lacks, at the value that asks nothing of it.
fn neutral(key: &str, value: &Value) -> bool {
    match key {
        "use_beam_search" => value == &Value::Bool(false),
        "best_of" => value.as_u64() == Some(1),
        "length_penalty" => value.as_f64() == Some(1.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_groups_map_onto_the_engine_fields() {
        let r = TokenRequest::parse(&json!({
            "token_ids": [1, 2, 3],
            "model": "org/name",
            "sampling_options": {"temperature": 0.5, "top_k": 4, "seed": 7, "n": 2, "use_beam_search": false,
                "guided_decoding": {"json": null, "regex": "a+", "choice": null, "backend": null}},
            "stop_conditions": {"max_tokens": 9, "min_tokens": 1, "stop": ["x"], "stop_token_ids": [5], "stop_token_ids_hidden": [2], "ignore_eos": false},
            "output_options": {"logprobs": 3, "prompt_logprobs": null, "skip_special_tokens": true},
            "routing": {"backend_instance_id": 5},
        }))
        .unwrap();
        assert_eq!(r.token_ids, vec![1, 2, 3]);
        assert_eq!(r.sampling.temperature, Some(0.5));
        assert_eq!(r.sampling.top_k, Some(Some(4)));
        assert_eq!((r.sampling.seed, r.sampling.n), (Some(7), 2));
        assert_eq!((r.sampling.max_tokens, r.sampling.min_tokens), (Some(9), 1));
        assert_eq!(r.sampling.stop_token_ids, vec![5, 2]);
        assert_eq!(r.sampling.logprobs, Some(3));
        assert_eq!(r.structured.unwrap().param, "structured_outputs");
        assert_eq!(r.sampling.cache_salt, None);
        let passed = TokenRequest::parse(&json!({"token_ids": [1], "sampling_options": {"temperature": 0.5},
            "extra_args": {"sampling_options": {"temperature": 0.25, "top_k": 3}}}))
        .unwrap();
        assert_eq!(
            (passed.sampling.temperature, passed.sampling.top_k),
            (Some(0.25), Some(Some(3)))
        );
        // The client's `nvext.cache_salt`, as Dynamo carries it, isolates its prefixes.
        let salted = |body: Value| TokenRequest::parse(&body).unwrap().sampling.cache_salt;
        let a = salted(json!({"token_ids": [1], "extra_args": {"nvext": {"cache_salt": "tenant-a"}}}));
        let b = salted(json!({"token_ids": [1], "extra_args": {"vllm_tito": {"cache_salt": "tenant-b"}}}));
        assert!(a.is_some() && b.is_some() && a != b);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_field() {
        for (body, param) in [
            (json!({}), "token_ids"),
            (
                json!({"token_ids": [1], "sampling_options": {"use_beam_search": true}}),
                "sampling_options.use_beam_search",
            ),
            (
                json!({"token_ids": [1], "sampling_options": {"temperature": -1}}),
                "sampling_options.temperature",
            ),
            (
                json!({"token_ids": [1], "stop_conditions": {"max_tokens": 0}}),
                "stop_conditions.max_tokens",
            ),
            (
                json!({"token_ids": [1], "stop_conditions": {"stop_token_ids_hidden": "x"}}),
                "stop_conditions.stop_token_ids_hidden",
            ),
            (
                json!({"token_ids": [1], "output_options": {"logprobs": 99}}),
                "output_options.logprobs",
            ),
            (json!({"token_ids": [1], "prefill_result": {"x": 1}}), "prefill_result"),
            (json!({"token_ids": [1], "stop_conditions": 3}), "stop_conditions"),
            (
                json!({"token_ids": [1], "output_options": {"return_everything": true}}),
                "output_options.return_everything",
            ),
            (json!({"token_ids": [1], "batch_token_ids": [[1]]}), "batch_token_ids"),
            (
                json!({"token_ids": [1], "extra_args": {"sampling_options": 1}}),
                "extra_args.sampling_options",
            ),
            (
                json!({"token_ids": [1], "extra_args": {"nvext": {"cache_salt": 5}}}),
                "extra_args.nvext.cache_salt",
            ),
            (
                json!({"token_ids": [1], "stop_conditions": {"stop_token_ids": 7, "stop_token_ids_hidden": [2]}}),
                "stop_conditions.stop_token_ids",
            ),
        ] {
            let e = TokenRequest::parse(&body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
