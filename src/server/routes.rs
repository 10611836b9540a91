//! The route table, authentication, CORS, request ids, and the small routes (health,
//! models, metrics, tokenize). Every failure leaves here as an OpenAI-shaped error.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::http::{
    error_response, json_response, read_json, sse_event, sse_response, text_response, HttpResponse, ResponseBody,
};
use super::load_events::load_event_bytes;
use super::{generate, responses, tokens, transcribe, ServerState};
use crate::api::ApiError;
use crate::loader::hub::hub_cache_dir;
use crate::manager::{LoadEvent, LoadTicket, ModelLease, ModelManager, ServedModel};

/// (path, methods) of every route, for 404 versus 405.
const ROUTES: &[(&str, &[Method])] = &[
    ("/health", &[Method::GET]),
    ("/version", &[Method::GET]),
    ("/v1/models", &[Method::GET]),
    ("/v1/chat/completions", &[Method::POST]),
    ("/v1/completions", &[Method::POST]),
    ("/metrics", &[Method::GET]),
    ("/tokenize", &[Method::POST]),
    ("/detokenize", &[Method::POST]),
    ("/tokenizer_info", &[Method::GET]),
    ("/load_model", &[Method::POST]),
    ("/v1/responses", &[Method::POST]),
    ("/v1/audio/transcriptions", &[Method::POST]),
    ("/v1/audio/translations", &[Method::POST]),
    ("/inferd/v1/generate", &[Method::POST]),
    ("/inferd/v1/kv_events", &[Method::GET]),
    ("/inferd/v1/worker", &[Method::GET]),
];

pub async fn handle(state: Arc<ServerState>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", state.next_request.fetch_add(1, Ordering::Relaxed)));
    let start = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let (route, result) = dispatch(&state, req, &request_id).await;
    let mut response = result.unwrap_or_else(|e| error_response(&e));
    // A generation request may name itself (vLLM's `request_id`): its id wins.
    let request_id = match response.headers().get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(own) => own.to_owned(),
        None => request_id,
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    if state.enable_cors {
        add_cors(&mut response);
    }
    state.metrics.count_request(route, response.status().as_u16());
    // The access log: when the response head is ready (a stream goes on after it).
    // Probes and pollers (a Kubernetes probe, a metrics scraper, a Dynamo worker's load
    // poll, several a second) log at debug only, unless they fail.
    let line = format!(
        "{method} {path} {} {request_id} {:.1} ms",
        response.status().as_u16(),
        start.elapsed().as_secs_f64() * 1e3
    );
    if matches!(route, "/health" | "/metrics" | "/inferd/v1/worker") && response.status().is_success() {
        crate::debug!("{line}");
    } else {
        crate::info!("{line}");
    }
    Ok(response)
}

fn add_cors(response: &mut HttpResponse) {
    let h = response.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type, x-request-id"),
    );
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("x-request-id"),
    );
}

async fn dispatch(
    state: &Arc<ServerState>,
    req: Request<Incoming>,
    request_id: &str,
) -> (&'static str, Result<HttpResponse, ApiError>) {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route =
        ROUTES
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(p, _)| *p)
            .unwrap_or(if path.starts_with("/v1/models/") {
                "/v1/models/{id}"
            } else if path.starts_with("/v1/responses/") {
                "/v1/responses/{id}"
            } else {
                "other"
            });
    if method == Method::OPTIONS && state.enable_cors {
        let mut response = text_response(StatusCode::NO_CONTENT, "text/plain", String::new());
        *response.body_mut() = ResponseBody::Full(None);
        return (route, Ok(response));
    }
    if path != "/health" {
        if let Err(e) = authorize(state, &req) {
            return (route, Err(e));
        }
    }
    let result = match (method.clone(), path.as_str()) {
        (Method::GET, "/health") => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        // As vLLM answers it (benchmark clients record it beside their results).
        (Method::GET, "/version") => Ok(json_response(
            StatusCode::OK,
            &json!({"version": env!("CARGO_PKG_VERSION"), "server": "inferd"}),
        )),
        // File-system scans and tokenization run on the blocking pool, off the reactor.
        (Method::GET, "/v1/models") => {
            let state = state.clone();
            blocking(move || Ok(json_response(StatusCode::OK, &models_list(&state)))).await
        }
        (Method::GET, p) if p.starts_with("/v1/models/") => {
            let (state, id) = (state.clone(), percent_decode(&p["/v1/models/".len()..]));
            blocking(move || model_by_id(&state, &id)).await
        }
        (Method::GET, "/metrics") => {
            let models = state.models.all_loaded();
            let engines: Vec<(&str, &crate::engine::EngineMetrics)> =
                models.iter().map(|m| (m.name.as_str(), m.engine.metrics())).collect();
            Ok(text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(&engines),
            ))
        }
        (Method::POST, "/v1/audio/transcriptions") => transcribe::handle(state.clone(), req, false).await,
        (Method::POST, "/v1/audio/translations") => transcribe::handle(state.clone(), req, true).await,
        (Method::POST, "/v1/responses") => match json_body(state, req).await {
            Ok(body) => responses::create(state.clone(), body).await,
            Err(e) => Err(e),
        },
        (m, p) if p.starts_with("/v1/responses/") => {
            let rest = &p["/v1/responses/".len()..];
            match (m, rest.strip_suffix("/input_items")) {
                (Method::GET, Some(id)) => responses::input_items(state, id).await,
                (Method::GET, None) => responses::retrieve(state, rest).await,
                (Method::DELETE, None) => responses::delete(state, rest).await,
                (m, _) => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    format!("{m} is not allowed on {p}"),
                )),
            }
        }
        (Method::POST, "/load_model") => match json_body(state, req).await {
            Ok(body) => load_model(state, &body),
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/chat/completions") => match json_body(state, req).await {
            Ok(body) => generate::chat_completions(state.clone(), body, request_id.to_owned()).await,
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/completions") => match json_body(state, req).await {
            Ok(body) => generate::completions(state.clone(), body, request_id.to_owned()).await,
            Err(e) => Err(e),
        },
        (Method::POST, "/inferd/v1/generate") => match json_body(state, req).await {
            Ok(body) => tokens::generate(state.clone(), body).await,
            Err(e) => Err(e),
        },
        (Method::GET, "/inferd/v1/kv_events") => tokens::kv_events(state.clone(), model_query(&req)).await,
        (Method::GET, "/inferd/v1/worker") => tokens::worker_info(state.clone(), model_query(&req)).await,
        (Method::GET, "/tokenizer_info") => {
            let requested = model_query(&req);
            match state.models.acquire(requested.as_deref()).await {
                Ok(model) => Ok(json_response(StatusCode::OK, &tokenizer_info(&model))),
                Err(e) => Err(ApiError::from(e)),
            }
        }
        (Method::POST, p @ ("/tokenize" | "/detokenize")) => {
            let detokenize = p == "/detokenize";
            match with_model(state, req).await {
                Ok((model, body)) => {
                    let state = state.clone();
                    if detokenize {
                        blocking(move || detokenize_route(&model, &body)).await
                    } else {
                        blocking(move || tokenize(&state, &model, &body)).await
                    }
                }
                Err(e) => Err(e),
            }
        }
        (m, p) => match ROUTES.iter().find(|(path, _)| *path == p) {
            Some((_, methods)) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!(
                    "{m} is not allowed on {p}; use {}",
                    methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
                ),
            )),
            None => Err(ApiError::not_found(format!("no route {m} {p}"))),
        },
    };
    (route, result)
}

/// A `?model=` naming the model (else the forced or only one).
fn model_query(req: &Request<Incoming>) -> Option<String> {
    let query = req.uri().query().unwrap_or("");
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .map(percent_decode)
}

async fn blocking(
    work: impl FnOnce() -> Result<HttpResponse, ApiError> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("task failed: {e}"))))
}

fn authorize(state: &ServerState, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or invalid API key: send `Authorization: Bearer <key>`",
            )
        }),
    }
}

/// Compares without stopping at the first difference, so response times say nothing
/// about how much of a guessed key was right (only its length can tell, as usual).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn model_entry(id: &str, created: u64, loaded: bool) -> Value {
    let owner = id.split('/').next().unwrap_or(id);
    json!({"id": id, "object": "model", "created": created, "owned_by": owner, "loaded": loaded})
}

/// The id a loaded model is listed under: `org/name` for `main`, else `org/name@rev`.
fn listed_id(model: &ServedModel) -> &str {
    model.name.strip_suffix("@main").unwrap_or(&model.name)
}

/// With a forced model, that model alone. Otherwise every model in the Hugging Face
/// cache whose `main` snapshot has a config.json (each loadable on demand), marked
/// loaded or not, and any loaded one the scan did not find.
fn models_list(state: &ServerState) -> Value {
    if let Some(forced) = state.models.forced() {
        let data: Vec<Value> = state
            .models
            .served_names(forced)
            .iter()
            .map(|name| model_entry(name, forced.created, true))
            .collect();
        return json!({"object": "list", "data": data});
    }
    let loaded = state.models.all_loaded();
    let mut data: Vec<Value> = Vec::new();
    let mut listed: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(hub_cache_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(repo) = name.strip_prefix("models--") else {
                continue;
            };
            let path = entry.path();
            let has_config = std::fs::read_to_string(path.join("refs/main"))
                .map(|commit| path.join("snapshots").join(commit.trim()).join("config.json").is_file())
                .unwrap_or(false);
            if has_config {
                listed.push(repo.replacen("--", "/", 1));
            }
        }
    }
    for model in &loaded {
        if !listed.iter().any(|id| id == listed_id(model)) {
            listed.push(listed_id(model).to_owned());
        }
    }
    listed.sort();
    for id in &listed {
        let model = loaded.iter().find(|m| listed_id(m) == id);
        let created = model.map_or_else(|| modified_secs(id), |m| m.created);
        data.push(model_entry(id, created, model.is_some()));
    }
    json!({"object": "list", "data": data})
}

/// When a cached model's folder last changed (what transformers serve reports).
fn modified_secs(id: &str) -> u64 {
    let folder = hub_cache_dir().join(format!("models--{}", id.replace('/', "--")));
    std::fs::metadata(folder)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn model_by_id(state: &ServerState, id: &str) -> Result<HttpResponse, ApiError> {
    let list = models_list(state);
    let wanted = id.strip_suffix("@main").unwrap_or(id);
    let found = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == wanted).cloned());
    match found {
        Some(model) => Ok(json_response(StatusCode::OK, &model)),
        None => Err(ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::not_found(format!(
                "the model `{id}` is not served here and not in the Hugging Face cache"
            ))
        }),
    }
}

/// A request's JSON body, under the server's size limit and read timeout.
async fn json_body(state: &ServerState, req: Request<Incoming>) -> Result<Value, ApiError> {
    read_json(req.into_body(), state.max_body_bytes, state.read_timeout).await
}

/// The model a body names (loaded if need be), and the body.
async fn with_model(state: &Arc<ServerState>, req: Request<Incoming>) -> Result<(ModelLease, Value), ApiError> {
    let body = json_body(state, req).await?;
    let model = state
        .models
        .acquire(crate::api::fields::requested_model(&body)?.as_deref())
        .await?;
    Ok((model, body))
}

/// `POST /load_model`: loads a model and reports the stages as server-sent events, each
/// a JSON object printed as Python's `json.dumps` would (transformers serve's bytes):
/// processor, config, download (when files are fetched), weights, then one `ready` or
/// `error`. A client joining a running load sees its events from the start.
fn load_model(state: &Arc<ServerState>, body: &Value) -> Result<HttpResponse, ApiError> {
    let name = match body.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => return Err(ApiError::invalid("model", "`model` is required")),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let (response, tx) = sse_response();
    let send = move |model: String, event: LoadEvent| {
        let tx = tx.clone();
        async move { tx.send(sse_event(&load_event_bytes(&model, &event))).await.is_ok() }
    };
    // A pinned server loads nothing else: the answer names the model that will serve.
    let ticket = match state.models.forced() {
        Some(forced) => {
            state.models.check_served(Some(&name))?;
            LoadTicket::Ready(forced.clone())
        }
        None => state.models.start_load(&ModelManager::key(&name)?),
    };
    match ticket {
        LoadTicket::Ready(model) => {
            tokio::spawn(async move { send(model.name.clone(), LoadEvent::Ready { cached: true }).await });
        }
        LoadTicket::Loading(job) => {
            tokio::spawn(async move {
                let mut seen = 0;
                loop {
                    let events = job.events_after(seen).await;
                    if events.is_empty() {
                        return;
                    }
                    seen += events.len();
                    for event in events {
                        let last = event.is_terminal();
                        if !send(job.model.clone(), event).await || last {
                            return;
                        }
                    }
                }
            });
        }
    }
    Ok(response)
}

/// `{"prompt": "..."}` or `{"messages": [...]}` -> token ids.
fn tokenize(state: &ServerState, model: &ServedModel, body: &Value) -> Result<HttpResponse, ApiError> {
    let add_special = body.get("add_special_tokens").and_then(Value::as_bool).unwrap_or(true);
    let ids = if let Some(prompt) = body.get("prompt") {
        let text = prompt
            .as_str()
            .ok_or_else(|| ApiError::invalid("prompt", "`prompt` must be a string"))?;
        model
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else if body.get("messages").is_some() {
        let request = crate::api::parse_chat_request(&json!({"messages": body["messages"]}))?;
        if let Some(image) = request.images.first() {
            // Counting them would mean fetching and decoding them here.
            return Err(ApiError::invalid(
                image.param.clone(),
                "/tokenize does not take images (an image's token count depends on its size)",
            ));
        }
        let template = model
            .tokenizer
            .chat_template()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let text = template
            .render(crate::text::ChatInput {
                messages: &request.messages,
                tools: None,
                add_generation_prompt: body
                    .get("add_generation_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                kwargs: state.chat_template_kwargs.as_ref(),
            })
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        model
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        return Err(ApiError::invalid("prompt", "send `prompt` (a string) or `messages`"));
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"tokens": ids, "count": ids.len(), "max_model_len": model.engine.max_model_len()}),
    ))
}

/// `GET /tokenizer_info` (vLLM's): what a client needs to tokenize as the server does
/// (lm-eval's remote tokenizer reads it): the special tokens, the chat template, the
/// context window.
fn tokenizer_info(model: &ServedModel) -> Value {
    let t = &model.tokenizer;
    let special = &t.special_tokens;
    json!({
        "model": model.name,
        "eos_token": special.eos_token,
        "bos_token": special.bos_token,
        "pad_token": special.pad_token,
        "unk_token": special.unk_token,
        "chat_template": t.chat_template().ok().map(|c| c.source().to_owned()),
        "vocab_size": t.vocab_size(),
        "model_max_length": model.engine.max_model_len(),
    })
}

fn detokenize_route(model: &ServedModel, body: &Value) -> Result<HttpResponse, ApiError> {
    let ids: Vec<u32> = body
        .get("tokens")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .ok_or_else(|| ApiError::invalid("tokens", "`tokens` must be a list of token ids"))?;
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = model
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &json!({"prompt": text})))
}

/// `%2F` and friends in a path segment (clients encode the `/` of `org/name`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
