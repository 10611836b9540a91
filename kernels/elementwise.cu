// Gathers, activations and layout changes: embedding lookup, silu*mul, GELU, adds, bias
// broadcast (the GEMM then accumulates onto it), f32 -> bf16 rounding, rotary
// embedding, row gathers and the 1-D im2col of a conv stem.
#include "common.cuh"

template <typename W>
__device__ void embedding(const W* table, const unsigned* ids, float* out, int hidden) {
    const size_t row = blockIdx.x;
    const W* src = table + (size_t)ids[row] * hidden;
    float* dst = out + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_f32(src[i]);
}

extern "C" __global__ void embedding_f32(const float* table, const unsigned* ids, float* out, int hidden) {
    embedding(table, ids, out, hidden);
}

extern "C" __global__ void embedding_bf16(const bf16_bits* table, const unsigned* ids, float* out, int hidden) {
    embedding(table, ids, out, hidden);
}

// gate_up [rows, 2 * inter] -> silu(gate) * up [rows, inter]
extern "C" __global__ void silu_mul_f32(const float* gate_up, float* out, int rows, int inter) {
    const size_t total = (size_t)rows * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i % inter;
        const float g = gate_up[r * 2 * inter + c];
        const float u = gate_up[r * 2 * inter + inter + c];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

extern "C" __global__ void gelu_f32(float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void add_f32(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// out[r, c] = bias[c]
extern "C" __global__ void bias_rows_f32(float* out, const float* bias, int rows, int cols) {
    const size_t total = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bias[i % cols];
}

// Round to nearest even, as torch's `.to(torch.bfloat16)`.
extern "C" __global__ void cast_f32_bf16(const float* x, bf16_bits* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
}

// Rotate-half rotary embedding of the q and k heads of each qkv row, in place.
// One block per row; pairs (x[i], x[i + d/2]) of every head.
extern "C" __global__ void rotary_f32(float* qkv, const unsigned* positions, const float* inv_freq, int qkv_width,
                                      int num_qk_heads, int head_dim) {
    const int half = head_dim / 2;
    float* row = qkv + (size_t)blockIdx.x * qkv_width;
    const float pos = (float)positions[blockIdx.x];
    for (int j = threadIdx.x; j < num_qk_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float* x = row + (size_t)h * head_dim;
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
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
        float s, c;
        sincosf((float)pos[stream] * inv_freq[i], &s, &c);
        float* x = row + (size_t)h * head_dim;
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

extern "C" __global__ void gather_rows_f32(const float* x, const unsigned* rows, float* out, int cols) {
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// x [len, channels] -> out [out_len, channels * kernel], column c * kernel + t holding
// x[p * stride + t - pad][c] (zero outside).
extern "C" __global__ void im2col_1d_f32(const float* x, float* out, int len, int channels, int kernel, int stride,
                                         int pad) {
    const int p = blockIdx.x;
    float* dst = out + (size_t)p * channels * kernel;
    for (int j = threadIdx.x; j < channels * kernel; j += blockDim.x) {
        const int c = j / kernel, t = j % kernel;
        const int src = p * stride + t - pad;
        dst[j] = (src >= 0 && src < len) ? x[(size_t)src * channels + c] : 0.0f;
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
