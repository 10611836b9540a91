//! The device under the ops: opening it and loading the embedded kernels, buffers
//! (stream-ordered allocations, NaN-poisoned in tests), uploads and the upload cache,
//! and the launch helpers every op family uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{sys as drv_sys, CudaContext, CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::{kernels, CudaBackend, CudaTensor, CudaWeight, Inner, KvPool, PagedAttention};
use crate::backend::{WeightDtype, DEVICE_OUT_OF_MEMORY};

/// Every kernel the backend launches, looked up once when the backend is made.
pub(super) const KERNELS: &[&str] = &[
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
    "attention_grouped_f32",
    "attention_grouped_bf16kv",
    "argmax_rows_f32",
    "draw_rows_f32",
    "sample_rows_f32",
];

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
    #[error("{0}")]
    Setting(String),
}

pub(super) fn driver_err(e: impl std::fmt::Debug) -> CudaError {
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

/// Index arrays the upload cache keeps.
pub(super) const UPLOAD_CACHE_ENTRIES: usize = 16;

/// Panics with the op's name on a CUDA error (see the module doc). Running out of
/// device memory says so in words (the model manager turns it into an out-of-memory
/// load error).
pub(super) fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
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

/// A kernel choice: read from an environment variable when the backend opens (the first
/// of its choices when unset), changeable afterwards (the GPU suite runs each).
pub(super) struct Setting<T>(Mutex<T>);

impl<T: Copy> Setting<T> {
    pub(super) fn from_env(var: &str, choices: &[(&str, T)]) -> Result<Self, CudaError> {
        let value = match std::env::var(var) {
            Err(_) => choices[0].1,
            Ok(name) => match choices.iter().find(|(n, _)| *n == name) {
                Some(&(_, value)) => value,
                None => {
                    let names: Vec<&str> = choices.iter().map(|&(n, _)| n).collect();
                    return Err(CudaError::Setting(format!(
                        "{var} must be one of {}, not `{name}`",
                        names.join(", ")
                    )));
                }
            },
        };
        Ok(Setting(Mutex::new(value)))
    }

    pub(super) fn get(&self) -> T {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set(&self, value: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

macro_rules! launch {
    ($be:expr, $name:literal, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $be.func($name);
        use cudarc::driver::PushKernelArg as _;
        let mut builder = $be.inner.stream.launch_builder(func);
        $( builder.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu and
        // every pointer is a live device buffer of the size the kernel indexes.
        $crate::backend::cuda::device::ok(unsafe { builder.launch($cfg) }, $name);
    }};
}

pub(super) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
pub(super) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    cfg((blocks, 1, 1), 256)
}

pub(super) fn rows_u32(n: usize, what: &str) -> u32 {
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

    pub(super) fn open(ordinal: usize, weights: WeightDtype, poison: bool) -> Result<Self, CudaError> {
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
                paged_attention: Setting::from_env("INFERD_CUDA_ATTENTION", PagedAttention::CHOICES)?,
                row_sampler: Setting::from_env("INFERD_CUDA_SAMPLING", super::RowSampler::CHOICES)?,
                attention_splits: Setting::from_env("INFERD_CUDA_ATTENTION_SPLITS", super::AttentionSplits::CHOICES)?,
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

    pub(super) fn func(&self, name: &str) -> &CudaFunction {
        &self.inner.funcs[name]
    }

    pub(super) fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.inner.stream).0
    }

    pub(super) fn pool_ptr(&self, pool: &KvPool) -> u64 {
        match pool {
            KvPool::F32(b) => self.ptr(b),
            KvPool::Bf16(b) => self.ptr(b),
        }
    }

    /// Keys and values in bf16: every mode but `--dtype float32`.
    pub(super) fn kv_bf16(&self) -> bool {
        self.inner.weights != WeightDtype::F32
    }

    /// Uninitialized `len` elements (at least one: the driver refuses empty buffers).
    pub(super) fn alloc<T: DeviceRepr>(&self, len: usize, what: &str) -> CudaSlice<T> {
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

    pub(super) fn tensor(&self, rows: usize, cols: usize, what: &str) -> CudaTensor {
        CudaTensor {
            buf: self.alloc(rows * cols, what),
            rows,
            cols,
        }
    }

    pub(super) fn htod<T: DeviceRepr>(&self, values: &[T], what: &str) -> CudaSlice<T> {
        if values.is_empty() {
            return self.alloc(1, what);
        }
        ok(self.inner.stream.clone_htod(values), what)
    }

    /// `values` on the device, from the upload cache when the same array was uploaded
    /// recently (it is only read by kernels, so sharing it is safe).
    pub(super) fn indices(&self, values: &[u32], what: &str) -> Arc<CudaSlice<u32>> {
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
    pub(super) fn row_indices(&self, x: &CudaTensor, rows: &[usize], what: &str) -> CudaSlice<u32> {
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
    pub(super) fn ids_to_host(&self, ids: &CudaSlice<u32>, n: usize, what: &str) -> Vec<u32> {
        let mut host = ok(self.inner.stream.clone_dtoh(ids), what);
        host.truncate(n);
        host
    }

    pub(super) fn vector<'a>(&self, w: &'a CudaWeight, what: &str) -> &'a CudaSlice<f32> {
        match w {
            CudaWeight::Vector(b) => b,
            _ => panic!("{what}: a matrix weight where a vector was expected"),
        }
    }
}
