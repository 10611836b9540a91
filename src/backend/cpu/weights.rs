//! Parameter storage: matrices packed at load for the matmul kernel (bf16 checkpoints
//! stay bf16), vectors as f32. CUDA counterpart: `backend::cuda::weights`.

use super::matmul::{Bf16, PackedMatrix};
use super::CpuBackend;
use crate::backend::WeightDtype;
use crate::loader::{Dtype, TensorView};

/// Parameter storage. Matrices are packed for the matmul kernel; those from bf16
/// checkpoints stay bf16 (half the bytes to stream per decode step; widening to f32 is
/// exact). Vectors (norm weights, biases, frequencies) are f32.
#[derive(Debug, Clone)]
pub enum WeightValues {
    Vector(Vec<f32>),
    MatrixF32(PackedMatrix<f32>),
    MatrixBf16(PackedMatrix<Bf16>),
}

/// A parameter and its checkpoint shape (`[out, in]` for matrices).
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub values: WeightValues,
    pub shape: Vec<usize>,
}

impl CpuWeight {
    pub(super) fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
    pub(super) fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
    /// The values of a vector weight.
    pub(super) fn f32s(&self) -> &[f32] {
        match &self.values {
            WeightValues::Vector(v) => v,
            _ => panic!("weight {:?} is a matrix where a vector was expected", self.shape),
        }
    }

    pub(super) fn from_views(views: &[TensorView<'_>], dtype: WeightDtype) -> CpuWeight {
        let cols = views[0].shape[1..].iter().product::<usize>();
        let rows: usize = views.iter().map(|v| v.shape[0]).sum();
        for v in views {
            assert_eq!(
                v.shape[1..].iter().product::<usize>(),
                cols,
                "stacked weight `{}` has other columns",
                v.name
            );
        }
        if views.len() == 1 && views[0].shape.len() != 2 {
            return CpuWeight {
                values: WeightValues::Vector(views[0].to_f32_vec()),
                shape: views[0].shape.to_vec(),
            };
        }
        // Row r of the stack: which view, and which row inside it.
        let starts: Vec<usize> = views
            .iter()
            .scan(0, |acc, v| {
                let start = *acc;
                *acc += v.shape[0];
                Some(start)
            })
            .collect();
        let locate = |r: usize| {
            let i = starts.partition_point(|&s| s <= r) - 1;
            let bytes = views[i].dtype.size_bytes() * cols;
            (
                &views[i],
                &views[i].bytes[(r - starts[i]) * bytes..(r - starts[i] + 1) * bytes],
            )
        };
        let all_bf16 = views.iter().all(|v| v.dtype == Dtype::BF16);
        let values = if all_bf16 && dtype != WeightDtype::F32 {
            WeightValues::MatrixBf16(PackedMatrix::pack(rows, cols, |r, dst| {
                for (d, b) in dst.iter_mut().zip(locate(r).1.chunks_exact(2)) {
                    *d = Bf16(u16::from_le_bytes([b[0], b[1]]));
                }
            }))
        } else if dtype == WeightDtype::Bf16 {
            // Rounded to nearest even, as torch's `.to(torch.bfloat16)`.
            WeightValues::MatrixBf16(PackedMatrix::pack(rows, cols, |r, dst| {
                let (view, bytes) = locate(r);
                let mut row = vec![0.0f32; cols];
                view.dtype.write_f32(bytes, &mut row);
                for (d, &x) in dst.iter_mut().zip(&row) {
                    *d = Bf16(half::bf16::from_f32(x).to_bits());
                }
            }))
        } else {
            WeightValues::MatrixF32(PackedMatrix::pack(rows, cols, |r, dst| {
                let (view, bytes) = locate(r);
                view.dtype.write_f32(bytes, dst);
            }))
        };
        CpuWeight {
            values,
            shape: vec![rows, cols],
        }
    }
}

pub(super) fn weight(be: &CpuBackend, view: &TensorView<'_>) -> CpuWeight {
    CpuWeight::from_views(std::slice::from_ref(view), be.weights)
}

pub(super) fn weight_stacked(be: &CpuBackend, views: &[TensorView<'_>]) -> CpuWeight {
    CpuWeight::from_views(views, be.weights)
}

pub(super) fn weight_from_f32(values: Vec<f32>) -> CpuWeight {
    let len = values.len();
    CpuWeight {
        values: WeightValues::Vector(values),
        shape: vec![len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuTensor;
    use crate::backend::Backend;
    use crate::loader::Dtype;

    /// `--dtype`: an f32 matrix kept as bf16 is rounded to nearest even (as torch's
    /// `.to(torch.bfloat16)`), a bf16 one kept as f32 is exact, and `auto` keeps each.
    #[test]
    fn weight_dtype_decides_how_matrices_are_kept() {
        // Two exact halfway cases between bf16 neighbours (they round to the even one).
        let values = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -3.3, 1e-3, 7.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let rounded: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let bf16_bytes: Vec<u8> = rounded
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let view = |dtype, bytes| TensorView {
            name: "w",
            path: std::path::Path::new("w.safetensors"),
            dtype,
            shape: &[2, 3],
            bytes,
        };
        // x = identity rows, so `linear` gives back the weight's columns.
        let x = CpuTensor::new(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 3);
        let run = |dtype: WeightDtype, v: &TensorView<'_>| {
            let backend = CpuBackend::with_weights(dtype);
            let w = backend.weight(v);
            let kept_bf16 = matches!(w.values, WeightValues::MatrixBf16(_));
            let (out, _, _) = backend.to_host(backend.linear(&x, &w, None));
            // out[i][j] = w[j][i]
            let w_back: Vec<f32> = (0..2)
                .flat_map(|j| (0..3).map(move |i| (i, j)))
                .map(|(i, j)| out[i * 2 + j])
                .collect();
            (kept_bf16, w_back)
        };
        let f32_view = view(Dtype::F32, &f32_bytes);
        let bf16_view = view(Dtype::BF16, &bf16_bytes);
        assert_eq!(run(WeightDtype::Auto, &f32_view), (false, values.to_vec()));
        assert_eq!(run(WeightDtype::Bf16, &f32_view), (true, rounded.clone()));
        assert_eq!(run(WeightDtype::Auto, &bf16_view), (true, rounded.clone()));
        assert_eq!(run(WeightDtype::F32, &bf16_view), (false, rounded));
    }
}
