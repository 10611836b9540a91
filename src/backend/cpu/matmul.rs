//! `y = x · Wᵀ` for the CPU backend, with W stored as f32 or as bf16 (converted to f32
//! on the fly; bf16 → f32 is exact, so the math is f32 either way).
//!
//! Few rows (decode) is memory-bound: each task streams a slice of W once and dots it
//! with every row of x; keeping bf16 weights halves the bytes streamed per token. Many
//! rows (prefill) splits W into row panels; each task widens its panel to f32 in a
//! scratch buffer and runs the `gemm` crate (run-time SIMD dispatch) on it, single
//! threaded, into its own columns of the output.

use rayon::prelude::*;

/// A weight element: f32, or bf16 kept as its bits.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The slice itself when it already holds f32 (no widening copy needed).
    fn as_f32_slice(slice: &[Self]) -> Option<&[f32]> {
        let _ = slice;
        None
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32_slice(slice: &[f32]) -> Option<&[f32]> {
        Some(slice)
    }
}

/// bf16 bits; widening is a 16-bit shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl WeightElem for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// Row count up to which the streaming kernel beats a blocked GEMM.
const MAX_STREAMING_ROWS: usize = 4;
/// Weight rows (output features) per rayon task in the streaming kernel.
const STREAM_ROWS_PER_TASK: usize = 64;
/// Weight rows per panel in the blocked kernel.
const PANEL_ROWS: usize = 64;

/// `x [n, k]`, `w [m, k]` -> `out [n, m]` (overwritten).
pub fn matmul_transposed<W: WeightElem>(x: &[f32], w: &[W], out: &mut [f32], n: usize, k: usize, m: usize) {
    assert_eq!(x.len(), n * k, "matmul: x is not [{n}, {k}]");
    assert_eq!(w.len(), m * k, "matmul: w is not [{m}, {k}]");
    assert_eq!(out.len(), n * m, "matmul: out is not [{n}, {m}]");
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
    } else if n <= MAX_STREAMING_ROWS {
        streaming(x, w, out, n, k, m);
    } else {
        blocked(x, w, out, n, k, m);
    }
}

/// The output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own column range; see `streaming` and `blocked`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not the field) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn streaming<W: WeightElem>(x: &[f32], w: &[W], out: &mut [f32], n: usize, k: usize, m: usize) {
    let out_ptr = OutPtr(out.as_mut_ptr());
    w.par_chunks(STREAM_ROWS_PER_TASK * k)
        .enumerate()
        .for_each(|(t, panel)| {
            let j0 = t * STREAM_ROWS_PER_TASK;
            for (j, w_row) in panel.chunks_exact(k).enumerate() {
                for i in 0..n {
                    let value = dot(&x[i * k..(i + 1) * k], w_row);
                    // SAFETY: (i, j0 + j) is inside [n, m] and column j0 + j belongs to this
                    // task alone.
                    unsafe { *out_ptr.get().add(i * m + j0 + j) = value };
                }
            }
        });
}

fn blocked<W: WeightElem>(x: &[f32], w: &[W], out: &mut [f32], n: usize, k: usize, m: usize) {
    let out_ptr = OutPtr(out.as_mut_ptr());
    w.par_chunks(PANEL_ROWS * k)
        .enumerate()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, (t, panel)| {
            let rows = panel.len() / k;
            let j0 = t * PANEL_ROWS;
            let panel_f32: &[f32] = match W::as_f32_slice(panel) {
                Some(f) => f,
                None => {
                    scratch.clear();
                    scratch.extend(panel.iter().map(|v| v.to_f32()));
                    scratch
                }
            };
            // SAFETY: dst is the [n, rows] column block j0.. of out [n, m] (row stride m),
            // written by this task only; lhs is x [n, k] row-major; rhs is the panel
            // transposed, [k, rows] read from [rows, k] (row stride 1, column stride k).
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    out_ptr.get().add(j0),
                    1,
                    m as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel_f32.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// Dot product with independent accumulators, so that the compiler vectorizes it
/// (f32 addition is not associative: one accumulator would stay scalar).
#[inline(always)]
fn dot_body<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let split = a.len() / LANES * LANES;
    for (ca, cb) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = ca[l].mul_add(cb[l].to_f32(), acc[l]);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_avx512<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    dot_body(a, b)
}

/// Portable fallback: plain multiply-add (without FMA hardware `mul_add` is a libm call).
fn dot_portable<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0.0f32; 8];
    let split = a.len() / 8 * 8;
    for (ca, cb) in a[..split].chunks_exact(8).zip(b[..split].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l].to_f32();
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        sum += x * y.to_f32();
    }
    sum
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    Portable,
}

fn simd_level() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Simd> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                Simd::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Simd::Avx2
            } else {
                Simd::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Simd::Portable
}

/// `Σ a[i]·b[i]` with the widest SIMD the CPU has (checked once at run time).
#[inline]
pub fn dot<W: WeightElem>(a: &[f32], b: &[W]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match simd_level() {
        // SAFETY: the CPU supports the enabled features (checked in `simd_level`).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { dot_avx2(a, b) },
        _ => dot_portable(a, b),
    }
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

    /// Values exactly representable in bf16, so the bf16 and f32 paths see equal weights.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 255) as f32 / 128.0 - 1.0)
            .collect()
    }

    #[test]
    fn streaming_and_blocked_kernels_match_a_float64_reference_for_f32_and_bf16_weights() {
        for &(n, k, m) in &[
            (1, 7, 5),
            (3, 64, 70),
            (4, 129, 33),
            (5, 96, 40),
            (17, 200, 130),
            (9, 33, 200),
        ] {
            let x = values(n * k, 1);
            let w = values(m * k, 2);
            let w_bf16: Vec<Bf16> = w.iter().map(|v| Bf16((v.to_bits() >> 16) as u16)).collect();
            let want = reference(&x, &w, n, k, m);
            let mut out = vec![f32::NAN; n * m];
            matmul_transposed(&x, &w, &mut out, n, k, m);
            let mut out_bf16 = vec![f32::NAN; n * m];
            matmul_transposed(&x, &w_bf16, &mut out_bf16, n, k, m);
            for ((got, got_bf16), want) in out.iter().zip(&out_bf16).zip(&want) {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "n={n} k={k} m={m}: {got} vs {want}"
                );
                assert!(
                    (got_bf16 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "bf16 n={n} k={k} m={m}"
                );
            }
        }
    }
}
