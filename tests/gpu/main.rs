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

use std::sync::Arc;

use inferd::backend::cpu::CpuBackend;
use inferd::backend::cuda::{CudaBackend, CudaError};
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

#[test]
fn norms_activations_and_layout_ops_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(11);
    for (rows, cols) in [(1, 64), (3, 576), (17, 896), (256, 1536), (1, 4096), (5, 8)] {
        let w_vals = rng.vec(cols, 1.0);
        let b_vals = rng.vec(cols, 0.5);
        let shape = [cols];
        let (wb, bb) = (view_bytes(&w_vals, Dtype::F32), view_bytes(&b_vals, Dtype::F32));
        let (wc, wg) = (
            c.weight(&view(&wb, &shape, Dtype::F32)),
            g.weight(&view(&wb, &shape, Dtype::F32)),
        );
        let (bc, bg) = (
            c.weight(&view(&bb, &shape, Dtype::F32)),
            g.weight(&view(&bb, &shape, Dtype::F32)),
        );
        let x = pair(&c, &g, rng.vec(rows * cols, 3.0), rows, cols);
        let what = format!("[{rows}, {cols}]");

        let (oc, og) = (c.rms_norm(&x.cpu, &wc, 1e-6), g.rms_norm(&x.gpu, &wg, 1e-6));
        check(&format!("rms_norm {what}"), &host_gpu(&g, og), &host_cpu(&c, oc), 1e-5);

        let d = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let mut r = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let oc = c.add_rms_norm(&mut r.cpu, &d.cpu, &wc, 1e-5);
        let og = g.add_rms_norm(&mut r.gpu, &d.gpu, &wg, 1e-5);
        check(
            &format!("add_rms_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );
        check(
            &format!("add_rms_norm residual {what}"),
            &host_gpu(&g, r.gpu),
            &host_cpu(&c, r.cpu),
            1e-6,
        );

        let (oc, og) = (
            c.layer_norm(&x.cpu, &wc, &bc, 1e-5),
            g.layer_norm(&x.gpu, &wg, &bg, 1e-5),
        );
        check(
            &format!("layer_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );
        let mut r = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let oc = c.add_layer_norm(&mut r.cpu, &d.cpu, &wc, &bc, 1e-5);
        let og = g.add_layer_norm(&mut r.gpu, &d.gpu, &wg, &bg, 1e-5);
        check(
            &format!("add_layer_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );

        let mut a = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        c.add(&mut a.cpu, &d.cpu);
        g.add(&mut a.gpu, &d.gpu);
        check(&format!("add {what}"), &host_gpu(&g, a.gpu), &host_cpu(&c, a.cpu), 1e-7);

        let mut a = pair(&c, &g, rng.vec(rows * cols, 4.0), rows, cols);
        c.gelu(&mut a.cpu);
        g.gelu(&mut a.gpu);
        check(
            &format!("gelu {what}"),
            &host_gpu(&g, a.gpu),
            &host_cpu(&c, a.cpu),
            1e-6,
        );

        if cols % 2 == 0 {
            let gu = pair(&c, &g, rng.vec(rows * cols, 4.0), rows, cols);
            let (oc, og) = (c.silu_mul(&gu.cpu), g.silu_mul(&gu.gpu));
            check(&format!("silu_mul {what}"), &host_gpu(&g, og), &host_cpu(&c, oc), 1e-6);
        }

        let picks: Vec<usize> = (0..rows.min(7)).map(|_| rng.below(rows)).collect();
        let (oc, og) = (c.gather_rows(&x.cpu, &picks), g.gather_rows(&x.gpu, &picks));
        check(
            &format!("gather_rows {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
    // Embedding lookups from f32 and bf16 tables.
    for (vocab, hidden, dtype) in [
        (1000, 64, Dtype::F32),
        (49_152, 576, Dtype::BF16),
        (384, 72, Dtype::BF16),
    ] {
        let table = rng.vec(vocab * hidden, 1.0);
        let bytes = view_bytes(&table, dtype);
        let shape = [vocab, hidden];
        let (tc, tg) = (
            c.weight(&view(&bytes, &shape, dtype)),
            g.weight(&view(&bytes, &shape, dtype)),
        );
        let ids: Vec<u32> = (0..300).map(|_| rng.below(vocab) as u32).collect();
        let (oc, og) = (c.embedding(&tc, &ids), g.embedding(&tg, &ids));
        check(
            &format!("embedding {vocab}x{hidden} {dtype:?}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
    // The 1-D im2col of Whisper's conv stem.
    for (len, ch, kernel, stride, pad) in [(3000, 80, 3, 1, 1), (3000, 384, 3, 2, 1), (7, 5, 3, 2, 1)] {
        let x = pair(&c, &g, rng.vec(len * ch, 1.0), len, ch);
        let (oc, og) = (
            c.im2col_1d(&x.cpu, kernel, stride, pad),
            g.im2col_1d(&x.gpu, kernel, stride, pad),
        );
        check(
            &format!("im2col_1d {len}x{ch}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
}

#[test]
fn argmax_rows_matches_the_cpu_with_ties_nan_and_infinities() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(99);
    for vocab in [1, 7, 1000, 49_152, 151_936] {
        let rows = 70;
        let mut values = rng.vec(rows * vocab, 10.0);
        for r in 0..rows {
            let row = &mut values[r * vocab..(r + 1) * vocab];
            match r % 7 {
                // Ties: the lower index wins.
                1 if vocab > 5 => {
                    row[vocab - 1] = 50.0;
                    row[vocab / 2] = 50.0;
                }
                2 => row[rng.below(vocab)] = f32::NAN,
                3 => row.fill(f32::NEG_INFINITY),
                4 => row.fill(f32::NAN),
                5 => row[rng.below(vocab)] = f32::INFINITY,
                _ => {}
            }
        }
        let x = pair(&c, &g, values, rows, vocab);
        let pick: Vec<usize> = (0..rows).rev().filter(|r| r % 3 != 0).collect();
        assert_eq!(
            g.argmax_rows(&x.gpu, &pick),
            c.argmax_rows(&x.cpu, &pick),
            "argmax_rows over a vocabulary of {vocab}"
        );
    }
}

/// Sampling on the device: the same token as the CPU's `draw` for the same uniform
/// numbers, over peaked and flat rows, temperatures from 0.1 to 2, rows with -inf, NaN
/// and +inf logits, and vocabularies from 1 to 152k (ranges of the scan from empty to
/// 149 ids per thread).
#[test]
fn draw_rows_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(1234);
    let mut checked = 0;
    for vocab in [1, 3, 1000, 1025, 49_152, 151_936] {
        let rows = 96;
        let mut values = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let scale = [0.1, 3.0, 20.0][r % 3];
            let mut row = rng.vec(vocab, scale);
            match r % 11 {
                1 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY),
                2 => row[rng.below(vocab)] = f32::NAN,
                3 => row.fill(f32::NEG_INFINITY),
                4 if vocab > 2 => row[vocab - 2] = f32::INFINITY,
                5 => row.fill(f32::NAN),
                _ => {}
            }
            values.extend(row);
        }
        let x = pair(&c, &g, values, rows, vocab);
        let picks: Vec<usize> = (0..rows).collect();
        let temps: Vec<f32> = (0..rows).map(|r| [0.1, 0.7, 1.0, 2.0][r % 4]).collect();
        for _ in 0..4 {
            let us: Vec<f64> = (0..rows)
                .map(|_| (rng.next() >> 11) as f64 / (1u64 << 53) as f64)
                .collect();
            let (got, want) = (
                g.draw_rows(&x.gpu, &picks, &temps, &us),
                c.draw_rows(&x.cpu, &picks, &temps, &us),
            );
            assert_eq!(got, want, "draw_rows over a vocabulary of {vocab}");
            checked += got.len();
        }
    }
    eprintln!("draw_rows: {checked} draws equal to the CPU's");
}

#[test]
fn linear_matches_the_cpu_in_f32_and_bf16() {
    for (dtype, bound) in [(WeightDtype::F32, 1e-5), (WeightDtype::Bf16, 1e-2)] {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::with_weights(dtype);
        let mut rng = Rng(23);
        for (n, out, inp, bias) in [
            (1, 576, 576, false),
            (7, 1152, 576, true),
            (64, 4864, 896, false),
            (256, 896, 4864, true),
            (3, 49_152, 576, false),
            (5, 13, 9, true),
        ] {
            let w = rng.vec(out * inp, 0.1);
            let bytes = view_bytes(&w, Dtype::BF16);
            let shape = [out, inp];
            let (wc, wg) = (
                c.weight(&view(&bytes, &shape, Dtype::BF16)),
                g.weight(&view(&bytes, &shape, Dtype::BF16)),
            );
            let b = rng.vec(out, 1.0);
            let bb = view_bytes(&b, Dtype::F32);
            let bshape = [out];
            let (bc, bg) = (
                c.weight(&view(&bb, &bshape, Dtype::F32)),
                g.weight(&view(&bb, &bshape, Dtype::F32)),
            );
            let x = pair(&c, &g, rng.vec(n * inp, 2.0), n, inp);
            let oc = c.linear(&x.cpu, &wc, bias.then_some(&bc));
            let og = g.linear(&x.gpu, &wg, bias.then_some(&bg));
            check(
                &format!("linear {dtype:?} [{n}, {inp}] x [{out}, {inp}]ᵀ bias={bias}"),
                &host_gpu(&g, og),
                &host_cpu(&c, oc),
                bound,
            );
        }
        // Stacked weights ([q; k; v]) upload as one matrix.
        let (a, b) = (rng.vec(8 * 16, 1.0), rng.vec(4 * 16, 1.0));
        let (ab, bb) = (view_bytes(&a, Dtype::F32), view_bytes(&b, Dtype::F32));
        let (sa, sb) = ([8, 16], [4, 16]);
        let views = [view(&ab, &sa, Dtype::F32), view(&bb, &sb, Dtype::F32)];
        let (wc, wg) = (c.weight_stacked(&views), g.weight_stacked(&views));
        let x = pair(&c, &g, rng.vec(3 * 16, 1.0), 3, 16);
        let (oc, og) = (c.linear(&x.cpu, &wc, None), g.linear(&x.gpu, &wg, None));
        check(
            &format!("stacked linear {dtype:?}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            bound,
        );
    }
}

#[test]
fn rotary_rotary_sections_and_qk_norm_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(5);
    for (heads, kv_heads, hd) in [(9, 3, 64), (14, 2, 64), (32, 8, 128), (7, 1, 128), (6, 2, 16)] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        let rows = 37;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let (fc, fg) = (c.weight_from_f32(inv.clone()), g.weight_from_f32(inv));
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(32_768) as u32).collect();
        let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
        c.rotary(&mut x.cpu, &positions, &fc, shape);
        g.rotary(&mut x.gpu, &positions, &fg, shape);
        // sin/cos of angles up to 3e4 rad: both sides round the angle the same way, the
        // library functions differ in the last bits.
        check(
            &format!("rotary {heads}/{kv_heads}x{hd}"),
            &host_gpu(&g, x.gpu),
            &host_cpu(&c, x.cpu),
            1e-5,
        );

        // Three position streams (M-RoPE sections, and the vision tower's two).
        for sections in [[hd / 8, hd * 3 / 16, hd * 3 / 16], [hd / 4, hd / 4, 0], [hd / 2, 0, 0]] {
            let triples: Vec<[u32; 3]> = (0..rows)
                .map(|_| [rng.below(32_768) as u32, rng.below(512) as u32, rng.below(512) as u32])
                .collect();
            let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
            c.rotary_sections(&mut x.cpu, &triples, sections, &fc, shape);
            g.rotary_sections(&mut x.gpu, &triples, sections, &fg, shape);
            check(
                &format!("rotary_sections {sections:?} {heads}/{kv_heads}x{hd}"),
                &host_gpu(&g, x.gpu),
                &host_cpu(&c, x.cpu),
                1e-5,
            );
        }

        let (qw, kw) = (rng.vec(hd, 1.0), rng.vec(hd, 1.0));
        let (qc, qg) = (c.weight_from_f32(qw.clone()), g.weight_from_f32(qw));
        let (kc, kg) = (c.weight_from_f32(kw.clone()), g.weight_from_f32(kw));
        let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
        c.qk_norm(&mut x.cpu, &qc, &kc, 1e-6, shape);
        g.qk_norm(&mut x.gpu, &qg, &kg, 1e-6, shape);
        check(
            &format!("qk_norm {heads}/{kv_heads}x{hd}"),
            &host_gpu(&g, x.gpu),
            &host_cpu(&c, x.cpu),
            1e-5,
        );
    }
}

/// One attention case: sequences as (context length, new tokens).
fn attention_case(
    c: &CpuBackend,
    g: &CudaBackend,
    rng: &mut Rng,
    shape: AttentionShape,
    seqs: &[(usize, usize)],
    block_size: usize,
) {
    let blocks_per: Vec<usize> = seqs.iter().map(|&(ctx, _)| ctx.div_ceil(block_size)).collect();
    let num_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
    // Blocks handed out in a shuffled order, so tables are not contiguous.
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let kv_shape = inferd::backend::KvCacheShape {
        num_layers: 1,
        num_blocks,
        block_size,
        num_kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
    };
    let mut cache_c = c.alloc_kv_cache(kv_shape);
    let mut cache_g = g.alloc_kv_cache(kv_shape);
    let width = shape.qkv_width();
    let mut batch = ForwardBatch {
        block_size,
        ..ForwardBatch::default()
    };
    let (mut prefix_slots, mut prefix_rows) = (Vec::new(), 0usize);
    for (&(ctx, new), &nb) in seqs.iter().zip(&blocks_per) {
        let table: Vec<u32> = free.drain(..nb).collect();
        let slot = |p: usize| table[p / block_size] * block_size as u32 + (p % block_size) as u32;
        prefix_slots.extend((0..ctx - new).map(slot));
        prefix_rows += ctx - new;
        let start = batch.token_ids.len();
        for p in ctx - new..ctx {
            batch.token_ids.push(0);
            batch.positions.push(p as u32);
            batch.slot_mapping.push(slot(p));
        }
        batch.seqs.push(SeqChunk {
            key: 0,
            query_start: start,
            query_len: new,
            context_len: ctx,
            block_table: table,
        });
    }
    // The cached prefix, then this step's rows (their K/V written first, as models do).
    // A bf16 KV pool stores keys and values rounded to bf16: inputs already on the bf16
    // grid are stored exactly, so the CPU's f32 pool is still the reference.
    let bf16_kv = g.kv_bytes_per_element() == 2;
    let values = |rng: &mut Rng, n: usize, scale: f32| -> Vec<f32> {
        let v = rng.vec(n, scale);
        if bf16_kv {
            v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
        } else {
            v
        }
    };
    if prefix_rows > 0 {
        let prefix = pair(c, g, values(rng, prefix_rows * width, 1.0), prefix_rows, width);
        c.write_kv(&mut cache_c, 0, &prefix.cpu, &prefix_slots, shape);
        g.write_kv(&mut cache_g, 0, &prefix.gpu, &prefix_slots, shape);
    }
    let rows = batch.num_tokens();
    let qkv = pair(c, g, values(rng, rows * width, 2.0), rows, width);
    c.write_kv(&mut cache_c, 0, &qkv.cpu, &batch.slot_mapping, shape);
    g.write_kv(&mut cache_g, 0, &qkv.gpu, &batch.slot_mapping, shape);
    let oc = c.attention(&qkv.cpu, &cache_c, 0, &batch, shape);
    let og = g.attention(&qkv.gpu, &cache_g, 0, &batch, shape);
    let max_ctx = seqs.iter().map(|s| s.0).max().unwrap_or(0);
    check(
        &format!(
            "attention {}/{}x{} over {} sequences (longest {max_ctx}, {rows} rows, block {block_size}, bf16 KV {bf16_kv})",
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            seqs.len()
        ),
        &host_gpu(g, og),
        &host_cpu(c, oc),
        1e-5,
    );
}

#[test]
fn paged_attention_matches_the_cpu_over_batches_contexts_and_gqa() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(42);
    for (heads, kv_heads, hd) in [(8, 8, 64), (16, 8, 128), (14, 2, 64), (28, 4, 128), (7, 1, 128)] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        // Decode of one sequence over contexts from 1 to 8k (split over the keys).
        for ctx in [1, 2, 17, 129, 1000, 4097, 8192] {
            attention_case(&c, &g, &mut rng, shape, &[(ctx, 1)], 16);
        }
        // Decode batches of 1..256 sequences of mixed lengths.
        for n in [1, 2, 31, 256] {
            let seqs: Vec<(usize, usize)> = (0..n).map(|_| (1 + rng.below(700), 1)).collect();
            attention_case(&c, &g, &mut rng, shape, &seqs, 16);
        }
        // Prefill (whole prompts), chunked prefill over cached prefixes, and decodes mixed
        // in one step, with odd block sizes.
        attention_case(&c, &g, &mut rng, shape, &[(300, 300)], 16);
        attention_case(&c, &g, &mut rng, shape, &[(2048, 2048)], 32);
        attention_case(&c, &g, &mut rng, shape, &[(700, 64), (33, 33), (1500, 1), (5, 2)], 7);
        attention_case(&c, &g, &mut rng, shape, &[(4100, 100), (9, 9), (1, 1)], 16);
    }
}

/// The bf16 KV pools (every mode but `--dtype float32`): writes and attention over them.
#[test]
fn paged_attention_over_bf16_pools_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::Bf16) else { return };
    assert_eq!(g.kv_bytes_per_element(), 2);
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(43);
    for (heads, kv_heads, hd) in [(14, 2, 64), (32, 8, 128), (7, 1, 128)] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        for ctx in [1, 300, 8192] {
            attention_case(&c, &g, &mut rng, shape, &[(ctx, 1)], 16);
        }
        let seqs: Vec<(usize, usize)> = (0..64).map(|_| (1 + rng.below(700), 1)).collect();
        attention_case(&c, &g, &mut rng, shape, &seqs, 16);
        attention_case(&c, &g, &mut rng, shape, &[(700, 64), (33, 33), (1500, 1), (5, 2)], 7);
    }
}

#[test]
fn dense_attention_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(77);
    for (heads, hd) in [(6, 64), (20, 64), (8, 128)] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hd,
        };
        for causal in [false, true] {
            // Two sequences: an encoder's 1500 frames, and a short one.
            let (m1, m2, q1, q2) = (1500, 40, if causal { 1500 } else { 3 }, 7);
            let rows = q1 + q2;
            let q = pair(&c, &g, rng.vec(rows * shape.q_width(), 2.0), rows, shape.q_width());
            let k1 = pair(&c, &g, rng.vec(m1 * shape.kv_width(), 1.0), m1, shape.kv_width());
            let v1 = pair(&c, &g, rng.vec(m1 * shape.kv_width(), 1.0), m1, shape.kv_width());
            let k2 = pair(&c, &g, rng.vec(m2 * shape.kv_width(), 1.0), m2, shape.kv_width());
            let v2 = pair(&c, &g, rng.vec(m2 * shape.kv_width(), 1.0), m2, shape.kv_width());
            let seqs_c = [
                DenseAttention {
                    q_start: 0,
                    q_len: q1,
                    k: &k1.cpu,
                    v: &v1.cpu,
                },
                DenseAttention {
                    q_start: q1,
                    q_len: q2,
                    k: &k2.cpu,
                    v: &v2.cpu,
                },
            ];
            let seqs_g = [
                DenseAttention {
                    q_start: 0,
                    q_len: q1,
                    k: &k1.gpu,
                    v: &v1.gpu,
                },
                DenseAttention {
                    q_start: q1,
                    q_len: q2,
                    k: &k2.gpu,
                    v: &v2.gpu,
                },
            ];
            let oc = c.attention_dense(&q.cpu, &seqs_c, shape, causal);
            let og = g.attention_dense(&q.gpu, &seqs_g, shape, causal);
            check(
                &format!("attention_dense {heads}x{hd} causal={causal}"),
                &host_gpu(&g, og),
                &host_cpu(&c, oc),
                1e-5,
            );
        }
    }
}

/// Logits of every prompt position in one pass.
fn prompt_logits<B: Backend + 'static>(backend: &B, model: &DecoderModel<B>, prompt: &[u32]) -> Vec<Vec<f32>> {
    let block_size = 16;
    let blocks: Vec<u32> = (0..prompt.len().div_ceil(block_size) as u32).rev().collect();
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(blocks.len(), block_size));
    let batch = ForwardBatch::single(prompt, 0, &blocks, block_size);
    let logits = model
        .forward(backend, &batch, &mut cache, LogitsFor::AllTokens)
        .unwrap();
    let (values, _, vocab) = backend.to_host(logits);
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn greedy<B: Backend + 'static>(
    backend: B,
    model: DecoderModel<B>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, DecoderModel<B>) {
    let params = SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    solo(backend, model, prompt, params)
}

/// One request on an engine of its own.
fn solo<B: Backend + 'static>(
    backend: B,
    model: DecoderModel<B>,
    prompt: &[u32],
    params: SamplingParams,
) -> (Vec<u32>, DecoderModel<B>) {
    let n = params.max_tokens.unwrap_or(16);
    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: (prompt.len() + n).div_ceil(block_size) + 1,
        max_num_seqs: 1,
        max_num_batched_tokens: 512,
        max_waiting: 1,
    };
    let mut engine = Engine::new(backend, model, config, vec![]);
    let (ids, _) = engine::generate(&mut engine, prompt.to_vec(), params, &mut |_| true).unwrap();
    (ids, engine.into_model())
}

/// The tiny checkpoints with awkward shapes (GQA 3:1 with head_dim 16, qkv bias with tied
/// embeddings, q/k norm) against transformers' float32 goldens, as the CPU suite does.
#[test]
fn tiny_checkpoints_match_transformers_float32_goldens() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let golden = golden(&format!("models/{name}.json"));
        let model = load_decoder(&g, &installed_model(&format!("inferd-test/{name}")), &mut |_, _| {}).unwrap();
        let mut model = Some(model);
        for case in golden["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let logits = prompt_logits(&g, model.as_ref().unwrap(), &prompt);
            let mut worst = 0.0f32;
            for top in case["top_logits"].as_array().unwrap() {
                let pos = top["position"].as_u64().unwrap() as usize;
                for (&id, want) in ids(&top["ids"]).iter().zip(top["logits"].as_array().unwrap()) {
                    worst = worst.max((logits[pos][id as usize] - want.as_f64().unwrap() as f32).abs());
                }
            }
            eprintln!("{name} {}: max |logit error| {worst:.2e}", case["name"]);
            assert!(worst <= 5e-4, "{name}: logits differ from transformers by {worst}");
            let want = ids(&case["greedy_ids"]);
            let (got, m) = greedy(g.clone(), model.take().unwrap(), &prompt, want.len());
            assert_eq!(got, want, "{name} {}: greedy tokens", case["name"]);
            model = Some(m);
        }
    }
}

/// Full-size random-weight models (SmolLM2-135M's and Qwen2.5-0.5B's configs): greedy
/// decoding in f32 gives the CPU backend's tokens, one for one, and the logits agree.
#[test]
fn float32_greedy_decoding_equals_the_cpu_backend() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b"] {
        let dir = fixture(&format!("models/{name}"));
        let mc = load_decoder_dummy(&c, &dir, &mut |_, _| {}).unwrap();
        let mg = load_decoder_dummy(&g, &dir, &mut |_, _| {}).unwrap();
        let mut rng = Rng(9);
        let vocab = mc.config.vocab_size;
        let prompt: Vec<u32> = (0..40).map(|_| rng.below(vocab) as u32).collect();
        let (lc, lg) = (prompt_logits(&c, &mc, &prompt), prompt_logits(&g, &mg, &prompt));
        let flat = |l: &Vec<Vec<f32>>| l.concat();
        let e = rel_err(&flat(&lg), &flat(&lc));
        eprintln!("{name}: prompt logits relative error {e:.2e}");
        assert!(e < 1e-4, "{name}: logits differ by {e:.2e}");
        let (ids_c, _) = greedy(c.clone(), mc, &prompt, 48);
        let (ids_g, _) = greedy(g.clone(), mg, &prompt, 48);
        assert_eq!(ids_g, ids_c, "{name}: greedy tokens, CUDA f32 vs CPU");
    }
}

/// bf16 weights on the GPU against transformers run on the GPU: goldens written by
/// `scripts/gpu_goldens.py` (INFERD_GPU_GOLDENS). transformers there computes in bf16
/// (`torch_bf16`) and, from the same bf16 weights, in f32 (`torch_f32`). inferd keeps
/// activations in f32 and rounds GEMM inputs and the KV cache to bf16, so it must be at
/// least as close to `torch_f32` as transformers' own bf16 run is, and no further from
/// `torch_bf16` than twice that (or 1e-2).
#[test]
fn bfloat16_logits_match_transformers_on_the_gpu() {
    let Some(g) = gpu(WeightDtype::Bf16) else { return };
    let Ok(path) = std::env::var("INFERD_GPU_GOLDENS") else {
        eprintln!("skipped: INFERD_GPU_GOLDENS is not set (scripts/gpu-check sets it)");
        return;
    };
    let goldens: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for case in goldens["cases"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let model = load_decoder(&g, &installed_model(name), &mut |_, _| {}).unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let ours = prompt_logits(&g, &model, &prompt).concat();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
                .collect()
        };
        let (t_bf16, t_f32) = (floats(&case["torch_bf16"]), floats(&case["torch_f32"]));
        let (to_f32, to_bf16, torch_own) = (
            rel_err(&ours, &t_f32),
            rel_err(&ours, &t_bf16),
            rel_err(&t_bf16, &t_f32),
        );
        eprintln!(
            "{name}: ours vs torch f32 {to_f32:.2e}, ours vs torch bf16 {to_bf16:.2e}, torch bf16 vs f32 {torch_own:.2e}"
        );
        assert!(
            to_f32 <= torch_own,
            "{name}: {to_f32:.2e} from transformers' f32 logits, more than its own bf16 run ({torch_own:.2e})"
        );
        assert!(
            to_bf16 <= (2.0 * torch_own).max(1e-2),
            "{name}: {to_bf16:.2e} from transformers' bf16 logits"
        );
    }
}

/// The engine on the GPU: requests batched together (prefill and decode mixed, prompts
/// chunked; greedy rows reduced on the device, seeded sampling and log-probability rows
/// copied out, in the same steps) give their solo tokens, a shared prefix is reused from
/// the cache, and every block comes back.
#[test]
fn engine_batches_and_prefix_cache_match_solo_runs_on_the_gpu() {
    // f32: batched GEMMs may sum in another order than solo ones; in f32 that cannot
    // flip a greedy choice of these random weights, in bf16 it could.
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let dir = fixture("models/smollm2-135m");
    let model = load_decoder_dummy(&g, &dir, &mut |_, _| {}).unwrap();
    let mut rng = Rng(3);
    let shared: Vec<u32> = (0..48).map(|_| rng.below(49_152) as u32).collect();
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            let mut p = if i % 3 == 0 { shared.clone() } else { Vec::new() };
            p.extend((0..5 + 13 * i).map(|_| rng.below(49_152) as u32));
            p
        })
        .collect();
    let n = 24;
    let params = |i: usize| match i % 3 {
        0 => SamplingParams {
            max_tokens: Some(n),
            ..SamplingParams::greedy()
        },
        1 => SamplingParams {
            max_tokens: Some(n),
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
        _ => SamplingParams {
            max_tokens: Some(n),
            logprobs: Some(2),
            ..SamplingParams::greedy()
        },
    };
    let mut model = Some(model);
    let mut solo_ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (ids, m) = solo(g.clone(), model.take().unwrap(), p, params(i));
        solo_ids.push(ids);
        model = Some(m);
    }
    let config = EngineConfig {
        block_size: 16,
        num_blocks: 256,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_waiting: 64,
    };
    let mut engine = Engine::new(g.clone(), model.take().unwrap(), config, vec![]);
    let mut receivers = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .add_request(RequestId(i as u64), p.clone(), params(i), tx)
            .unwrap();
        receivers.push(rx);
    }
    while engine.has_work() {
        engine.step();
    }
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                EngineEvent::Token { token, .. } => got.push(token),
                EngineEvent::Finished { .. } => break,
                EngineEvent::Failed(e) => panic!("request {i}: {e}"),
            }
        }
        assert_eq!(got, solo_ids[i], "request {i}: batched tokens differ from its solo run");
    }
    assert!(engine.stats().prefix_cache_hits > 0, "the shared prefix was reused");
    assert_eq!(engine.scheduler().num_blocks_in_use(), 0, "every block returned");
}

/// Whisper on the GPU: the seeded multilingual checkpoint detects the language and
/// decodes transformers' tokens (tests/goldens/whisper.json) on jfk.wav.
/// Qwen2.5-VL on the GPU (float32): the vision tower's embeddings of two images against
/// transformers' goldens, and the whole model's 16 greedy tokens for one and for two
/// images through the engine, as the CPU suite checks them (`tests/it/vision.rs`).
#[test]
fn vision_language_goldens_on_the_gpu() {
    use inferd::media::image::{decode, preprocess, VisionPreprocess};
    use inferd::models::qwen2_5_vl::VisionLanguageModel;
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let dir = installed_model("inferd-test/tiny-qwen2.5-vl");
    let images_of = |want: &serde_json::Value, names: &serde_json::Value| {
        let settings = VisionPreprocess {
            min_pixels: want["min_pixels"].as_u64().unwrap() as usize,
            max_pixels: want["max_pixels"].as_u64().unwrap() as usize,
            ..VisionPreprocess::default()
        };
        let names = names.as_array().unwrap();
        names
            .iter()
            .map(|n| {
                let bytes = std::fs::read(fixture(&format!("images/{}", n.as_str().unwrap()))).unwrap();
                preprocess(&decode(&bytes, 1 << 24).unwrap(), &settings).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let tower = golden("models/tiny-qwen2.5-vl-vision.json");
    let model = VisionLanguageModel::load(&g, &dir, &mut |_, _| {}).unwrap();
    let embeddings = host_gpu(&g, model.vision().forward(&g, &images_of(&tower, &tower["images"])));
    let want: Vec<f32> = tower["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    check("vision tower embeddings", &embeddings, &want, 1e-4);
    let goldens = golden("models/tiny-qwen2.5-vl.json");
    let mut engine = Engine::new(g.clone(), model, EngineConfig::default(), vec![]);
    for (id, (name, case)) in goldens["cases"].as_object().unwrap().iter().enumerate() {
        let images = inferd::models::ImageSet::new(images_of(&goldens, &case["images"]));
        let input = inferd::models::EncoderInput::Images(Arc::new(images));
        let params = SamplingParams {
            max_tokens: Some(16),
            temperature: 0.0,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let tokens = common::run_alone(&mut engine, id as u64, ids(&case["prompt"]), params, Some(input));
        assert_eq!(tokens, ids(&case["greedy"]), "{name}: greedy tokens on the GPU");
    }
}

#[test]
fn whisper_multilingual_goldens_on_the_gpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let gold = &golden("whisper.json")["tiny_multilingual"];
    let dir = installed_model("inferd-test/tiny-whisper");
    let gen = WhisperGeneration::from_dir(&dir).unwrap();
    let model = load_whisper(&g, &dir, &mut |_, _| {}).unwrap();
    let mut engine = Engine::new(g.clone(), model, EngineConfig::default(), vec![gen.eos_token_id]);
    let bytes = std::fs::read(fixture("audio/jfk.wav")).unwrap();
    let audio = audio::decode(&bytes, 60.0).unwrap();
    let mel = inferd::models::EncoderInput::Audio(Arc::new(
        MelExtractor::new(MelConfig::default()).window_features(&audio.samples),
    ));
    let mut run = |id: u64, prompt: Vec<u32>, params: SamplingParams| {
        common::run_alone(&mut engine, id, prompt, params, Some(mel.clone()))
    };
    let (prompt, languages) = gen.language_detection().unwrap();
    let params = SamplingParams::likeliest_of(&languages);
    let detected = run(1, prompt, params);
    assert_eq!(detected, vec![gold["detected_language_id"].as_u64().unwrap() as u32]);
    let fr = gen.lang_to_id.iter().find(|(c, _)| c == "fr").unwrap().1;
    let params = SamplingParams {
        temperature: 0.0,
        speech: Some(Arc::new(SpeechRules::whisper(&gen, false))),
        ..SamplingParams::default()
    };
    let out = run(2, gen.prompt(&[], Some(fr), false, false), params);
    assert_eq!(out, ids(&gold["transcribe_fr"]), "transcribe_fr");
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
    );
}
