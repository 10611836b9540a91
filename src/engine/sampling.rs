//! Choosing the next token: logit processors (bias, repetition / presence / frequency
//! penalties, n-gram bans, minimum length), then greedy or seeded random sampling with
//! temperature, top-k, top-p and min-p, and log-probabilities of the model's own
//! distribution (before any processing), as OpenAI and vLLM report them.

use std::collections::BTreeMap;

pub use super::constraint::Constraint;
use crate::backend::sampling::{apply_edits, choose, entry_of, log_softmax, logprobs_entry, LogitEdit, RowSampling};
pub use crate::backend::sampling::{argmax, draw, TokenLogprobs};
use crate::models::whisper::WhisperGeneration;
use crate::text::TokenMask;

/// Everything a request says about how to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// `None` disables.
    pub top_k: Option<usize>,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// HF-style multiplicative penalty over prompt and output tokens; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style additive penalties over output tokens, in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Bans a token that would repeat an n-gram of this size; 0 disables.
    pub no_repeat_ngram_size: usize,
    /// Added to the logits of these tokens, in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same prompt, same parameters: same tokens, whatever the batch.
    pub seed: Option<u64>,
    /// Independent completions of one prompt (they share its KV blocks).
    pub n: usize,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// `None`: until the context window is full.
    pub max_tokens: Option<usize>,
    /// EOS and stop tokens are banned until this many tokens are out.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    /// Generation ends after any of these (in addition to the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// When set, only these tokens may be generated (vLLM's `allowed_token_ids`).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Token sequences the output must not contain (vLLM's `bad_words`, tokenized): the
    /// last token of each is banned wherever the output ends with the rest.
    pub bad_words: Vec<Vec<u32>>,
    /// Report each prompt token's log-probability (given the tokens before it) and this
    /// many alternatives (vLLM's `prompt_logprobs`). Such a request does not take its
    /// prompt from the prefix cache: the prompt's logits have to be computed.
    pub prompt_logprobs: Option<usize>,
    /// Waiting requests are admitted lowest value first (arrival order among equals).
    pub priority: i64,
    /// Cached K/V are shared only between requests with the same salt (vLLM's
    /// `cache_salt`, hashed).
    pub cache_salt: Option<u64>,
    /// When not empty, the output must begin with one of these token sequences (how
    /// `tool_choice` forces a call): other tokens are masked until one is complete.
    /// No sequence may be a prefix of another.
    pub forced_prefixes: Vec<Vec<u32>>,
    /// Whisper's logits processors (token suppression and timestamp rules).
    pub speech: Option<std::sync::Arc<SpeechRules>>,
    /// Structured outputs: the grammar the output follows (the sampler masks every
    /// token it does not allow).
    pub constraint: Option<Constraint>,
}

/// The logits processors transformers' Whisper `generate` installs, applied first and in
/// its order: begin suppression, suppression, then the timestamp rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpeechRules {
    /// Banned at every step.
    pub suppress_tokens: Vec<u32>,
    /// Banned at the first generated step only.
    pub begin_suppress_tokens: Vec<u32>,
    pub timestamps: Option<TimestampRules>,
}

/// `WhisperTimeStampLogitsProcessor`: timestamps come in pairs and never go back, the
/// first token is a timestamp within `max_initial_index` steps, and a timestamp is forced
/// whenever all timestamps together are likelier than any single text token.
#[derive(Debug, Clone, PartialEq)]
pub struct TimestampRules {
    /// The first timestamp token (`<|0.00|>`); every id from it up is a timestamp.
    pub timestamp_begin: u32,
    pub no_timestamps: u32,
    pub eos: u32,
    pub max_initial_index: Option<u32>,
}

impl SpeechRules {
    /// Whisper's processors for one window, from its generation settings.
    pub fn whisper(generation: &WhisperGeneration, timestamps: bool) -> Self {
        SpeechRules {
            suppress_tokens: generation.suppress_tokens.clone(),
            begin_suppress_tokens: generation.begin_suppress_tokens.clone(),
            timestamps: timestamps.then(|| TimestampRules {
                timestamp_begin: generation.timestamp_begin(),
                no_timestamps: generation.no_timestamps_token_id,
                eos: generation.eos_token_id,
                max_initial_index: generation.max_initial_timestamp_index,
            }),
        }
    }

    fn apply(&self, logits: &mut [f32], output: &[u32]) {
        let ban = |logits: &mut [f32], range: std::ops::Range<usize>| {
            let end = range.end.min(logits.len());
            if range.start < end {
                logits[range.start..end].fill(f32::NEG_INFINITY);
            }
        };
        if output.is_empty() {
            for &t in &self.begin_suppress_tokens {
                ban(logits, t as usize..t as usize + 1);
            }
        }
        for &t in &self.suppress_tokens {
            ban(logits, t as usize..t as usize + 1);
        }
        let Some(ts) = &self.timestamps else { return };
        let begin = ts.timestamp_begin as usize;
        let vocab = logits.len();
        ban(logits, ts.no_timestamps as usize..ts.no_timestamps as usize + 1);
        let is_ts = |t: &u32| *t as usize >= begin;
        let last = output.last().is_some_and(is_ts);
        let penultimate = output.len() < 2 || is_ts(&output[output.len() - 2]);
        if last {
            if penultimate {
                ban(logits, begin..vocab);
            } else {
                ban(logits, 0..ts.eos as usize);
            }
        }
        if let Some(&latest) = output.iter().rev().find(|t| is_ts(t)) {
            let floor = if last && !penultimate { latest } else { latest + 1 };
            ban(logits, begin..floor as usize);
        }
        if output.is_empty() {
            ban(logits, 0..begin);
            if let Some(max) = ts.max_initial_index {
                ban(logits, begin + max as usize + 1..vocab);
            }
        }
        // transformers compares log-softmax values: the timestamps' logsumexp against the
        // best text token's. Both sides share the softmax's normalizer, so the raw
        // logits compare the same (no vocabulary-sized pass or buffer per token).
        let (text, stamps) = logits.split_at(begin.min(vocab));
        let max_text = text.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let max_ts = stamps.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if max_ts > f32::NEG_INFINITY {
            let sum_ts = max_ts + stamps.iter().map(|&v| (v - max_ts).exp()).sum::<f32>().ln();
            if sum_ts > max_text {
                ban(logits, 0..begin);
            }
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            no_repeat_ngram_size: 0,
            logit_bias: Vec::new(),
            seed: None,
            n: 1,
            logprobs: None,
            max_tokens: None,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            prompt_logprobs: None,
            priority: 0,
            cache_salt: None,
            forced_prefixes: Vec::new(),
            speech: None,
            constraint: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// One greedy token among `ids`, whatever else the model prefers (EOS included):
    /// how Whisper's language detection picks a language token.
    pub fn likeliest_of(ids: &[u32]) -> Self {
        SamplingParams {
            max_tokens: Some(1),
            ignore_eos: true,
            forced_prefixes: ids.iter().map(|&id| vec![id]).collect(),
            ..Self::greedy()
        }
    }
}

/// What a token id given with a request is for (errors say which one is wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    Prompt,
    /// A key of the logit bias.
    Biased,
    /// A stop token.
    Stop,
    /// Part of a forced prefix.
    Forced,
    /// One of `allowed_token_ids`.
    Allowed,
    /// Part of a bad word.
    BadWord,
}

impl std::fmt::Display for TokenRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenRole::Prompt => "prompt token",
            TokenRole::Biased => "biased token",
            TokenRole::Stop => "stop token",
            TokenRole::Forced => "forced token",
            TokenRole::Allowed => "allowed token",
            TokenRole::BadWord => "bad-word token",
        })
    }
}

impl SamplingParams {
    /// The first token id these parameters name that is outside a vocabulary of
    /// `vocab_size`, with its role. Ranges of the other fields are the API layer's to
    /// check (`api::sampling`); the vocabulary is known only here.
    pub fn token_out_of_range(&self, vocab_size: usize) -> Option<(TokenRole, u32)> {
        let outside = |&t: &u32| t as usize >= vocab_size;
        let biased = self.logit_bias.iter().map(|&(t, _)| t).find(|t| outside(t));
        let stop = self.stop_token_ids.iter().copied().find(outside);
        let forced = self.forced_prefixes.iter().flatten().copied().find(outside);
        let allowed = self.allowed_token_ids.iter().flatten().copied().find(outside);
        let bad = self.bad_words.iter().flatten().copied().find(outside);
        biased
            .map(|t| (TokenRole::Biased, t))
            .or(stop.map(|t| (TokenRole::Stop, t)))
            .or(forced.map(|t| (TokenRole::Forced, t)))
            .or(allowed.map(|t| (TokenRole::Allowed, t)))
            .or(bad.map(|t| (TokenRole::BadWord, t)))
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same stream everywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the sampler needs to know about a sequence besides its logits.
pub struct SamplingContext<'a> {
    pub params: &'a SamplingParams,
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    /// Token ids that end generation (EOS and stop ids), banned before `min_tokens`.
    pub stop_ids: &'a [u32],
    /// The tokens a structured-output grammar allows next.
    pub mask: Option<&'a TokenMask>,
}

impl<'a> SamplingContext<'a> {
    /// The context of a sequence whose first `prompt_len` of `tokens` are its prompt.
    pub fn new(params: &'a SamplingParams, tokens: &'a [u32], prompt_len: usize, stop_ids: &'a [u32]) -> Self {
        let (prompt, output) = tokens.split_at(prompt_len);
        SamplingContext {
            params,
            prompt,
            output,
            stop_ids,
            mask: None,
        }
    }

    pub fn with_mask(mut self, mask: Option<&'a TokenMask>) -> Self {
        self.mask = mask;
        self
    }
}

/// The log-probability of `token` under one row of raw logits, its rank (1: the
/// likeliest), and the `k` likeliest tokens: a prompt token's entry in
/// `prompt_logprobs`.
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> (TokenLogprobs, usize) {
    let lp = log_softmax(logits);
    let entry = entry_of(&lp, token, k);
    let own = entry.logprob;
    let rank = 1 + lp
        .iter()
        .enumerate()
        .filter(|&(i, &v)| v > own || (v == own && (i as u32) < token))
        .count();
    (entry, rank)
}

/// Picks the next token from one row of raw logits (modified in place): the request's
/// processors, then [`choose`] with its temperature and filters. The same choice as the
/// row's [`row_sampling`] on a device, with the processors only the host runs
/// (Whisper's rules, `allowed_token_ids`, a grammar's mask, forced text) applied too.
pub fn sample(logits: &mut [f32], ctx: &SamplingContext<'_>, rng: &mut Rng) -> (u32, Option<TokenLogprobs>) {
    let p = ctx.params;
    let raw = p.logprobs.map(|_| logits.to_vec());
    let row = row_sampling(ctx, rng);
    apply_processors(logits, ctx, &row.edits);
    let token = choose(logits, &row);
    let logprobs = raw.map(|raw| logprobs_entry(&raw, token, p.logprobs.unwrap_or(0)));
    (token, logprobs)
}

/// Whether this row's choice needs its whole row of logits on the host: processors no
/// backend runs (Whisper's rules, `allowed_token_ids`, a grammar's mask, forced text).
/// Every other row can be sampled where its logits are, from its [`row_sampling`].
pub fn needs_host(ctx: &SamplingContext<'_>) -> bool {
    let p = ctx.params;
    p.speech.is_some()
        || p.allowed_token_ids.is_some()
        || ctx.mask.is_some()
        || forced_next(&p.forced_prefixes, ctx.output).is_some()
}

/// Whether a request's edits depend on which tokens it has generated (penalties,
/// n-gram and bad-word bans): its next step cannot be planned before its last token is
/// read.
pub fn reads_history(p: &SamplingParams) -> bool {
    p.repetition_penalty != 1.0
        || p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0
        || p.no_repeat_ngram_size > 0
        || !p.bad_words.is_empty()
}

/// The row's sampling as a device runs it: temperature and filters, the uniform number
/// of the draw (taken from the sequence's RNG unless greedy), the edits of the logit
/// bias, the penalties and the bans, and the log-probabilities asked for.
pub fn row_sampling(ctx: &SamplingContext<'_>, rng: &mut Rng) -> RowSampling {
    let p = ctx.params;
    let mut row = RowSampling {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        uniform: 0.0,
        edits: edits(ctx),
        logprobs: p.logprobs,
    };
    if !row.is_greedy() {
        row.uniform = rng.next_f64();
    }
    row
}

/// The sparse processors as edits, one per token, in token order: logit bias,
/// repetition penalty (transformers': each distinct token of prompt and output once),
/// presence and frequency penalties (OpenAI's, over the output), n-gram bans
/// (transformers' `NoRepeatNGramLogitsProcessor` over prompt and output), bad words
/// (vLLM's rule: the last token is banned where the output ends with the others), and
/// the stop ids before `min_tokens`.
pub fn edits(ctx: &SamplingContext<'_>) -> Vec<LogitEdit> {
    let p = ctx.params;
    let mut edits: BTreeMap<u32, LogitEdit> = BTreeMap::new();
    fn at(edits: &mut BTreeMap<u32, LogitEdit>, t: u32) -> &mut LogitEdit {
        edits.entry(t).or_insert_with(|| LogitEdit::none(t))
    }
    for &(token, bias) in &p.logit_bias {
        at(&mut edits, token).bias += bias;
    }
    if p.repetition_penalty != 1.0 {
        for &t in ctx.prompt.iter().chain(ctx.output) {
            at(&mut edits, t).penalty = p.repetition_penalty;
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for &t in ctx.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            at(&mut edits, t).subtract = p.frequency_penalty * c as f32 + p.presence_penalty;
        }
    }
    if p.no_repeat_ngram_size > 0 {
        let n = p.no_repeat_ngram_size;
        let all: Vec<u32> = ctx.prompt.iter().chain(ctx.output).copied().collect();
        if all.len() + 1 >= n {
            let tail = &all[all.len() + 1 - n..];
            for window in all.windows(n) {
                if window[..n - 1] == *tail {
                    at(&mut edits, window[n - 1]).ban = true;
                }
            }
        }
    }
    for word in &p.bad_words {
        if let Some((&last, before)) = word.split_last() {
            if ctx.output.ends_with(before) {
                at(&mut edits, last).ban = true;
            }
        }
    }
    if ctx.output.len() < p.min_tokens {
        for &t in ctx.stop_ids {
            at(&mut edits, t).ban = true;
        }
    }
    edits.into_values().collect()
}

/// Every processor over one row, in transformers' order: Whisper's rules, then the
/// sparse `edits` (bias, penalties, bans), `allowed_token_ids`, the grammar's mask, and
/// forced text last.
fn apply_processors(logits: &mut [f32], ctx: &SamplingContext<'_>, edits: &[LogitEdit]) {
    let p = ctx.params;
    if let Some(rules) = &p.speech {
        rules.apply(logits, ctx.output);
    }
    apply_edits(logits, edits);
    if let Some(allowed) = &p.allowed_token_ids {
        let mut mask = vec![false; logits.len()];
        for &t in allowed {
            if let Some(m) = mask.get_mut(t as usize) {
                *m = true;
            }
        }
        for (l, keep) in logits.iter_mut().zip(mask) {
            if !keep {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(mask) = ctx.mask {
        mask.apply(logits);
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            // The processors above banned all the grammar allows (`min_tokens` against a
            // complete grammar, a bad word, `allowed_token_ids`): the grammar wins, its
            // tokens equally likely.
            for (t, l) in logits.iter_mut().enumerate() {
                if mask.allows(t as u32) {
                    *l = 0.0;
                }
            }
        }
    }
    if let Some(allowed) = forced_next(&p.forced_prefixes, ctx.output) {
        // Last, and absolute: only the forced continuations remain (each kept finite,
        // whatever the processors above did to it).
        let mut keep: Vec<(u32, f32)> = allowed
            .iter()
            .filter_map(|&t| {
                logits
                    .get(t as usize)
                    .map(|&l| (t, if l.is_finite() { l } else { 0.0 }))
            })
            .collect();
        keep.dedup_by_key(|(t, _)| *t);
        logits.fill(f32::NEG_INFINITY);
        for (t, l) in keep {
            logits[t as usize] = l;
        }
    }
}

/// The tokens that may come next under `forced_prefixes`, or `None` when nothing is
/// forced (no prefixes, or one is already complete).
fn forced_next(prefixes: &[Vec<u32>], output: &[u32]) -> Option<Vec<u32>> {
    if prefixes.is_empty() {
        return None;
    }
    let pos = output.len();
    let mut next = Vec::new();
    for prefix in prefixes {
        let shared = pos.min(prefix.len());
        if prefix[..shared] != output[..shared] {
            continue;
        }
        if prefix.len() <= pos {
            return None; // this one is complete
        }
        next.push(prefix[pos]);
    }
    next.sort_unstable();
    // An output that left every prefix (impossible while masking) is not constrained.
    (!next.is_empty()).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(params: &'a SamplingParams, prompt: &'a [u32], output: &'a [u32]) -> SamplingContext<'a> {
        SamplingContext {
            params,
            prompt,
            output,
            stop_ids: &[0],
            mask: None,
        }
    }

    /// A row sampled where its logits are (`row_sampling` then the backend's
    /// `sample_row`) picks what the host's `sample` picks, with the same log-probabilities,
    /// from the same RNG state: penalties, bans, bias, filters and their mixes.
    #[test]
    fn a_row_sampled_on_the_device_picks_what_the_host_picks() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for case in 0..300 {
            let vocab = 2 + next() % 200;
            let logits: Vec<f32> = (0..vocab).map(|_| (next() % 1000) as f32 / 100.0 - 5.0).collect();
            let prompt: Vec<u32> = (0..next() % 9).map(|_| (next() % vocab) as u32).collect();
            let output: Vec<u32> = (0..next() % 9).map(|_| (next() % vocab) as u32).collect();
            let params = SamplingParams {
                temperature: [0.0, 0.5, 1.0, 1.5][case % 4],
                top_k: [None, Some(1), Some(3), Some(50)][(case / 4) % 4],
                top_p: [1.0, 0.8, 0.3][(case / 2) % 3],
                min_p: [0.0, 0.2][(case / 3) % 2],
                repetition_penalty: [1.0, 1.3][(case / 5) % 2],
                presence_penalty: [0.0, 0.5][(case / 7) % 2],
                frequency_penalty: [0.0, -0.4][(case / 11) % 2],
                no_repeat_ngram_size: [0, 2][(case / 13) % 2],
                logit_bias: vec![((next() % vocab) as u32, 3.0), ((next() % vocab) as u32, -2.0)],
                bad_words: vec![vec![(next() % vocab) as u32]],
                min_tokens: [0, 20][(case / 17) % 2],
                logprobs: [None, Some(3)][(case / 6) % 2],
                ..Default::default()
            };
            let c = ctx(&params, &prompt, &output);
            let (mut host_rng, mut device_rng) = (Rng::seeded(case as u64), Rng::seeded(case as u64));
            let host = sample(&mut logits.clone(), &c, &mut host_rng);
            let row = row_sampling(&c, &mut device_rng);
            let device = crate::backend::sampling::sample_row(&logits, &row);
            assert_eq!((device.token, device.logprobs), host, "case {case}: {params:?}");
            assert_eq!(host_rng.next_u64(), device_rng.next_u64(), "the same numbers drawn");
        }
    }

    #[test]
    fn argmax_prefers_the_first_of_equal_maxima_and_skips_nan() {
        assert_eq!(argmax(&[0.5, 2.0, f32::NAN, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -3.0]), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_draws_and_other_seeds_differ() {
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut rng = Rng::seeded(seed);
            (0..40)
                .map(|_| sample(&mut logits.clone(), &ctx(&params, &[], &[]), &mut rng).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_and_min_p_prunes() {
        let logits = vec![0.0, 3.0, 2.9, -1.0];
        let mut rng = Rng::seeded(1);
        for params in [
            SamplingParams {
                top_k: Some(1),
                ..Default::default()
            },
            SamplingParams {
                top_p: 1e-6,
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.99,
                ..Default::default()
            },
        ] {
            for _ in 0..20 {
                assert_eq!(
                    sample(&mut logits.clone(), &ctx(&params, &[], &[]), &mut rng).0,
                    1,
                    "{params:?}"
                );
            }
        }
    }

    #[test]
    fn bad_words_and_allowed_tokens_mask_as_vllm_does() {
        let logits = vec![1.0, 5.0, 4.0, 3.0, 2.0];
        let pick = |params: &SamplingParams, output: &[u32]| {
            sample(&mut logits.clone(), &ctx(params, &[], output), &mut Rng::seeded(0)).0
        };
        let bad = SamplingParams {
            bad_words: vec![vec![1], vec![4, 2]],
            ..SamplingParams::greedy()
        };
        // A one-token word is always banned; a longer one only after its beginning.
        assert_eq!(pick(&bad, &[]), 2);
        assert_eq!(pick(&bad, &[3, 4]), 3);
        assert!(reads_history(&bad), "a ban that depends on the output reads it");
        let allowed = SamplingParams {
            allowed_token_ids: Some(vec![0, 4]),
            ..SamplingParams::greedy()
        };
        assert_eq!(pick(&allowed, &[]), 4);
        let (entry, rank) = token_logprobs(&logits, 2, 2);
        assert_eq!(rank, 2);
        assert_eq!(entry.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((entry.logprob - entry.top[1].1).abs() < 1e-6);
    }

    #[test]
    fn processors_follow_their_definitions() {
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(3, -1.0)],
            no_repeat_ngram_size: 2,
            min_tokens: 3,
            ..Default::default()
        };
        let mut logits = vec![5.0, 4.0, -2.0, 1.0, 1.0];
        // Seen: prompt [2, 4, 1] + output [2]. The last token is 2 and the bigram (2, 4)
        // occurred, so 4 is banned.
        let c = ctx(&params, &[2, 4, 1], &[2]);
        apply_processors(&mut logits, &c, &edits(&c));
        assert_eq!(logits[0], f32::NEG_INFINITY, "EOS banned before min_tokens");
        assert_eq!(logits[1], 2.0, "positive logit divided by the repetition penalty");
        assert_eq!(
            logits[2],
            -4.0 - 0.25 - 0.5,
            "negative logit multiplied, then presence + frequency"
        );
        assert_eq!(logits[3], 0.0, "logit bias");
        assert_eq!(logits[4], f32::NEG_INFINITY, "would repeat the bigram (2, 4)");
    }

    #[test]
    fn an_infinite_logit_is_always_chosen() {
        let params = SamplingParams::default();
        for seed in 0..10 {
            let mut logits = [0.0, f32::INFINITY, 1.0];
            assert_eq!(
                sample(&mut logits, &ctx(&params, &[], &[]), &mut Rng::seeded(seed)).0,
                1
            );
        }
    }

    #[test]
    fn logprobs_come_from_the_raw_distribution() {
        let params = SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            logit_bias: vec![(0, 100.0)],
            ..Default::default()
        };
        let (token, lp) = sample(&mut [0.0, 1.0, 2.0], &ctx(&params, &[], &[]), &mut Rng::seeded(0));
        let lp = lp.unwrap();
        assert_eq!(token, 0);
        let norm = (1.0f64 + 1f64.exp() + 2f64.exp()).ln() as f32;
        assert!((lp.logprob - (0.0 - norm)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_found_with_their_role() {
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.token_out_of_range(100)
        };
        assert_eq!(with(|_| {}), None);
        assert_eq!(with(|p| p.logit_bias = vec![(99, 1.0)]), None);
        assert_eq!(
            with(|p| p.logit_bias = vec![(5, 1.0), (100, 1.0)]),
            Some((TokenRole::Biased, 100))
        );
        assert_eq!(
            with(|p| p.stop_token_ids = vec![3, 1000]),
            Some((TokenRole::Stop, 1000))
        );
        assert_eq!(
            with(|p| p.forced_prefixes = vec![vec![1], vec![2, 100]]),
            Some((TokenRole::Forced, 100))
        );
    }

    #[test]
    fn forced_prefixes_mask_everything_else_until_one_is_complete() {
        let params = SamplingParams {
            temperature: 0.7,
            forced_prefixes: vec![vec![5, 6, 7], vec![5, 8]],
            // The mask wins over a ban from another processor.
            logit_bias: vec![(6, -100.0)],
            ..Default::default()
        };
        let logits = [9.0f32, 1.0, 2.0, 3.0, 4.0, 0.5, 0.1, 0.2, 0.3, 8.0];
        for seed in 0..20 {
            let mut rng = Rng::seeded(seed);
            assert_eq!(sample(&mut logits.clone(), &ctx(&params, &[], &[]), &mut rng).0, 5);
            let second = sample(&mut logits.clone(), &ctx(&params, &[], &[5]), &mut rng).0;
            assert!(second == 6 || second == 8, "{second}");
            assert_eq!(sample(&mut logits.clone(), &ctx(&params, &[], &[5, 6]), &mut rng).0, 7);
        }
        // Once one prefix is complete, sampling is free again.
        let greedy = SamplingParams {
            forced_prefixes: vec![vec![5, 6, 7], vec![5, 8]],
            ..SamplingParams::greedy()
        };
        assert_eq!(
            sample(&mut logits.clone(), &ctx(&greedy, &[], &[5, 8]), &mut Rng::seeded(0)).0,
            0
        );
        assert_eq!(
            sample(&mut logits.clone(), &ctx(&greedy, &[], &[5, 6, 7]), &mut Rng::seeded(0)).0,
            0
        );
        assert_eq!(
            sample(&mut logits.clone(), &ctx(&greedy, &[], &[5]), &mut Rng::seeded(0)).0,
            8
        );
    }
}
