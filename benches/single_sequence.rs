//! Single-sequence prefill and decode speed on the CPU backend (docs/perf.md).
//!
//!   cargo bench --bench single_sequence -- [MODEL] [PROMPT_IDS_JSON] [NEW_TOKENS]
//!
//! Defaults: SmolLM2-135M-Instruct, 256 prompt tokens (the start of a fixture file,
//! tokenized), 64 greedy tokens with EOS ignored. Best of 3 runs after a warm-up;
//! prints one JSON line.

use std::time::Instant;

use inferd::backend::cpu::CpuBackend;
use inferd::engine::{self, Engine, EngineConfig, SamplingParams};
use inferd::loader::resolve_model;
use inferd::models::load_decoder;
use inferd::text::Tokenizer;

mod offline;

fn main() {
    let (args, model_id) = offline::args();
    let model_id = model_id.as_str();
    let new_tokens = offline::count(&args, 2, 64, "NEW_TOKENS");
    let dir = resolve_model(model_id).expect("model (run scripts/fetch-test-models)");
    let prompt: Vec<u32> = match args.get(1) {
        Some(path) => serde_json::from_slice(&std::fs::read(path).expect("prompt file")).expect("JSON list of ids"),
        None => {
            let tokenizer = Tokenizer::from_dir(&dir.path).expect("tokenizer");
            let text = include_str!("../tests/fixtures/templates/Qwen-Qwen3-0.6B.jinja").repeat(8);
            let mut ids = tokenizer.encode(&text, false).expect("encode");
            ids.truncate(256);
            ids
        }
    };
    let load_start = Instant::now();
    let model = load_decoder(&CpuBackend::default(), &dir.path, &mut |_, _| {}).expect("load");
    let load_secs = load_start.elapsed().as_secs_f64();
    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: (prompt.len() + new_tokens).div_ceil(block_size),
        max_num_seqs: 1,
        max_num_batched_tokens: 512,
        max_waiting: 1,
        ..EngineConfig::default()
    };
    let mut model = Some(model);
    let params = SamplingParams {
        max_tokens: Some(new_tokens),
        ..SamplingParams::greedy()
    };
    let (mut best_prefill, mut best_decode) = (0.0f64, 0.0f64);
    for run in 0..4 {
        // A fresh engine per run: the prefix cache would otherwise serve the prompt.
        let mut engine = Engine::new(CpuBackend::default(), model.take().expect("model"), config, vec![]);
        let start = Instant::now();
        let mut first = None;
        let (tokens, _) = engine::generate(&mut engine, prompt.clone(), params.clone(), &mut |_| {
            first.get_or_insert_with(Instant::now);
            true
        })
        .expect("generate");
        let first = first.expect("at least one token");
        model = Some(engine.into_model());
        if run > 0 {
            best_prefill = best_prefill.max(prompt.len() as f64 / (first - start).as_secs_f64());
            best_decode = best_decode.max((tokens.len() - 1) as f64 / first.elapsed().as_secs_f64());
        }
    }
    println!(
        "{{\"engine\": \"inferd cpu\", \"threads\": {}, \"model\": \"{}\", \"load_s\": {:.2}, \"prompt_tokens\": {}, \"new_tokens\": {}, \"prefill_tok_s\": {:.1}, \"decode_tok_s\": {:.2}}}",
        rayon::current_num_threads(),
        dir.display_name,
        load_secs,
        prompt.len(),
        new_tokens,
        best_prefill,
        best_decode
    );
}
