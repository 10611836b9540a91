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

#define DRAW_THREADS 1024

// Block-wide exclusive scan of one double per thread; `total` gets the sum. `scratch`
// holds 32 doubles.
__device__ double block_exclusive_scan(double v, double* scratch, double* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double n = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += n;
    }
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        double w = lane < warps ? scratch[lane] : 0.0;
        double inc = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double n = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += n;
        }
        scratch[lane] = inc - w;  // exclusive prefix of warp `lane`
        if (lane == 31) scratch[32] = inc;
    }
    __syncthreads();
    const double result = scratch[warp] + inclusive - v;
    *total = scratch[32];
    __syncthreads();
    return result;
}

// One block per selected row: a draw from softmax(x / temperature) by inverse CDF in id
// order (backend::draw): weights exp((l - max) / t) in f64 over the logits above -inf,
// the first id whose running sum exceeds u * total. Each thread owns a contiguous range
// of ids; a scan of the ranges' sums finds the range where the sum crosses, and its
// thread walks it. The first +inf logit takes all the mass; no logit above -inf gives
// the argmax's answer, 0.
extern "C" __global__ void __launch_bounds__(DRAW_THREADS)
    draw_rows_f32(const float* x, const unsigned* rows, const float* temperatures, const double* uniforms,
                  unsigned* out, int cols) {
    __shared__ float fmax_s[32];
    __shared__ double scan_s[33];
    __shared__ unsigned first_inf, found, last;
    const float* row = x + (size_t)rows[blockIdx.x] * cols;
    const int chunk = (cols + blockDim.x - 1) / blockDim.x;
    const int begin = min(cols, (int)threadIdx.x * chunk), end = min(cols, begin + chunk);
    if (threadIdx.x == 0) {
        first_inf = 0xffffffffu;
        found = 0xffffffffu;
        last = 0;
    }
    __syncthreads();
    float m = -INFINITY;
    unsigned my_last = 0;
    bool any = false;
    for (int c = begin; c < end; ++c) {
        const float v = row[c];
        if (v == INFINITY) {
            atomicMin(&first_inf, (unsigned)c);
            break;
        }
        if (v > -INFINITY) {
            m = fmaxf(m, v);
            my_last = c;
            any = true;
        }
    }
    if (any) atomicMax(&last, my_last);
    m = block_max(m, fmax_s);  // ends with a barrier: first_inf and last are final
    if (first_inf != 0xffffffffu || m == -INFINITY) {
        if (threadIdx.x == 0) out[blockIdx.x] = first_inf != 0xffffffffu ? first_inf : 0u;
        return;  // uniform across the block
    }
    const double maxd = (double)m, inv_t = 1.0 / (double)temperatures[blockIdx.x];
    double sum = 0.0;
    for (int c = begin; c < end; ++c) {
        const float v = row[c];
        if (v > -INFINITY) sum += exp(((double)v - maxd) * inv_t);
    }
    double total;
    const double prefix = block_exclusive_scan(sum, scan_s, &total);
    const double target = uniforms[blockIdx.x] * total;
    if (prefix <= target && target < prefix + sum) {
        double running = prefix;
        unsigned pick = my_last;  // rounding left the crossing at the range's end
        for (int c = begin; c < end; ++c) {
            const float v = row[c];
            if (v > -INFINITY) {
                running += exp(((double)v - maxd) * inv_t);
                if (running > target) {
                    pick = c;
                    break;
                }
            }
        }
        atomicMin(&found, pick);
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = found != 0xffffffffu ? found : last;
}
