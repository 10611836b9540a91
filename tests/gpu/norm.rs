//! kernels/norm.cu against the CPU backend's norms (`backend::cpu::norm`).

use super::*;

/// RMSNorm and LayerNorm (with and without the fused residual add) over row widths
/// from 8 to 4096, and Qwen3's per-head q/k norm over head shapes.
#[test]
fn norms_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(11);
    for (rows, cols) in [(1, 64), (3, 576), (17, 896), (256, 1536), (1, 4096), (5, 8)] {
        let w_vals = rng.vec(cols, 1.0);
        let b_vals = rng.vec(cols, 0.5);
        let shape = [cols];
        let (wb, bb) = (view_bytes(&w_vals, Dtype::F32), view_bytes(&b_vals, Dtype::F32));
        let (wc, wg) = (
            c.weight(&view(&wb, &shape, Dtype::F32)),
            g.weight(&view(&wb, &shape, Dtype::F32)),
        );
        let (bc, bg) = (
            c.weight(&view(&bb, &shape, Dtype::F32)),
            g.weight(&view(&bb, &shape, Dtype::F32)),
        );
        let x = pair(&c, &g, rng.vec(rows * cols, 3.0), rows, cols);
        let what = format!("[{rows}, {cols}]");

        let (oc, og) = (c.rms_norm(&x.cpu, &wc, 1e-6), g.rms_norm(&x.gpu, &wg, 1e-6));
        check(&format!("rms_norm {what}"), &host_gpu(&g, og), &host_cpu(&c, oc), 1e-5);

        let d = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let mut r = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let oc = c.add_rms_norm(&mut r.cpu, &d.cpu, &wc, 1e-5);
        let og = g.add_rms_norm(&mut r.gpu, &d.gpu, &wg, 1e-5);
        check(
            &format!("add_rms_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );
        check(
            &format!("add_rms_norm residual {what}"),
            &host_gpu(&g, r.gpu),
            &host_cpu(&c, r.cpu),
            1e-6,
        );

        let (oc, og) = (
            c.layer_norm(&x.cpu, &wc, &bc, 1e-5),
            g.layer_norm(&x.gpu, &wg, &bg, 1e-5),
        );
        check(
            &format!("layer_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );
        let mut r = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let oc = c.add_layer_norm(&mut r.cpu, &d.cpu, &wc, &bc, 1e-5);
        let og = g.add_layer_norm(&mut r.gpu, &d.gpu, &wg, &bg, 1e-5);
        check(
            &format!("add_layer_norm {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            1e-5,
        );
    }
    for shape in head_shapes() {
        let (heads, kv_heads, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let rows = 37;
        let (qw, kw) = (rng.vec(hd, 1.0), rng.vec(hd, 1.0));
        let (qc, qg) = (c.weight_from_f32(qw.clone()), g.weight_from_f32(qw));
        let (kc, kg) = (c.weight_from_f32(kw.clone()), g.weight_from_f32(kw));
        let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
        c.qk_norm(&mut x.cpu, &qc, &kc, 1e-6, shape);
        g.qk_norm(&mut x.gpu, &qg, &kg, 1e-6, shape);
        check(
            &format!("qk_norm {heads}/{kv_heads}x{hd}"),
            &host_gpu(&g, x.gpu),
            &host_cpu(&c, x.cpu),
            1e-5,
        );
    }
}
