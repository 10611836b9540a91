//! Structured outputs over HTTP on a real `inferd serve` (SmolLM2-135M-Instruct): every
//! route and spelling gives a document of its constraint, streamed as pieces of the
//! final document, cut with `length` by `max_tokens`; the Responses API repeats the
//! format it was given.

use serde_json::{json, Value};

use crate::server::Server;

const SMOL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn body(extra: Value) -> Value {
    let mut body = json!({"model": SMOL, "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
                          "max_tokens": 120});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn schema() -> Value {
    json!({"type": "object",
           "properties": {"name": {"type": "string", "maxLength": 20},
                          "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                          "colour": {"enum": ["black", "white", "ginger"]}},
           "required": ["name", "legs", "colour"], "additionalProperties": false})
}

fn check_cat(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 3, "{text}");
    assert!(o["name"].as_str().is_some_and(|n| n.chars().count() <= 20), "{text}");
    assert!(o["legs"].as_u64().is_some_and(|n| n <= 8), "{text}");
    assert!(
        ["black", "white", "ginger"].contains(&o["colour"].as_str().unwrap()),
        "{text}"
    );
    // The compact layout.
    assert!(text.starts_with("{\"name\": \"") && !text.contains('\n'), "{text}");
}

#[test]
fn every_spelling_gives_a_document_streamed_as_it_is_written() {
    let s = Server::start(&[]);
    let format = json!({"type": "json_schema", "json_schema": {"name": "cat", "schema": schema(), "strict": true}});
    let r = s.post(
        "/v1/chat/completions",
        body(json!({"response_format": format, "temperature": 0})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let whole = r.json();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    check_cat(&text);
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    // The same through vLLM's field, and its older spelling: the same grammar, the same reply.
    for extra in [
        json!({"structured_outputs": {"json": schema()}}),
        json!({"guided_json": schema().to_string()}),
    ] {
        let mut b = body(extra.clone());
        b["temperature"] = json!(0);
        let r = s.post("/v1/chat/completions", b);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["message"]["content"], text.as_str(), "{extra}");
    }
    // Streamed: the pieces concatenate to the document, each a prefix of it.
    let r = s.post(
        "/v1/chat/completions",
        body(json!({"response_format": format, "temperature": 0, "stream": true})),
    );
    let mut streamed = String::new();
    let mut finish = None;
    for e in r.events() {
        if e == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&e).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            streamed.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            assert!(text.starts_with(&streamed), "{streamed:?} is not a prefix of {text:?}");
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish.as_deref(), Some("stop"));
    // max_tokens cuts a document: `length`, and the text is its start.
    let r = s.post(
        "/v1/chat/completions",
        body(json!({"response_format": format, "temperature": 0, "max_tokens": 4})),
    );
    let cut = r.json();
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    assert!(text.starts_with(cut["choices"][0]["message"]["content"].as_str().unwrap()));
    // n = 2, seeded: each completion a document, and the same again.
    let sampled = body(json!({"response_format": format, "temperature": 1.0, "top_p": 0.95, "seed": 9, "n": 2}));
    let a = s.post("/v1/chat/completions", sampled.clone()).json();
    let b = s.post("/v1/chat/completions", sampled).json();
    for c in a["choices"].as_array().unwrap() {
        check_cat(c["message"]["content"].as_str().unwrap());
    }
    assert_eq!(a["choices"], b["choices"]);
}

#[test]
fn completions_and_responses_take_constraints_too() {
    let s = Server::start(&[]);
    let r = s.post(
        "/v1/completions",
        json!({"model": SMOL, "prompt": "My favourite colour is", "max_tokens": 10, "temperature": 0,
               "structured_outputs": {"choice": [" red", " green", " blue"]}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        [" red", " green", " blue"].contains(&r.json()["choices"][0]["text"].as_str().unwrap()),
        "{}",
        r.body
    );
    let r = s.post(
        "/v1/completions",
        json!({"model": SMOL, "prompt": "The date today is", "max_tokens": 16, "temperature": 0,
               "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {"type": "string", "format": "date"}}}}),
    );
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();
    let date = text.trim_matches('"');
    assert!(
        text.len() == 12 && date.len() == 10 && date.as_bytes()[4] == b'-',
        "{text}"
    );
    let format = json!({"type": "json_schema", "name": "cat", "schema": schema()});
    let r = s.post(
        "/v1/responses",
        json!({"model": SMOL, "input": "Describe a cat as JSON.", "temperature": 0, "max_output_tokens": 120,
               "text": {"format": format}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let resp = r.json();
    assert_eq!(resp["text"]["format"], format, "the format is repeated as given");
    check_cat(resp["output"][0]["content"][0]["text"].as_str().unwrap());
    // Plain text is the default format.
    let r = s.post(
        "/v1/responses",
        json!({"model": SMOL, "input": "hi", "max_output_tokens": 2}),
    );
    assert_eq!(r.json()["text"]["format"], json!({"type": "text"}));
}

#[test]
fn bad_constraints_are_400s_naming_their_field() {
    let s = Server::start(&[]);
    for (extra, param, says) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "wat"}}}}),
            "response_format",
            "wat",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": true}}}}),
            "response_format",
            "uniqueItems",
        ),
        (
            json!({"structured_outputs": {"grammar": "root ::= item\n"}}),
            "structured_outputs",
            "`item` is used but never defined",
        ),
        (
            json!({"structured_outputs": {"regex": "[a-z]{1,200000}"}}),
            "structured_outputs",
            "at most 100000",
        ),
        (json!({"guided_regex": "(x"}), "guided_regex", "unclosed group"),
        (
            json!({"response_format": {"type": "json_object"}, "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
            "response_format",
            "forces to be a tool call",
        ),
        (json!({"guided_choice": [], "stream": true}), "guided_choice", "empty"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}],
                "tool_choice": "required"}),
            "tools",
            "nope",
        ),
    ] {
        let r = s.post("/v1/chat/completions", body(extra.clone()));
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["param"], param, "{extra}: {error}");
        assert!(error["message"].as_str().unwrap().contains(says), "{extra}: {error}");
    }
    // The server is fine.
    let r = s.post("/v1/chat/completions", body(json!({"max_tokens": 2})));
    assert_eq!(r.status, 200);
}
