// Layout ops: embedding lookup (f32 or bf16 table), row gathers and the 1-D im2col of
// a conv stem. Launched by src/backend/cuda/layout.rs; CPU reference
// src/backend/cpu/layout.rs.
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
