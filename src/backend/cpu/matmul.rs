//! `y = x · Wᵀ` for the CPU backend. Few rows (decode) is memory-bound: each thread
//! streams a slice of W once and dots it with every row of x. Many rows (prefill) goes
//! to the `gemm` crate, which picks its SIMD kernels at run time.

use rayon::prelude::*;

/// Row count up to which the streaming kernel beats a blocked GEMM.
const MAX_STREAMING_ROWS: usize = 4;
/// Output features per rayon task in the streaming kernel.
const ROWS_PER_TASK: usize = 32;

/// `x [n, k]`, `w [m, k]` -> `out [n, m]` (overwritten).
pub fn matmul_transposed(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize, m: usize) {
    assert_eq!(x.len(), n * k, "matmul: x is not [{n}, {k}]");
    assert_eq!(w.len(), m * k, "matmul: w is not [{m}, {k}]");
    assert_eq!(out.len(), n * m, "matmul: out is not [{n}, {m}]");
    if n == 0 || m == 0 {
        return;
    }
    if n <= MAX_STREAMING_ROWS {
        streaming(x, w, out, n, k, m);
    } else {
        blocked(x, w, out, n, k, m);
    }
}

fn streaming(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize, m: usize) {
    // Each task owns output columns [j0, j0 + ROWS_PER_TASK) of every row; results are
    // gathered per task then scattered, so tasks never share a cache line of `out`.
    let tasks: Vec<(usize, Vec<f32>)> = w
        .par_chunks(ROWS_PER_TASK * k)
        .enumerate()
        .map(|(t, w_rows)| {
            let rows = w_rows.len() / k;
            let mut acc = vec![0.0f32; n * rows];
            for (j, w_row) in w_rows.chunks_exact(k).enumerate() {
                for i in 0..n {
                    acc[i * rows + j] = dot(&x[i * k..(i + 1) * k], w_row);
                }
            }
            (t * ROWS_PER_TASK, acc)
        })
        .collect();
    for (j0, acc) in tasks {
        let rows = acc.len() / n;
        for i in 0..n {
            out[i * m + j0..i * m + j0 + rows].copy_from_slice(&acc[i * rows..(i + 1) * rows]);
        }
    }
}

fn blocked(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize, m: usize) {
    let threads = rayon::current_num_threads();
    // SAFETY: the pointers and strides describe exactly the three slices checked in
    // `matmul_transposed`: dst [n, m] row-major, lhs x [n, k] row-major, rhs Wᵀ [k, m]
    // read from W [m, k] (row stride 1, column stride k).
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Dot product with eight independent accumulators, so that the compiler vectorizes it
/// (f32 addition is not associative, a single accumulator would stay scalar).
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = ca[l].mul_add(cb[l], acc[l]);
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Without FMA hardware, mul_add is a libm call: use plain multiply-add.
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    sum
}

/// `Σ a[i]·b[i]`, using AVX2+FMA when the CPU has them (checked once at run time).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports avx2 and fma (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        let mut out = vec![0.0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum();
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn streaming_and_blocked_kernels_match_a_float64_reference() {
        for &(n, k, m) in &[(1, 7, 5), (3, 64, 70), (4, 129, 33), (5, 96, 40), (17, 200, 77)] {
            let x = values(n * k, 1);
            let w = values(m * k, 2);
            let mut out = vec![f32::NAN; n * m];
            matmul_transposed(&x, &w, &mut out, n, k, m);
            let want = reference(&x, &w, n, k, m);
            for (got, want) in out.iter().zip(&want) {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "n={n} k={k} m={m}: {got} vs {want}"
                );
            }
        }
    }
}
