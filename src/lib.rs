//! inferd: an OpenAI-compatible inference server with a continuous-batching engine,
//! a paged KV cache, hand-written CUDA kernels and a pure-Rust CPU backend.
//!
//! The crate map (see docs/architecture.md): `loader` finds and maps checkpoints,
//! `models` holds the math written once over `backend`, `text` turns chat into token ids
//! and ids back into text, `engine` drives generation.

pub mod api;
pub mod backend;
pub mod bench;
#[cfg(unix)]
pub mod chat;
pub mod client;
pub mod engine;
pub mod fuzzing;
pub mod loader;
pub mod log;
pub mod manager;
pub mod media;
pub mod models;
pub mod server;
pub mod text;
