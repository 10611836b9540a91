//! vLLM's extension fields over HTTP, each doing what vLLM's protocol says, on a real
//! `inferd serve` (SmolLM2-135M-Instruct, greedy).

use serde_json::{json, Value};

use crate::server::Server;

const SMOL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn chat(s: &Server, content: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": SMOL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn complete(s: &Server, prompt: Value, extra: Value) -> Value {
    let mut body = json!({"model": SMOL, "prompt": prompt, "temperature": 0, "max_tokens": 16});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let r = s.post("/v1/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn text(reply: &Value) -> &str {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .or(reply["choices"][0]["text"].as_str())
        .unwrap()
}

/// The generated token ids (logprobs with `return_tokens_as_token_ids`).
fn token_ids(reply: &Value) -> Vec<u32> {
    reply["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().strip_prefix("token_id:").unwrap().parse().unwrap())
        .collect()
}

#[test]
fn vllm_sampling_and_stop_fields_do_what_vllm_says() {
    let s = Server::start(&[]);
    let prompt = json!("The first five prime numbers are");
    let base = complete(
        &s,
        prompt.clone(),
        json!({"logprobs": 0, "return_tokens_as_token_ids": true}),
    );
    let ids = token_ids(&base);
    assert_eq!(ids.len(), 16);
    // stop_token_ids: generation ends at the token, whose text is left out.
    let stopped = complete(&s, prompt.clone(), json!({"stop_token_ids": [ids[4]]}));
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["usage"]["completion_tokens"], 5);
    // allowed_token_ids: only those.
    let allowed = complete(
        &s,
        prompt.clone(),
        json!({"allowed_token_ids": [ids[0], ids[2]], "logprobs": 0, "return_tokens_as_token_ids": true}),
    );
    assert!(token_ids(&allowed).iter().all(|t| *t == ids[0] || *t == ids[2]));
    // bad_words: a word of the greedy text never appears.
    let story = json!("Once upon a time, there was a");
    let told = complete(&s, story.clone(), json!({}));
    let word = text(&told)
        .split(|c: char| !c.is_alphabetic())
        .find(|w| w.len() > 3)
        .unwrap_or_else(|| panic!("no word in {told}"))
        .to_owned();
    let banned = complete(&s, story, json!({"bad_words": [word.clone()]}));
    assert!(!text(&banned).contains(&word), "{word:?} in {:?}", text(&banned));
    // include_stop_str_in_output: the stop string stays.
    let stop = text(&base).chars().skip(5).take(3).collect::<String>();
    let cut = complete(&s, prompt.clone(), json!({"stop": [stop.clone()]}));
    let kept = complete(
        &s,
        prompt.clone(),
        json!({"stop": [stop.clone()], "include_stop_str_in_output": true}),
    );
    assert_eq!(format!("{}{stop}", text(&cut)), text(&kept));
    // ignore_eos and min_tokens: past the reply's natural end.
    let short = chat(
        &s,
        "Answer with one word: what color is the sky?",
        json!({"max_tokens": 64}),
    );
    let natural = short["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(natural < 30, "{short}");
    let long = chat(
        &s,
        "Answer with one word: what color is the sky?",
        json!({"max_tokens": 40, "ignore_eos": true}),
    );
    assert_eq!(
        (
            long["usage"]["completion_tokens"].as_u64(),
            long["choices"][0]["finish_reason"].as_str()
        ),
        (Some(40), Some("length"))
    );
    let min = chat(
        &s,
        "Answer with one word: what color is the sky?",
        json!({"max_tokens": 64, "min_tokens": natural + 10}),
    );
    assert!(min["usage"]["completion_tokens"].as_u64().unwrap() >= natural + 10);
    // skip_special_tokens: false shows the EOS that ended the reply when it is kept.
    let special = chat(
        &s,
        "Answer with one word: what color is the sky?",
        json!({"max_tokens": 64, "skip_special_tokens": false, "include_stop_str_in_output": true}),
    );
    assert!(text(&special).ends_with("<|im_end|>"), "{special}");
    assert_eq!(text(&special).trim_end_matches("<|im_end|>"), text(&short));
    // truncate_prompt_tokens: the prompt's last k tokens.
    let truncated = complete(
        &s,
        prompt.clone(),
        json!({"truncate_prompt_tokens": 3, "echo": true, "max_tokens": 1}),
    );
    assert_eq!(truncated["usage"]["prompt_tokens"], 3);
    let all = s.post("/tokenize", json!({"model": SMOL, "prompt": prompt})).json()["tokens"].clone();
    let last3 = &all.as_array().unwrap()[all.as_array().unwrap().len() - 3..];
    let echo = s.post("/detokenize", json!({"model": SMOL, "tokens": last3})).json()["prompt"].clone();
    assert!(
        text(&truncated).starts_with(echo.as_str().unwrap()),
        "{truncated} / {echo}"
    );
    // A limit past the context window is refused, saying what is left.
    let r = s.post(
        "/v1/completions",
        json!({"model": SMOL, "prompt": "hi", "max_tokens": 1_000_000}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
}

#[test]
fn vllm_prompt_and_reply_fields_do_what_vllm_says() {
    let s = Server::start(&[]);
    // request_id: the response's id and x-request-id.
    let r = s.post(
        "/v1/chat/completions",
        json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "request_id": "my-run.7"}),
    );
    assert_eq!(
        (r.json()["id"].as_str(), r.header("x-request-id")),
        (Some("my-run.7"), Some("my-run.7"))
    );
    // continue_final_message + echo: the reply continues the assistant's words, shown first.
    let start = "The capital of France is";
    let continued = s.post(
        "/v1/chat/completions",
        json!({"model": SMOL, "temperature": 0, "max_tokens": 4, "echo": true, "continue_final_message": true,
               "add_generation_prompt": false,
               "messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": start}]}),
    )
    .json();
    let content = text(&continued);
    assert!(
        content.starts_with(start) && content.len() > start.len() && content.contains("Paris"),
        "{content:?}"
    );
    // add_generation_prompt: false leaves out the assistant opening.
    let with = chat(&s, "hi", json!({"max_tokens": 1}))["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    let without = chat(&s, "hi", json!({"max_tokens": 1, "add_generation_prompt": false}))["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    let opening = s
        .post(
            "/tokenize",
            json!({"model": SMOL, "prompt": "<|im_start|>assistant\n", "add_special_tokens": false}),
        )
        .json()["count"]
        .as_u64()
        .unwrap();
    assert_eq!(with - without, opening);
    // chat_template and documents: the request's template renders the prompt.
    let template =
        "{% for d in documents %}[{{ d.text }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}";
    let own = chat(
        &s,
        "hi",
        json!({"max_tokens": 1, "chat_template": template, "documents": [{"text": "Paris is in France."}]}),
    );
    let expected = s
        .post(
            "/tokenize",
            json!({"model": SMOL, "prompt": "[Paris is in France.]hi", "add_special_tokens": false}),
        )
        .json()["count"]
        .clone();
    assert_eq!(own["usage"]["prompt_tokens"], expected);
    let r = s.post(
        "/v1/chat/completions",
        json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "chat_template": "{% for %}"}),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].as_str()),
        (400, Some("chat_template"))
    );
    // prompt_logprobs on chat: one entry per prompt token, the first null; each holds the
    // prompt's own token with its rank.
    let scored = chat(&s, "hi", json!({"max_tokens": 1, "prompt_logprobs": 1}));
    let entries = scored["prompt_logprobs"].as_array().unwrap();
    assert_eq!(entries.len() as u64, scored["usage"]["prompt_tokens"].as_u64().unwrap());
    assert!(entries[0].is_null());
    for e in &entries[1..] {
        let e = e.as_object().unwrap();
        assert!((1..=2).contains(&e.len()));
        assert!(e
            .values()
            .all(|v| v["logprob"].as_f64().unwrap() <= 0.0 && v["rank"].as_u64().unwrap() >= 1));
    }
    // Completions echo with logprobs, lm-eval's loglikelihood request: a batch of token-id
    // prompts, every prompt token scored (the first with null), then the generated one.
    let ids = s
        .post("/tokenize", json!({"model": SMOL, "prompt": "The sky is blue"}))
        .json()["tokens"]
        .clone();
    let n = ids.as_array().unwrap().len();
    let scored = complete(
        &s,
        json!([ids, ids]),
        json!({"max_tokens": 1, "logprobs": 1, "echo": true, "seed": 1234}),
    );
    assert_eq!(scored["choices"].as_array().unwrap().len(), 2);
    let lp = &scored["choices"][1]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n + 1);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"].as_array().unwrap()[1..=n]
        .iter()
        .all(|v| v.as_f64().unwrap() < 0.0));
    assert_eq!(scored["choices"][0]["logprobs"], scored["choices"][1]["logprobs"]);
    assert_eq!(scored["usage"]["prompt_tokens"].as_u64(), Some(2 * n as u64));
    // The same, streamed: the echo chunk carries the prompt's entries.
    let r = s.post(
        "/v1/completions",
        json!({"model": SMOL, "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": true, "stream": true}),
    );
    let first: Value = serde_json::from_str(&r.events()[0]).unwrap();
    assert_eq!(first["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), n);
    // continuous_usage_stats: usage on every chunk, counting up.
    let r = s.post(
        "/v1/chat/completions",
        json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true, "ignore_eos": true,
               "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    );
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let counts: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["usage"]["completion_tokens"]
                .as_u64()
                .expect("usage on every chunk")
        })
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]) && *counts.last().unwrap() == 5,
        "{counts:?}"
    );
    // tokenizer_info, for lm-eval's remote tokenizer.
    let info = s.request("GET", "/tokenizer_info", &[], None).json();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
}
