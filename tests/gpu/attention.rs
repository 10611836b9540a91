//! kernels/attention.cu (and the KV writes of kernels/rotary.cu) against
//! `backend::cpu::attention`.

use super::*;

/// One attention case: sequences as (context length, new tokens).
fn attention_case(
    c: &CpuBackend,
    g: &CudaBackend,
    rng: &mut Rng,
    shape: AttentionShape,
    seqs: &[(usize, usize)],
    block_size: usize,
) {
    let blocks_per: Vec<usize> = seqs.iter().map(|&(ctx, _)| ctx.div_ceil(block_size)).collect();
    let num_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
    // Blocks handed out in a shuffled order, so tables are not contiguous.
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let kv_shape = inferd::backend::KvCacheShape {
        num_layers: 1,
        num_blocks,
        block_size,
        num_kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
    };
    let mut cache_c = c.alloc_kv_cache(kv_shape);
    let mut cache_g = g.alloc_kv_cache(kv_shape);
    let width = shape.qkv_width();
    let mut batch = ForwardBatch {
        block_size,
        ..ForwardBatch::default()
    };
    let (mut prefix_slots, mut prefix_rows) = (Vec::new(), 0usize);
    for (&(ctx, new), &nb) in seqs.iter().zip(&blocks_per) {
        let table: Vec<u32> = free.drain(..nb).collect();
        let slot = |p: usize| table[p / block_size] * block_size as u32 + (p % block_size) as u32;
        prefix_slots.extend((0..ctx - new).map(slot));
        prefix_rows += ctx - new;
        let start = batch.token_ids.len();
        for p in ctx - new..ctx {
            batch.token_ids.push(0);
            batch.positions.push(p as u32);
            batch.slot_mapping.push(slot(p));
        }
        batch.seqs.push(SeqChunk {
            key: 0,
            query_start: start,
            query_len: new,
            context_len: ctx,
            block_table: table,
        });
    }
    // The cached prefix, then this step's rows (their K/V written first, as models do).
    // A bf16 KV pool stores keys and values rounded to bf16: inputs already on the bf16
    // grid are stored exactly, so the CPU's f32 pool is still the reference.
    let bf16_kv = g.kv_bytes_per_element() == 2;
    let values = |rng: &mut Rng, n: usize, scale: f32| -> Vec<f32> {
        let v = rng.vec(n, scale);
        if bf16_kv {
            v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
        } else {
            v
        }
    };
    if prefix_rows > 0 {
        let prefix = pair(c, g, values(rng, prefix_rows * width, 1.0), prefix_rows, width);
        c.write_kv(&mut cache_c, 0, &prefix.cpu, &prefix_slots, shape);
        g.write_kv(&mut cache_g, 0, &prefix.gpu, &prefix_slots, shape);
    }
    let rows = batch.num_tokens();
    let qkv = pair(c, g, values(rng, rows * width, 2.0), rows, width);
    c.write_kv(&mut cache_c, 0, &qkv.cpu, &batch.slot_mapping, shape);
    g.write_kv(&mut cache_g, 0, &qkv.gpu, &batch.slot_mapping, shape);
    let oc = c.attention(&qkv.cpu, &cache_c, 0, &batch, shape);
    let og = g.attention(&qkv.gpu, &cache_g, 0, &batch, shape);
    let max_ctx = seqs.iter().map(|s| s.0).max().unwrap_or(0);
    check(
        &format!(
            "attention {}/{}x{} over {} sequences (longest {max_ctx}, {rows} rows, block {block_size}, bf16 KV {bf16_kv}, kernel {:?}, splits {:?})",
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            seqs.len(),
            g.paged_attention(),
            g.attention_splits()
        ),
        &host_gpu(g, og),
        &host_cpu(c, oc),
        1e-5,
    );
}

#[test]
fn paged_attention_matches_the_cpu_over_batches_contexts_and_gqa() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(42);
    // Both paged kernels, forced (grouped: one block per KV head for groups of 2 to 8;
    // per head; the models' tests run the default's choice between them); 24/3 is the
    // widest group the grouped kernel takes, 32/2 falls back to per head.
    // Each with the keys split by the batch's longest row and by the grid alone (fixed,
    // each row cutting its own: `backend::attention_plan`).
    let kernels = [PagedAttention::Grouped, PagedAttention::PerHead]
        .into_iter()
        .flat_map(|k| [AttentionSplits::ByContext, AttentionSplits::Fixed].map(|s| (k, s)));
    for ((kernel, splits), (heads, kv_heads, hd)) in kernels.flat_map(|kernel| {
        [
            (8, 8, 64),
            (16, 8, 128),
            (14, 2, 64),
            (28, 4, 128),
            (7, 1, 128),
            (24, 3, 64),
            (32, 2, 64),
        ]
        .map(|s| (kernel, s))
    }) {
        g.set_paged_attention(kernel);
        g.set_attention_splits(splits);
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        // Decode of one sequence over contexts from 1 to 8k (split over the keys).
        for ctx in [1, 2, 17, 129, 1000, 4097, 8192] {
            attention_case(&c, &g, &mut rng, shape, &[(ctx, 1)], 16);
        }
        // Decode batches of 1..256 sequences of mixed lengths.
        for n in [1, 2, 31, 256] {
            let seqs: Vec<(usize, usize)> = (0..n).map(|_| (1 + rng.below(700), 1)).collect();
            attention_case(&c, &g, &mut rng, shape, &seqs, 16);
        }
        // Prefill (whole prompts), chunked prefill over cached prefixes, and decodes mixed
        // in one step, with odd block sizes.
        attention_case(&c, &g, &mut rng, shape, &[(300, 300)], 16);
        attention_case(&c, &g, &mut rng, shape, &[(2048, 2048)], 32);
        attention_case(&c, &g, &mut rng, shape, &[(700, 64), (33, 33), (1500, 1), (5, 2)], 7);
        attention_case(&c, &g, &mut rng, shape, &[(4100, 100), (9, 9), (1, 1)], 16);
    }
}

/// The bf16 KV pools (every mode but `--dtype float32`): writes and attention over them.
#[test]
fn paged_attention_over_bf16_pools_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::Bf16) else { return };
    assert_eq!(g.kv_bytes_per_element(), 2);
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(43);
    for ((kernel, splits), (heads, kv_heads, hd)) in [PagedAttention::Grouped, PagedAttention::PerHead]
        .into_iter()
        .flat_map(|k| [AttentionSplits::ByContext, AttentionSplits::Fixed].map(|s| (k, s)))
        .flat_map(|kernel| [(14, 2, 64), (32, 8, 128), (7, 1, 128)].map(|s| (kernel, s)))
    {
        g.set_paged_attention(kernel);
        g.set_attention_splits(splits);
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        for ctx in [1, 300, 8192] {
            attention_case(&c, &g, &mut rng, shape, &[(ctx, 1)], 16);
        }
        let seqs: Vec<(usize, usize)> = (0..64).map(|_| (1 + rng.below(700), 1)).collect();
        attention_case(&c, &g, &mut rng, shape, &seqs, 16);
        attention_case(&c, &g, &mut rng, shape, &[(700, 64), (33, 33), (1500, 1), (5, 2)], 7);
    }
}

#[test]
fn dense_attention_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(77);
    for (heads, hd) in [(6, 64), (20, 64), (8, 128)] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hd,
        };
        for causal in [false, true] {
            // Two sequences: an encoder's 1500 frames, and a short one.
            let (m1, m2, q1, q2) = (1500, 40, if causal { 1500 } else { 3 }, 7);
            let rows = q1 + q2;
            let q = pair(&c, &g, rng.vec(rows * shape.q_width(), 2.0), rows, shape.q_width());
            let k1 = pair(&c, &g, rng.vec(m1 * shape.kv_width(), 1.0), m1, shape.kv_width());
            let v1 = pair(&c, &g, rng.vec(m1 * shape.kv_width(), 1.0), m1, shape.kv_width());
            let k2 = pair(&c, &g, rng.vec(m2 * shape.kv_width(), 1.0), m2, shape.kv_width());
            let v2 = pair(&c, &g, rng.vec(m2 * shape.kv_width(), 1.0), m2, shape.kv_width());
            let seqs_c = [
                DenseAttention {
                    q_start: 0,
                    q_len: q1,
                    k: &k1.cpu,
                    v: &v1.cpu,
                },
                DenseAttention {
                    q_start: q1,
                    q_len: q2,
                    k: &k2.cpu,
                    v: &v2.cpu,
                },
            ];
            let seqs_g = [
                DenseAttention {
                    q_start: 0,
                    q_len: q1,
                    k: &k1.gpu,
                    v: &v1.gpu,
                },
                DenseAttention {
                    q_start: q1,
                    q_len: q2,
                    k: &k2.gpu,
                    v: &v2.gpu,
                },
            ];
            let oc = c.attention_dense(&q.cpu, &seqs_c, shape, causal);
            let og = g.attention_dense(&q.gpu, &seqs_g, shape, causal);
            check(
                &format!("attention_dense {heads}x{hd} causal={causal}"),
                &host_gpu(&g, og),
                &host_cpu(&c, oc),
                1e-5,
            );
        }
    }
}
