//! One integration-test binary (each file under tests/ would link the library again).
//! Models come from the Hugging Face cache, installed by `scripts/fetch-test-models`;
//! goldens from `scripts/gen-goldens` (transformers, float32).

mod bench_cli;
mod bench_sessions;
mod block_pool;
mod chat_cli;
mod common;
mod download;
mod engine;
mod engine_cases;
mod errors;
mod extensions;
mod fake_hub;
mod faults;
mod fields;
mod generate_cli;
mod grammar;
mod hostile;
mod images;
mod load;
mod loader;
mod manager;
mod numerics;
mod responses;
mod serve_flags;
mod server;
mod store;
mod structured;
mod templates;
mod tokenizer;
mod tools;
mod transcriptions;
mod vision;
mod vision_chat;
mod wall;
mod whisper;
mod worker_routes;
