//! Token choice over logits rows: greedy argmax, the seeded inverse-CDF draw
//! (`backend::argmax`, `backend::draw`) and whole sampled rows
//! (`backend::sampling::sample_row`), read in place. The reference of
//! kernels/sampling.cu.

use rayon::prelude::*;

use super::CpuTensor;
use crate::backend::{RowSampling, Sampled};

/// Rows in parallel (each a vocabulary's pass), as every function here.
pub(super) fn argmax_rows(x: &CpuTensor, rows: &[usize]) -> Vec<u32> {
    rows.par_iter().map(|&r| crate::backend::argmax(x.row(r))).collect()
}

pub(super) fn draw_rows(x: &CpuTensor, rows: &[usize], temperatures: &[f32], uniforms: &[f64]) -> Vec<u32> {
    rows.par_iter()
        .zip(temperatures.par_iter().zip(uniforms))
        .map(|(&r, (&t, &u))| crate::backend::draw(x.row(r), t, u))
        .collect()
}

pub(super) fn sample_rows(x: &CpuTensor, rows: &[usize], sampling: &[&RowSampling]) -> Vec<Sampled> {
    assert_eq!(rows.len(), sampling.len(), "sample_rows: one RowSampling per row");
    rows.par_iter()
        .zip(sampling.par_iter())
        .map(|(&r, s)| crate::backend::sampling::sample_row(x.row(r), s))
        .collect()
}
