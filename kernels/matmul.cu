// The GEMM's helpers around cuBLAS: a bias broadcast into the output (the GEMM then
// accumulates onto it) and the f32 -> bf16 rounding of its input. Launched by
// src/backend/cuda/matmul.rs.
#include "common.cuh"

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
