//! kernels/activation.cu against `backend::cpu::activation`.

use super::*;

#[test]
fn activations_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(12);
    for (rows, cols) in [(1, 64), (3, 576), (17, 896), (256, 1536), (1, 4096), (5, 8)] {
        let what = format!("[{rows}, {cols}]");
        let mut a = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        let d = pair(&c, &g, rng.vec(rows * cols, 1.0), rows, cols);
        c.add(&mut a.cpu, &d.cpu);
        g.add(&mut a.gpu, &d.gpu);
        check(&format!("add {what}"), &host_gpu(&g, a.gpu), &host_cpu(&c, a.cpu), 1e-7);

        let mut a = pair(&c, &g, rng.vec(rows * cols, 4.0), rows, cols);
        c.gelu(&mut a.cpu);
        g.gelu(&mut a.gpu);
        check(
            &format!("gelu {what}"),
            &host_gpu(&g, a.gpu),
            &host_cpu(&c, a.cpu),
            1e-6,
        );

        if cols % 2 == 0 {
            let gu = pair(&c, &g, rng.vec(rows * cols, 4.0), rows, cols);
            let (oc, og) = (c.silu_mul(&gu.cpu), g.silu_mul(&gu.gpu));
            check(&format!("silu_mul {what}"), &host_gpu(&g, og), &host_cpu(&c, oc), 1e-6);
        }
    }
}
