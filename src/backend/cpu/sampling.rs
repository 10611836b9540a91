//! Token choice over logits rows: greedy argmax and the seeded inverse-CDF draw
//! (`backend::argmax`, `backend::draw`). The reference of kernels/sampling.cu.

use super::CpuTensor;

pub(super) fn argmax_rows(x: &CpuTensor, rows: &[usize]) -> Vec<u32> {
    rows.iter().map(|&r| crate::backend::argmax(x.row(r))).collect()
}

pub(super) fn draw_rows(x: &CpuTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
    rows.iter()
        .zip(temperatures.iter().zip(uniforms))
        .map(|(&r, (&t, &u))| crate::backend::draw(x.row(r), t, u))
        .collect()
}
