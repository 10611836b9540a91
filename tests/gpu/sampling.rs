//! kernels/sampling.cu against `backend::cpu::sampling` (`backend::argmax`, `backend::draw`).

use super::*;
use inferd::backend::cuda::RowSampler;

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

/// Whole sampled rows on the device (`sample_rows_f32`, `INFERD_CUDA_SAMPLING=device`)
/// against the reference (`backend::sampling::sample_row`): the same token for the same
/// uniform number with edits (bias, penalties, bans), top-k, top-p, min-p and their
/// mixes, over rows with ties, -inf and +inf logits, and vocabularies from 1 to 152k;
/// log-probabilities within 1e-5 and their alternatives in the same order.
#[test]
fn sample_rows_matches_the_cpu() {
    use inferd::backend::{LogitEdit, RowSampling};
    let Some(g) = gpu(WeightDtype::F32) else { return };
    g.set_row_sampler(RowSampler::Device);
    // Equal, both NaN (a row of -inf has no distribution), or within 1e-5.
    let close = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5;
    let c = CpuBackend::with_weights(WeightDtype::F32);
    let mut rng = Rng(4321);
    let mut checked = 0;
    for vocab in [1, 5, 1000, 1025, 49_152, 151_936] {
        let rows = 64;
        let mut values = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let scale = [0.1, 3.0, 20.0][r % 3];
            let mut row = rng.vec(vocab, scale);
            match r % 9 {
                // Ties: few distinct values.
                1 => row.iter_mut().for_each(|v| *v = (*v * 2.0).round()),
                2 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY),
                3 => row.fill(f32::NEG_INFINITY),
                4 if vocab > 2 => row[vocab - 2] = f32::INFINITY,
                _ => {}
            }
            values.extend(row);
        }
        let x = pair(&c, &g, values, rows, vocab);
        let picks: Vec<usize> = (0..rows).rev().collect();
        for round in 0..4 {
            let sampling: Vec<RowSampling> = (0..rows)
                .map(|r| {
                    let k = r + round;
                    let edits: std::collections::BTreeMap<u32, LogitEdit> = (0..(k % 4) * 3)
                        .map(|e| {
                            let token = ((e * 7919 + k) % vocab) as u32;
                            let edit = LogitEdit {
                                token,
                                bias: if e % 2 == 0 { 1.5 } else { 0.0 },
                                penalty: if e % 3 == 0 { 1.3 } else { 1.0 },
                                subtract: if e % 4 == 0 { 0.7 } else { 0.0 },
                                ban: e % 5 == 4,
                            };
                            (token, edit)
                        })
                        .collect();
                    // Log-probabilities of rows a model gives (finite logits).
                    let finite = !matches!(r % 9, 3 | 4);
                    RowSampling {
                        temperature: [0.0, 0.3, 1.0, 1.8][k % 4],
                        top_k: [None, Some(1), Some(5), Some(40), Some(vocab + 3)][k % 5],
                        top_p: [1.0, 0.9, 0.5, 0.05][(k / 2) % 4],
                        min_p: [0.0, 0.0, 0.1, 0.5][(k / 3) % 4],
                        uniform: (rng.next() >> 11) as f64 / (1u64 << 53) as f64,
                        edits: edits.into_values().collect(),
                        logprobs: [None, Some(0), Some(5), Some(20)][(k / 5) % 4].filter(|_| finite),
                    }
                })
                .collect();
            let refs: Vec<&RowSampling> = sampling.iter().collect();
            let (got, want) = (
                g.sample_rows(&x.gpu, &picks, &refs),
                c.sample_rows(&x.cpu, &picks, &refs),
            );
            for (j, (g, c)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.token, c.token,
                    "vocabulary {vocab}, row {}: {:?}",
                    picks[j], sampling[j]
                );
                match (&g.logprobs, &c.logprobs) {
                    (None, None) => {}
                    (Some(gl), Some(cl)) => {
                        assert!(close(gl.logprob, cl.logprob), "{gl:?} {cl:?}");
                        assert_eq!(gl.top.len(), cl.top.len());
                        for (a, b) in gl.top.iter().zip(&cl.top) {
                            assert_eq!(a.0, b.0, "alternatives in order: {gl:?} {cl:?}");
                            assert!(close(a.1, b.1), "{gl:?} {cl:?}");
                        }
                    }
                    other => panic!("log-probabilities asked for and not given: {other:?}"),
                }
            }
            checked += got.len();
        }
    }
    eprintln!("sample_rows: {checked} rows equal to the CPU's");
}
