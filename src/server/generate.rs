//! Chat and text completions: tokenize (on the blocking pool), submit to the engine,
//! and turn its token events into OpenAI responses, whole or as server-sent events.
//! Detokenization and stop strings happen here, per completion; a client that goes away
//! drops the request stream, which cancels the request in the engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::choice::{
    apply_event, chat_message, now_secs, text_logprob, token_text, tool_call_id, usage_json, Choice, ChoiceUpdate, Kind,
};
use super::http::{json_response, sse_event, sse_response, HttpResponse};
use super::images::{check_placeholders, expand_image_tokens, load_images, request_preprocess, ImageMemory};
use super::ServerState;
use crate::api::openai::{GenerationFields, ImageProcessorOverrides, Prompt};
use crate::api::ApiError;
use crate::api::{parse_chat_request, parse_completion_request, ChatRequest, ToolChoice};
use crate::engine::{Constraint, ConstraintStart, EngineEvent, RequestStream, SamplingParams, TokenLogprobs};
use crate::manager::{ModelLease, ServedModel};
use crate::models::{EncoderInput, ImageSet};
use crate::text::{CallSchema, ChatInput, ChatTemplate, GrammarError, GrammarSpec, JsonStyle, ToolEvent};

/// How a reply forced to call a tool must open: `<tool_call>` and the function's name,
/// in the Qwen / Hermes format the tool-call parser reads, one opening per allowed
/// function (the sampler masks everything else until one is complete, so the model
/// chooses among them and then writes the arguments itself). Empty: nothing forced.
fn forced_call_openings(request: &ChatRequest) -> Vec<String> {
    let opening = |name: &str| format!("<tool_call>\n{{\"name\": {}, \"arguments\":", Value::from(name));
    match &request.tool_choice {
        ToolChoice::Auto => Vec::new(),
        ToolChoice::Named(name) => vec![opening(name)],
        ToolChoice::Required => {
            let mut names: Vec<&str> = request
                .tools
                .iter()
                .flat_map(|t| t.as_array().into_iter().flatten())
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(opening).collect()
        }
    }
}

/// What a chat request's output is constrained to, and from where: its
/// `response_format` (or vLLM's fields), or, for strict tools, the calls' arguments.
fn chat_constraint(
    request: &ChatRequest,
    model: &ServedModel,
) -> Result<Option<(GrammarSpec, JsonStyle, &'static str, ConstraintStart)>, ApiError> {
    let think = |t| model.tokenizer.token_to_id(t);
    let answer_start = match (model.reasoning, think("<think>"), think("</think>")) {
        (true, Some(open), Some(close)) => ConstraintStart::AfterReasoning { open, close },
        _ => ConstraintStart::Now,
    };
    let forced_call = request.tools.is_some() && !matches!(request.tool_choice, ToolChoice::Auto);
    match (&request.generation.structured, strict_tool_grammar(request, model)) {
        (Some(s), _) if forced_call => Err(ApiError::invalid(
            s.param,
            format!(
                "`{}` cannot constrain a reply that `tool_choice` forces to be a tool call",
                s.param
            ),
        )),
        (Some(s), _) => Ok(Some((s.spec.clone(), s.style.clone(), s.param, answer_start))),
        (None, Some((spec, start))) => Ok(Some((spec, JsonStyle::default(), "tools", start))),
        (None, None) => Ok(None),
    }
}

/// For requests offering tools with `"strict": true`: the grammar of the calls (each
/// strict function's arguments follow its `parameters`, others are any JSON object) and
/// where it starts: at once when `tool_choice` forces a call, else once the model opens
/// one (`<tool_call>`, a single token in the models that use this format).
fn strict_tool_grammar(request: &ChatRequest, model: &ServedModel) -> Option<(GrammarSpec, ConstraintStart)> {
    let functions: Vec<CallSchema> = request
        .tools
        .iter()
        .flat_map(|t| t.as_array().into_iter().flatten())
        .filter_map(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?.to_owned();
            let strict = f.get("strict").and_then(Value::as_bool) == Some(true);
            let parameters = strict.then(|| f.get("parameters").cloned()).flatten();
            Some(CallSchema { name, parameters })
        })
        .filter(|f| match &request.tool_choice {
            ToolChoice::Named(named) => &f.name == named,
            _ => true,
        })
        .collect();
    if !functions.iter().any(|f| f.parameters.is_some()) {
        return None;
    }
    let several = !matches!(request.tool_choice, ToolChoice::Named(_)) && request.parallel_tool_calls;
    let (opened, start) = match request.tool_choice {
        ToolChoice::Named(_) | ToolChoice::Required => (false, ConstraintStart::Now),
        ToolChoice::Auto => (
            true,
            ConstraintStart::AfterToken(model.tokenizer.token_to_id("<tool_call>")?),
        ),
    };
    Some((
        GrammarSpec::ToolCalls {
            functions,
            opened,
            several,
        },
        start,
    ))
}

/// Compiles a constraint against the model's tokenizer (cached by content), off the
/// reactor. Errors name `param`.
pub(super) async fn compile_constraint(
    model: &ServedModel,
    (spec, style, param, start): (GrammarSpec, JsonStyle, &'static str, ConstraintStart),
) -> Result<Constraint, ApiError> {
    let grammars = model.grammars.clone();
    let compiled = tokio::task::spawn_blocking(move || grammars.compile(&spec, &style))
        .await
        .map_err(|e| ApiError::internal(format!("grammar compilation failed: {e}")))?;
    match compiled {
        Ok(grammar) => Ok(Constraint { grammar, start }),
        Err(e @ GrammarError::Unavailable(_)) => Err(ApiError {
            code: Some("model_not_supported"),
            ..ApiError::invalid(param, format!("`{param}`: {e}"))
        }),
        Err(e) => Err(ApiError::invalid(param, format!("`{param}`: {e}"))),
    }
}

/// The model a request names (`None`: the forced or only model), leased, or loaded
/// first. Requests are parsed and checked before they get here, so a bad request never
/// costs a load.
pub(super) async fn model_for(state: &ServerState, requested: Option<&str>) -> Result<ModelLease, ApiError> {
    let model = match state.models.acquire_loaded(requested) {
        Some(model) => model,
        None => state.models.acquire(requested).await?,
    };
    if model.speech.is_some() {
        return Err(ApiError {
            code: Some("model_not_supported"),
            ..ApiError::invalid(
                "model",
                format!(
                    "`{}` is a speech-to-text model: send audio to /v1/audio/transcriptions",
                    model.name
                ),
            )
        });
    }
    Ok(model)
}

/// A chat request ready for the engine: its model, prompt ids, images and generation
/// settings.
pub(super) struct PreparedChat {
    pub model: ModelLease,
    pub kind: Kind,
    pub prompt_ids: Vec<u32>,
    /// Its images, preprocessed, when it has any.
    pub input: Option<EncoderInput>,
    /// Their share of the server's image memory, held until the reply ends.
    pub image_memory: Option<ImageMemory>,
    pub generation: GenerationFields,
    /// The request's sampling over its model's defaults.
    pub params: SamplingParams,
    /// vLLM's chat `echo`: the last (assistant) message's content, shown before the reply.
    pub echo: Option<String>,
}

/// Refuses images a model cannot take, or more than the server allows.
fn check_images(state: &ServerState, model: &ServedModel, request: &ChatRequest) -> Result<(), ApiError> {
    if model.vision.is_none() && request.image_processor != ImageProcessorOverrides::default() {
        return Err(ApiError {
            code: Some("model_not_supported"),
            ..ApiError::invalid(
                "mm_processor_kwargs",
                format!(
                    "`{}` takes text only: `mm_processor_kwargs` has nothing to act on",
                    model.name
                ),
            )
        });
    }
    let Some(first) = request.images.first() else {
        return Ok(());
    };
    if model.vision.is_none() {
        return Err(ApiError {
            code: Some("model_not_supported"),
            ..ApiError::invalid(
                first.param.clone(),
                format!("`{}` takes text only, not images", model.name),
            )
        });
    }
    let max = state.images.max_per_request;
    if request.images.len() > max {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the request has {} images; at most {max} are allowed per request",
                request.images.len()
            ),
        ));
    }
    Ok(())
}

/// Validates a chat request, finds (or loads) its model, renders the chat template and
/// tokenizes, and reads and preprocesses its images (`server::images`), off the reactor.
/// Shared by chat completions and the Responses API.
pub(super) async fn prepare_chat(state: &ServerState, body: &Value) -> Result<PreparedChat, ApiError> {
    let request = parse_chat_request(body)?;
    let model = model_for(state, request.model.as_deref()).await?;
    let mut params = request.generation.sampling.resolve(&state.defaults(&model))?;
    check_images(state, &model, &request)?;
    let config = match &model.vision {
        Some(vision) => Some(request_preprocess(&vision.preprocess, &request.image_processor)?),
        None => None,
    };
    // A full queue refuses a request with images before any image work.
    if !request.images.is_empty() {
        model.engine.check_room().map_err(ApiError::from)?;
    }
    let tokenizer = model.tokenizer.clone();
    let max_model_len = model.engine.max_model_len();
    let mut kwargs = state.chat_template_kwargs.clone().unwrap_or_default();
    kwargs.extend(request.chat_template_kwargs.clone().unwrap_or_default());
    if let Some(documents) = &request.documents {
        kwargs.insert("documents".into(), documents.clone());
    }
    let (messages, tools) = (request.messages.clone(), request.tools.clone());
    let constraint = match chat_constraint(&request, &model)? {
        Some(c) => Some(compile_constraint(&model, c).await?),
        None => None,
    };
    // A grammar for the calls replaces the forced openings.
    let forced = match &constraint {
        Some(_) => Vec::new(),
        None => forced_call_openings(&request),
    };
    let own_template = request.chat_template.clone();
    let (add_generation_prompt, continue_final) = (request.add_generation_prompt, request.continue_final_message);
    let add_special_tokens = request.generation.add_special_tokens.unwrap_or(false);
    let bad_words = request.generation.bad_words.clone();
    // (prompt ids, forced openings, bad words), each tokenized.
    type Tokenized = (Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>);
    let prepared = tokio::task::spawn_blocking(move || -> Result<Tokenized, ApiError> {
        let request_template;
        let template = match own_template {
            Some(source) => {
                request_template = ChatTemplate::new(source, tokenizer.special_tokens.clone())
                    .map_err(|e| ApiError::invalid("chat_template", format!("`chat_template`: {e}")))?;
                &request_template
            }
            None => tokenizer
                .chat_template()
                .map_err(|e| ApiError::bad_request(format!("cannot apply a chat template: {e}")))?,
        };
        let mut text = template
            .render(ChatInput {
                messages: &messages,
                tools: tools.as_ref(),
                add_generation_prompt,
                kwargs: Some(&kwargs),
            })
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if continue_final {
            text = cut_after_final_message(&text, &messages)?;
        }
        let encode = |text: &str, special: bool| {
            tokenizer
                .encode(text, special)
                .map_err(|e| ApiError::internal(e.to_string()))
        };
        let forced = forced.iter().map(|t| encode(t, false)).collect::<Result<_, _>>()?;
        Ok((
            encode(&text, add_special_tokens)?,
            forced,
            tokenize_bad_words(&tokenizer, &bad_words)?,
        ))
    });
    let (prompt_ids, forced, bad_words) = prepared
        .await
        .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    if request.generation.truncate_prompt_tokens.is_some() && !request.images.is_empty() {
        return Err(ApiError::invalid(
            "truncate_prompt_tokens",
            "`truncate_prompt_tokens` cannot cut a prompt with images",
        ));
    }
    let prompt_ids = truncate_prompt(prompt_ids, &request.generation, max_model_len)?;
    params.bad_words = bad_words;
    // Vision models check every prompt's image tokens, with or without images.
    let (prompt_ids, input, image_memory) = match (&model.vision, config) {
        (Some(vision), Some(config)) if !request.images.is_empty() => {
            check_placeholders(&prompt_ids, vision, request.images.len())?;
            let (pixels, memory) = load_images(
                &request.images,
                &state.images,
                vision,
                &config,
                prompt_ids.len(),
                max_model_len,
            )
            .await?;
            let vision = vision.clone();
            let expanded = tokio::task::spawn_blocking(move || {
                let prompt = expand_image_tokens(&prompt_ids, &vision, &pixels)?;
                // Hashed here, not on the engine thread.
                Ok::<_, ApiError>((prompt, ImageSet::new(pixels)))
            });
            let (prompt, images) = expanded
                .await
                .map_err(|e| ApiError::internal(format!("image preparation failed: {e}")))??;
            (prompt, Some(EncoderInput::Images(Arc::new(images))), Some(memory))
        }
        (Some(vision), _) => (expand_image_tokens(&prompt_ids, vision, &[])?, None, None),
        _ => (prompt_ids, None, None),
    };
    check_max_tokens(&request.generation, prompt_ids.len(), max_model_len)?;
    let kind = Kind::Chat {
        logprobs: request.logprobs,
        tools: request.tools.is_some(),
        reasoning: model.reasoning,
        include_reasoning: request.include_reasoning,
        one_call: matches!(request.tool_choice, ToolChoice::Named(_)) || !request.parallel_tool_calls,
    };
    params.forced_prefixes = forced;
    params.constraint = constraint;
    let echo = match request.messages.as_array().and_then(|m| m.last()) {
        Some(last) if request.echo && last["role"] == "assistant" => Some(message_text(last)),
        _ => None,
    };
    Ok(PreparedChat {
        model,
        kind,
        prompt_ids,
        input,
        image_memory,
        generation: request.generation,
        params,
        echo,
    })
}

/// The text of a (normalized) message: its content string, or its text parts joined.
fn message_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// `continue_final_message`: the rendered conversation cut right after the final
/// message's text, so that the reply continues it (transformers' rule: where the
/// template kept the text's spacing, after the text as sent; else after it stripped).
fn cut_after_final_message(rendered: &str, messages: &Value) -> Result<String, ApiError> {
    let last = messages
        .as_array()
        .and_then(|m| m.last())
        .map(message_text)
        .unwrap_or_default();
    let stripped = last.trim();
    let Some(at) = rendered.rfind(stripped) else {
        return Err(ApiError::invalid(
            "continue_final_message",
            "the final message does not appear in the rendered chat template, so it cannot be continued",
        ));
    };
    let kept = last.trim_start();
    let end = if rendered[at..].starts_with(kept) {
        at + kept.len()
    } else {
        at + stripped.len()
    };
    Ok(rendered[..end].to_owned())
}

/// vLLM's `bad_words` as token sequences: each word with and without a leading space
/// (how it appears mid-text and at the start), without special tokens.
fn tokenize_bad_words(tokenizer: &crate::text::Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for word in words {
        let word = word.trim_start();
        for text in [word.to_owned(), format!(" {word}")] {
            let ids = tokenizer
                .encode(&text, false)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if !ids.is_empty() && !out.contains(&ids) {
                out.push(ids);
            }
        }
    }
    Ok(out)
}

/// vLLM's `truncate_prompt_tokens`: the prompt's last k tokens.
fn truncate_prompt(
    mut ids: Vec<u32>,
    generation: &GenerationFields,
    max_model_len: usize,
) -> Result<Vec<u32>, ApiError> {
    let keep = match generation.truncate_prompt_tokens {
        None => return Ok(ids),
        Some(None) => max_model_len.saturating_sub(1).max(1),
        Some(Some(k)) if k >= max_model_len => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!(
                    "`truncate_prompt_tokens` ({k}) must be below the model's context window ({max_model_len} tokens)"
                ),
            ))
        }
        Some(Some(k)) => k,
    };
    if ids.len() > keep {
        ids.drain(..ids.len() - keep);
    }
    Ok(ids)
}

/// A requested length limit must fit in what the context window leaves after the prompt
/// (as OpenAI and vLLM answer; a model's default limit is cut to fit instead).
fn check_max_tokens(generation: &GenerationFields, prompt_len: usize, max_model_len: usize) -> Result<(), ApiError> {
    let Some(max_tokens) = generation.sampling.max_tokens else {
        return Ok(());
    };
    if prompt_len < max_model_len && prompt_len + max_tokens > max_model_len {
        let param = generation.max_tokens_param;
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                param,
                format!(
                    "`{param}` is too large: {max_tokens}. This model's maximum context length is {max_model_len} tokens and your request has {prompt_len} prompt tokens, which leaves {} for the completion",
                    max_model_len - prompt_len
                ),
            )
        });
    }
    Ok(())
}

pub async fn chat_completions(state: Arc<ServerState>, body: Value, id: String) -> Result<HttpResponse, ApiError> {
    let chat = prepare_chat(&state, &body).await?;
    let id = response_id(&chat.generation, id);
    let prompt = PromptInput {
        ids: chat.prompt_ids,
        input: chat.input,
        image_memory: chat.image_memory,
        echo: chat.echo,
    };
    let own_id = chat.generation.request_id.clone();
    let response = run(
        state,
        chat.model,
        id,
        chat.kind,
        vec![prompt],
        chat.generation,
        chat.params,
    )
    .await?;
    Ok(with_request_id(response, own_id))
}

/// The response carries the request's own id (vLLM's `request_id`) in `x-request-id`,
/// which the access log prints.
fn with_request_id(mut response: HttpResponse, own_id: Option<String>) -> HttpResponse {
    if let Some(v) = own_id.and_then(|id| hyper::header::HeaderValue::from_str(&id).ok()) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// vLLM's `request_id` when the request gave one, else the server's id for it.
fn response_id(generation: &GenerationFields, id: String) -> String {
    match &generation.request_id {
        Some(own) => {
            crate::info!("request {id} is `{own}` (its request_id)");
            own.clone()
        }
        None => id,
    }
}

pub async fn completions(state: Arc<ServerState>, body: Value, id: String) -> Result<HttpResponse, ApiError> {
    let request = parse_completion_request(&body)?;
    let model = model_for(&state, request.model.as_deref()).await?;
    let mut params = request.generation.sampling.resolve(&state.defaults(&model))?;
    let id = response_id(&request.generation, id);
    if let Some(s) = &request.generation.structured {
        let constraint = (s.spec.clone(), s.style.clone(), s.param, ConstraintStart::Now);
        params.constraint = Some(compile_constraint(&model, constraint).await?);
    }
    let tokenizer = model.tokenizer.clone();
    let prompts = request.prompts.clone();
    let add_special_tokens = request.generation.add_special_tokens.unwrap_or(true);
    let bad_words = request.generation.bad_words.clone();
    let tokenized = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let prompts = prompts
            .into_iter()
            .map(|prompt| match prompt {
                Prompt::Text(text) => {
                    let ids = tokenizer
                        .encode(&text, add_special_tokens)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    Ok((ids, text))
                }
                Prompt::Ids(ids) => {
                    let text = tokenizer.decode(&ids, false).unwrap_or_default();
                    Ok((ids, text))
                }
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok((prompts, tokenize_bad_words(&tokenizer, &bad_words)?))
    });
    let (prompts, bad_words) = tokenized
        .await
        .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    params.bad_words = bad_words;
    let max_model_len = model.engine.max_model_len();
    let mut inputs = Vec::with_capacity(prompts.len());
    for (ids, text) in prompts {
        let truncated = request.generation.truncate_prompt_tokens.is_some();
        let ids = truncate_prompt(ids, &request.generation, max_model_len)?;
        check_max_tokens(&request.generation, ids.len(), max_model_len)?;
        // The echo is the prompt the model saw.
        let echo = match (request.echo, truncated) {
            (false, _) => None,
            (true, false) => Some(text),
            (true, true) => Some(model.tokenizer.decode(&ids, false).unwrap_or_default()),
        };
        inputs.push(PromptInput {
            ids,
            input: None,
            image_memory: None,
            echo,
        });
    }
    let own_id = request.generation.request_id.clone();
    let response = run(state, model, id, Kind::Text, inputs, request.generation, params).await?;
    Ok(with_request_id(response, own_id))
}

/// What a request gives the engine besides its settings (one per prompt).
struct PromptInput {
    ids: Vec<u32>,
    /// Images, for vision-language models.
    input: Option<EncoderInput>,
    image_memory: Option<ImageMemory>,
    /// Text shown before the reply: completions' `echo` (the prompt), chat's (the last
    /// assistant message).
    echo: Option<String>,
}

/// One prompt of a request, submitted: its stream, and what its replies show.
struct Submitted {
    stream: RequestStream,
    /// Prompt token ids (with `prompt_logprobs`, their entries are reported).
    ids: Vec<u32>,
    echo: Option<String>,
    /// `PromptLogprobs` received so far.
    prompt_logprobs: Vec<(TokenLogprobs, usize)>,
    /// The opening frames of its choices have been sent (streaming).
    opened: bool,
}

/// The next event of any of the request's unfinished prompts (`n` choices each), with
/// the prompt's index (`None`: a stream ended before its choices finished).
async fn next_event(prompts: &mut [Submitted], choices: &[Choice], n: usize) -> Option<(usize, EngineEvent)> {
    std::future::poll_fn(|cx| {
        for (k, p) in prompts.iter_mut().enumerate() {
            if choices[k * n..(k + 1) * n].iter().all(|c| c.finish.is_some()) {
                continue; // its stream closes once its request is done
            }
            match p.stream.poll_next(cx) {
                std::task::Poll::Ready(Some(event)) => return std::task::Poll::Ready(Some((k, event))),
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// An event of prompt `k` with its choice index made the request's (`k * n + i`).
fn global_index(mut event: EngineEvent, k: usize, n: usize) -> EngineEvent {
    if let EngineEvent::Token { index, .. } | EngineEvent::Finished { index, .. } = &mut event {
        *index += k * n;
    }
    event
}

async fn run(
    state: Arc<ServerState>,
    model: ModelLease,
    id: String,
    kind: Kind,
    prompts: Vec<PromptInput>,
    generation: GenerationFields,
    params: SamplingParams,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    let n = params.n;
    let param = if kind == Kind::Text { "prompt" } else { "messages" };
    // Given back when this request's reply ends (moved into the streaming task).
    let mut image_memory = Vec::new();
    let mut submitted = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let stream = model
            .engine
            .submit_with_input(prompt.ids.clone(), params.clone(), prompt.input)
            .map_err(|e| {
                let mut error = ApiError::from(e);
                if error.code == Some("context_length_exceeded") {
                    error.param = Some(param.into());
                }
                error
            })?;
        image_memory.extend(prompt.image_memory);
        submitted.push(Submitted {
            stream,
            ids: prompt.ids,
            echo: prompt.echo,
            prompt_logprobs: Vec::new(),
            opened: false,
        });
    }
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let choices: Vec<Choice> = (0..n * submitted.len())
        .map(|_| Choice::new(&generation, kind))
        .collect();
    let ctx = StreamContext {
        id,
        kind,
        created: now_secs(),
        include_usage: generation.include_usage,
        continuous_usage: generation.continuous_usage,
        prompt_logprobs: params.prompt_logprobs.is_some(),
        token_ids_as_text: generation.return_tokens_as_token_ids,
        prompt_tokens,
        n,
        start,
    };
    if generation.stream {
        let (response, tx) = sse_response();
        tokio::spawn(async move {
            let _image_memory = image_memory;
            stream_events(state, model, submitted, ctx, choices, tx).await;
        });
        return Ok(response);
    }
    collect(state, model, submitted, ctx, choices).await
}

async fn collect(
    state: Arc<ServerState>,
    model: ModelLease,
    mut prompts: Vec<Submitted>,
    ctx: StreamContext,
    mut choices: Vec<Choice>,
) -> Result<HttpResponse, ApiError> {
    let tokenizer = model.tokenizer.clone();
    let mut first = true;
    while choices.iter().any(|c| c.finish.is_none()) {
        let Some((k, event)) = next_event(&mut prompts, &choices, ctx.n).await else {
            return Err(ApiError::internal("the engine stopped before the request finished"));
        };
        if let EngineEvent::PromptLogprobs(entries) = event {
            prompts[k].prompt_logprobs.extend(entries);
            continue;
        }
        if first && matches!(event, EngineEvent::Token { .. }) {
            state
                .metrics
                .time_to_first_token
                .observe(ctx.start.elapsed().as_secs_f64());
            first = false;
        }
        apply_event(&tokenizer, ctx.kind, &mut choices, global_index(event, k, ctx.n)).map_err(ApiError::internal)?;
    }
    // Completions cut short by a stop string are still running: stop them now.
    for p in &prompts {
        model.engine.cancel(p.stream.id);
    }
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    state
        .metrics
        .completion_tokens
        .fetch_add(completion as u64, Ordering::Relaxed);
    log_finished(&ctx.id, ctx.prompt_tokens, &choices, ctx.start);
    let usage = usage_json(ctx.prompt_tokens, &choices);
    let id = &ctx.id;
    let mut body = match ctx.kind {
        Kind::Chat { logprobs, .. } => json!({
            "id": id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": model.name,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let mut message = chat_message(id, i, c, ctx.kind);
                if let Some(echo) = &prompts[0].echo {
                    if let Some(Value::String(content)) = message.get_mut("content") {
                        content.insert_str(0, echo);
                    }
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                    "finish_reason": c.finish,
                })
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Kind::Text => {
            // Each prompt's entries, made once for its `n` choices: with `echo`, its
            // tokens' entries open `logprobs` (vLLM, OpenAI); `prompt_logprobs` too.
            let per_prompt: Vec<(Vec<Value>, Option<Value>)> = prompts
                .iter()
                .map(|p| {
                    let echoed = match (&p.echo, ctx.prompt_logprobs) {
                        (Some(_), true) => prompt_entries_as_text(&tokenizer, p, ctx.token_ids_as_text),
                        _ => Vec::new(),
                    };
                    let scored = ctx
                        .prompt_logprobs
                        .then(|| prompt_logprobs_json(&tokenizer, p, ctx.token_ids_as_text));
                    (echoed, scored)
                })
                .collect();
            json!({
                "id": id,
                "object": "text_completion",
                "created": ctx.created,
                "model": model.name,
                "choices": choices.iter().enumerate().map(|(i, c)| {
                    let (echoed, scored) = &per_prompt[i / ctx.n];
                    let echo = prompts[i / ctx.n].echo.as_deref().unwrap_or("");
                    let entries: Vec<Value> = echoed.iter().chain(&c.logprobs).cloned().collect();
                    let mut choice = json!({
                        "index": i,
                        "text": format!("{echo}{}", c.text),
                        "logprobs": if entries.is_empty() { Value::Null } else { completion_logprobs(&entries) },
                        "finish_reason": c.finish,
                    });
                    if let Some(scored) = scored {
                        choice["prompt_logprobs"] = scored.clone();
                    }
                    choice
                }).collect::<Vec<_>>(),
                "usage": usage,
            })
        }
    };
    if ctx.prompt_logprobs && matches!(ctx.kind, Kind::Chat { .. }) {
        body["prompt_logprobs"] = prompt_logprobs_json(&tokenizer, &prompts[0], ctx.token_ids_as_text);
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// vLLM's `prompt_logprobs`: `null` for the first token, then per token a map from token
/// id to `{logprob, rank, decoded_token}`: the prompt's own token and the likeliest
/// alternatives.
fn prompt_logprobs_json(tokenizer: &crate::text::Tokenizer, prompt: &Submitted, as_id: bool) -> Value {
    let mut out = vec![Value::Null];
    for (lp, rank) in &prompt.prompt_logprobs {
        let mut entry = serde_json::Map::new();
        for (i, &(id, logprob)) in lp.top.iter().enumerate() {
            entry.insert(
                id.to_string(),
                json!({"logprob": logprob, "rank": i + 1, "decoded_token": token_text(tokenizer, id, as_id)}),
            );
        }
        entry.insert(
            lp.token.to_string(),
            json!({"logprob": lp.logprob, "rank": rank, "decoded_token": token_text(tokenizer, lp.token, as_id)}),
        );
        out.push(Value::Object(entry));
    }
    Value::Array(out)
}

/// The prompt's entries in the completions logprobs layout: the first token has none
/// (`null` log-probability, no alternatives); each later one lists the token itself
/// among its alternatives.
fn prompt_entries_as_text(tokenizer: &crate::text::Tokenizer, prompt: &Submitted, as_id: bool) -> Vec<Value> {
    let mut entries = Vec::with_capacity(prompt.ids.len());
    if let Some(&first) = prompt.ids.first() {
        entries.push(json!({"token": token_text(tokenizer, first, as_id), "logprob": null, "top": null}));
    }
    for (lp, _) in &prompt.prompt_logprobs {
        let mut entry = text_logprob(tokenizer, lp, as_id);
        if !lp.top.iter().any(|&(id, _)| id == lp.token) {
            if let Some(top) = entry["top"].as_array_mut() {
                top.push(json!([token_text(tokenizer, lp.token, as_id), lp.logprob]));
            }
        }
        entries.push(entry);
    }
    entries
}

fn log_finished(id: &str, prompt_tokens: usize, choices: &[Choice], start: Instant) {
    crate::debug!(
        "{id}: {prompt_tokens} prompt tokens, {} completion tokens, finish {:?}, {:.1} ms",
        choices.iter().map(|c| c.tokens).sum::<usize>(),
        choices.iter().map(|c| c.finish.unwrap_or("-")).collect::<Vec<_>>(),
        start.elapsed().as_secs_f64() * 1e3
    );
}

/// The legacy completions logprobs object from per-token entries (an entry whose `top`
/// is `null` has `null` alternatives: an echoed prompt's first token).
fn completion_logprobs(entries: &[Value]) -> Value {
    let tokens: Vec<&Value> = entries.iter().map(|e| &e["token"]).collect();
    let logprobs: Vec<&Value> = entries.iter().map(|e| &e["logprob"]).collect();
    let top: Vec<Value> = entries
        .iter()
        .map(|e| {
            let Some(pairs) = e["top"].as_array() else {
                return Value::Null;
            };
            let mut m = serde_json::Map::new();
            for pair in pairs {
                if let (Some(t), Some(l)) = (pair[0].as_str(), pair.get(1)) {
                    m.insert(t.to_owned(), l.clone());
                }
            }
            Value::Object(m)
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top})
}

struct StreamContext {
    id: String,
    kind: Kind,
    created: u64,
    include_usage: bool,
    /// vLLM's `continuous_usage_stats`: usage on every chunk.
    continuous_usage: bool,
    prompt_logprobs: bool,
    token_ids_as_text: bool,
    prompt_tokens: usize,
    /// Choices per prompt.
    n: usize,
    start: Instant,
}

impl StreamContext {
    fn chunk(&self, model: &str, choices: Value, so_far: &[Choice]) -> Value {
        let object = match self.kind {
            Kind::Chat { .. } => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut chunk =
            json!({"id": self.id, "object": object, "created": self.created, "model": model, "choices": choices});
        if self.continuous_usage {
            chunk["usage"] = usage_json(self.prompt_tokens, so_far);
        }
        chunk
    }
}

/// The frames that open prompt `k`'s choices: the role for chat (with the echo), the
/// echoed prompt for completions (with its log-probabilities when asked).
fn opening_frames(
    ctx: &StreamContext,
    tokenizer: &crate::text::Tokenizer,
    model: &str,
    k: usize,
    prompt: &Submitted,
    choices: &[Choice],
) -> Vec<Value> {
    // The prompt's entries, made once for its `n` choices.
    let prompt_logprobs = ctx
        .prompt_logprobs
        .then(|| prompt_logprobs_json(tokenizer, prompt, ctx.token_ids_as_text));
    let echo_logprobs = match (&prompt.echo, ctx.prompt_logprobs) {
        (Some(_), true) => completion_logprobs(&prompt_entries_as_text(tokenizer, prompt, ctx.token_ids_as_text)),
        _ => Value::Null,
    };
    let mut frames = Vec::new();
    for i in k * ctx.n..(k + 1) * ctx.n {
        let mut frame = match (ctx.kind, &prompt.echo) {
            (Kind::Chat { .. }, echo) => ctx.chunk(
                model,
                json!([{"index": i, "delta": {"role": "assistant", "content": echo.as_deref().unwrap_or("")}, "logprobs": null, "finish_reason": null}]),
                choices,
            ),
            (Kind::Text, Some(echo)) => ctx.chunk(
                model,
                json!([{"index": i, "text": echo, "logprobs": echo_logprobs, "finish_reason": null}]),
                choices,
            ),
            (Kind::Text, None) if ctx.prompt_logprobs => ctx.chunk(
                model,
                json!([{"index": i, "text": "", "logprobs": null, "finish_reason": null}]),
                choices,
            ),
            (Kind::Text, None) => continue,
        };
        if let Some(value) = &prompt_logprobs {
            match ctx.kind {
                Kind::Chat { .. } => frame["prompt_logprobs"] = value.clone(),
                Kind::Text => frame["choices"][0]["prompt_logprobs"] = value.clone(),
            }
        }
        frames.push(frame);
    }
    frames
}

async fn stream_events(
    state: Arc<ServerState>,
    lease: ModelLease,
    mut prompts: Vec<Submitted>,
    ctx: StreamContext,
    mut choices: Vec<Choice>,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
) {
    let tokenizer = lease.tokenizer.clone();
    let model = lease.name.clone();
    let send = |value: Value| {
        let tx = tx.clone();
        async move { tx.send(sse_event(&value.to_string())).await.is_ok() }
    };
    // Without prompt log-probabilities to wait for, every choice opens at once.
    if !ctx.prompt_logprobs {
        for (k, prompt) in prompts.iter_mut().enumerate() {
            for frame in opening_frames(&ctx, &tokenizer, &model, k, prompt, &choices) {
                if !send(frame).await {
                    return;
                }
            }
            prompt.opened = true;
        }
    }
    let mut last_token_at: Option<Instant> = None;
    while choices.iter().any(|c| c.finish.is_none()) {
        // Watch the client too: tokens that add no text (a split character, held-back
        // stop prefix) send nothing, and would not notice a hang-up for a long time.
        let event = tokio::select! {
            event = next_event(&mut prompts, &choices, ctx.n) => event,
            _ = tx.closed() => return,
        };
        let Some((k, event)) = event else {
            let error = ApiError::internal("the engine stopped before the request finished");
            let _ = tx.send(sse_event(&error.to_json().to_string())).await;
            return;
        };
        if let EngineEvent::PromptLogprobs(entries) = event {
            prompts[k].prompt_logprobs.extend(entries);
            continue;
        }
        if !prompts[k].opened {
            prompts[k].opened = true;
            for frame in opening_frames(&ctx, &tokenizer, &model, k, &prompts[k], &choices) {
                if !send(frame).await {
                    return;
                }
            }
        }
        if matches!(event, EngineEvent::Token { .. }) {
            let now = Instant::now();
            match last_token_at {
                None => state
                    .metrics
                    .time_to_first_token
                    .observe((now - ctx.start).as_secs_f64()),
                Some(prev) => state.metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
            }
            last_token_at = Some(now);
        }
        let update = match apply_event(&tokenizer, ctx.kind, &mut choices, global_index(event, k, ctx.n)) {
            Ok(update) => update,
            Err(e) => {
                let error = ApiError::internal(e);
                let _ = tx.send(sse_event(&error.to_json().to_string())).await;
                return;
            }
        };
        let Some(ChoiceUpdate {
            index,
            text,
            calls,
            reasoning,
            logprob,
            finish,
        }) = update
        else {
            continue;
        };
        if !reasoning.is_empty()
            && matches!(
                ctx.kind,
                Kind::Chat {
                    include_reasoning: true,
                    ..
                }
            )
        {
            let delta = json!([{"index": index, "delta": {"reasoning_content": reasoning}, "logprobs": null, "finish_reason": null}]);
            if !send(ctx.chunk(&model, delta, &choices)).await {
                return;
            }
        }
        if !text.is_empty() || logprob.is_some() {
            let choice = match ctx.kind {
                Kind::Chat { logprobs, .. } => json!({"index": index, "delta": {"content": text},
                    "logprobs": if logprobs { json!({"content": logprob.into_iter().collect::<Vec<_>>()}) } else { Value::Null },
                    "finish_reason": null}),
                Kind::Text => json!({"index": index, "text": text,
                    "logprobs": logprob.map(|l| completion_logprobs(&[l])), "finish_reason": null}),
            };
            if !send(ctx.chunk(&model, json!([choice]), &choices)).await {
                return; // the client went away: dropping the streams cancels the requests
            }
        }
        // A new call: its id, type and name first; then its arguments as they grow.
        let mut slot =
            choices[index].tool_calls.len() - calls.iter().filter(|e| matches!(e, ToolEvent::CallStart(_))).count();
        for event in calls {
            let call = match event {
                ToolEvent::CallStart(name) => {
                    slot += 1;
                    json!({"index": slot - 1, "id": tool_call_id(&ctx.id, index, slot - 1), "type": "function",
                        "function": {"name": name, "arguments": ""}})
                }
                ToolEvent::CallArgs(text) if slot > 0 => json!({"index": slot - 1, "function": {"arguments": text}}),
                _ => continue,
            };
            let delta =
                json!([{"index": index, "delta": {"tool_calls": [call]}, "logprobs": null, "finish_reason": null}]);
            if !send(ctx.chunk(&model, delta, &choices)).await {
                return;
            }
        }
        if let Some(reason) = finish {
            let choice = match ctx.kind {
                Kind::Chat { .. } => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}),
                Kind::Text => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason}),
            };
            if !send(ctx.chunk(&model, json!([choice]), &choices)).await {
                return;
            }
        }
    }
    drop(prompts);
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    state
        .metrics
        .completion_tokens
        .fetch_add(completion as u64, Ordering::Relaxed);
    log_finished(&ctx.id, ctx.prompt_tokens, &choices, ctx.start);
    if ctx.include_usage {
        let mut chunk = ctx.chunk(&model, json!([]), &choices);
        chunk["usage"] = usage_json(ctx.prompt_tokens, &choices);
        if !send(chunk).await {
            return;
        }
    }
    let _ = tx.send(bytes::Bytes::from_static(b"data: [DONE]\n\n")).await;
}
