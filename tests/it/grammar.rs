//! Structured-output grammars over the real Qwen2.5 tokenizer: what each kind of
//! constraint allows token by token, how compiled grammars are cached, and the errors
//! bad constraints get.

use std::sync::Arc;

use inferd::text::{GrammarCompiler, GrammarError, GrammarSpec, JsonStyle, Tokenizer};
use serde_json::json;

use crate::common::fixture;

/// Qwen2.5's vocabulary width (the model's logits) and its end tokens.
const VOCAB: usize = 151_936;
const IM_END: u32 = 151_645;
const ENDOFTEXT: u32 = 151_643;

/// The fixture tokenizer, loaded once for the whole file.
fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
    TOKENIZER
        .get_or_init(|| Arc::new(Tokenizer::from_dir(&fixture("models/qwen2.5-coder-0.5b")).unwrap()))
        .clone()
}

fn compiler() -> GrammarCompiler {
    GrammarCompiler::new(tokenizer(), VOCAB, vec![IM_END, ENDOFTEXT])
}

/// Walks `text`'s tokens through the grammar: each must be allowed when it comes, and
/// after the last the grammar must allow ending (`complete`) or not.
fn walk(compiler: &GrammarCompiler, spec: &GrammarSpec, style: &JsonStyle, text: &str) -> Result<bool, String> {
    let tok = tokenizer();
    let grammar = compiler.compile(spec, style).map_err(|e| e.to_string())?;
    let mut m = grammar.matcher();
    for id in tok.encode(text, false).unwrap() {
        let mask = m.mask()?;
        if !mask.allows(id) {
            return Err(format!("token {id} ({:?}) refused", tok.decode(&[id], false).unwrap()));
        }
        m.consume(id)?;
    }
    let mask = m.mask()?;
    Ok(mask.allows(IM_END) && mask.allows(ENDOFTEXT))
}

#[test]
fn json_schema_allows_exactly_the_documents_it_describes() {
    let c = compiler();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    let spec = GrammarSpec::JsonSchema(schema);
    let style = JsonStyle::default();
    assert_eq!(
        walk(&c, &spec, &style, r#"{"name": "Ada", "age": 36, "tags": ["a", "b"]}"#),
        Ok(true)
    );
    // A prefix is allowed but not complete.
    assert_eq!(walk(&c, &spec, &style, r#"{"name": "Ada", "age": 3"#), Ok(false));
    for bad in [
        r#"{"name": "ada""#,                                    // pattern
        r#"{"name": "Ada", "age": 151"#,                        // maximum
        r#"{"name": "Ada", "age": 36, "tags": ["c"#,            // enum
        r#"{"name": "Ada", "age": 36, "tags": ["a", "b", "a""#, // maxItems
        r#"{"name": "Ada", "extra""#,                           // additionalProperties
        r#"{ "name""#,                                          // compact layout
    ] {
        assert!(walk(&c, &spec, &style, bad).is_err(), "{bad} was allowed");
    }
    // Any whitespace when asked for.
    let loose = JsonStyle {
        any_whitespace: true,
        ..Default::default()
    };
    assert_eq!(
        walk(&c, &spec, &loose, "{\n  \"name\": \"Ada\",\"age\":1,\"tags\":[\"a\"]}"),
        Ok(true)
    );
}

#[test]
fn refs_any_of_and_formats_compile_and_hold() {
    let c = compiler();
    let schema = json!({
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"], "additionalProperties": false}},
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/point"},
            "when": {"type": "string", "format": "date"},
            "id": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        },
        "required": ["at", "when", "id"],
        "additionalProperties": false
    });
    let spec = GrammarSpec::JsonSchema(schema);
    let style = JsonStyle::default();
    assert_eq!(
        walk(
            &c,
            &spec,
            &style,
            r#"{"at": {"x": -1.5}, "when": "2024-02-29", "id": null}"#
        ),
        Ok(true)
    );
    assert!(walk(&c, &spec, &style, r#"{"at": {"x": -1.5}, "when": "2024-13"#).is_err());
    assert!(walk(&c, &spec, &style, r#"{"at": {"y""#).is_err());
}

#[test]
fn json_object_regex_choice_and_grammars() {
    let c = compiler();
    let style = JsonStyle::default();
    assert_eq!(
        walk(&c, &GrammarSpec::JsonObject, &style, r#"{"any": [1, {"thing": true}]}"#),
        Ok(true)
    );
    assert!(walk(&c, &GrammarSpec::JsonObject, &style, "[1]").is_err());

    let rx = GrammarSpec::Regex(r"\d{3}-[a-z]+".into());
    assert_eq!(walk(&c, &rx, &style, "123-abc"), Ok(true));
    assert_eq!(walk(&c, &rx, &style, "12"), Ok(false));
    assert!(walk(&c, &rx, &style, "12a").is_err());

    let choice = GrammarSpec::Choice(vec!["positive".into(), "negative".into(), "neutral \"quoted\"".into()]);
    assert_eq!(walk(&c, &choice, &style, "negative"), Ok(true));
    assert_eq!(walk(&c, &choice, &style, "neutral \"quoted\""), Ok(true));
    assert!(walk(&c, &choice, &style, "positively").is_err());

    let gbnf = GrammarSpec::Grammar(
        "root ::= \"SELECT \" column \" FROM \" table\ncolumn ::= \"a\" | \"b\"\ntable ::= [a-z]+\n".into(),
    );
    assert_eq!(walk(&c, &gbnf, &style, "SELECT b FROM users"), Ok(true));
    assert_eq!(walk(&c, &gbnf, &style, "SELECT b FROM"), Ok(false));
    assert!(walk(&c, &gbnf, &style, "SELECT c").is_err());
    let lark = GrammarSpec::Grammar("start: \"yes\" | \"no\" NUM\nNUM: /[0-9]/\n".into());
    assert_eq!(walk(&c, &lark, &style, "no7"), Ok(true));
    assert!(walk(&c, &lark, &style, "maybe").is_err());
}

#[test]
fn a_finished_grammar_allows_only_the_end_tokens() {
    let c = compiler();
    let g = c
        .compile(&GrammarSpec::Choice(vec!["ok".into()]), &JsonStyle::default())
        .unwrap();
    let tok = tokenizer();
    let mut m = g.matcher();
    for id in tok.encode("ok", false).unwrap() {
        m.consume(id).unwrap();
    }
    let mask = m.mask().unwrap();
    assert_eq!(mask.count(), 2);
    assert!(mask.allows(IM_END) && mask.allows(ENDOFTEXT));
    let mut logits = vec![1.0f32; VOCAB];
    mask.apply(&mut logits);
    let finite: Vec<usize> = (0..VOCAB).filter(|&i| logits[i].is_finite()).collect();
    assert_eq!(finite, vec![ENDOFTEXT as usize, IM_END as usize]);
}

#[test]
fn compiled_grammars_are_cached_by_content() {
    let c = compiler();
    let style = JsonStyle::default();
    let a = c
        .compile(&GrammarSpec::JsonSchema(json!({"type": "integer"})), &style)
        .unwrap();
    let b = c
        .compile(&GrammarSpec::JsonSchema(json!({"type": "integer"})), &style)
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let loose = JsonStyle {
        any_whitespace: true,
        ..Default::default()
    };
    let d = c
        .compile(&GrammarSpec::JsonSchema(json!({"type": "integer"})), &loose)
        .unwrap();
    assert!(!Arc::ptr_eq(&a, &d), "another layout is another grammar");
    assert_eq!(c.cached(), 2);
}

#[test]
fn bad_constraints_say_what_is_wrong() {
    let c = compiler();
    let style = JsonStyle::default();
    let err = |spec: GrammarSpec| c.compile(&spec, &style).unwrap_err();
    let cases: Vec<(GrammarSpec, &str)> = vec![
        (GrammarSpec::Regex("(ab".into()), "regex does not parse"),
        (GrammarSpec::Choice(vec![]), "list of choices is empty"),
        (GrammarSpec::JsonSchema(json!([1])), "must be an object"),
        (GrammarSpec::JsonSchema(json!({"type": "strange"})), "strange"),
        (GrammarSpec::JsonSchema(json!({"$ref": "#/$defs/missing"})), "missing"),
        (
            GrammarSpec::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
            "",
        ),
        (GrammarSpec::Grammar("start: undefined_rule\n".into()), "undefined_rule"),
        (GrammarSpec::Grammar("root ::= \"a".into()), "never closed"),
        (GrammarSpec::Grammar("   ".into()), "empty"),
    ];
    for (spec, says) in cases {
        let e = err(spec.clone());
        assert!(matches!(e, GrammarError::Invalid(_)), "{spec:?}: {e:?}");
        assert!(e.to_string().contains(says), "{spec:?}: {e}");
        assert!(!e.to_string().contains('\n'), "{spec:?}: one line: {e}");
    }
    let huge = GrammarSpec::Regex("a".repeat(inferd::text::grammar::MAX_SOURCE_BYTES + 1));
    assert!(matches!(err(huge), GrammarError::TooLarge(m) if m.contains("at most 65536")));
    let many: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    assert!(matches!(err(GrammarSpec::Choice(many)), GrammarError::TooLarge(m) if m.contains("at most 1024")));
    // A schema whose grammar exceeds llguidance's size limit is refused naming it.
    let wide: serde_json::Map<String, serde_json::Value> = (0..3000)
        .map(|i| (format!("p{i}"), json!({"type": "string", "enum": ["x", "y", "z", "w"]})))
        .collect();
    let e = err(GrammarSpec::JsonSchema(json!({"type": "object", "properties": wide})));
    assert!(matches!(e, GrammarError::TooLarge(_)), "{e:?}");
}

#[test]
fn counted_repetitions_are_bounded_before_they_compile() {
    let c = compiler();
    let style = JsonStyle::default();
    for rx in [r"a{99999999}", r"(a{1000}){1000}", r"x|(b{500}c){300}"] {
        let e = c.compile(&GrammarSpec::Regex(rx.into()), &style).unwrap_err();
        assert!(
            matches!(&e, GrammarError::TooLarge(m) if m.contains("at most 100000")),
            "{rx}: {e:?}"
        );
    }
    let e = c
        .compile(
            &GrammarSpec::JsonSchema(json!({"type": "string", "pattern": "^((ab){2000}c){100}$"})),
            &style,
        )
        .unwrap_err();
    assert!(
        matches!(&e, GrammarError::TooLarge(m) if m.contains("200000 repetitions")),
        "{e:?}"
    );
    // A Lark grammar's regex terminals too (not its strings or comments).
    let lark = GrammarSpec::Grammar("start: \"/a{999999}/\" X  # /b{999999}/\nX: /[0-9]{1,200000}/\n".into());
    assert!(matches!(c.compile(&lark, &style), Err(GrammarError::TooLarge(m)) if m.contains("200000 repetitions")));
    let fine = GrammarSpec::Grammar("start: \"/a{999999}/\" X  # /b{999999}/\nX: /[0-9]{1,3}/\n".into());
    assert_eq!(walk(&c, &fine, &style, "/a{999999}/12"), Ok(true));
    // Bounds up to the limit compile and match.
    assert_eq!(
        walk(&c, &GrammarSpec::Regex("[a-z]{1,100000}".into()), &style, "hello"),
        Ok(true)
    );
}

/// `multipleOf` is checked by an automaton with a state per unit of its step: a step of
/// ~10^9 (the fuzzer's) ran the process out of memory while compiling, so steps are
/// bounded, alone and where they could merge (their lcm).
#[test]
fn multiple_of_steps_are_bounded_before_they_compile() {
    let c = compiler();
    let style = JsonStyle::default();
    let too_large = |schema: serde_json::Value, says: &str| {
        let e = c.compile(&GrammarSpec::JsonSchema(schema.clone()), &style).unwrap_err();
        assert!(
            matches!(&e, GrammarError::TooLarge(m) if m.contains(says)),
            "{schema}: {e:?}"
        );
    };
    too_large(
        json!({"multipleOf": 1665486786}),
        "1665486786 units of 10^-0; at most 10000",
    );
    // llguidance drops the sign.
    too_large(json!({"multipleOf": -691673371}), "691673371 units of 10^-0");
    too_large(
        json!({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 12345.5}}}),
        "123455 units of 10^-1",
    );
    // Three primes under the bound whose product is over it, merged by allOf.
    too_large(
        json!({"allOf": [{"multipleOf": 97}, {"multipleOf": 89}, {"multipleOf": 83}]}),
        "combine to a step of 716539 units",
    );
    // Inside a property named like a data keyword.
    too_large(
        json!({"type": "object", "properties": {"default": {"type": "integer", "multipleOf": 1665486786}}}),
        "1665486786 units",
    );
    // Properties meet the patternProperties that match them.
    too_large(
        json!({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 9973}},
               "patternProperties": {"^a$": {"type": "integer", "multipleOf": 9967}}}),
        "combine to a step of 99400891 units",
    );
    // Too many decimal places (llguidance scales by 10^places in 32 bits).
    too_large(json!({"multipleOf": 1e-9}), "at most 8 decimal places");
    // A Lark grammar's embedded schema gets the same bounds.
    let lark = GrammarSpec::Grammar("start: %json {\"type\": \"integer\", \"multipleOf\": 1665486786}\n".into());
    assert!(matches!(c.compile(&lark, &style), Err(GrammarError::TooLarge(m)) if m.contains("1665486786 units")));
    // A `$ref` brings its target's step to where it is used.
    too_large(
        json!({"$defs": {"n": {"multipleOf": 9973}}, "type": "object",
               "properties": {"a": {"$ref": "#/$defs/n", "multipleOf": 7}}}),
        "combine to a step of 69811 units",
    );
    // Within the bound, and steps of different properties that never meet: they compile
    // and match.
    let schema = json!({"type": "object", "properties": {
        "a": {"type": "integer", "multipleOf": 9973},
        "b": {"type": "number", "multipleOf": 0.5},
        "c": {"type": "integer", "multipleOf": 100},
    }, "required": ["a", "b", "c"]});
    let spec = GrammarSpec::JsonSchema(schema);
    assert_eq!(walk(&c, &spec, &style, r#"{"a": 19946, "b": 2.5, "c": 300}"#), Ok(true));
    assert_eq!(walk(&c, &spec, &style, r#"{"a": 19947"#), Ok(false));
}

/// A compatibility ideograph (U+F900) that the tokenizer's NFC normalizer turns into
/// another character: the grammar still allows exactly its bytes (the fuzzer found a
/// choice whose forced token was the normalized one's, which the matcher then refused).
#[test]
fn text_the_normalizer_would_change_is_forced_byte_for_byte() {
    let c = compiler();
    let g = c
        .compile(&GrammarSpec::Choice(vec!["\u{F900}x".into()]), &JsonStyle::default())
        .unwrap();
    let mut m = g.matcher();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let mask = m.mask().unwrap();
        let Some(t) = (0..VOCAB as u32).rev().find(|&t| mask.allows(t)) else {
            panic!("empty mask")
        };
        if t == IM_END {
            break;
        }
        m.consume(t).unwrap();
        ids.push(t);
    }
    assert!(m.mask().unwrap().allows(IM_END), "the choice is complete");
    assert_eq!(
        tokenizer().decode(&ids, false).unwrap(),
        "\u{F900}x",
        "its exact bytes, not NFC's"
    );
}

/// Strict tools: each function's arguments are their own schema root (a `$ref` to the
/// schema's own `$defs` resolves), in the Qwen block format the tool-call parser reads.
#[test]
fn tool_call_grammars_hold_each_functions_schema() {
    use inferd::text::CallSchema;
    let c = compiler();
    let style = JsonStyle::default();
    let params = json!({"$defs": {"unit": {"enum": ["c", "f"]}}, "type": "object",
                        "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
                        "required": ["city", "unit"], "additionalProperties": false});
    let spec = |opened, several| GrammarSpec::ToolCalls {
        functions: vec![
            CallSchema {
                name: "weather".into(),
                parameters: Some(params.clone()),
            },
            CallSchema {
                name: "time".into(),
                parameters: None,
            },
        ],
        opened,
        several,
    };
    let call =
        "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
    assert_eq!(walk(&c, &spec(false, false), &style, call), Ok(true));
    let two = format!("{call}\n<tool_call>\n{{\"name\": \"time\", \"arguments\": {{\"any\": 1}}}}\n</tool_call>");
    assert_eq!(walk(&c, &spec(false, true), &style, &two), Ok(true));
    assert!(walk(&c, &spec(false, false), &style, &two).is_err(), "one call only");
    assert!(
        walk(&c, &spec(false, false), &style, &call.replace("\"c\"", "\"k\"")).is_err(),
        "the enum holds"
    );
    assert!(
        walk(&c, &spec(false, false), &style, &call.replace("weather", "rain")).is_err(),
        "known names only"
    );
    // Opened: the grammar starts after `<tool_call>`.
    assert_eq!(
        walk(
            &c,
            &spec(true, false),
            &style,
            call.strip_prefix("<tool_call>").unwrap()
        ),
        Ok(true)
    );
    // Tool schemas get the same checks as response formats.
    let bad = GrammarSpec::ToolCalls {
        functions: vec![CallSchema {
            name: "f".into(),
            parameters: Some(json!({"type": "string", "pattern": "a{1,200000}"})),
        }],
        opened: false,
        several: false,
    };
    assert!(matches!(c.compile(&bad, &style), Err(GrammarError::TooLarge(_))));
    // Data that looks like a pattern is data.
    let data = json!({"type": "object", "properties": {"p": {"const": {"pattern": "(unclosed"}}}});
    assert!(c.compile(&GrammarSpec::JsonSchema(data), &style).is_ok());
}

/// llguidance lexes each GBNF literal or class as a lexeme, greedily: an alternative
/// that is a prefix of another is not backtracked into (docs/structured-outputs.md says
/// so), so `ab` is refused here where llama.cpp accepts it.
#[test]
fn gbnf_literals_are_lexed_greedily() {
    let c = compiler();
    let style = JsonStyle::default();
    let g = GrammarSpec::Grammar("root ::= x \"b\"\nx ::= \"a\" | \"ab\"\n".into());
    assert_eq!(walk(&c, &g, &style, "abb"), Ok(true));
    // Pinned so that the documented difference is noticed if llguidance changes it.
    assert!(
        walk(&c, &g, &style, "ab").is_err(),
        "llama.cpp's reading: `ab` is x = `a`, then `b`"
    );
}
