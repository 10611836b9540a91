//! Entry points for fuzzing the parsers that read untrusted bytes: request JSON, chat
//! templates (code from a model's files), multipart uploads, audio and image files,
//! generated tool calls and structured-output constraints (schemas, regexes, grammars). Each takes arbitrary bytes and panics only when a property fails; the
//! `cargo fuzz` targets in `fuzz/` call them, and the proptests at the end run them on
//! random and structured inputs in every test run (bounded in count).

use serde_json::{json, Value};

use crate::api::{parse_chat_request, parse_completion_request, responses::parse_responses_request, SamplingDefaults};
use crate::text::tool_calls::parse_pieces;
use crate::text::{
    ChatInput, ChatTemplate, GrammarCompiler, GrammarError, GrammarSpec, JsonStyle, SpecialTokens, Tokenizer,
};

/// Request bodies: any JSON the routes could receive parses to a request or to a 4xx
/// error, never a panic or a 5xx.
pub fn request_json(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    request_value(&body);
}

/// `request_json` on a parsed value.
pub fn request_value(body: &Value) {
    let defaults = SamplingDefaults::default();
    let check = |route: &str, error: Option<crate::api::ApiError>| {
        if let Some(e) = error {
            assert!(e.status.is_client_error(), "{route}: {} for {body}", e.status);
        }
    };
    check(
        "chat",
        parse_chat_request(body)
            .and_then(|r| r.generation.sampling.resolve(&defaults))
            .err(),
    );
    check(
        "completions",
        parse_completion_request(body)
            .and_then(|r| r.generation.sampling.resolve(&defaults))
            .err(),
    );
    let mut n = 0;
    check(
        "responses",
        parse_responses_request(body, &mut |prefix| {
            n += 1;
            format!("{prefix}_{n}")
        })
        .err(),
    );
}

/// A conversation with every kind of message a template meets.
fn sample_conversation() -> (Value, Value) {
    let messages = json!([
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function",
            "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        {"role": "assistant", "content": "<think>ok</think>It is sunny."}
    ]);
    let tools = json!([{"type": "function", "function": {"name": "weather", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    (messages, tools)
}

/// Chat templates: any template source compiles or is refused, and renders, fails or
/// stops at its instruction or output bound, never panics.
pub fn chat_template(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let tokens = SpecialTokens {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        pad_token: None,
        unk_token: None,
    };
    let Ok(template) = ChatTemplate::new(source.to_owned(), tokens) else {
        return;
    };
    let (messages, tools) = sample_conversation();
    let _ = template.render(ChatInput {
        messages: &messages,
        tools: Some(&tools),
        add_generation_prompt: true,
        kwargs: None,
    });
}

/// Multipart bodies: the first line is the boundary, the rest the body. Parsing never
/// panics, and every part it returns lies within the body.
pub fn multipart(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(boundary) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let body = data.get(split + 1..).unwrap_or(&[]);
    if let Ok(parts) = crate::server::multipart::parse(body, boundary) {
        for part in parts {
            assert!(part.data.len() <= body.len());
        }
    }
}

/// Audio files: decoding any bytes ends in audio or an error, within the length bound.
pub fn audio(data: &[u8]) {
    let max_secs = 5.0;
    for audio in [
        crate::media::audio::decode(data, max_secs),
        crate::media::audio::decode_at_rate(data, 16_000, max_secs),
    ]
    .into_iter()
    .flatten()
    {
        assert!(audio.duration_secs() <= max_secs + 1.0, "{} s", audio.duration_secs());
        assert!(audio.samples.iter().all(|s| s.is_finite()));
    }
}

/// Images: decoding any bytes ends in an RGB image within the pixel limit, or an error;
/// a decoded image also goes through the Qwen2-VL preprocessing.
pub fn image(data: &[u8]) {
    let max_pixels = 1 << 20;
    if let Ok(image) = crate::media::image::decode(data, max_pixels) {
        assert!((image.width * image.height) as u64 <= max_pixels);
        assert_eq!(image.data.len(), image.width * image.height * 3);
        if let Ok(pixels) = crate::media::image::preprocess(&image, &crate::media::image::VisionPreprocess::default()) {
            assert_eq!(
                pixels.data.len(),
                pixels.grid.iter().product::<usize>() * pixels.row_len
            );
            assert!(pixels.data.iter().all(|v| v.is_finite()));
        }
    }
}

/// Generated tool calls: the first byte sets a piece length, the rest is the reply.
/// However the reply is cut into pieces (as tokens stream), the parser finds the same
/// content and the same calls as from the whole text.
pub fn tool_calls(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let size = usize::from(size % 16) + 1;
    let pieces: Vec<&str> = chars
        .chunks(size)
        .map(|chunk| {
            let start = chunk[0].0;
            let (last, c) = chunk[chunk.len() - 1];
            &text[start..last + c.len_utf8()]
        })
        .collect();
    assert_eq!(
        parse_pieces(pieces),
        parse_pieces([text.as_ref()]),
        "{text:?} in pieces of {size}"
    );
}

/// The Qwen2.5 tokenizer of the test fixtures, compiled into grammars once.
fn fixture_grammars() -> &'static GrammarCompiler {
    static COMPILER: std::sync::OnceLock<GrammarCompiler> = std::sync::OnceLock::new();
    COMPILER.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/qwen2.5-coder-0.5b");
        let tokenizer = Tokenizer::from_dir(std::path::Path::new(dir)).expect("the fixture tokenizer");
        GrammarCompiler::new(std::sync::Arc::new(tokenizer), 151_936, vec![151_645, 151_643])
    })
}

/// Structured-output constraints: the first byte picks the kind (JSON schema, regex,
/// grammar, choices, or a whole `structured_outputs` object), the rest is its text.
/// Each compiles or gets an error (never a panic); one that compiles allows a token at
/// every step until it is complete, for a few steps.
pub fn grammar(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let spec = match kind % 5 {
        0 => match serde_json::from_str(text) {
            Ok(schema) => GrammarSpec::JsonSchema(schema),
            Err(_) => return,
        },
        1 => GrammarSpec::Regex(text.to_owned()),
        2 => GrammarSpec::Grammar(text.to_owned()),
        3 => GrammarSpec::Choice(text.split('\n').map(str::to_owned).collect()),
        _ => {
            let Ok(options) = serde_json::from_str::<Value>(text) else {
                return;
            };
            let body = json!({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": options});
            match parse_chat_request(&body) {
                Ok(request) => match request.generation.structured {
                    Some(s) => return grammar_steps(&s.spec, &s.style),
                    None => return,
                },
                Err(e) => {
                    assert!(e.status.is_client_error(), "{} for {body}", e.status);
                    return;
                }
            }
        }
    };
    grammar_steps(&spec, &JsonStyle::default());
}

fn grammar_steps(spec: &GrammarSpec, style: &JsonStyle) {
    let grammar = match fixture_grammars().compile(spec, style) {
        Ok(g) => g,
        Err(GrammarError::Invalid(m) | GrammarError::TooLarge(m)) => {
            assert!(
                !m.is_empty() && !m.contains('\n'),
                "an error says what is wrong on one line: {m:?}"
            );
            return;
        }
        Err(e @ GrammarError::Unavailable(_)) => panic!("{e}"),
    };
    let mut matcher = grammar.matcher();
    for _ in 0..8 {
        if matcher.is_finished() {
            break;
        }
        let mask = matcher.mask().unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        // The likeliest token of a model that prefers high ids: the last one allowed.
        let Some(token) = (0..151_936u32).rev().find(|&t| mask.allows(t)) else {
            panic!("{spec:?}: an empty mask");
        };
        if token == 151_645 || token == 151_643 {
            break;
        }
        matcher.consume(token).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Text made of the tokens each parser cares about, and noise.
    fn fragments(words: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![prop::sample::select(words).prop_map(str::to_owned), ".{0,4}"],
            0..40,
        )
        .prop_map(|parts| parts.concat())
    }

    const TOOL_WORDS: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "call>",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ":",
        ",",
        " ",
        "\n",
        "\"name\"",
        "\"arguments\"",
        "\"parameters\"",
        "\"f\"",
        "1",
        "null",
        "é",
        "</tool",
        "{\"name\": \"get\", \"arguments\": ",
    ];

    const EXPRESSIONS: &[&str] = &[
        "x",
        "x.content",
        "x['role']",
        "messages | length",
        "tools | tojson",
        "messages | tojson(indent=2)",
        "loop.index",
        "'ab' * 1000",
        "range(10) | list",
        "x.content.split(' ')",
        "raise_exception('no')",
        "1 / 0",
        "none.x",
        "messages[-1].content",
        "x.function.arguments | tojson",
        "strftime_now('%Y')",
        "bos_token + eos_token",
        "(x | string)[::-1]",
        "x.content | trim",
        "namespace(a=1).a",
        "x.tool_calls[0]",
    ];
    const ITERABLES: &[&str] = &[
        "messages",
        "range(1000)",
        "range(100000)",
        "tools",
        "x.tool_calls",
        "x.content",
        "x",
        "'abc'",
        "loop",
    ];
    const CONDITIONS: &[&str] = &[
        "x",
        "loop.first",
        "x.role == 'user'",
        "add_generation_prompt",
        "x is string",
        "x.tool_calls is defined",
        "not x",
    ];

    /// Well-formed templates (the parser refuses most random text before running it):
    /// nested loops, conditions, macros and the expressions chat templates use.
    fn template_source() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            prop::sample::select(EXPRESSIONS).prop_map(|e| format!("{{{{ {e} }}}}")),
            "[a-z <|>]{0,8}",
            Just("{% set x = messages[0] %}".to_owned()),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|parts| parts.concat()),
                (
                    prop::sample::select(ITERABLES),
                    prop::collection::vec(inner.clone(), 0..3)
                )
                    .prop_map(|(it, body)| format!("{{% for x in {it} %}}{}{{% endfor %}}", body.concat())),
                (prop::sample::select(CONDITIONS), inner.clone(), inner.clone())
                    .prop_map(|(c, a, b)| format!("{{% if {c} %}}{a}{{% else %}}{b}{{% endif %}}")),
                inner.prop_map(|body| format!(
                    "{{% macro f(x) %}}{body}{{{{ f(x) }}}}{{% endmacro %}}{{{{ f(messages) }}}}"
                )),
            ]
        })
    }

    /// The pieces schemas, regexes and grammars are made of.
    const GRAMMAR_WORDS: &[&str] = &[
        "root ::= ",
        "start: ",
        "\"a\"",
        "[a-z]",
        "[^",
        "]",
        "(",
        ")",
        "|",
        "*",
        "+",
        "?",
        "{2,3}",
        "{",
        "}",
        ".",
        "\\d",
        "\\",
        "/x/",
        "%json",
        "::=",
        " ",
        "\n",
        "rule",
        "A",
        "-",
        "\"",
        "^",
        "$",
        "{\"json\": {}}",
        "{\"regex\": \"a+\"}",
        "{\"choice\": []}",
        "{\"grammar\": 1}",
        "{\"json_object\": true, \"regex\": \"x\"}",
    ];

    /// JSON-schema-like objects: real keywords with any values.
    fn any_schema() -> impl Strategy<Value = Value> {
        let keyword = prop::sample::select(vec![
            "type",
            "properties",
            "items",
            "required",
            "enum",
            "const",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "pattern",
            "format",
            "anyOf",
            "oneOf",
            "allOf",
            "$ref",
            "$defs",
            "additionalProperties",
            "minItems",
            "maxItems",
            "prefixItems",
            "not",
            "if",
            "then",
            "exclusiveMinimum",
            "multipleOf",
        ]);
        let leaf = prop_oneof![
            prop::sample::select(vec![
                "object",
                "string",
                "integer",
                "number",
                "array",
                "boolean",
                "null",
                "date",
                "email",
                "#/$defs/a",
                "#",
                "^a*$"
            ])
            .prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(json!(1e300)),
            Just(json!(-0.5)),
        ];
        leaf.prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((keyword.clone(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
        .prop_map(|v| {
            if v.is_object() {
                v
            } else {
                json!({"type": "array", "items": v})
            }
        })
    }

    /// Any JSON value, a few levels deep, with the numbers and strings that break parsers.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            prop::num::f64::NORMAL.prop_map(Value::from),
            Just(json!(1e308)),
            Just(json!(-0.0)),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(vec![
                "user",
                "system",
                "assistant",
                "tool",
                "developer",
                "text",
                "image_url",
                "function",
                "auto",
                "none",
                "required"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "input",
        "instructions",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "tools",
        "tool_choice",
        "response_format",
        "parallel_tool_calls",
        "ignore_eos",
        "echo",
        "suffix",
        "best_of",
        "user",
        "chat_template_kwargs",
        "previous_response_id",
        "text",
        "reasoning",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// A valid request with one field (or one message field) set to any JSON value.
        #[test]
        fn requests_with_any_field_parse_or_get_a_4xx(field in prop::sample::select(FIELDS), value in any_json(), in_message in any::<bool>()) {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                  "prompt": "hi", "input": "hi", "max_tokens": 4});
            if in_message {
                body["messages"][0][field] = value.clone();
                body["input"] = json!([{"role": "user", "content": value}]);
            } else {
                body[field] = value;
            }
            request_value(&body);
        }

        #[test]
        fn request_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            request_json(&data);
        }

        #[test]
        fn tool_calls_do_not_depend_on_how_the_text_is_cut(size in any::<u8>(), text in fragments(TOOL_WORDS)) {
            let mut data = vec![size];
            data.extend_from_slice(text.as_bytes());
            tool_calls(&data);
        }

        #[test]
        fn constraints_compile_or_say_why(kind in 0u8..5, text in fragments(GRAMMAR_WORDS)) {
            let mut data = vec![kind];
            data.extend_from_slice(text.as_bytes());
            grammar(&data);
        }

        #[test]
        fn schemas_compile_or_say_why(schema in any_schema()) {
            let mut data = vec![0];
            data.extend_from_slice(schema.to_string().as_bytes());
            grammar(&data);
        }

        #[test]
        fn multipart_bodies_never_panic(boundary in "[a-zA-Z0-9'()+_,./:=?-]{0,12}", body in fragments(&["--", "\r\n", "\r\n\r\n", "Content-Disposition: form-data; name=\"file\"; filename=\"a\"", "--b", "--b--", "b"])) {
            multipart(format!("{boundary}\n{body}").as_bytes());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Real files of every format with bytes overwritten and cut short.
        #[test]
        fn damaged_images_never_panic(
            which in 0usize..5,
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
            cut in any::<prop::sample::Index>(),
            cut_it in any::<bool>(),
        ) {
            let files: [&[u8]; 5] = [
                include_bytes!("../tests/fixtures/images/synthetic-tiny-5x7.png"),
                include_bytes!("../tests/fixtures/images/synthetic-83x61.gif"),
                include_bytes!("../tests/fixtures/images/synthetic-83x61.webp"),
                include_bytes!("../tests/fixtures/images/synthetic-grey-alpha-97x333.png"),
                include_bytes!("../tests/fixtures/images/rocket.jpg"),
            ];
            let mut data = files[which].to_vec();
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            if cut_it {
                data.truncate(cut.index(data.len()));
            }
            image(&data);
        }
    }

    proptest! {
        // Each case compiles and renders a template; a runaway loop takes ~1 s to run out
        // of fuel, so fewer cases.
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn templates_render_fail_or_stop_at_their_bounds(source in template_source()) {
            chat_template(source.as_bytes());
        }
    }
}
