//! Rotary embeddings and KV writes: rotate-half rotary of the q and k heads (one
//! position stream, or M-RoPE's three), and the new tokens' K and V into their slots of
//! the paged pools (`KvLayout`). The reference of kernels/rotary.cu.

use rayon::prelude::*;

use super::{CpuKvCache, CpuTensor, CpuWeight, KvLayout};
use crate::backend::{AttentionShape, MAX_HEAD_DIM};

/// Rotate-half rotary embedding of one head in place (HF's `apply_rotary_pos_emb`):
/// pairs are `(x[i], x[i + d/2])`.
#[inline]
pub(super) fn rotate_head(head: &mut [f32], cos_sin: &[(f32, f32)]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for ((a, b), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin) {
        let (x1, x2) = (*a, *b);
        *a = x1 * cos - x2 * sin;
        *b = x2 * cos + x1 * sin;
    }
}

pub(super) fn rotary(qkv: &mut CpuTensor, positions: &[u32], inv_freq: &CpuWeight, shape: AttentionShape) {
    assert_eq!(positions.len(), qkv.rows, "rotary: one position per row");
    let hd = shape.head_dim;
    let num_qk_heads = shape.num_heads + shape.num_kv_heads;
    qkv.data
        .par_chunks_mut(qkv.cols)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let mut cos_sin = [(0.0f32, 0.0f32); MAX_HEAD_DIM / 2];
            for (cs, f) in cos_sin.iter_mut().zip(inv_freq.f32s()) {
                let angle = pos as f32 * f;
                *cs = (angle.cos(), angle.sin());
            }
            for h in 0..num_qk_heads {
                rotate_head(&mut row[h * hd..(h + 1) * hd], &cos_sin[..hd / 2]);
            }
        });
}

pub(super) fn rotary_sections(
    qkv: &mut CpuTensor,
    positions: &[[u32; 3]],
    sections: [usize; 3],
    inv_freq: &CpuWeight,
    shape: AttentionShape,
) {
    assert_eq!(
        positions.len(),
        qkv.rows,
        "rotary_sections: one position triple per row"
    );
    let hd = shape.head_dim;
    assert_eq!(
        sections.iter().sum::<usize>(),
        hd / 2,
        "rotary_sections: sections cover head_dim / 2"
    );
    assert!(
        inv_freq.f32s().len() >= hd / 2,
        "rotary_sections: head_dim / 2 frequencies"
    );
    assert!(
        qkv.cols >= (shape.num_heads + shape.num_kv_heads) * hd,
        "rotary_sections: row width"
    );
    let num_qk_heads = shape.num_heads + shape.num_kv_heads;
    let stream = |i: usize| usize::from(i >= sections[0]) + usize::from(i >= sections[0] + sections[1]);
    qkv.data
        .par_chunks_mut(qkv.cols)
        .zip(positions.par_iter())
        .for_each(|(row, pos)| {
            let mut cos_sin = [(0.0f32, 0.0f32); MAX_HEAD_DIM / 2];
            for (i, (cs, f)) in cos_sin.iter_mut().zip(inv_freq.f32s()).enumerate().take(hd / 2) {
                let angle = pos[stream(i)] as f32 * f;
                *cs = (angle.cos(), angle.sin());
            }
            for h in 0..num_qk_heads {
                rotate_head(&mut row[h * hd..(h + 1) * hd], &cos_sin[..hd / 2]);
            }
        });
}

pub(super) fn write_kv(
    cache: &mut CpuKvCache,
    layer: usize,
    qkv: &CpuTensor,
    slot_mapping: &[u32],
    shape: AttentionShape,
) {
    let layout = KvLayout::of(&cache.shape);
    let (hd, bs) = (layout.head_dim, layout.block_size);
    let (k_pool, v_pool) = (&mut cache.k[layer], &mut cache.v[layer]);
    for (i, &slot) in slot_mapping.iter().enumerate() {
        let row = qkv.row(i);
        let (block, offset) = (slot / bs as u32, slot as usize % bs);
        for kvh in 0..shape.num_kv_heads {
            let k = &row[shape.q_width() + kvh * hd..][..hd];
            let v = &row[shape.q_width() + shape.kv_width() + kvh * hd..][..hd];
            let k_at = layout.k_offset(block, kvh) + offset;
            for (d, value) in k.iter().enumerate() {
                k_pool[k_at + d * bs] = *value;
            }
            let v_at = layout.v_offset(block, kvh) + offset * hd;
            v_pool[v_at..v_at + hd].copy_from_slice(v);
        }
    }
}
