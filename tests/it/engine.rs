//! The engine's guarantees (`engine_cases.rs`) on the CPU backend, and how the KV pool is
//! sized from a memory budget.

use inferd::backend::cpu::CpuBackend;
use inferd::engine::EngineConfig;
use inferd::models::load_decoder;

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
