//! GPU tests (`--features cuda`), run on a GPU machine by `scripts/gpu-check`. Every test
//! skips with a printed reason when no CUDA device can be used, so the suite builds and
//! passes without one.
//!
//! - Kernels: each backend op against the CPU backend (the reference) on fresh random
//!   inputs over many shapes, with every GPU output buffer poisoned (NaN) first. Bounds
//!   are on the relative L2 error ‖gpu − cpu‖ / ‖cpu‖: 1e-5 for f32 ops (summation order
//!   only), 1e-2 for bf16 GEMMs (the GPU rounds activations to bf16 before the product;
//!   the CPU widens bf16 weights exactly and keeps activations f32).
//! - Models: the seeded tiny checkpoints against transformers' float32 goldens (logits
//!   within 5e-4, greedy tokens exact), f32 greedy decoding equal to the CPU backend token
//!   for token on full-size random-weight models, bf16 logits against transformers on
//!   the GPU (goldens made there by `scripts/gpu_goldens.py`), the engine's batching and
//!   prefix-cache guarantees, Whisper's multilingual goldens and Qwen2.5-VL's (vision
//!   tower embeddings, greedy tokens with one and two images).
//! - The engine issue's tests (`tests/it/engine_cases.rs`), run on the CUDA backend.

#![cfg(feature = "cuda")]

#[path = "../it/common.rs"]
#[allow(dead_code)]
mod common;

mod activation;
mod attention;
mod layout;
mod matmul;
mod models;
mod norm;
mod rotary;
mod sampling;

use std::sync::Arc;

use inferd::backend::cpu::CpuBackend;
use inferd::backend::cuda::{AttentionSplits, CudaBackend, CudaError, PagedAttention};
use inferd::backend::{AttentionShape, Backend, DenseAttention, ForwardBatch, SeqChunk, WeightDtype};
use inferd::engine::sampling::SpeechRules;
use inferd::engine::{self, Engine, EngineConfig, EngineEvent, RequestId, SamplingParams};
use inferd::loader::{Dtype, TensorView};
use inferd::media::audio::{self, MelConfig, MelExtractor};
use inferd::models::whisper::WhisperGeneration;
use inferd::models::{load_decoder, load_decoder_dummy, load_whisper, DecoderModel, EngineModel, LogitsFor};

use common::{fixture, golden, ids, installed_model};

/// A GPU backend with poisoned outputs, or `None` (and the reason printed) where the
/// machine has no CUDA driver, cuBLAS or device. Any other failure to start (kernels the
/// device cannot load) fails the test.
fn gpu(weights: WeightDtype) -> Option<CudaBackend> {
    match CudaBackend::with_poisoned_outputs(0, weights) {
        Ok(b) => Some(b),
        Err(e @ (CudaError::NoDriver | CudaError::NoCublas | CudaError::NoDevice { .. })) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("the CUDA backend does not start: {e}"),
    }
}

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// ‖a − b‖ / ‖b‖, infinite when either holds a NaN (an unwritten, poisoned element).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "output sizes differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn check(what: &str, gpu: &[f32], cpu: &[f32], bound: f64) {
    let e = rel_err(gpu, cpu);
    assert!(e <= bound, "{what}: relative error {e:.3e} > {bound:.0e}");
}

/// Both backends' copies of one host tensor.
struct Pair {
    cpu: <CpuBackend as Backend>::Tensor,
    gpu: <CudaBackend as Backend>::Tensor,
}

fn pair(c: &CpuBackend, g: &CudaBackend, values: Vec<f32>, rows: usize, cols: usize) -> Pair {
    Pair {
        cpu: c.upload(values.clone(), rows, cols),
        gpu: g.upload(values, rows, cols),
    }
}

fn host_cpu(c: &CpuBackend, t: <CpuBackend as Backend>::Tensor) -> Vec<f32> {
    c.to_host(t).0
}

fn host_gpu(g: &CudaBackend, t: <CudaBackend as Backend>::Tensor) -> Vec<f32> {
    g.to_host(t).0
}

/// Head layouts of the per-head ops (rotary, q/k norm): GQA 3:1 and 7:1 at head_dim 64,
/// 4:1 and a single KV head at 128, and a narrow head_dim of 16.
fn head_shapes() -> impl Iterator<Item = AttentionShape> {
    [(9, 3, 64), (14, 2, 64), (32, 8, 128), (7, 1, 128), (6, 2, 16)]
        .into_iter()
        .map(|(num_heads, num_kv_heads, head_dim)| AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        })
}

/// A checkpoint-like tensor of `values` in `dtype`.
fn view_bytes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

fn view<'a>(bytes: &'a [u8], shape: &'a [usize], dtype: Dtype) -> TensorView<'a> {
    TensorView {
        name: "test",
        path: std::path::Path::new("test.safetensors"),
        dtype,
        shape,
        bytes,
    }
}

/// The engine issue's guarantees (`tests/it/engine_cases.rs`, also run on the CPU) on
/// the CUDA backend, f32: batch independence, preemption, prefix caching, n > 1,
/// cancellation, the engine thread, validation and overload.
#[path = "../it/engine_cases.rs"]
mod engine_cases;

mod engine_on_the_gpu {
    use super::{engine_cases, gpu, WeightDtype};

    macro_rules! on_the_gpu {
        ($($case:ident),* $(,)?) => {$(
            #[test]
            fn $case() {
                let Some(g) = gpu(WeightDtype::F32) else { return };
                engine_cases::$case(&g);
            }
        )*};
    }

    on_the_gpu!(
        sixty_four_concurrent_requests_match_each_request_run_alone,
        a_pool_too_small_for_all_sequences_preempts_and_still_matches,
        a_shared_prefix_is_computed_once,
        n_completions_share_the_prompt_and_reproduce_with_a_seed,
        cancelling_mid_generation_frees_every_block,
        the_engine_thread_serves_streams_and_dropping_one_cancels_it,
        invalid_requests_are_refused_before_the_engine,
        a_full_waiting_queue_reports_overload,
        prompt_logprobs_are_the_next_token_logprobs_of_each_prefix,
        priority_orders_admission_and_cache_salt_separates_prefixes,
        constrained_outputs_follow_their_grammar_alone_batched_and_preempted,
        async_scheduling_gives_the_serial_events,
        padded_decode_batches_give_the_same_events,
    );
}
