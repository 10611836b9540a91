//! Chat and text completions: tokenize (on the blocking pool), submit to the engine,
//! and turn its token events into OpenAI responses, whole or as server-sent events.
//! Detokenization and stop strings happen here, per completion; a client that goes away
//! drops the request stream, which cancels the request in the engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::choice::{apply_event, chat_message, now_secs, tool_call_id, usage_json, Choice, ChoiceUpdate, Kind};
use super::http::{json_response, sse_event, sse_response, HttpResponse};
use super::images::{check_placeholders, expand_image_tokens, load_images, request_preprocess, ImageMemory};
use super::ServerState;
use crate::api::openai::{GenerationFields, ImageProcessorOverrides, Prompt};
use crate::api::ApiError;
use crate::api::{parse_chat_request, parse_completion_request, ChatRequest, ToolChoice};
use crate::engine::{EngineEvent, RequestStream, SamplingParams};
use crate::manager::{ModelLease, ServedModel};
use crate::models::{EncoderInput, ImageSet};
use crate::text::{ChatInput, ToolEvent};

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

/// The model a request names (`None`: the forced or only model), leased, or loaded
/// first. Requests are parsed and checked before they get here, so a bad request never
/// costs a load.
async fn model_for(state: &ServerState, requested: Option<&str>) -> Result<ModelLease, ApiError> {
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
    let (messages, tools) = (request.messages.clone(), request.tools.clone());
    let forced = forced_call_openings(&request);
    let (prompt_ids, forced) = tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, Vec<Vec<u32>>), ApiError> {
        let template = tokenizer
            .chat_template()
            .map_err(|e| ApiError::bad_request(format!("cannot apply a chat template: {e}")))?;
        let text = template
            .render(ChatInput {
                messages: &messages,
                tools: tools.as_ref(),
                add_generation_prompt: true,
                kwargs: Some(&kwargs),
            })
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let encode = |text: &str| {
            tokenizer
                .encode(text, false)
                .map_err(|e| ApiError::internal(e.to_string()))
        };
        let forced = forced.iter().map(|t| encode(t)).collect::<Result<_, _>>()?;
        Ok((encode(&text)?, forced))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
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
    let kind = Kind::Chat {
        logprobs: request.logprobs,
        tools: request.tools.is_some(),
        reasoning: model.reasoning,
        one_call: matches!(request.tool_choice, ToolChoice::Named(_)) || !request.parallel_tool_calls,
    };
    params.forced_prefixes = forced;
    Ok(PreparedChat {
        model,
        kind,
        prompt_ids,
        input,
        image_memory,
        generation: request.generation,
        params,
    })
}

pub async fn chat_completions(state: Arc<ServerState>, body: Value, id: String) -> Result<HttpResponse, ApiError> {
    let chat = prepare_chat(&state, &body).await?;
    let prompt = PromptInput {
        ids: chat.prompt_ids,
        input: chat.input,
        image_memory: chat.image_memory,
        echo: None,
    };
    run(state, chat.model, id, chat.kind, prompt, chat.generation, chat.params).await
}

pub async fn completions(state: Arc<ServerState>, body: Value, id: String) -> Result<HttpResponse, ApiError> {
    let request = parse_completion_request(&body)?;
    let model = model_for(&state, request.model.as_deref()).await?;
    let params = request.generation.sampling.resolve(&state.defaults(&model))?;
    let tokenizer = model.tokenizer.clone();
    let prompt = request.prompt.clone();
    let (prompt_ids, prompt_text) = tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, String), ApiError> {
        match prompt {
            Prompt::Text(text) => {
                let ids = tokenizer
                    .encode(&text, true)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok((ids, text))
            }
            Prompt::Ids(ids) => {
                let text = tokenizer.decode(&ids, false).unwrap_or_default();
                Ok((ids, text))
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    let prompt = PromptInput {
        ids: prompt_ids,
        input: None,
        image_memory: None,
        echo: request.echo.then_some(prompt_text),
    };
    run(state, model, id, Kind::Text, prompt, request.generation, params).await
}

/// What a request gives the engine besides its settings.
struct PromptInput {
    ids: Vec<u32>,
    /// Images, for vision-language models.
    input: Option<EncoderInput>,
    image_memory: Option<ImageMemory>,
    /// Completions' `echo`: the prompt text, sent before the reply.
    echo: Option<String>,
}

async fn run(
    state: Arc<ServerState>,
    model: ModelLease,
    id: String,
    kind: Kind,
    prompt: PromptInput,
    generation: GenerationFields,
    params: SamplingParams,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let prompt_tokens = prompt.ids.len();
    let echo = prompt.echo;
    // Given back when this request's reply ends (moved into the streaming task).
    let image_memory = prompt.image_memory;
    let n = params.n;
    let param = if kind == Kind::Text { "prompt" } else { "messages" };
    let stream = model
        .engine
        .submit_with_input(prompt.ids, params, prompt.input)
        .map_err(|e| {
            let mut error = ApiError::from(e);
            if error.code == Some("context_length_exceeded") {
                error.param = Some(param.into());
            }
            error
        })?;
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let created = now_secs();
    let choices: Vec<Choice> = (0..n).map(|_| Choice::new(&generation.stop, kind)).collect();
    if generation.stream {
        let (response, tx) = sse_response();
        let include_usage = generation.include_usage;
        tokio::spawn(async move {
            let _image_memory = image_memory;
            stream_events(
                state,
                model,
                stream,
                StreamContext {
                    id,
                    kind,
                    created,
                    echo,
                    include_usage,
                    prompt_tokens,
                    start,
                },
                choices,
                tx,
            )
            .await;
        });
        return Ok(response);
    }
    collect(
        state,
        model,
        stream,
        kind,
        id,
        created,
        echo,
        prompt_tokens,
        start,
        choices,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn collect(
    state: Arc<ServerState>,
    model: ModelLease,
    mut stream: RequestStream,
    kind: Kind,
    id: String,
    created: u64,
    echo: Option<String>,
    prompt_tokens: usize,
    start: Instant,
    mut choices: Vec<Choice>,
) -> Result<HttpResponse, ApiError> {
    let tokenizer = model.tokenizer.clone();
    let mut first = true;
    while choices.iter().any(|c| c.finish.is_none()) {
        let Some(event) = stream.next().await else {
            return Err(ApiError::internal("the engine stopped before the request finished"));
        };
        if first && matches!(event, EngineEvent::Token { .. }) {
            state.metrics.time_to_first_token.observe(start.elapsed().as_secs_f64());
            first = false;
        }
        apply_event(&tokenizer, kind, &mut choices, event).map_err(ApiError::internal)?;
    }
    drop(stream); // cancels completions cut short by a stop string
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    state
        .metrics
        .completion_tokens
        .fetch_add(completion as u64, Ordering::Relaxed);
    log_finished(&id, prompt_tokens, &choices, start);
    let usage = usage_json(prompt_tokens, &choices);
    let body = match kind {
        Kind::Chat { logprobs, .. } => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "message": chat_message(&id, i, c),
                "logprobs": if logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                "finish_reason": c.finish,
            })).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "text": format!("{}{}", echo.as_deref().unwrap_or(""), c.text),
                "logprobs": if c.logprobs.is_empty() { Value::Null } else { completion_logprobs(&c.logprobs) },
                "finish_reason": c.finish,
            })).collect::<Vec<_>>(),
            "usage": usage,
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn log_finished(id: &str, prompt_tokens: usize, choices: &[Choice], start: Instant) {
    crate::debug!(
        "{id}: {prompt_tokens} prompt tokens, {} completion tokens, finish {:?}, {:.1} ms",
        choices.iter().map(|c| c.tokens).sum::<usize>(),
        choices.iter().map(|c| c.finish.unwrap_or("-")).collect::<Vec<_>>(),
        start.elapsed().as_secs_f64() * 1e3
    );
}

/// The legacy completions logprobs object from per-token entries.
fn completion_logprobs(entries: &[Value]) -> Value {
    let tokens: Vec<&Value> = entries.iter().map(|e| &e["token"]).collect();
    let logprobs: Vec<&Value> = entries.iter().map(|e| &e["logprob"]).collect();
    let top: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            for pair in e["top"].as_array().into_iter().flatten() {
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
    echo: Option<String>,
    include_usage: bool,
    prompt_tokens: usize,
    start: Instant,
}

impl StreamContext {
    fn chunk(&self, model: &str, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Chat { .. } => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": model, "choices": choices})
    }
}

async fn stream_events(
    state: Arc<ServerState>,
    lease: ModelLease,
    mut stream: RequestStream,
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
    // Opening frames: the role for chat, the echoed prompt for completions.
    for i in 0..choices.len() {
        let opening = match (ctx.kind, &ctx.echo) {
            (Kind::Chat { .. }, _) => {
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
            }
            (Kind::Text, Some(echo)) => json!([{"index": i, "text": echo, "logprobs": null, "finish_reason": null}]),
            (Kind::Text, None) => continue,
        };
        if !send(ctx.chunk(&model, opening)).await {
            return;
        }
    }
    let mut last_token_at: Option<Instant> = None;
    while choices.iter().any(|c| c.finish.is_none()) {
        // Watch the client too: tokens that add no text (a split character, held-back
        // stop prefix) send nothing, and would not notice a hang-up for a long time.
        let event = tokio::select! {
            event = stream.next() => event,
            _ = tx.closed() => return,
        };
        let Some(event) = event else {
            let error = ApiError::internal("the engine stopped before the request finished");
            let _ = tx.send(sse_event(&error.to_json().to_string())).await;
            return;
        };
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
        let update = match apply_event(&tokenizer, ctx.kind, &mut choices, event) {
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
        if !reasoning.is_empty() {
            let delta = json!([{"index": index, "delta": {"reasoning_content": reasoning}, "logprobs": null, "finish_reason": null}]);
            if !send(ctx.chunk(&model, delta)).await {
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
            if !send(ctx.chunk(&model, json!([choice]))).await {
                return; // the client went away: dropping `stream` cancels the request
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
            if !send(ctx.chunk(&model, delta)).await {
                return;
            }
        }
        if let Some(reason) = finish {
            let choice = match ctx.kind {
                Kind::Chat { .. } => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}),
                Kind::Text => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason}),
            };
            if !send(ctx.chunk(&model, json!([choice]))).await {
                return;
            }
        }
    }
    drop(stream);
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    state
        .metrics
        .completion_tokens
        .fetch_add(completion as u64, Ordering::Relaxed);
    log_finished(&ctx.id, ctx.prompt_tokens, &choices, ctx.start);
    if ctx.include_usage {
        let mut chunk = ctx.chunk(&model, json!([]));
        chunk["usage"] = usage_json(ctx.prompt_tokens, &choices);
        if !send(chunk).await {
            return;
        }
    }
    let _ = tx.send(bytes::Bytes::from_static(b"data: [DONE]\n\n")).await;
}
