// Attention for prefill, chunked prefill and decode in one kernel: every query row
// reads its sequence's keys and values either from the paged KV pools (through the
// sequence's block table) or from a dense `[m, kv_width]` tensor (an encoder's
// self-attention, a decoder's cross-attention). GQA maps query head h to KV head
// h / (num_heads / num_kv_heads).
//
// Grid (rows, num_heads, splits); 128 threads. A block walks its split of the row's
// visible keys in chunks: each warp scores keys (lanes over head_dim, coalesced), the
// block keeps an online softmax (running max and sum), and each thread accumulates
// output dimensions d = tid + 128 * r. With one split the row is written normalized;
// with several (long contexts, few rows) each split writes (max, sum, acc) and
// `attention_combine_f32` merges them.
//
// `attention_grouped_*` computes the same rows with one block per (query row, KV head,
// split), serving all G = num_heads / num_kv_heads query heads that share the KV head
// (G <= MAX_GROUP): each key and value is read once for the group instead of G times,
// and every head's arithmetic is the per-head kernel's, in the same order.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_CHUNK 128
#define MAX_HEAD_DIM 512
#define ACC_PER_THREAD (MAX_HEAD_DIM / ATT_THREADS)
#define MAX_GROUP 8

struct AttentionArgs {
    const float* q;        // query rows, `q_stride` floats apart (q head h at h * head_dim)
    const void* k;         // paged pool [slots, kv_width] or dense [m, kv_width], f32 or bf16
    const void* v;
    float* out;            // [rows, num_heads * head_dim]
    float* partial;        // [rows, num_heads, splits, head_dim + 2] when splits > 1
    const unsigned* visible; // [rows] keys each row attends to (0..visible)
    const unsigned* row_seq; // [rows] sequence of each row (paged)
    const unsigned* block_tables; // [seqs, max_blocks], null for dense
    int q_stride;
    int kv_width;
    int max_blocks;
    int block_size;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    int split_len;  // keys per split; 0: each row's own (fixed_split_len)
    float scale;
};

// A row's split length under the fixed plan (split_len 0: the grid does not depend on
// the rows' lengths, each row cuts its own keys; backend::attention_plan::split_range).
__device__ __forceinline__ int fixed_split_len(int visible, int splits) {
    const int len = (visible + splits - 1) / splits;
    return max(ATT_CHUNK, (len + ATT_CHUNK - 1) / ATT_CHUNK * ATT_CHUNK);
}

__device__ __forceinline__ size_t key_row(const AttentionArgs& a, int seq, int j) {
    if (a.block_tables == nullptr) return (size_t)j;
    const unsigned block = a.block_tables[(size_t)seq * a.max_blocks + j / a.block_size];
    return (size_t)block * a.block_size + j % a.block_size;
}

template <typename KV>
__device__ void attention(const AttentionArgs& a) {
    const KV* keys = (const KV*)a.k;
    const KV* values = (const KV*)a.v;
    __shared__ float q_s[MAX_HEAD_DIM];
    __shared__ float p_s[ATT_CHUNK];
    __shared__ float scratch[32];
    const int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hd = a.head_dim;
    const int kvh = h / (a.num_heads / a.num_kv_heads);
    const int visible = a.visible[row];
    const int seq = a.row_seq == nullptr ? 0 : a.row_seq[row];
    const int split_len = a.split_len > 0 ? a.split_len : fixed_split_len(visible, splits);
    const int begin = split * split_len;
    const int end = min(visible, begin + split_len);

    const float* q = a.q + (size_t)row * a.q_stride + (size_t)h * hd;
    for (int d = tid; d < hd; d += ATT_THREADS) q_s[d] = q[d] * a.scale;
    __syncthreads();

    float m = -INFINITY, l = 0.0f;
    float acc[ACC_PER_THREAD];
#pragma unroll
    for (int r = 0; r < ACC_PER_THREAD; ++r) acc[r] = 0.0f;

    for (int c0 = begin; c0 < end; c0 += ATT_CHUNK) {
        const int n = min(ATT_CHUNK, end - c0);
        for (int j = warp; j < n; j += ATT_WARPS) {
            const KV* k = keys + key_row(a, seq, c0 + j) * a.kv_width + (size_t)kvh * hd;
            float s = 0.0f;
            for (int d = lane; d < hd; d += 32) s += q_s[d] * to_f32(k[d]);
            s = warp_sum(s);
            if (lane == 0) p_s[j] = s;
        }
        __syncthreads();
        float cm = -INFINITY;
        for (int j = tid; j < n; j += ATT_THREADS) cm = fmaxf(cm, p_s[j]);
        cm = block_max(cm, scratch);
        const float m_new = fmaxf(m, cm);
        const float alpha = expf(m - m_new);
        float ps = 0.0f;
        for (int j = tid; j < n; j += ATT_THREADS) {
            const float p = expf(p_s[j] - m_new);
            p_s[j] = p;
            ps += p;
        }
        ps = block_sum(ps, scratch);  // ends with a barrier: p_s is complete
        l = l * alpha + ps;
        m = m_new;
#pragma unroll
        for (int r = 0; r < ACC_PER_THREAD; ++r) acc[r] *= alpha;
        for (int j = 0; j < n; ++j) {
            const KV* v = values + key_row(a, seq, c0 + j) * a.kv_width + (size_t)kvh * hd;
            const float p = p_s[j];
#pragma unroll
            for (int r = 0; r < ACC_PER_THREAD; ++r) {
                const int d = tid + r * ATT_THREADS;
                if (d < hd) acc[r] += p * to_f32(v[d]);
            }
        }
        __syncthreads();
    }

    if (splits == 1) {
        float* o = a.out + (size_t)row * a.num_heads * hd + (size_t)h * hd;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int r = 0; r < ACC_PER_THREAD; ++r) {
            const int d = tid + r * ATT_THREADS;
            if (d < hd) o[d] = acc[r] * inv;
        }
    } else {
        float* p = a.partial + (((size_t)row * a.num_heads + h) * splits + split) * (hd + 2);
        if (tid == 0) {
            p[0] = m;
            p[1] = l;
        }
#pragma unroll
        for (int r = 0; r < ACC_PER_THREAD; ++r) {
            const int d = tid + r * ATT_THREADS;
            if (d < hd) p[2 + d] = acc[r];
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_f32(const AttentionArgs a) {
    attention<float>(a);
}

// Keys and values stored in bf16 (the KV pools of a bf16 model), f32 arithmetic.
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bf16kv(const AttentionArgs a) {
    attention<bf16_bits>(a);
}

template <typename KV>
__device__ void attention_grouped(const AttentionArgs& a) {
    const KV* keys = (const KV*)a.k;
    const KV* values = (const KV*)a.v;
    __shared__ float q_s[MAX_GROUP * MAX_HEAD_DIM];
    __shared__ float p_s[MAX_GROUP][ATT_CHUNK];
    __shared__ float scratch[32];
    const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hd = a.head_dim;
    const int group = a.num_heads / a.num_kv_heads;
    const int h0 = kvh * group;
    const int visible = a.visible[row];
    const int seq = a.row_seq == nullptr ? 0 : a.row_seq[row];
    const int split_len = a.split_len > 0 ? a.split_len : fixed_split_len(visible, splits);
    const int begin = split * split_len;
    const int end = min(visible, begin + split_len);

    const float* q = a.q + (size_t)row * a.q_stride + (size_t)h0 * hd;
    for (int i = tid; i < group * hd; i += ATT_THREADS) q_s[i] = q[i] * a.scale;
    __syncthreads();

    float m[MAX_GROUP], l[MAX_GROUP];
    float acc[MAX_GROUP][ACC_PER_THREAD];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int r = 0; r < ACC_PER_THREAD; ++r) acc[g][r] = 0.0f;
    }

    for (int c0 = begin; c0 < end; c0 += ATT_CHUNK) {
        const int n = min(ATT_CHUNK, end - c0);
        for (int j = warp; j < n; j += ATT_WARPS) {
            const KV* k = keys + key_row(a, seq, c0 + j) * a.kv_width + (size_t)kvh * hd;
            float s[MAX_GROUP];
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) s[g] = 0.0f;
            for (int d = lane; d < hd; d += 32) {
                const float kd = to_f32(k[d]);
#pragma unroll
                for (int g = 0; g < MAX_GROUP; ++g)
                    if (g < group) s[g] += q_s[g * hd + d] * kd;
            }
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) {
                if (g < group) {
                    const float t = warp_sum(s[g]);
                    if (lane == 0) p_s[g][j] = t;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g >= group) break;
            float cm = -INFINITY;
            for (int j = tid; j < n; j += ATT_THREADS) cm = fmaxf(cm, p_s[g][j]);
            cm = block_max(cm, scratch);
            const float m_new = fmaxf(m[g], cm);
            const float alpha = expf(m[g] - m_new);
            float ps = 0.0f;
            for (int j = tid; j < n; j += ATT_THREADS) {
                const float p = expf(p_s[g][j] - m_new);
                p_s[g][j] = p;
                ps += p;
            }
            ps = block_sum(ps, scratch);  // ends with a barrier: p_s[g] is complete
            l[g] = l[g] * alpha + ps;
            m[g] = m_new;
#pragma unroll
            for (int r = 0; r < ACC_PER_THREAD; ++r) acc[g][r] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            const KV* v = values + key_row(a, seq, c0 + j) * a.kv_width + (size_t)kvh * hd;
#pragma unroll
            for (int r = 0; r < ACC_PER_THREAD; ++r) {
                const int d = tid + r * ATT_THREADS;
                if (d < hd) {
                    const float vd = to_f32(v[d]);
#pragma unroll
                    for (int g = 0; g < MAX_GROUP; ++g)
                        if (g < group) acc[g][r] += p_s[g][j] * vd;
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        if (g >= group) break;
        const int h = h0 + g;
        if (splits == 1) {
            float* o = a.out + (size_t)row * a.num_heads * hd + (size_t)h * hd;
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
#pragma unroll
            for (int r = 0; r < ACC_PER_THREAD; ++r) {
                const int d = tid + r * ATT_THREADS;
                if (d < hd) o[d] = acc[g][r] * inv;
            }
        } else {
            float* p = a.partial + (((size_t)row * a.num_heads + h) * splits + split) * (hd + 2);
            if (tid == 0) {
                p[0] = m[g];
                p[1] = l[g];
            }
#pragma unroll
            for (int r = 0; r < ACC_PER_THREAD; ++r) {
                const int d = tid + r * ATT_THREADS;
                if (d < hd) p[2 + d] = acc[g][r];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_grouped_f32(const AttentionArgs a) {
    attention_grouped<float>(a);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_grouped_bf16kv(const AttentionArgs a) {
    attention_grouped<bf16_bits>(a);
}

// Merges the splits of `attention_f32` / `attention_bf16kv`. Grid (rows, num_heads), 128 threads.
extern "C" __global__ void attention_combine_f32(const float* partial, float* out, int num_heads, int head_dim,
                                                 int splits) {
    const int row = blockIdx.x, h = blockIdx.y;
    const float* p = partial + ((size_t)row * num_heads + h) * splits * (head_dim + 2);
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, p[s * (head_dim + 2)]);
    float l = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = p[s * (head_dim + 2)];
        if (ms != -INFINITY) l += p[s * (head_dim + 2) + 1] * expf(ms - m);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* o = out + (size_t)row * num_heads * head_dim + (size_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = p[s * (head_dim + 2)];
            if (ms != -INFINITY) acc += p[s * (head_dim + 2) + 2 + d] * expf(ms - m);
        }
        o[d] = acc * inv;
    }
}
