//! kernels/sampling.cu against `backend::cpu::sampling` (`backend::argmax`, `backend::draw`).

use super::*;

#[test]
fn argmax_rows_matches_the_cpu_with_ties_nan_and_infinities() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(99);
    for vocab in [1, 7, 1000, 49_152, 151_936] {
        let rows = 70;
        let mut values = rng.vec(rows * vocab, 10.0);
        for r in 0..rows {
            let row = &mut values[r * vocab..(r + 1) * vocab];
            match r % 7 {
                // Ties: the lower index wins.
                1 if vocab > 5 => {
                    row[vocab - 1] = 50.0;
                    row[vocab / 2] = 50.0;
                }
                2 => row[rng.below(vocab)] = f32::NAN,
                3 => row.fill(f32::NEG_INFINITY),
                4 => row.fill(f32::NAN),
                5 => row[rng.below(vocab)] = f32::INFINITY,
                _ => {}
            }
        }
        let x = pair(&c, &g, values, rows, vocab);
        let pick: Vec<usize> = (0..rows).rev().filter(|r| r % 3 != 0).collect();
        assert_eq!(
            g.argmax_rows(&x.gpu, &pick),
            c.argmax_rows(&x.cpu, &pick),
            "argmax_rows over a vocabulary of {vocab}"
        );
    }
}

/// Sampling on the device: the same token as the CPU's `draw` for the same uniform
/// numbers, over peaked and flat rows, temperatures from 0.1 to 2, rows with -inf, NaN
/// and +inf logits, and vocabularies from 1 to 152k (ranges of the scan from empty to
/// 149 ids per thread).
#[test]
fn draw_rows_matches_the_cpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(1234);
    let mut checked = 0;
    for vocab in [1, 3, 1000, 1025, 49_152, 151_936] {
        let rows = 96;
        let mut values = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let scale = [0.1, 3.0, 20.0][r % 3];
            let mut row = rng.vec(vocab, scale);
            match r % 11 {
                1 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY),
                2 => row[rng.below(vocab)] = f32::NAN,
                3 => row.fill(f32::NEG_INFINITY),
                4 if vocab > 2 => row[vocab - 2] = f32::INFINITY,
                5 => row.fill(f32::NAN),
                _ => {}
            }
            values.extend(row);
        }
        let x = pair(&c, &g, values, rows, vocab);
        let picks: Vec<usize> = (0..rows).collect();
        let temps: Vec<f32> = (0..rows).map(|r| [0.1, 0.7, 1.0, 2.0][r % 4]).collect();
        for _ in 0..4 {
            let us: Vec<f64> = (0..rows)
                .map(|_| (rng.next() >> 11) as f64 / (1u64 << 53) as f64)
                .collect();
            let (got, want) = (
                g.draw_rows(&x.gpu, &picks, &temps, &us),
                c.draw_rows(&x.cpu, &picks, &temps, &us),
            );
            assert_eq!(got, want, "draw_rows over a vocabulary of {vocab}");
            checked += got.len();
        }
    }
    eprintln!("draw_rows: {checked} draws equal to the CPU's");
}
