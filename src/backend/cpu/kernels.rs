//! Which instruction set the CPU backend's hot loops are compiled for: AVX-512F, AVX2
//! with FMA, or portable Rust (no intrinsics; whatever the target's baseline vectorizes
//! to, NEON on ARM). The best the CPU runs is chosen at start-up and logged once;
//! `INFERD_CPU_KERNELS=avx512|avx2|portable` forces a lower one, so that every path a
//! machine can run is also tested on it.
//!
//! `INFERD_CPU_KERNELS=avx512-bf16` (opt-in, never chosen by default: it is less exact)
//! is the AVX-512 path with the matmuls over bf16 weights computed in bf16 on CPUs with
//! AVX512-BF16: activations rounded to bf16, pairs of products summed into f32 by
//! `vdpbf16ps`, twice the multiply-adds per instruction of f32 FMA. Every row is still
//! computed the same way whatever the batch (batch-invariant), but the rounded
//! activations move logits from transformers' float32 by far more than the goldens'
//! tolerance (docs/perf.md states by how much).
//!
//! Every exact path computes each output with the same operations in the same order (one FMA
//! chain per matmul output over each `KC` slice of k, then the slices summed in order), so
//! results do not depend on how many rows a call has: chunked prefill, batching and
//! decode agree bit for bit on each path. The AVX-512 and AVX2 paths (and the portable
//! one where the target has FMA, as on aarch64) give the same bits as each other; the
//! portable path on x86-64 multiplies and adds separately (a fused multiply-add without
//! the FMA instruction is a libm call per element), so its results differ from theirs in
//! the last bits.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces a path.
pub const ENV: &str = "INFERD_CPU_KERNELS";

/// A kernel path this CPU can run (only such values exist: see `available`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuKernels(pub(super) Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
    Portable,
    /// `Avx512` with bf16 matmuls (opt-in only).
    Avx512Bf16,
}

impl Isa {
    /// The exact paths, fastest first.
    const EXACT: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];
    const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Portable, Isa::Avx512Bf16];

    fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
            Isa::Avx512Bf16 => "avx512-bf16",
        }
    }

    fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 | Isa::Avx512Bf16 => false,
            Isa::Portable => true,
        }
    }

    /// What the path needs, for errors.
    fn needs(self) -> &'static str {
        match self {
            Isa::Avx512 => "an x86-64 CPU with AVX-512F",
            Isa::Avx2 => "an x86-64 CPU with AVX2 and FMA",
            Isa::Portable => "nothing",
            Isa::Avx512Bf16 => "an x86-64 CPU with AVX-512F, AVX-512BW and AVX512-BF16",
        }
    }
}

impl CpuKernels {
    /// Every exact path this CPU runs, fastest first (`portable` always).
    pub fn available() -> Vec<CpuKernels> {
        Isa::EXACT
            .into_iter()
            .filter(|i| i.supported())
            .map(CpuKernels)
            .collect()
    }

    /// The fastest path this CPU runs.
    pub fn best() -> CpuKernels {
        Self::available()[0]
    }

    /// The path of that name, if this CPU runs it.
    pub fn named(name: &str) -> Result<CpuKernels, String> {
        let names = || Isa::ALL.map(Isa::name).join(", ");
        let isa = Isa::ALL
            .into_iter()
            .find(|i| i.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown CPU kernel path `{name}` (one of {})", names()))?;
        if !isa.supported() {
            let runs: Vec<&str> = Self::available().iter().map(|k| k.name()).collect();
            return Err(format!(
                "the `{}` CPU kernels need {}; this CPU runs {}",
                isa.name(),
                isa.needs(),
                runs.join(", ")
            ));
        }
        Ok(CpuKernels(isa))
    }

    /// `INFERD_CPU_KERNELS` if set (an error if it names a path this CPU cannot run),
    /// else the best path.
    pub fn from_env() -> Result<CpuKernels, String> {
        match std::env::var(ENV) {
            Ok(name) if !name.trim().is_empty() => Self::named(&name).map_err(|e| format!("{ENV}={name}: {e}")),
            _ => Ok(Self::best()),
        }
    }

    /// The process-wide path (`from_env`, decided once; logged at debug level, and by
    /// `inferd serve` at start-up). Panics if `INFERD_CPU_KERNELS` is wrong; the CLI
    /// checks it with `from_env` when it opens the device.
    pub fn selected() -> CpuKernels {
        static SELECTED: OnceLock<CpuKernels> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let kernels = Self::from_env().unwrap_or_else(|e| panic!("{e}"));
            crate::debug!("{}", kernels.describe());
            kernels
        })
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// `CPU kernels: NAME`, and whether `INFERD_CPU_KERNELS` forced them (for logs).
    pub fn describe(self) -> String {
        let forced = if self == Self::best() {
            ""
        } else {
            ", forced by INFERD_CPU_KERNELS"
        };
        format!("CPU kernels: {self}{forced}")
    }

    /// Whether results match the other exact paths' (all but `avx512-bf16`).
    pub fn is_exact(self) -> bool {
        Isa::EXACT.contains(&self.0)
    }
}

impl fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `a * b + c` as one path computes it.
pub(super) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding (the FMA instruction).
pub(super) struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Two roundings: a multiply, then an add (the portable path where the target has no
/// FMA in its baseline).
#[cfg(not(target_arch = "aarch64"))]
pub(super) struct Unfused;

#[cfg(not(target_arch = "aarch64"))]
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The portable path's multiply-add: fused where the target always has FMA.
#[cfg(target_arch = "aarch64")]
pub(super) type PortableMulAdd = Fused;
#[cfg(not(target_arch = "aarch64"))]
pub(super) type PortableMulAdd = Unfused;

/// Defines `fn $name(kernels: CpuKernels, args..)` that runs `$body::<A, ..>(args..)`
/// compiled for the chosen path, `A` being that path's `MulAdd` (`$body` must be
/// `#[inline(always)]` so that it is compiled into each path's function).
macro_rules! per_path {
    ($vis:vis fn $name:ident $(<$($g:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $vis fn $name $(<$($g: $bound),*>)? (kernels: $crate::backend::cpu::kernels::CpuKernels, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::backend::cpu::kernels::Fused $(, $($g),*)?>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::backend::cpu::kernels::Fused $(, $($g),*)?>($($arg),*)
            }
            match kernels.0 {
                // SAFETY: a `CpuKernels` names only a path this CPU runs.
                #[cfg(target_arch = "x86_64")]
                $crate::backend::cpu::kernels::Isa::Avx512 | $crate::backend::cpu::kernels::Isa::Avx512Bf16 => unsafe { avx512 $(::<$($g),*>)? ($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::backend::cpu::kernels::Isa::Avx2 => unsafe { avx2 $(::<$($g),*>)? ($($arg),*) },
                _ => $body::<$crate::backend::cpu::kernels::PortableMulAdd $(, $($g),*)?>($($arg),*),
            }
        }
    };
}
pub(super) use per_path;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_named_and_checked_against_the_cpu() {
        let available = CpuKernels::available();
        assert_eq!(available.last().map(|k| k.name()), Some("portable"));
        assert!(available.iter().all(|k| k.is_exact()));
        assert_eq!(CpuKernels::best(), available[0]);
        for k in &available {
            assert_eq!(CpuKernels::named(&k.name().to_uppercase()), Ok(*k));
        }
        let err = CpuKernels::named("sse9").unwrap_err();
        assert!(err.contains("avx512, avx2, portable"), "{err}");
        for isa in Isa::ALL {
            if !isa.supported() {
                let err = CpuKernels::named(isa.name()).unwrap_err();
                assert!(err.contains(isa.needs()), "{err}");
            }
        }
    }
}
