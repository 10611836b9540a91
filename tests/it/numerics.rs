//! Logits and greedy tokens against transformers (float32 on CPU), for the real
//! SmolLM2-135M and the seeded tiny checkpoints with awkward shapes.
//!
//! Tolerance: |ours - transformers| <= 5e-4 on every golden top-k logit. Both sides compute
//! in f32 from identical weights; what remains is summation order (matmul blocking,
//! softmax). Measured maxima: 8e-5 on SmolLM2-135M, 3.4e-6 on the tiny checkpoints.

use inferd::backend::cpu::{CpuBackend, CpuKernels};
use inferd::backend::{Backend, ForwardBatch};
use inferd::engine::{self, Engine, EngineConfig, SamplingParams, SubmitError};
use inferd::models::{load_decoder, DecoderModel, EngineModel, LogitsFor};

use crate::common::{golden, ids, installed_model};

const ABS_TOL: f32 = 5e-4;
/// The opt-in bf16 matmuls (`INFERD_CPU_KERNELS=avx512-bf16`) against the exact paths.
const BF16_ABS_TOL: f32 = 1.0;

fn load(repo: &str) -> DecoderModel<CpuBackend> {
    let mut calls = Vec::new();
    let model = load_decoder(&CpuBackend::default(), &installed_model(repo), &mut |cur, total| {
        calls.push((cur, total))
    })
    .unwrap();
    // Progress reaches total exactly once, and only moves forward.
    let total = DecoderModel::<CpuBackend>::tensor_names(&model.config).len();
    assert_eq!(
        calls.last(),
        Some(&(total, total)),
        "{repo}: progress must end at the tensor count"
    );
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 == total));
    model
}

/// Logits of every prompt position, prefilled in chunks of `chunk` tokens into blocks of
/// `block_size` laid out in reverse order (so block ids differ from logical order).
fn prompt_logits(
    backend: &CpuBackend,
    model: &DecoderModel<CpuBackend>,
    prompt: &[u32],
    chunk: usize,
    block_size: usize,
) -> Vec<Vec<f32>> {
    let num_blocks = prompt.len().div_ceil(block_size);
    let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(num_blocks, block_size));
    let mut rows = Vec::new();
    for (i, piece) in prompt.chunks(chunk).enumerate() {
        let batch = ForwardBatch::single(piece, i * chunk, &block_table, block_size);
        let logits = model
            .forward(backend, &batch, &mut cache, LogitsFor::AllTokens)
            .unwrap();
        let (values, n, vocab) = backend.to_host(logits);
        rows.extend(values.chunks(vocab).take(n).map(<[f32]>::to_vec));
    }
    rows
}

fn check_model(golden_file: &str) {
    let g = golden(&format!("models/{golden_file}.json"));
    let repo = g["model"].as_str().unwrap();
    let mut model = load(repo);
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let mut first: Option<Vec<Vec<f32>>> = None;
        for (chunk, block_size) in [(prompt.len(), 16), (5, 4), (3, 16)] {
            let logits = prompt_logits(&CpuBackend::default(), &model, &prompt, chunk, block_size);
            // Batch invariance: chunking and block size change nothing, bit for bit.
            match &first {
                None => first = Some(logits.clone()),
                Some(first) => assert!(
                    first == &logits,
                    "{repo} {name}: chunk {chunk} / block {block_size} logits differ from one whole-prompt pass"
                ),
            }
            let mut worst = 0.0f32;
            for top in case["top_logits"].as_array().unwrap() {
                let pos = top["position"].as_u64().unwrap() as usize;
                let want_ids = ids(&top["ids"]);
                for (k, (&id, want)) in want_ids.iter().zip(top["logits"].as_array().unwrap()).enumerate() {
                    let want = want.as_f64().unwrap() as f32;
                    let got = logits[pos][id as usize];
                    let err = (got - want).abs();
                    worst = worst.max(err);
                    assert!(
                        err <= ABS_TOL,
                        "{repo} {name} (chunk {chunk}, block {block_size}): position {pos} top-{k} id {id}: {got} vs transformers {want}"
                    );
                }
            }
            eprintln!("{repo} {name} chunk={chunk} block={block_size}: max |logit error| {worst:.2e}");
        }
        let want = ids(&case["greedy_ids"]);
        // EOS is not special here: transformers' golden run ignores it too.
        for (block_size, chunk) in [(16, 512), (3, 4)] {
            let config = EngineConfig {
                block_size,
                num_blocks: (prompt.len() + want.len()).div_ceil(block_size),
                max_num_seqs: 1,
                max_num_batched_tokens: chunk,
                max_waiting: 1,
                ..EngineConfig::default()
            };
            let mut engine = Engine::new(CpuBackend::default(), model, config, vec![]);
            let params = SamplingParams {
                max_tokens: Some(want.len()),
                ..SamplingParams::greedy()
            };
            let (got, _) = engine::generate(&mut engine, prompt.clone(), params, &mut |_| true).unwrap();
            assert_eq!(
                got, want,
                "{repo} {name}: greedy tokens (block {block_size}, chunk {chunk})"
            );
            assert_eq!(engine.scheduler().num_blocks_in_use(), 0, "every block returned");
            model = engine.into_model();
        }
    }
}

/// The CPU kernel paths with the FMA instruction (AVX-512, AVX2, and the portable one on
/// aarch64) give the same logits bit for bit; the portable one on x86-64 (multiply, then
/// add) stays within the goldens' tolerance of them. (`scripts/test` also runs every test
/// here with each path forced through `INFERD_CPU_KERNELS`.)
#[test]
fn every_cpu_kernel_path_gives_the_same_smollm2_logits() {
    let g = golden("models/smollm2-135m.json");
    let model = load(g["model"].as_str().unwrap());
    let prompt = ids(&g["cases"][0]["prompt_ids"]);
    let mut fused: Option<(String, Vec<Vec<f32>>)> = None;
    let mut portable = None;
    for kernels in CpuKernels::available() {
        let backend = CpuBackend::default().with_kernels(kernels);
        let logits = prompt_logits(&backend, &model, &prompt, 5, 16);
        if kernels.name() == "portable" && !cfg!(target_arch = "aarch64") {
            portable = Some(logits);
            continue;
        }
        match &fused {
            None => fused = Some((kernels.to_string(), logits)),
            Some((first, want)) => assert!(want == &logits, "{kernels} logits differ from {first}'s"),
        }
    }
    // The opt-in bf16 matmuls: batch-invariant, but off by the rounding of activations.
    if let Ok(kernels) = CpuKernels::named("avx512-bf16") {
        let backend = CpuBackend::default().with_kernels(kernels);
        let got = prompt_logits(&backend, &model, &prompt, 5, 16);
        assert!(
            got == prompt_logits(&backend, &model, &prompt, prompt.len(), 16),
            "avx512-bf16: chunked and whole prefills differ"
        );
        let (first, want) = fused.as_ref().expect("an exact FMA path beside avx512-bf16");
        let (mut worst, mut same_top) = (0.0f32, 0);
        for (w, g) in want.iter().zip(&got) {
            worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
            let top = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j]));
            same_top += usize::from(top(w) == top(g));
        }
        eprintln!(
            "avx512-bf16 against {first}: max |logit difference| {worst:.2e}, same top token at {same_top} of {} positions",
            want.len()
        );
        assert!(worst <= BF16_ABS_TOL, "avx512-bf16 logits are {worst} from {first}'s");
    }
    if let (Some((first, want)), Some(got)) = (&fused, &portable) {
        let worst = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("portable against {first}: max |logit difference| {worst:.2e}");
        assert!(worst <= ABS_TOL, "portable logits are {worst} from {first}'s");
    }
}

#[test]
fn smollm2_135m_matches_transformers_logits_and_greedy_tokens() {
    check_model("smollm2-135m");
}

#[test]
fn tiny_llama_with_gqa_llama3_rope_and_odd_head_dim_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_qwen2_with_qkv_bias_linear_rope_and_tied_embeddings_matches_transformers() {
    check_model("tiny-qwen2");
}

#[test]
fn tiny_qwen3_with_qk_norm_and_wide_heads_matches_transformers() {
    check_model("tiny-qwen3");
}

#[test]
fn out_of_range_token_ids_are_an_error_not_a_panic() {
    let model = load("inferd-test/tiny-qwen2");
    let engine = Engine::new(CpuBackend::default(), model, EngineConfig::default(), vec![]);
    let err = engine.validate(&[5, 384], &SamplingParams::greedy()).unwrap_err();
    assert_eq!(
        err,
        SubmitError::TokenOutOfRange {
            role: inferd::engine::TokenRole::Prompt,
            id: 384,
            vocab_size: 384
        }
    );
    assert_eq!(err.to_string(), "prompt token 384 is outside the vocabulary of 384");
}
