//! Attention (kernels/attention.cu): paged attention over the KV pools for prefill,
//! chunked prefill and decode, and dense attention over given K/V tensors, one kernel
//! with a split-K merge for long contexts. CPU reference: `backend::cpu::attention`.

use cudarc::driver::DeviceRepr;

use super::device::{cfg, ok, rows_u32};
use super::{CudaBackend, CudaKvCache, CudaTensor, KvPool};
use crate::backend::{attention_plan, AttentionShape, DenseAttention, ForwardBatch, MAX_HEAD_DIM};

/// Threads of `attention_f32` and its key chunk (kernels/attention.cu).
pub(super) const ATTENTION_THREADS: u32 = 128;

pub(super) const ATTENTION_CHUNK: usize = 128;

/// Most query heads per KV head `attention_grouped_*` serves in one block (`MAX_GROUP`
/// of kernels/attention.cu); wider groups take the per-head kernel.
const MAX_GROUP: usize = 8;

/// Which kernel paged attention takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagedAttention {
    /// The grouped kernel where its grid fills the device, else the per-head one (the
    /// default).
    Auto,
    /// The grouped kernel whenever the group allows it (2 to `MAX_GROUP` query heads per
    /// KV head).
    Grouped,
    /// The per-head kernel always.
    PerHead,
}

impl PagedAttention {
    /// `INFERD_CUDA_ATTENTION`'s values, the default first.
    pub(super) const CHOICES: &'static [(&'static str, Self)] = &[
        ("auto", PagedAttention::Auto),
        ("grouped", PagedAttention::Grouped),
        ("per-head", PagedAttention::PerHead),
    ];
}

/// How attention splits each row's keys over thread blocks
/// (`backend::attention_plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionSplits {
    /// By the batch's longest row (the default).
    ByContext,
    /// By the grid alone, each row cutting its own keys on the device: the launch shape
    /// of a batch size never changes (what a captured graph needs). Off by default until
    /// the GPU suite has passed with it.
    Fixed,
}

impl AttentionSplits {
    /// `INFERD_CUDA_ATTENTION_SPLITS`'s values, the default first.
    pub(super) const CHOICES: &'static [(&'static str, Self)] = &[
        ("context", AttentionSplits::ByContext),
        ("fixed", AttentionSplits::Fixed),
    ];
}

impl CudaBackend {
    /// Sets how attention splits the keys (the GPU suite runs both).
    pub fn set_attention_splits(&self, splits: AttentionSplits) {
        self.inner.attention_splits.set(splits)
    }

    pub fn attention_splits(&self) -> AttentionSplits {
        self.inner.attention_splits.get()
    }

    /// Sets which kernel paged attention takes: both compute the same values in the same
    /// order (the GPU suite runs each).
    pub fn set_paged_attention(&self, kernel: PagedAttention) {
        self.inner.paged_attention.set(kernel)
    }

    pub fn paged_attention(&self) -> PagedAttention {
        self.inner.paged_attention.get()
    }
}

/// The kernel parameters of `attention_f32` (kernels/attention.cu `AttentionArgs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AttentionArgs {
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

impl CudaBackend {
    /// Launches attention (`attention_grouped_*` or the per-head `attention_*`, and the
    /// split merge) over `rows` query rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_rows(
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
        let sm_count = self.inner.sm_count;
        let fixed = self.attention_splits() == AttentionSplits::Fixed;
        let splits_for = |blocks: usize| {
            if fixed {
                attention_plan::fixed_splits(sm_count, blocks)
            } else {
                attention_plan::splits_wanted(sm_count, blocks, max_visible, ATTENTION_CHUNK)
            }
        };
        // One block per KV head serves its whole group of query heads (K/V read once),
        // when that grid still has a block for every other multiprocessor: with fewer
        // (a few decode rows) the per-head kernel's G times more blocks win (on an H200,
        // Qwen2.5-0.5B's 7:1 at batch 1: 4.8 ms a token per head, 7.3 ms grouped).
        let group = shape.num_heads / shape.num_kv_heads;
        let grouped = group > 1
            && group <= MAX_GROUP
            && match self.paged_attention() {
                PagedAttention::Grouped => true,
                PagedAttention::PerHead => false,
                PagedAttention::Auto => {
                    let blocks = rows * shape.num_kv_heads;
                    2 * blocks * splits_for(blocks) >= sm_count
                }
            };
        let heads_per_block = if grouped { group } else { 1 };
        let blocks = rows * shape.num_heads / heads_per_block;
        // Fixed: split length 0, each row cuts its own keys on the device.
        let (splits, split_len) = if fixed {
            (attention_plan::fixed_splits(sm_count, blocks), 0)
        } else {
            attention_plan::splits_by_context(sm_count, blocks, max_visible, ATTENTION_CHUNK)
        };
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
        let grid = (
            rows_u32(rows, "attention"),
            (shape.num_heads / heads_per_block) as u32,
            splits as u32,
        );
        match (grouped, bf16_kv) {
            (true, true) => launch!(self, "attention_grouped_bf16kv", cfg(grid, ATTENTION_THREADS); &args),
            (true, false) => launch!(self, "attention_grouped_f32", cfg(grid, ATTENTION_THREADS); &args),
            (false, true) => launch!(self, "attention_bf16kv", cfg(grid, ATTENTION_THREADS); &args),
            (false, false) => launch!(self, "attention_f32", cfg(grid, ATTENTION_THREADS); &args),
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
}

pub(super) fn attention(
    be: &CudaBackend,
    qkv: &CudaTensor,
    cache: &CudaKvCache,
    layer: usize,
    batch: &ForwardBatch,
    shape: AttentionShape,
) -> CudaTensor {
    let rows = qkv.rows;
    let out = be.tensor(rows, shape.q_width(), "attention");
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
    let x = be.ptr(&qkv.buf);
    be.attention_rows(
        x,
        qkv.cols,
        be.ptr(&out.buf),
        (
            be.pool_ptr(&cache.k[layer]),
            be.pool_ptr(&cache.v[layer]),
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

pub(super) fn attention_dense(
    be: &CudaBackend,
    q: &CudaTensor,
    seqs: &[DenseAttention<'_, CudaTensor>],
    shape: AttentionShape,
    causal: bool,
) -> CudaTensor {
    let q_width = shape.q_width();
    crate::backend::check_dense_attention((q.rows, q.cols), seqs, shape, causal, |t| (t.rows, t.cols));
    // Rows no sequence covers are zero, as on the CPU.
    let covered: usize = seqs.iter().map(|s| s.q_len).sum();
    let out = if covered < q.rows {
        CudaTensor {
            buf: ok(
                be.inner.stream.alloc_zeros::<f32>((q.rows * q_width).max(1)),
                "attention_dense",
            ),
            rows: q.rows,
            cols: q_width,
        }
    } else {
        be.tensor(q.rows, q_width, "attention_dense")
    };
    let f = std::mem::size_of::<f32>() as u64;
    for seq in seqs {
        let m = seq.k.rows;
        let visible: Vec<u32> = (0..seq.q_len)
            .map(|i| if causal { (m + i + 1).saturating_sub(seq.q_len) } else { m } as u32)
            .collect();
        be.attention_rows(
            be.ptr(&q.buf) + (seq.q_start * q.cols) as u64 * f,
            q.cols,
            be.ptr(&out.buf) + (seq.q_start * shape.q_width()) as u64 * f,
            (be.ptr(&seq.k.buf), be.ptr(&seq.v.buf), false),
            seq.k.cols,
            &visible,
            None,
            None,
            shape,
        );
    }
    out
}
