//! Row normalizations (kernels/norm.cu): RMSNorm and LayerNorm, each also with the
//! residual add fused, and Qwen3's per-head q/k RMSNorm. CPU reference:
//! `backend::cpu::norm`.

use super::device::{cfg, rows_u32};
use super::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::AttentionShape;

/// Threads of a row-norm block: one per column, in whole warps, at most 1024.
fn norm_block(cols: usize) -> u32 {
    cols.next_multiple_of(32).clamp(32, 1024) as u32
}

pub(super) fn rms_norm(be: &CudaBackend, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
    let out = be.tensor(x.rows, x.cols, "rms_norm");
    if x.rows > 0 {
        let (xp, w, o, d) = (
            be.ptr(&x.buf),
            be.ptr(be.vector(weight, "rms_norm")),
            be.ptr(&out.buf),
            x.cols as i32,
        );
        let c = cfg((rows_u32(x.rows, "rms_norm"), 1, 1), norm_block(x.cols));
        launch!(be, "rms_norm_f32", c; &xp, &w, &o, &d, &eps);
    }
    out
}

pub(super) fn add_rms_norm(
    be: &CudaBackend,
    residual: &mut CudaTensor,
    delta: &CudaTensor,
    weight: &CudaWeight,
    eps: f32,
) -> CudaTensor {
    assert_eq!(
        (residual.rows, residual.cols),
        (delta.rows, delta.cols),
        "add_rms_norm: shapes differ"
    );
    let out = be.tensor(residual.rows, residual.cols, "add_rms_norm");
    if residual.rows > 0 {
        let (r, dl, w, o, d) = (
            be.ptr(&residual.buf),
            be.ptr(&delta.buf),
            be.ptr(be.vector(weight, "add_rms_norm")),
            be.ptr(&out.buf),
            residual.cols as i32,
        );
        let c = cfg(
            (rows_u32(residual.rows, "add_rms_norm"), 1, 1),
            norm_block(residual.cols),
        );
        launch!(be, "add_rms_norm_f32", c; &r, &dl, &w, &o, &d, &eps);
    }
    out
}

pub(super) fn qk_norm(
    be: &CudaBackend,
    qkv: &mut CudaTensor,
    q_weight: &CudaWeight,
    k_weight: &CudaWeight,
    eps: f32,
    shape: AttentionShape,
) {
    if qkv.rows == 0 {
        return;
    }
    let (x, qw, kw) = (
        be.ptr(&qkv.buf),
        be.ptr(be.vector(q_weight, "qk_norm")),
        be.ptr(be.vector(k_weight, "qk_norm")),
    );
    let (width, nh, hd) = (qkv.cols as i32, shape.num_heads as i32, shape.head_dim as i32);
    let grid = (
        rows_u32(qkv.rows, "qk_norm"),
        (shape.num_heads + shape.num_kv_heads) as u32,
        1,
    );
    launch!(be, "qk_norm_f32", cfg(grid, 32); &x, &qw, &kw, &width, &nh, &hd, &eps);
}

pub(super) fn layer_norm(
    be: &CudaBackend,
    x: &CudaTensor,
    weight: &CudaWeight,
    bias: &CudaWeight,
    eps: f32,
) -> CudaTensor {
    let out = be.tensor(x.rows, x.cols, "layer_norm");
    if x.rows > 0 {
        let (xp, w, b, o, d) = (
            be.ptr(&x.buf),
            be.ptr(be.vector(weight, "layer_norm")),
            be.ptr(be.vector(bias, "layer_norm")),
            be.ptr(&out.buf),
            x.cols as i32,
        );
        let c = cfg((rows_u32(x.rows, "layer_norm"), 1, 1), norm_block(x.cols));
        launch!(be, "layer_norm_f32", c; &xp, &w, &b, &o, &d, &eps);
    }
    out
}

pub(super) fn add_layer_norm(
    be: &CudaBackend,
    residual: &mut CudaTensor,
    delta: &CudaTensor,
    weight: &CudaWeight,
    bias: &CudaWeight,
    eps: f32,
) -> CudaTensor {
    assert_eq!(
        (residual.rows, residual.cols),
        (delta.rows, delta.cols),
        "add_layer_norm: shapes differ"
    );
    let out = be.tensor(residual.rows, residual.cols, "add_layer_norm");
    if residual.rows > 0 {
        let (r, dl, w, b, o, d) = (
            be.ptr(&residual.buf),
            be.ptr(&delta.buf),
            be.ptr(be.vector(weight, "add_layer_norm")),
            be.ptr(be.vector(bias, "add_layer_norm")),
            be.ptr(&out.buf),
            residual.cols as i32,
        );
        let c = cfg(
            (rows_u32(residual.rows, "add_layer_norm"), 1, 1),
            norm_block(residual.cols),
        );
        launch!(be, "add_layer_norm_f32", c; &r, &dl, &w, &b, &o, &d, &eps);
    }
    out
}
