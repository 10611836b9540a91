//! Attention: paged attention over the KV pools (one FMA chain per score and per output,
//! in a fixed order, so results do not depend on the batch), and dense attention over
//! given K/V (the matmul form for long query runs). The reference of
//! kernels/attention.cu.

use rayon::prelude::*;

use super::kernels::{per_path, CpuKernels, MulAdd};
use super::matmul::{matmul, PackedMatrix};
use super::{CpuKvCache, CpuTensor, KvLayout};
use crate::backend::{AttentionShape, DenseAttention, ForwardBatch, MAX_HEAD_DIM};

/// One query token's attention over its sequence's cached keys and values.
///
/// Every token is computed the same way whatever else is in the batch or however its
/// prompt was chunked (each score is one FMA chain over the head dimension, each output
/// one FMA chain over positions, in a fixed order), so greedy results do not depend on
/// batch composition.
pub(super) struct AttentionToken<'a> {
    /// `[num_heads * head_dim]`
    q_row: &'a [f32],
    /// Cached positions this token attends to: `0..visible`.
    visible: usize,
    block_table: &'a [u32],
    layout: KvLayout,
}

/// Query runs at least this long take the matmul form of `attention_dense`.
pub(super) const DENSE_MATMUL_MIN_QUERIES: usize = 16;

/// One sequence of `attention_dense` as matmuls, head by head: `S = Q Kᵀ` (scaled), a
/// row softmax (causal positions masked), `Oᵀ = Vᵀ Pᵀ`, written to `out`'s rows and the
/// head's columns. Streams K and V once per head instead of once per query.
pub(super) fn dense_attention_matmul(
    kernels: CpuKernels,
    q: &CpuTensor,
    seq: &DenseAttention<'_, CpuTensor>,
    shape: AttentionShape,
    causal: bool,
    out: &mut CpuTensor,
) {
    let hd = shape.head_dim;
    let (n, m) = (seq.q_len, seq.k.rows);
    let scale = 1.0 / (hd as f32).sqrt();
    let group = shape.group_size();
    let q_width = shape.q_width();
    for kvh in 0..shape.num_kv_heads {
        let cols = kvh * hd..(kvh + 1) * hd;
        let keys = PackedMatrix::<f32>::pack(m, hd, |r, dst| dst.copy_from_slice(&seq.k.row(r)[cols.clone()]));
        // Vᵀ `[head_dim, m]`, the left-hand side of `Oᵀ = Vᵀ Pᵀ`.
        let mut values_t = vec![0.0f32; hd * m];
        for j in 0..m {
            for (d, &v) in seq.v.row(j)[cols.clone()].iter().enumerate() {
                values_t[d * m + j] = v;
            }
        }
        for h in kvh * group..(kvh + 1) * group {
            let mut q_head = vec![0.0f32; n * hd];
            for (i, row) in q_head.chunks_exact_mut(hd).enumerate() {
                for (o, &x) in row.iter_mut().zip(&q.row(seq.q_start + i)[h * hd..(h + 1) * hd]) {
                    *o = x * scale;
                }
            }
            let mut scores = vec![0.0f32; n * m];
            matmul(kernels, &q_head, &keys, &mut scores, n);
            scores.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
                let visible = if causal { m - n + i + 1 } else { m };
                let max = row[..visible].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                for s in &mut row[..visible] {
                    *s = (*s - max).exp();
                }
                let inv = 1.0 / row[..visible].iter().sum::<f32>();
                for s in &mut row[..visible] {
                    *s *= inv;
                }
                row[visible..].fill(0.0);
            });
            // P packed as the matmul's right-hand side (`n` rows: many slabs to run in
            // parallel), then `Oᵀ [head_dim, n]` transposed into place.
            let probs = PackedMatrix::<f32>::pack(n, m, |r, dst| dst.copy_from_slice(&scores[r * m..(r + 1) * m]));
            let mut heads_out_t = vec![0.0f32; hd * n];
            matmul(kernels, &values_t, &probs, &mut heads_out_t, hd);
            for i in 0..n {
                let at = (seq.q_start + i) * q_width + h * hd;
                for (d, o) in out.data[at..at + hd].iter_mut().enumerate() {
                    *o = heads_out_t[d * n + i];
                }
            }
        }
    }
}

/// One query row of a dense attention (`attention_dense`).
pub(super) struct DenseRow<'a> {
    q_row: &'a [f32],
    keys: &'a CpuTensor,
    values: &'a CpuTensor,
    visible: usize,
    shape: AttentionShape,
    scale: f32,
}

per_path!(fn dense_row(row: &DenseRow<'_>, scores: &mut Vec<f32>, out_row: &mut [f32]) => dense_row_body);

#[inline(always)]
fn dense_row_body<A: MulAdd>(row: &DenseRow<'_>, scores: &mut Vec<f32>, out_row: &mut [f32]) {
    row.attend_body::<A>(scores, out_row)
}

impl DenseRow<'_> {
    #[inline(always)]
    fn attend_body<A: MulAdd>(&self, scores: &mut Vec<f32>, out_row: &mut [f32]) {
        let hd = self.shape.head_dim;
        let group = self.shape.group_size();
        let visible = self.visible;
        let mut q = [0.0f32; MAX_HEAD_DIM];
        for h in 0..self.shape.num_heads {
            let kvh = h / group;
            for (o, &x) in q[..hd].iter_mut().zip(&self.q_row[h * hd..(h + 1) * hd]) {
                *o = x * self.scale;
            }
            // One dot product per position over its contiguous key row: for a single
            // query (a decode step's cross-attention) this reads K once, in order.
            // (A plain loop, not an iterator closure: closures are separate functions,
            // compiled without this one's target features.)
            scores.clear();
            scores.resize(visible, 0.0);
            for (j, score) in scores.iter_mut().enumerate() {
                let key = &self.keys.row(j)[kvh * hd..(kvh + 1) * hd];
                let mut acc = [0.0f32; 16];
                for (qc, kc) in q[..hd].chunks(16).zip(key.chunks(16)) {
                    for ((a, x), y) in acc.iter_mut().zip(qc).zip(kc) {
                        *a = A::mul_add(*x, *y, *a);
                    }
                }
                *score = acc.iter().sum::<f32>();
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let out = &mut out_row[h * hd..(h + 1) * hd];
            for (j, &w) in scores.iter().enumerate() {
                let w = w / sum;
                for (o, v) in out.iter_mut().zip(&self.values.row(j)[kvh * hd..(kvh + 1) * hd]) {
                    *o = A::mul_add(w, *v, *o);
                }
            }
        }
    }
}

/// Block size whose scores get the register-blocked loop (the engine's default).
pub(super) const SCORE_LANES: usize = 16;

/// Scratch reused across the tokens of one rayon task.
#[derive(Default)]
pub(super) struct AttentionScratch {
    /// `[group, head_dim]` scaled queries of one KV head's group.
    q: Vec<f32>,
    /// `[group, visible]`
    scores: Vec<f32>,
    /// `[block_size]`
    acc: Vec<f32>,
}

per_path!(fn attend_token(
    token: &AttentionToken<'_>,
    k_pool: &[f32],
    v_pool: &[f32],
    scratch: &mut AttentionScratch,
    out_row: &mut [f32],
) => attend_token_body);

/// Writes `out_row [num_heads * head_dim]` (the same arithmetic on every path).
#[inline(always)]
fn attend_token_body<A: MulAdd>(
    token: &AttentionToken<'_>,
    k_pool: &[f32],
    v_pool: &[f32],
    scratch: &mut AttentionScratch,
    out_row: &mut [f32],
) {
    token.attend_body::<A>(k_pool, v_pool, scratch, out_row)
}

impl AttentionToken<'_> {
    #[inline(always)]
    fn attend_body<A: MulAdd>(
        &self,
        k_pool: &[f32],
        v_pool: &[f32],
        scratch: &mut AttentionScratch,
        out_row: &mut [f32],
    ) {
        let KvLayout {
            num_kv_heads,
            head_dim: hd,
            block_size: bs,
        } = self.layout;
        let group = out_row.len() / hd / num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let visible = self.visible;
        let num_blocks = visible.div_ceil(bs);
        scratch.q.resize(group * hd, 0.0);
        scratch.scores.resize(group * visible, 0.0);
        scratch.acc.resize(bs, 0.0);
        for kvh in 0..num_kv_heads {
            let heads = kvh * group..(kvh + 1) * group;
            for (q, v) in scratch.q.iter_mut().zip(&self.q_row[heads.start * hd..heads.end * hd]) {
                *q = v * scale;
            }
            // Scores: for each block, all its positions at once (K is stored [d][position]).
            for g in 0..group {
                let q = &scratch.q[g * hd..(g + 1) * hd];
                let scores = &mut scratch.scores[g * visible..(g + 1) * visible];
                if bs == SCORE_LANES {
                    self.scores_lanes::<A>(q, k_pool, kvh, scores);
                } else {
                    for (bi, &block) in self.block_table[..num_blocks].iter().enumerate() {
                        let keys = &k_pool[self.layout.k_offset(block, kvh)..][..hd * bs];
                        let acc = &mut scratch.acc[..bs];
                        acc.fill(0.0);
                        for (d, &qd) in q.iter().enumerate() {
                            for (a, k) in acc.iter_mut().zip(&keys[d * bs..(d + 1) * bs]) {
                                *a = A::mul_add(qd, *k, *a);
                            }
                        }
                        let n = bs.min(visible - bi * bs);
                        scores[bi * bs..bi * bs + n].copy_from_slice(&acc[..n]);
                    }
                }
            }
            for g in 0..group {
                let scores = &mut scratch.scores[g * visible..(g + 1) * visible];
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut out_row[(heads.start + g) * hd..][..hd];
                match hd {
                    64 => self.weighted_values::<A, 64>(scores, sum, v_pool, kvh, out),
                    128 => self.weighted_values::<A, 128>(scores, sum, v_pool, kvh, out),
                    _ => {
                        out.fill(0.0);
                        for (bi, &block) in self.block_table[..num_blocks].iter().enumerate() {
                            let values = &v_pool[self.layout.v_offset(block, kvh)..][..bs * hd];
                            let n = bs.min(visible - bi * bs);
                            for (j, value) in values.chunks_exact(hd).take(n).enumerate() {
                                let weight = scores[bi * bs + j] / sum;
                                for (o, v) in out.iter_mut().zip(value) {
                                    *o = A::mul_add(weight, *v, *o);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Scores for blocks of `SCORE_LANES` slots, four blocks at a time: the same FMA
    /// chain per position as the general loop (so results are identical), with the
    /// accumulators in registers and four chains in flight.
    #[inline(always)]
    fn scores_lanes<A: MulAdd>(&self, q: &[f32], k_pool: &[f32], kvh: usize, scores: &mut [f32]) {
        const L: usize = SCORE_LANES;
        let hd = q.len();
        let visible = scores.len();
        let blocks = &self.block_table[..visible.div_ceil(L)];
        for (quad, ids) in blocks.chunks(4).enumerate() {
            // Pad a short group with its first block; those lanes are not used.
            let key = |i: usize| &k_pool[self.layout.k_offset(ids[i.min(ids.len() - 1)], kvh)..][..hd * L];
            let keys = [key(0), key(1), key(2), key(3)];
            let mut acc = [[0.0f32; L]; 4];
            for (d, &qd) in q.iter().enumerate() {
                for (a, k) in acc.iter_mut().zip(&keys) {
                    let k: &[f32; L] = k[d * L..(d + 1) * L].try_into().expect("L lanes");
                    for j in 0..L {
                        a[j] = A::mul_add(qd, k[j], a[j]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(ids.len()) {
                let start = (quad * 4 + i) * L;
                let n = L.min(visible - start);
                scores[start..start + n].copy_from_slice(&a[..n]);
            }
        }
    }

    /// `out = Σ_p (scores[p] / sum) · V[p]` with a head size known at compile time, so the
    /// accumulator stays in registers (same operation order as the general loop).
    #[inline(always)]
    fn weighted_values<A: MulAdd, const HD: usize>(
        &self,
        scores: &[f32],
        sum: f32,
        v_pool: &[f32],
        kvh: usize,
        out: &mut [f32],
    ) {
        let bs = self.layout.block_size;
        let mut acc = [0.0f32; HD];
        for (bi, &block) in self.block_table[..scores.len().div_ceil(bs)].iter().enumerate() {
            let values = &v_pool[self.layout.v_offset(block, kvh)..][..bs * HD];
            let n = bs.min(scores.len() - bi * bs);
            for (j, value) in values.chunks_exact(HD).take(n).enumerate() {
                let weight = scores[bi * bs + j] / sum;
                let value: &[f32; HD] = value.try_into().expect("HD values");
                for d in 0..HD {
                    acc[d] = A::mul_add(weight, value[d], acc[d]);
                }
            }
        }
        out.copy_from_slice(&acc);
    }
}

pub(super) fn attention(
    kernels: CpuKernels,
    qkv: &CpuTensor,
    cache: &CpuKvCache,
    layer: usize,
    batch: &ForwardBatch,
    shape: AttentionShape,
) -> CpuTensor {
    let (k_pool, v_pool) = (&cache.k[layer], &cache.v[layer]);
    let layout = KvLayout::of(&cache.shape);
    assert_eq!(
        batch.block_size, layout.block_size,
        "attention: batch and cache block sizes differ"
    );
    let q_width = shape.q_width();
    let mut out = CpuTensor::zeros(qkv.rows, q_width);
    let mut token_seq = vec![0usize; qkv.rows];
    for (s, seq) in batch.seqs.iter().enumerate() {
        token_seq[seq.query_start..seq.query_start + seq.query_len].fill(s);
    }
    out.data
        .par_chunks_mut(q_width)
        .enumerate()
        .for_each_init(AttentionScratch::default, |scratch, (t, out_row)| {
            let seq = &batch.seqs[token_seq[t]];
            let token = AttentionToken {
                q_row: &qkv.row(t)[..q_width],
                // Causal: the i-th new token sees everything before it in the cache.
                visible: seq.context_len - seq.query_len + (t - seq.query_start) + 1,
                block_table: &seq.block_table,
                layout,
            };
            attend_token(kernels, &token, k_pool, v_pool, scratch, out_row);
        });
    out
}

pub(super) fn attention_dense(
    kernels: CpuKernels,
    q: &CpuTensor,
    seqs: &[DenseAttention<'_, CpuTensor>],
    shape: AttentionShape,
    causal: bool,
) -> CpuTensor {
    let hd = shape.head_dim;
    let q_width = shape.q_width();
    crate::backend::check_dense_attention((q.rows, q.cols), seqs, shape, causal, |t| (t.rows, t.cols));
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = CpuTensor::zeros(q.rows, q_width);
    // Long query runs (an encoder's) as two matmuls per head; the rest row by row.
    let (long, short): (Vec<&DenseAttention<'_, CpuTensor>>, Vec<&DenseAttention<'_, CpuTensor>>) =
        seqs.iter().partition(|s| s.q_len >= DENSE_MATMUL_MIN_QUERIES);
    for seq in long {
        dense_attention_matmul(kernels, q, seq, shape, causal, &mut out);
    }
    if short.is_empty() {
        return out;
    }
    let seqs = short;
    let mut token_seq = vec![usize::MAX; q.rows];
    for (i, s) in seqs.iter().enumerate() {
        token_seq[s.q_start..s.q_start + s.q_len].fill(i);
    }
    out.data
        .par_chunks_mut(q_width)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (t, out_row)| {
            let Some(seq) = seqs.get(token_seq[t]) else { return };
            let m = seq.k.rows;
            let row = DenseRow {
                q_row: q.row(t),
                keys: seq.k,
                values: seq.v,
                visible: if causal {
                    m - seq.q_len + (t - seq.q_start) + 1
                } else {
                    m
                },
                shape,
                scale,
            };
            dense_row(kernels, &row, scores, out_row);
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;

    /// Long query runs (matmul form) and short ones (row by row) in one call, GQA,
    /// causal and not, against a float64 reference.
    #[test]
    fn dense_attention_both_paths_match_a_reference() {
        let b = CpuBackend::default();
        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let values = |n: usize, cols: usize, seed: u32| {
            let data = (0..n * cols)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            CpuTensor::new(data, n, cols)
        };
        let q = values(40 + 3, 32, 1);
        let (k1, v1) = (values(50, 16, 2), values(50, 16, 3));
        let (k2, v2) = (values(7, 16, 4), values(7, 16, 5));
        for causal in [false, true] {
            let seqs = [
                DenseAttention {
                    q_start: 0,
                    q_len: 40,
                    k: &k1,
                    v: &v1,
                },
                DenseAttention {
                    q_start: 40,
                    q_len: 3,
                    k: &k2,
                    v: &v2,
                },
            ];
            let out = b.attention_dense(&q, &seqs, shape, causal);
            for s in &seqs {
                for i in 0..s.q_len {
                    let t = s.q_start + i;
                    let m = s.k.rows;
                    let visible = if causal { m - s.q_len + i + 1 } else { m };
                    for h in 0..4 {
                        let kvh = h / 2;
                        let score = |j: usize| -> f64 {
                            (0..8)
                                .map(|d| q.row(t)[h * 8 + d] as f64 * s.k.row(j)[kvh * 8 + d] as f64)
                                .sum::<f64>()
                                / 8f64.sqrt()
                        };
                        let z: f64 = (0..visible).map(|j| score(j).exp()).sum();
                        for d in 0..8 {
                            let want: f64 = (0..visible)
                                .map(|j| score(j).exp() / z * s.v.row(j)[kvh * 8 + d] as f64)
                                .sum();
                            let got = out.row(t)[h * 8 + d] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "causal {causal} row {t} head {h}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dense_attention_is_softmax_attention() {
        let b = CpuBackend::default();
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let q = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 1.0], 2, 4);
        let k = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, 2);
        let v = CpuTensor::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2);
        for causal in [false, true] {
            let out = b.attention_dense(
                &q,
                &[DenseAttention {
                    q_start: 0,
                    q_len: 2,
                    k: &k,
                    v: &v,
                }],
                shape,
                causal,
            );
            for t in 0..2 {
                let visible = if causal { 3 - 2 + t + 1 } else { 3 };
                for h in 0..2 {
                    let qh = &q.row(t)[h * 2..h * 2 + 2];
                    let s: Vec<f32> = (0..visible)
                        .map(|j| (qh[0] * k.row(j)[0] + qh[1] * k.row(j)[1]) / 2f32.sqrt())
                        .collect();
                    let z: f32 = s.iter().map(|x| x.exp()).sum();
                    for d in 0..2 {
                        let want: f32 = (0..visible).map(|j| s[j].exp() / z * v.row(j)[d]).sum();
                        assert!((out.row(t)[h * 2 + d] - want).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
