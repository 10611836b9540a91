//! The engine's guarantees (`engine_cases.rs`) on the CPU backend, and how the KV pool is
//! sized from a memory budget.

use inferd::backend::cpu::CpuBackend;
use inferd::backend::{Backend, ForwardBatch, KvCacheShape};
use std::sync::Arc;

use inferd::engine::{Engine, EngineConfig, EngineEvent, EngineHandle, FinishReason, SamplingParams};
use inferd::models::{load_decoder, EncoderInput, EngineModel, ForwardError, ImageSet, LogitsFor};

use super::engine_cases as cases;
use crate::common::installed_model;

#[test]
fn sixty_four_concurrent_requests_match_each_request_run_alone() {
    cases::sixty_four_concurrent_requests_match_each_request_run_alone(&CpuBackend::default());
}

#[test]
fn a_pool_too_small_for_all_sequences_preempts_and_still_matches() {
    cases::a_pool_too_small_for_all_sequences_preempts_and_still_matches(&CpuBackend::default());
}

#[test]
fn a_shared_prefix_is_computed_once() {
    cases::a_shared_prefix_is_computed_once(&CpuBackend::default());
}

#[test]
fn n_completions_share_the_prompt_and_reproduce_with_a_seed() {
    cases::n_completions_share_the_prompt_and_reproduce_with_a_seed(&CpuBackend::default());
}

#[test]
fn cancelling_mid_generation_frees_every_block() {
    cases::cancelling_mid_generation_frees_every_block(&CpuBackend::default());
}

#[test]
fn the_engine_thread_serves_streams_and_dropping_one_cancels_it() {
    cases::the_engine_thread_serves_streams_and_dropping_one_cancels_it(&CpuBackend::default());
}

#[test]
fn invalid_requests_are_refused_before_the_engine() {
    cases::invalid_requests_are_refused_before_the_engine(&CpuBackend::default());
}

#[test]
fn a_full_waiting_queue_reports_overload() {
    cases::a_full_waiting_queue_reports_overload(&CpuBackend::default());
}

#[test]
fn async_scheduling_gives_the_serial_events() {
    cases::async_scheduling_gives_the_serial_events(&CpuBackend::default());
}

#[test]
fn padded_decode_batches_give_the_same_events() {
    cases::padded_decode_batches_give_the_same_events(&CpuBackend::default());
}

#[test]
fn the_kv_pool_is_sized_from_a_memory_budget() {
    use inferd::engine::{BudgetError, KvCacheBudget};
    let model = load_decoder(
        &CpuBackend::default(),
        &installed_model("inferd-test/tiny-llama"),
        &mut |_, _| {},
    )
    .unwrap();
    let per_block = EngineConfig::bytes_per_block(&model, 16);
    // 2 layers x 2 KV heads x 16 head_dim x 16 slots, K and V, f32.
    assert_eq!(per_block, 2 * 2 * 2 * 16 * 16 * 4);
    let base = EngineConfig {
        max_num_seqs: 4,
        ..EngineConfig::default()
    };
    let sized = base
        .with_budget(&model, KvCacheBudget::Bytes(10 * per_block + 5))
        .unwrap();
    assert_eq!(sized.num_blocks, 10);
    // Never more than max_num_seqs full windows (4 x 256 / 16 = 64 blocks).
    let capped = base.with_budget(&model, KvCacheBudget::Bytes(1 << 30)).unwrap();
    assert_eq!(capped.num_blocks, 64);
    assert!(matches!(
        base.with_budget(&model, KvCacheBudget::Bytes(per_block - 1)),
        Err(BudgetError::TooSmall { .. })
    ));
    assert!(matches!(
        base.with_budget(&model, KvCacheBudget::FractionOfAvailable(1.5)),
        Err(BudgetError::BadFraction(_))
    ));
    let from_memory = base
        .with_budget(&model, KvCacheBudget::FractionOfAvailable(0.01))
        .unwrap();
    assert!(from_memory.num_blocks > 0 && from_memory.num_blocks <= 64);
}

/// A model whose forward pass (or, with `encoder`, whose encoder: it then takes image
/// input) panics on token 13, as a backend fault (a CUDA error) would.
struct Faulty {
    model: inferd::models::DecoderModel<CpuBackend>,
    encoder: bool,
}

impl EngineModel<CpuBackend> for Faulty {
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn max_positions(&self) -> usize {
        self.model.max_positions()
    }
    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        self.model.kv_cache_shape(num_blocks, block_size)
    }
    fn forward(
        &self,
        backend: &CpuBackend,
        batch: &ForwardBatch,
        cache: &mut <CpuBackend as Backend>::KvCache,
        logits_for: LogitsFor,
    ) -> Result<<CpuBackend as Backend>::Tensor, ForwardError> {
        assert!(self.encoder || !batch.token_ids.contains(&13), "injected fault");
        self.model.forward(backend, batch, cache, logits_for)
    }
    fn needs_encoder_input(&self) -> bool {
        self.encoder
    }
    fn encoder_input_kind(&self) -> Option<&'static str> {
        self.encoder.then_some("image")
    }
    fn begin_request(
        &mut self,
        _backend: &CpuBackend,
        _key: u64,
        prompt: &[u32],
        _input: &EncoderInput,
    ) -> Result<(), ForwardError> {
        assert!(!prompt.contains(&13), "injected encoder fault");
        Ok(())
    }
}

/// A request whose step (or encoder) panics fails with the panic's message; the engine
/// thread, and with async scheduling the step thread, serve the next request.
fn serves_on_after_a_panic(encoder: bool, async_scheduling: bool) {
    let model = load_decoder(
        &CpuBackend::default(),
        &installed_model("inferd-test/tiny-llama"),
        &mut |_, _| {},
    )
    .unwrap();
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_waiting: 16,
        async_scheduling,
        ..EngineConfig::default()
    };
    let model = Faulty { model, encoder };
    let handle = EngineHandle::spawn(Engine::new(CpuBackend::default(), model, config, vec![]));
    let params = SamplingParams {
        max_tokens: Some(5),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let input = || encoder.then(|| EncoderInput::Images(Arc::new(ImageSet::new(Vec::new()))));
    let mut doomed = handle
        .submit_with_input(vec![13, 14, 15], params.clone(), input())
        .unwrap();
    let fault = if encoder {
        "injected encoder fault"
    } else {
        "injected fault"
    };
    match doomed.blocking_next() {
        Some(EngineEvent::Failed(message)) => assert!(message.contains(fault), "{message}"),
        other => panic!("expected the request to fail, got {other:?}"),
    }
    // The engine thread lives on, with every block back, and serves the next request.
    let start = std::time::Instant::now();
    while handle
        .metrics()
        .kv_blocks_used
        .load(std::sync::atomic::Ordering::Relaxed)
        != 0
    {
        assert!(
            start.elapsed().as_secs() < 30,
            "the failed request's blocks were not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for _ in 0..2 {
        let mut next = handle
            .submit_with_input(vec![3, 4, 5], params.clone(), input())
            .unwrap();
        let mut tokens = 0;
        loop {
            match next.blocking_next().expect("stream open") {
                EngineEvent::Token { .. } => tokens += 1,
                EngineEvent::Finished { .. } => break,
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(tokens, 5);
    }
    handle.shutdown();
}

#[test]
fn a_panicking_step_fails_its_requests_and_the_engine_serves_on() {
    for async_scheduling in [false, true] {
        serves_on_after_a_panic(false, async_scheduling);
    }
}

#[test]
fn a_panicking_encoder_fails_its_request_and_the_engine_serves_on() {
    for async_scheduling in [false, true] {
        serves_on_after_a_panic(true, async_scheduling);
    }
}

/// `max_tokens: 0` through the engine's API gives one token (the API layer refuses 0).
#[test]
fn max_tokens_zero_gives_one_token() {
    let mut model = load_decoder(
        &CpuBackend::default(),
        &installed_model("inferd-test/tiny-llama"),
        &mut |_, _| {},
    )
    .unwrap();
    for async_scheduling in [false, true] {
        let config = EngineConfig {
            async_scheduling,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(CpuBackend::default(), model, config, vec![]);
        let params = SamplingParams {
            max_tokens: Some(0),
            ..SamplingParams::greedy()
        };
        let (tokens, reason) = inferd::engine::generate(&mut engine, vec![3, 4, 5], params, &mut |_| true).unwrap();
        assert_eq!((tokens.len(), reason), (1, Some(FinishReason::Length)));
        model = engine.into_model();
    }
}

#[test]
fn prompt_logprobs_are_the_next_token_logprobs_of_each_prefix() {
    cases::prompt_logprobs_are_the_next_token_logprobs_of_each_prefix(&CpuBackend::default());
}

#[test]
fn priority_orders_admission_and_cache_salt_separates_prefixes() {
    cases::priority_orders_admission_and_cache_salt_separates_prefixes(&CpuBackend::default());
}

#[test]
fn constrained_outputs_follow_their_grammar_alone_batched_and_preempted() {
    cases::constrained_outputs_follow_their_grammar_alone_batched_and_preempted(&CpuBackend::default());
}
