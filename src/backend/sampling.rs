//! Choosing a token from one row of logits, as every backend computes it: the argmax,
//! the seeded inverse-CDF draw, and the whole pipeline of a sampled row that
//! `Backend::sample_rows` runs where the logits are (sparse logit edits, then top-k /
//! top-p / min-p, then the same draw over the kept tokens, and the row's
//! log-probabilities). The engine builds a row's [`RowSampling`] from its request
//! (`engine::sampling`); this module is the reference the GPU kernels are checked
//! against (kernels/sampling.cu).
//!
//! The filters keep a prefix of the candidates in (logit descending, id ascending)
//! order, which a [`Pivot`] names: its last kept token. The draw then walks the kept
//! tokens in id order, like the unfiltered draw, so that a device finds the kept set by
//! selection (no sort) and draws it with one scan.

/// Index of the largest logit; the lowest index wins a tie, as `torch.argmax` does.
/// NaN logits are never chosen.
pub fn argmax(logits: &[f32]) -> u32 {
    // Two branch-free passes (the maximum, then its first position) vectorize; one
    // compare-and-branch pass over a 150k vocabulary does not.
    let max = logits
        .chunks(16)
        .map(|c| c.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }))
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0; // every logit is -inf or NaN
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// One draw from `softmax(logits / temperature)` by inverse CDF in id order: with
/// weights `exp((l - max) / temperature)` (f64) over the logits above -inf, the first
/// token whose running weight sum exceeds `u * total` (`u` uniform in [0, 1)). The first
/// +inf logit takes all the mass; with no logit above -inf, [`argmax`] decides. The
/// sampler's unfiltered draw, and what backends compute in `draw_rows`.
pub fn draw(logits: &[f32], temperature: f32, u: f64) -> u32 {
    if let Some(i) = logits.iter().position(|&v| v == f32::INFINITY) {
        return i as u32;
    }
    draw_where(logits, temperature, u, |_, _| true)
}

/// [`draw`] over the tokens `keep` accepts (given id and logit; none of them +inf).
fn draw_where(logits: &[f32], temperature: f32, u: f64, keep: impl Fn(usize, f32) -> bool) -> u32 {
    let kept = |i: usize, v: f32| v > f32::NEG_INFINITY && keep(i, v);
    let max = logits
        .iter()
        .enumerate()
        .filter(|&(i, &v)| kept(i, v))
        .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
    if max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let (max, inv_t) = (max as f64, 1.0 / temperature as f64);
    let weight = |v: f32| ((v as f64 - max) * inv_t).exp();
    let total: f64 = logits
        .iter()
        .enumerate()
        .filter(|&(i, &v)| kept(i, v))
        .map(|(_, &v)| weight(v))
        .sum();
    let target = u * total;
    let mut running = 0.0;
    let mut last = 0;
    for (i, &v) in logits.iter().enumerate() {
        if kept(i, v) {
            running += weight(v);
            last = i;
            if running > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Log-probability of the chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first; ties by lower id.
    pub top: Vec<(u32, f32)>,
}

/// `log(sum(exp(logits)))`, the normalizer of `log_softmax`: the sum in f64 after the
/// maximum is taken out, the result back in f32.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    sum.ln() as f32 + max
}

/// The `k` largest of `values`, largest first, ties by lower index.
pub fn top_entries(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(idx.len());
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, by_value);
    }
    idx.truncate(k);
    idx.sort_by(by_value);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

/// `log_softmax` of a row in f32: each logit minus [`log_sum_exp`].
pub fn log_softmax(raw: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(raw);
    raw.iter().map(|&v| v - lse).collect()
}

/// `token`'s entry under a row's [`log_softmax`] `lp`, with the `k` likeliest tokens.
pub fn entry_of(lp: &[f32], token: u32, k: usize) -> TokenLogprobs {
    TokenLogprobs {
        token,
        logprob: lp[token as usize],
        top: top_entries(lp, k),
    }
}

/// `token`'s log-probability under one row of raw logits and the `k` likeliest tokens'.
pub fn logprobs_entry(raw: &[f32], token: u32, k: usize) -> TokenLogprobs {
    entry_of(&log_softmax(raw), token, k)
}

/// What a request's logits processors do to one token, in this order: add `bias` (the
/// logit bias), apply the repetition `penalty` (divide a positive logit, multiply a
/// negative one; 1 leaves it), subtract `subtract` (presence and frequency penalties),
/// then `ban` it (-inf). A row's edits name each token once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitEdit {
    pub token: u32,
    pub bias: f32,
    pub penalty: f32,
    pub subtract: f32,
    pub ban: bool,
}

impl LogitEdit {
    /// The edit that changes nothing.
    pub fn none(token: u32) -> Self {
        LogitEdit {
            token,
            bias: 0.0,
            penalty: 1.0,
            subtract: 0.0,
            ban: false,
        }
    }

    pub fn apply(&self, l: f32) -> f32 {
        let mut l = l + self.bias;
        if self.penalty != 1.0 {
            l = if l > 0.0 { l / self.penalty } else { l * self.penalty };
        }
        l -= self.subtract;
        if self.ban {
            f32::NEG_INFINITY
        } else {
            l
        }
    }
}

/// Applies `edits` to a row (tokens outside it are skipped).
pub fn apply_edits(logits: &mut [f32], edits: &[LogitEdit]) {
    for e in edits {
        if let Some(l) = logits.get_mut(e.token as usize) {
            *l = e.apply(*l);
        }
    }
}

/// How one row's token is chosen where its logits are: everything about a request's
/// sampling that does not need the whole row on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSampling {
    /// 0: greedy (so is `top_k` 1).
    pub temperature: f32,
    pub top_k: Option<usize>,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// The draw's uniform number in [0, 1) (unused when greedy).
    pub uniform: f64,
    /// Applied before choosing, each token once.
    pub edits: Vec<LogitEdit>,
    /// Report the chosen token's log-probability and this many alternatives, under the
    /// raw logits (before the edits).
    pub logprobs: Option<usize>,
}

impl RowSampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// Any of top-k, top-p and min-p in force.
    pub fn is_filtered(&self) -> bool {
        self.top_k.is_some() || self.top_p < 1.0 || self.min_p > 0.0
    }
}

/// A sampled row: the token, and its log-probabilities when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// The last token the filters keep, in (logit descending, id ascending) order: they keep
/// every token with a larger logit, and those with an equal one up to `id`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pivot {
    pub value: f32,
    pub id: u32,
}

impl Pivot {
    pub fn keeps(&self, id: usize, v: f32) -> bool {
        v > self.value || (v == self.value && id as u32 <= self.id)
    }
}

/// The weight of a logit in a draw at temperature `t` from a row whose largest logit
/// is `max`: `exp((v - max) / t)` in f64.
pub fn weight(v: f32, max: f32, t: f32) -> f64 {
    ((v as f64 - max as f64) * (1.0 / t as f64)).exp()
}

/// The filters' cut of a row with no +inf logit (`None`: no logit above -inf). Of the
/// candidates in (logit descending, id ascending) order: the first `top_k`; of those,
/// the shortest prefix whose weight reaches `top_p` of theirs; and no further than the
/// last whose weight (relative to the largest's, 1) is at least `min_p`, keeping one.
///
/// Found without sorting, as kernels/sampling.cu finds it: radix selection over the
/// logits' order-preserving bit patterns, 8 bits a pass, each pass counting (and, for
/// top-p, weighing) the candidates under each next digit and keeping those under the
/// digit where the cut falls; the tie among equal logits is settled by id (-0 and +0
/// are one value). Top-p sums weights as [`fixed_mass`] integers, exact in any order, so
/// the cut does not depend on how a device groups the sums.
pub fn filter_pivot(logits: &[f32], s: &RowSampling) -> Option<Pivot> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return None;
    }
    let by_mass = s.top_p < 1.0;
    let weighed = by_mass || s.min_p > 0.0;
    let mut candidates: Vec<Candidate> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &v)| v > f32::NEG_INFINITY)
        .map(|(i, &v)| {
            let weight = if weighed { weight(v, max, s.temperature) } else { 0.0 };
            Candidate {
                key: order_key(v),
                id: i as u32,
                weight,
                mass: if by_mass { fixed_mass(weight) } else { 0 },
            }
        })
        .collect();
    let n = candidates.len();
    let in_k = s.top_k.map_or(n, |k| k.clamp(1, n));
    if in_k < n {
        let cut = radix_select(&candidates, in_k, f64::INFINITY);
        candidates.retain(|c| cut.keeps(c.id as usize, key_value(c.key)));
    }
    let count = if s.min_p > 0.0 {
        let above = candidates.iter().filter(|c| c.weight >= s.min_p as f64).count();
        above.clamp(1, in_k)
    } else {
        in_k
    };
    let mass = if by_mass {
        s.top_p as f64 * candidates.iter().map(|c| c.mass).sum::<u64>() as f64
    } else {
        f64::INFINITY
    };
    Some(radix_select(&candidates, count, mass))
}

/// A logit above -inf, as radix selection sees it.
#[derive(Clone, Copy)]
struct Candidate {
    key: u32,
    id: u32,
    weight: f64,
    mass: u64,
}

/// A weight (at most 1) in the fixed point top-p sums it in: units of 2^-40.
pub fn fixed_mass(weight: f64) -> u64 {
    (weight * (1u64 << 40) as f64) as u64
}

/// The logits' order as unsigned keys (a larger logit, a larger key; -0 is +0).
fn order_key(v: f32) -> u32 {
    let b = if v == 0.0 { 0 } else { v.to_bits() };
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn key_value(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k })
}

/// The first point of `candidates` (in id order), in (logit descending, id ascending)
/// order, where `count` of them have passed or their [`fixed_mass`] reaches `mass`.
fn radix_select(candidates: &[Candidate], count: usize, mass: f64) -> Pivot {
    let (mut above_count, mut above_mass) = (0usize, 0u64);
    let mut under: Option<Vec<Candidate>> = None; // those under the digits chosen so far
    for shift in [24u32, 16, 8, 0] {
        let set = under.as_deref().unwrap_or(candidates);
        let mut counts = [0usize; 256];
        let mut masses = [0u64; 256];
        for c in set {
            let digit = ((c.key >> shift) & 0xff) as usize;
            counts[digit] += 1;
            masses[digit] += c.mass;
        }
        let lowest = counts
            .iter()
            .position(|&n| n > 0)
            .expect("a candidate under the prefix");
        let mut chosen = lowest; // the last digit with candidates is taken unadded
        for d in (lowest + 1..256).rev() {
            if above_count + counts[d] >= count || (above_mass + masses[d]) as f64 >= mass {
                chosen = d;
                break;
            }
            above_count += counts[d];
            above_mass += masses[d];
        }
        under = Some(
            set.iter()
                .filter(|c| ((c.key >> shift) & 0xff) as usize == chosen)
                .copied()
                .collect(),
        );
    }
    // Every one left has the same logit; they are in id order.
    let tied = under.expect("four passes");
    let mut need = tied.len().min(count - above_count.min(count)).max(1);
    let mut running = above_mass;
    for (j, c) in tied.iter().enumerate().take(need) {
        running += c.mass;
        if running as f64 >= mass {
            need = j + 1;
            break;
        }
    }
    let last = tied[need - 1];
    Pivot {
        value: key_value(last.key),
        id: last.id,
    }
}

/// The token of an edited row: the argmax when greedy, else a draw at the temperature
/// from the kept tokens (all of them when unfiltered), in id order.
pub fn choose(logits: &[f32], s: &RowSampling) -> u32 {
    if s.is_greedy() {
        return argmax(logits);
    }
    if !s.is_filtered() {
        return draw(logits, s.temperature, s.uniform);
    }
    if let Some(i) = logits.iter().position(|&v| v == f32::INFINITY) {
        return i as u32; // an infinite logit (a +100 bias can make one) takes all the mass
    }
    match filter_pivot(logits, s) {
        None => argmax(logits),
        Some(pivot) => draw_where(logits, s.temperature, s.uniform, |i, v| pivot.keeps(i, v)),
    }
}

/// One row through the whole pipeline: edits, choice, and log-probabilities of the raw
/// logits. What `Backend::sample_rows` computes for each row.
pub fn sample_row(raw: &[f32], s: &RowSampling) -> Sampled {
    let token = if s.edits.is_empty() {
        choose(raw, s)
    } else {
        let mut edited = raw.to_vec();
        apply_edits(&mut edited, &s.edits);
        choose(&edited, s)
    };
    Sampled {
        token,
        logprobs: s.logprobs.map(|k| logprobs_entry(raw, token, k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_is_the_inverse_cdf_in_id_order() {
        // p = [1/4, 3/4] at temperature 1; at temperature 0.5 the odds square: [1/10, 9/10].
        let logits = [0.0f32, 3f32.ln()];
        assert_eq!(draw(&logits, 1.0, 0.0), 0);
        assert_eq!(draw(&logits, 1.0, 0.249), 0);
        assert_eq!(draw(&logits, 1.0, 0.251), 1);
        assert_eq!(draw(&logits, 0.5, 0.099), 0);
        assert_eq!(draw(&logits, 0.5, 0.101), 1);
        // -inf and NaN never drawn; +inf takes everything; nothing drawable: argmax.
        let masked = [f32::NEG_INFINITY, 1.0, f32::NAN, 1.0];
        assert_eq!(draw(&masked, 1.0, 0.0), 1);
        assert_eq!(draw(&masked, 1.0, 0.999), 3);
        assert_eq!(draw(&[1.0, f32::INFINITY, f32::INFINITY], 1.0, 0.5), 1);
        let nothing = [f32::NEG_INFINITY, f32::NAN];
        assert_eq!(draw(&nothing, 1.0, 0.5), argmax(&nothing));
    }

    fn row(top_k: Option<usize>, top_p: f32, min_p: f32, u: f64) -> RowSampling {
        RowSampling {
            temperature: 1.0,
            top_k,
            top_p,
            min_p,
            uniform: u,
            edits: Vec::new(),
            logprobs: None,
        }
    }

    #[test]
    fn filters_keep_a_prefix_and_the_draw_walks_it_in_id_order() {
        // Weights at temperature 1, relative to the largest: id 3 (1), ids 1 and 4 (1/2
        // each, tied: id 1 first), id 0 (1/4), id 2 (-inf, never).
        let half = 0.5f32.ln();
        let logits = [2.0 * half, half, f32::NEG_INFINITY, 0.0, half];
        let pivot = |s: &RowSampling| filter_pivot(&logits, s).map(|p| p.id);
        assert_eq!(pivot(&row(Some(1), 1.0, 0.0, 0.0)), Some(3));
        assert_eq!(pivot(&row(Some(2), 1.0, 0.0, 0.0)), Some(1), "ties by lower id");
        assert_eq!(pivot(&row(Some(9), 1.0, 0.0, 0.0)), Some(0));
        // Total 2.25: top-p 0.5 needs 1.125, reached after ids 3 and 1.
        assert_eq!(pivot(&row(None, 0.5, 0.0, 0.0)), Some(1));
        assert_eq!(pivot(&row(None, 0.44, 0.0, 0.0)), Some(3));
        // Within top-k 3 (total 2): top-p 0.75 needs 1.5, reached at id 1... and 0.76 at id 4.
        assert_eq!(pivot(&row(Some(3), 0.75, 0.0, 0.0)), Some(1));
        assert_eq!(pivot(&row(Some(3), 0.76, 0.0, 0.0)), Some(4));
        // min-p keeps weights of at least 0.45 (ids 3, 1, 4), and always one.
        assert_eq!(pivot(&row(None, 1.0, 0.45, 0.0)), Some(4));
        assert_eq!(pivot(&row(None, 1.0, 0.9, 0.0)), Some(3));
        // The draw over ids 1, 3, 4 (weights 1/2, 1, 1/2 of 2) walks them in id order.
        let s = |u| row(None, 1.0, 0.45, u);
        assert_eq!(choose(&logits, &s(0.24)), 1);
        assert_eq!(choose(&logits, &s(0.26)), 3);
        assert_eq!(choose(&logits, &s(0.74)), 3);
        assert_eq!(choose(&logits, &s(0.76)), 4);
        // -0 and +0 are one value: top-k 2 of [-0, +0, +0] keeps ids 0 and 1.
        let zeros = [-0.0f32, 0.0, 0.0, -1.0];
        let cut = filter_pivot(&zeros, &row(Some(2), 1.0, 0.0, 0.0)).unwrap();
        let kept: Vec<usize> = (0..4).filter(|&i| cut.keeps(i, zeros[i])).collect();
        assert_eq!(kept, vec![0, 1]);
        // Greedy ignores the filters; an infinite logit wins any draw.
        assert_eq!(
            choose(
                &logits,
                &RowSampling {
                    temperature: 0.0,
                    ..s(0.9)
                }
            ),
            3
        );
        let mut inf = logits;
        inf[0] = f32::INFINITY;
        assert_eq!(choose(&inf, &s(0.9)), 0);
    }

    #[test]
    fn edits_follow_the_processors_order_and_logprobs_read_the_raw_row() {
        let e = LogitEdit {
            bias: 1.0,
            penalty: 2.0,
            subtract: 0.25,
            ..LogitEdit::none(1)
        };
        assert_eq!(e.apply(3.0), 2.0 - 0.25, "(3 + 1) / 2 - 0.25");
        assert_eq!(e.apply(-3.0), -4.0 - 0.25, "(-3 + 1) * 2 - 0.25");
        assert_eq!(LogitEdit { ban: true, ..e }.apply(3.0), f32::NEG_INFINITY);
        assert_eq!(LogitEdit::none(0).apply(-1.5), -1.5);
        let raw = [0.0f32, 1.0, 2.0];
        let s = RowSampling {
            temperature: 0.0,
            edits: vec![LogitEdit {
                bias: 100.0,
                ..LogitEdit::none(0)
            }],
            logprobs: Some(2),
            ..row(None, 1.0, 0.0, 0.0)
        };
        let out = sample_row(&raw, &s);
        assert_eq!(out.token, 0);
        let lp = out.logprobs.unwrap();
        let norm = (1.0f64 + 1f64.exp() + 2f64.exp()).ln() as f32;
        assert!((lp.logprob - (0.0 - norm)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    /// The filters by their definition: the candidates sorted.
    fn sorted_pivot(logits: &[f32], s: &RowSampling) -> Option<Pivot> {
        let mut candidates: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        // -0 and +0 are one value; no NaN is a candidate.
        candidates.sort_by(|a, b| {
            let (x, y) = (logits[*a as usize], logits[*b as usize]);
            y.partial_cmp(&x).expect("no NaN").then(a.cmp(b))
        });
        if let Some(k) = s.top_k {
            candidates.truncate(k.max(1));
        }
        let max = logits[candidates[0] as usize];
        let weights: Vec<f64> = candidates
            .iter()
            .map(|&i| weight(logits[i as usize], max, s.temperature))
            .collect();
        let mut keep = candidates.len();
        if s.top_p < 1.0 {
            let masses: Vec<u64> = weights.iter().map(|&w| fixed_mass(w)).collect();
            let threshold = s.top_p as f64 * masses.iter().sum::<u64>() as f64;
            let mut running = 0u64;
            for (i, m) in masses.iter().enumerate() {
                running += m;
                if running as f64 >= threshold {
                    keep = i + 1;
                    break;
                }
            }
        }
        if s.min_p > 0.0 {
            let above = weights.iter().take_while(|&&w| w >= s.min_p as f64).count();
            keep = keep.min(above.max(1));
        }
        let id = candidates[keep - 1];
        Some(Pivot {
            value: logits[id as usize],
            id,
        })
    }

    /// Radix selection (what `filter_pivot` and the kernel do) cuts where sorting does,
    /// over rows of many ties, spread values and -inf, with every filter and their mixes.
    #[test]
    fn radix_selection_cuts_where_sorting_does() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..2000 {
            let len = if case % 100 == 0 {
                20_000
            } else {
                1 + (next() % 300) as usize
            };
            // Few distinct values (many ties), or spread ones; some -inf.
            let distinct = [3, 17, 1000][case % 3];
            let logits: Vec<f32> = (0..len)
                .map(|_| match next() % 20 {
                    0 => f32::NEG_INFINITY,
                    1 => -0.0,
                    _ => ((next() % distinct) as f32 - distinct as f32 / 2.0) * 0.37,
                })
                .collect();
            let s = RowSampling {
                temperature: [0.3, 1.0, 1.7][case % 3],
                top_k: (case % 4 != 0).then(|| 1 + (next() % (len as u64 + 3)) as usize),
                top_p: if case % 5 < 3 {
                    (next() % 1000) as f32 / 1000.0 + 0.001
                } else {
                    1.0
                },
                min_p: if case % 7 < 2 {
                    (next() % 100) as f32 / 100.0
                } else {
                    0.0
                },
                ..row(None, 1.0, 0.0, 0.0)
            };
            assert_eq!(
                filter_pivot(&logits, &s),
                sorted_pivot(&logits, &s),
                "case {case}: {s:?}"
            );
        }
    }
}
