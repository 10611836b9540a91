//! A table of malformed requests, each answered with a 4xx error in the OpenAI shape,
//! while a well-formed conversation runs beside them unharmed.

use std::time::Duration;

use serde_json::{json, Value};

use super::server::Server;

const SMOL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// A schema whose grammar is over llguidance's size limit.
fn wide_schema() -> Value {
    (0..3000)
        .map(|i| (format!("p{i}"), json!({"enum": ["x", "y", "z", "w"]})))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

/// (method, path, raw body) of each bad request.
fn cases() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut post = |path: &str, body: Value| out.push(("POST", path.to_owned(), body.to_string().into_bytes()));
    let chat = |extra: Value| {
        // A small max_tokens: a case wrongly accepted fails the test quickly.
        let mut body = json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    // Wrong types and out-of-range values, one field at a time.
    let bad_values = [
        ("temperature", vec![json!("hot"), json!(-1), json!(1e300), json!([1])]),
        ("top_p", vec![json!(0), json!(1.5), json!("x"), json!(-0.1)]),
        (
            "max_tokens",
            vec![json!(-5), json!(0), json!(1.5), json!("10"), json!(1e12)],
        ),
        ("max_completion_tokens", vec![json!(-1), json!({})]),
        ("n", vec![json!(0), json!(1_000_000), json!(-1), json!("2")]),
        ("top_k", vec![json!(-3), json!("k"), json!(1.5)]),
        ("min_p", vec![json!(2), json!(-1)]),
        ("repetition_penalty", vec![json!(0), json!(-1)]),
        ("presence_penalty", vec![json!(3), json!(-2.5)]),
        ("frequency_penalty", vec![json!(9)]),
        ("seed", vec![json!("s"), json!(1.5), json!([1])]),
        ("stop", vec![json!(5), json!([1, 2]), json!(vec!["x"; 100])]),
        (
            "logit_bias",
            vec![
                json!({"99999999": 1}),
                json!({"1": 500}),
                json!({"x": 1}),
                json!([1]),
                json!({"5": 100, "05": -100}),
            ],
        ),
        ("logprobs", vec![json!("yes")]),
        ("top_logprobs", vec![json!(100), json!(-1)]),
        ("stream", vec![json!("true"), json!(1)]),
        ("stream_options", vec![json!({"include_usage": true})]),
        (
            "tools",
            vec![
                json!("x"),
                json!([{"type": "retrieval"}]),
                json!([{"type": "function", "function": {"name": "a b"}}]),
            ],
        ),
        ("tool_choice", vec![json!("sometimes"), json!(3), json!("required")]),
        ("min_tokens", vec![json!(-1)]),
        ("generation_config", vec![json!("{not json"), json!(3)]),
        ("chat_template_kwargs", vec![json!("x")]),
        (
            "model",
            vec![
                json!(5),
                json!("../../etc/passwd"),
                json!("%2e%2e/%2e%2e"),
                json!("a//b"),
                json!("/abs"),
            ],
        ),
        ("unknown_field", vec![json!(1)]),
        // Structured outputs: malformed, unsupported or oversized constraints.
        (
            "response_format",
            vec![
                json!("json"),
                json!({"type": "json_schema"}),
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": 5}}),
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}),
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/nowhere"}}}),
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": wide_schema()}}}),
                json!({"type": "structural_tag"}),
            ],
        ),
        (
            "structured_outputs",
            vec![
                json!("x"),
                json!({"regex": "("}),
                json!({"regex": "a{99999999}"}),
                json!({"json": {"multipleOf": 1665486786}}),
                json!({"grammar": "root ::= ::="}),
                json!({"grammar": "root ::= x"}),
                json!({"grammar": "start: ("}),
                json!({"grammar": "x".repeat(100_000)}),
                json!({"choice": []}),
                json!({"choice": [1]}),
                json!({"json_object": true, "regex": "a"}),
                json!({"structural_tag": {}}),
                json!({"bogus": 1}),
                json!({"json": "not json"}),
            ],
        ),
        ("guided_json", vec![json!("{not json"), json!(5)]),
        ("guided_choice", vec![json!("a")]),
    ];
    for (field, values) in bad_values {
        for v in values {
            post("/v1/chat/completions", chat(json!({field: v})));
        }
    }
    // A strict tool whose parameters are not a schema.
    post(
        "/v1/chat/completions",
        chat(
            json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "bogus"}}}], "tool_choice": "required"}),
        ),
    );
    // Messages.
    for messages in [
        json!([]),
        json!("hi"),
        json!([{"content": "no role"}]),
        json!([{"role": "wizard", "content": "x"}]),
        json!([{"role": "user"}]),
        json!([{"role": "user", "content": 5}]),
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]),
        json!([{"role": "user", "content": [{"type": "nope"}]}]),
        json!([{"role": "assistant", "tool_calls": "x"}]),
        json!([3]),
    ] {
        post(
            "/v1/chat/completions",
            json!({"model": SMOL, "messages": messages, "max_tokens": 4}),
        );
    }
    // A 10 MB model id.
    post(
        "/v1/chat/completions",
        json!({"model": "x".repeat(10 << 20), "messages": [{"role": "user", "content": "hi"}]}),
    );
    // Too long for the context: 10 MB of text, and 10 000 messages.
    post(
        "/v1/chat/completions",
        json!({"model": SMOL, "messages": [{"role": "user", "content": "a ".repeat(5_000_000)}]}),
    );
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    post("/v1/chat/completions", json!({"model": SMOL, "messages": many}));
    // Completions.
    for prompt in [
        json!(5),
        json!([]),
        json!([-1]),
        json!([99_999_999]),
        json!([[1, "2"]]),
        json!({"a": 1}),
        json!(null),
    ] {
        post(
            "/v1/completions",
            json!({"model": SMOL, "prompt": prompt, "max_tokens": 4}),
        );
    }
    for extra in [
        json!({"suffix": "x"}),
        json!({"echo": "yes"}),
        json!({"best_of": 3}),
        json!({"logprobs": 50}),
    ] {
        let mut body = json!({"model": SMOL, "prompt": "hi", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post("/v1/completions", body);
    }
    // Responses, tokenize, load_model.
    for body in [
        json!({"model": SMOL}),
        json!({"model": SMOL, "input": 3}),
        json!({"model": SMOL, "input": [{"type": "computer_call"}]}),
        json!({"model": SMOL, "input": "x", "previous_response_id": "resp_none"}),
        json!({"model": SMOL, "input": "x", "max_output_tokens": -1}),
    ] {
        post("/v1/responses", body);
    }
    for body in [
        json!({"model": SMOL}),
        json!({"model": SMOL, "prompt": 3}),
        json!({"model": SMOL, "messages": "x"}),
    ] {
        post("/tokenize", body);
    }
    post("/detokenize", json!({"model": SMOL, "tokens": [-1]}));
    post("/detokenize", json!({"model": SMOL, "tokens": [99_999_999]}));
    for model in [json!("../x"), json!(""), json!(7), json!("org/name@../../x")] {
        post("/load_model", json!({"model": model}));
    }
    // Bodies that are not JSON objects, or not JSON: NaN and Infinity are JavaScript,
    // not JSON.
    for raw in [
        &b"{bad"[..],
        b"[1, 2]",
        b"\"text\"",
        b"\xff\xfe{\"a\": 1}",
        b"",
        b"null",
        b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": NaN}",
        b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": Infinity}",
        b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"top_p\": -Infinity}",
    ] {
        out.push(("POST", "/v1/chat/completions".into(), raw.to_vec()));
    }

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    out.push((
        "POST",
        "/v1/chat/completions".into(),
        format!("{{\"messages\": {deep}}}").into_bytes(),
    ));
    // Routes and methods.
    out.push(("GET", "/v1/chat/completions".into(), Vec::new()));
    out.push(("DELETE", "/v1/models".into(), Vec::new()));
    out.push(("GET", "/v1/nothing".into(), Vec::new()));
    out.push(("GET", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(), Vec::new()));
    out.push(("GET", "/v1/responses/..%2F..%2Fetc".into(), Vec::new()));
    out
}

#[test]
fn a_hundred_malformed_requests_get_4xx_errors_and_harm_no_one() {
    let s = Server::launch(&["--max-body-bytes", "16777216"], &[]);
    let port = s.port;
    // A well-formed conversation runs all along.
    let good = std::thread::spawn(move || {
        (0..4)
            .map(|_| {
                let r = Server::request_port(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    &json!({"model": SMOL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                            "temperature": 0}),
                );
                r.json()["choices"][0]["message"]["content"].clone()
            })
            .collect::<Vec<Value>>()
    });
    let cases = cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    for (method, path, body) in &cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        let r = s.request_bytes(method, path, &[], body);
        assert!(
            (400..500).contains(&r.status),
            "{method} {path} {shown}: {} {}",
            r.status,
            &r.body[..r.body.len().min(300)]
        );
        let v: Value =
            serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{method} {path} {shown}: {e}: {}", r.body));
        let error = &v["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{shown}: {v}");
        assert!(
            error["type"].is_string() && error.get("param").is_some() && error.get("code").is_some(),
            "{v}"
        );
    }
    for answer in good.join().unwrap() {
        assert_eq!(answer, "The capital of France is Paris.");
    }
    // Nothing is left running, and the server still answers.
    std::thread::sleep(Duration::from_millis(200));
    let m = s.request("GET", "/metrics", &[], None).body;
    assert!(
        m.contains("inferd_sequences_running{model=\"HuggingFaceTB/SmolLM2-135M-Instruct@main\"} 0\n"),
        "{m}"
    );
    assert_eq!(s.request("GET", "/health", &[], None).status, 200);
}

#[test]
fn request_ids_with_control_characters_are_replaced_and_keys_compared_whole() {
    let s = Server::start(&["--api-key", "sekret-key"]);
    let r = s.request("GET", "/health", &[("x-request-id", "abc\u{e9}def")], None);
    assert!(r.header("x-request-id").unwrap().starts_with("req_"), "{:?}", r.headers);
    for key in ["sekret-ke", "sekret-keyy", "SEKRET-KEY", "", "sekret-kex"] {
        let r = s.request(
            "GET",
            "/v1/models",
            &[("authorization", &format!("Bearer {key}"))],
            None,
        );
        assert_eq!(r.status, 401, "{key:?}");
    }
    let r = s.request("GET", "/v1/models", &[("authorization", "Bearer sekret-key")], None);
    assert_eq!(r.status, 200);
}
