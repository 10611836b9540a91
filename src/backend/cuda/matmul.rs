//! GEMMs through cuBLAS (`GemmEx`): bf16 weights with activations rounded to bf16 and
//! f32 accumulation, or f32 throughout (no TF32); a bias is broadcast into the output
//! first and accumulated with beta = 1. CPU reference: `backend::cpu::matmul`.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys};

use super::device::{elementwise, ok};
use super::{CudaBackend, CudaTensor, CudaWeight};

impl CudaBackend {
    /// `c [n, m] (+)= a [n, k] · bᵀ`, `b` the weight `[m, k]`; `accumulate` keeps c's
    /// values (a bias broadcast into it).
    pub(super) fn gemm(&self, x: &CudaTensor, w: &CudaWeight, out: &CudaTensor, accumulate: bool) {
        let (m, k) = w.dims();
        let n = x.rows;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let dims = |v: usize| i32::try_from(v).unwrap_or_else(|_| panic!("linear: dimension {v} too large"));
        let (mi, ni, ki) = (dims(m), dims(n), dims(k));
        let out_ptr = self.ptr(&out.buf);
        // cuBLAS works in the calling thread's current context (the engine's thread).
        ok(self.inner.ctx.bind_to_thread(), "linear");
        let handle = *self.inner.blas.handle();
        let op_t = blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let op_n = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let f32_t = blas_sys::cudaDataType::CUDA_R_32F;
        // The bf16 input copy lives until the GEMM is queued; its stream-ordered free
        // runs after it.
        let mut _bf16_input = None;
        let (w_ptr, x_ptr, in_t, what) = match w {
            CudaWeight::F32 { buf, .. } => (self.ptr(buf), self.ptr(&x.buf), f32_t, "linear (f32 GEMM)"),
            CudaWeight::Bf16 { buf, .. } => {
                let xb = self.alloc::<u16>(n * k, "linear: bf16 input");
                let (src, dst, len) = (self.ptr(&x.buf), self.ptr(&xb), (n * k) as u64);
                launch!(self, "cast_f32_bf16", elementwise(n * k); &src, &dst, &len);
                _bf16_input = Some(xb);
                (
                    self.ptr(buf),
                    dst,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    "linear (bf16 GEMM)",
                )
            }
            CudaWeight::Vector(_) => panic!("linear: a vector weight where a matrix was expected"),
        };
        // Column-major view: out^T [m, n] = W [k, m]^T · x^T [k, n].
        // SAFETY: shapes checked by the caller; every buffer outlives the queued call
        // (cuBLAS runs on the backend's stream, ordered with the kernels).
        ok(
            unsafe {
                blas::gemm_ex(
                    handle,
                    op_t,
                    op_n,
                    mi,
                    ni,
                    ki,
                    &alpha as *const f32 as *const c_void,
                    w_ptr as *const c_void,
                    in_t,
                    ki,
                    x_ptr as *const c_void,
                    in_t,
                    ki,
                    &beta as *const f32 as *const c_void,
                    out_ptr as *mut c_void,
                    f32_t,
                    mi,
                    compute,
                    algo,
                )
            },
            what,
        );
    }
}

pub(super) fn linear(be: &CudaBackend, x: &CudaTensor, weight: &CudaWeight, bias: Option<&CudaWeight>) -> CudaTensor {
    let (out_dim, in_dim) = weight.dims();
    assert_eq!(
        x.cols, in_dim,
        "linear: input has {} columns, weight [{out_dim}, {in_dim}]",
        x.cols
    );
    let out = be.tensor(x.rows, out_dim, "linear");
    if x.rows == 0 {
        return out;
    }
    if let Some(bias) = bias {
        let b = be.vector(bias, "linear bias");
        assert_eq!(b.len(), out_dim, "linear: bias length");
        let (o, bp, r, c) = (be.ptr(&out.buf), be.ptr(b), x.rows as i32, out_dim as i32);
        launch!(be, "bias_rows_f32", elementwise(x.rows * out_dim); &o, &bp, &r, &c);
    }
    be.gemm(x, weight, &out, bias.is_some());
    out
}
