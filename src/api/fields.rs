//! Reading a request body field by field: typed reads that name the field on error, the
//! list of fields a route takes, and the model a body names.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ApiError;

/// Reads typed fields out of a JSON object, naming the field on error.
pub(crate) struct Fields<'a> {
    pub map: &'a Map<String, Value>,
}

impl Fields<'_> {
    /// Type-checks fields that must be strings when given (informational fields with no
    /// effect: a wrong type is still the caller's mistake).
    pub fn check_strings(&self, keys: &[&str]) -> Result<(), ApiError> {
        keys.iter().try_for_each(|key| self.get::<String>(key).map(drop))
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| ApiError::invalid(key, format!("`{key}` has the wrong type: {e}"))),
        }
    }
}

/// The `model` a request names, if any (a wrong type is the request's error), for
/// routes that read nothing else before they know the model.
pub fn requested_model(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid("model", "`model` must be a string")),
    }
}

pub(crate) fn as_object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

/// Refuses keys of a nested object (`stream_options`, ...) outside `allowed`.
pub(crate) fn check_fields(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k.clone(),
            format!("`{k}` is not a supported parameter"),
        )),
        None => Ok(()),
    }
}

/// Which request bodies a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
    Responses,
}

impl Route {
    const fn bit(self) -> u8 {
        match self {
            Route::Chat => 1,
            Route::Completions => 2,
            Route::Responses => 4,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Responses => "/v1/responses",
        }
    }
}

const C: u8 = Route::Chat.bit();
const T: u8 = Route::Completions.bit();
const R: u8 = Route::Responses.bit();

/// What inferd does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// It changes the output as its definition says (some values may be refused: the
    /// note says which).
    Acted,
    /// Accepted, type-checked where it matters, and has no effect: it cannot change what
    /// inferd generates.
    Ignored,
    /// Any value but `null` is a 400 naming the field: ignoring it would silently give
    /// the caller something other than what it asked for.
    Refused,
}

/// Where a field is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    OpenAi,
    Vllm,
    /// transformers' `generate` names, taken by `transformers serve` and inferd.
    Transformers,
}

/// One request field: the routes that take it, and what inferd does with it.
#[derive(Debug, Clone, Copy)]
pub struct FieldRule {
    pub name: &'static str,
    routes: u8,
    pub origin: Origin,
    pub treatment: Treatment,
    pub note: &'static str,
}

impl FieldRule {
    pub fn takes(&self, route: Route) -> bool {
        self.routes & route.bit() != 0
    }
}

const fn rule(name: &'static str, routes: u8, origin: Origin, treatment: Treatment, note: &'static str) -> FieldRule {
    FieldRule {
        name,
        routes,
        origin,
        treatment,
        note,
    }
}

use Origin::{OpenAi, Transformers, Vllm};
use Treatment::{Acted, Ignored, Refused};

/// Every request field of the three generation routes: OpenAI's current request bodies,
/// vLLM's extensions (vLLM being what OpenAI-compatible clients are written against),
/// and transformers' sampling names. A field in no row is refused as unknown. The
/// table in docs/api-fields.md is this one, rendered (`field_table_markdown`).
pub const FIELD_TABLE: &[FieldRule] = &[
    // OpenAI
    rule("model", C | T | R, OpenAi, Acted, "The model to serve the request (loaded on first use); optional when one is forced or loaded."),
    rule("messages", C, OpenAi, Acted, "Roles `system`, `developer` (as system), `user`, `assistant`, `tool`; text and `image_url` parts."),
    rule("prompt", T, OpenAi, Acted, "A string, a list of token ids, or a list of either (one choice group per prompt)."),
    rule("input", R, OpenAi, Acted, "Text or input items (messages, images, function calls and their outputs)."),
    rule("instructions", R, OpenAi, Acted, "A system message before the input."),
    rule("stream", C | T | R, OpenAi, Acted, "Server-sent events, ending with `data: [DONE]` (chat and completions)."),
    rule("stream_options", C | T | R, OpenAi, Acted, "`include_usage` (a last chunk with usage), vLLM's `continuous_usage_stats` (usage on every chunk); `include_obfuscation` has no effect (no obfuscation padding is sent)."),
    rule("max_tokens", C | T, OpenAi, Acted, "At least 1; more than the context window leaves after the prompt is a 400. Completions default to 16."),
    rule("max_completion_tokens", C, OpenAi, Acted, "As `max_tokens` (the newer name wins when both are given)."),
    rule("max_output_tokens", R, OpenAi, Acted, "As `max_tokens`."),
    rule("temperature", C | T | R, OpenAi, Acted, "0 is greedy."),
    rule("top_p", C | T | R, OpenAi, Acted, "In (0, 1]."),
    rule("n", C | T, OpenAi, Acted, "Up to 128 completions, sharing the prompt's KV blocks."),
    rule("seed", C | T | R, OpenAi, Acted, "Same seed, same request: same output, whatever the batch."),
    rule("stop", C | T, OpenAi, Acted, "Up to 16 strings; the text stops before the first match (see `include_stop_str_in_output`)."),
    rule("presence_penalty", C | T | R, OpenAi, Acted, "In [-2, 2], over output tokens."),
    rule("frequency_penalty", C | T | R, OpenAi, Acted, "In [-2, 2], over output tokens."),
    rule("logit_bias", C | T | R, OpenAi, Acted, "Token id to a bias in [-100, 100]."),
    rule("logprobs", C | T, OpenAi, Acted, "Chat: `true` for the chosen tokens' log-probabilities; completions: how many alternatives (0 to 20), with `echo` the prompt's too."),
    rule("top_logprobs", C | R, OpenAi, Acted, "Chat: alternatives per token (0 to 20, needs `logprobs`). Responses: only 0 (log-probabilities are not in Responses output yet)."),
    rule("echo", C | T, OpenAi, Acted, "Completions: the prompt before the text. Chat (vLLM): the last message's content before the reply when that message is the assistant's."),
    rule("suffix", T, OpenAi, Acted, "Only empty: fill-in-the-middle is refused."),
    rule("best_of", T, OpenAi, Acted, "Only equal to `n` (no server-side best-of selection)."),
    rule("tools", C | R, OpenAi, Acted, "Function tools (Qwen / Hermes tool calling)."),
    rule("tool_choice", C | R, OpenAi, Acted, "`none`, `auto`, `required`, or a named function (forced by masking the reply's opening)."),
    rule("parallel_tool_calls", C | R, OpenAi, Acted, "`false`: the reply ends with its first call."),
    rule("response_format", C | T, OpenAi, Acted, "`text`, `json_object` (any JSON object) or `json_schema` (`schema` enforced token by token; `strict` either way). Completions take it too, as in vLLM. See docs/structured-outputs.md."),
    rule("text", R, OpenAi, Acted, "`format`: `text`, `json_object` or `json_schema` (as chat's `response_format`); `verbosity` has no effect."),
    rule("modalities", C, OpenAi, Acted, "Only `[\"text\"]`: audio output is refused."),
    rule("audio", C, OpenAi, Refused, "Audio output is not supported."),
    rule("prediction", C, OpenAi, Refused, "Predicted outputs are not supported."),
    rule("web_search_options", C, OpenAi, Refused, "Web search is not available."),
    rule("functions", C, OpenAi, Refused, "Deprecated by OpenAI: send `tools`."),
    rule("function_call", C, OpenAi, Refused, "Deprecated by OpenAI: send `tool_choice`."),
    rule("reasoning_effort", C, OpenAi, Acted, "Given to the chat template as `reasoning_effort` (as vLLM does); templates that do not read it ignore it."),
    rule("reasoning", R, OpenAi, Refused, "Thinking is set by `--reasoning` or `chat_template_kwargs`."),
    rule("store", R, OpenAi, Acted, "`false` keeps the response out of the store."),
    rule("store", C, OpenAi, Ignored, "Chat completions are not stored."),
    rule("previous_response_id", R, OpenAi, Acted, "Continues a stored response's conversation."),
    rule("metadata", R, OpenAi, Acted, "Stored and echoed (16 strings at most)."),
    rule("metadata", C, OpenAi, Ignored, "Chat completions are not stored."),
    rule("truncation", R, OpenAi, Acted, "Only `disabled`: an input too long is a 400."),
    rule("include", R, OpenAi, Acted, "Only empty: no extra output data is available."),
    rule("background", R, OpenAi, Acted, "Only `false`: responses run in the foreground."),
    rule("conversation", R, OpenAi, Refused, "Conversations objects are not stored: use `previous_response_id`."),
    rule("prompt", R, OpenAi, Refused, "Stored prompt templates are OpenAI's: send `input`."),
    rule("max_tool_calls", R, OpenAi, Ignored, "Limits built-in tool calls; inferd has none (function calls are the model's)."),
    rule("user", C | T | R, OpenAi, Ignored, "An end-user id for abuse monitoring."),
    rule("safety_identifier", C | R, OpenAi, Ignored, "An end-user id for abuse monitoring."),
    rule("service_tier", C | R, OpenAi, Ignored, "One tier."),
    rule("prompt_cache_key", C | R, OpenAi, Ignored, "The prefix cache finds shared prefixes by content."),
    rule("prompt_cache_retention", C | R, OpenAi, Ignored, "Cached blocks stay until their memory is needed."),
    rule("verbosity", C, OpenAi, Ignored, "A hint to OpenAI's reasoning models."),
    // vLLM
    rule("top_k", C | T | R, Vllm, Acted, "At least 1; 0 or -1 disable."),
    rule("min_p", C | T | R, Vllm, Acted, "In [0, 1]."),
    rule("repetition_penalty", C | T | R, Vllm, Acted, "Multiplicative, over prompt and output (transformers' rule); > 0."),
    rule("min_tokens", C | T | R, Vllm, Acted, "EOS and stop tokens are banned until this many tokens are out."),
    rule("ignore_eos", C | T | R, Vllm, Acted, "Generate past EOS, up to the length limit."),
    rule("stop_token_ids", C | T | R, Vllm, Acted, "Token ids that end generation, besides EOS."),
    rule("include_stop_str_in_output", C | T, Vllm, Acted, "The matched stop string stays at the end of the text."),
    rule("skip_special_tokens", C | T, Vllm, Acted, "`false` keeps special tokens in the text (default `true`)."),
    rule("spaces_between_special_tokens", C | T, Vllm, Ignored, "Fast tokenizers (every model inferd serves) decode the same either way; vLLM ignores it for them too."),
    rule("bad_words", C | T | R, Vllm, Acted, "Words never generated: each word's tokens, with and without a leading space, are banned as a sequence."),
    rule("allowed_token_ids", C | T | R, Vllm, Acted, "Only these token ids may be generated."),
    rule("truncate_prompt_tokens", C | T, Vllm, Acted, "Keep only the last k prompt tokens (k >= 1, or -1 for the context window less one)."),
    rule("prompt_logprobs", C | T, Vllm, Acted, "The prompt tokens' log-probabilities (and k alternatives, 0 to 20) as `prompt_logprobs`; such a prompt is computed, not taken from the prefix cache."),
    rule("return_tokens_as_token_ids", C | T, Vllm, Acted, "Log-probability entries name tokens as `token_id:<id>`."),
    rule("add_generation_prompt", C, Vllm, Acted, "Default `true`: the template's opening of the assistant turn."),
    rule("continue_final_message", C, Vllm, Acted, "Continue the last (assistant) message instead of starting a new one; not with `add_generation_prompt`."),
    rule("add_special_tokens", C | T, Vllm, Acted, "Let the tokenizer add its special tokens (BOS) to the prompt: default `false` for chat (the template has them), `true` for completions."),
    rule("chat_template", C, Vllm, Acted, "A Jinja chat template for this request (sandboxed as model templates are)."),
    rule("chat_template_kwargs", C | R, Vllm, Acted, "Extra template variables (`enable_thinking`, ...), over the server's `--chat-template-kwargs`."),
    rule("documents", C, Vllm, Acted, "Given to the chat template as `documents` (RAG templates)."),
    rule("mm_processor_kwargs", C, Vllm, Acted, "`min_pixels` / `max_pixels` for the image processor."),
    rule("priority", C | T | R, Vllm, Acted, "Waiting requests start lowest value first (default 0; arrival order among equals)."),
    rule("request_id", C | T, Vllm, Acted, "Becomes the response's id (and the id in logs); 1 to 128 letters, digits, `-`, `_`, `.`, `:`."),
    rule("cache_salt", C | T | R, Vllm, Acted, "Prefix-cache blocks are shared only between requests with the same salt."),
    rule("length_penalty", C | T, Vllm, Ignored, "Beam search only (see `use_beam_search`)."),
    rule("use_beam_search", C | T, Vllm, Acted, "Only `false`: beam search is refused."),
    rule("include_reasoning", C, Vllm, Acted, "`false` drops `reasoning_content` from the reply."),
    rule("structured_outputs", C | T, Vllm, Acted, "One of `json` (a schema), `regex`, `choice`, `grammar` (Lark or GBNF), `json_object: true`; `disable_any_whitespace`, `whitespace_pattern`, `disable_additional_properties`; `disable_fallback` has no effect; `structural_tag` is refused."),
    rule("guided_json", C | T, Vllm, Acted, "vLLM's older spelling of `structured_outputs.json`."),
    rule("guided_regex", C | T, Vllm, Acted, "vLLM's older spelling of `structured_outputs.regex`."),
    rule("guided_choice", C | T, Vllm, Acted, "vLLM's older spelling of `structured_outputs.choice`."),
    rule("guided_grammar", C | T, Vllm, Acted, "vLLM's older spelling of `structured_outputs.grammar`."),
    rule("guided_whitespace_pattern", C | T, Vllm, Acted, "vLLM's older spelling of `structured_outputs.whitespace_pattern`."),
    rule("guided_decoding_backend", C | T, Vllm, Ignored, "One backend (llguidance)."),
    rule("logits_processors", C | T, Vllm, Refused, "Custom logits processors are not loaded."),
    rule("prompt_embeds", T, Vllm, Refused, "Prompt embeddings are not supported."),
    rule("vllm_xargs", C | T, Vllm, Ignored, "Arguments for custom logits processors; none are loaded."),
    rule("kv_transfer_params", C | T, Vllm, Ignored, "Disaggregated prefill is not configured."),
    // transformers
    rule("generation_config", C | T | R, Transformers, Acted, "A transformers `GenerationConfig` (object or JSON string) under the request's own fields."),
    rule("no_repeat_ngram_size", C | T, Transformers, Acted, "Bans repeating any n-gram of this size (prompt and output)."),
];

/// The rule for `name` on `route`.
pub fn field_rule(route: Route, name: &str) -> Option<&'static FieldRule> {
    FIELD_TABLE.iter().find(|r| r.name == name && r.takes(route))
}

/// Refuses fields the route does not take and fields the table refuses.
pub(crate) fn check_route_fields(map: &Map<String, Value>, route: Route) -> Result<(), ApiError> {
    for (key, value) in map {
        match field_rule(route, key) {
            None => {
                return Err(ApiError::invalid(
                    key.clone(),
                    format!("`{key}` is not a supported parameter of {}", route.path()),
                ))
            }
            Some(rule) if rule.treatment == Treatment::Refused && !value.is_null() => {
                return Err(ApiError::invalid(
                    key.clone(),
                    format!("`{key}` is not supported: {}", rule.note),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The field table as Markdown (docs/api-fields.md holds this).
pub fn field_table_markdown() -> String {
    let mut out =
        String::from("| Field | Chat | Completions | Responses | From | inferd |\n|---|:-:|:-:|:-:|---|---|\n");
    for r in FIELD_TABLE {
        let mark = |route: Route| if r.takes(route) { "✓" } else { "" };
        let origin = match r.origin {
            OpenAi => "OpenAI",
            Vllm => "vLLM",
            Transformers => "transformers",
        };
        let what = match r.treatment {
            Acted => "acted on",
            Ignored => "no effect",
            Refused => "**refused** (400)",
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {origin} | {what}: {} |\n",
            r.name,
            mark(Route::Chat),
            mark(Route::Completions),
            mark(Route::Responses),
            r.note
        ));
    }
    out
}
