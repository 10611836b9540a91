//! Token choice on the device (kernels/sampling.cu): greedy argmax and the seeded
//! inverse-CDF draw of `backend::draw`, so only ids come back to the host. CPU
//! reference: `backend::cpu::sampling`.

use super::device::{cfg, rows_u32};
use super::{CudaBackend, CudaTensor};

pub(super) fn argmax_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize]) -> Vec<u32> {
    if rows.is_empty() {
        return Vec::new();
    }
    let idx = be.row_indices(x, rows, "argmax_rows");
    let out = be.alloc::<u32>(rows.len(), "argmax_rows");
    let (xp, ip, o, c) = (be.ptr(&x.buf), be.ptr(&idx), be.ptr(&out), x.cols as i32);
    launch!(be, "argmax_rows_f32", cfg((rows_u32(rows.len(), "argmax_rows"), 1, 1), 1024); &xp, &ip, &o, &c);
    be.ids_to_host(&out, rows.len(), "argmax_rows")
}

pub(super) fn draw_rows(
    be: &CudaBackend,
    x: &CudaTensor,
    rows: &[usize],
    temperatures: &[f32],
    uniforms: &[f64],
) -> Vec<u32> {
    assert!(
        rows.len() == temperatures.len() && rows.len() == uniforms.len(),
        "draw_rows: one temperature and one uniform number per row"
    );
    if rows.is_empty() {
        return Vec::new();
    }
    let idx = be.row_indices(x, rows, "draw_rows");
    let (temps, us) = (
        be.htod(temperatures, "draw_rows: temperatures"),
        be.htod(uniforms, "draw_rows: uniforms"),
    );
    let out = be.alloc::<u32>(rows.len(), "draw_rows");
    let (xp, ip, tp, up, o, c) = (
        be.ptr(&x.buf),
        be.ptr(&idx),
        be.ptr(&temps),
        be.ptr(&us),
        be.ptr(&out),
        x.cols as i32,
    );
    launch!(be, "draw_rows_f32", cfg((rows_u32(rows.len(), "draw_rows"), 1, 1), 1024); &xp, &ip, &tp, &up, &o, &c);
    be.ids_to_host(&out, rows.len(), "draw_rows")
}
