//! Rotary embeddings and KV writes (kernels/rotary.cu): rotate-half rotary of the q
//! and k heads (one position stream, or M-RoPE's three), and the new tokens' K and V
//! into their paged slots. CPU reference: `backend::cpu::rotary`.

use super::device::{cfg, rows_u32};
use super::{CudaBackend, CudaKvCache, CudaTensor, CudaWeight, KvPool};
use crate::backend::AttentionShape;

pub(super) fn rotary(
    be: &CudaBackend,
    qkv: &mut CudaTensor,
    positions: &[u32],
    inv_freq: &CudaWeight,
    shape: AttentionShape,
) {
    assert_eq!(positions.len(), qkv.rows, "rotary: one position per row");
    if qkv.rows == 0 {
        return;
    }
    let pos = be.indices(positions, "rotary: positions");
    let (x, p, f) = (be.ptr(&qkv.buf), be.ptr(&pos), be.ptr(be.vector(inv_freq, "rotary")));
    let (width, heads, hd) = (
        qkv.cols as i32,
        (shape.num_heads + shape.num_kv_heads) as i32,
        shape.head_dim as i32,
    );
    launch!(be, "rotary_f32", cfg((rows_u32(qkv.rows, "rotary"), 1, 1), 128); &x, &p, &f, &width, &heads, &hd);
}

pub(super) fn rotary_sections(
    be: &CudaBackend,
    qkv: &mut CudaTensor,
    positions: &[[u32; 3]],
    sections: [usize; 3],
    inv_freq: &CudaWeight,
    shape: AttentionShape,
) {
    assert_eq!(
        positions.len(),
        qkv.rows,
        "rotary_sections: one position triple per row"
    );
    assert_eq!(
        sections.iter().sum::<usize>(),
        shape.head_dim / 2,
        "rotary_sections: sections cover head_dim / 2"
    );
    assert!(
        qkv.cols >= (shape.num_heads + shape.num_kv_heads) * shape.head_dim,
        "rotary_sections: row width"
    );
    if qkv.rows == 0 {
        return;
    }
    assert!(
        be.vector(inv_freq, "rotary_sections").len() >= shape.head_dim / 2,
        "rotary_sections: head_dim / 2 frequencies"
    );
    let flat: Vec<u32> = positions.iter().flatten().copied().collect();
    let pos = be.indices(&flat, "rotary_sections: positions");
    let (x, p, f) = (
        be.ptr(&qkv.buf),
        be.ptr(&pos),
        be.ptr(be.vector(inv_freq, "rotary_sections")),
    );
    let (width, heads, hd, s0, s1) = (
        qkv.cols as i32,
        (shape.num_heads + shape.num_kv_heads) as i32,
        shape.head_dim as i32,
        sections[0] as i32,
        sections[1] as i32,
    );
    launch!(be, "rotary_sections_f32", cfg((rows_u32(qkv.rows, "rotary_sections"), 1, 1), 128); &x, &p, &f, &width, &heads, &hd, &s0, &s1);
}

pub(super) fn write_kv(
    be: &CudaBackend,
    cache: &mut CudaKvCache,
    layer: usize,
    qkv: &CudaTensor,
    slot_mapping: &[u32],
    shape: AttentionShape,
) {
    assert_eq!(slot_mapping.len(), qkv.rows, "write_kv: one slot per row");
    let slots_total = cache.shape.num_blocks * cache.shape.block_size;
    for &s in slot_mapping {
        assert!(
            (s as usize) < slots_total,
            "write_kv: slot {s} outside the pool of {slots_total}"
        );
    }
    if qkv.rows == 0 {
        return;
    }
    let slots = be.indices(slot_mapping, "write_kv: slots");
    let (x, k, v, s) = (
        be.ptr(&qkv.buf),
        be.pool_ptr(&cache.k[layer]),
        be.pool_ptr(&cache.v[layer]),
        be.ptr(&slots),
    );
    let (width, qw, kvw) = (qkv.cols as i32, shape.q_width() as i32, shape.kv_width() as i32);
    let c = cfg((rows_u32(qkv.rows, "write_kv"), 1, 1), 256);
    match cache.k[layer] {
        KvPool::F32(_) => launch!(be, "write_kv_f32", c; &x, &k, &v, &s, &width, &qw, &kvw),
        KvPool::Bf16(_) => launch!(be, "write_kv_bf16", c; &x, &k, &v, &s, &width, &qw, &kvw),
    }
}
