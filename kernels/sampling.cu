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

// Block-wide exclusive scan of one value per thread; `total` gets the sum. `scratch`
// holds 33 values.
template <typename T>
__device__ T block_exclusive_scan(T v, T* scratch, T* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T n = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += n;
    }
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        const T w = lane < warps ? scratch[lane] : T(0);
        T inc = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T n = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += n;
        }
        scratch[lane] = inc - w;  // exclusive prefix of warp `lane`
        if (lane == 31) scratch[32] = inc;
    }
    __syncthreads();
    const T result = scratch[warp] + inclusive - v;
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

// ---------------------------------------------------------------------------------
// Whole sampled rows (backend::sampling::sample_row): sparse edits, top-k / top-p /
// min-p found by radix selection (no sort), the draw over the kept tokens in id order,
// and the raw row's log-probabilities. Not on the default path until the GPU suite has
// passed with it (INFERD_CUDA_SAMPLING=device).

#define SAMPLE_THREADS 512

struct SampleArgs {
    float temperature;  // 0: greedy (so is top_k 1)
    int top_k;          // 0: off
    float top_p;        // 1: off
    float min_p;        // 0: off
    double uniform;
    int edit_begin, edit_end;  // this row's edits in `edits`
    int logprobs;              // -1: none, else the number of alternatives
    int work_row;              // this row's edited copy in `work`; -1: no edits, read in place
};

struct LogitEditArgs {
    unsigned token;
    float bias, penalty, subtract;
    int ban;
};

// The logits' order as unsigned keys (larger logit, larger key; -0 is +0), for finite
// values.
__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned b = v == 0.0f ? 0u : __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A kept set: every logit above `value`, and those equal to it with an id up to `id`.
struct Pivot {
    float value;
    unsigned id;
    bool all;  // no cut
};
__device__ __forceinline__ bool keeps(const Pivot& p, unsigned i, float v) {
    return p.all || v > p.value || (v == p.value && i <= p.id);
}

__device__ __forceinline__ double weight_of(float v, float max, double inv_t) {
    return exp(((double)v - (double)max) * inv_t);
}

// A weight in the fixed point top-p sums it in (backend::sampling::fixed_mass): units of
// 2^-40, summed as integers, exact in any order.
__device__ __forceinline__ unsigned long long fixed_mass(double w) {
    return (unsigned long long)(w * 1099511627776.0);
}

// Sum over the block of one value per thread (every thread gets it), in a fixed order:
// the same inputs give the same sum. `scratch` holds 32 values.
template <typename T>
__device__ T block_total(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
    __syncthreads();
    return total;
}

// The argmax of a row (backend::argmax): larger value, then lower id; NaN never; a row
// of -inf and NaN gives 0.
__device__ unsigned block_argmax(const float* row, int cols, float* sv, unsigned* si) {
    float v = -INFINITY;
    unsigned idx = 0xffffffffu;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float x = row[c];
        if (x > v) {
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
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    v = -INFINITY;
    idx = 0xffffffffu;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) better(v, idx, sv[w], si[w]);
    __syncthreads();
    return idx == 0xffffffffu ? 0u : idx;
}

struct SelectShared {
    unsigned counts[256];
    unsigned long long masses[256];
    unsigned prefix, mask, above_count, tied, need;
    unsigned long long above_mass;
    unsigned scan[33];
    unsigned found;
};

// Radix selection over the candidates `inside` (logit above -inf, within `within`): the
// first point, in (logit descending, id ascending) order, where `count` of them have
// passed or their fixed-point weight reaches `mass` (backend::sampling's `filter_pivot`,
// found 8 bits of the logit's key a pass). Every thread gets the pivot.
__device__ Pivot radix_select(const float* row, int cols, const Pivot& within, unsigned count, double mass,
                              float top, double inv_t, SelectShared& s) {
    const bool by_mass = mass < INFINITY;
    if (threadIdx.x == 0) {
        s.prefix = 0;
        s.mask = 0;
        s.above_count = 0;
        s.above_mass = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) {
            s.counts[d] = 0;
            s.masses[d] = 0;
        }
        __syncthreads();
        const unsigned prefix = s.prefix, mask = s.mask;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = row[c];
            if (!(v > -INFINITY) || !keeps(within, c, v)) continue;
            const unsigned k = order_key(v);
            if ((k & mask) != prefix) continue;
            const unsigned d = (k >> shift) & 0xffu;
            atomicAdd(&s.counts[d], 1u);
            if (by_mass) atomicAdd(&s.masses[d], fixed_mass(weight_of(v, top, inv_t)));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int lowest = 0;
            while (lowest < 255 && s.counts[lowest] == 0) ++lowest;
            int chosen = lowest;  // the last digit with candidates is taken unadded
            for (int d = 255; d > lowest; --d) {
                if (s.above_count + s.counts[d] >= count || (double)(s.above_mass + s.masses[d]) >= mass) {
                    chosen = d;
                    break;
                }
                s.above_count += s.counts[d];
                s.above_mass += s.masses[d];
            }
            s.prefix |= (unsigned)chosen << shift;
            s.mask |= 0xffu << shift;
            s.tied = s.counts[chosen];
        }
        __syncthreads();
    }
    const float value = key_value(s.prefix);
    if (threadIdx.x == 0) {
        // How many of the tied logits (in id order) the cut takes.
        const unsigned left = count - min(s.above_count, count);
        unsigned need = max(1u, min(s.tied, left));
        unsigned long long running = s.above_mass;
        const unsigned long long w = fixed_mass(weight_of(value, top, inv_t));
        for (unsigned j = 1; j <= need; ++j) {
            running += w;
            if ((double)running >= mass) {
                need = j;
                break;
            }
        }
        s.need = need;
        s.found = 0xffffffffu;
    }
    __syncthreads();
    // The need-th tied id: each thread counts the tied logits of its own id range.
    const int chunk = (cols + blockDim.x - 1) / blockDim.x;
    const int begin = min(cols, (int)threadIdx.x * chunk), end = min(cols, begin + chunk);
    unsigned mine = 0;
    for (int c = begin; c < end; ++c) {
        const float v = row[c];
        if (v == value && keeps(within, c, v)) ++mine;
    }
    unsigned all_tied;
    const unsigned before = block_exclusive_scan(mine, s.scan, &all_tied);
    if (before < s.need && s.need <= before + mine) {
        unsigned seen = before;
        for (int c = begin; c < end; ++c) {
            const float v = row[c];
            if (v == value && keeps(within, c, v) && ++seen == s.need) {
                s.found = c;
                break;
            }
        }
    }
    __syncthreads();
    Pivot p;
    p.value = value;
    p.id = s.found;
    p.all = false;
    __syncthreads();
    return p;
}

// One block per sampled row. A row with edits is copied to its row of `work` and edited
// there; the others are read in place. Outputs: the token,
// its raw log-probability and the `logprobs` likeliest raw log-probabilities (`max_top`
// per row in the arrays).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_f32(const float* x, const unsigned* rows, const SampleArgs* args, const LogitEditArgs* edits,
                    float* work, int cols, int max_top, unsigned* out_ids, float* out_logprob,
                    unsigned* out_top_ids, float* out_top_vals) {
    __shared__ float sv[32];
    __shared__ unsigned si[32];
    __shared__ double sd[32];
    __shared__ double scan_d[33];
    __shared__ unsigned long long su[32];
    __shared__ unsigned first_inf, found, last;
    __shared__ SelectShared sel;
    const SampleArgs a = args[blockIdx.x];
    const float* raw = x + (size_t)rows[blockIdx.x] * cols;
    const float* row = raw;
    if (a.work_row >= 0) {
        float* edited = work + (size_t)a.work_row * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) edited[c] = raw[c];
        __syncthreads();
        for (int e = a.edit_begin + threadIdx.x; e < a.edit_end; e += blockDim.x) {
            const LogitEditArgs ed = edits[e];
            if (ed.token >= (unsigned)cols) continue;
            float l = edited[ed.token] + ed.bias;
            if (ed.penalty != 1.0f) l = l > 0.0f ? l / ed.penalty : l * ed.penalty;
            l -= ed.subtract;
            edited[ed.token] = ed.ban ? -INFINITY : l;
        }
        __syncthreads();
        row = edited;
    }
    unsigned token;
    const bool greedy = a.temperature == 0.0f || a.top_k == 1;
    const bool filtered = a.top_k > 0 || a.top_p < 1.0f || a.min_p > 0.0f;
    if (threadIdx.x == 0) {
        first_inf = 0xffffffffu;
        found = 0xffffffffu;
        last = 0;
    }
    __syncthreads();
    if (greedy) {
        token = block_argmax(row, cols, sv, si);
    } else {
        float m = -INFINITY;
        unsigned n = 0;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = row[c];
            if (v == INFINITY) atomicMin(&first_inf, (unsigned)c);
            if (v > -INFINITY) {
                m = fmaxf(m, v);
                ++n;
            }
        }
        m = block_max(m, sv);
        n = block_total(n, si);
        if (first_inf != 0xffffffffu) {
            token = first_inf;
        } else if (m == -INFINITY) {
            token = block_argmax(row, cols, sv, si);
        } else {
            const double inv_t = 1.0 / (double)a.temperature;
            Pivot keep;
            keep.all = true;
            keep.value = -INFINITY;
            keep.id = 0;
            if (filtered) {
                Pivot in_k = keep;
                unsigned k_count = n;
                if (a.top_k > 0 && (unsigned)a.top_k < n) {
                    in_k = radix_select(row, cols, keep, (unsigned)a.top_k, INFINITY, m, inv_t, sel);
                    k_count = a.top_k;
                }
                unsigned long long total = 0;
                unsigned above_min = 0;
                for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                    const float v = row[c];
                    if (!(v > -INFINITY)) continue;
                    const double w = weight_of(v, m, inv_t);
                    if (keeps(in_k, c, v)) total += fixed_mass(w);
                    if (w >= (double)a.min_p) ++above_min;
                }
                total = block_total(total, su);
                above_min = block_total(above_min, si);
                const unsigned count = a.min_p > 0.0f ? max(1u, min(above_min, k_count)) : k_count;
                const double mass = a.top_p < 1.0f ? (double)a.top_p * (double)total : INFINITY;
                keep = radix_select(row, cols, in_k, count, mass, m, inv_t, sel);
            }
            // The draw over the kept logits in id order (draw_rows_f32 with a cut).
            const int chunk = (cols + blockDim.x - 1) / blockDim.x;
            const int begin = min(cols, (int)threadIdx.x * chunk), end = min(cols, begin + chunk);
            double sum = 0.0;
            unsigned my_last = 0;
            bool any = false;
            for (int c = begin; c < end; ++c) {
                const float v = row[c];
                if (v > -INFINITY && keeps(keep, c, v)) {
                    sum += weight_of(v, m, inv_t);
                    my_last = c;
                    any = true;
                }
            }
            if (any) atomicMax(&last, my_last);
            double total;
            const double prefix = block_exclusive_scan(sum, scan_d, &total);
            const double target = a.uniform * total;
            if (prefix <= target && target < prefix + sum) {
                double running = prefix;
                unsigned pick = my_last;
                for (int c = begin; c < end; ++c) {
                    const float v = row[c];
                    if (v > -INFINITY && keeps(keep, c, v)) {
                        running += weight_of(v, m, inv_t);
                        if (running > target) {
                            pick = c;
                            break;
                        }
                    }
                }
                atomicMin(&found, pick);
            }
            __syncthreads();
            token = found != 0xffffffffu ? found : last;
        }
    }
    if (threadIdx.x == 0) out_ids[blockIdx.x] = token;
    if (a.logprobs < 0) return;  // uniform across the block

    // Log-probabilities of the raw row: log_sum_exp, then the top entries one at a time,
    // each the best (value, then lower id) after the one before.
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, raw[c]);
    m = block_max(m, sv);
    double sum = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += exp((double)(raw[c] - m));
    sum = block_total(sum, sd);
    const float lse = (float)log(sum) + m;
    if (threadIdx.x == 0) out_logprob[blockIdx.x] = raw[token] - lse;
    float prev_v = INFINITY;
    unsigned prev_i = 0;
    bool first = true;
    const int wanted = min(a.logprobs, min(max_top, cols));
    for (int t = 0; t < wanted; ++t) {
        float v = -INFINITY;
        unsigned idx = 0xffffffffu;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float lp = raw[c] - lse;
            const bool after = first || lp < prev_v || (lp == prev_v && (unsigned)c > prev_i);
            if (after && (idx == 0xffffffffu || lp > v)) {
                v = lp;
                idx = c;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const unsigned oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (oi != 0xffffffffu && (idx == 0xffffffffu || ov > v || (ov == v && oi < idx))) {
                v = ov;
                idx = oi;
            }
        }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) {
            sv[warp] = v;
            si[warp] = idx;
        }
        __syncthreads();
        v = -INFINITY;
        idx = 0xffffffffu;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            if (si[w] != 0xffffffffu && (idx == 0xffffffffu || sv[w] > v || (sv[w] == v && si[w] < idx))) {
                v = sv[w];
                idx = si[w];
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            out_top_ids[(size_t)blockIdx.x * max_top + t] = idx;
            out_top_vals[(size_t)blockIdx.x * max_top + t] = v;
        }
        prev_v = v;
        prev_i = idx;
        first = false;
    }
}
