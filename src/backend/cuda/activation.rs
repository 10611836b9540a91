//! Elementwise activations (kernels/activation.cu): SiLU·mul of the gate and up
//! halves, exact GELU, and in-place adds. CPU reference: `backend::cpu::activation`.

use super::device::elementwise;
use super::{CudaBackend, CudaTensor};

pub(super) fn silu_mul(be: &CudaBackend, gate_up: &CudaTensor) -> CudaTensor {
    let inter = gate_up.cols / 2;
    let out = be.tensor(gate_up.rows, inter, "silu_mul");
    if gate_up.rows > 0 {
        let (g, o, r, i) = (
            be.ptr(&gate_up.buf),
            be.ptr(&out.buf),
            gate_up.rows as i32,
            inter as i32,
        );
        launch!(be, "silu_mul_f32", elementwise(gate_up.rows * inter); &g, &o, &r, &i);
    }
    out
}

pub(super) fn add(be: &CudaBackend, x: &mut CudaTensor, y: &CudaTensor) {
    assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
    let n = x.rows * x.cols;
    if n > 0 {
        let (xp, yp, len) = (be.ptr(&x.buf), be.ptr(&y.buf), n as u64);
        launch!(be, "add_f32", elementwise(n); &xp, &yp, &len);
    }
}

pub(super) fn gelu(be: &CudaBackend, x: &mut CudaTensor) {
    let n = x.rows * x.cols;
    if n > 0 {
        let (xp, len) = (be.ptr(&x.buf), n as u64);
        launch!(be, "gelu_f32", elementwise(n); &xp, &len);
    }
}
