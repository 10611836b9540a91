// Row normalizations: RMSNorm (with a fused residual add), LayerNorm (likewise) and the
// per-head q/k RMSNorm of Qwen3. One block per row, f32 accumulation.
#include "common.cuh"

// r += delta, visible to the whole block afterwards.
__device__ void add_row(float* r, const float* delta, int d) {
    for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] += delta[i];
    __syncthreads();
}

// out = x / sqrt(mean(x^2) + eps) * w
__device__ void rms_row(const float* x, const float* w, float* out, int d, float eps, float* scratch) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = x[i] * inv * w[i];
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* out, int d, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    rms_row(x + row * d, w, out + row * d, d, eps, scratch);
}

extern "C" __global__ void add_rms_norm_f32(float* residual, const float* delta, const float* w, float* out, int d,
                                            float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float* r = residual + row * d;
    add_row(r, delta + row * d, d);
    rms_row(r, w, out + row * d, d, eps, scratch);
}

__device__ void layer_norm_row(const float* x, const float* w, const float* b, float* out, int d, float eps,
                               float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += x[i];
    const float mean = block_sum(s, scratch) / (float)d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = x[i] - mean;
        v += c * c;
    }
    const float inv = rsqrtf(block_sum(v, scratch) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, float* out, int d,
                                          float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    layer_norm_row(x + row * d, w, b, out + row * d, d, eps, scratch);
}

extern "C" __global__ void add_layer_norm_f32(float* residual, const float* delta, const float* w, const float* b,
                                              float* out, int d, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float* r = residual + row * d;
    add_row(r, delta + row * d, d);
    layer_norm_row(r, w, b, out + row * d, d, eps, scratch);
}

// Per-head RMSNorm of the q and k heads of a fused qkv row, in place. Grid (rows,
// num_heads + num_kv_heads), one warp per head.
extern "C" __global__ void qk_norm_f32(float* qkv, const float* q_w, const float* k_w, int qkv_width, int num_heads,
                                       int head_dim, float eps) {
    const int head = blockIdx.y;
    float* x = qkv + (size_t)blockIdx.x * qkv_width + (size_t)head * head_dim;
    const float* w = head < num_heads ? q_w : k_w;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < head_dim; i += 32) ss += x[i] * x[i];
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / (float)head_dim + eps);
    for (int i = threadIdx.x; i < head_dim; i += 32) x[i] = x[i] * inv * w[i];
}
