//! The pure-Rust backend: f32 compute over weights converted from bf16/f16/f32 at load,
//! parallel over rows with rayon. It is the reference every GPU kernel is tested against,
//! so each op is written to be obviously right first and fast second.

mod matmul;

pub use matmul::{matmul_transposed, Bf16, PackedMatrix, WeightElem};

use rayon::prelude::*;

use super::{AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape, WeightDtype, MAX_HEAD_DIM};
use crate::loader::{Dtype, TensorView};

/// A row-major `[rows, cols]` f32 activation.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "CpuTensor: {} values for [{rows}, {cols}]",
            data.len()
        );
        CpuTensor { data, rows, cols }
    }

    pub fn zeros(rows: usize, cols: usize) -> Self {
        CpuTensor::new(vec![0.0; rows * cols], rows, cols)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Parameter storage. Matrices are packed for the matmul kernel; those from bf16
/// checkpoints stay bf16 (half the bytes to stream per decode step; widening to f32 is
/// exact). Vectors (norm weights, biases, frequencies) are f32.
#[derive(Debug, Clone)]
pub enum WeightValues {
    Vector(Vec<f32>),
    MatrixF32(PackedMatrix<f32>),
    MatrixBf16(PackedMatrix<Bf16>),
}

/// A parameter and its checkpoint shape (`[out, in]` for matrices).
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub values: WeightValues,
    pub shape: Vec<usize>,
}

impl CpuWeight {
    fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
    fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
    /// The values of a vector weight.
    fn f32s(&self) -> &[f32] {
        match &self.values {
            WeightValues::Vector(v) => v,
            _ => panic!("weight {:?} is a matrix where a vector was expected", self.shape),
        }
    }

    fn from_views(views: &[TensorView<'_>], dtype: WeightDtype) -> CpuWeight {
        let cols = views[0].shape[1..].iter().product::<usize>();
        let rows: usize = views.iter().map(|v| v.shape[0]).sum();
        for v in views {
            assert_eq!(
                v.shape[1..].iter().product::<usize>(),
                cols,
                "stacked weight `{}` has other columns",
                v.name
            );
        }
        if views.len() == 1 && views[0].shape.len() != 2 {
            return CpuWeight {
                values: WeightValues::Vector(views[0].to_f32_vec()),
                shape: views[0].shape.to_vec(),
            };
        }
        // Row r of the stack: which view, and which row inside it.
        let starts: Vec<usize> = views
            .iter()
            .scan(0, |acc, v| {
                let start = *acc;
                *acc += v.shape[0];
                Some(start)
            })
            .collect();
        let locate = |r: usize| {
            let i = starts.partition_point(|&s| s <= r) - 1;
            let bytes = views[i].dtype.size_bytes() * cols;
            (
                &views[i],
                &views[i].bytes[(r - starts[i]) * bytes..(r - starts[i] + 1) * bytes],
            )
        };
        let all_bf16 = views.iter().all(|v| v.dtype == Dtype::BF16);
        let values = if all_bf16 && dtype != WeightDtype::F32 {
            WeightValues::MatrixBf16(PackedMatrix::pack(rows, cols, |r, dst| {
                for (d, b) in dst.iter_mut().zip(locate(r).1.chunks_exact(2)) {
                    *d = Bf16(u16::from_le_bytes([b[0], b[1]]));
                }
            }))
        } else if dtype == WeightDtype::Bf16 {
            // Rounded to nearest even, as torch's `.to(torch.bfloat16)`.
            WeightValues::MatrixBf16(PackedMatrix::pack(rows, cols, |r, dst| {
                let (view, bytes) = locate(r);
                let mut row = vec![0.0f32; cols];
                view.dtype.write_f32(bytes, &mut row);
                for (d, &x) in dst.iter_mut().zip(&row) {
                    *d = Bf16(half::bf16::from_f32(x).to_bits());
                }
            }))
        } else {
            WeightValues::MatrixF32(PackedMatrix::pack(rows, cols, |r, dst| {
                let (view, bytes) = locate(r);
                view.dtype.write_f32(bytes, dst);
            }))
        };
        CpuWeight {
            values,
            shape: vec![rows, cols],
        }
    }
}

/// Where a block's keys and values live in a layer's pools. Keys are stored transposed
/// within a block, `[num_blocks][num_kv_heads][head_dim][block_size]`, so that one
/// query's scores over a block's positions are contiguous vector FMAs; values are
/// `[num_blocks][num_kv_heads][block_size][head_dim]`.
#[derive(Debug, Clone, Copy)]
struct KvLayout {
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl KvLayout {
    fn of(shape: &KvCacheShape) -> Self {
        KvLayout {
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            block_size: shape.block_size,
        }
    }
    fn k_offset(&self, block: u32, kv_head: usize) -> usize {
        (block as usize * self.num_kv_heads + kv_head) * self.head_dim * self.block_size
    }
    fn v_offset(&self, block: u32, kv_head: usize) -> usize {
        (block as usize * self.num_kv_heads + kv_head) * self.block_size * self.head_dim
    }
}

/// Per layer, the K and V pools (see `KvLayout`).
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    /// How matrices are kept (decided at upload).
    pub weights: WeightDtype,
}

impl CpuBackend {
    pub fn with_weights(weights: WeightDtype) -> Self {
        CpuBackend { weights }
    }
}

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
fn layer_norm_row(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, v), w), b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * inv * w + b;
    }
}

/// `erf`, to about 1e-7 absolute (Abramowitz & Stegun 7.1.26, evaluated in f64).
#[inline]
fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2` (torch's `nn.GELU()`).
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Rotate-half rotary embedding of one head in place (HF's `apply_rotary_pos_emb`):
/// pairs are `(x[i], x[i + d/2])`.
#[inline]
fn rotate_head(head: &mut [f32], cos_sin: &[(f32, f32)]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for ((a, b), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin) {
        let (x1, x2) = (*a, *b);
        *a = x1 * cos - x2 * sin;
        *b = x2 * cos + x1 * sin;
    }
}

/// One query token's attention over its sequence's cached keys and values.
///
/// Every token is computed the same way whatever else is in the batch or however its
/// prompt was chunked (each score is one FMA chain over the head dimension, each output
/// one FMA chain over positions, in a fixed order), so greedy results do not depend on
/// batch composition.
struct AttentionToken<'a> {
    /// `[num_heads * head_dim]`
    q_row: &'a [f32],
    /// Cached positions this token attends to: `0..visible`.
    visible: usize,
    block_table: &'a [u32],
    layout: KvLayout,
}

/// Query runs at least this long take the matmul form of `attention_dense`.
const DENSE_MATMUL_MIN_QUERIES: usize = 16;

/// One sequence of `attention_dense` as matmuls, head by head: `S = Q Kᵀ` (scaled), a
/// row softmax (causal positions masked), `Oᵀ = Vᵀ Pᵀ`, written to `out`'s rows and the
/// head's columns. Streams K and V once per head instead of once per query.
fn dense_attention_matmul(
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
            matmul_transposed(&q_head, &keys, &mut scores, n);
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
            matmul_transposed(&values_t, &probs, &mut heads_out_t, hd);
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
struct DenseRow<'a> {
    q_row: &'a [f32],
    keys: &'a CpuTensor,
    values: &'a CpuTensor,
    visible: usize,
    shape: AttentionShape,
    scale: f32,
}

impl DenseRow<'_> {
    /// Compiled for AVX-512 where the CPU has it, like `AttentionToken::attend`
    /// (without it `mul_add` is a libm call per element).
    fn attend(&self, scores: &mut Vec<f32>, out_row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matmul::has_avx512() {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { self.attend_avx512(scores, out_row) };
        }
        self.attend_body(scores, out_row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn attend_avx512(&self, scores: &mut Vec<f32>, out_row: &mut [f32]) {
        self.attend_body(scores, out_row)
    }

    #[inline(always)]
    fn attend_body(&self, scores: &mut Vec<f32>, out_row: &mut [f32]) {
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
            // compiled without this one's AVX-512, where `mul_add` is a libm call.)
            scores.clear();
            scores.resize(visible, 0.0);
            for (j, score) in scores.iter_mut().enumerate() {
                let key = &self.keys.row(j)[kvh * hd..(kvh + 1) * hd];
                let mut acc = [0.0f32; 16];
                for (qc, kc) in q[..hd].chunks(16).zip(key.chunks(16)) {
                    for ((a, x), y) in acc.iter_mut().zip(qc).zip(kc) {
                        *a = x.mul_add(*y, *a);
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
                    *o = w.mul_add(*v, *o);
                }
            }
        }
    }
}

/// Block size whose scores get the register-blocked loop (the engine's default).
const SCORE_LANES: usize = 16;

/// Scratch reused across the tokens of one rayon task.
#[derive(Default)]
struct AttentionScratch {
    /// `[group, head_dim]` scaled queries of one KV head's group.
    q: Vec<f32>,
    /// `[group, visible]`
    scores: Vec<f32>,
    /// `[block_size]`
    acc: Vec<f32>,
}

impl AttentionToken<'_> {
    /// Writes `out_row [num_heads * head_dim]`. Compiled for AVX-512 where the CPU has
    /// it (the inner loops vectorize; the arithmetic is the same either way).
    fn attend(&self, k_pool: &[f32], v_pool: &[f32], scratch: &mut AttentionScratch, out_row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matmul::has_avx512() {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { self.attend_avx512(k_pool, v_pool, scratch, out_row) };
        }
        self.attend_body(k_pool, v_pool, scratch, out_row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn attend_avx512(
        &self,
        k_pool: &[f32],
        v_pool: &[f32],
        scratch: &mut AttentionScratch,
        out_row: &mut [f32],
    ) {
        self.attend_body(k_pool, v_pool, scratch, out_row)
    }

    #[inline(always)]
    fn attend_body(&self, k_pool: &[f32], v_pool: &[f32], scratch: &mut AttentionScratch, out_row: &mut [f32]) {
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
                    self.scores_lanes(q, k_pool, kvh, scores);
                } else {
                    for (bi, &block) in self.block_table[..num_blocks].iter().enumerate() {
                        let keys = &k_pool[self.layout.k_offset(block, kvh)..][..hd * bs];
                        let acc = &mut scratch.acc[..bs];
                        acc.fill(0.0);
                        for (d, &qd) in q.iter().enumerate() {
                            for (a, k) in acc.iter_mut().zip(&keys[d * bs..(d + 1) * bs]) {
                                *a = qd.mul_add(*k, *a);
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
                    64 => self.weighted_values::<64>(scores, sum, v_pool, kvh, out),
                    128 => self.weighted_values::<128>(scores, sum, v_pool, kvh, out),
                    _ => {
                        out.fill(0.0);
                        for (bi, &block) in self.block_table[..num_blocks].iter().enumerate() {
                            let values = &v_pool[self.layout.v_offset(block, kvh)..][..bs * hd];
                            let n = bs.min(visible - bi * bs);
                            for (j, value) in values.chunks_exact(hd).take(n).enumerate() {
                                let weight = scores[bi * bs + j] / sum;
                                for (o, v) in out.iter_mut().zip(value) {
                                    *o = weight.mul_add(*v, *o);
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
    fn scores_lanes(&self, q: &[f32], k_pool: &[f32], kvh: usize, scores: &mut [f32]) {
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
                        a[j] = qd.mul_add(k[j], a[j]);
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
    fn weighted_values<const HD: usize>(&self, scores: &[f32], sum: f32, v_pool: &[f32], kvh: usize, out: &mut [f32]) {
        let bs = self.layout.block_size;
        let mut acc = [0.0f32; HD];
        for (bi, &block) in self.block_table[..scores.len().div_ceil(bs)].iter().enumerate() {
            let values = &v_pool[self.layout.v_offset(block, kvh)..][..bs * HD];
            let n = bs.min(scores.len() - bi * bs);
            for (j, value) in values.chunks_exact(HD).take(n).enumerate() {
                let weight = scores[bi * bs + j] / sum;
                let value: &[f32; HD] = value.try_into().expect("HD values");
                for d in 0..HD {
                    acc[d] = weight.mul_add(value[d], acc[d]);
                }
            }
        }
        out.copy_from_slice(&acc);
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, view: &TensorView<'_>) -> CpuWeight {
        CpuWeight::from_views(std::slice::from_ref(view), self.weights)
    }

    fn weight_stacked(&self, views: &[TensorView<'_>]) -> CpuWeight {
        CpuWeight::from_views(views, self.weights)
    }

    fn weight_from_f32(&self, values: Vec<f32>) -> CpuWeight {
        let len = values.len();
        CpuWeight {
            values: WeightValues::Vector(values),
            shape: vec![len],
        }
    }

    fn kv_bytes_per_element(&self) -> usize {
        std::mem::size_of::<f32>()
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> CpuKvCache {
        let per_layer = shape.elements_per_layer();
        CpuKvCache {
            shape,
            k: (0..shape.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..shape.num_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    fn embedding(&self, table: &CpuWeight, token_ids: &[u32]) -> CpuTensor {
        let hidden = table.cols();
        let mut out = CpuTensor::zeros(token_ids.len(), hidden);
        for (row, &id) in out.data.chunks_exact_mut(hidden).zip(token_ids) {
            let id = id as usize;
            assert!(id < table.rows(), "embedding: token id {id} >= vocab {}", table.rows());
            match &table.values {
                WeightValues::MatrixF32(m) => m.row_f32(id, row),
                WeightValues::MatrixBf16(m) => m.row_f32(id, row),
                WeightValues::Vector(_) => panic!("embedding table must be a matrix"),
            }
        }
        out
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
        let mut out = CpuTensor::zeros(x.rows, x.cols);
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(o, row)| rms_norm_row(row, weight.f32s(), eps, o));
        out
    }

    fn add_rms_norm(&self, residual: &mut CpuTensor, delta: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
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

    fn linear(&self, x: &CpuTensor, weight: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
        let (out_features, in_features) = (weight.rows(), weight.cols());
        assert_eq!(
            x.cols, in_features,
            "linear: x has {} columns, weight {:?}",
            x.cols, weight.shape
        );
        let mut out = CpuTensor::zeros(x.rows, out_features);
        match &weight.values {
            WeightValues::MatrixF32(w) => matmul_transposed(&x.data, w, &mut out.data, x.rows),
            WeightValues::MatrixBf16(w) => matmul_transposed(&x.data, w, &mut out.data, x.rows),
            WeightValues::Vector(_) => panic!("linear: weight {:?} is not a matrix", weight.shape),
        }
        if let Some(bias) = bias {
            for row in out.data.chunks_exact_mut(out_features) {
                for (o, b) in row.iter_mut().zip(bias.f32s()) {
                    *o += b;
                }
            }
        }
        out
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> CpuTensor {
        let inter = gate_up.cols / 2;
        let mut out = CpuTensor::zeros(gate_up.rows, inter);
        out.data
            .par_chunks_mut(inter)
            .zip(gate_up.data.par_chunks(gate_up.cols))
            .for_each(|(o, row)| {
                let (gate, up) = row.split_at(inter);
                for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        out
    }

    fn qk_norm(
        &self,
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

    fn rotary(&self, qkv: &mut CpuTensor, positions: &[u32], inv_freq: &CpuWeight, shape: AttentionShape) {
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

    fn rotary_sections(
        &self,
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

    fn write_kv(
        &self,
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

    fn attention(
        &self,
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
        out.data.par_chunks_mut(q_width).enumerate().for_each_init(
            AttentionScratch::default,
            |scratch, (t, out_row)| {
                let seq = &batch.seqs[token_seq[t]];
                let token = AttentionToken {
                    q_row: &qkv.row(t)[..q_width],
                    // Causal: the i-th new token sees everything before it in the cache.
                    visible: seq.context_len - seq.query_len + (t - seq.query_start) + 1,
                    block_table: &seq.block_table,
                    layout,
                };
                token.attend(k_pool, v_pool, scratch, out_row);
            },
        );
        out
    }

    fn attention_dense(
        &self,
        q: &CpuTensor,
        seqs: &[DenseAttention<'_, CpuTensor>],
        shape: AttentionShape,
        causal: bool,
    ) -> CpuTensor {
        let hd = shape.head_dim;
        let q_width = shape.q_width();
        super::check_dense_attention((q.rows, q.cols), seqs, shape, causal, |t| (t.rows, t.cols));
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = CpuTensor::zeros(q.rows, q_width);
        // Long query runs (an encoder's) as two matmuls per head; the rest row by row.
        let (long, short): (Vec<&DenseAttention<'_, CpuTensor>>, Vec<&DenseAttention<'_, CpuTensor>>) =
            seqs.iter().partition(|s| s.q_len >= DENSE_MATMUL_MIN_QUERIES);
        for seq in long {
            dense_attention_matmul(q, seq, shape, causal, &mut out);
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
                row.attend(scores, out_row);
            });
        out
    }

    fn upload(&self, values: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor::new(values, rows, cols)
    }

    fn layer_norm(&self, x: &CpuTensor, weight: &CpuWeight, bias: &CpuWeight, eps: f32) -> CpuTensor {
        let mut out = CpuTensor::zeros(x.rows, x.cols);
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(o, row)| layer_norm_row(row, weight.f32s(), bias.f32s(), eps, o));
        out
    }

    fn add_layer_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuWeight,
        bias: &CpuWeight,
        eps: f32,
    ) -> CpuTensor {
        self.add(residual, delta);
        self.layer_norm(residual, weight, bias, eps)
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn gelu(&self, x: &mut CpuTensor) {
        x.data.par_iter_mut().for_each(|v| *v = gelu(*v));
    }

    fn im2col_1d(&self, x: &CpuTensor, kernel: usize, stride: usize, pad: usize) -> CpuTensor {
        let (len, ch) = (x.rows, x.cols);
        assert!(len + 2 * pad >= kernel && stride > 0, "im2col_1d: input too short");
        let out_len = (len + 2 * pad - kernel) / stride + 1;
        let mut out = CpuTensor::zeros(out_len, ch * kernel);
        out.data.par_chunks_mut(ch * kernel).enumerate().for_each(|(p, row)| {
            for t in 0..kernel {
                let Some(src) = (p * stride + t).checked_sub(pad).filter(|&i| i < len) else {
                    continue;
                };
                for (c, &v) in x.row(src).iter().enumerate() {
                    row[c * kernel + t] = v;
                }
            }
        });
        out
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        CpuTensor::new(data, rows.len(), x.cols)
    }

    fn argmax_rows(&self, x: &CpuTensor, rows: &[usize]) -> Vec<u32> {
        rows.iter().map(|&r| super::argmax(x.row(r))).collect()
    }

    fn draw_rows(&self, x: &CpuTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
        rows.iter()
            .zip(temperatures.iter().zip(uniforms))
            .map(|(&r, (&t, &u))| super::draw(x.row(r), t, u))
            .collect()
    }

    fn to_host(&self, x: CpuTensor) -> (Vec<f32>, usize, usize) {
        (x.data, x.rows, x.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_known_values() {
        // torch.nn.functional.gelu at these points.
        for (x, want) in [
            (-3.0f32, -0.004_049_74),
            (-1.0, -0.158_655_25),
            (0.0, 0.0),
            (0.5, 0.345_731_14),
            (2.0, 1.954_499_7),
        ] {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {} not {want}", gelu(x));
        }
    }

    #[test]
    fn im2col_and_linear_make_a_convolution() {
        let b = CpuBackend::default();
        // x: 5 steps of 2 channels; kernel 3, stride 2, pad 1 -> 3 outputs.
        let x = CpuTensor::new((0..10).map(|v| v as f32).collect(), 5, 2);
        let cols = b.im2col_1d(&x, 3, 2, 1);
        assert_eq!((cols.rows, cols.cols), (3, 6));
        // Output 0 reads steps -1, 0, 1: channel 0 -> [0, 0, 2], channel 1 -> [0, 1, 3].
        assert_eq!(cols.row(0), &[0.0, 0.0, 2.0, 0.0, 1.0, 3.0]);
        assert_eq!(cols.row(2), &[6.0, 8.0, 0.0, 7.0, 9.0, 0.0]);
    }

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

    /// `--dtype`: an f32 matrix kept as bf16 is rounded to nearest even (as torch's
    /// `.to(torch.bfloat16)`), a bf16 one kept as f32 is exact, and `auto` keeps each.
    #[test]
    fn weight_dtype_decides_how_matrices_are_kept() {
        // Two exact halfway cases between bf16 neighbours (they round to the even one).
        let values = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -3.3, 1e-3, 7.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let rounded: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let bf16_bytes: Vec<u8> = rounded
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let view = |dtype, bytes| TensorView {
            name: "w",
            path: std::path::Path::new("w.safetensors"),
            dtype,
            shape: &[2, 3],
            bytes,
        };
        // x = identity rows, so `linear` gives back the weight's columns.
        let x = CpuTensor::new(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 3);
        let run = |dtype: WeightDtype, v: &TensorView<'_>| {
            let backend = CpuBackend::with_weights(dtype);
            let w = backend.weight(v);
            let kept_bf16 = matches!(w.values, WeightValues::MatrixBf16(_));
            let (out, _, _) = backend.to_host(backend.linear(&x, &w, None));
            // out[i][j] = w[j][i]
            let w_back: Vec<f32> = (0..2)
                .flat_map(|j| (0..3).map(move |i| (i, j)))
                .map(|(i, j)| out[i * 2 + j])
                .collect();
            (kept_bf16, w_back)
        };
        let f32_view = view(Dtype::F32, &f32_bytes);
        let bf16_view = view(Dtype::BF16, &bf16_bytes);
        assert_eq!(run(WeightDtype::Auto, &f32_view), (false, values.to_vec()));
        assert_eq!(run(WeightDtype::Bf16, &f32_view), (true, rounded.clone()));
        assert_eq!(run(WeightDtype::Auto, &bf16_view), (true, rounded.clone()));
        assert_eq!(run(WeightDtype::F32, &bf16_view), (false, rounded));
    }
}
