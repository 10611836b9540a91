//! Layout ops (kernels/layout.cu): embedding gathers, row gathers, the 1-D im2col of
//! a conv stem, and activations to and from the host. CPU reference:
//! `backend::cpu::layout`.

use super::device::{cfg, ok, rows_u32};
use super::{CudaBackend, CudaTensor, CudaWeight};

pub(super) fn embedding(be: &CudaBackend, table: &CudaWeight, token_ids: &[u32]) -> CudaTensor {
    let (vocab, hidden) = table.dims();
    for &id in token_ids {
        assert!((id as usize) < vocab, "embedding: token id {id} >= vocab {vocab}");
    }
    let out = be.tensor(token_ids.len(), hidden, "embedding");
    if token_ids.is_empty() {
        return out;
    }
    let ids = be.htod(token_ids, "embedding: ids");
    let (ids, o, h) = (be.ptr(&ids), be.ptr(&out.buf), hidden as i32);
    let grid = (rows_u32(token_ids.len(), "embedding"), 1, 1);
    match table {
        CudaWeight::F32 { buf, .. } => {
            let t = be.ptr(buf);
            launch!(be, "embedding_f32", cfg(grid, 256); &t, &ids, &o, &h);
        }
        CudaWeight::Bf16 { buf, .. } => {
            let t = be.ptr(buf);
            launch!(be, "embedding_bf16", cfg(grid, 256); &t, &ids, &o, &h);
        }
        CudaWeight::Vector(_) => panic!("embedding: a vector weight where a table was expected"),
    }
    out
}

pub(super) fn upload(be: &CudaBackend, values: Vec<f32>, rows: usize, cols: usize) -> CudaTensor {
    assert_eq!(
        values.len(),
        rows * cols,
        "upload: {} values for [{rows}, {cols}]",
        values.len()
    );
    CudaTensor {
        buf: be.htod(&values, "upload"),
        rows,
        cols,
    }
}

pub(super) fn im2col_1d(be: &CudaBackend, x: &CudaTensor, kernel: usize, stride: usize, pad: usize) -> CudaTensor {
    let (len, ch) = (x.rows, x.cols);
    assert!(len + 2 * pad >= kernel && stride > 0, "im2col_1d: input too short");
    let out_len = (len + 2 * pad - kernel) / stride + 1;
    let out = be.tensor(out_len, ch * kernel, "im2col_1d");
    let (xp, o) = (be.ptr(&x.buf), be.ptr(&out.buf));
    let (l, c, k, s, p) = (len as i32, ch as i32, kernel as i32, stride as i32, pad as i32);
    launch!(be, "im2col_1d_f32", cfg((rows_u32(out_len, "im2col_1d"), 1, 1), 256); &xp, &o, &l, &c, &k, &s, &p);
    out
}

pub(super) fn gather_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
    let out = be.tensor(rows.len(), x.cols, "gather_rows");
    if rows.is_empty() {
        return out;
    }
    let idx = be.row_indices(x, rows, "gather_rows");
    let (xp, ip, o, c) = (be.ptr(&x.buf), be.ptr(&idx), be.ptr(&out.buf), x.cols as i32);
    launch!(be, "gather_rows_f32", cfg((rows_u32(rows.len(), "gather_rows"), 1, 1), 256); &xp, &ip, &o, &c);
    out
}

pub(super) fn to_host(be: &CudaBackend, x: CudaTensor) -> (Vec<f32>, usize, usize) {
    let mut values = ok(be.inner.stream.clone_dtoh(&x.buf), "copy to host");
    values.truncate(x.rows * x.cols);
    (values, x.rows, x.cols)
}
