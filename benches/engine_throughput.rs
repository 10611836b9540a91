//! Offline throughput of the CPU engine (docs/perf.md): C concurrent requests of P
//! prompt tokens and O output tokens each (EOS ignored, greedy), all queued at once on a
//! fresh engine; prints one JSON line per concurrency.
//!
//!   cargo bench --bench engine_throughput -- [MODEL] [PROMPTS_JSON] [CONCURRENCY,...] [OUTPUT_TOKENS]
//!
//! PROMPTS_JSON is a list of prompts (lists of token ids); the default is seeded random
//! ids, 128 per prompt. Defaults: SmolLM2-135M-Instruct, 1,8,32,64, 128 output tokens.

use std::time::Instant;

use inferd::backend::cpu::CpuBackend;
use inferd::engine::{Engine, EngineConfig, EngineEvent, RequestId, SamplingParams};
use inferd::loader::resolve_model;
use inferd::models::load_decoder;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model_id = args
        .first()
        .map(String::as_str)
        .unwrap_or("HuggingFaceTB/SmolLM2-135M-Instruct");
    let concurrency: Vec<usize> = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("1,8,32,64")
        .split(',')
        .map(|c| c.parse().expect("CONCURRENCY"))
        .collect();
    let output_tokens: usize = args.get(3).map(|s| s.parse().expect("OUTPUT_TOKENS")).unwrap_or(128);
    let dir = resolve_model(model_id).expect("model (run scripts/fetch-test-models)");
    let mut model = Some(load_decoder(&CpuBackend::default(), &dir.path, &mut |_, _| {}).expect("load"));
    let vocab = model.as_ref().unwrap().config.vocab_size as u64;
    let max_c = *concurrency.iter().max().unwrap_or(&1);
    let prompts: Vec<Vec<u32>> = match args.get(1).filter(|p| *p != "-") {
        Some(path) => serde_json::from_slice(&std::fs::read(path).expect("prompts file")).expect("JSON lists of ids"),
        None => {
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            (0..max_c)
                .map(|_| {
                    (0..128)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            (state % vocab) as u32
                        })
                        .collect()
                })
                .collect()
        }
    };
    assert!(prompts.len() >= max_c, "need {max_c} prompts");
    for &c in &concurrency {
        let block_size = 16;
        let per_seq = (prompts[..c].iter().map(Vec::len).max().unwrap() + output_tokens).div_ceil(block_size);
        let config = EngineConfig {
            block_size,
            num_blocks: per_seq * c,
            max_num_seqs: c,
            max_num_batched_tokens: 2048,
            max_waiting: c,
        };
        let mut engine = Engine::new(CpuBackend::default(), model.take().unwrap(), config, vec![]);
        let params = SamplingParams {
            max_tokens: Some(output_tokens),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let mut receivers = Vec::new();
        let start = Instant::now();
        for (i, prompt) in prompts[..c].iter().enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            engine
                .add_request(RequestId(i as u64), prompt.clone(), params.clone(), tx)
                .expect("request");
            receivers.push(rx);
        }
        while engine.has_work() {
            engine.step();
        }
        let secs = start.elapsed().as_secs_f64();
        let mut generated = 0;
        for mut rx in receivers {
            while let Ok(event) = rx.try_recv() {
                if matches!(event, EngineEvent::Token { .. }) {
                    generated += 1;
                }
            }
        }
        let prompt_tokens: usize = prompts[..c].iter().map(Vec::len).sum();
        println!(
            "{{\"engine\": \"inferd cpu\", \"threads\": {}, \"concurrency\": {c}, \"prompt_tokens\": {prompt_tokens}, \"output_tokens\": {generated}, \"seconds\": {secs:.2}, \"output_tok_s\": {:.1}, \"steps\": {}}}",
            rayon::current_num_threads(),
            generated as f64 / secs,
            engine.stats().steps
        );
        model = Some(engine.into_model());
    }
}
