//! `y = x · Wᵀ` for the CPU backend.
//!
//! Weights are packed once at load into slabs of `NR` output rows, each slab transposed
//! (`[ceil(m / NR)][k][NR]`, zero-padded), in f32 or bf16 (widened on the fly; exact).
//! Slabs are split across rayon tasks; a task owns the output columns of its slabs. On
//! AVX-512 CPUs one register-blocked microkernel of our own serves both prefill (many
//! rows of x, compute-bound) and decode (one row, memory-bound: each slab streams once,
//! contiguously, and bf16 halves the bytes); the `gemm` crate's stable build stops at
//! AVX2, and this kernel is faster there. Elsewhere each slab goes to the `gemm` crate.

use rayon::prelude::*;

use super::{CpuTensor, CpuWeight, WeightValues};

/// Output features per slab.
pub const NR: usize = 32;
/// Rows of x per microkernel call.
const MR: usize = 12;
/// Depth of one microkernel call (keeps a slab block in L1/L2).
const KC: usize = 256;
/// Slabs per rayon task.
const SLABS_PER_TASK: usize = 2;

/// A weight element: f32, or bf16 kept as its bits.
pub trait WeightElem: Copy + Default + Send + Sync + 'static {
    const IS_BF16: bool;
    fn to_f32(self) -> f32;
}

impl WeightElem for f32 {
    const IS_BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// bf16 bits; widening is a 16-bit shift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl WeightElem for Bf16 {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// A `[rows, cols]` matrix in slab layout: `data[(r / NR) * cols * NR + c * NR + r % NR]`.
#[derive(Debug, Clone)]
pub struct PackedMatrix<W> {
    data: Vec<W>,
    rows: usize,
    cols: usize,
}

impl<W: WeightElem> PackedMatrix<W> {
    /// Packs a row-major matrix given as `row(r, dst)` filling `dst[cols]` for each row.
    pub fn pack(rows: usize, cols: usize, row: impl Fn(usize, &mut [W]) + Sync) -> Self {
        let num_slabs = rows.div_ceil(NR);
        let mut data = vec![W::default(); num_slabs * cols * NR];
        if cols > 0 {
            data.par_chunks_mut(cols * NR).enumerate().for_each(|(s, slab)| {
                let mut buf = vec![W::default(); cols];
                for c in 0..NR.min(rows - s * NR) {
                    row(s * NR + c, &mut buf);
                    for (kk, v) in buf.iter().enumerate() {
                        slab[kk * NR + c] = *v;
                    }
                }
            });
        }
        PackedMatrix { data, rows, cols }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` widened to f32 into `out[cols]` (embedding lookups).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let slab = &self.data[(r / NR) * self.cols * NR..];
        for (kk, o) in out.iter_mut().enumerate() {
            *o = slab[kk * NR + r % NR].to_f32();
        }
    }
}

/// The output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only the output columns of its own slabs.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not the field) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x [n, k]` times `w [m, k]` transposed -> `out [n, m]` (overwritten).
pub fn matmul_transposed<W: WeightElem>(x: &[f32], w: &PackedMatrix<W>, out: &mut [f32], n: usize) {
    let (k, m) = (w.cols, w.rows);
    assert_eq!(x.len(), n * k, "matmul: x is not [{n}, {k}]");
    assert_eq!(out.len(), n * m, "matmul: out is not [{n}, {m}]");
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return avx512::matmul(x, w, out, n);
    }
    matmul_with_gemm_crate(x, w, out, n);
}

/// Without AVX-512: each slab (widened to f32 when bf16) is the strided right-hand side
/// `[k, NR]` of a `gemm` crate call (its own AVX2/FMA or NEON kernels), single threaded
/// per task, into the task's columns of the output.
fn matmul_with_gemm_crate<W: WeightElem>(x: &[f32], w: &PackedMatrix<W>, out: &mut [f32], n: usize) {
    let (k, m) = (w.cols, w.rows);
    let out_ptr = OutPtr(out.as_mut_ptr());
    w.data
        .par_chunks(k * NR)
        .enumerate()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, (s, slab)| {
            let j0 = s * NR;
            let cols = NR.min(m - j0);
            scratch.clear();
            scratch.extend(slab.iter().map(|v| v.to_f32()));
            // SAFETY: dst is the [n, cols] column block j0.. of out [n, m] (row stride m),
            // written by this task only; lhs is x [n, k] row-major; rhs is the slab,
            // [k, cols] with row stride NR.
            unsafe {
                gemm::gemm(
                    n,
                    cols,
                    k,
                    out_ptr.get().add(j0),
                    1,
                    m as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    scratch.as_ptr(),
                    1,
                    NR as isize,
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

/// A register-blocked AVX-512 GEMM over the packed slabs: x is packed into blocks of
/// `MR` rows (`[ceil(n / MR)][k][MR]`), and each `MR x NR` output tile is accumulated in
/// 24 zmm registers over `KC`-deep slices of k.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{OutPtr, PackedMatrix, WeightElem, KC, MR, NR, SLABS_PER_TASK};

    /// Packs x `[n, k]` into row blocks `[ceil(n / MR)][k][MR]`, zero-padded.
    fn pack_x(x: &[f32], n: usize, k: usize) -> Vec<f32> {
        let blocks = n.div_ceil(MR);
        let mut packed = vec![0.0f32; blocks * k * MR];
        for (b, dst) in packed.chunks_mut(k * MR).enumerate() {
            for r in 0..MR.min(n - b * MR) {
                for (kk, v) in x[(b * MR + r) * k..(b * MR + r + 1) * k].iter().enumerate() {
                    dst[kk * MR + r] = *v;
                }
            }
        }
        packed
    }

    /// The CPU must support AVX-512F (`super::has_avx512`); shapes are checked by
    /// `matmul_transposed`.
    pub fn matmul<W: WeightElem>(x: &[f32], w: &PackedMatrix<W>, out: &mut [f32], n: usize) {
        let (k, m) = (w.cols, w.rows);
        let xp = pack_x(x, n, k);
        let out_ptr = OutPtr(out.as_mut_ptr());
        w.data
            .par_chunks(SLABS_PER_TASK * k * NR)
            .enumerate()
            .for_each(|(t, slabs)| {
                let mut tile = [0.0f32; MR * NR];
                for (s, slab) in slabs.chunks_exact(k * NR).enumerate() {
                    let j0 = (t * SLABS_PER_TASK + s) * NR;
                    let cols = NR.min(m - j0);
                    for (b, xb) in xp.chunks_exact(k * MR).enumerate() {
                        let rows = MR.min(n - b * MR);
                        let mut k0 = 0;
                        while k0 < k {
                            let kc = KC.min(k - k0);
                            let (a, bw) = (&xb[k0 * MR..(k0 + kc) * MR], &slab[k0 * NR..(k0 + kc) * NR]);
                            microkernel(rows, a, bw, &mut tile);
                            for r in 0..rows {
                                // SAFETY: row b * MR + r, columns j0..j0 + cols lie in out
                                // [n, m], and those columns belong to this task's slab alone.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(out_ptr.get().add((b * MR + r) * m + j0), cols)
                                };
                                let src = &tile[r * NR..r * NR + cols];
                                if k0 == 0 {
                                    dst.copy_from_slice(src);
                                } else {
                                    for (d, s) in dst.iter_mut().zip(src) {
                                        *d += s;
                                    }
                                }
                            }
                            k0 += kc;
                        }
                    }
                }
            });
    }

    /// `tile[r][c] = Σ_kk a[kk][r] · b[kk][c]` for `r < rows`, `a [kc][MR]`, `b [kc][NR]`.
    pub(super) fn microkernel<W: WeightElem>(rows: usize, a: &[f32], b: &[W], tile: &mut [f32; MR * NR]) {
        assert!(a.len() / MR == b.len() / NR && rows <= MR);
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: callers reach this module only when the CPU supports
                    // AVX-512F; the slices hold kc rows of MR and NR values.
                    $($r => unsafe { kernel::<W, $r>(a, b, tile) },)*
                    _ => unreachable!("rows <= MR"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// Loads 16 weights at `p` as f32.
    #[inline(always)]
    unsafe fn load16<W: WeightElem>(p: *const W) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements at p and AVX-512F.
        unsafe {
            if W::IS_BF16 {
                let bits = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }

    /// `R` rows: `2 * R` zmm accumulators (24 at R = 12, within the 32 registers).
    ///
    /// # Safety
    /// AVX-512F; `a` holds `kc * MR` values and `b` `kc * NR`, for the same `kc`.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<W: WeightElem, const R: usize>(a: &[f32], b: &[W], tile: &mut [f32; MR * NR]) {
        let kc = b.len() / NR;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (a, b) = (a.as_ptr(), b.as_ptr());
        for kk in 0..kc {
            // SAFETY: kk < kc rows of a and b.
            unsafe {
                let b0 = load16(b.add(kk * NR));
                let b1 = load16(b.add(kk * NR + 16));
                let a_row = a.add(kk * MR);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let ar = _mm512_set1_ps(*a_row.add(r));
                    acc_r[0] = _mm512_fmadd_ps(ar, b0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(ar, b1, acc_r[1]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: the tile holds MR >= R rows of NR values.
            unsafe {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc_r[0]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc_r[1]);
            }
        }
    }
}

/// Whether the AVX-512 kernels run on this CPU (checked once).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `linear`: `x · Wᵀ (+ bias)`, the backend op over the packed weight.
pub(super) fn linear(x: &CpuTensor, weight: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
    let (out_features, in_features) = (weight.rows(), weight.cols());
    assert_eq!(
        x.cols, in_features,
        "linear: x has {} columns, weight {:?}",
        x.cols, weight.shape
    );
    let mut out = CpuTensor::zeros(x.rows, out_features);
    match &weight.values {
        WeightValues::MatrixF32(w) => matmul_transposed(&x.data, w, &mut out.data, x.rows),
        WeightValues::MatrixBf16(w) => matmul_transposed(&x.data, w, &mut out.data, x.rows),
        WeightValues::Vector(_) => panic!("linear: weight {:?} is not a matrix", weight.shape),
    }
    if let Some(bias) = bias {
        for row in out.data.chunks_exact_mut(out_features) {
            for (o, b) in row.iter_mut().zip(bias.f32s()) {
                *o += b;
            }
        }
    }
    out
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

    fn check(got: &[f32], want: &[f32], what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: {g} vs {w}");
        }
    }

    #[test]
    fn packed_matmul_matches_a_float64_reference_for_f32_and_bf16_weights() {
        let shapes = [
            (1, 7, 5),
            (3, 64, 70),
            (4, 129, 33),
            (5, 96, 40),
            (17, 300, 130),
            (13, 33, 200),
            (25, 600, 70),
        ];
        for &(n, k, m) in &shapes {
            let x = values(n * k, 1);
            let w = values(m * k, 2);
            let want = reference(&x, &w, n, k, m);
            let packed = PackedMatrix::<f32>::pack(m, k, |r, dst| dst.copy_from_slice(&w[r * k..(r + 1) * k]));
            let packed_bf16 = PackedMatrix::<Bf16>::pack(m, k, |r, dst| {
                for (d, v) in dst.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *d = Bf16((v.to_bits() >> 16) as u16);
                }
            });
            let mut out = vec![f32::NAN; n * m];
            matmul_transposed(&x, &packed, &mut out, n);
            check(&out, &want, &format!("f32 n={n} k={k} m={m}"));
            matmul_transposed(&x, &packed_bf16, &mut out, n);
            check(&out, &want, &format!("bf16 n={n} k={k} m={m}"));
            // The path of CPUs without AVX-512, whatever this one has.
            out.fill(f32::NAN);
            matmul_with_gemm_crate(&x, &packed_bf16, &mut out, n);
            check(&out, &want, &format!("gemm crate n={n} k={k} m={m}"));
            let mut row = vec![0.0; k];
            packed_bf16.row_f32(m - 1, &mut row);
            assert_eq!(row, w[(m - 1) * k..]);
        }
    }
}
