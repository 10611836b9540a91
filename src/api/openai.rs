//! `/v1/chat/completions` and `/v1/completions` request bodies. Fields are read one by
//! one so that a wrong type names its parameter; unknown fields are refused rather than
//! silently ignored (a few informational OpenAI fields are accepted and documented).

use serde_json::{Map, Value};

use super::fields::{as_object, check_fields, Fields};
use super::sampling::{sampling_request, SamplingRequest};
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
}

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
}

#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub echo: bool,
    pub generation: GenerationFields,
}

/// Sampling fields common to both routes.
const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "seed",
    "n",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "generation_config",
    // Informational OpenAI fields, accepted and not acted on.
    "user",
    "metadata",
    "store",
];

fn generation_fields(f: &Fields<'_>, max_tokens_keys: &[&str]) -> Result<GenerationFields, ApiError> {
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
    let include_usage = match f.get::<Map<String, Value>>("stream_options")? {
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            ))
        }
        Some(options) => {
            check_fields(&options, &["include_usage"])
                .map_err(|e| ApiError::invalid("stream_options", format!("stream_options: {}", e.message)))?;
            Fields { map: &options }.get::<bool>("include_usage")?.unwrap_or(false)
        }
        None => false,
    };
    Ok(GenerationFields {
        sampling,
        stop,
        stream,
        include_usage,
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
    let mut allowed = SAMPLING_FIELDS.to_vec();
    allowed.extend([
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
        "mm_processor_kwargs",
    ]);
    check_fields(map, &allowed)?;
    let f = Fields { map };
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
    Ok(ChatRequest {
        model: f.get("model")?,
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: f.get::<bool>("parallel_tool_calls")?.unwrap_or(true),
        chat_template_kwargs: f.get("chat_template_kwargs")?,
        generation,
        logprobs,
        images,
        image_processor,
    })
}

pub fn parse_completion_request(body: &Value) -> Result<CompletionRequest, ApiError> {
    let map = as_object(body)?;
    let mut allowed = SAMPLING_FIELDS.to_vec();
    allowed.extend(["prompt", "echo", "logprobs", "suffix", "best_of"]);
    check_fields(map, &allowed)?;
    let f = Fields { map };
    if map.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported",
        ));
    }
    if f.get::<i64>("best_of")?.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("best_of", "`best_of` is not supported (use `n`)"));
    }
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items))
            if !items.is_empty() && items.iter().all(|v| v.as_u64().is_some_and(|id| id <= u32::MAX as u64)) =>
        {
            Prompt::Ids(items.iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect())
        }
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Prompt::Text(items[0].as_str().unwrap_or_default().to_owned())
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be a string or a list of token ids (send one request per prompt)",
            ))
        }
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be a string or a list of token ids",
            ))
        }
    };
    let mut generation = generation_fields(&f, &["max_tokens"])?;
    // OpenAI's completions default is 16 tokens (when nothing else sets a limit).
    generation.sampling.fallback_max_tokens = Some(16);
    let echo = f.get::<bool>("echo")?.unwrap_or(false);
    if let Some(k) = f.get::<i64>("logprobs")? {
        if echo {
            // That combination asks for the prompt's log-probabilities, not computed here.
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` with `echo` (prompt logprobs) is not supported",
            ));
        }
        generation.sampling.set_logprobs("logprobs", k)?;
    }
    Ok(CompletionRequest {
        model: f.get("model")?,
        prompt,
        echo,
        generation,
    })
}
