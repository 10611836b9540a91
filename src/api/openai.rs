//! `/v1/chat/completions` and `/v1/completions` request bodies. Fields are read one by
//! one so that a wrong type names its parameter; which fields a route takes, and which
//! it refuses, is `fields::FIELD_TABLE` (unknown fields are refused, not ignored).

use serde_json::{Map, Value};

use super::fields::{as_object, check_fields, check_route_fields, Fields, Route};
use super::sampling::{sampling_request, SamplingRequest};
use super::structured::{structured_request, StructuredRequest};
use super::ApiError;

/// OpenAI's limit on stop strings.
pub const MAX_STOP_STRINGS: usize = 16;

/// Fields shared by both routes, every one checked.
#[derive(Debug, Clone)]
pub struct GenerationFields {
    pub sampling: SamplingRequest,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `stream_options.continuous_usage_stats`: usage on every chunk.
    pub continuous_usage: bool,
    /// vLLM's `include_stop_str_in_output`.
    pub include_stop_str: bool,
    pub skip_special_tokens: bool,
    /// vLLM's `bad_words`, tokenized once the model is known.
    pub bad_words: Vec<String>,
    /// Keep only the last this many prompt tokens (`Some(None)`: the context window less
    /// one, vLLM's `-1`).
    pub truncate_prompt_tokens: Option<Option<usize>>,
    pub return_tokens_as_token_ids: bool,
    /// vLLM's `request_id`: the response's id.
    pub request_id: Option<String>,
    /// Whether the tokenizer adds its special tokens (`None`: the route's default).
    pub add_special_tokens: Option<bool>,
    /// The field that set the length limit, for errors about it.
    pub max_tokens_param: &'static str,
    /// Structured outputs: what the output must follow.
    pub structured: Option<StructuredRequest>,
}

/// Most characters of a `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// `tool_choice`: whether the reply may, must, or must call one named function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default when tools are offered).
    Auto,
    /// At least one call.
    Required,
    /// Exactly one call, of this function.
    Named(String),
}

/// An image a chat message carries (`image_url` content part), in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePart {
    /// A `data:` URL or an `http(s)` URL.
    pub url: String,
    /// Where it is in the request (`messages[1].content[0].image_url.url`), for errors.
    pub param: String,
    /// `detail: "low"`: the image at low resolution (OpenAI's 512 × 512).
    pub low_detail: bool,
}

/// `mm_processor_kwargs`: the image processor's pixel budget for this request (vLLM's
/// name), within the model's own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ImageProcessorOverrides {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: Option<String>,
    /// Messages normalized for the chat template (text parts joined, tool-call
    /// arguments parsed into objects).
    pub messages: Value,
    pub tools: Option<Value>,
    pub tool_choice: ToolChoice,
    /// `false`: the reply ends with its first call.
    pub parallel_tool_calls: bool,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub generation: GenerationFields,
    /// Chat `logprobs: true` asks for the chosen tokens' log-probabilities.
    pub logprobs: bool,
    /// The images of all messages, in order (each left as `{"type": "image"}` in its
    /// message for the chat template).
    pub images: Vec<ImagePart>,
    pub image_processor: ImageProcessorOverrides,
    /// vLLM's chat `echo`: the last message's content before the reply, when that
    /// message is the assistant's.
    pub echo: bool,
    pub add_generation_prompt: bool,
    /// Continue the last (assistant) message rather than open a new one.
    pub continue_final_message: bool,
    /// A chat template for this request instead of the model's.
    pub chat_template: Option<String>,
    /// Given to the chat template as `documents`.
    pub documents: Option<Value>,
    /// `false`: no `reasoning_content` in the reply.
    pub include_reasoning: bool,
}

#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// One or more prompts (a batch: `n` choices each, in order).
    pub prompts: Vec<Prompt>,
    pub echo: bool,
    pub generation: GenerationFields,
}

fn generation_fields(f: &Fields<'_>, max_tokens_keys: &[&'static str]) -> Result<GenerationFields, ApiError> {
    let sampling = sampling_request(f, max_tokens_keys)?;
    let stop = match f.map.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` holds at most {MAX_STOP_STRINGS} strings"),
        ));
    }
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let (include_usage, continuous_usage) = match f.get::<Map<String, Value>>("stream_options")? {
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            ))
        }
        Some(options) => {
            check_fields(
                &options,
                &["include_usage", "continuous_usage_stats", "include_obfuscation"],
            )
            .map_err(|e| ApiError::invalid("stream_options", format!("stream_options: {}", e.message)))?;
            let g = Fields { map: &options };
            g.get::<bool>("include_obfuscation")?;
            (
                g.get::<bool>("include_usage")?.unwrap_or(false),
                g.get::<bool>("continuous_usage_stats")?.unwrap_or(false),
            )
        }
        None => (false, false),
    };
    let structured = structured_request(f)?;
    f.get::<String>("guided_decoding_backend")?;
    if f.get::<bool>("use_beam_search")? == Some(true) {
        return Err(ApiError::invalid("use_beam_search", "beam search is not supported"));
    }
    f.get::<bool>("spaces_between_special_tokens")?;
    f.get::<f32>("length_penalty")?;
    for key in ["vllm_xargs", "kv_transfer_params"] {
        f.get::<Map<String, Value>>(key)?;
    }
    let bad_words = match f.get::<Vec<String>>("bad_words")? {
        Some(words) if words.iter().any(|w| w.trim().is_empty()) => {
            return Err(ApiError::invalid("bad_words", "`bad_words` must not hold empty words"))
        }
        Some(words) => words,
        None => Vec::new(),
    };
    let truncate_prompt_tokens = match f.get::<i64>("truncate_prompt_tokens")? {
        None => None,
        Some(-1) => Some(None),
        Some(k) if k >= 1 => Some(Some(k as usize)),
        Some(k) => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!("`truncate_prompt_tokens` must be at least 1, or -1 for the context window (got {k})"),
            ))
        }
    };
    let request_id = f.get::<String>("request_id")?;
    if let Some(id) = &request_id {
        let ok = (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !ok {
            return Err(ApiError::invalid(
                "request_id",
                format!("`request_id` must be 1 to {MAX_REQUEST_ID_LEN} letters, digits, `-`, `_`, `.` or `:`"),
            ));
        }
    }
    Ok(GenerationFields {
        sampling,
        stop,
        stream,
        include_usage,
        continuous_usage,
        include_stop_str: f.get::<bool>("include_stop_str_in_output")?.unwrap_or(false),
        skip_special_tokens: f.get::<bool>("skip_special_tokens")?.unwrap_or(true),
        bad_words,
        truncate_prompt_tokens,
        return_tokens_as_token_ids: f.get::<bool>("return_tokens_as_token_ids")?.unwrap_or(false),
        request_id,
        add_special_tokens: f.get::<bool>("add_special_tokens")?,
        max_tokens_param: max_tokens_keys
            .iter()
            .rev()
            .find(|k| f.map.get(**k).is_some_and(|v| !v.is_null()))
            .copied()
            .unwrap_or("generation_config"),
        structured,
    })
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// `image_url.detail` values OpenAI defines: `low` caps the image at 512 × 512 pixels'
/// area; `auto` and `high` leave the processor's pixel budget to decide.
const IMAGE_DETAILS: &[&str] = &["auto", "low", "high"];

/// An `image_url` content part's URL, and whether it asks for low detail.
fn image_url(part: &Value, part_param: &str) -> Result<(String, bool), ApiError> {
    let param = format!("{part_param}.image_url");
    let object = part
        .get("image_url")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::invalid(param.clone(), format!("`{param}` must be an object with a `url`")))?;
    check_fields(object, &["url", "detail"]).map_err(|e| ApiError::invalid(param.clone(), e.message))?;
    let detail = match object.get("detail") {
        None | Some(Value::Null) => "auto",
        Some(d) => d.as_str().filter(|d| IMAGE_DETAILS.contains(d)).ok_or_else(|| {
            ApiError::invalid(
                format!("{param}.detail"),
                format!("`{param}.detail` must be one of {}", IMAGE_DETAILS.join(", ")),
            )
        })?,
    };
    match object.get("url") {
        Some(Value::String(url)) if !url.is_empty() => Ok((url.clone(), detail == "low")),
        _ => Err(ApiError::invalid(
            format!("{param}.url"),
            format!("`{param}.url` must be a non-empty string (a data: URL or an http(s) URL)"),
        )),
    }
}

/// Checks the messages and turns them into what chat templates expect: text parts
/// joined into one string, except in messages with images, whose parts stay a list
/// (`{"type": "text", ...}` and `{"type": "image"}`, as transformers gives templates).
/// The images, in order, go to `images`.
fn normalize_messages(value: Option<&Value>, images: &mut Vec<ImagePart>) -> Result<Value, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    let list = value
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a list of messages"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let m = message
            .as_object()
            .ok_or_else(|| ApiError::invalid(param.clone(), format!("`{param}` must be an object")))?;
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(format!("{param}.role"), format!("`{param}.role` is required")))?;
        if !ROLES.contains(&role) {
            return Err(ApiError::invalid(
                format!("{param}.role"),
                format!("`{param}.role` must be one of {} (got `{role}`)", ROLES.join(", ")),
            ));
        }
        let mut normalized = m.clone();
        // developer is OpenAI's new name for system.
        if role == "developer" {
            normalized.insert("role".into(), "system".into());
        }
        let content = match m.get("content") {
            None | Some(Value::Null) if role == "assistant" => Value::String(String::new()),
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                // With images: the parts as the template sees them.
                let mut listed: Vec<Value> = Vec::new();
                let mut has_image = false;
                for (j, part) in parts.iter().enumerate() {
                    let part_param = format!("{param}.content[{j}]");
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") | Some("input_text") | Some("output_text") => {
                            let t = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::invalid(part_param.clone(), format!("`{part_param}.text` must be a string"))
                            })?;
                            text.push_str(t);
                            listed.push(serde_json::json!({"type": "text", "text": t}));
                        }
                        Some("image_url") if role == "user" => {
                            let (url, low_detail) = image_url(part, &part_param)?;
                            images.push(ImagePart {
                                url,
                                param: format!("{part_param}.image_url.url"),
                                low_detail,
                            });
                            listed.push(serde_json::json!({"type": "image"}));
                            has_image = true;
                        }
                        Some("image_url") => {
                            return Err(ApiError::invalid(
                                part_param,
                                format!("images are only allowed in user messages, not in `{role}` ones"),
                            ))
                        }
                        Some(other) => {
                            return Err(ApiError::invalid(
                                part_param,
                                format!("content parts of type `{other}` are not supported by this model"),
                            ))
                        }
                        None => {
                            return Err(ApiError::invalid(
                                part_param.clone(),
                                format!("`{part_param}.type` is required"),
                            ))
                        }
                    }
                }
                if has_image {
                    Value::Array(listed)
                } else {
                    Value::String(text)
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("{param}.content"),
                    format!("`{param}.content` must be a string or a list of content parts"),
                ))
            }
        };
        normalized.insert("content".into(), content);
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            let calls = calls.as_array().ok_or_else(|| {
                ApiError::invalid(
                    format!("{param}.tool_calls"),
                    format!("`{param}.tool_calls` must be a list"),
                )
            })?;
            // Templates render arguments with `tojson`: give them the object, not its text.
            let calls: Vec<Value> = calls
                .iter()
                .map(|call| {
                    let mut call = call.clone();
                    if let Some(args) = call.pointer_mut("/function/arguments") {
                        if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                            *args = parsed;
                        }
                    }
                    call
                })
                .collect();
            normalized.insert("tool_calls".into(), Value::Array(calls));
        }
        out.push(Value::Object(normalized));
    }
    Ok(Value::Array(out))
}

pub fn parse_chat_request(body: &Value) -> Result<ChatRequest, ApiError> {
    let map = as_object(body)?;
    check_route_fields(map, Route::Chat)?;
    let f = Fields { map };
    f.check_strings(&[
        "user",
        "safety_identifier",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "verbosity",
    ])?;
    f.get::<bool>("store")?;
    f.get::<Map<String, Value>>("metadata")?;
    if let Some(modalities) = f.get::<Vec<String>>("modalities")? {
        if let Some(other) = modalities.iter().find(|m| *m != "text") {
            return Err(ApiError::invalid(
                "modalities",
                format!("only the `text` modality is supported, not `{other}`"),
            ));
        }
    }
    let mut images = Vec::new();
    let messages = normalize_messages(map.get("messages"), &mut images)?;
    let image_processor = match f.get::<Map<String, Value>>("mm_processor_kwargs")? {
        None => ImageProcessorOverrides::default(),
        Some(kwargs) => {
            check_fields(&kwargs, &["min_pixels", "max_pixels"])
                .map_err(|e| ApiError::invalid("mm_processor_kwargs", format!("mm_processor_kwargs: {}", e.message)))?;
            let g = Fields { map: &kwargs };
            let pixels = |key: &str| {
                g.get::<usize>(key).map_err(|e| ApiError {
                    param: Some(format!("mm_processor_kwargs.{key}")),
                    message: e
                        .message
                        .replace(&format!("`{key}`"), &format!("`mm_processor_kwargs.{key}`")),
                    ..e
                })
            };
            let overrides = ImageProcessorOverrides {
                min_pixels: pixels("min_pixels")?,
                max_pixels: pixels("max_pixels")?,
            };
            if let (Some(min), Some(max)) = (overrides.min_pixels, overrides.max_pixels) {
                if min > max {
                    return Err(ApiError::invalid(
                        "mm_processor_kwargs",
                        format!("`mm_processor_kwargs.min_pixels` ({min}) is over `max_pixels` ({max})"),
                    ));
                }
            }
            overrides
        }
    };
    let mut generation = generation_fields(&f, &["max_tokens", "max_completion_tokens"])?;
    let logprobs = f.get::<bool>("logprobs")?.unwrap_or(false);
    if let Some(k) = f.get::<i64>("top_logprobs")? {
        if !logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        generation.sampling.set_logprobs("top_logprobs", k)?;
    } else if logprobs {
        generation.sampling.logprobs = Some(0);
    }
    let tools = match f.get::<Value>("tools")? {
        Some(Value::Array(t)) if t.is_empty() => None,
        Some(t @ Value::Array(_)) => Some(t),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
        None => None,
    };
    for (i, tool) in tools
        .iter()
        .flat_map(|t| t.as_array().into_iter().flatten())
        .enumerate()
    {
        let name = tool.pointer("/function/name").and_then(Value::as_str);
        let ok_name = name.is_some_and(|n| {
            !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        let parameters = tool.pointer("/function/parameters");
        if parameters.is_some_and(|p| !p.is_null() && p.get("type").and_then(Value::as_str) != Some("object")) {
            return Err(ApiError::invalid(
                format!("tools[{i}]"),
                format!(
                    "`tools[{i}].function.parameters` must be a JSON schema object (`{{\"type\": \"object\", ...}}`)"
                ),
            ));
        }
        if tool.get("type").and_then(Value::as_str) != Some("function") || !ok_name {
            return Err(ApiError::invalid(
                format!("tools[{i}]"),
                format!(
                    "`tools[{i}]` must be `{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}` with a name of 1 to 64 letters, digits, `_` or `-`"
                ),
            ));
        }
    }
    let names: Vec<&str> = tools
        .iter()
        .flat_map(|t| t.as_array().into_iter().flatten())
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    let choice = match f.get::<Value>("tool_choice")? {
        None => Some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(ToolChoice::Auto),
            // The model is not offered the tools at all.
            "none" => None,
            "required" => Some(ToolChoice::Required),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` must be `none`, `auto`, `required` or a named function, not `{s}`"),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => Some(ToolChoice::Named(name.to_owned())),
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "a named `tool_choice` is `{\"type\": \"function\", \"function\": {\"name\": ...}}`",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` must be a string or an object",
            ))
        }
    };
    match &choice {
        Some(ToolChoice::Required | ToolChoice::Named(_)) if tools.is_none() => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` can only force a call when `tools` are given",
            ))
        }
        Some(ToolChoice::Named(name)) if !names.contains(&name.as_str()) => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not one of the `tools`"),
            ))
        }
        _ => {}
    }
    let (tools, tool_choice) = match choice {
        Some(choice) => (tools, choice),
        None => (None, ToolChoice::Auto),
    };
    let continue_final_message = f.get::<bool>("continue_final_message")?.unwrap_or(false);
    let add_generation_prompt = f
        .get::<bool>("add_generation_prompt")?
        .unwrap_or(!continue_final_message);
    if continue_final_message {
        if add_generation_prompt {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` and `add_generation_prompt` cannot both be true",
            ));
        }
        let last = messages.as_array().and_then(|m| m.last());
        if last.and_then(|m| m["role"].as_str()) != Some("assistant") {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` needs the last message to be the assistant's",
            ));
        }
    }
    let mut chat_template_kwargs: Option<Map<String, Value>> = f.get("chat_template_kwargs")?;
    if let Some(effort) = f.get::<String>("reasoning_effort")? {
        chat_template_kwargs
            .get_or_insert_with(Map::new)
            .entry("reasoning_effort")
            .or_insert(Value::String(effort));
    }
    let chat_template = f.get::<String>("chat_template")?;
    if chat_template.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ApiError::invalid("chat_template", "`chat_template` must not be empty"));
    }
    if let Some(k) = f.get::<i64>("prompt_logprobs")? {
        generation.sampling.set_prompt_logprobs("prompt_logprobs", k)?;
    }
    Ok(ChatRequest {
        model: f.get("model")?,
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: f.get::<bool>("parallel_tool_calls")?.unwrap_or(true),
        chat_template_kwargs,
        generation,
        logprobs,
        images,
        image_processor,
        echo: f.get::<bool>("echo")?.unwrap_or(false),
        add_generation_prompt,
        continue_final_message,
        chat_template,
        documents: f.get::<Value>("documents")?,
        include_reasoning: f.get::<bool>("include_reasoning")?.unwrap_or(true),
    })
}

/// Most prompts one completions request may batch (and most completions: prompts × `n`).
pub const MAX_PROMPTS: usize = 1024;

/// A completions `prompt`: a string, a list of token ids, or a list of either.
fn parse_prompts(value: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|v| v.as_u64().filter(|&id| id <= u32::MAX as u64).map(|id| id as u32))
            .collect()
    };
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of token ids, or a list of strings or of token-id lists",
        )
    };
    let prompts = match value {
        None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => return Err(bad()),
        Some(Value::Array(items)) if items[0].is_number() => vec![Prompt::Ids(ids(items).ok_or_else(bad)?)],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(inner) if !inner.is_empty() => ids(inner).map(Prompt::Ids).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("at most {MAX_PROMPTS} prompts per request (got {})", prompts.len()),
        ));
    }
    Ok(prompts)
}

pub fn parse_completion_request(body: &Value) -> Result<CompletionRequest, ApiError> {
    let map = as_object(body)?;
    check_route_fields(map, Route::Completions)?;
    let f = Fields { map };
    f.check_strings(&["user"])?;
    if f.get::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported",
        ));
    }
    let prompts = parse_prompts(map.get("prompt"))?;
    let mut generation = generation_fields(&f, &["max_tokens"])?;
    if let Some(best_of) = f.get::<i64>("best_of")? {
        if best_of != generation.sampling.n as i64 {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` is only supported equal to `n` (no server-side selection)",
            ));
        }
    }
    if prompts.len() * generation.sampling.n > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts with `n` = {} ask for {} completions; at most {MAX_PROMPTS} per request",
                prompts.len(),
                generation.sampling.n,
                prompts.len() * generation.sampling.n
            ),
        ));
    }
    // OpenAI's completions default is 16 tokens (when nothing else sets a limit).
    generation.sampling.fallback_max_tokens = Some(16);
    let echo = f.get::<bool>("echo")?.unwrap_or(false);
    if let Some(k) = f.get::<i64>("logprobs")? {
        generation.sampling.set_logprobs("logprobs", k)?;
        if echo {
            // With the prompt echoed, its tokens' log-probabilities come too (vLLM, OpenAI).
            generation.sampling.set_prompt_logprobs("logprobs", k)?;
        }
    }
    if let Some(k) = f.get::<i64>("prompt_logprobs")? {
        generation.sampling.set_prompt_logprobs("prompt_logprobs", k)?;
    }
    Ok(CompletionRequest {
        model: f.get("model")?,
        prompts,
        echo,
        generation,
    })
}
