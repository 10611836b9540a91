//! How an engine is sized: block size, batch limits, and the KV pool's block count,
//! from a byte budget or a share of the memory available now.

use crate::backend::Backend;
use crate::models::EngineModel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool (see `EngineConfig::with_budget`).
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Requests accepted but not yet running, beyond which `submit` says overloaded.
    pub max_waiting: usize,
    /// Async scheduling: the forward pass runs on a thread of its own, and the engine
    /// plans step N+1 (taking the tokens step N chooses on the device as its inputs)
    /// and reads step N's outputs while N+1 computes.
    pub async_scheduling: bool,
    /// Decode-only steps are padded to a batch size of `decode_buckets` with rows that
    /// write to a scratch KV block (one block more in the cache, never handed out), so
    /// that such steps come in a few fixed shapes: what CUDA graphs are captured for.
    /// The padded rows cost compute and change no real row's values.
    pub pad_decode_batches: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_blocks: 4096,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_waiting: 1024,
            // The CLI decides per device; engines made in code follow the environment
            // (the test suite runs the engine tests both ways).
            async_scheduling: std::env::var("INFERD_ASYNC_SCHEDULING").is_ok_and(|v| v == "1"),
            pad_decode_batches: false,
        }
    }
}

/// The batch sizes decode-only steps are padded to (`EngineConfig::pad_decode_batches`):
/// 1, 2, 4, 8, 16, then every multiple of 16 up to `max_num_seqs`, and `max_num_seqs`
/// itself.
pub fn decode_buckets(max_num_seqs: usize) -> Vec<usize> {
    let mut buckets: Vec<usize> = [1, 2, 4, 8]
        .into_iter()
        .chain((16..).step_by(16))
        .take_while(|&b| b < max_num_seqs)
        .collect();
    buckets.push(max_num_seqs);
    buckets
}

/// The smallest bucket holding `rows` (`rows` itself beyond the largest).
pub fn bucket_for(buckets: &[usize], rows: usize) -> usize {
    buckets.iter().copied().find(|&b| b >= rows).unwrap_or(rows)
}

/// How much memory the KV pool may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheBudget {
    Bytes(usize),
    /// A fraction of the memory available now (`MemAvailable` in /proc/meminfo).
    FractionOfAvailable(f64),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot read the available memory ({0}); give the KV cache size in bytes")]
    NoMemInfo(String),
    #[error("the KV cache budget of {bytes} bytes holds no block of {block_bytes} bytes")]
    TooSmall { bytes: usize, block_bytes: usize },
    #[error("the KV cache fraction must be in (0, 1], got {0}")]
    BadFraction(f64),
}

impl EngineConfig {
    /// Bytes of f32 K and V one block takes for this model.
    pub fn bytes_per_block<B: Backend, M: EngineModel<B>>(model: &M, block_size: usize) -> usize {
        Self::block_bytes(model, block_size, std::mem::size_of::<f32>())
    }

    fn block_bytes<B: Backend, M: EngineModel<B>>(model: &M, block_size: usize, element_bytes: usize) -> usize {
        let shape = model.kv_cache_shape(1, block_size);
        2 * shape.num_layers * shape.elements_per_layer() * element_bytes
    }

    /// Sets `num_blocks` from a memory budget for f32 pools (the CPU backend's), never
    /// more than `max_num_seqs` sequences of the full context window can use. For models
    /// that keep state per request, half the budget at most goes to it, lowering
    /// `max_num_seqs` to what fits.
    pub fn with_budget<B: Backend, M: EngineModel<B>>(
        self,
        model: &M,
        budget: KvCacheBudget,
    ) -> Result<Self, BudgetError> {
        self.with_budget_for(model, budget, std::mem::size_of::<f32>())
    }

    /// `with_budget` for pools of `kv_element_bytes` per element (`Backend::kv_bytes_per_element`).
    pub fn with_budget_for<B: Backend, M: EngineModel<B>>(
        mut self,
        model: &M,
        budget: KvCacheBudget,
        kv_element_bytes: usize,
    ) -> Result<Self, BudgetError> {
        let bytes = match budget {
            KvCacheBudget::Bytes(b) => b,
            KvCacheBudget::FractionOfAvailable(f) if f > 0.0 && f <= 1.0 => {
                let meminfo =
                    std::fs::read_to_string("/proc/meminfo").map_err(|e| BudgetError::NoMemInfo(e.to_string()))?;
                (mem_available_bytes(&meminfo).ok_or_else(|| BudgetError::NoMemInfo("no MemAvailable line".into()))?
                    as f64
                    * f) as usize
            }
            KvCacheBudget::FractionOfAvailable(f) => return Err(BudgetError::BadFraction(f)),
        };
        // Per-request state outside the KV pool (an encoder's output): half the budget
        // at most, which caps how many sequences run at once.
        let mut bytes = bytes;
        let per_request = model.bytes_per_request();
        if let Some(fit) = (bytes / 2).checked_div(per_request) {
            self.max_num_seqs = self.max_num_seqs.min(fit.max(1));
            bytes = bytes.saturating_sub(self.max_num_seqs * per_request);
        }
        let block_bytes = Self::block_bytes(model, self.block_size, kv_element_bytes);
        let affordable = bytes / block_bytes;
        if affordable == 0 {
            return Err(BudgetError::TooSmall { bytes, block_bytes });
        }
        let useful = self.max_num_seqs * model.max_positions().div_ceil(self.block_size);
        self.num_blocks = affordable.min(useful);
        Ok(self)
    }
}

/// Memory the kernel says is available now (`MemAvailable`), in bytes.
pub fn available_memory() -> Option<usize> {
    mem_available_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The machine's whole memory (`MemTotal`), in bytes.
pub fn total_memory() -> Option<usize> {
    meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
}

/// `MemAvailable` from /proc/meminfo text, in bytes.
fn mem_available_bytes(meminfo: &str) -> Option<usize> {
    meminfo_bytes(meminfo, "MemAvailable:")
}

fn meminfo_bytes(meminfo: &str, key: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(mem_available_bytes(text), Some(12_345_678 * 1024));
        assert_eq!(mem_available_bytes("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn decode_buckets_double_to_16_then_step_by_16() {
        assert_eq!(decode_buckets(1), [1]);
        assert_eq!(decode_buckets(6), [1, 2, 4, 6]);
        assert_eq!(decode_buckets(16), [1, 2, 4, 8, 16]);
        assert_eq!(decode_buckets(40), [1, 2, 4, 8, 16, 32, 40]);
        let b = decode_buckets(256);
        assert_eq!(b.len(), 4 + 16);
        assert_eq!(&b[..6], [1, 2, 4, 8, 16, 32]);
        assert_eq!(b.last(), Some(&256));
        assert_eq!(bucket_for(&b, 1), 1);
        assert_eq!(bucket_for(&b, 3), 4);
        assert_eq!(bucket_for(&b, 17), 32);
        assert_eq!(bucket_for(&b, 256), 256);
        assert_eq!(bucket_for(&[1, 2], 3), 3);
    }
}
