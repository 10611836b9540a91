//! Offline throughput of the CPU engine (docs/perf.md): C concurrent requests of P
//! prompt tokens and O output tokens each (EOS ignored, greedy), all queued at once on a
//! fresh engine; prints one JSON line per concurrency.
//!
//!   cargo bench --bench engine_throughput -- [MODEL] [PROMPTS_JSON] [CONCURRENCY,...] [OUTPUT_TOKENS]
//!
//! PROMPTS_JSON is a list of prompts (lists of token ids); the default is seeded random
//! ids, 128 per prompt. Defaults: SmolLM2-135M-Instruct, 1,8,32,64, 128 output tokens.

mod offline;

use inferd::backend::cpu::CpuBackend;
use inferd::engine::SamplingParams;
use inferd::loader::resolve_model;
use inferd::models::load_decoder;

fn main() {
    let (args, model_id) = offline::args();
    let model_id = model_id.as_str();
    let concurrency = offline::counts(&args, 2, "1,8,32,64", "CONCURRENCY");
    let output_tokens = offline::count(&args, 3, 128, "OUTPUT_TOKENS");
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
        let max_len = prompts[..c].iter().map(Vec::len).max().unwrap() + output_tokens;
        let mut engine = offline::engine_for(model.take().unwrap(), c, max_len, vec![]);
        let params = SamplingParams {
            max_tokens: Some(output_tokens),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let (secs, outputs) = offline::run_queued(&mut engine, &prompts[..c], &params);
        let generated: usize = outputs.iter().map(Vec::len).sum();
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
