//! kernels/rotary.cu (rotary; the KV writes are checked with attention) against
//! `backend::cpu::rotary`.

use super::*;

#[test]
fn rotary_and_rotary_sections_match_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(5);
    for shape in head_shapes() {
        let (heads, kv_heads, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let rows = 37;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let (fc, fg) = (c.weight_from_f32(inv.clone()), g.weight_from_f32(inv));
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(32_768) as u32).collect();
        let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
        c.rotary(&mut x.cpu, &positions, &fc, shape);
        g.rotary(&mut x.gpu, &positions, &fg, shape);
        // sin/cos of angles up to 3e4 rad: both sides round the angle the same way, the
        // library functions differ in the last bits.
        check(
            &format!("rotary {heads}/{kv_heads}x{hd}"),
            &host_gpu(&g, x.gpu),
            &host_cpu(&c, x.cpu),
            1e-5,
        );

        // Three position streams (M-RoPE sections, and the vision tower's two).
        for sections in [[hd / 8, hd * 3 / 16, hd * 3 / 16], [hd / 4, hd / 4, 0], [hd / 2, 0, 0]] {
            let triples: Vec<[u32; 3]> = (0..rows)
                .map(|_| [rng.below(32_768) as u32, rng.below(512) as u32, rng.below(512) as u32])
                .collect();
            let mut x = pair(&c, &g, rng.vec(rows * shape.qkv_width(), 2.0), rows, shape.qkv_width());
            c.rotary_sections(&mut x.cpu, &triples, sections, &fc, shape);
            g.rotary_sections(&mut x.gpu, &triples, sections, &fg, shape);
            check(
                &format!("rotary_sections {sections:?} {heads}/{kv_heads}x{hd}"),
                &host_gpu(&g, x.gpu),
                &host_cpu(&c, x.cpu),
                1e-5,
            );
        }
    }
}
