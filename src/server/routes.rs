//! The route table, authentication, CORS, request ids, and the small routes (health,
//! models, metrics, tokenize). Every failure leaves here as an OpenAI-shaped error.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};

use super::error::ApiError;
use super::http::{error_response, json_response, read_json, text_response, HttpResponse, ResponseBody};
use super::{generate, ServerState};
use crate::loader::hub::hub_cache_dir;

/// (path, methods) of every route, for 404 versus 405.
const ROUTES: &[(&str, &[Method])] = &[
    ("/health", &[Method::GET]),
    ("/v1/models", &[Method::GET]),
    ("/v1/chat/completions", &[Method::POST]),
    ("/v1/completions", &[Method::POST]),
    ("/metrics", &[Method::GET]),
    ("/tokenize", &[Method::POST]),
    ("/detokenize", &[Method::POST]),
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
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    if state.enable_cors {
        add_cors(&mut response);
    }
    state.metrics.count_request(route, response.status().as_u16());
    // The access log: when the response head is ready (a stream goes on after it).
    crate::info!(
        "{method} {path} {} {request_id} {:.1} ms",
        response.status().as_u16(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(response)
}

fn add_cors(response: &mut HttpResponse) {
    let h = response.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, OPTIONS"),
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
        // File-system scans and tokenization run on the blocking pool, off the reactor.
        (Method::GET, "/v1/models") => {
            let state = state.clone();
            blocking(move || Ok(json_response(StatusCode::OK, &models_list(&state)))).await
        }
        (Method::GET, p) if p.starts_with("/v1/models/") => {
            let (state, id) = (state.clone(), percent_decode(&p["/v1/models/".len()..]));
            blocking(move || model_by_id(&state, &id)).await
        }
        (Method::GET, "/metrics") => Ok(text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(state.engine.metrics()),
        )),
        (Method::POST, "/v1/chat/completions") => match read_json(req.into_body(), state.max_body_bytes).await {
            Ok(body) => generate::chat_completions(state.clone(), body, request_id.to_owned()).await,
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/completions") => match read_json(req.into_body(), state.max_body_bytes).await {
            Ok(body) => generate::completions(state.clone(), body, request_id.to_owned()).await,
            Err(e) => Err(e),
        },
        (Method::POST, "/tokenize") => match read_json(req.into_body(), state.max_body_bytes).await {
            Ok(body) => {
                let state = state.clone();
                blocking(move || tokenize(&state, &body)).await
            }
            Err(e) => Err(e),
        },
        (Method::POST, "/detokenize") => match read_json(req.into_body(), state.max_body_bytes).await {
            Ok(body) => {
                let state = state.clone();
                blocking(move || detokenize(&state, &body)).await
            }
            Err(e) => Err(e),
        },
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
        Some(token) if token == key => Ok(()),
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

fn model_entry(id: &str, created: u64, loaded: bool) -> Value {
    let owner = id.split('/').next().unwrap_or(id);
    json!({"id": id, "object": "model", "created": created, "owned_by": owner, "loaded": loaded})
}

/// Every model in the Hugging Face cache whose `main` snapshot has a config.json, and
/// the served one.
fn models_list(state: &ServerState) -> Value {
    let mut ids: Vec<String> = Vec::new();
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
                ids.push(repo.replacen("--", "/", 1));
            }
        }
    }
    ids.sort();
    ids.retain(|id| *id != state.model_id);
    let mut data = vec![model_entry(&state.model_id, state.created, true)];
    data.extend(ids.iter().map(|id| model_entry(id, state.created, false)));
    json!({"object": "list", "data": data})
}

fn model_by_id(state: &ServerState, id: &str) -> Result<HttpResponse, ApiError> {
    let list = models_list(state);
    let found = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == id || state.model_name == id).cloned());
    match found {
        Some(model) => Ok(json_response(StatusCode::OK, &model)),
        None => Err(ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("the model `{id}` is not in the Hugging Face cache"))
        }),
    }
}

/// `{"prompt": "..."}` or `{"messages": [...]}` -> token ids.
fn tokenize(state: &ServerState, body: &Value) -> Result<HttpResponse, ApiError> {
    let add_special = body.get("add_special_tokens").and_then(Value::as_bool).unwrap_or(true);
    let ids = if let Some(prompt) = body.get("prompt") {
        let text = prompt
            .as_str()
            .ok_or_else(|| ApiError::invalid("prompt", "`prompt` must be a string"))?;
        state
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else if body.get("messages").is_some() {
        let request = crate::api::parse_chat_request(&json!({"messages": body["messages"]}), &state.defaults)?;
        let template = state
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
        state
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        return Err(ApiError::invalid("prompt", "send `prompt` (a string) or `messages`"));
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"tokens": ids, "count": ids.len(), "max_model_len": state.engine.max_model_len()}),
    ))
}

fn detokenize(state: &ServerState, body: &Value) -> Result<HttpResponse, ApiError> {
    let ids: Vec<u32> = body
        .get("tokens")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .ok_or_else(|| ApiError::invalid("tokens", "`tokens` must be a list of token ids"))?;
    let vocab = state.tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = state
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
