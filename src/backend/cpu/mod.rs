//! The pure-Rust backend: f32 compute over weights converted from bf16/f16/f32 at load,
//! parallel over rows with rayon. It is the reference every GPU kernel is tested against,
//! so each op is written to be obviously right first and fast second.

mod activation;
mod attention;
mod kernels;
mod layout;
mod matmul;
mod norm;
mod rotary;
mod sampling;
mod weights;

pub use activation::gelu;
pub use kernels::CpuKernels;
pub use matmul::{Bf16, PackedMatrix, WeightElem};
pub use norm::rms_norm_row;
pub use weights::{CpuWeight, WeightValues};

use super::{AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape, WeightDtype};
use crate::loader::TensorView;

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

#[derive(Debug, Clone)]
pub struct CpuBackend {
    /// How matrices are kept (decided at upload).
    pub weights: WeightDtype,
    /// The instruction set of the hot loops (`CpuKernels::selected` unless chosen).
    pub kernels: CpuKernels,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::with_weights(WeightDtype::default())
    }
}

impl CpuBackend {
    pub fn with_weights(weights: WeightDtype) -> Self {
        CpuBackend {
            weights,
            kernels: CpuKernels::selected(),
        }
    }

    /// The same backend on other kernels (tests compare the paths in one process).
    pub fn with_kernels(self, kernels: CpuKernels) -> Self {
        CpuBackend { kernels, ..self }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    type Weight = CpuWeight;

    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn run_step<R: Send>(step: impl FnOnce() -> R + Send) -> R {
        // `rayon::scope` runs its body on a pool worker (the caller blocks until it is
        // done); the step's parallel loops then split from that worker.
        rayon::scope(|_| step())
    }

    fn weight(&self, view: &TensorView<'_>) -> CpuWeight {
        weights::weight(self, view)
    }

    fn weight_stacked(&self, views: &[TensorView<'_>]) -> CpuWeight {
        weights::weight_stacked(self, views)
    }

    fn weight_from_f32(&self, values: Vec<f32>) -> CpuWeight {
        weights::weight_from_f32(values)
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
        layout::embedding(table, token_ids)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
        norm::rms_norm(x, weight, eps)
    }

    fn add_rms_norm(&self, residual: &mut CpuTensor, delta: &CpuTensor, weight: &CpuWeight, eps: f32) -> CpuTensor {
        norm::add_rms_norm(residual, delta, weight, eps)
    }

    fn linear(&self, x: &CpuTensor, weight: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
        matmul::linear(self.kernels, x, weight, bias)
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> CpuTensor {
        activation::silu_mul(gate_up)
    }

    fn qk_norm(
        &self,
        qkv: &mut CpuTensor,
        q_weight: &CpuWeight,
        k_weight: &CpuWeight,
        eps: f32,
        shape: AttentionShape,
    ) {
        norm::qk_norm(qkv, q_weight, k_weight, eps, shape)
    }

    fn rotary(&self, qkv: &mut CpuTensor, positions: &[u32], inv_freq: &CpuWeight, shape: AttentionShape) {
        rotary::rotary(qkv, positions, inv_freq, shape)
    }

    fn rotary_sections(
        &self,
        qkv: &mut CpuTensor,
        positions: &[[u32; 3]],
        sections: [usize; 3],
        inv_freq: &CpuWeight,
        shape: AttentionShape,
    ) {
        rotary::rotary_sections(qkv, positions, sections, inv_freq, shape)
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        qkv: &CpuTensor,
        slot_mapping: &[u32],
        shape: AttentionShape,
    ) {
        rotary::write_kv(cache, layer, qkv, slot_mapping, shape)
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: AttentionShape,
    ) -> CpuTensor {
        attention::attention(self.kernels, qkv, cache, layer, batch, shape)
    }

    fn attention_dense(
        &self,
        q: &CpuTensor,
        seqs: &[DenseAttention<'_, CpuTensor>],
        shape: AttentionShape,
        causal: bool,
    ) -> CpuTensor {
        attention::attention_dense(self.kernels, q, seqs, shape, causal)
    }

    fn upload(&self, values: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        layout::upload(values, rows, cols)
    }

    fn layer_norm(&self, x: &CpuTensor, weight: &CpuWeight, bias: &CpuWeight, eps: f32) -> CpuTensor {
        norm::layer_norm(x, weight, bias, eps)
    }

    fn add_layer_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuWeight,
        bias: &CpuWeight,
        eps: f32,
    ) -> CpuTensor {
        norm::add_layer_norm(self, residual, delta, weight, bias, eps)
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) {
        activation::add(x, y)
    }

    fn gelu(&self, x: &mut CpuTensor) {
        activation::gelu_in_place(x)
    }

    fn im2col_1d(&self, x: &CpuTensor, kernel: usize, stride: usize, pad: usize) -> CpuTensor {
        layout::im2col_1d(x, kernel, stride, pad)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        layout::gather_rows(x, rows)
    }

    fn argmax_rows(&self, x: &CpuTensor, rows: &[usize]) -> Vec<u32> {
        sampling::argmax_rows(x, rows)
    }

    fn draw_rows(&self, x: &CpuTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
        sampling::draw_rows(x, rows, temperatures, uniforms)
    }

    fn to_host(&self, x: CpuTensor) -> (Vec<f32>, usize, usize) {
        layout::to_host(x)
    }

    fn sample_rows(
        &self,
        x: &CpuTensor,
        rows: &[usize],
        sampling: &[&crate::backend::RowSampling],
    ) -> Vec<crate::backend::Sampled> {
        sampling::sample_rows(x, rows, sampling)
    }
}
