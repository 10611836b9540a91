// Rotary embeddings and KV writes: rotate-half rotary of the q and k heads (one
// position stream, or M-RoPE's three), and each new token's K and V into its paged slot.
// Launched by src/backend/cuda/rotary.rs; CPU reference src/backend/cpu/rotary.rs.
#include "common.cuh"

// Rotate-half rotary embedding of the q and k heads of each qkv row, in place. One
// block per row; pairs (x[i], x[i + d/2]) of every head.

// Turns pair i of the head at `x` by `angle`.
__device__ __forceinline__ void rotate_pair(float* x, int i, int half, float angle) {
    float s, c;
    sincosf(angle, &s, &c);
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;
    x[i + half] = x2 * c + x1 * s;
}

extern "C" __global__ void rotary_f32(float* qkv, const unsigned* positions, const float* inv_freq, int qkv_width,
                                      int num_qk_heads, int head_dim) {
    const int half = head_dim / 2;
    float* row = qkv + (size_t)blockIdx.x * qkv_width;
    const float pos = (float)positions[blockIdx.x];
    for (int j = threadIdx.x; j < num_qk_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        rotate_pair(row + (size_t)h * head_dim, i, half, pos * inv_freq[i]);
    }
}

// rotary_f32 over three position streams per row (positions [rows, 3]): frequency i
// takes stream 0 below s0, stream 1 below s0 + s1, else stream 2.
extern "C" __global__ void rotary_sections_f32(float* qkv, const unsigned* positions, const float* inv_freq,
                                               int qkv_width, int num_qk_heads, int head_dim, int s0, int s1) {
    const int half = head_dim / 2;
    float* row = qkv + (size_t)blockIdx.x * qkv_width;
    const unsigned* pos = positions + (size_t)blockIdx.x * 3;
    for (int j = threadIdx.x; j < num_qk_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        const int stream = (i >= s0) + (i >= s0 + s1);
        rotate_pair(row + (size_t)h * head_dim, i, half, (float)pos[stream] * inv_freq[i]);
    }
}

// K and V parts of each qkv row -> the paged pools, `[slot, num_kv_heads * head_dim]`,
// f32 or bf16 (rounded to nearest even).
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16_bits* p, float v) { *p = __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

template <typename KV>
__device__ void write_kv(const float* qkv, KV* k_pool, KV* v_pool, const unsigned* slots, int qkv_width, int q_width,
                         int kv_width) {
    const float* row = qkv + (size_t)blockIdx.x * qkv_width;
    const size_t at = (size_t)slots[blockIdx.x] * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        store(k_pool + at + i, row[q_width + i]);
        store(v_pool + at + i, row[q_width + kv_width + i]);
    }
}

extern "C" __global__ void write_kv_f32(const float* qkv, float* k_pool, float* v_pool, const unsigned* slots,
                                        int qkv_width, int q_width, int kv_width) {
    write_kv(qkv, k_pool, v_pool, slots, qkv_width, q_width, kv_width);
}

extern "C" __global__ void write_kv_bf16(const float* qkv, bf16_bits* k_pool, bf16_bits* v_pool, const unsigned* slots,
                                         int qkv_width, int q_width, int kv_width) {
    write_kv(qkv, k_pool, v_pool, slots, qkv_width, q_width, kv_width);
}
