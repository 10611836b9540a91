//! What the offline engine benchmarks share: their arguments, an engine sized for C
//! requests, and a run of requests all queued at once.

use std::time::Instant;

use inferd::backend::cpu::CpuBackend;
use inferd::engine::{Engine, EngineConfig, EngineEvent, RequestId, SamplingParams};
use inferd::models::DecoderModel;

/// The positional arguments (cargo's `--bench` flag left out) and the model they name
/// first (SmolLM2-135M-Instruct by default).
pub fn args() -> (Vec<String>, String) {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| "HuggingFaceTB/SmolLM2-135M-Instruct".into());
    (args, model)
}

/// The positional argument at `index` as a comma-separated list of counts (`default`
/// when absent); `name` says which in a parse failure.
#[allow(dead_code)] // single_sequence takes no list
pub fn counts(args: &[String], index: usize, default: &str, name: &str) -> Vec<usize> {
    let text = args.get(index).map_or(default, String::as_str);
    text.split(',').map(|c| c.parse().expect(name)).collect()
}

/// The positional argument at `index` as a count (`default` when absent).
pub fn count(args: &[String], index: usize, default: usize, name: &str) -> usize {
    args.get(index).map_or(default, |s| s.parse().expect(name))
}

/// An engine with room for `c` sequences of `max_len` tokens (block size 16, a
/// 2048-token step budget).
#[allow(dead_code)] // single_sequence drives `generate` instead
pub fn engine_for(model: DecoderModel<CpuBackend>, c: usize, max_len: usize, eos: Vec<u32>) -> Engine<CpuBackend> {
    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: max_len.div_ceil(block_size) * c,
        max_num_seqs: c,
        max_num_batched_tokens: 2048,
        max_waiting: c,
        ..EngineConfig::default()
    };
    Engine::new(CpuBackend::default(), model, config, eos)
}

/// Queues every prompt at once and steps until all are done: seconds of wall time and
/// each request's tokens.
#[allow(dead_code)]
pub fn run_queued(
    engine: &mut Engine<CpuBackend>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> (f64, Vec<Vec<u32>>) {
    let mut receivers = Vec::new();
    let start = Instant::now();
    for (i, prompt) in prompts.iter().enumerate() {
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
    let outputs = receivers
        .into_iter()
        .map(|mut rx| {
            let mut tokens = Vec::new();
            while let Ok(event) = rx.try_recv() {
                match event {
                    EngineEvent::Token { token, .. } => tokens.push(token),
                    EngineEvent::Failed(e) => panic!("request failed: {e}"),
                    _ => {}
                }
            }
            tokens
        })
        .collect();
    (secs, outputs)
}
