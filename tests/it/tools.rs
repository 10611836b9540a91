//! Tool calling over HTTP with the real Qwen2.5-Coder-0.5B-Instruct checkpoint: what it
//! does when free to choose (it writes fenced JSON, which stays content: see
//! docs/architecture.md), `tool_choice` required and named (forced `<tool_call>`
//! openings), streamed calls that reassemble to the whole reply, a multi-turn exchange
//! with the tool's answer, and the request errors.

use serde_json::{json, Value};

use super::server::Server;

const QWEN: &str = "Qwen/Qwen2.5-Coder-0.5B-Instruct";

fn qwen() -> Server {
    Server::start_model(QWEN, &[])
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ])
}

fn weather_request(tool_choice: Value) -> Value {
    json!({"model": QWEN, "messages": [{"role": "user", "content": "What is the weather like in Paris today?"}],
           "tools": tools(), "tool_choice": tool_choice, "temperature": 0, "max_tokens": 60})
}

fn arguments(call: &Value) -> Value {
    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap()
}

#[test]
fn forced_tool_calls_are_parsed_whole_and_streamed() {
    let s = qwen();
    // Free to choose, this checkpoint answers with fenced JSON, not `<tool_call>`.
    let r = s.post("/v1/chat/completions", weather_request(json!("auto")));
    assert_eq!(r.status, 200, "{}", r.body);
    let choice = &r.json()["choices"][0];
    assert!(choice["message"].get("tool_calls").is_none(), "{choice}");
    assert_eq!(choice["finish_reason"], "stop");

    let r = s.post("/v1/chat/completions", weather_request(json!("required")));
    assert_eq!(r.status, 200, "{}", r.body);
    let whole = r.json();
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{message}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["id"], format!("call_{}_0_0", whole["id"].as_str().unwrap()));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(arguments(&calls[0]), json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");

    // Streamed: id, type and name first, then argument fragments that add up to the
    // same arguments; no content.
    let mut body = weather_request(json!("required"));
    body["stream"] = json!(true);
    let events = s.post("/v1/chat/completions", body).events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let id = serde_json::from_str::<Value>(&events[0]).unwrap()["id"].clone();
    let deltas: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0].clone())
        .collect();
    let tool_deltas: Vec<&Value> = deltas
        .iter()
        .filter_map(|c| c["delta"].get("tool_calls"))
        .map(|t| &t[0])
        .collect();
    assert!(tool_deltas.len() > 3, "arguments came in one piece: {tool_deltas:?}");
    assert_eq!(
        tool_deltas[0],
        &json!({"index": 0, "id": format!("call_{}_0_0", id.as_str().unwrap()), "type": "function", "function": {"name": "get_weather", "arguments": ""}})
    );
    let streamed: String = tool_deltas[1..]
        .iter()
        .map(|d| {
            assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
            assert_eq!(d["index"], 0);
            d["function"]["arguments"].as_str().unwrap()
        })
        .collect();
    assert_eq!(streamed, calls[0]["function"]["arguments"].as_str().unwrap());
    let content: String = deltas.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
    assert_eq!(content, "");
    assert_eq!(deltas.last().unwrap()["finish_reason"], "tool_calls");

    // Named: that function, once.
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let r = s.post("/v1/chat/completions", weather_request(named));
    let v = r.json();
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], "get_time");
    assert_eq!(arguments(&calls[0]), json!({"city": "Paris"}));

    // Two questions: two calls (the model lists them in one block), or just the first
    // with `parallel_tool_calls: false`.
    let mut body = weather_request(json!("required"));
    body["messages"][0]["content"] = json!("What are the weather and the local time in Paris right now?");
    body["max_tokens"] = json!(100);
    for (parallel, names) in [(true, vec!["get_weather", "get_time"]), (false, vec!["get_weather"])] {
        body["parallel_tool_calls"] = json!(parallel);
        let v = s.post("/v1/chat/completions", body.clone()).json();
        let message = &v["choices"][0]["message"];
        let called: Vec<&str> = message["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(called, names, "{v}");
        assert_eq!(message["content"], Value::Null, "{v}");
    }

    // The call and the tool's answer go back in; the model answers in words.
    let mut body = weather_request(json!("auto"));
    body["messages"] = json!([
        {"role": "user", "content": "What is the weather like in Paris today?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 22, \"sky\": \"sunny\"}"}
    ]);
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(answer.contains("22"), "{answer}");
}

#[test]
fn bad_tool_requests_are_refused_naming_the_parameter() {
    let s = qwen();
    let cases = [
        (
            weather_request(json!({"type": "function", "function": {"name": "nope"}})),
            "tool_choice",
        ),
        (weather_request(json!("sometimes")), "tool_choice"),
        (weather_request(json!({"type": "function"})), "tool_choice"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0]",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}),
            "tools[0]",
        ),
    ];
    for (body, param) in cases {
        let r = s.post("/v1/chat/completions", body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["param"], param, "{body}: {error}");
        assert_eq!(error["type"], "invalid_request_error");
    }
}
