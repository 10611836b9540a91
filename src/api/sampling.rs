//! The sampling fields of a request (`temperature` ... `stop_token_ids`, and the request's
//! own `generation_config`): read once, every range checked here (one rule per field,
//! each error naming the wire field), before any model is chosen or loaded. What is left
//! for the model is `resolve`: the request laid over its `generation_config.json`.

use serde_json::{Map, Value};

use super::fields::{check_fields, Fields};
use super::ApiError;
use crate::engine::SamplingParams;
use crate::models::GenerationConfig;

/// Most completions one request may ask for.
pub const MAX_N: usize = 128;
/// Most alternatives `logprobs` / `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling defaults of the served model (`generation_config.json`), applied where a
/// request says nothing, as vLLM and transformers serve do.
#[derive(Debug, Clone, Default)]
pub struct SamplingDefaults {
    pub generation_config: GenerationConfig,
    /// `--default-seed`
    pub seed: Option<u64>,
}

/// What a request asks of the sampler, every value already in range. The fields a
/// model's `generation_config.json` may also set are `None` where neither the request
/// nor its `generation_config` set them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// `Some(None)`: top-k disabled by the request.
    pub top_k: Option<Option<usize>>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_tokens: Option<usize>,
    pub seed: Option<u64>,
    /// Where neither the request nor the model sets a limit (completions: 16, OpenAI's).
    pub fallback_max_tokens: Option<usize>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub logit_bias: Vec<(u32, f32)>,
    pub n: usize,
    pub logprobs: Option<usize>,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub allowed_token_ids: Option<Vec<u32>>,
    pub prompt_logprobs: Option<usize>,
    pub priority: i64,
    /// `cache_salt`, hashed.
    pub cache_salt: Option<u64>,
}

impl Default for SamplingRequest {
    fn default() -> Self {
        SamplingRequest {
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            max_tokens: None,
            seed: None,
            fallback_max_tokens: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            no_repeat_ngram_size: 0,
            logit_bias: Vec::new(),
            n: 1,
            logprobs: None,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            allowed_token_ids: None,
            prompt_logprobs: None,
            priority: 0,
            cache_salt: None,
        }
    }
}

/// The range rules, one per field: `Err` is what is wrong, for the message.
mod rule {
    pub fn temperature(t: f32) -> Result<(), String> {
        ok(t >= 0.0 && t.is_finite(), "must be a finite number >= 0")
    }
    pub fn top_p(p: f32) -> Result<(), String> {
        ok(p > 0.0 && p <= 1.0, "must be in (0, 1]")
    }
    pub fn min_p(p: f32) -> Result<(), String> {
        ok((0.0..=1.0).contains(&p), "must be in [0, 1]")
    }
    pub fn repetition_penalty(r: f32) -> Result<(), String> {
        ok(r > 0.0 && r.is_finite(), "must be a finite number > 0")
    }
    /// `presence_penalty` and `frequency_penalty`.
    pub fn penalty(v: f32) -> Result<(), String> {
        ok((-2.0..=2.0).contains(&v), "must be in [-2, 2]")
    }
    pub fn bias(v: f32) -> Result<(), String> {
        ok((-100.0..=100.0).contains(&v), "values must be in [-100, 100]")
    }
    pub fn n(n: i64) -> Result<(), String> {
        ok(
            (1..=super::MAX_N as i64).contains(&n),
            &format!("must be in [1, {}]", super::MAX_N),
        )
    }
    pub fn top_logprobs(k: i64) -> Result<(), String> {
        let max = super::MAX_TOP_LOGPROBS;
        ok((0..=max as i64).contains(&k), &format!("must be in [0, {max}]"))
    }
    pub fn max_tokens(m: i64) -> Result<(), String> {
        ok(m >= 1, "must be at least 1")
    }

    fn ok(ok: bool, problem: &str) -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err(problem.to_owned())
        }
    }
}

/// `value` if `rule` allows it, else a 400 naming `param`.
fn checked<T: Copy + std::fmt::Display>(
    param: &str,
    value: T,
    rule: impl Fn(T) -> Result<(), String>,
) -> Result<T, ApiError> {
    rule(value)
        .map(|()| value)
        .map_err(|problem| ApiError::invalid(param, format!("`{param}` {problem} (got {value})")))
}

/// The fields of a `generation_config` (a request's, or a model's file) that the request
/// layer takes, each in range.
fn apply_generation_config(
    into: &mut SamplingRequest,
    config: &GenerationConfig,
    mut check: impl FnMut(&str, Result<(), String>) -> Result<bool, ApiError>,
) -> Result<(), ApiError> {
    if let Some(t) = config.temperature {
        if check("temperature", rule::temperature(t))? {
            into.temperature = Some(t);
        }
    }
    if config.do_sample == Some(false) {
        into.temperature = Some(0.0);
    }
    if let Some(p) = config.top_p {
        if check("top_p", rule::top_p(p))? {
            into.top_p = Some(p);
        }
    }
    if let Some(k) = config.top_k {
        into.top_k = Some((k > 0).then_some(k as usize));
    }
    if let Some(p) = config.min_p {
        if check("min_p", rule::min_p(p))? {
            into.min_p = Some(p);
        }
    }
    if let Some(r) = config.repetition_penalty {
        if check("repetition_penalty", rule::repetition_penalty(r))? {
            into.repetition_penalty = Some(r);
        }
    }
    if let Some(m) = config.max_new_tokens {
        if check("max_new_tokens", rule::max_tokens(m as i64))? {
            into.max_tokens = Some(m as usize);
        }
    }
    Ok(())
}

/// Reads the sampling fields of a request body. `max_tokens_keys` are the names the
/// route takes for the length limit (chat also takes `max_completion_tokens`).
pub(crate) fn sampling_request(f: &Fields<'_>, max_tokens_keys: &[&str]) -> Result<SamplingRequest, ApiError> {
    let mut s = SamplingRequest::default();
    // 1. the request's `generation_config` (object or JSON string)
    if let Some(value) = f.map.get("generation_config").filter(|v| !v.is_null()) {
        let parsed;
        let object = match value {
            Value::String(text) => {
                parsed = serde_json::from_str::<Value>(text).map_err(|e| {
                    ApiError::invalid(
                        "generation_config",
                        format!("`generation_config` is not valid JSON: {e}"),
                    )
                })?;
                &parsed
            }
            v => v,
        };
        let map = object
            .as_object()
            .ok_or_else(|| ApiError::invalid("generation_config", "`generation_config` must be a JSON object"))?;
        let nested = |message: String| ApiError::invalid("generation_config", format!("generation_config: {message}"));
        check_fields(
            map,
            &[
                "max_new_tokens",
                "do_sample",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "no_repeat_ngram_size",
                "seed",
            ],
        )
        .map_err(|e| nested(e.message))?;
        let config: GenerationConfig = serde_json::from_value(object.clone()).map_err(|e| nested(e.to_string()))?;
        apply_generation_config(&mut s, &config, |key, verdict| {
            verdict
                .map(|()| true)
                .map_err(|problem| nested(format!("`{key}` {problem}")))
        })?;
        let g = Fields { map };
        if let Some(n) = g.get::<usize>("no_repeat_ngram_size")? {
            s.no_repeat_ngram_size = n;
        }
        if let Some(seed) = g.get::<i64>("seed")? {
            s.seed = Some(seed as u64);
        }
    }
    // 2. the request's own fields
    if let Some(t) = f.get::<f32>("temperature")? {
        s.temperature = Some(checked("temperature", t, rule::temperature)?);
    }
    if let Some(p) = f.get::<f32>("top_p")? {
        s.top_p = Some(checked("top_p", p, rule::top_p)?);
    }
    if let Some(k) = f.get::<i64>("top_k")? {
        // vLLM's convention: 0 or -1 disables; other negatives are mistakes.
        if k < -1 {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be at least 1, or 0 or -1 to disable it, not {k}"),
            ));
        }
        s.top_k = Some((k > 0).then_some(k as usize));
    }
    if let Some(p) = f.get::<f32>("min_p")? {
        s.min_p = Some(checked("min_p", p, rule::min_p)?);
    }
    for key in max_tokens_keys {
        if let Some(m) = f.get::<i64>(key)? {
            s.max_tokens = Some(checked(key, m, rule::max_tokens)? as usize);
        }
    }
    if let Some(seed) = f.get::<i64>("seed")? {
        s.seed = Some(seed as u64);
    }
    if let Some(n) = f.get::<i64>("n")? {
        s.n = checked("n", n, rule::n)? as usize;
    }
    for (key, slot) in [
        ("presence_penalty", &mut s.presence_penalty),
        ("frequency_penalty", &mut s.frequency_penalty),
    ] {
        if let Some(v) = f.get::<f32>(key)? {
            *slot = checked(key, v, rule::penalty)?;
        }
    }
    if let Some(r) = f.get::<f32>("repetition_penalty")? {
        s.repetition_penalty = Some(checked("repetition_penalty", r, rule::repetition_penalty)?);
    }
    if let Some(n) = f.get::<usize>("no_repeat_ngram_size")? {
        s.no_repeat_ngram_size = n;
    }
    if let Some(bias) = f.get::<Map<String, Value>>("logit_bias")? {
        let mut seen = std::collections::HashSet::with_capacity(bias.len());
        for (token, value) in bias {
            let id: u32 = token.parse().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`logit_bias` key `{token}` is not a token id"))
            })?;
            let v = value.as_f64().ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` value for `{token}` is not a number"),
                )
            })?;
            rule::bias(v as f32).map_err(|problem| {
                ApiError::invalid("logit_bias", format!("`logit_bias` {problem} (got {v} for `{token}`)"))
            })?;
            if !seen.insert(id) {
                // `"5"` and `"05"`: one token, two keys.
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` names token {id} twice (`{token}`)"),
                ));
            }
            s.logit_bias.push((id, v as f32));
        }
    }
    if let Some(b) = f.get::<bool>("ignore_eos")? {
        s.ignore_eos = b;
    }
    if let Some(m) = f.get::<usize>("min_tokens")? {
        s.min_tokens = m;
    }
    if let Some(max) = s.max_tokens.filter(|&max| s.min_tokens > max) {
        return Err(ApiError::invalid(
            "min_tokens",
            format!(
                "`min_tokens` must not exceed `max_tokens` ({max}) (got {})",
                s.min_tokens
            ),
        ));
    }
    if let Some(ids) = f.get::<Vec<u32>>("stop_token_ids")? {
        s.stop_token_ids = ids;
    }
    if let Some(ids) = f.get::<Vec<u32>>("allowed_token_ids")? {
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "allowed_token_ids",
                "`allowed_token_ids` must not be empty",
            ));
        }
        s.allowed_token_ids = Some(ids);
    }
    if let Some(p) = f.get::<i64>("priority")? {
        s.priority = p;
    }
    if let Some(salt) = f.get::<String>("cache_salt")? {
        if salt.is_empty() {
            return Err(ApiError::invalid("cache_salt", "`cache_salt` must not be empty"));
        }
        // SipHash with fixed keys: the same salt hashes the same on every run.
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        s.cache_salt = Some(h.finish());
    }
    Ok(s)
}

impl SamplingRequest {
    /// Sets how many alternatives to report with each token (`key` is the field that
    /// asked, for the error).
    pub(crate) fn set_logprobs(&mut self, key: &str, k: i64) -> Result<(), ApiError> {
        self.logprobs = Some(checked(key, k, rule::top_logprobs)? as usize);
        Ok(())
    }

    /// Asks for the prompt tokens' log-probabilities with `k` alternatives each.
    pub(crate) fn set_prompt_logprobs(&mut self, key: &str, k: i64) -> Result<(), ApiError> {
        self.prompt_logprobs = Some(checked(key, k, rule::top_logprobs)? as usize);
        Ok(())
    }

    /// The engine's parameters: the request over the model's `generation_config.json`
    /// and `--default-seed`. A default out of its range (a broken file) is left out,
    /// the same rules deciding. Refused only when the default length limit (the model's
    /// `max_new_tokens`, or the route's fallback) is below the request's `min_tokens`.
    pub fn resolve(&self, defaults: &SamplingDefaults) -> Result<SamplingParams, ApiError> {
        let mut merged = SamplingRequest::default();
        apply_generation_config(&mut merged, &defaults.generation_config, |_, verdict| {
            Ok(verdict.is_ok())
        })?;
        let or = |request: Option<f32>, model: Option<f32>, engine: f32| request.or(model).unwrap_or(engine);
        let engine = SamplingParams::default();
        let max_tokens = self.max_tokens.or(merged.max_tokens).or(self.fallback_max_tokens);
        if let Some(max) = max_tokens.filter(|&max| self.min_tokens > max) {
            return Err(ApiError::invalid(
                "min_tokens",
                format!(
                    "`min_tokens` must not exceed the default `max_tokens` ({max}) (got {}): give `max_tokens`",
                    self.min_tokens
                ),
            ));
        }
        Ok(SamplingParams {
            temperature: or(self.temperature, merged.temperature, engine.temperature),
            top_p: or(self.top_p, merged.top_p, engine.top_p),
            top_k: self.top_k.or(merged.top_k).unwrap_or(engine.top_k),
            min_p: or(self.min_p, merged.min_p, engine.min_p),
            repetition_penalty: or(
                self.repetition_penalty,
                merged.repetition_penalty,
                engine.repetition_penalty,
            ),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed.or(defaults.seed),
            n: self.n,
            logprobs: self.logprobs,
            max_tokens,
            min_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            allowed_token_ids: self.allowed_token_ids.clone(),
            prompt_logprobs: self.prompt_logprobs,
            priority: self.priority,
            cache_salt: self.cache_salt,
            ..engine
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::{parse_chat_request, parse_completion_request};

    fn chat(fields: Value) -> Result<SamplingRequest, ApiError> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        parse_chat_request(&body).map(|r| r.generation.sampling)
    }

    #[test]
    fn every_range_is_checked_at_parse_naming_the_wire_field() {
        let bad = [
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"temperature": -1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": -5}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_completion_tokens": -4}), "max_completion_tokens"),
            (json!({"n": 0}), "n"),
            (json!({"n": MAX_N + 1}), "n"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"min_tokens": 5, "max_tokens": 2}), "min_tokens"),
            (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
            (json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs"),
            (json!({"generation_config": {"temperature": -1}}), "generation_config"),
            (json!({"generation_config": {"max_new_tokens": 0}}), "generation_config"),
            (json!({"generation_config": {"top_p": 2}}), "generation_config"),
        ];
        for (fields, param) in bad {
            let error = chat(fields.clone()).expect_err(&fields.to_string());
            assert_eq!(error.param.as_deref(), Some(param), "{fields}: {}", error.message);
            assert_eq!(error.status, hyper::StatusCode::BAD_REQUEST);
        }
        let completion = parse_completion_request(&json!({"prompt": "x", "logprobs": 21}));
        assert_eq!(completion.unwrap_err().param.as_deref(), Some("logprobs"));
        // The edges of each range are in it.
        let fine = json!({"temperature": 0, "top_p": 1, "top_k": -1, "min_p": 1, "presence_penalty": -2,
            "frequency_penalty": 2, "n": MAX_N, "logit_bias": {"5": -100}, "min_tokens": 2, "max_tokens": 2,
            "logprobs": true, "top_logprobs": MAX_TOP_LOGPROBS});
        chat(fine).unwrap();
    }

    #[test]
    fn the_request_wins_over_its_generation_config_over_the_model_over_the_engine() {
        let model = GenerationConfig {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            repetition_penalty: Some(1.1),
            max_new_tokens: Some(64),
            ..Default::default()
        };
        let defaults = SamplingDefaults {
            generation_config: model.clone(),
            seed: Some(7),
        };
        let request = chat(json!({"temperature": 0.2, "top_k": 0, "generation_config": {"top_p": 0.5}})).unwrap();
        let params = request.resolve(&defaults).unwrap();
        assert_eq!(params.temperature, 0.2);
        assert_eq!(params.top_p, 0.5);
        assert_eq!(params.top_k, None, "top_k 0 disables the model's 20");
        assert_eq!(params.repetition_penalty, 1.1);
        assert_eq!(params.max_tokens, Some(64));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.min_p, SamplingParams::default().min_p);
        // A broken default is left out; a request's min_tokens over the model's limit is refused.
        let broken = SamplingDefaults {
            generation_config: GenerationConfig {
                top_p: Some(0.0),
                ..model
            },
            seed: None,
        };
        assert_eq!(chat(json!({})).unwrap().resolve(&broken).unwrap().top_p, 1.0);
        let error = chat(json!({"min_tokens": 100})).unwrap().resolve(&broken).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("min_tokens"));
        // Completions stop at 16 tokens when nothing else sets a limit.
        let completion = parse_completion_request(&json!({"prompt": "x"})).unwrap();
        let none = SamplingDefaults::default();
        assert_eq!(
            completion.generation.sampling.resolve(&none).unwrap().max_tokens,
            Some(16)
        );
        assert_eq!(
            completion.generation.sampling.resolve(&broken).unwrap().max_tokens,
            Some(64)
        );
    }
}
