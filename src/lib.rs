//! inferd: an OpenAI-compatible inference server with a continuous-batching engine,
//! a paged KV cache, hand-written CUDA kernels and a pure-Rust CPU backend.
//!
//! The modules, by layer, lowest first (docs/architecture.md; each uses only layers
//! below it, checked by `tests/it/wall.rs`).

/// Leveled stderr logging (`--log-level`) and its macros.
pub mod log;
/// Quantities written in flags (durations).
pub mod units;

/// Model ids, the Hugging Face cache, hub downloads, and memory-mapped safetensors.
pub mod loader;
/// Images and audio: decoding, resampling, log-mel features, image preprocessing, URL fetches.
pub mod media;
/// Tokenizers, chat templates, streaming detokenization, stop strings, tool-call and reasoning parsers.
pub mod text;

/// The fused-op trait and its CPU and CUDA backends, one file per op family.
pub mod backend;

/// Configs and the models written once over the backend: the Llama/Qwen decoder, Whisper, Qwen2.5-VL.
pub mod models;

/// Continuous batching over the paged KV cache: scheduler, block pool, sampler, engine thread.
pub mod engine;

/// The OpenAI wire format: requests parsed and range-checked into engine parameters, errors.
pub mod api;

/// The model registry: on-demand loads with progress events, leases, idle and LRU unloads.
pub mod manager;

/// A small OpenAI-compatible HTTP client (keep-alive, SSE) for `bench` and `chat`.
pub mod client;
/// The HTTP server: routes, streaming replies, Responses, transcriptions, metrics.
pub mod server;

/// `inferd bench`: serving benchmarks against any OpenAI-compatible server, or offline.
pub mod bench;
/// `inferd chat`: a terminal chat with any OpenAI-compatible server.
#[cfg(unix)]
pub mod chat;
/// Fuzzing entry points for every parser of untrusted bytes.
pub mod fuzzing;
