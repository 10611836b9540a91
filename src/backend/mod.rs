//! The backend trait: the fused ops a decoder needs, each backend owning its buffer
//! types. Models are written once against it; `cpu` is the numerical reference that
//! every GPU kernel is checked against.
//!
//! Attention always reads keys and values from the paged KV cache (written first by
//! `write_kv`), so prefill, chunked prefill, prefix reuse and decode are one op.

pub mod attention_plan;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod sampling;

pub use sampling::{argmax, draw, LogitEdit, RowSampling, Sampled, TokenLogprobs};

use crate::loader::TensorView;

/// How a backend's panic on running out of device memory begins (the model manager
/// reports such a load as out of memory).
pub const DEVICE_OUT_OF_MEMORY: &str = "CUDA out of memory";

/// Largest head size a backend must support (per-head scratch lives on the stack).
pub const MAX_HEAD_DIM: usize = 512;

/// Head layout of one attention layer. A fused `qkv` row is
/// `[num_heads * head_dim | num_kv_heads * head_dim | num_kv_heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
    /// Query heads sharing one KV head (GQA).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// How a backend keeps matrix weights (`--dtype`). Vectors (norms, biases) are always
/// f32; activations are computed in f32 whatever the weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As the checkpoint stores them: bf16 stays bf16, f16 and f32 become f32.
    #[default]
    Auto,
    Bf16,
    F32,
}

impl WeightDtype {
    /// The names transformers serve takes (torch dtype names, with or without
    /// `torch.`), and short forms. `float16` is refused by the caller with a reason.
    pub fn parse(name: &str) -> Result<WeightDtype, String> {
        match name.trim_start_matches("torch.") {
            "auto" => Ok(WeightDtype::Auto),
            "bfloat16" | "bf16" => Ok(WeightDtype::Bf16),
            "float32" | "float" | "fp32" | "f32" => Ok(WeightDtype::F32),
            "float16" | "half" | "fp16" | "f16" => Err(
                "float16 weights are not supported (the CPU backend keeps bf16 or f32): use --dtype bfloat16 or float32"
                    .into(),
            ),
            other => Err(format!("unknown --dtype `{other}` (auto, bfloat16 or float32)")),
        }
    }
}

/// `--device`: which backend runs the models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when one can be used, else the CPU.
    Auto,
    Cpu,
    /// `cuda` (device 0) or `cuda:N`.
    Cuda(usize),
}

impl DeviceChoice {
    /// `auto`, `cpu`, `cuda`, `cuda:N`, or a bare device number (as torch takes).
    pub fn parse(name: &str) -> Result<DeviceChoice, String> {
        let number = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| format!("--device {name}: `{n}` is not a device number"))
        };
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            d if d.starts_with("cuda:") => Ok(DeviceChoice::Cuda(number(&d[5..])?)),
            d if !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()) => Ok(DeviceChoice::Cuda(number(d)?)),
            d => Err(format!("--device {d}: unknown device (auto, cpu or cuda[:N])")),
        }
    }
}

/// The CPU backend on the process's kernels (an error if `INFERD_CPU_KERNELS` names a
/// path this CPU cannot run).
fn cpu_backend(weights: WeightDtype) -> Result<cpu::CpuBackend, String> {
    cpu::CpuKernels::from_env()?;
    Ok(cpu::CpuBackend::with_weights(weights))
}

/// The backend models run on, chosen once per process by `--device`.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu(cpu::CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBackend),
}

impl Device {
    /// Opens the chosen device. `auto` takes GPU 0 when the CUDA libraries and a device
    /// are there (a build with `--features cuda`), else the CPU, and says why in `note`.
    pub fn open(choice: &DeviceChoice, weights: WeightDtype, note: &mut dyn FnMut(&str)) -> Result<Device, String> {
        match choice {
            DeviceChoice::Cpu => Ok(Device::Cpu(cpu_backend(weights)?)),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(n) => cuda::CudaBackend::new(*n, weights)
                .map(Device::Cuda)
                .map_err(|e| format!("--device cuda:{n}: {e}")),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(n) => Err(format!(
                "--device cuda:{n}: this build of inferd has no CUDA backend (build with `--features cuda`); use --device cpu"
            )),
            DeviceChoice::Auto => {
                #[cfg(feature = "cuda")]
                match cuda::CudaBackend::new(0, weights) {
                    Ok(b) => return Ok(Device::Cuda(b)),
                    Err(e) => note(&format!("--device auto: no usable GPU ({e}); running on the CPU")),
                }
                #[cfg(not(feature = "cuda"))]
                let _ = &note;
                Ok(Device::Cpu(cpu_backend(weights)?))
            }
        }
    }

    /// Bytes of one element of this device's KV pools.
    pub fn kv_bytes_per_element(&self) -> usize {
        match self {
            Device::Cpu(b) => b.kv_bytes_per_element(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.kv_bytes_per_element(),
        }
    }

    /// `cpu`, or `cuda:N (device name)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => format!("cuda:{} ({})", b.ordinal(), b.device_name()),
        }
    }
}

/// Size of a paged KV cache: per layer, K and V are `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    pub fn elements_per_layer(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }
}

/// One sequence's share of a forward batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Which request the sequence belongs to (models with per-request state, such as
    /// an encoder's output, look it up by this).
    pub key: u64,
    /// First row of this sequence's tokens in the batch.
    pub query_start: usize,
    /// Number of new tokens this step (prompt chunk, or 1 for decode).
    pub query_len: usize,
    /// Tokens in the cache once this step's K/V are written (prefix + new).
    pub context_len: usize,
    /// KV block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// Everything a forward pass needs to know about the batch, as plain host data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// `[num_tokens]` token ids, sequences back to back.
    pub token_ids: Vec<u32>,
    /// `[num_tokens]` position of each token in its sequence.
    pub positions: Vec<u32>,
    /// `[num_tokens]` cache slot (`block * block_size + offset`) each token's K/V go to.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
    pub block_size: usize,
}

impl ForwardBatch {
    /// A batch of one sequence whose blocks are `block_table`, computing `new_tokens`
    /// after `num_cached` tokens already in the cache.
    pub fn single(new_tokens: &[u32], num_cached: usize, block_table: &[u32], block_size: usize) -> Self {
        let positions: Vec<u32> = (num_cached..num_cached + new_tokens.len()).map(|p| p as u32).collect();
        let slot_mapping = positions
            .iter()
            .map(|&p| {
                let slot = block_table[p as usize / block_size] as usize * block_size + p as usize % block_size;
                u32::try_from(slot).expect("KV slot index fits in u32")
            })
            .collect();
        ForwardBatch {
            token_ids: new_tokens.to_vec(),
            positions,
            slot_mapping,
            seqs: vec![SeqChunk {
                key: 0,
                query_start: 0,
                query_len: new_tokens.len(),
                context_len: num_cached + new_tokens.len(),
                block_table: block_table.to_vec(),
            }],
            block_size,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// One sequence of a dense (non-paged) attention: query rows
/// `q_start..q_start + q_len` attend to every row of `k` / `v` (`[m, kv_width]`), or,
/// when causal, query `i` to rows `0..m - q_len + i + 1`.
pub struct DenseAttention<'a, T> {
    pub q_start: usize,
    pub q_len: usize,
    pub k: &'a T,
    pub v: &'a T,
}

/// The input checks of every backend's `attention_dense`: `q` (given as `(rows, cols)`)
/// is `[rows, q_width]`, each sequence's K and V are `[m, kv_width]` with the same `m`,
/// its query rows are in range, and a causal one has no more queries than keys. `dims`
/// gives a tensor's `(rows, cols)`.
pub fn check_dense_attention<T>(
    q: (usize, usize),
    seqs: &[DenseAttention<'_, T>],
    shape: AttentionShape,
    causal: bool,
    dims: impl Fn(&T) -> (usize, usize),
) {
    let (q_width, kv_width) = (shape.q_width(), shape.kv_width());
    assert_eq!(q.1, q_width, "attention_dense: q has {} columns", q.1);
    for s in seqs {
        let ((k_rows, k_cols), (v_rows, v_cols)) = (dims(s.k), dims(s.v));
        assert_eq!((k_cols, v_cols), (kv_width, kv_width), "attention_dense: K/V width");
        assert_eq!(k_rows, v_rows, "attention_dense: K and V rows differ");
        assert!(s.q_start + s.q_len <= q.0, "attention_dense: query rows out of range");
        assert!(!causal || s.q_len <= k_rows, "attention_dense: more queries than keys");
    }
}

/// The fused ops of a dense decoder. Shapes are given as `[rows, cols]`, row-major.
pub trait Backend: Send + Sync {
    /// An activation: `[rows, cols]`.
    type Tensor: Send;
    /// A parameter, uploaded once.
    type Weight: Send + Sync;
    /// The paged K/V pool of every layer.
    type KvCache: Send;

    fn name(&self) -> &'static str;

    /// Runs one engine step (scheduling, forward, sampling) where this backend wants its
    /// host work done: the CPU backend runs it on a worker of its thread pool, so that
    /// each op's parallel loop starts there instead of waking the pool from another
    /// thread and waiting for it, hundreds of times a step.
    fn run_step<R: Send>(step: impl FnOnce() -> R + Send) -> R
    where
        Self: Sized,
    {
        step()
    }

    /// Waits for every op queued so far (a device backend's stream); timings read after
    /// it count the work, not just its launch. A host backend's ops are done on return.
    fn synchronize(&self) {}

    /// Uploads a checkpoint tensor (any supported dtype).
    fn weight(&self, view: &TensorView<'_>) -> Self::Weight;
    /// Uploads 2-D tensors stacked along rows: fused `[q; k; v]` or `[gate; up]`.
    fn weight_stacked(&self, views: &[TensorView<'_>]) -> Self::Weight;
    /// Uploads host f32 values, such as rotary inverse frequencies.
    fn weight_from_f32(&self, values: Vec<f32>) -> Self::Weight;

    /// Bytes of one K or V element in the pools `alloc_kv_cache` makes.
    fn kv_bytes_per_element(&self) -> usize;
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Self::KvCache;

    /// `table [vocab, hidden]`, ids `[n]` -> `[n, hidden]`. Ids must be `< vocab`.
    fn embedding(&self, table: &Self::Weight, token_ids: &[u32]) -> Self::Tensor;
    /// RMSNorm of each row of `x [n, d]` with `weight [d]`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `residual += delta`, then returns the RMSNorm of the updated residual.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor;
    /// `x [n, in]` times `weight [out, in]` transposed, plus `bias [out]` -> `[n, out]`.
    fn linear(&self, x: &Self::Tensor, weight: &Self::Weight, bias: Option<&Self::Weight>) -> Self::Tensor;
    /// `[n, 2i]` holding `[gate | up]` -> `silu(gate) * up`, `[n, i]`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Self::Tensor;
    /// Per-head RMSNorm of the q and k parts of `qkv [n, qkv_width]` (Qwen3), in place.
    fn qk_norm(
        &self,
        qkv: &mut Self::Tensor,
        q_weight: &Self::Weight,
        k_weight: &Self::Weight,
        eps: f32,
        shape: AttentionShape,
    );
    /// Rotary embedding (neox / rotate-half layout) of the q and k parts of `qkv`, in
    /// place; `inv_freq [head_dim / 2]`, `positions [n]`.
    fn rotary(&self, qkv: &mut Self::Tensor, positions: &[u32], inv_freq: &Self::Weight, shape: AttentionShape);
    /// Rotary embedding over several position streams (rotate-half layout, in place):
    /// frequency `i` of a head (of `head_dim / 2`) turns by `positions[row][s] ·
    /// inv_freq[i]`, `s` the section holding `i` (`sections` sums to `head_dim / 2`).
    /// Qwen2-VL's M-RoPE has three streams (time, height, width), its vision tower two
    /// (height, width); plain RoPE is one.
    fn rotary_sections(
        &self,
        qkv: &mut Self::Tensor,
        positions: &[[u32; 3]],
        sections: [usize; 3],
        inv_freq: &Self::Weight,
        shape: AttentionShape,
    );
    /// Writes the k and v parts of `qkv [n, qkv_width]` to `slot_mapping [n]` of `layer`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Tensor,
        slot_mapping: &[u32],
        shape: AttentionShape,
    );
    /// Causal attention of the q part of `qkv [n, qkv_width]` over each sequence's
    /// cached context -> `[n, num_heads * head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: AttentionShape,
    ) -> Self::Tensor;
    /// Attention of `q [n, num_heads * head_dim]` over keys and values held as plain
    /// tensors (an audio encoder's self-attention, a decoder's cross-attention), one
    /// `DenseAttention` per sequence -> `[n, num_heads * head_dim]`.
    fn attention_dense(
        &self,
        q: &Self::Tensor,
        seqs: &[DenseAttention<'_, Self::Tensor>],
        shape: AttentionShape,
        causal: bool,
    ) -> Self::Tensor;
    /// An activation made from host values `[rows, cols]`, row-major.
    fn upload(&self, values: Vec<f32>, rows: usize, cols: usize) -> Self::Tensor;
    /// LayerNorm of each row of `x [n, d]`: `(x - mean) / sqrt(var + eps) * weight + bias`.
    fn layer_norm(&self, x: &Self::Tensor, weight: &Self::Weight, bias: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `residual += delta`, then returns the LayerNorm of the updated residual.
    fn add_layer_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Weight,
        bias: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor;
    /// `x += y`, same shapes.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// Exact (erf) GELU, in place.
    fn gelu(&self, x: &mut Self::Tensor);
    /// The patches a 1-D convolution reads: `x [len, channels]` (time-major) ->
    /// `[out_len, channels * kernel]` with column `c * kernel + t` holding
    /// `x[p * stride + t - pad][c]` (zero outside), so that a conv weight
    /// `[out, channels, kernel]` read as `[out, channels * kernel]` is a `linear` over it.
    fn im2col_1d(&self, x: &Self::Tensor, kernel: usize, stride: usize, pad: usize) -> Self::Tensor;
    /// Rows `rows` of `x` -> `[rows.len(), cols]`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// [`argmax`] of each of `rows` of `x`, computed where `x` is: greedy decoding copies
    /// one id per sequence to the host instead of a vocabulary-sized row.
    fn argmax_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Vec<u32>;
    /// [`draw`] from each of `rows` of `x` with its temperature and uniform number,
    /// computed where `x` is (sampling without filters copies one id per sequence).
    fn draw_rows(&self, x: &Self::Tensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32>;
    /// Moves `x` to the host: (values row-major, rows, cols). A host backend hands its
    /// buffer over without a copy.
    fn to_host(&self, x: Self::Tensor) -> (Vec<f32>, usize, usize);
    /// [`sampling::sample_row`] of each of `rows` of `x` with its [`RowSampling`]
    /// (edits, greedy or filtered draw, log-probabilities): how every step's tokens are
    /// chosen. This default brings the rows to the host and runs the reference there; a
    /// device backend overrides it to send back only ids and the log-probabilities asked
    /// for.
    fn sample_rows(&self, x: &Self::Tensor, rows: &[usize], sampling: &[&RowSampling]) -> Vec<Sampled>
    where
        Self: Sized,
    {
        sample_rows_on_host(self, x, rows, sampling)
    }
}

/// `Backend::sample_rows` on the host: the rows copied out, then the reference
/// pipeline (`sampling::sample_row`) on each.
pub fn sample_rows_on_host<B: Backend>(
    backend: &B,
    x: &B::Tensor,
    rows: &[usize],
    sampling: &[&RowSampling],
) -> Vec<Sampled> {
    assert_eq!(rows.len(), sampling.len(), "sample_rows: one RowSampling per row");
    if rows.is_empty() {
        return Vec::new();
    }
    let (values, _, vocab) = backend.to_host(backend.gather_rows(x, rows));
    values
        .chunks(vocab.max(1))
        .zip(sampling)
        .map(|(row, s)| sampling::sample_row(row, s))
        .collect()
}
