//! kernels/layout.cu against `backend::cpu::layout`.

use super::*;

/// Row gathers, embedding lookups from f32 and bf16 tables, and the 1-D im2col.
#[test]
fn layout_ops_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(13);
    for (rows, cols) in [(1, 64), (3, 576), (17, 896), (256, 1536), (1, 4096), (5, 8)] {
        let x = pair(&c, &g, rng.vec(rows * cols, 3.0), rows, cols);
        let what = format!("[{rows}, {cols}]");
        let picks: Vec<usize> = (0..rows.min(7)).map(|_| rng.below(rows)).collect();
        let (oc, og) = (c.gather_rows(&x.cpu, &picks), g.gather_rows(&x.gpu, &picks));
        check(
            &format!("gather_rows {what}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
    // Embedding lookups from f32 and bf16 tables.
    for (vocab, hidden, dtype) in [
        (1000, 64, Dtype::F32),
        (49_152, 576, Dtype::BF16),
        (384, 72, Dtype::BF16),
    ] {
        let table = rng.vec(vocab * hidden, 1.0);
        let bytes = view_bytes(&table, dtype);
        let shape = [vocab, hidden];
        let (tc, tg) = (
            c.weight(&view(&bytes, &shape, dtype)),
            g.weight(&view(&bytes, &shape, dtype)),
        );
        let ids: Vec<u32> = (0..300).map(|_| rng.below(vocab) as u32).collect();
        let (oc, og) = (c.embedding(&tc, &ids), g.embedding(&tg, &ids));
        check(
            &format!("embedding {vocab}x{hidden} {dtype:?}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
    // The 1-D im2col of Whisper's conv stem.
    for (len, ch, kernel, stride, pad) in [(3000, 80, 3, 1, 1), (3000, 384, 3, 2, 1), (7, 5, 3, 2, 1)] {
        let x = pair(&c, &g, rng.vec(len * ch, 1.0), len, ch);
        let (oc, og) = (
            c.im2col_1d(&x.cpu, kernel, stride, pad),
            g.im2col_1d(&x.gpu, kernel, stride, pad),
        );
        check(
            &format!("im2col_1d {len}x{ch}"),
            &host_gpu(&g, og),
            &host_cpu(&c, oc),
            0.0,
        );
    }
}
