//! Structured outputs: a constraint (JSON schema, any JSON object, regex, a list of
//! choices, a Lark or GBNF grammar) compiled by llguidance against the model's own
//! tokenizer, and the per-sequence matcher that says which tokens may come next.
//! Compiled grammars are cached by content; every input is bounded before it compiles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};

use super::gbnf;
use super::tool_calls::{call_grammar, CallSchema};
use super::Tokenizer;

/// Longest schema, regex or grammar source accepted (bytes).
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// Most alternatives of a `choice` list.
pub const MAX_CHOICES: usize = 1024;
/// Most repetitions a regex may count (`{m,n}` bounds multiply when nested): llguidance
/// builds counted repetitions out as it lexes, and a larger count exhausts its lexer
/// mid-generation instead of failing at compile time.
pub const MAX_REGEX_REPEAT: u64 = 100_000;
/// Largest `multipleOf` step, in units of its last decimal place (7 for 7, 25 for 0.25):
/// llguidance checks it with an automaton of about that many states, which takes ~5 µs
/// a state to build (35 ms at 10,000), and a step of ~10^9 runs a server out of memory.
pub const MAX_MULTIPLE_OF_STEP: u128 = 10_000;
/// Most decimal places of a `multipleOf` step (`0.00000001` has 8): llguidance's regex
/// engine scales by 10^places in 32 bits.
pub const MAX_MULTIPLE_OF_DECIMALS: u32 = 8;
/// Most grammars kept compiled per model.
const CACHE_ENTRIES: usize = 256;

/// The limits a grammar compiles and runs under (llguidance's names, which its errors
/// quote). The defaults bound compilation to tens of milliseconds and a mask to about
/// as long; the grammar size is a few hundred kilobytes of schema.
fn limits() -> ParserLimits {
    ParserLimits {
        max_grammar_size: 200_000,
        // Errors name the problem, not the parser's state dump.
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (`response_format` `json_schema`, vLLM's `structured_outputs.json`).
    JsonSchema(Value),
    /// Any JSON object (`json_object`).
    JsonObject,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar: GBNF when it defines a rule with `::=`, else Lark.
    Grammar(String),
    /// Calls of tools in the Qwen / Hermes format, strict ones' arguments following
    /// their schemas (see `tool_calls::call_grammar`).
    ToolCalls {
        functions: Vec<CallSchema>,
        opened: bool,
        several: bool,
    },
}

/// How JSON is laid out: compact (`{"a": 1, "b": [2, 3]}`) unless a request asks for any
/// whitespace (vLLM's `disable_any_whitespace: false`). Small models given free
/// whitespace can emit newlines until `max_tokens`, so compact is the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct JsonStyle {
    pub any_whitespace: bool,
    /// A regex for the whitespace allowed between JSON tokens (vLLM's
    /// `whitespace_pattern`); implies `any_whitespace`.
    pub whitespace_pattern: Option<String>,
}

impl JsonStyle {
    fn options(&self) -> JsonCompileOptions {
        let flexible = self.any_whitespace || self.whitespace_pattern.is_some();
        // Flexible whitespace takes the bare separators (whitespace may go around them).
        let (item, key) = if flexible { (",", ":") } else { (", ", ": ") };
        JsonCompileOptions {
            item_separator: item.into(),
            key_separator: key.into(),
            whitespace_flexible: flexible,
            whitespace_pattern: self.whitespace_pattern.clone(),
            ..JsonCompileOptions::default()
        }
    }

    /// `schema` with the layout stamped in (as llguidance's `x-guidance` key), unless the
    /// schema sets its own.
    fn stamp(&self, mut schema: Value) -> Value {
        if let Some(object) = schema.as_object_mut() {
            if !object.contains_key("x-guidance") {
                object.insert(
                    "x-guidance".into(),
                    serde_json::to_value(self.options()).unwrap_or(Value::Null),
                );
            }
        }
        schema
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The constraint is malformed or unsupported: what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Larger than a limit this server sets: which.
    #[error("{0}")]
    TooLarge(String),
    /// The model's tokenizer cannot back a grammar (not byte-level BPE or byte fallback).
    #[error("structured outputs are not available for this model: {0}")]
    Unavailable(String),
}

impl GrammarSpec {
    /// The checks that need no tokenizer (shapes, sizes, regex syntax and repetition
    /// bounds, GBNF syntax): what the API runs before a model is chosen or loaded.
    pub fn check(&self, style: &JsonStyle) -> Result<(), GrammarError> {
        self.to_grammar(style).map(drop)
    }

    /// Checks sizes and shapes that need no compiling, and turns the spec into what
    /// llguidance compiles.
    fn to_grammar(&self, style: &JsonStyle) -> Result<TopLevelGrammar, GrammarError> {
        let too_long = |what: &str, len: usize| {
            (len > MAX_SOURCE_BYTES).then(|| {
                GrammarError::TooLarge(format!(
                    "the {what} is {len} bytes; at most {MAX_SOURCE_BYTES} are allowed"
                ))
            })
        };
        if let Some(pattern) = &style.whitespace_pattern {
            if let Some(e) = too_long("whitespace pattern", pattern.len()) {
                return Err(e);
            }
        }
        Ok(match self {
            GrammarSpec::JsonSchema(schema) => {
                if !schema.is_object() {
                    return Err(GrammarError::Invalid("the JSON schema must be an object".into()));
                }
                let len = serde_json::to_string(schema).map(|s| s.len()).unwrap_or(0);
                if let Some(e) = too_long("JSON schema", len) {
                    return Err(e);
                }
                check_schema(schema)?;
                TopLevelGrammar::from_json_schema(style.stamp(schema.clone()))
            }
            GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(style.stamp(json!({"type": "object"}))),
            GrammarSpec::Regex(rx) => {
                if let Some(e) = too_long("regex", rx.len()) {
                    return Err(e);
                }
                // llguidance's own parser checks it as it compiles; regex-syntax names
                // the error more clearly, so it goes first.
                regex_check(rx)?;
                TopLevelGrammar::from_regex(rx)
            }
            GrammarSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError::Invalid("the list of choices is empty".into()));
                }
                if choices.len() > MAX_CHOICES {
                    return Err(GrammarError::TooLarge(format!(
                        "{} choices; at most {MAX_CHOICES} are allowed",
                        choices.len()
                    )));
                }
                let total: usize = choices.iter().map(String::len).sum();
                if let Some(e) = too_long("list of choices", total) {
                    return Err(e);
                }
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}\n", alternatives.join(" | ")))
            }
            GrammarSpec::Grammar(source) => {
                if let Some(e) = too_long("grammar", source.len()) {
                    return Err(e);
                }
                if source.trim().is_empty() {
                    return Err(GrammarError::Invalid("the grammar is empty".into()));
                }
                let lark = if gbnf::looks_like_gbnf(source) {
                    gbnf::gbnf_to_lark(source).map_err(|e| GrammarError::Invalid(format!("GBNF grammar: {e}")))?
                } else {
                    source.clone()
                };
                // Its regex terminals get the repetition bound (their syntax errors are
                // llguidance's to report, in its words).
                for rx in lark_regexes(&lark) {
                    if let Err(e @ GrammarError::TooLarge(_)) = regex_check(rx) {
                        return Err(e);
                    }
                }
                // And the JSON schemas it embeds, their bounds.
                for schema in lark_json_schemas(&lark) {
                    check_schema(&schema)?;
                }
                TopLevelGrammar::from_lark(lark)
            }
            GrammarSpec::ToolCalls {
                functions,
                opened,
                several,
            } => {
                for f in functions {
                    let Some(schema) = &f.parameters else { continue };
                    if !schema.is_object() {
                        return Err(GrammarError::Invalid(format!(
                            "`{}`: the parameters must be a JSON schema object",
                            f.name
                        )));
                    }
                    let len = serde_json::to_string(schema).map(|s| s.len()).unwrap_or(0);
                    if let Some(e) = too_long(&format!("`{}` parameters schema", f.name), len) {
                        return Err(e);
                    }
                    check_schema(schema)?;
                }
                let layout = serde_json::to_value(JsonStyle::default().options()).unwrap_or(Value::Null);
                TopLevelGrammar::from_lark(call_grammar(functions, *opened, *several, &layout))
            }
        })
    }

    /// The cache key: the kind, its content and the JSON layout.
    fn key(&self, style: &JsonStyle) -> String {
        let (kind, content) = match self {
            GrammarSpec::JsonSchema(v) => ("json", v.to_string()),
            GrammarSpec::JsonObject => ("json_object", String::new()),
            GrammarSpec::Regex(s) => ("regex", s.clone()),
            GrammarSpec::Choice(c) => ("choice", Value::from(c.clone()).to_string()),
            GrammarSpec::Grammar(s) => ("grammar", s.clone()),
            GrammarSpec::ToolCalls {
                functions,
                opened,
                several,
            } => {
                let functions: Vec<Value> = functions.iter().map(|f| json!([f.name, f.parameters])).collect();
                ("tool_calls", json!([functions, opened, several]).to_string())
            }
        };
        format!(
            "{kind}\u{0}{}\u{0}{}\u{0}{content}",
            style.any_whitespace,
            style.whitespace_pattern.as_deref().unwrap_or("")
        )
    }
}

fn regex_check(rx: &str) -> Result<(), GrammarError> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(rx)
        .map_err(|e| GrammarError::Invalid(format!("the regex does not parse: {}", one_line(&e.to_string()))))?;
    let count = repeat_count(&hir);
    if count > MAX_REGEX_REPEAT {
        return Err(GrammarError::TooLarge(format!(
            "the regex `{}` counts {count} repetitions (nested `{{m,n}}` bounds multiply); at most {MAX_REGEX_REPEAT} are allowed",
            abbreviate(rx)
        )));
    }
    Ok(())
}

/// The `/regex/` terminals of a Lark grammar (outside strings and comments).
fn lark_regexes(source: &str) -> Vec<&str> {
    let bytes = source.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' => {
                let start = i + 1;
                i = start;
                while i < bytes.len() && bytes[i] != b'/' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(rx) = source.get(start..i.min(bytes.len())) {
                    out.push(rx);
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// The largest product of nested counted-repetition bounds in a regex.
fn repeat_count(hir: &regex_syntax::hir::Hir) -> u64 {
    use regex_syntax::hir::HirKind;
    match hir.kind() {
        HirKind::Repetition(r) => {
            let bound = u64::from(r.max.unwrap_or(r.min).max(1));
            bound.saturating_mul(repeat_count(&r.sub))
        }
        HirKind::Capture(c) => repeat_count(&c.sub),
        HirKind::Concat(items) | HirKind::Alternation(items) => items.iter().map(repeat_count).max().unwrap_or(1),
        _ => 1,
    }
}

/// A long source cut for an error message.
fn abbreviate(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

/// What a JSON schema is checked for before it compiles: its `pattern`s are regexes (and
/// get the repetition bound), and its `multipleOf` steps are bounded, alone and where
/// they may merge.
fn check_schema(schema: &Value) -> Result<(), GrammarError> {
    let mut steps = Vec::new();
    check_schema_node(schema, &mut steps)?;
    steps.sort_unstable();
    steps.dedup();
    merged_steps(schema, &steps).map(drop)
}

/// The values under a schema object that are schemas or hold schemas: everything but the
/// keywords whose values are data (`const`, `enum`, `default`, `examples`), with the
/// maps of names to schemas (`properties`, `$defs`, ...) opened, so that a property
/// that happens to be named `default` is still looked into.
fn subschemas(map: &serde_json::Map<String, Value>) -> Vec<&Value> {
    let mut out = Vec::new();
    for (k, v) in map {
        match (k.as_str(), v) {
            ("const" | "enum" | "default" | "examples", _) => {}
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(named),
            ) => out.extend(named.values()),
            _ => out.push(v),
        }
    }
    out
}

/// Steps merge (to their least common multiple) where llguidance intersects schemas: at
/// a node with `allOf`, `anyOf`, `oneOf` or `$ref`, and where `patternProperties` meet
/// the `properties` they match, everything beneath may meet, and a `$ref` may bring in
/// any step of the document. The lcm of each such group is bounded like a single step.
/// Returns the steps under `schema` and whether a `$ref` is there.
fn merged_steps(schema: &Value, every: &[(u128, u32)]) -> Result<(Vec<(u128, u32)>, bool), GrammarError> {
    let mut steps = Vec::new();
    let mut has_ref = false;
    match schema {
        Value::Object(map) => {
            if let Some(step) = map.get("multipleOf").and_then(Value::as_f64).and_then(decimal_step) {
                steps.push(step);
            }
            has_ref = map.contains_key("$ref");
            for v in subschemas(map) {
                let (s, r) = merged_steps(v, every)?;
                steps.extend(s);
                has_ref |= r;
            }
            let merges = ["allOf", "anyOf", "oneOf", "$ref", "patternProperties"];
            if merges.iter().any(|k| map.contains_key(*k)) {
                let mut group = if has_ref { every.to_vec() } else { steps.clone() };
                group.sort_unstable();
                group.dedup();
                if group.len() > 1 {
                    let (coef, exp) = steps_lcm(&group);
                    step_bound(coef, exp).map_err(|bound| {
                        GrammarError::TooLarge(format!(
                            "multipleOf values that may apply together combine to a step of {} units of 10^-{exp}; {bound}",
                            if coef == u128::MAX { "too many".to_owned() } else { coef.to_string() }
                        ))
                    })?;
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                let (s, r) = merged_steps(v, every)?;
                steps.extend(s);
                has_ref |= r;
            }
        }
        _ => {}
    }
    Ok((steps, has_ref))
}

/// A step's limits: at most `MAX_MULTIPLE_OF_STEP` units, of at most
/// `MAX_MULTIPLE_OF_DECIMALS` decimal places (llguidance scales digits by 10^places in
/// 32 bits).
fn step_bound(coef: u128, exp: u32) -> Result<(), String> {
    if coef > MAX_MULTIPLE_OF_STEP {
        return Err(format!("at most {MAX_MULTIPLE_OF_STEP} units are allowed"));
    }
    if exp > MAX_MULTIPLE_OF_DECIMALS {
        return Err(format!("at most {MAX_MULTIPLE_OF_DECIMALS} decimal places are allowed"));
    }
    Ok(())
}

fn check_schema_node(schema: &Value, steps: &mut Vec<(u128, u32)>) -> Result<(), GrammarError> {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(rx)) = map.get("pattern") {
                regex_check(rx)?;
            }
            if let Some(step) = map.get("multipleOf").and_then(Value::as_f64) {
                // Zero (no constraint) and over-long steps are llguidance's to handle.
                if let Some((coef, exp)) = decimal_step(step) {
                    step_bound(coef, exp).map_err(|bound| {
                        GrammarError::TooLarge(format!(
                            "multipleOf {step} is a step of {coef} units of 10^-{exp}; {bound}"
                        ))
                    })?;
                    steps.push((coef, exp));
                }
            }
            subschemas(map)
                .into_iter()
                .try_for_each(|v| check_schema_node(v, steps))
        }
        Value::Array(items) => items.iter().try_for_each(|v| check_schema_node(v, steps)),
        _ => Ok(()),
    }
}

/// The JSON schemas a Lark grammar embeds (`%json { ... }`), which llguidance compiles
/// as it compiles the grammar.
fn lark_json_schemas(source: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("%json") {
        rest = &rest[at + "%json".len()..];
        let body = rest.trim_start();
        let mut stream = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        if let Some(Ok(schema)) = stream.next() {
            out.push(schema);
        }
    }
    out
}

/// A `multipleOf` as llguidance reads it (sign dropped): `coef` units of 10^-`exp`, in
/// lowest terms (the automaton that checks it has about `coef` states).
fn decimal_step(step: f64) -> Option<(u128, u32)> {
    let step = step.abs();
    if !step.is_finite() || step == 0.0 {
        return None;
    }
    let (mut value, mut exp) = (step, 0u32);
    while value.fract() != 0.0 {
        value *= 10.0;
        exp += 1;
    }
    if value > f64::from(u32::MAX) {
        return None;
    }
    Some(reduce(value as u128, exp))
}

/// Trailing zeros of the units folded into the exponent, as far as it goes.
fn reduce(mut coef: u128, mut exp: u32) -> (u128, u32) {
    while exp > 0 && coef != 0 && coef.is_multiple_of(10) {
        coef /= 10;
        exp -= 1;
    }
    (coef, exp)
}

/// The least common multiple of decimal steps, in lowest terms (`u128::MAX` units when
/// it overflows).
fn steps_lcm(steps: &[(u128, u32)]) -> (u128, u32) {
    fn gcd(a: u128, b: u128) -> u128 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let exp = steps.iter().map(|&(_, e)| e).max().unwrap_or(0);
    let mut lcm = 1u128;
    for &(coef, e) in steps {
        let Some(units) = 10u128.checked_pow(exp - e).and_then(|p| p.checked_mul(coef)) else {
            return (u128::MAX, exp);
        };
        match (lcm / gcd(lcm, units)).checked_mul(units) {
            Some(l) => lcm = l,
            None => return (u128::MAX, exp),
        }
    }
    reduce(lcm, exp)
}

/// llguidance and regex-syntax errors span lines (a caret under the source); an API
/// error message is one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A compiled constraint, shared by every request that sends the same one.
pub struct Grammar {
    /// Never advanced: each sequence matches against its own deep clone.
    pristine: Mutex<TokenParser>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").finish_non_exhaustive()
    }
}

impl Grammar {
    /// A matcher at the start of the output.
    pub fn matcher(&self) -> GrammarMatcher {
        let parser = self.pristine.lock().unwrap_or_else(|e| e.into_inner()).deep_clone();
        GrammarMatcher {
            inner: Matcher::new(Ok(parser)),
        }
    }
}

/// Which tokens may come next, one bit per token of the model's vocabulary.
#[derive(Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Allows `token` too.
    pub fn allow(&mut self, token: u32) {
        if (token as usize) < self.0.len() {
            self.0.allow_token(token);
        }
    }

    /// How many tokens it allows.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }

    /// Sets every logit the mask does not allow to -inf (logits past the mask's
    /// vocabulary too).
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One sequence's position in its grammar.
pub struct GrammarMatcher {
    inner: Matcher,
}

impl GrammarMatcher {
    /// The tokens allowed next: when the grammar is complete, the model's end tokens only.
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        let mask = self.inner.compute_mask_or_eos().map_err(|e| one_line(&e.to_string()))?;
        if mask.is_zero() {
            return Err("the grammar allows no token here".into());
        }
        Ok(TokenMask(mask))
    }

    /// Advances past a generated token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.inner.consume_token(token).map_err(|e| one_line(&e.to_string()))
    }

    /// The grammar is complete and only an end token may follow.
    pub fn is_finished(&self) -> bool {
        self.inner.is_stopped()
    }
}

/// The model's tokenizer as llguidance sees it: each token's bytes, in a trie.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
    /// The tokenizer's ids all fit the model's vocabulary, so its tokenization is the
    /// one to force text with (else llguidance tokenizes through the trie).
    canonical: bool,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's own tokens for `s` when they spell exactly its bytes; else the
    /// trie's greedy ones. (Normalizers change some text: NFC turns a compatibility
    /// ideograph into another character, and llguidance forces the bytes it asked for.)
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            let ids = self
                .tokenizer
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default();
            let vocab = self.trie.vocab_size();
            if !ids.iter().all(|&t| (t as usize) < vocab) {
                return self.trie.greedy_tokenize(text.as_bytes());
            }
            let spelled: Vec<u8> = ids.iter().flat_map(|&t| self.trie.token(t).to_vec()).collect();
            if spelled == text.as_bytes() {
                ids
            } else {
                self.trie.greedy_tokenize(text.as_bytes())
            }
        })
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// Compiles constraints for one model and keeps the compiled ones (most recently used
/// first out when full). Built on the first request that needs it (building the token
/// trie of a 150k vocabulary takes a moment, which a model that never sees a
/// constrained request should not pay at load).
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    end_ids: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, GrammarError>>,
    cache: Mutex<GrammarCache>,
}

#[derive(Default)]
struct GrammarCache {
    entries: HashMap<String, (Arc<Grammar>, u64)>,
    clock: u64,
}

impl GrammarCompiler {
    /// `vocab_size`: the model's logits width; `end_ids`: the tokens that end its output
    /// (a complete grammar allows only these).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, end_ids: Vec<u32>) -> Self {
        GrammarCompiler {
            tokenizer,
            vocab_size,
            end_ids,
            factory: OnceLock::new(),
            cache: Mutex::new(GrammarCache::default()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| {
                // llguidance's tokenizer.json reader asserts on shapes it does not expect:
                // a model whose tokenizer it cannot read just has no structured outputs.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build_factory()))
                    .unwrap_or_else(|_| Err(GrammarError::Unavailable("its tokenizer could not be read".into())))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build_factory(&self) -> Result<ParserFactory, GrammarError> {
        let unavailable = |e: &dyn std::fmt::Display| GrammarError::Unavailable(one_line(&e.to_string()));
        let inner = self.tokenizer.inner();
        let json: Value =
            serde_json::from_str(&inner.to_string(false).map_err(|e| unavailable(&e))?).map_err(|e| unavailable(&e))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| unavailable(&e))?;
        // The model's vocabulary: padding ids past the tokenizer's have no bytes (never
        // allowed); tokenizer ids past the model's can never be generated.
        let canonical = words.len() <= self.vocab_size;
        let vocab_size = self.vocab_size;
        words.resize(vocab_size, Vec::new());
        let end_ids: Vec<u32> = self
            .end_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let Some(&eos) = end_ids.first() else {
            return Err(GrammarError::Unavailable(
                "the model has no end-of-sequence token".into(),
            ));
        };
        let mut trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &words);
        if end_ids.len() > 1 {
            trie = trie.with_eos_tokens(&end_ids);
        }
        let env: TokEnv = Arc::new(TokenizerBytes {
            trie,
            tokenizer: inner.clone(),
            canonical,
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| unavailable(&e))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(factory)
    }

    /// The compiled grammar for `spec`, from the cache or compiled now (call it off the
    /// async reactor: compiling takes milliseconds).
    pub fn compile(&self, spec: &GrammarSpec, style: &JsonStyle) -> Result<Arc<Grammar>, GrammarError> {
        let key = spec.key(style);
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.clock += 1;
            let clock = cache.clock;
            if let Some((grammar, used)) = cache.entries.get_mut(&key) {
                *used = clock;
                return Ok(grammar.clone());
            }
        }
        let grammar = spec.to_grammar(style)?;
        let factory = self.factory()?;
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(grammar)))
            .map_err(|_| GrammarError::Invalid("the grammar could not be compiled".into()))?
            .map_err(|e| classify(&e.to_string()))?;
        let compiled = Arc::new(Grammar {
            pristine: Mutex::new(parser),
        });
        // A grammar whose start allows nothing is refused now, not mid-request.
        compiled.matcher().mask().map_err(GrammarError::Invalid)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.entries.len() >= CACHE_ENTRIES {
            if let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                cache.entries.remove(&oldest);
            }
        }
        let clock = cache.clock;
        cache.entries.insert(key, (compiled.clone(), clock));
        Ok(compiled)
    }

    /// Grammars compiled and kept.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).entries.len()
    }
}

/// llguidance's errors, sorted into "too large" (a limit was hit) and "invalid".
fn classify(message: &str) -> GrammarError {
    let message = one_line(message);
    if message.contains("too big") || message.contains("limit") || message.contains("fuel") {
        GrammarError::TooLarge(message)
    } else {
        GrammarError::Invalid(message)
    }
}
