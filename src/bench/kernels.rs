//! `inferd bench --kernels`: each kernel family of a decoder step, in a model's shapes,
//! timed on the chosen backend through the backend trait, with the bytes it must move
//! per call and what fraction of the backend's own streaming bandwidth that makes (the
//! "bytes moved / time" of llm.c's kernel benchmarks). The reference is the backend's
//! `add` of two 64 MiB tensors in place (`x += y`: two reads and a write per element, no
//! allocation), the streaming bandwidth every memory-bound kernel is judged against.
//! Other kernels allocate their outputs, as they do in a forward pass. The same code
//! times the CPU backend here and the CUDA kernels on a GPU.

use std::path::Path;
use std::time::Instant;

use crate::backend::{AttentionShape, Backend, ForwardBatch, KvCacheShape, RowSampling, SeqChunk, WeightDtype};
use crate::engine::sampling::Rng;
use crate::loader::{Dtype, TensorView};
use crate::models::config::DecoderConfig;

/// The sizes the kernels run at.
#[derive(Debug, Clone)]
pub struct KernelBench {
    pub hidden: usize,
    pub intermediate: usize,
    pub attention: AttentionShape,
    pub vocab: usize,
    /// Rows of the per-token kernels (norms, activation, rotary, KV writes): a step's
    /// token budget.
    pub tokens: usize,
    /// Sequences of the decode kernels (attention, the GEMV, sampling), one run each.
    pub batches: Vec<usize>,
    /// Each decode sequence's context.
    pub context: usize,
    /// Bytes of one matrix weight element (2 for bf16, 4 for f32).
    pub weight_bytes: usize,
    /// Each kernel is called until this much time has passed (at least 3 calls).
    pub min_secs: f64,
}

impl KernelBench {
    /// A model's shapes (its config.json alone: no weights are read).
    pub fn from_config(config: &DecoderConfig, weights: WeightDtype) -> Self {
        KernelBench {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            attention: AttentionShape {
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            vocab: config.vocab_size,
            tokens: 2048,
            batches: vec![1, 16, 64],
            context: 1024,
            weight_bytes: if weights == WeightDtype::F32 { 4 } else { 2 },
            min_secs: 0.2,
        }
    }

    pub fn from_dir(dir: &Path, weights: WeightDtype) -> Result<Self, String> {
        let config = DecoderConfig::from_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self::from_config(&config, weights))
    }
}

/// The reference family's name.
pub const STREAM: &str = "stream (x += y)";

/// One kernel family's timing.
#[derive(Debug, Clone)]
pub struct KernelTiming {
    pub family: &'static str,
    /// The shape it ran at, in words.
    pub shape: String,
    pub micros: f64,
    /// What one call must read and write at least.
    pub bytes: f64,
}

impl KernelTiming {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes / (self.micros * 1e-6) / 1e9
    }
}

/// Seconds per call of `f`, called in doubling rounds (each ended by a synchronize, so a
/// device's queued work is counted) until `min_secs` have passed.
fn time<B: Backend>(backend: &B, min_secs: f64, mut f: impl FnMut()) -> f64 {
    f();
    backend.synchronize();
    let (mut calls, mut round) = (0usize, 1usize);
    let start = Instant::now();
    loop {
        for _ in 0..round {
            f();
        }
        backend.synchronize();
        calls += round;
        let elapsed = start.elapsed().as_secs_f64();
        if calls >= 3 && elapsed >= min_secs {
            return elapsed / calls as f64;
        }
        round *= 2;
    }
}

/// Reproducible inputs: uniform in [-scale, scale), from the engine's seeded RNG.
struct Values(Rng);

impl Values {
    fn take(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.0.next_f64() * 2.0 - 1.0) as f32) * scale)
            .collect()
    }
}

/// Runs every family; the stream reference first (the others are read against it).
pub fn run<B: Backend>(backend: &B, bench: &KernelBench) -> Vec<KernelTiming> {
    let mut values = Values(Rng::seeded(0));
    let mut out = Vec::new();
    let f = std::mem::size_of::<f32>() as f64;
    let min = bench.min_secs;
    let mut timed = |family: &'static str, shape: String, bytes: f64, secs: f64| {
        out.push(KernelTiming {
            family,
            shape,
            micros: secs * 1e6,
            bytes,
        })
    };

    // The reference: `x += y` over 64 MiB tensors, in place (no allocation to time).
    let (rows, cols) = (4096, 4096);
    let mut big = backend.upload(values.take(rows * cols, 1.0), rows, cols);
    let other = backend.upload(values.take(rows * cols, 1.0), rows, cols);
    let secs = time(backend, min, || backend.add(&mut big, &other));
    let bytes = 3.0 * (rows * cols) as f64 * f;
    timed(STREAM, format!("{rows}x{cols} f32"), bytes, secs);
    drop((big, other));

    let (t, h, i) = (bench.tokens, bench.hidden, bench.intermediate);
    let norm_weight = backend.weight_from_f32(values.take(h, 1.0));
    let x = backend.upload(values.take(t * h, 1.0), t, h);
    let secs = time(backend, min, || drop(backend.rms_norm(&x, &norm_weight, 1e-6)));
    timed("rms_norm", format!("{t}x{h}"), 2.0 * (t * h) as f64 * f, secs);
    let mut residual = backend.upload(values.take(t * h, 1.0), t, h);
    let secs = time(backend, min, || {
        drop(backend.add_rms_norm(&mut residual, &x, &norm_weight, 1e-6))
    });
    timed("add_rms_norm", format!("{t}x{h}"), 4.0 * (t * h) as f64 * f, secs);
    drop((x, residual));

    let gate_up = backend.upload(values.take(t * 2 * i, 1.0), t, 2 * i);
    let secs = time(backend, min, || drop(backend.silu_mul(&gate_up)));
    timed("silu_mul", format!("{t}x{}", 2 * i), 3.0 * (t * i) as f64 * f, secs);
    drop(gate_up);

    let shape = bench.attention;
    let half = shape.head_dim / 2;
    let inv_freq = backend.weight_from_f32(
        (0..half)
            .map(|k| 1.0 / 10000f32.powf(2.0 * k as f32 / shape.head_dim as f32))
            .collect(),
    );
    let positions: Vec<u32> = (0..t as u32).collect();
    let mut qkv = backend.upload(values.take(t * shape.qkv_width(), 1.0), t, shape.qkv_width());
    let secs = time(backend, min, || backend.rotary(&mut qkv, &positions, &inv_freq, shape));
    let rotated = (shape.q_width() + shape.kv_width()) as f64;
    timed("rotary", format!("{t} tokens"), 2.0 * t as f64 * rotated * f, secs);

    // The paged KV cache of one layer, holding every decode sequence's context.
    let block_size = 16;
    let most = bench.batches.iter().copied().max().unwrap_or(1);
    let blocks_per_seq = bench.context.div_ceil(block_size);
    let num_blocks = (most * blocks_per_seq).max(t.div_ceil(block_size));
    let mut cache = backend.alloc_kv_cache(KvCacheShape {
        num_layers: 1,
        num_blocks,
        block_size,
        num_kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
    });
    let kv_bytes = backend.kv_bytes_per_element() as f64;
    let slots: Vec<u32> = (0..t as u32).collect();
    let secs = time(backend, min, || backend.write_kv(&mut cache, 0, &qkv, &slots, shape));
    let kv_row = shape.kv_width() as f64;
    timed(
        "write_kv",
        format!("{t} tokens"),
        2.0 * t as f64 * kv_row * (f + kv_bytes),
        secs,
    );
    // Fill every sequence's context (its slots, written a token budget at a time).
    let slots_total = num_blocks * block_size;
    let fill = t.max(4096);
    for start in (0..slots_total).step_by(fill) {
        let n = fill.min(slots_total - start);
        let chunk = backend.upload(values.take(n * shape.qkv_width(), 1.0), n, shape.qkv_width());
        let slots: Vec<u32> = (start as u32..(start + n) as u32).collect();
        backend.write_kv(&mut cache, 0, &chunk, &slots, shape);
    }
    drop(qkv);

    let gate_up_weight = bf16_weight(backend, &mut values, 2 * i, h);
    for &batch in &bench.batches {
        let decode = ForwardBatch {
            token_ids: vec![0; batch],
            positions: vec![bench.context as u32 - 1; batch],
            slot_mapping: (0..batch)
                .map(|s| (s * blocks_per_seq * block_size + bench.context - 1) as u32)
                .collect(),
            seqs: (0..batch)
                .map(|s| SeqChunk {
                    key: s as u64,
                    query_start: s,
                    query_len: 1,
                    context_len: bench.context,
                    block_table: (s * blocks_per_seq..(s + 1) * blocks_per_seq)
                        .map(|b| b as u32)
                        .collect(),
                })
                .collect(),
            block_size,
        };
        let q = backend.upload(values.take(batch * shape.qkv_width(), 1.0), batch, shape.qkv_width());
        let secs = time(backend, min, || drop(backend.attention(&q, &cache, 0, &decode, shape)));
        let read = (batch * bench.context) as f64 * kv_row * 2.0 * kv_bytes;
        timed(
            "attention (decode)",
            format!(
                "{batch} x {} context, {}:{} heads, dim {}",
                bench.context, shape.num_heads, shape.num_kv_heads, shape.head_dim
            ),
            read,
            secs,
        );

        let x = backend.upload(values.take(batch * h, 1.0), batch, h);
        let secs = time(backend, min, || drop(backend.linear(&x, &gate_up_weight, None)));
        let weight_read = (2 * i * h) as f64 * bench.weight_bytes as f64;
        timed(
            "linear (gate_up)",
            format!("{batch} x {h} -> {}", 2 * i),
            weight_read,
            secs,
        );

        let logits = backend.upload(values.take(batch * bench.vocab, 8.0), batch, bench.vocab);
        let picked: Vec<usize> = (0..batch).collect();
        let row_bytes = (batch * bench.vocab) as f64 * f;
        let secs = time(backend, min, || drop(backend.argmax_rows(&logits, &picked)));
        timed("argmax_rows", format!("{batch} x {}", bench.vocab), row_bytes, secs);
        let top_p = RowSampling {
            temperature: 0.8,
            top_k: None,
            top_p: 0.9,
            min_p: 0.0,
            uniform: 0.5,
            edits: Vec::new(),
            logprobs: None,
        };
        let sampling: Vec<&RowSampling> = vec![&top_p; batch];
        let secs = time(backend, min, || drop(backend.sample_rows(&logits, &picked, &sampling)));
        timed(
            "sample_rows (top-p)",
            format!("{batch} x {}", bench.vocab),
            row_bytes,
            secs,
        );
    }
    out
}

/// A `[rows, cols]` matrix of random bf16 values, stored as the backend stores weights.
fn bf16_weight<B: Backend>(backend: &B, values: &mut Values, rows: usize, cols: usize) -> B::Weight {
    let bytes: Vec<u8> = values
        .take(rows * cols, 0.05)
        .into_iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let shape = [rows, cols];
    backend.weight(&TensorView {
        name: "bench.weight",
        path: Path::new("bench"),
        dtype: Dtype::BF16,
        shape: &shape,
        bytes: &bytes,
    })
}

/// The timings as a table, each family's bandwidth against the stream reference's.
pub fn table(timings: &[KernelTiming]) -> String {
    let stream = timings
        .iter()
        .find(|t| t.family == STREAM)
        .map_or(f64::NAN, KernelTiming::gb_per_s);
    let mut out = format!(
        "{:<20} {:<44} {:>12} {:>10} {:>9} {:>9}\n",
        "kernel", "shape", "us/call", "MB/call", "GB/s", "of stream"
    );
    for t in timings {
        out.push_str(&format!(
            "{:<20} {:<44} {:>12.1} {:>10.3} {:>9.1} {:>8.0}%\n",
            t.family,
            t.shape,
            t.micros,
            t.bytes / 1e6,
            t.gb_per_s(),
            100.0 * t.gb_per_s() / stream
        ));
    }
    out
}
