use inferd::text::{ChatInput, ChatTemplate, Tokenizer};

use crate::common::{fixture, golden, ids};

/// Every conversation in tests/goldens/templates.json renders to transformers' exact
/// text, and tokenizes to its exact ids.
#[test]
fn chat_templates_render_exactly_like_transformers() {
    let goldens = golden("templates.json");
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tok = Tokenizer::from_dir(&fixture(&format!("models/{}", case["tokenizer"].as_str().unwrap()))).unwrap();
        let own;
        let template = match case["template_file"].as_str() {
            Some(file) => {
                let source = std::fs::read_to_string(fixture(&format!("templates/{file}"))).unwrap();
                own = ChatTemplate::new(source, tok.special_tokens.clone()).unwrap();
                &own
            }
            None => tok.chat_template().unwrap(),
        };
        let rendered = template
            .render(ChatInput {
                messages: &case["messages"],
                tools: case["tools"].as_array().map(|_| &case["tools"]),
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                kwargs: case["kwargs"].as_object(),
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["rendered"].as_str().unwrap();
        if rendered != want {
            failures.push(format!("{name}:\n--- ours\n{rendered}\n--- transformers\n{want}"));
            continue;
        }
        assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&case["ids"]), "{name}: ids");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn raise_exception_in_a_template_is_an_error_with_its_message() {
    let template = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}".into(),
        Default::default(),
    )
    .unwrap();
    let messages = serde_json::json!([{"role": "assistant", "content": "hi"}]);
    let err = template
        .render(ChatInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: false,
            kwargs: None,
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("Conversation must start with a user message"),
        "{err}"
    );
}

fn render_with(source: &str, messages: serde_json::Value, kwargs: serde_json::Value) -> String {
    ChatTemplate::new(source.into(), Default::default())
        .unwrap()
        .render(ChatInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: false,
            kwargs: kwargs.as_object(),
        })
        .unwrap()
}

/// Expected strings are what Python's json.dumps / str() print for the same values.
#[test]
fn tojson_matches_python_json_dumps() {
    let messages = serde_json::json!([{"b": [1, 2.5, "é\"\n", 2.0], "a": {"x": null, "y": true}}]);
    assert_eq!(
        render_with("{{ messages[0] | tojson }}", messages.clone(), serde_json::json!({})),
        r#"{"b": [1, 2.5, "é\"\n", 2.0], "a": {"x": null, "y": true}}"#
    );
    assert_eq!(
        render_with(
            "{{ messages[0] | tojson(ensure_ascii=true, separators=[',', ':']) }}|{{ '🦙' | tojson(ensure_ascii=true) }}",
            messages.clone(),
            serde_json::json!({})
        ),
        r#"{"b":[1,2.5,"\u00e9\"\n",2.0],"a":{"x":null,"y":true}}|"\ud83e\udd99""#
    );
    assert_eq!(
        render_with("{{ messages[0] | tojson(indent=2) }}", messages, serde_json::json!({})),
        "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\\"\\n\",\n    2.0\n  ],\n  \"a\": {\n    \"x\": null,\n    \"y\": true\n  }\n}"
    );
}

#[test]
fn printed_values_use_python_spelling() {
    let out = render_with(
        "{{ flag }} {{ nothing }} {{ half }} {{ items }}",
        serde_json::json!([]),
        serde_json::json!({"flag": false, "nothing": null, "half": 0.5,
                           "items": [true, null, "it's", 1.0, {"k": "v"}]}),
    );
    assert_eq!(out, r#"False None 0.5 [True, None, "it's", 1.0, {'k': 'v'}]"#);
}

/// Templates are code from a model's files: a runaway loop stops at the fuel limit and
/// an endless output at the size limit, each as a template error within seconds, while a
/// real template over 10 000 messages renders.
#[test]
fn template_loops_and_output_are_bounded() {
    use inferd::text::template::{MAX_RENDERED_BYTES, TEMPLATE_FUEL};
    let tok = Tokenizer::from_dir(&fixture("models/qwen2.5-coder-0.5b")).unwrap();
    let render = |source: &str, messages: &serde_json::Value| {
        let template = ChatTemplate::new(source.to_owned(), tok.special_tokens.clone()).unwrap();
        let start = std::time::Instant::now();
        let out = template.render(ChatInput {
            messages,
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        });
        (out, start.elapsed())
    };
    let hi = serde_json::json!([{"role": "user", "content": "hi"}]);
    let (out, took) = render(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        &hi,
    );
    let err = out.unwrap_err().to_string();
    assert!(err.contains(&TEMPLATE_FUEL.to_string()), "{err}");
    assert!(took.as_secs() < 30, "the fuel limit took {took:?}");
    eprintln!("a runaway loop stopped after {took:?}");

    let kib = serde_json::json!([{"role": "user", "content": "x".repeat(1024)}]);
    let (out, _) = render(
        "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}",
        &kib,
    );
    let err = out.unwrap_err().to_string();
    assert!(err.contains(&format!("{} MiB", MAX_RENDERED_BYTES >> 20)), "{err}");

    let many: Vec<serde_json::Value> = (0..10_000)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("message {i}")}))
        .collect();
    let text = tok
        .chat_template()
        .unwrap()
        .render(ChatInput {
            messages: &serde_json::Value::Array(many),
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        })
        .unwrap();
    assert!(text.contains("message 9999"));
}
