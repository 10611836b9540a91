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

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{
    AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape, WeightDtype, DEVICE_OUT_OF_MEMORY,
    MAX_HEAD_DIM,
};
use crate::loader::{Dtype, TensorView};

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Every kernel the backend launches, looked up once when the backend is made.
const KERNELS: &[&str] = &[
    "rms_norm_f32",
    "add_rms_norm_f32",
    "layer_norm_f32",
    "add_layer_norm_f32",
    "qk_norm_f32",
    "embedding_f32",
    "embedding_bf16",
    "silu_mul_f32",
    "gelu_f32",
    "add_f32",
    "bias_rows_f32",
    "cast_f32_bf16",
    "rotary_f32",
    "rotary_sections_f32",
    "gather_rows_f32",
    "im2col_1d_f32",
    "write_kv_f32",
    "write_kv_bf16",
    "attention_f32",
    "attention_bf16kv",
    "attention_combine_f32",
    "argmax_rows_f32",
    "draw_rows_f32",
];

/// Threads of `attention_f32` and its key chunk (kernels/attention.cu).
const ATTENTION_THREADS: u32 = 128;
const ATTENTION_CHUNK: usize = 128;

/// Why the CUDA backend could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("the CUDA driver library (libcuda.so) is not installed")]
    NoDriver,
    #[error("cuBLAS (libcublas.so.13) is not installed or not on the library path (LD_LIBRARY_PATH)")]
    NoCublas,
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA: {0}")]
    Driver(String),
}

fn driver_err(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Whether a CUDA device can be used: the driver and cuBLAS load and at least one device
/// answers. `Err` says why not.
pub fn available() -> Result<usize, CudaError> {
    // SAFETY: these only try to dlopen the libraries.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(CudaError::NoCublas);
    }
    let count = CudaContext::device_count().map_err(driver_err)?;
    if count <= 0 {
        return Err(CudaError::NoDevice { ordinal: 0, count: 0 });
    }
    Ok(count as usize)
}

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

/// The kernel parameters of `attention_f32` (kernels/attention.cu `AttentionArgs`).
#[repr(C)]
#[derive(Clone, Copy)]
struct AttentionArgs {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    partial: u64,
    visible: u64,
    row_seq: u64,
    block_tables: u64,
    q_stride: i32,
    kv_width: i32,
    max_blocks: i32,
    block_size: i32,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    split_len: i32,
    scale: f32,
}

// SAFETY: plain old data with the C layout the kernel reads.
unsafe impl DeviceRepr for AttentionArgs {}

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
    _modules: Vec<Arc<CudaModule>>,
}

/// An index array on the host and its device copy.
type Upload = (Vec<u32>, Arc<CudaSlice<u32>>);

/// Index arrays the upload cache keeps.
const UPLOAD_CACHE_ENTRIES: usize = 16;

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

/// Panics with the op's name on a CUDA error (see the module doc). Running out of
/// device memory says so in words (the model manager turns it into an out-of-memory
/// load error).
fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        let detail = format!("{e:?}");
        if detail.contains("OUT_OF_MEMORY") || detail.contains("ALLOC_FAILED") {
            panic!(
                "{DEVICE_OUT_OF_MEMORY} in {what}: the model, its KV cache and activations do not fit; \
                 lower --gpu-memory-utilization or --kv-cache-memory, use --dtype bfloat16, or a smaller model"
            );
        }
        panic!("CUDA error in {what}: {detail}")
    })
}

macro_rules! launch {
    ($be:expr, $name:literal, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $be.func($name);
        let mut builder = $be.inner.stream.launch_builder(func);
        $( builder.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu and
        // every pointer is a live device buffer of the size the kernel indexes.
        ok(unsafe { builder.launch($cfg) }, $name);
    }};
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    cfg((blocks, 1, 1), 256)
}

fn rows_u32(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} rows do not fit a launch"))
}

impl CudaBackend {
    /// Opens device `ordinal` (`cuda:N`) and loads the kernels.
    pub fn new(ordinal: usize, weights: WeightDtype) -> Result<Self, CudaError> {
        Self::open(ordinal, weights, false)
    }

    /// As `new`, with every output buffer filled with NaN before a kernel writes it (for
    /// tests: an element left unwritten is caught).
    pub fn with_poisoned_outputs(ordinal: usize, weights: WeightDtype) -> Result<Self, CudaError> {
        Self::open(ordinal, weights, true)
    }

    fn open(ordinal: usize, weights: WeightDtype, poison: bool) -> Result<Self, CudaError> {
        let count = available()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err)?;
        // One stream: cudarc's cross-stream event tracking is not needed.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err)?;
        let mut modules = Vec::new();
        let mut funcs = HashMap::new();
        for (name, image) in kernels::MODULES {
            let module = ctx
                .load_module(Ptx::from_binary(image.to_vec()))
                .map_err(|e| CudaError::Driver(format!("loading kernels/{name}.cu: {e:?}")))?;
            modules.push(module);
        }
        for &kernel in KERNELS {
            let func = modules
                .iter()
                .find_map(|m| m.load_function(kernel).ok())
                .ok_or_else(|| CudaError::Driver(format!("kernel `{kernel}` is missing from the embedded modules")))?;
            funcs.insert(kernel, func);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(driver_err)?;
        let device_name = ctx.name().map_err(driver_err)?;
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err)? as usize;
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                funcs,
                weights,
                device_name,
                sm_count,
                poison,
                uploads: Mutex::new(Vec::new()),
                _modules: modules,
            }),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.inner.device_name
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ctx.ordinal()
    }

    /// (free, total) bytes of device memory now, once the frees queued on the stream
    /// (an unloaded model's buffers) have run and the pool has returned them.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        self.inner.stream.synchronize().map_err(driver_err)?;
        self.inner.ctx.mem_get_info().map_err(driver_err)
    }

    /// Waits for every queued launch (and surfaces an asynchronous fault).
    pub fn synchronize(&self) {
        ok(self.inner.stream.synchronize(), "synchronize");
    }

    fn func(&self, name: &str) -> &CudaFunction {
        &self.inner.funcs[name]
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.inner.stream).0
    }

    fn pool_ptr(&self, pool: &KvPool) -> u64 {
        match pool {
            KvPool::F32(b) => self.ptr(b),
            KvPool::Bf16(b) => self.ptr(b),
        }
    }

    /// Keys and values in bf16: every mode but `--dtype float32`.
    fn kv_bf16(&self) -> bool {
        self.inner.weights != WeightDtype::F32
    }

    /// Uninitialized `len` elements (at least one: the driver refuses empty buffers).
    fn alloc<T: DeviceRepr>(&self, len: usize, what: &str) -> CudaSlice<T> {
        // SAFETY: every op writes all of its output before anything reads it.
        let buf = ok(unsafe { self.inner.stream.alloc::<T>(len.max(1)) }, what);
        if self.inner.poison {
            // SAFETY: the range is the buffer just allocated, on its stream.
            ok(
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        self.ptr(&buf),
                        0xFF,
                        buf.num_bytes(),
                        self.inner.stream.cu_stream(),
                    )
                },
                what,
            );
        }
        buf
    }

    fn tensor(&self, rows: usize, cols: usize, what: &str) -> CudaTensor {
        CudaTensor {
            buf: self.alloc(rows * cols, what),
            rows,
            cols,
        }
    }

    fn htod<T: DeviceRepr>(&self, values: &[T], what: &str) -> CudaSlice<T> {
        if values.is_empty() {
            return self.alloc(1, what);
        }
        ok(self.inner.stream.clone_htod(values), what)
    }

    /// `values` on the device, from the upload cache when the same array was uploaded
    /// recently (it is only read by kernels, so sharing it is safe).
    fn indices(&self, values: &[u32], what: &str) -> Arc<CudaSlice<u32>> {
        let mut cache = self.inner.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|(v, _)| v.as_slice() == values) {
            let entry = cache.remove(i);
            let buf = entry.1.clone();
            cache.push(entry);
            return buf;
        }
        let buf = Arc::new(self.htod(values, what));
        if cache.len() == UPLOAD_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((values.to_vec(), buf.clone()));
        buf
    }

    /// `rows` of `x` as a device index array (each checked to be a row of `x`).
    fn row_indices(&self, x: &CudaTensor, rows: &[usize], what: &str) -> CudaSlice<u32> {
        let idx: Vec<u32> = rows
            .iter()
            .map(|&r| {
                assert!(r < x.rows, "{what}: row {r} of {}", x.rows);
                r as u32
            })
            .collect();
        self.htod(&idx, what)
    }

    /// The first `n` token ids of `ids` on the host.
    fn ids_to_host(&self, ids: &CudaSlice<u32>, n: usize, what: &str) -> Vec<u32> {
        let mut host = ok(self.inner.stream.clone_dtoh(ids), what);
        host.truncate(n);
        host
    }

    fn vector<'a>(&self, w: &'a CudaWeight, what: &str) -> &'a CudaSlice<f32> {
        match w {
            CudaWeight::Vector(b) => b,
            _ => panic!("{what}: a matrix weight where a vector was expected"),
        }
    }

    /// `c [n, m] (+)= a [n, k] · bᵀ`, `b` the weight `[m, k]`; `accumulate` keeps c's
    /// values (a bias broadcast into it).
    fn gemm(&self, x: &CudaTensor, w: &CudaWeight, out: &CudaTensor, accumulate: bool) {
        let (m, k) = w.dims();
        let n = x.rows;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let dims = |v: usize| i32::try_from(v).unwrap_or_else(|_| panic!("linear: dimension {v} too large"));
        let (mi, ni, ki) = (dims(m), dims(n), dims(k));
        let out_ptr = self.ptr(&out.buf);
        // cuBLAS works in the calling thread's current context (the engine's thread).
        ok(self.inner.ctx.bind_to_thread(), "linear");
        let handle = *self.inner.blas.handle();
        let op_t = blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let op_n = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let f32_t = blas_sys::cudaDataType::CUDA_R_32F;
        // The bf16 input copy lives until the GEMM is queued; its stream-ordered free
        // runs after it.
        let mut _bf16_input = None;
        let (w_ptr, x_ptr, in_t, what) = match w {
            CudaWeight::F32 { buf, .. } => (self.ptr(buf), self.ptr(&x.buf), f32_t, "linear (f32 GEMM)"),
            CudaWeight::Bf16 { buf, .. } => {
                let xb = self.alloc::<u16>(n * k, "linear: bf16 input");
                let (src, dst, len) = (self.ptr(&x.buf), self.ptr(&xb), (n * k) as u64);
                launch!(self, "cast_f32_bf16", elementwise(n * k); &src, &dst, &len);
                _bf16_input = Some(xb);
                (
                    self.ptr(buf),
                    dst,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    "linear (bf16 GEMM)",
                )
            }
            CudaWeight::Vector(_) => panic!("linear: a vector weight where a matrix was expected"),
        };
        // Column-major view: out^T [m, n] = W [k, m]^T · x^T [k, n].
        // SAFETY: shapes checked by the caller; every buffer outlives the queued call
        // (cuBLAS runs on the backend's stream, ordered with the kernels).
        ok(
            unsafe {
                blas::gemm_ex(
                    handle,
                    op_t,
                    op_n,
                    mi,
                    ni,
                    ki,
                    &alpha as *const f32 as *const c_void,
                    w_ptr as *const c_void,
                    in_t,
                    ki,
                    x_ptr as *const c_void,
                    in_t,
                    ki,
                    &beta as *const f32 as *const c_void,
                    out_ptr as *mut c_void,
                    f32_t,
                    mi,
                    compute,
                    algo,
                )
            },
            what,
        );
    }

    /// Launches `attention_f32` (and the split merge) over `rows` query rows.
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(
        &self,
        q_ptr: u64,
        q_stride: usize,
        out_ptr: u64,
        (k_ptr, v_ptr, bf16_kv): (u64, u64, bool),
        kv_width: usize,
        visible: &[u32],
        row_seq: Option<&[u32]>,
        tables: Option<(&[u32], usize, usize)>,
        shape: AttentionShape,
    ) {
        let rows = visible.len();
        if rows == 0 {
            return;
        }
        assert!(
            shape.head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {} > {MAX_HEAD_DIM}",
            shape.head_dim
        );
        let max_visible = visible.iter().copied().max().unwrap_or(0).max(1) as usize;
        // Few rows over a long context: split the keys so the grid fills the device.
        let blocks = rows * shape.num_heads;
        let want = (2 * self.inner.sm_count).div_ceil(blocks);
        let splits = want.clamp(1, max_visible.div_ceil(2 * ATTENTION_CHUNK).max(1));
        let split_len = max_visible.div_ceil(splits).next_multiple_of(ATTENTION_CHUNK);
        let splits = max_visible.div_ceil(split_len);
        let visible_d = self.indices(visible, "attention: visible");
        let row_seq_d = row_seq.map(|r| self.indices(r, "attention: rows"));
        let tables_d = tables.map(|(t, _, _)| self.indices(t, "attention: block tables"));
        let partial = (splits > 1).then(|| {
            self.alloc::<f32>(
                rows * shape.num_heads * splits * (shape.head_dim + 2),
                "attention: partials",
            )
        });
        let args = AttentionArgs {
            q: q_ptr,
            k: k_ptr,
            v: v_ptr,
            out: out_ptr,
            partial: partial.as_ref().map_or(0, |p| self.ptr(p)),
            visible: self.ptr(&visible_d),
            row_seq: row_seq_d.as_ref().map_or(0, |r| self.ptr(r)),
            block_tables: tables_d.as_ref().map_or(0, |t| self.ptr(t)),
            q_stride: q_stride as i32,
            kv_width: kv_width as i32,
            max_blocks: tables.map_or(0, |(_, m, _)| m as i32),
            block_size: tables.map_or(1, |(_, _, b)| b as i32),
            num_heads: shape.num_heads as i32,
            num_kv_heads: shape.num_kv_heads as i32,
            head_dim: shape.head_dim as i32,
            split_len: split_len as i32,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        };
        let grid = (rows_u32(rows, "attention"), shape.num_heads as u32, splits as u32);
        if bf16_kv {
            launch!(self, "attention_bf16kv", cfg(grid, ATTENTION_THREADS); &args);
        } else {
            launch!(self, "attention_f32", cfg(grid, ATTENTION_THREADS); &args);
        }
        if let Some(partial) = &partial {
            let (p, nh, hd, s) = (
                self.ptr(partial),
                shape.num_heads as i32,
                shape.head_dim as i32,
                splits as i32,
            );
            let grid = (rows_u32(rows, "attention"), shape.num_heads as u32, 1);
            launch!(self, "attention_combine_f32", cfg(grid, 128); &p, &out_ptr, &nh, &hd, &s);
        }
    }

    fn upload_views(&self, views: &[TensorView<'_>]) -> CudaWeight {
        let cols = views[0].shape[1..].iter().product::<usize>();
        if views.len() == 1 && views[0].shape.len() != 2 {
            return CudaWeight::Vector(self.htod(&views[0].to_f32_vec(), "weight upload"));
        }
        let rows: usize = views.iter().map(|v| v.shape[0]).sum();
        for v in views {
            assert_eq!(
                v.shape[1..].iter().product::<usize>(),
                cols,
                "stacked weight `{}` has other columns",
                v.name
            );
        }
        let all_bf16 = views.iter().all(|v| v.dtype == Dtype::BF16);
        let weights = self.inner.weights;
        if all_bf16 && weights != WeightDtype::F32 {
            let mut host = Vec::with_capacity(rows * cols);
            for v in views {
                host.extend(v.bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
            }
            return CudaWeight::Bf16 {
                buf: self.htod(&host, "weight upload"),
                rows,
                cols,
            };
        }
        let mut host = Vec::with_capacity(rows * cols);
        for v in views {
            host.extend(v.to_f32_vec());
        }
        if weights == WeightDtype::Bf16 {
            // Rounded to nearest even, as torch's `.to(torch.bfloat16)`.
            let bits: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            return CudaWeight::Bf16 {
                buf: self.htod(&bits, "weight upload"),
                rows,
                cols,
            };
        }
        CudaWeight::F32 {
            buf: self.htod(&host, "weight upload"),
            rows,
            cols,
        }
    }

    fn norm_block(cols: usize) -> u32 {
        cols.next_multiple_of(32).clamp(32, 1024) as u32
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn weight(&self, view: &TensorView<'_>) -> CudaWeight {
        self.upload_views(std::slice::from_ref(view))
    }

    fn weight_stacked(&self, views: &[TensorView<'_>]) -> CudaWeight {
        self.upload_views(views)
    }

    fn weight_from_f32(&self, values: Vec<f32>) -> CudaWeight {
        CudaWeight::Vector(self.htod(&values, "weight upload"))
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
        let (vocab, hidden) = table.dims();
        for &id in token_ids {
            assert!((id as usize) < vocab, "embedding: token id {id} >= vocab {vocab}");
        }
        let out = self.tensor(token_ids.len(), hidden, "embedding");
        if token_ids.is_empty() {
            return out;
        }
        let ids = self.htod(token_ids, "embedding: ids");
        let (ids, o, h) = (self.ptr(&ids), self.ptr(&out.buf), hidden as i32);
        let grid = (rows_u32(token_ids.len(), "embedding"), 1, 1);
        match table {
            CudaWeight::F32 { buf, .. } => {
                let t = self.ptr(buf);
                launch!(self, "embedding_f32", cfg(grid, 256); &t, &ids, &o, &h);
            }
            CudaWeight::Bf16 { buf, .. } => {
                let t = self.ptr(buf);
                launch!(self, "embedding_bf16", cfg(grid, 256); &t, &ids, &o, &h);
            }
            CudaWeight::Vector(_) => panic!("embedding: a vector weight where a table was expected"),
        }
        out
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
        let out = self.tensor(x.rows, x.cols, "rms_norm");
        if x.rows > 0 {
            let (xp, w, o, d) = (
                self.ptr(&x.buf),
                self.ptr(self.vector(weight, "rms_norm")),
                self.ptr(&out.buf),
                x.cols as i32,
            );
            let c = cfg((rows_u32(x.rows, "rms_norm"), 1, 1), Self::norm_block(x.cols));
            launch!(self, "rms_norm_f32", c; &xp, &w, &o, &d, &eps);
        }
        out
    }

    fn add_rms_norm(&self, residual: &mut CudaTensor, delta: &CudaTensor, weight: &CudaWeight, eps: f32) -> CudaTensor {
        assert_eq!(
            (residual.rows, residual.cols),
            (delta.rows, delta.cols),
            "add_rms_norm: shapes differ"
        );
        let out = self.tensor(residual.rows, residual.cols, "add_rms_norm");
        if residual.rows > 0 {
            let (r, dl, w, o, d) = (
                self.ptr(&residual.buf),
                self.ptr(&delta.buf),
                self.ptr(self.vector(weight, "add_rms_norm")),
                self.ptr(&out.buf),
                residual.cols as i32,
            );
            let c = cfg(
                (rows_u32(residual.rows, "add_rms_norm"), 1, 1),
                Self::norm_block(residual.cols),
            );
            launch!(self, "add_rms_norm_f32", c; &r, &dl, &w, &o, &d, &eps);
        }
        out
    }

    fn linear(&self, x: &CudaTensor, weight: &CudaWeight, bias: Option<&CudaWeight>) -> CudaTensor {
        let (out_dim, in_dim) = weight.dims();
        assert_eq!(
            x.cols, in_dim,
            "linear: input has {} columns, weight [{out_dim}, {in_dim}]",
            x.cols
        );
        let out = self.tensor(x.rows, out_dim, "linear");
        if x.rows == 0 {
            return out;
        }
        if let Some(bias) = bias {
            let b = self.vector(bias, "linear bias");
            assert_eq!(b.len(), out_dim, "linear: bias length");
            let (o, bp, r, c) = (self.ptr(&out.buf), self.ptr(b), x.rows as i32, out_dim as i32);
            launch!(self, "bias_rows_f32", elementwise(x.rows * out_dim); &o, &bp, &r, &c);
        }
        self.gemm(x, weight, &out, bias.is_some());
        out
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> CudaTensor {
        let inter = gate_up.cols / 2;
        let out = self.tensor(gate_up.rows, inter, "silu_mul");
        if gate_up.rows > 0 {
            let (g, o, r, i) = (
                self.ptr(&gate_up.buf),
                self.ptr(&out.buf),
                gate_up.rows as i32,
                inter as i32,
            );
            launch!(self, "silu_mul_f32", elementwise(gate_up.rows * inter); &g, &o, &r, &i);
        }
        out
    }

    fn qk_norm(
        &self,
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
            self.ptr(&qkv.buf),
            self.ptr(self.vector(q_weight, "qk_norm")),
            self.ptr(self.vector(k_weight, "qk_norm")),
        );
        let (width, nh, hd) = (qkv.cols as i32, shape.num_heads as i32, shape.head_dim as i32);
        let grid = (
            rows_u32(qkv.rows, "qk_norm"),
            (shape.num_heads + shape.num_kv_heads) as u32,
            1,
        );
        launch!(self, "qk_norm_f32", cfg(grid, 32); &x, &qw, &kw, &width, &nh, &hd, &eps);
    }

    fn rotary(&self, qkv: &mut CudaTensor, positions: &[u32], inv_freq: &CudaWeight, shape: AttentionShape) {
        assert_eq!(positions.len(), qkv.rows, "rotary: one position per row");
        if qkv.rows == 0 {
            return;
        }
        let pos = self.indices(positions, "rotary: positions");
        let (x, p, f) = (
            self.ptr(&qkv.buf),
            self.ptr(&pos),
            self.ptr(self.vector(inv_freq, "rotary")),
        );
        let (width, heads, hd) = (
            qkv.cols as i32,
            (shape.num_heads + shape.num_kv_heads) as i32,
            shape.head_dim as i32,
        );
        launch!(self, "rotary_f32", cfg((rows_u32(qkv.rows, "rotary"), 1, 1), 128); &x, &p, &f, &width, &heads, &hd);
    }

    fn rotary_sections(
        &self,
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
            self.vector(inv_freq, "rotary_sections").len() >= shape.head_dim / 2,
            "rotary_sections: head_dim / 2 frequencies"
        );
        let flat: Vec<u32> = positions.iter().flatten().copied().collect();
        let pos = self.indices(&flat, "rotary_sections: positions");
        let (x, p, f) = (
            self.ptr(&qkv.buf),
            self.ptr(&pos),
            self.ptr(self.vector(inv_freq, "rotary_sections")),
        );
        let (width, heads, hd, s0, s1) = (
            qkv.cols as i32,
            (shape.num_heads + shape.num_kv_heads) as i32,
            shape.head_dim as i32,
            sections[0] as i32,
            sections[1] as i32,
        );
        launch!(self, "rotary_sections_f32", cfg((rows_u32(qkv.rows, "rotary_sections"), 1, 1), 128); &x, &p, &f, &width, &heads, &hd, &s0, &s1);
    }

    fn write_kv(
        &self,
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
        let slots = self.indices(slot_mapping, "write_kv: slots");
        let (x, k, v, s) = (
            self.ptr(&qkv.buf),
            self.pool_ptr(&cache.k[layer]),
            self.pool_ptr(&cache.v[layer]),
            self.ptr(&slots),
        );
        let (width, qw, kvw) = (qkv.cols as i32, shape.q_width() as i32, shape.kv_width() as i32);
        let c = cfg((rows_u32(qkv.rows, "write_kv"), 1, 1), 256);
        match cache.k[layer] {
            KvPool::F32(_) => launch!(self, "write_kv_f32", c; &x, &k, &v, &s, &width, &qw, &kvw),
            KvPool::Bf16(_) => launch!(self, "write_kv_bf16", c; &x, &k, &v, &s, &width, &qw, &kvw),
        }
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        cache: &CudaKvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: AttentionShape,
    ) -> CudaTensor {
        let rows = qkv.rows;
        let out = self.tensor(rows, shape.q_width(), "attention");
        let max_blocks = batch.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut visible = vec![0u32; rows];
        let mut row_seq = vec![0u32; rows];
        let mut tables = vec![0u32; batch.seqs.len() * max_blocks];
        for (i, seq) in batch.seqs.iter().enumerate() {
            assert!(
                seq.block_table.len() * batch.block_size >= seq.context_len,
                "attention: block table too short for the context"
            );
            tables[i * max_blocks..i * max_blocks + seq.block_table.len()].copy_from_slice(&seq.block_table);
            for j in 0..seq.query_len {
                let row = seq.query_start + j;
                visible[row] = (seq.context_len - seq.query_len + j + 1) as u32;
                row_seq[row] = i as u32;
            }
        }
        let x = self.ptr(&qkv.buf);
        self.attention_rows(
            x,
            qkv.cols,
            self.ptr(&out.buf),
            (
                self.pool_ptr(&cache.k[layer]),
                self.pool_ptr(&cache.v[layer]),
                matches!(cache.k[layer], KvPool::Bf16(_)),
            ),
            shape.kv_width(),
            &visible,
            Some(&row_seq),
            Some((&tables, max_blocks, batch.block_size)),
            shape,
        );
        out
    }

    fn attention_dense(
        &self,
        q: &CudaTensor,
        seqs: &[DenseAttention<'_, CudaTensor>],
        shape: AttentionShape,
        causal: bool,
    ) -> CudaTensor {
        let q_width = shape.q_width();
        super::check_dense_attention((q.rows, q.cols), seqs, shape, causal, |t| (t.rows, t.cols));
        // Rows no sequence covers are zero, as on the CPU.
        let covered: usize = seqs.iter().map(|s| s.q_len).sum();
        let out = if covered < q.rows {
            CudaTensor {
                buf: ok(
                    self.inner.stream.alloc_zeros::<f32>((q.rows * q_width).max(1)),
                    "attention_dense",
                ),
                rows: q.rows,
                cols: q_width,
            }
        } else {
            self.tensor(q.rows, q_width, "attention_dense")
        };
        let f = std::mem::size_of::<f32>() as u64;
        for seq in seqs {
            let m = seq.k.rows;
            let visible: Vec<u32> = (0..seq.q_len)
                .map(|i| if causal { (m + i + 1).saturating_sub(seq.q_len) } else { m } as u32)
                .collect();
            self.attention_rows(
                self.ptr(&q.buf) + (seq.q_start * q.cols) as u64 * f,
                q.cols,
                self.ptr(&out.buf) + (seq.q_start * shape.q_width()) as u64 * f,
                (self.ptr(&seq.k.buf), self.ptr(&seq.v.buf), false),
                seq.k.cols,
                &visible,
                None,
                None,
                shape,
            );
        }
        out
    }

    fn upload(&self, values: Vec<f32>, rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(
            values.len(),
            rows * cols,
            "upload: {} values for [{rows}, {cols}]",
            values.len()
        );
        CudaTensor {
            buf: self.htod(&values, "upload"),
            rows,
            cols,
        }
    }

    fn layer_norm(&self, x: &CudaTensor, weight: &CudaWeight, bias: &CudaWeight, eps: f32) -> CudaTensor {
        let out = self.tensor(x.rows, x.cols, "layer_norm");
        if x.rows > 0 {
            let (xp, w, b, o, d) = (
                self.ptr(&x.buf),
                self.ptr(self.vector(weight, "layer_norm")),
                self.ptr(self.vector(bias, "layer_norm")),
                self.ptr(&out.buf),
                x.cols as i32,
            );
            let c = cfg((rows_u32(x.rows, "layer_norm"), 1, 1), Self::norm_block(x.cols));
            launch!(self, "layer_norm_f32", c; &xp, &w, &b, &o, &d, &eps);
        }
        out
    }

    fn add_layer_norm(
        &self,
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
        let out = self.tensor(residual.rows, residual.cols, "add_layer_norm");
        if residual.rows > 0 {
            let (r, dl, w, b, o, d) = (
                self.ptr(&residual.buf),
                self.ptr(&delta.buf),
                self.ptr(self.vector(weight, "add_layer_norm")),
                self.ptr(self.vector(bias, "add_layer_norm")),
                self.ptr(&out.buf),
                residual.cols as i32,
            );
            let c = cfg(
                (rows_u32(residual.rows, "add_layer_norm"), 1, 1),
                Self::norm_block(residual.cols),
            );
            launch!(self, "add_layer_norm_f32", c; &r, &dl, &w, &b, &o, &d, &eps);
        }
        out
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        let n = x.rows * x.cols;
        if n > 0 {
            let (xp, yp, len) = (self.ptr(&x.buf), self.ptr(&y.buf), n as u64);
            launch!(self, "add_f32", elementwise(n); &xp, &yp, &len);
        }
    }

    fn gelu(&self, x: &mut CudaTensor) {
        let n = x.rows * x.cols;
        if n > 0 {
            let (xp, len) = (self.ptr(&x.buf), n as u64);
            launch!(self, "gelu_f32", elementwise(n); &xp, &len);
        }
    }

    fn im2col_1d(&self, x: &CudaTensor, kernel: usize, stride: usize, pad: usize) -> CudaTensor {
        let (len, ch) = (x.rows, x.cols);
        assert!(len + 2 * pad >= kernel && stride > 0, "im2col_1d: input too short");
        let out_len = (len + 2 * pad - kernel) / stride + 1;
        let out = self.tensor(out_len, ch * kernel, "im2col_1d");
        let (xp, o) = (self.ptr(&x.buf), self.ptr(&out.buf));
        let (l, c, k, s, p) = (len as i32, ch as i32, kernel as i32, stride as i32, pad as i32);
        launch!(self, "im2col_1d_f32", cfg((rows_u32(out_len, "im2col_1d"), 1, 1), 256); &xp, &o, &l, &c, &k, &s, &p);
        out
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        let out = self.tensor(rows.len(), x.cols, "gather_rows");
        if rows.is_empty() {
            return out;
        }
        let idx = self.row_indices(x, rows, "gather_rows");
        let (xp, ip, o, c) = (self.ptr(&x.buf), self.ptr(&idx), self.ptr(&out.buf), x.cols as i32);
        launch!(self, "gather_rows_f32", cfg((rows_u32(rows.len(), "gather_rows"), 1, 1), 256); &xp, &ip, &o, &c);
        out
    }

    fn argmax_rows(&self, x: &CudaTensor, rows: &[usize]) -> Vec<u32> {
        if rows.is_empty() {
            return Vec::new();
        }
        let idx = self.row_indices(x, rows, "argmax_rows");
        let out = self.alloc::<u32>(rows.len(), "argmax_rows");
        let (xp, ip, o, c) = (self.ptr(&x.buf), self.ptr(&idx), self.ptr(&out), x.cols as i32);
        launch!(self, "argmax_rows_f32", cfg((rows_u32(rows.len(), "argmax_rows"), 1, 1), 1024); &xp, &ip, &o, &c);
        self.ids_to_host(&out, rows.len(), "argmax_rows")
    }

    fn draw_rows(&self, x: &CudaTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
        assert!(
            rows.len() == temperatures.len() && rows.len() == uniforms.len(),
            "draw_rows: one temperature and one uniform number per row"
        );
        if rows.is_empty() {
            return Vec::new();
        }
        let idx = self.row_indices(x, rows, "draw_rows");
        let (temps, us) = (
            self.htod(temperatures, "draw_rows: temperatures"),
            self.htod(uniforms, "draw_rows: uniforms"),
        );
        let out = self.alloc::<u32>(rows.len(), "draw_rows");
        let (xp, ip, tp, up, o, c) = (
            self.ptr(&x.buf),
            self.ptr(&idx),
            self.ptr(&temps),
            self.ptr(&us),
            self.ptr(&out),
            x.cols as i32,
        );
        launch!(self, "draw_rows_f32", cfg((rows_u32(rows.len(), "draw_rows"), 1, 1), 1024); &xp, &ip, &tp, &up, &o, &c);
        self.ids_to_host(&out, rows.len(), "draw_rows")
    }

    fn to_host(&self, x: CudaTensor) -> (Vec<f32>, usize, usize) {
        let mut values = ok(self.inner.stream.clone_dtoh(&x.buf), "copy to host");
        values.truncate(x.rows * x.cols);
        (values, x.rows, x.cols)
    }
}
