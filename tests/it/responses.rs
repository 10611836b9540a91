//! The Responses API over HTTP: the exact streaming event sequence for plain text, a
//! length cut, a tool call and two turns with previous_response_id; stored responses;
//! and bad input.

use serde_json::{json, Value};

use super::server::Server;

const QWEN: &str = "Qwen/Qwen2.5-Coder-0.5B-Instruct";

/// (event name, data) of each event; the name must match the data's `type`.
fn parse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap_or_else(|| panic!("bad event {e:?}"));
            let name = name
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event line: {e:?}"));
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name, "{e}");
            data
        })
        .collect()
}

fn types(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let t = e["type"].as_str().unwrap().to_owned();
        // Runs of deltas count once.
        if !(t.ends_with(".delta") && out.last() == Some(&t)) {
            out.push(t);
        }
    }
    out
}

fn create(s: &Server, body: Value) -> Value {
    let r = s.post("/v1/responses", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn text_responses_stream_their_exact_event_sequence_and_are_stored() {
    let s = Server::start(&[]);
    let ask = json!({"input": "What is the capital of France?", "temperature": 0, "metadata": {"k": "v"}});
    let whole = create(&s, ask.clone());
    let id = whole["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"));
    assert_eq!(whole["object"], "response");
    assert_eq!(whole["status"], "completed");
    assert_eq!(whole["metadata"], json!({"k": "v"}));
    assert_eq!(whole["incomplete_details"], Value::Null);
    let output = whole["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert!(output[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(output[0]["content"][0]["type"], "output_text");
    assert_eq!(output[0]["content"][0]["text"], "The capital of France is Paris.");
    assert_eq!(
        (
            &whole["usage"]["input_tokens"],
            &whole["usage"]["output_tokens"],
            &whole["usage"]["total_tokens"]
        ),
        (&json!(37), &json!(8), &json!(45))
    );

    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let r = s.post("/v1/responses", streamed);
    assert_eq!(r.header("content-type"), Some("text/event-stream; charset=utf-8"));
    let events = parse_events(&r.body);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], n, "{e}");
    }
    assert_eq!(events[0]["response"]["status"], "queued");
    assert_eq!(events[1]["response"]["status"], "in_progress");
    let item_id = &events[2]["item"]["id"];
    assert!(events[2..events.len() - 1]
        .iter()
        .all(|e| e.get("item_id").is_none_or(|i| i == item_id)));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(deltas, "The capital of France is Paris.");
    assert_eq!(done["text"], deltas.as_str());
    let last = &events.last().unwrap()["response"];
    assert_eq!(last["output"][0]["content"][0]["text"], deltas.as_str());
    assert_eq!(last["usage"], whole["usage"]);

    // A length cut: incomplete, with its reason.
    let r = s.post(
        "/v1/responses",
        json!({"input": "Tell me a long story.", "temperature": 0, "max_output_tokens": 5, "stream": true}),
    );
    let events = parse_events(&r.body);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(last["response"]["usage"]["output_tokens"], 5);
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");

    // Two turns: the second continues the stored conversation.
    let second = create(
        &s,
        json!({"input": "And of Germany?", "temperature": 0, "previous_response_id": id}),
    );
    assert_eq!(second["previous_response_id"], id.as_str());
    assert_eq!(
        second["output"][0]["content"][0]["text"],
        "The capital of Germany is Berlin."
    );
    assert!(second["usage"]["input_tokens"].as_u64().unwrap() > 45, "{second}");
    let got = s.request("GET", &format!("/v1/responses/{id}"), &[], None);
    assert_eq!(got.json(), whole);
    let items = s
        .request("GET", &format!("/v1/responses/{id}/input_items"), &[], None)
        .json();
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"][0]["role"], "user");
    assert_eq!(items["data"][0]["content"][0]["text"], "What is the capital of France?");
    let deleted = s.request("DELETE", &format!("/v1/responses/{id}"), &[], None).json();
    assert_eq!(deleted, json!({"id": id, "object": "response", "deleted": true}));
    for path in [format!("/v1/responses/{id}"), format!("/v1/responses/{id}/input_items")] {
        let r = s.request("GET", &path, &[], None);
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (404, json!("response_not_found"))
        );
    }
    // store: false keeps nothing.
    let unstored = create(&s, json!({"input": "Hi", "max_output_tokens": 2, "store": false}));
    let r = s.request(
        "GET",
        &format!("/v1/responses/{}", unstored["id"].as_str().unwrap()),
        &[],
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn function_calls_stream_as_output_items_and_their_results_continue_the_conversation() {
    let s = Server::start_model(QWEN, &[]);
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let body = json!({"model": QWEN, "input": "What is the weather like in Paris today?", "tools": tools,
        "tool_choice": "required", "temperature": 0, "stream": true});
    let events = parse_events(&s.post("/v1/responses", body).body);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let added = &events[2]["item"];
    assert_eq!(
        (&added["type"], &added["name"], &added["arguments"], &added["status"]),
        (
            &json!("function_call"),
            &json!("get_weather"),
            &json!(""),
            &json!("in_progress")
        )
    );
    let args: String = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(parsed, json!({"city": "Paris"}));
    let done = &events[events.len() - 2]["item"];
    assert_eq!(
        (&done["arguments"], &done["status"]),
        (&json!(args), &json!("completed"))
    );
    let response = &events.last().unwrap()["response"];
    let call = &response["output"][0];
    assert_eq!(call["call_id"], added["call_id"]);
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));

    // The result goes back with previous_response_id; the model answers in words.
    let followup = create(
        &s,
        json!({"model": QWEN, "previous_response_id": response["id"], "tools": tools, "temperature": 0,
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"temperature\": 22, \"sky\": \"sunny\"}"}]}),
    );
    let text = followup["output"][0]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("22"), "{followup}");
    // The same conversation given whole, without the store.
    let whole = create(
        &s,
        json!({"model": QWEN, "tools": tools, "temperature": 0, "input": [
            {"role": "user", "content": "What is the weather like in Paris today?"},
            {"type": "function_call", "call_id": call["call_id"], "name": "get_weather", "arguments": args},
            {"type": "function_call_output", "call_id": call["call_id"], "output": "{\"temperature\": 22, \"sky\": \"sunny\"}"}]}),
    );
    assert_eq!(whole["output"][0]["content"][0]["text"], text);
}

#[test]
fn bad_responses_requests_get_openai_errors() {
    let s = Server::start(&[]);
    let cases = [
        (json!({"input": [{"type": "web_search_call"}]}), 400, "input[0].type"),
        (
            json!({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}),
            400,
            "input[0].call_id",
        ),
        (
            json!({"input": "hi", "previous_response_id": "resp_unknown"}),
            404,
            "previous_response_id",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "web_search"}]}),
            400,
            "tools[0]",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "function", "name": "bad name"}]}),
            400,
            "tools[0]",
        ),
        (json!({"input": "hi", "tool_choice": "required"}), 400, "tool_choice"),
        (
            json!({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": "none"}]}),
            400,
            "tools[0]",
        ),
        (json!({}), 400, "input"),
        (json!({"input": 3}), 400, "input"),
        (json!({"input": []}), 400, "input"),
        (
            json!({"input": [{"role": "robot", "content": "x"}]}),
            400,
            "input[0].role",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            400,
            "input[0].content[0].image_url",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]}),
            400,
            "input[0].content[0].image_url",
        ),
        (json!({"input": "hi", "max_output_tokens": 0}), 400, "max_output_tokens"),
        (
            json!({"input": "hi", "text": {"format": {"type": "json_schema"}}}),
            400,
            "text.format.name",
        ),
        (json!({"input": "hi", "bogus": 1}), 400, "bogus"),
        (json!({"input": "hi", "temperature": "hot"}), 400, "temperature"),
    ];
    for (body, status, param) in cases {
        let r = s.post("/v1/responses", body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["param"], param, "{body}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = s.request("PUT", "/v1/responses/resp_x", &[], None);
    assert_eq!(r.status, 405);
}
