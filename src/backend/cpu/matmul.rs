//! `y = x · Wᵀ` for the CPU backend.
//!
//! Weights are packed once at load into slabs of `NR` output rows, each slab transposed
//! (`[ceil(m / NR)][k][NR]`, zero-padded), in f32 or bf16 (widened in registers; exact).
//! x is packed per call into blocks of `MR` rows (`[ceil(n / MR)][k][MR]`). Slabs are
//! split across rayon tasks; a task owns the output columns of its slabs and fills each
//! `MR x NR` tile of them, `KC` values of k at a time, with one register-blocked
//! microkernel per instruction set (`kernels`): AVX-512 (the whole tile in 24 zmm
//! accumulators), AVX2 + FMA (6 x 16 sub-tiles in 12 ymm; 2 x 32 for decode's one or
//! two rows), or portable Rust (two rows at a time, 64 accumulators the compiler
//! vectorizes). The same kernel serves prefill (many rows of x, compute-bound) and decode
//! (a row or a few, memory-bound: each slab streams once, contiguously, and bf16 halves
//! the bytes).
//!
//! Every output is one multiply-add chain over each `KC` slice of k, in order, whatever
//! the number of rows or the sub-tile shape, and the slices are summed in order: a row's
//! result does not depend on the rows it is computed with.

use rayon::prelude::*;

use super::kernels::CpuKernels;
#[cfg(target_arch = "x86_64")]
use super::kernels::Isa;
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

/// One `MR x NR` tile: `tile[r][c] = Σ_kk a[kk][r] · b[kk][c]` for `r < rows`, with
/// `a [kc][MR]` (packed x, `X` values) and `b [kc][NR]` (a slab's rows kk).
type Microkernel<X, W> = fn(rows: usize, a: &[X], b: &[W], tile: &mut [f32; MR * NR]);

fn microkernel_of<W: WeightElem>(kernels: CpuKernels) -> Microkernel<f32, W> {
    match kernels.0 {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => avx512::microkernel::<W>,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::microkernel::<W>,
        _ => portable::microkernel::<W>,
    }
}

/// `x [n, k]` times `w [m, k]` transposed -> `out [n, m]` (overwritten), on the given
/// kernels.
pub(super) fn matmul<W: WeightElem>(kernels: CpuKernels, x: &[f32], w: &PackedMatrix<W>, out: &mut [f32], n: usize) {
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
    if kernels.0 == Isa::Avx512Bf16 && W::IS_BF16 {
        let xp = avx512bf16::pack_x(x, n, k);
        return tiles(&xp, k + k % 2, w, out, n, avx512bf16::microkernel::<W>);
    }
    tiles(&pack_x(x, n, k), k, w, out, n, microkernel_of::<W>(kernels))
}

/// Fills `out [n, m]` tile by tile from x packed into row blocks of `kx * MR` values
/// (`kx >= k`: room for padding) and the weight slabs.
fn tiles<X: Sync, W: WeightElem>(
    xp: &[X],
    kx: usize,
    w: &PackedMatrix<W>,
    out: &mut [f32],
    n: usize,
    microkernel: Microkernel<X, W>,
) {
    let (k, m) = (w.cols, w.rows);
    let out_ptr = OutPtr(out.as_mut_ptr());
    w.data
        .par_chunks(SLABS_PER_TASK * k * NR)
        .enumerate()
        .for_each(|(t, slabs)| {
            let mut tile = [0.0f32; MR * NR];
            for (s, slab) in slabs.chunks_exact(k * NR).enumerate() {
                let j0 = (t * SLABS_PER_TASK + s) * NR;
                let cols = NR.min(m - j0);
                // Each KC-deep slice of the slab serves every row block while it is in
                // cache.
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    // The last slice of x takes the padding with it.
                    let a_end = if k0 + kc == k { kx } else { k0 + kc };
                    for (b, xb) in xp.chunks_exact(kx * MR).enumerate() {
                        let rows = MR.min(n - b * MR);
                        microkernel(
                            rows,
                            &xb[k0 * MR..a_end * MR],
                            &slab[k0 * NR..(k0 + kc) * NR],
                            &mut tile,
                        );
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
                    }
                    k0 += kc;
                }
            }
        });
}

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

/// Checks a microkernel's arguments; returns `kc`.
fn tile_depth<W>(rows: usize, a: &[f32], b: &[W]) -> usize {
    let kc = b.len() / NR;
    assert!(
        a.len() == kc * MR && b.len() == kc * NR && rows <= MR,
        "microkernel: bad tile"
    );
    kc
}

/// The whole `12 x 32` tile in 24 zmm accumulators.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{tile_depth, WeightElem, MR, NR};

    /// Only reached through `CpuKernels` naming AVX-512 (the CPU has AVX-512F).
    pub(super) fn microkernel<W: WeightElem>(rows: usize, a: &[f32], b: &[W], tile: &mut [f32; MR * NR]) {
        let kc = tile_depth(rows, a, b);
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: the CPU supports AVX-512F; a and b hold kc rows of MR and
                    // NR values.
                    $($r => unsafe { kernel::<W, $r>(kc, a.as_ptr(), b.as_ptr(), tile) },)*
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
    /// AVX-512F; `a` holds `kc * MR` values and `b` `kc * NR`.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<W: WeightElem, const R: usize>(kc: usize, a: *const f32, b: *const W, tile: &mut [f32; MR * NR]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
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

/// With 16 ymm registers: one or two rows across all 32 columns (decode; 8 accumulators),
/// else sub-tiles of up to 6 rows by 16 columns (12 accumulators, 2 weight vectors and
/// a broadcast: the classic 6 x 16 AVX2 tile).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{tile_depth, WeightElem, MR, NR};

    /// Only reached through `CpuKernels` naming AVX2 (the CPU has AVX2 and FMA).
    pub(super) fn microkernel<W: WeightElem>(rows: usize, a: &[f32], b: &[W], tile: &mut [f32; MR * NR]) {
        let kc = tile_depth(rows, a, b);
        let (a, b, t) = (a.as_ptr(), b.as_ptr(), tile.as_mut_ptr());
        // SAFETY (every call below): the CPU supports AVX2 and FMA; sub-tile (r0, c0)
        // with R rows and 8 * V columns lies inside the MR x NR tile and the a/b blocks.
        unsafe {
            match rows {
                1 => kernel::<W, 1, 4>(kc, a, b, t),
                2 => kernel::<W, 2, 4>(kc, a, b, t),
                _ => {
                    let mut r0 = 0;
                    while r0 < rows {
                        for c0 in [0, 16] {
                            let (a, b, t) = (a.add(r0), b.add(c0), t.add(r0 * NR + c0));
                            match rows - r0 {
                                1 => kernel::<W, 1, 2>(kc, a, b, t),
                                2 => kernel::<W, 2, 2>(kc, a, b, t),
                                3 => kernel::<W, 3, 2>(kc, a, b, t),
                                4 => kernel::<W, 4, 2>(kc, a, b, t),
                                5 => kernel::<W, 5, 2>(kc, a, b, t),
                                _ => kernel::<W, 6, 2>(kc, a, b, t),
                            }
                        }
                        r0 += 6;
                    }
                }
            }
        }
    }

    /// Loads 8 weights at `p` as f32.
    #[inline(always)]
    unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements at p and AVX2.
        unsafe {
            if W::IS_BF16 {
                let bits = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        }
    }

    /// `R` rows by `8 * V` columns: `a` at the sub-tile's first row (row stride `MR`),
    /// `b` at its first column (row stride `NR`), `tile` at its first output.
    ///
    /// # Safety
    /// AVX2 and FMA; `kc` rows of `a` and `b` readable there, R rows of 8 * V outputs
    /// writable at `tile` with row stride NR.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<W: WeightElem, const R: usize, const V: usize>(
        kc: usize,
        a: *const f32,
        b: *const W,
        tile: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for kk in 0..kc {
            // SAFETY: kk < kc rows of a and b.
            unsafe {
                let mut w = [_mm256_setzero_ps(); V];
                for (v, w) in w.iter_mut().enumerate() {
                    *w = load8(b.add(kk * NR + 8 * v));
                }
                let a_row = a.add(kk * MR);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let ar = _mm256_set1_ps(*a_row.add(r));
                    for (acc_rv, w) in acc_r.iter_mut().zip(&w) {
                        *acc_rv = _mm256_fmadd_ps(ar, *w, *acc_rv);
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, acc_rv) in acc_r.iter().enumerate() {
                // SAFETY: inside the sub-tile.
                unsafe { _mm256_storeu_ps(tile.add(r * NR + 8 * v), *acc_rv) };
            }
        }
    }
}

/// bf16 products summed in f32 (`vdpbf16ps`): x rounded to bf16 and packed in pairs
/// along k (`[ceil(n / MR)][k / 2][MR][2]`, zero-padded to even k), slab rows taken two at
/// a time and interleaved in registers, so each instruction does 32 multiply-adds into
/// 16 f32 lanes. The interleave works within 128-bit lanes, so each row's two
/// accumulators hold the columns `{0-3, 8-11, 16-19, 24-27}` and `{4-7, ...}`; one
/// permute per tile puts them back in order.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use super::{WeightElem, KC, MR, NR};

    /// f32 to bf16, rounding to nearest even (NaN stays NaN).
    fn to_bf16(v: f32) -> u16 {
        let bits = v.to_bits();
        if v.is_nan() {
            return ((bits >> 16) | 0x40) as u16;
        }
        ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }

    pub(super) fn pack_x(x: &[f32], n: usize, k: usize) -> Vec<u16> {
        let kx = k + k % 2;
        let mut packed = vec![0u16; n.div_ceil(MR) * kx * MR];
        for (b, dst) in packed.chunks_mut(kx * MR).enumerate() {
            for r in 0..MR.min(n - b * MR) {
                for (kk, v) in x[(b * MR + r) * k..(b * MR + r + 1) * k].iter().enumerate() {
                    dst[((kk / 2) * MR + r) * 2 + kk % 2] = to_bf16(*v);
                }
            }
        }
        packed
    }

    /// Only reached through `CpuKernels` naming avx512-bf16 (the CPU has AVX-512F and
    /// AVX512-BF16), with bf16 weights.
    pub(super) fn microkernel<W: WeightElem>(rows: usize, a: &[u16], b: &[W], tile: &mut [f32; MR * NR]) {
        let kc = b.len() / NR;
        assert!(
            W::IS_BF16 && kc <= KC && a.len() == (kc + kc % 2) * MR && b.len() == kc * NR && rows <= MR,
            "bf16 microkernel: bad tile"
        );
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: the CPU supports AVX-512F and AVX512-BF16; a holds
                    // ceil(kc / 2) pairs of MR rows, b kc rows of NR bf16 values.
                    $($r => unsafe { kernel::<$r>(kc, a.as_ptr(), b.as_ptr() as *const u16, tile) },)*
                    _ => unreachable!("rows <= MR"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// # Safety
    /// AVX-512F and AVX512-BF16; `a` holds `ceil(kc / 2) * MR` pairs, `b` `kc * NR`
    /// values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const R: usize>(kc: usize, a: *const u16, b: *const u16, tile: &mut [f32; MR * NR]) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..kc.div_ceil(2) {
            // SAFETY: rows 2p (and 2p + 1 when it exists) of b, pair p of a.
            unsafe {
                let r0 = _mm512_loadu_si512(b.add(2 * p * NR) as *const _);
                let r1 = if 2 * p + 1 < kc {
                    _mm512_loadu_si512(b.add((2 * p + 1) * NR) as *const _)
                } else {
                    _mm512_setzero_si512()
                };
                let w_lo: __m512bh = std::mem::transmute(_mm512_unpacklo_epi16(r0, r1));
                let w_hi: __m512bh = std::mem::transmute(_mm512_unpackhi_epi16(r0, r1));
                let pair = a.add(p * MR * 2) as *const i32;
                for r in 0..R {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair.add(r).read_unaligned()));
                    lo[r] = _mm512_dpbf16_ps(lo[r], x, w_lo);
                    hi[r] = _mm512_dpbf16_ps(hi[r], x, w_hi);
                }
            }
        }
        let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for r in 0..R {
            // SAFETY: the tile holds MR >= R rows of NR values.
            unsafe {
                _mm512_storeu_ps(
                    tile.as_mut_ptr().add(r * NR),
                    _mm512_permutex2var_ps(lo[r], first, hi[r]),
                );
                _mm512_storeu_ps(
                    tile.as_mut_ptr().add(r * NR + 16),
                    _mm512_permutex2var_ps(lo[r], second, hi[r]),
                );
            }
        }
    }
}

/// No intrinsics: two rows at a time across the 32 columns (the compiler keeps the
/// accumulators in vector registers: SSE2 on any x86-64, NEON on ARM).
mod portable {
    use super::{tile_depth, WeightElem, MR, NR};
    use crate::backend::cpu::kernels::{MulAdd, PortableMulAdd};

    pub(super) fn microkernel<W: WeightElem>(rows: usize, a: &[f32], b: &[W], tile: &mut [f32; MR * NR]) {
        let kc = tile_depth(rows, a, b);
        let mut r = 0;
        while r < rows {
            if rows - r >= ROWS {
                rows_at_once::<W, ROWS>(r, kc, a, b, tile);
                r += ROWS;
            } else {
                rows_at_once::<W, 1>(r, kc, a, b, tile);
                r += 1;
            }
        }
    }

    /// Rows per pass: each weight row loaded is used this many times.
    const ROWS: usize = 2;

    #[inline(always)]
    fn rows_at_once<W: WeightElem, const R: usize>(
        r0: usize,
        kc: usize,
        a: &[f32],
        b: &[W],
        tile: &mut [f32; MR * NR],
    ) {
        let mut acc = [[0.0f32; NR]; R];
        for kk in 0..kc {
            let w: &[W; NR] = b[kk * NR..(kk + 1) * NR].try_into().expect("NR weights");
            let mut wf = [0.0f32; NR];
            for c in 0..NR {
                wf[c] = w[c].to_f32();
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let ar = a[kk * MR + r0 + i];
                for c in 0..NR {
                    acc[c] = PortableMulAdd::mul_add(ar, wf[c], acc[c]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            tile[(r0 + i) * NR..(r0 + i + 1) * NR].copy_from_slice(acc);
        }
    }
}

/// `linear`: `x · Wᵀ (+ bias)`, the backend op over the packed weight.
pub(super) fn linear(kernels: CpuKernels, x: &CpuTensor, weight: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
    let (out_features, in_features) = (weight.rows(), weight.cols());
    assert_eq!(
        x.cols, in_features,
        "linear: x has {} columns, weight {:?}",
        x.cols, weight.shape
    );
    let mut out = CpuTensor::zeros(x.rows, out_features);
    match &weight.values {
        WeightValues::MatrixF32(w) => matmul(kernels, &x.data, w, &mut out.data, x.rows),
        WeightValues::MatrixBf16(w) => matmul(kernels, &x.data, w, &mut out.data, x.rows),
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
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: {g} vs {w}");
        }
    }

    fn packed(w: &[f32], m: usize, k: usize) -> (PackedMatrix<f32>, PackedMatrix<Bf16>) {
        let f32s = PackedMatrix::<f32>::pack(m, k, |r, dst| dst.copy_from_slice(&w[r * k..(r + 1) * k]));
        let bf16s = PackedMatrix::<Bf16>::pack(m, k, |r, dst| {
            for (d, v) in dst.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                *d = Bf16((v.to_bits() >> 16) as u16);
            }
        });
        (f32s, bf16s)
    }

    /// The exact paths and, where the CPU has it, avx512-bf16.
    fn every_path() -> Vec<CpuKernels> {
        let mut paths = CpuKernels::available();
        paths.extend(CpuKernels::named("avx512-bf16").ok());
        paths
    }

    /// With x not exact in bf16, the bf16 path is off by the rounding of x: at most
    /// 2^-8 of `Σ |x| |w|` per output (each x moves by at most 2^-9 of itself).
    #[test]
    fn the_bf16_path_is_off_only_by_rounding_x_to_bf16() {
        let Ok(kernels) = CpuKernels::named("avx512-bf16") else {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        };
        let (n, k, m) = (13, 301, 70);
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 997.0 - 0.5) * 1.37)
            .collect();
        let w = values(m * k, 2);
        let want = reference(&x, &w, n, k, m);
        let (_, packed_bf16) = packed(&w, m, k);
        let mut out = vec![f32::NAN; n * m];
        matmul(kernels, &x, &packed_bf16, &mut out, n);
        let mut worst = 0.0f64;
        for i in 0..n {
            for j in 0..m {
                let scale: f64 = (0..k).map(|l| (x[i * k + l] as f64 * w[j * k + l] as f64).abs()).sum();
                let err = (out[i * m + j] as f64 - want[i * m + j] as f64).abs() / scale;
                assert!(
                    err <= 1.0 / 256.0,
                    "row {i} column {j}: {} vs {}",
                    out[i * m + j],
                    want[i * m + j]
                );
                worst = worst.max(err);
            }
        }
        // Rounded, not truncated: far inside the bound on average.
        assert!(worst > 0.0 && worst < 1.0 / 512.0, "worst relative error {worst}");
    }

    #[test]
    fn packed_matmul_matches_a_float64_reference_on_every_path_for_f32_and_bf16_weights() {
        let shapes = [
            (1, 7, 5),
            (2, 40, 33),
            (3, 64, 70),
            (4, 129, 33),
            (5, 96, 40),
            (7, 300, 64),
            (17, 300, 130),
            (13, 33, 200),
            (25, 600, 70),
            (6, 513, 40),
        ];
        // The x values are exact in bf16, so the bf16 path is held to the same bound.
        for kernels in every_path() {
            for &(n, k, m) in &shapes {
                let x = values(n * k, 1);
                let w = values(m * k, 2);
                let want = reference(&x, &w, n, k, m);
                let (packed, packed_bf16) = packed(&w, m, k);
                let mut out = vec![f32::NAN; n * m];
                matmul(kernels, &x, &packed, &mut out, n);
                check(&out, &want, &format!("{kernels} f32 n={n} k={k} m={m}"));
                out.fill(f32::NAN);
                matmul(kernels, &x, &packed_bf16, &mut out, n);
                check(&out, &want, &format!("{kernels} bf16 n={n} k={k} m={m}"));
                let mut row = vec![0.0; k];
                packed_bf16.row_f32(m - 1, &mut row);
                assert_eq!(row, w[(m - 1) * k..]);
            }
        }
    }

    /// Each row's result is the same bits whether it is computed alone, in a chunk or
    /// with all the others (every sub-tile shape of every path), and the paths with the
    /// FMA instruction agree with each other bit for bit.
    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_around_it_on_any_path() {
        let (n, k, m) = (31, 700, 72);
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 997.0 - 0.5) * 1.37)
            .collect();
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104_729 % 977) as f32 / 971.0 - 0.5) * 0.91)
            .collect();
        let (_, packed_bf16) = packed(&w, m, k);
        let mut fused: Option<Vec<u32>> = None;
        for kernels in every_path() {
            let mut whole = vec![0.0f32; n * m];
            matmul(kernels, &x, &packed_bf16, &mut whole, n);
            for chunk in [1, 2, 5, 6, 7, 12, 13] {
                let mut start = 0;
                while start < n {
                    let rows = chunk.min(n - start);
                    let mut part = vec![0.0f32; rows * m];
                    matmul(
                        kernels,
                        &x[start * k..(start + rows) * k],
                        &packed_bf16,
                        &mut part,
                        rows,
                    );
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&part),
                        bits(&whole[start * m..(start + rows) * m]),
                        "{kernels}: rows {start}..{} in chunks of {chunk}",
                        start + rows
                    );
                    start += rows;
                }
            }
            let bits: Vec<u32> = whole.iter().map(|f| f.to_bits()).collect();
            if kernels.is_exact() && (kernels.name() != "portable" || cfg!(target_arch = "aarch64")) {
                match &fused {
                    Some(first) => assert!(first == &bits, "{kernels} differs from the other FMA paths"),
                    None => fused = Some(bits),
                }
            }
        }
    }
}
