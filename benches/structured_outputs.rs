//! What structured outputs cost (docs/perf.md): the time to compile typical JSON
//! schemas, and the CPU engine's output tokens/s at C concurrent requests with and
//! without a JSON-schema constraint, same prompts, same lengths (EOS ignored, greedy; the
//! schema asks for more array items than fit, so every constrained request writes its
//! full O tokens too). One JSON line per measurement.
//!
//!   cargo bench --bench structured_outputs -- [MODEL] [CONCURRENCY,...] [OUTPUT_TOKENS]
//!
//! Defaults: SmolLM2-135M-Instruct, 16,64, 128 output tokens.

mod offline;

use std::sync::Arc;
use std::time::Instant;

use inferd::backend::cpu::CpuBackend;
use inferd::engine::{Constraint, ConstraintStart, SamplingParams};
use inferd::loader::resolve_model;
use inferd::models::load_decoder;
use inferd::text::{GrammarCompiler, GrammarSpec, JsonStyle, Tokenizer};
use serde_json::json;

fn main() {
    let (args, model_id) = offline::args();
    let model_id = model_id.as_str();
    let concurrency = offline::counts(&args, 1, "16,64", "CONCURRENCY");
    let output_tokens = offline::count(&args, 2, 128, "OUTPUT_TOKENS");
    let dir = resolve_model(model_id).expect("model (run scripts/fetch-test-models)");
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir.path).expect("tokenizer"));
    let mut model = Some(load_decoder(&CpuBackend::default(), &dir.path, &mut |_, _| {}).expect("load"));
    let vocab = model.as_ref().unwrap().config.vocab_size;
    let eos: Vec<u32> = tokenizer
        .special_tokens
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect();

    // Compilation: the first request builds the token trie; then each new schema compiles
    // (a cache miss); a schema seen before is a cache hit.
    let compiler = GrammarCompiler::new(tokenizer.clone(), vocab, eos.clone());
    let style = JsonStyle::default();
    let t = Instant::now();
    compiler.compile(&GrammarSpec::JsonObject, &style).expect("json_object");
    let first = t.elapsed().as_secs_f64();
    let schemas: Vec<GrammarSpec> = (0..20).map(|i| GrammarSpec::JsonSchema(typical_schema(i))).collect();
    let mut times: Vec<f64> = schemas
        .iter()
        .map(|s| {
            let t = Instant::now();
            compiler.compile(s, &style).expect("schema");
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let t = Instant::now();
    for s in &schemas {
        compiler.compile(s, &style).expect("cached");
    }
    let hit = t.elapsed().as_secs_f64() / schemas.len() as f64;
    println!(
        "{}",
        json!({"bench": "compile", "model": model_id, "first_request_ms": first * 1e3,
               "schema_median_ms": times[times.len() / 2] * 1e3, "schema_max_ms": times[times.len() - 1] * 1e3,
               "cache_hit_us": hit * 1e6})
    );

    // Throughput.
    let endless = GrammarSpec::JsonSchema(json!({
        "type": "array",
        "minItems": 1000,
        "items": {"type": "object",
                  "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999}, "name": {"type": "string", "maxLength": 16},
                                 "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
                  "required": ["id", "name", "tags"], "additionalProperties": false}
    }));
    let grammar = compiler.compile(&endless, &style).expect("endless schema");
    let max_c = *concurrency.iter().max().unwrap_or(&1);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let prompts: Vec<Vec<u32>> = (0..max_c)
        .map(|_| {
            (0..64)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 30_000) as u32 + 1000
                })
                .collect()
        })
        .collect();
    for &c in &concurrency {
        for constrained in [false, true] {
            let mut engine = offline::engine_for(model.take().unwrap(), c, 64 + output_tokens, eos.clone());
            let params = SamplingParams {
                max_tokens: Some(output_tokens),
                ignore_eos: true,
                constraint: constrained.then(|| Constraint {
                    grammar: grammar.clone(),
                    start: ConstraintStart::Now,
                }),
                ..SamplingParams::greedy()
            };
            let (secs, outputs) = offline::run_queued(&mut engine, &prompts[..c], &params);
            let tokens: usize = outputs.iter().map(Vec::len).sum();
            assert_eq!(tokens, c * output_tokens, "every request writes its full length");
            let sample = &outputs[0];
            let text = tokenizer.decode(sample, false).unwrap_or_default();
            println!(
                "{}",
                json!({"bench": "throughput", "model": model_id, "concurrency": c, "constrained": constrained,
                       "output_tokens": tokens, "seconds": secs, "output_tok_per_s": tokens as f64 / secs,
                       "first_output": text.chars().take(60).collect::<String>()})
            );
            model = Some(engine.into_model());
        }
    }
}

/// A schema of the kind agents send: nested objects, arrays, enums, bounds, formats.
fn typical_schema(i: usize) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 1000 + i},
            "title": {"type": "string", "maxLength": 80},
            "status": {"enum": ["open", "closed", "pending", format!("s{i}")]},
            "created": {"type": "string", "format": "date-time"},
            "owner": {"type": "object", "properties": {
                "name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                "required": ["name", "email"], "additionalProperties": false},
            "items": {"type": "array", "minItems": 1, "maxItems": 10, "items": {"$ref": "#/$defs/item"}},
            "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}
        },
        "required": ["id", "title", "status", "owner", "items"],
        "additionalProperties": false,
        "$defs": {"item": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": false}}
    })
}
