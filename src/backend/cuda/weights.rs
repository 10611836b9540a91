//! Weights onto the device: matrices as bf16 or f32 per `--dtype`, vectors as f32,
//! stacked matrices uploaded as one. CPU counterpart: `backend::cpu::weights`.

use super::{CudaBackend, CudaWeight};
use crate::backend::WeightDtype;
use crate::loader::{Dtype, TensorView};

impl CudaBackend {
    pub(super) fn upload_views(&self, views: &[TensorView<'_>]) -> CudaWeight {
        let cols = views[0].shape[1..].iter().product::<usize>();
        if views.len() == 1 && views[0].shape.len() != 2 {
            return CudaWeight::Vector(self.htod(&views[0].to_f32_vec(), "weight upload"));
        }
        let rows: usize = views.iter().map(|v| v.shape[0]).sum();
        for v in views {
            assert_eq!(
                v.shape[1..].iter().product::<usize>(),
                cols,
                "stacked weight `{}` has other columns",
                v.name
            );
        }
        let all_bf16 = views.iter().all(|v| v.dtype == Dtype::BF16);
        let weights = self.inner.weights;
        if all_bf16 && weights != WeightDtype::F32 {
            let mut host = Vec::with_capacity(rows * cols);
            for v in views {
                host.extend(v.bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
            }
            return CudaWeight::Bf16 {
                buf: self.htod(&host, "weight upload"),
                rows,
                cols,
            };
        }
        let mut host = Vec::with_capacity(rows * cols);
        for v in views {
            host.extend(v.to_f32_vec());
        }
        if weights == WeightDtype::Bf16 {
            // Rounded to nearest even, as torch's `.to(torch.bfloat16)`.
            let bits: Vec<u16> = host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            return CudaWeight::Bf16 {
                buf: self.htod(&bits, "weight upload"),
                rows,
                cols,
            };
        }
        CudaWeight::F32 {
            buf: self.htod(&host, "weight upload"),
            rows,
            cols,
        }
    }
}

pub(super) fn weight(be: &CudaBackend, view: &TensorView<'_>) -> CudaWeight {
    be.upload_views(std::slice::from_ref(view))
}

pub(super) fn weight_stacked(be: &CudaBackend, views: &[TensorView<'_>]) -> CudaWeight {
    be.upload_views(views)
}

pub(super) fn weight_from_f32(be: &CudaBackend, values: Vec<f32>) -> CudaWeight {
    CudaWeight::Vector(be.htod(&values, "weight upload"))
}
