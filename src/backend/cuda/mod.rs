//! The CUDA backend (feature `cuda`): the kernels of `kernels/*.cu`, compiled by
//! build.rs and embedded as fatbins, launched through cudarc on one stream; GEMMs
//! through cuBLAS. Activations are f32 `[rows, cols]` device buffers, as on the CPU;
//! matrices stay bf16 (inputs rounded to bf16 for the GEMM, f32 accumulation and
//! output) or f32 (f32 GEMM, no TF32), vectors are f32. The KV pools are bf16 (f32 with
//! `--dtype float32`), laid out `[slot, num_kv_heads * head_dim]`; attention reads them
//! into f32 arithmetic.
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading): a binary built
//! with the feature still runs on a machine without them, and [`CudaBackend::new`] says
//! what is missing. A CUDA error inside an op (out of memory mid-step, a fault) panics
//! with the op's name: the engine's caller turns that into failed requests.

// AUTO-IMPORTS
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use super::{AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape, WeightDtype};
use crate::loader::TensorView;
use device::ok;

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

#[macro_use]
mod device;
mod activation;
mod attention;
mod layout;
mod matmul;
mod norm;
mod rotary;
mod sampling;
mod weights;

pub use attention::{AttentionSplits, PagedAttention};
pub use device::{available, CudaError};
pub use sampling::RowSampler;

/// A row-major `[rows, cols]` f32 activation on the device.
pub struct CudaTensor {
    buf: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A parameter on the device. Matrices keep their `[out, in]` shape.
pub enum CudaWeight {
    Vector(CudaSlice<f32>),
    F32 {
        buf: CudaSlice<f32>,
        rows: usize,
        cols: usize,
    },
    Bf16 {
        buf: CudaSlice<u16>,
        rows: usize,
        cols: usize,
    },
}

impl CudaWeight {
    fn dims(&self) -> (usize, usize) {
        match self {
            CudaWeight::Vector(b) => (1, b.len()),
            CudaWeight::F32 { rows, cols, .. } | CudaWeight::Bf16 { rows, cols, .. } => (*rows, *cols),
        }
    }
}

/// One layer's K or V pool: f32 for `--dtype float32`, else bf16.
enum KvPool {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// The paged K and V pools of every layer.
pub struct CudaKvCache {
    shape: KvCacheShape,
    k: Vec<KvPool>,
    v: Vec<KvPool>,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    weights: WeightDtype,
    device_name: String,
    sm_count: usize,
    /// Tests: every new buffer is filled with NaN bytes, so an output element a kernel
    /// fails to write shows up.
    poison: bool,
    /// Small index arrays uploaded this step (positions, slots, attention metadata),
    /// most recent last: every layer of a forward pass reads the same ones, and an
    /// upload from pageable memory waits for the stream, so each is uploaded once.
    uploads: Mutex<Vec<Upload>>,
    /// Which paged-attention kernel to take (`INFERD_CUDA_ATTENTION`, default auto).
    paged_attention: device::Setting<PagedAttention>,
    /// How attention splits the keys (`INFERD_CUDA_ATTENTION_SPLITS`, default by context).
    attention_splits: device::Setting<AttentionSplits>,
    /// Where `sample_rows` runs (`INFERD_CUDA_SAMPLING`, default the host).
    row_sampler: device::Setting<RowSampler>,
    _modules: Vec<Arc<CudaModule>>,
}

/// An index array on the host and its device copy.
type Upload = (Vec<u32>, Arc<CudaSlice<u32>>);

/// The CUDA backend of one device. Cheap to clone (shared state).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({}, {:?})", self.inner.device_name, self.inner.weights)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;

    type Weight = CudaWeight;

    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn synchronize(&self) {
        CudaBackend::synchronize(self)
    }

    fn weight(&self, view: &TensorView<'_>) -> CudaWeight {
        weights::weight(self, view)
    }

    fn weight_stacked(&self, views: &[TensorView<'_>]) -> CudaWeight {
        weights::weight_stacked(self, views)
    }

    fn weight_from_f32(&self, values: Vec<f32>) -> CudaWeight {
        weights::weight_from_f32(self, values)
    }

    fn kv_bytes_per_element(&self) -> usize {
        if self.kv_bf16() {
            2
        } else {
            4
        }
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> CudaKvCache {
        let n = shape.elements_per_layer().max(1);
        // Zeroed: a position read before it is written is finite.
        let what = "KV cache allocation";
        let pool = || {
            if self.kv_bf16() {
                KvPool::Bf16(ok(self.inner.stream.alloc_zeros::<u16>(n), what))
            } else {
                KvPool::F32(ok(self.inner.stream.alloc_zeros::<f32>(n), what))
            }
        };
        CudaKvCache {
            shape,
            k: (0..shape.num_layers).map(|_| pool()).collect(),
            v: (0..shape.num_layers).map(|_| pool()).collect(),
        }
    }

    fn embedding(&self, table: &CudaWeight, token_ids: &[u32]) -> CudaTensor {
        layout::embedding(self, table, token_ids)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
        norm::rms_norm(self, x, weight, eps)
    }

    fn add_rms_norm(&self, residual: &mut CudaTensor, delta: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
        norm::add_rms_norm(self, residual, delta, weight, eps)
    }

    fn linear(&self, x: &CudaTensor, weight: &CudaWeight, bias: Option<&CudaWeight>) -> CudaTensor {
        matmul::linear(self, x, weight, bias)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> CudaTensor {
        activation::silu_mul(self, gate_up)
    }

    fn qk_norm(
        &self,
        qkv: &mut CudaTensor,
        q_weight: &CudaWeight,
        k_weight: &CudaWeight,
        eps: f32,
        shape: AttentionShape,
    ) {
        norm::qk_norm(self, qkv, q_weight, k_weight, eps, shape)
    }

    fn rotary(&self, qkv: &mut CudaTensor, positions: &[u32], inv_freq: &CudaWeight, shape: AttentionShape) {
        rotary::rotary(self, qkv, positions, inv_freq, shape)
    }

    fn rotary_sections(
        &self,
        qkv: &mut CudaTensor,
        positions: &[[u32; 3]],
        sections: [usize; 3],
        inv_freq: &CudaWeight,
        shape: AttentionShape,
    ) {
        rotary::rotary_sections(self, qkv, positions, sections, inv_freq, shape)
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        qkv: &CudaTensor,
        slot_mapping: &[u32],
        shape: AttentionShape,
    ) {
        rotary::write_kv(self, cache, layer, qkv, slot_mapping, shape)
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        cache: &CudaKvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: AttentionShape,
    ) -> CudaTensor {
        attention::attention(self, qkv, cache, layer, batch, shape)
    }

    fn attention_dense(
        &self,
        q: &CudaTensor,
        seqs: &[DenseAttention<'_, CudaTensor>],
        shape: AttentionShape,
        causal: bool,
    ) -> CudaTensor {
        attention::attention_dense(self, q, seqs, shape, causal)
    }

    fn upload(&self, values: Vec<f32>, rows: usize, cols: usize) -> CudaTensor {
        layout::upload(self, values, rows, cols)
    }

    fn layer_norm(&self, x: &CudaTensor, weight: &CudaWeight, bias: &CudaWeight, eps: f32) -> CudaTensor {
        norm::layer_norm(self, x, weight, bias, eps)
    }

    fn add_layer_norm(
        &self,
        residual: &mut CudaTensor,
        delta: &CudaTensor,
        weight: &CudaWeight,
        bias: &CudaWeight,
        eps: f32,
    ) -> CudaTensor {
        norm::add_layer_norm(self, residual, delta, weight, bias, eps)
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        activation::add(self, x, y)
    }

    fn gelu(&self, x: &mut CudaTensor) {
        activation::gelu(self, x)
    }

    fn im2col_1d(&self, x: &CudaTensor, kernel: usize, stride: usize, pad: usize) -> CudaTensor {
        layout::im2col_1d(self, x, kernel, stride, pad)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        layout::gather_rows(self, x, rows)
    }

    fn argmax_rows(&self, x: &CudaTensor, rows: &[usize]) -> Vec<u32> {
        sampling::argmax_rows(self, x, rows)
    }

    fn draw_rows(&self, x: &CudaTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
        sampling::draw_rows(self, x, rows, temperatures, uniforms)
    }

    fn sample_rows(
        &self,
        x: &CudaTensor,
        rows: &[usize],
        sampling: &[&crate::backend::RowSampling],
    ) -> Vec<crate::backend::Sampled> {
        sampling::sample_rows(self, x, rows, sampling)
    }

    fn to_host(&self, x: CudaTensor) -> (Vec<f32>, usize, usize) {
        layout::to_host(self, x)
    }
}
