// Token choice on the device: the argmax of logits rows, so that greedy decoding copies
// one id per sequence to the host instead of a vocabulary-sized row.
#include "common.cuh"

#define ARGMAX_THREADS 1024

// Larger value wins; equal values go to the lower index (torch.argmax); NaN never wins.
__device__ __forceinline__ void better(float& v, unsigned& i, float ov, unsigned oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// One block per selected row: out[j] = argmax(x[rows[j]]). A row of -inf and NaN
// only gives 0, as the CPU's argmax does.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows_f32(const float* x, const unsigned* rows, unsigned* out, int cols) {
    __shared__ float best_v[32];
    __shared__ unsigned best_i[32];
    const float* row = x + (size_t)rows[blockIdx.x] * cols;
    float v = -INFINITY;
    unsigned idx = 0xffffffffu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float x = row[c];
        if (x > v) {  // strided and increasing: the first of equal values is kept
            v = x;
            idx = c;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const unsigned oi = __shfl_xor_sync(0xffffffffu, idx, o);
        better(v, idx, ov, oi);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        v = lane < warps ? best_v[lane] : -INFINITY;
        idx = lane < warps ? best_i[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const unsigned oi = __shfl_xor_sync(0xffffffffu, idx, o);
            better(v, idx, ov, oi);
        }
        if (lane == 0) out[blockIdx.x] = idx == 0xffffffffu ? 0u : idx;
    }
}
