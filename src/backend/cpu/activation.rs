//! Elementwise activations: SiLU·mul of the gate and up halves, exact GELU (through
//! `erf`), in-place adds. The reference of kernels/activation.cu.

use rayon::prelude::*;

use super::CpuTensor;

/// `erf`, to about 1e-7 absolute (Abramowitz & Stegun 7.1.26, evaluated in f64).
#[inline]
pub(super) fn erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2` (torch's `nn.GELU()`).
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

pub(super) fn silu_mul(gate_up: &CpuTensor) -> CpuTensor {
    let inter = gate_up.cols / 2;
    let mut out = CpuTensor::zeros(gate_up.rows, inter);
    out.data
        .par_chunks_mut(inter)
        .zip(gate_up.data.par_chunks(gate_up.cols))
        .for_each(|(o, row)| {
            let (gate, up) = row.split_at(inter);
            for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
    out
}

pub(super) fn add(x: &mut CpuTensor, y: &CpuTensor) {
    assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
    x.data
        .par_chunks_mut(4096)
        .zip(y.data.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

pub(super) fn gelu_in_place(x: &mut CpuTensor) {
    x.data.par_iter_mut().for_each(|v| *v = gelu(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_known_values() {
        // torch.nn.functional.gelu at these points.
        for (x, want) in [
            (-3.0f32, -0.004_049_74),
            (-1.0, -0.158_655_25),
            (0.0, 0.0),
            (0.5, 0.345_731_14),
            (2.0, 1.954_499_7),
        ] {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {} not {want}", gelu(x));
        }
    }
}
