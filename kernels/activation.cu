// Elementwise activations: silu(gate) * up, exact GELU, in-place adds. Launched by
// src/backend/cuda/activation.rs; CPU reference src/backend/cpu/activation.rs.
#include "common.cuh"

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
