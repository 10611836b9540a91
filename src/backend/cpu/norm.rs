//! Row normalizations: RMSNorm and LayerNorm (each also with the residual add fused)
//! and Qwen3's per-head q/k RMSNorm, in f32 as transformers computes them. The reference
//! of kernels/norm.cu.

use rayon::prelude::*;

use super::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::{AttentionShape, Backend, MAX_HEAD_DIM};

/// RMSNorm of `x` into `out`: `x / sqrt(mean(x²) + eps) * weight`, as transformers does
/// it in f32 for every model family here.
#[inline]
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// LayerNorm of `x` into `out` (biased variance, as torch's `layer_norm`).
#[inline]
pub(super) fn layer_norm_row(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, v), w), b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * inv * w + b;
    }
}

pub(super) fn rms_norm(x: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
    let mut out = CpuTensor::zeros(x.rows, x.cols);
    out.data
        .par_chunks_mut(x.cols)
        .zip(x.data.par_chunks(x.cols))
        .for_each(|(o, row)| rms_norm_row(row, weight.f32s(), eps, o));
    out
}

pub(super) fn add_rms_norm(residual: &mut CpuTensor, delta: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
    assert_eq!(
        (residual.rows, residual.cols),
        (delta.rows, delta.cols),
        "add_rms_norm: shapes differ"
    );
    let cols = residual.cols;
    let mut out = CpuTensor::zeros(residual.rows, cols);
    out.data
        .par_chunks_mut(cols)
        .zip(residual.data.par_chunks_mut(cols))
        .zip(delta.data.par_chunks(cols))
        .for_each(|((o, r), d)| {
            for (r, d) in r.iter_mut().zip(d) {
                *r += d;
            }
            rms_norm_row(r, weight.f32s(), eps, o);
        });
    out
}

pub(super) fn qk_norm(
    qkv: &mut CpuTensor,
    q_weight: &CpuWeight,
    k_weight: &CpuWeight,
    eps: f32,
    shape: AttentionShape,
) {
    let hd = shape.head_dim;
    let num_qk_heads = shape.num_heads + shape.num_kv_heads;
    qkv.data.par_chunks_mut(qkv.cols).for_each(|row| {
        let mut normed = [0.0f32; MAX_HEAD_DIM];
        for h in 0..num_qk_heads {
            let weight = if h < shape.num_heads {
                q_weight.f32s()
            } else {
                k_weight.f32s()
            };
            let head = &mut row[h * hd..(h + 1) * hd];
            rms_norm_row(head, weight, eps, &mut normed[..hd]);
            head.copy_from_slice(&normed[..hd]);
        }
    });
}

pub(super) fn layer_norm(x: &CpuTensor, weight: &CpuWeight, bias: &CpuWeight, eps: f32) -> CpuTensor {
    let mut out = CpuTensor::zeros(x.rows, x.cols);
    out.data
        .par_chunks_mut(x.cols)
        .zip(x.data.par_chunks(x.cols))
        .for_each(|(o, row)| layer_norm_row(row, weight.f32s(), bias.f32s(), eps, o));
    out
}

pub(super) fn add_layer_norm(
    be: &CpuBackend,
    residual: &mut CpuTensor,
    delta: &CpuTensor,
    weight: &CpuWeight,
    bias: &CpuWeight,
    eps: f32,
) -> CpuTensor {
    be.add(residual, delta);
    be.layer_norm(residual, weight, bias, eps)
}
