//! cuBLAS GEMMs (and kernels/matmul.cu's bias and bf16 rounding) against
//! `backend::cpu::matmul`.

use super::*;

#[test]
fn linear_matches_the_cpu_in_f32_and_bf16() {
    for (dtype, bound) in [(WeightDtype::F32, 1e-5), (WeightDtype::Bf16, 1e-2)] {
        let Some(g) = gpu(dtype) else { return };
        let c = CpuBackend::with_weights(dtype);
        let mut rng = Rng(23);
        for (n, out, inp, bias) in [
            (1, 576, 576, false),
            (7, 1152, 576, true),
            (64, 4864, 896, false),
            (256, 896, 4864, true),
            (3, 49_152, 576, false),
            (5, 13, 9, true),
        ] {
            let w = rng.vec(out * inp, 0.1);
            let bytes = view_bytes(&w, Dtype::BF16);
            let shape = [out, inp];
            let (wc, wg) = (
                c.weight(&view(&bytes, &shape, Dtype::BF16)),
                g.weight(&view(&bytes, &shape, Dtype::BF16)),
            );
            let b = rng.vec(out, 1.0);
            let bb = view_bytes(&b, Dtype::F32);
            let bshape = [out];
            let (bc, bg) = (
                c.weight(&view(&bb, &bshape, Dtype::F32)),
                g.weight(&view(&bb, &bshape, Dtype::F32)),
            );
            let x = pair(&c, &g, rng.vec(n * inp, 2.0), n, inp);
            let oc = c.linear(&x.cpu, &wc, bias.then_some(&bc));
            let og = g.linear(&x.gpu, &wg, bias.then_some(&bg));
            check(
                &format!("linear {dtype:?} [{n}, {inp}] x [{out}, {inp}]ᵀ bias={bias}"),
                &host_gpu(&g, og),
                &host_cpu(&c, oc),
                bound,
            );
        }
        // Stacked weights ([q; k; v]) upload as one matrix.
        let (a, b) = (rng.vec(8 * 16, 1.0), rng.vec(4 * 16, 1.0));
        let (ab, bb) = (view_bytes(&a, Dtype::F32), view_bytes(&b, Dtype::F32));
        let (sa, sb) = ([8, 16], [4, 16]);
        let views = [view(&ab, &sa, Dtype::F32), view(&bb, &sb, Dtype::F32)];
        let (wc, wg) = (c.weight_stacked(&views), g.weight_stacked(&views));
        let x = pair(&c, &g, rng.vec(3 * 16, 1.0), 3, 16);
        let (oc, og) = (c.linear(&x.cpu, &wc, None), g.linear(&x.gpu, &wg, None));
        check(
            &format!("stacked linear {dtype:?}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            bound,
        );
    }
}
