//! Memory room for models: the KV budget on a device, GPU room under
//! `--gpu-memory-utilization`, the least-recently-used unloads that make room for a
//! new model, and handing freed memory back to the system (`malloc_trim`).

#[cfg(feature = "cuda")]
use crate::backend::cuda::{CudaBackend, CudaError};
use crate::backend::Device;
use crate::engine::{available_memory, KvCacheBudget};
use crate::loader::hub::resolve_model;

use super::{lock, LoadError, ModelManager, Slot};

/// The KV cache budget on `device`: `budget` on the CPU; on a GPU, `budget` when it is a
/// byte count (`--kv-cache-memory`), else what `gpu_memory_utilization` leaves.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn kv_budget_on(
    device: &Device,
    budget: KvCacheBudget,
    gpu_memory_utilization: f64,
) -> Result<KvCacheBudget, String> {
    match device {
        Device::Cpu(_) => Ok(budget),
        #[cfg(feature = "cuda")]
        Device::Cuda(b) => match budget {
            KvCacheBudget::Bytes(_) => Ok(budget),
            KvCacheBudget::FractionOfAvailable(_) => gpu_kv_budget(b, gpu_memory_utilization),
        },
    }
}

/// Scratch for one step's activations and logits on a GPU, outside the KV pool.
#[cfg(feature = "cuda")]
pub(super) const GPU_ACTIVATION_RESERVE: usize = 2 << 30;

/// KV cache bytes on a GPU: `utilization` of its memory, less what is in use now (the
/// weights) and a reserve for activations.
#[cfg(feature = "cuda")]
pub(super) fn gpu_kv_budget(backend: &CudaBackend, utilization: f64) -> Result<KvCacheBudget, String> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(format!("--gpu-memory-utilization must be in (0, 1], got {utilization}"));
    }
    let room = gpu_room(backend, utilization).map_err(|e| e.to_string())?;
    if room.bytes == 0 {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Err(format!(
            "{:.1} of {:.1} GiB are in use and --gpu-memory-utilization {utilization} allows {:.1} GiB: no room left for a KV cache",
            gib(room.total - room.free),
            gib(room.total),
            gib(room.total) * utilization
        ));
    }
    Ok(KvCacheBudget::Bytes(room.bytes))
}

/// GPU memory now, and what `utilization` of it leaves for new buffers.
#[cfg(feature = "cuda")]
pub(super) struct GpuRoom {
    free: usize,
    total: usize,
    /// Free memory less the headroom `utilization` keeps and the activation reserve.
    bytes: usize,
}

#[cfg(feature = "cuda")]
pub(super) fn gpu_room(backend: &CudaBackend, utilization: f64) -> Result<GpuRoom, CudaError> {
    let (free, total) = backend.memory()?;
    let headroom = (total as f64 * (1.0 - utilization)) as usize;
    Ok(GpuRoom {
        free,
        total,
        bytes: free.saturating_sub(headroom).saturating_sub(GPU_ACTIVATION_RESERVE),
    })
}

/// Bytes of a folder's safetensors files.
pub(super) fn checkpoint_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.len())
        .sum()
}

/// Hands memory the allocator holds but no longer uses back to the system, so that an
/// unloaded model's memory is really free (glibc keeps freed heap memory, in every
/// thread's arena, for reuse otherwise).
pub(super) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the kernel; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

impl ModelManager {
    /// Unloads least recently used idle models until the new model's weights (the
    /// size of its cached checkpoint, when it is cached) fit in the available memory and
    /// in `--models-memory`.
    /// Bytes a new model's weights may take on the device models load to: available host
    /// memory, or on a GPU what `--gpu-memory-utilization` leaves free less the activation
    /// reserve (the KV pools of loaded models fill the rest, so loading a second model
    /// unloads idle ones first).
    pub(super) fn available_for_weights(&self) -> u64 {
        match &self.settings.backend {
            Device::Cpu(_) => available_memory().unwrap_or(usize::MAX) as u64,
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => match gpu_room(b, self.settings.gpu_memory_utilization) {
                Ok(room) => room.bytes as u64,
                Err(_) => u64::MAX, // the load reports the device's state
            },
        }
    }

    pub(super) fn make_room(&self, key: &str) -> Result<(), LoadError> {
        let Ok(dir) = resolve_model(key) else {
            return Ok(()); // not cached: the load reports that
        };
        let need = checkpoint_bytes(&dir.path);
        if let Some(budget) = self.settings.memory_budget.filter(|&b| need > b) {
            return Err(LoadError::OutOfMemory(format!(
                "`{key}` does not fit in --models-memory: its weights take {need} bytes, the budget is {budget}"
            )));
        }
        loop {
            let available = self.available_for_weights();
            let loaded: u64 = self.all_loaded().iter().map(|m| m.weight_bytes).sum();
            let over_budget = self.settings.memory_budget.is_some_and(|b| loaded + need > b);
            if available >= need && !over_budget {
                return Ok(());
            }
            let victim = {
                let mut slots = lock(&self.slots);
                let lru = slots
                    .iter()
                    .filter_map(|(k, s)| match s {
                        Slot::Ready(m) if !self.is_forced(m) => m.idle_for().map(|idle| (k.clone(), idle)),
                        _ => None,
                    })
                    .max_by_key(|(_, idle)| *idle)
                    .map(|(k, _)| k);
                lru.and_then(|k| match slots.remove(&k) {
                    Some(Slot::Ready(m)) => Some(m),
                    _ => None,
                })
            };
            let Some(victim) = victim else {
                let why = if over_budget {
                    format!(
                        "loaded models hold {loaded} of the {} bytes of --models-memory",
                        self.settings.memory_budget.unwrap_or(0)
                    )
                } else {
                    format!("{available} bytes are available")
                };
                return Err(LoadError::OutOfMemory(format!(
                    "no room to load `{key}`: its weights take {need} bytes, {why}, and no idle model is left to unload"
                )));
            };
            crate::info!("unloading {} (least recently used) to make room for {key}", victim.name);
            victim.engine.shutdown();
            drop(victim);
            release_free_memory();
        }
    }
}
