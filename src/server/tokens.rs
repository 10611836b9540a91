//! The worker routes: what a distributed engine's frontend (NVIDIA Dynamo, through the
//! `inferd-dynamo` worker in `python/`) needs of inferd when it does HTTP, templates and
//! tokenization itself.
//!
//! - `POST /inferd/v1/generate`: token ids in (`api::tokens::TokenRequest`), newline-
//!   delimited JSON out, one line per batch of new tokens, in Dynamo's `GenerateChunk`
//!   shape: `{"index", "token_ids", "log_probs"?, "top_logprobs"?}` (the stop token that
//!   ended a sequence included: the frontend hides it), and per sequence a
//!   last line with `finish_reason` and `completion_usage`. A failure after the head is
//!   a line `{"error": {...}}`. Closing the connection cancels the request (its KV
//!   blocks are freed at the next engine step).
//! - `GET /inferd/v1/kv_events`: the prefix cache's contents, then every change to it,
//!   as newline-delimited JSON (`stored` chains with their token ids, `removed`,
//!   `cleared`), for a KV-aware router.
//! - `GET /inferd/v1/worker`: what a worker registers: model folder, served names,
//!   context length, KV block size and count, batch limits.

use std::sync::Arc;

use bytes::Bytes;
use hyper::StatusCode;
use serde_json::{json, Value};

use super::choice::token_text;
use super::generate::{compile_constraint, model_for};
use super::http::{json_response, stream_response, HttpResponse};
use super::ServerState;
use crate::api::tokens::TokenRequest;
use crate::api::ApiError;
use crate::engine::{ConstraintStart, EngineEvent, FinishReason, KvEvent, TokenLogprobs};
use crate::manager::ServedModel;
use crate::text::Tokenizer;

const NDJSON: &str = "application/x-ndjson";

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

pub async fn generate(state: Arc<ServerState>, body: Value) -> Result<HttpResponse, ApiError> {
    let request = TokenRequest::parse(&body)?;
    if request.sampling.prompt_logprobs.is_some() {
        return Err(ApiError::invalid(
            "output_options.prompt_logprobs",
            "`output_options.prompt_logprobs` is not supported on the token route",
        ));
    }
    let model = model_for(&state, request.model.as_deref()).await?;
    let mut params = request.sampling.resolve(&state.defaults(&model))?;
    if let Some(s) = request.structured {
        params.constraint = Some(compile_constraint(&model, (s.spec, s.style, s.param, ConstraintStart::Now)).await?);
    }
    let prompt_tokens = request.token_ids.len();
    let n = params.n;
    let mut stream = model.engine.submit(request.token_ids, params).map_err(|e| {
        let mut error = ApiError::from(e);
        if error.code == Some("context_length_exceeded") {
            error.param = Some("token_ids".into());
        }
        error
    })?;
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);
    let (response, tx) = stream_response(NDJSON);
    tokio::spawn(async move {
        let tokenizer = model.tokenizer.clone();
        let start = std::time::Instant::now();
        let mut first = true;
        let mut unfinished = n;
        while unfinished > 0 {
            // A client gone (the frontend cancelled) ends the request at once.
            let event = tokio::select! {
                event = stream.next() => event,
                () = tx.closed() => return,
            };
            let Some(event) = event else {
                let _ = tx
                    .send(line(&json!({"error": {"message": "the engine stopped"}})))
                    .await;
                return;
            };
            // Everything already there goes out in one line per sequence.
            let mut batch = vec![event];
            while let Some(more) = stream.try_next() {
                batch.push(more);
            }
            let mut chunks: Vec<Chunk> = Vec::new();
            for event in batch {
                match event {
                    EngineEvent::Token {
                        index, token, logprobs, ..
                    } => {
                        if first {
                            state.metrics.time_to_first_token.observe(start.elapsed().as_secs_f64());
                            first = false;
                        }
                        state
                            .metrics
                            .completion_tokens
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        chunk_for(&mut chunks, index).push(token, logprobs);
                    }
                    EngineEvent::Finished { index, reason, usage } => {
                        unfinished -= 1;
                        let chunk = chunk_for(&mut chunks, index);
                        chunk.finish = Some(json!({
                            "finish_reason": match reason {
                                FinishReason::Stop => "stop",
                                FinishReason::Length => "length",
                            },
                            "completion_usage": {
                                "prompt_tokens": usage.prompt_tokens,
                                "completion_tokens": usage.completion_tokens,
                                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                                "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
                            },
                        }));
                    }
                    EngineEvent::PromptLogprobs(_) => {}
                    EngineEvent::Failed(message) => {
                        let _ = tx.send(line(&json!({"error": {"message": message}}))).await;
                        return;
                    }
                }
            }
            for chunk in chunks {
                if tx.send(line(&chunk.to_json(&tokenizer))).await.is_err() {
                    return; // dropping `stream` cancels the request
                }
            }
        }
    });
    Ok(response)
}

/// New tokens of one sequence, on their way out as one line.
struct Chunk {
    index: usize,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<Value>,
}

fn chunk_for(chunks: &mut Vec<Chunk>, index: usize) -> &mut Chunk {
    // A sequence's tokens after its finish cannot happen; a new line keeps order anyway.
    match chunks.iter().position(|c| c.index == index && c.finish.is_none()) {
        Some(i) => &mut chunks[i],
        None => {
            chunks.push(Chunk {
                index,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: None,
            });
            chunks.last_mut().expect("just pushed")
        }
    }
}

impl Chunk {
    fn push(&mut self, token: u32, logprobs: Option<TokenLogprobs>) {
        self.tokens.push(token);
        self.logprobs.extend(logprobs);
    }

    fn to_json(&self, tokenizer: &Tokenizer) -> Value {
        let mut out = json!({"index": self.index, "token_ids": self.tokens});
        // Logprobs come with every token or with none.
        if !self.logprobs.is_empty() && self.logprobs.len() == self.tokens.len() {
            out["log_probs"] = self.logprobs.iter().map(|lp| lp.logprob).collect();
            out["top_logprobs"] = self
                .logprobs
                .iter()
                .map(|lp| {
                    lp.top
                        .iter()
                        .enumerate()
                        .map(|(rank, &(id, logprob))| entry(tokenizer, id, logprob, rank + 1))
                        .collect::<Value>()
                })
                .collect();
        }
        if let Some(Value::Object(finish)) = &self.finish {
            for (k, v) in finish {
                out[k] = v.clone();
            }
        }
        out
    }
}

/// One of a position's likeliest tokens (`rank` from 1). The sampled token's own
/// log-probability is in `log_probs`.
fn entry(tokenizer: &Tokenizer, id: u32, logprob: f32, rank: usize) -> Value {
    let token = token_text(tokenizer, id, false);
    json!({"rank": rank, "token_id": id, "token": token, "logprob": logprob, "bytes": token.as_bytes()})
}

/// `GET /inferd/v1/kv_events[?model=]`. The stream holds no lease on the model: a
/// router listening does not keep it loaded. When the model is unloaded the stream says
/// `cleared` and ends; when the server stops, it ends.
pub async fn kv_events(state: Arc<ServerState>, requested: Option<String>) -> Result<HttpResponse, ApiError> {
    let (mut events, block_size) = {
        let model = model_for(&state, requested.as_deref()).await?;
        let events = model.engine.kv_events().map_err(ApiError::from)?;
        (events, model.engine.config().block_size)
    };
    let (response, tx) = stream_response(NDJSON);
    let mut stopping = state.stopping.subscribe();
    tokio::spawn(async move {
        let _ = tx
            .send(line(&json!({"type": "config", "block_size": block_size})))
            .await;
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = tx.closed() => return,
                _ = stopping.wait_for(|stopping| *stopping) => return,
            };
            let Some(event) = event else { return };
            if tx.send(line(&kv_event_json(&event))).await.is_err() {
                return;
            }
        }
    });
    Ok(response)
}

/// A block hash as Dynamo takes it: the 64 bits as a signed integer.
fn signed(hash: crate::engine::BlockHash) -> i64 {
    hash.0 as i64
}

fn kv_event_json(event: &KvEvent) -> Value {
    match event {
        KvEvent::Stored { parent, blocks } => json!({
            "type": "stored",
            "parent_hash": parent.map(signed),
            "block_hashes": blocks.iter().map(|(h, _)| signed(*h)).collect::<Vec<_>>(),
            "token_ids": blocks.iter().flat_map(|(_, t)| t.iter().copied()).collect::<Vec<u32>>(),
            "num_block_tokens": blocks.iter().map(|(_, t)| t.len()).collect::<Vec<_>>(),
        }),
        KvEvent::Removed(hashes) => json!({
            "type": "removed",
            "block_hashes": hashes.iter().map(|h| signed(*h)).collect::<Vec<_>>(),
        }),
        KvEvent::Cleared => json!({"type": "cleared"}),
    }
}

/// `GET /inferd/v1/worker[?model=]`.
pub async fn worker_info(state: Arc<ServerState>, requested: Option<String>) -> Result<HttpResponse, ApiError> {
    let model = model_for(&state, requested.as_deref()).await?;
    Ok(json_response(StatusCode::OK, &worker_json(&state, &model)))
}

fn worker_json(state: &ServerState, model: &ServedModel) -> Value {
    let engine = &model.engine;
    let config = engine.config();
    let (metrics, r) = (engine.metrics(), std::sync::atomic::Ordering::Relaxed);
    json!({
        "model": model.name,
        "served_model_names": state.models.served_names(model),
        "folder": model.folder.display().to_string(),
        "context_length": engine.max_model_len(),
        "kv_cache_block_size": config.block_size,
        "total_kv_blocks": metrics.kv_blocks_total.load(r),
        "kv_blocks_used": metrics.kv_blocks_used.load(r),
        "prefix_cache_queries": metrics.prefix_cache_queries.load(r),
        "prefix_cache_hits": metrics.prefix_cache_hits.load(r),
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "eos_token_ids": engine.eos_ids(),
    })
}
