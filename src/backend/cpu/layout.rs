//! Layout ops: embedding gathers, row gathers, the 1-D im2col of a conv stem, and
//! activations to and from plain vectors. The reference of kernels/layout.cu.

use rayon::prelude::*;

use super::{CpuTensor, CpuWeight, WeightValues};

pub(super) fn embedding(table: &CpuWeight, token_ids: &[u32]) -> CpuTensor {
    let hidden = table.cols();
    let mut out = CpuTensor::zeros(token_ids.len(), hidden);
    for (row, &id) in out.data.chunks_exact_mut(hidden).zip(token_ids) {
        let id = id as usize;
        assert!(id < table.rows(), "embedding: token id {id} >= vocab {}", table.rows());
        match &table.values {
            WeightValues::MatrixF32(m) => m.row_f32(id, row),
            WeightValues::MatrixBf16(m) => m.row_f32(id, row),
            WeightValues::Vector(_) => panic!("embedding table must be a matrix"),
        }
    }
    out
}

pub(super) fn upload(values: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
    CpuTensor::new(values, rows, cols)
}

pub(super) fn im2col_1d(x: &CpuTensor, kernel: usize, stride: usize, pad: usize) -> CpuTensor {
    let (len, ch) = (x.rows, x.cols);
    assert!(len + 2 * pad >= kernel && stride > 0, "im2col_1d: input too short");
    let out_len = (len + 2 * pad - kernel) / stride + 1;
    let mut out = CpuTensor::zeros(out_len, ch * kernel);
    out.data.par_chunks_mut(ch * kernel).enumerate().for_each(|(p, row)| {
        for t in 0..kernel {
            let Some(src) = (p * stride + t).checked_sub(pad).filter(|&i| i < len) else {
                continue;
            };
            for (c, &v) in x.row(src).iter().enumerate() {
                row[c * kernel + t] = v;
            }
        }
    });
    out
}

pub(super) fn gather_rows(x: &CpuTensor, rows: &[usize]) -> CpuTensor {
    let mut data = Vec::with_capacity(rows.len() * x.cols);
    for &r in rows {
        data.extend_from_slice(x.row(r));
    }
    CpuTensor::new(data, rows.len(), x.cols)
}

pub(super) fn to_host(x: CpuTensor) -> (Vec<f32>, usize, usize) {
    (x.data, x.rows, x.cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;

    #[test]
    fn im2col_and_linear_make_a_convolution() {
        let b = CpuBackend::default();
        // x: 5 steps of 2 channels; kernel 3, stride 2, pad 1 -> 3 outputs.
        let x = CpuTensor::new((0..10).map(|v| v as f32).collect(), 5, 2);
        let cols = b.im2col_1d(&x, 3, 2, 1);
        assert_eq!((cols.rows, cols.cols), (3, 6));
        // Output 0 reads steps -1, 0, 1: channel 0 -> [0, 0, 2], channel 1 -> [0, 1, 3].
        assert_eq!(cols.row(0), &[0.0, 0.0, 2.0, 0.0, 1.0, 3.0]);
        assert_eq!(cols.row(2), &[6.0, 8.0, 0.0, 7.0, 9.0, 0.0]);
    }
}
