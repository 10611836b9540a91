//! Images in `/v1/chat/completions` with the tiny Qwen2.5-VL checkpoint (its own
//! byte-level tokenizer, the official Qwen2-VL chat template and a small pixel budget):
//! the reply to a request with data: URLs equals transformers' processor + generate
//! token for token (goldens by scripts/vl_goldens.py), streamed too; image URLs are
//! fetched only under the server's policy; prefix blocks are shared only between
//! requests with the same images; and every bad image request gets a 400.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::{golden, installed_model, repo_root, scratch_dir};
use crate::server::{Response, Server};

const VL: &str = "inferd-test/tiny-qwen2.5-vl";

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("tests/fixtures/images").join(name)).unwrap()
}

fn data_url(name: &str) -> String {
    let mime = match name.rsplit('.').next() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "image/jpeg",
    };
    let payload = base64::engine::general_purpose::STANDARD.encode(image_bytes(name));
    format!("data:{mime};base64,{payload}")
}

/// The golden's messages with each image file name made a URL by `url`.
fn with_urls(messages: &Value, url: &dyn Fn(&str) -> String) -> Value {
    let mut messages = messages.clone();
    for message in messages.as_array_mut().unwrap() {
        if let Some(parts) = message["content"].as_array_mut() {
            for part in parts {
                if part["type"] == "image_url" {
                    let name = part["image_url"]["url"].as_str().unwrap().to_owned();
                    part["image_url"]["url"] = url(&name).into();
                }
            }
        }
    }
    messages
}

fn greedy_request(messages: Value) -> Value {
    json!({"model": VL, "messages": messages, "max_tokens": 16, "temperature": 0,
           "ignore_eos": true, "logprobs": true})
}

/// The reply's tokens and their log-probabilities against a golden case.
fn assert_matches_golden(response: &Response, case: &Value, what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.body);
    let v = response.json();
    assert_eq!(
        v["usage"]["prompt_tokens"], case["prompt_tokens"],
        "{what}: prompt length (template + expanded image tokens)"
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let tokens: Vec<&str> = content.iter().map(|e| e["token"].as_str().unwrap()).collect();
    let want: Vec<&str> = case["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, want, "{what}: greedy tokens");
    for (i, (got, want)) in content.iter().zip(case["logprobs"].as_array().unwrap()).enumerate() {
        let (got, want) = (got["logprob"].as_f64().unwrap(), want.as_f64().unwrap());
        assert!((got - want).abs() < 1e-3, "{what}: token {i} logprob {got} vs {want}");
    }
}

#[test]
fn chats_with_images_match_transformers_streamed_and_not() {
    let g = golden("models/tiny-qwen2.5-vl-chat.json");
    let server = Server::start_model(VL, &[]);
    for (name, case) in g["cases"].as_object().unwrap() {
        let messages = with_urls(&case["messages"], &data_url);
        let r = server.post("/v1/chat/completions", greedy_request(messages.clone()));
        assert_matches_golden(&r, case, name);
        let text = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();

        // Streamed through the same route: the same text, then [DONE].
        let mut body = greedy_request(messages);
        body["stream"] = true.into();
        let r = server.post("/v1/chat/completions", body);
        assert_eq!(r.status, 200, "{}", r.body);
        let events = r.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let streamed: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(streamed, text, "{name}: streamed text");
    }

    // The Responses API takes `input_image` parts: the same prompt, the same reply.
    let case = &g["cases"]["one_image"];
    let prompt = case["messages"][0]["content"][0]["text"].clone();
    let chat = server.post(
        "/v1/chat/completions",
        greedy_request(with_urls(&case["messages"], &data_url)),
    );
    let text = chat.json()["choices"][0]["message"]["content"].clone();
    let r = server.post(
        "/v1/responses",
        json!({"model": VL, "max_output_tokens": 16, "temperature": 0, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": prompt},
            {"type": "input_image", "image_url": data_url("chelsea.png"), "detail": "auto"}]}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["usage"]["input_tokens"], case["prompt_tokens"], "{v}");
    assert_eq!(v["output"][0]["content"][0]["text"], text, "{v}");
    // A follow-up on the stored conversation sends its image again.
    let first_tokens = v["usage"]["input_tokens"].as_u64().unwrap() + 16;
    let r = server.post(
        "/v1/responses",
        json!({"model": VL, "max_output_tokens": 4, "previous_response_id": v["id"], "input": "And now?"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let follow = r.json()["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        follow > first_tokens,
        "{follow} input tokens after a {first_tokens}-token turn"
    );

    // n = 2 greedy choices share the request's images: both are the golden reply.
    let mut body = greedy_request(with_urls(&case["messages"], &data_url));
    body["n"] = 2.into();
    let r = server.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    for choice in v["choices"].as_array().unwrap() {
        assert_eq!(choice["message"]["content"], text, "{v}");
    }

    let r = server.post(
        "/v1/responses",
        json!({"model": VL, "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json()["error"]["param"],
        "input[0].content[0].image_url",
        "{}",
        r.body
    );
}

#[test]
fn concurrent_image_and_text_requests_batch_without_mixing_their_images() {
    let g = golden("models/tiny-qwen2.5-vl-chat.json");
    let server = Server::start_model(VL, &[]);
    let port = server.port;
    // Each golden chat four times, and text-only chats, all at once: every image request
    // still gets exactly its own reply.
    let mut threads = Vec::new();
    for round in 0..4 {
        for (name, case) in g["cases"].as_object().unwrap() {
            let (name, case) = (name.clone(), case.clone());
            threads.push(std::thread::spawn(move || {
                let body = greedy_request(with_urls(&case["messages"], &data_url));
                let r = Server::request_port(port, "POST", "/v1/chat/completions", &body);
                assert_matches_golden(&r, &case, &format!("{name} (round {round})"));
            }));
        }
        threads.push(std::thread::spawn(move || {
            let body = json!({"model": VL, "messages": [{"role": "user", "content": "plain text"}], "max_tokens": 16});
            let r = Server::request_port(port, "POST", "/v1/chat/completions", &body);
            assert_eq!(r.status, 200, "{}", r.body);
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
}

/// Prefix-cache counters of the server's one model.
fn prefix_hits(server: &Server) -> u64 {
    let metrics = server.request("GET", "/metrics", &[], None).body;
    metrics
        .lines()
        .find(|l| l.starts_with("inferd_prefix_cache_hits_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no prefix-cache counter in {metrics}")) as u64
}

#[test]
fn prefix_blocks_are_shared_only_between_requests_with_the_same_images() {
    let g = golden("models/tiny-qwen2.5-vl-chat.json");
    let case = &g["cases"]["one_image"];
    let server = Server::start_model(VL, &[]);
    let request = greedy_request(with_urls(&case["messages"], &data_url));
    assert_matches_golden(&server.post("/v1/chat/completions", request.clone()), case, "first");
    let before = prefix_hits(&server);
    // The same image again: its blocks are found, and the reply is unchanged.
    assert_matches_golden(&server.post("/v1/chat/completions", request), case, "cached");
    let after_same = prefix_hits(&server);
    assert!(
        after_same > before,
        "no prefix hit for the same image ({before} -> {after_same})"
    );
    // The same text with another image (the same number of image tokens would not
    // matter): nothing is shared, not even the text before the image.
    let other = greedy_request(with_urls(&case["messages"], &|_| data_url("synthetic-83x61.webp")));
    let r = server.post("/v1/chat/completions", other);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(prefix_hits(&server), after_same, "blocks of another image were reused");
}

/// A one-route HTTP server on 127.0.0.1 answering every GET with `body`, counting
/// connections.
struct ImageHost {
    url: String,
    connections: Arc<AtomicUsize>,
}

impl ImageHost {
    fn start(body: Vec<u8>) -> ImageHost {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        ImageHost {
            url: format!("http://127.0.0.1:{port}/chelsea.png"),
            connections,
        }
    }
}

#[test]
fn image_urls_are_fetched_only_under_the_servers_policy() {
    let g = golden("models/tiny-qwen2.5-vl-chat.json");
    let case = &g["cases"]["one_image"];
    let host = ImageHost::start(image_bytes("chelsea.png"));
    let url = host.url.clone();
    let request = greedy_request(with_urls(&case["messages"], &|_| url.clone()));

    // By default a loopback address is refused before any connection.
    let server = Server::start_model(VL, &[]);
    let r = server.post("/v1/chat/completions", request.clone());
    assert_eq!(r.status, 400, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["code"], "invalid_image_url");
    assert_eq!(e["error"]["param"], "messages[0].content[1].image_url.url");
    assert!(!e["error"]["message"].as_str().unwrap().contains("127.0.0.1:"), "{e}");
    assert!(
        server.log_lines().iter().any(|l| l.contains("refused an image URL")),
        "the refusal is logged"
    );
    assert_eq!(host.connections.load(Ordering::SeqCst), 0);
    drop(server);

    // Allowed: fetched, and the reply is the one of the same image sent inline.
    let server = Server::start_model(VL, &["--allow-private-image-urls"]);
    assert_matches_golden(&server.post("/v1/chat/completions", request.clone()), case, "fetched");
    assert_eq!(host.connections.load(Ordering::SeqCst), 1);
    drop(server);

    // Remote fetching off: refused; data: URLs still work.
    let server = Server::start_model(VL, &["--allow-private-image-urls", "--no-remote-images"]);
    let r = server.post("/v1/chat/completions", request);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("turned off"), "{}", r.body);
    assert_eq!(host.connections.load(Ordering::SeqCst), 1);
    let inline = greedy_request(with_urls(&case["messages"], &data_url));
    assert_matches_golden(&server.post("/v1/chat/completions", inline), case, "inline");
}

fn chat_with_parts(parts: Value) -> Value {
    json!({"model": VL, "messages": [{"role": "user", "content": parts}], "max_tokens": 2})
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

#[test]
fn bad_image_requests_get_400s() {
    let chelsea = data_url("chelsea.png");
    let text = json!({"type": "text", "text": "hi"});
    let server = Server::start_model(VL, &["--max-images-per-request", "2", "--max-image-pixels", "100000"]);
    let not_an_image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"GIF89a? not really an image at all")
    );
    let param = "messages[0].content[0].image_url.url";
    let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
        (
            "malformed base64",
            chat_with_parts(json!([image_part("data:image/png;base64,iVBOR*w0K!!")])),
            Some(param),
            "base64",
        ),
        (
            "bytes that are no image",
            chat_with_parts(json!([image_part(&not_an_image)])),
            Some(param),
            "image",
        ),
        (
            "over the pixel limit (451×300 > 100000)",
            chat_with_parts(json!([image_part(&chelsea)])),
            Some(param),
            "over the limit",
        ),
        (
            "too many images",
            chat_with_parts(json!([
                image_part(&data_url("synthetic-tiny-5x7.png")),
                image_part(&data_url("synthetic-tiny-5x7.png")),
                image_part(&data_url("synthetic-tiny-5x7.png"))
            ])),
            Some("messages"),
            "at most 2",
        ),
        (
            "a local path",
            chat_with_parts(json!([image_part("file:///etc/passwd")])),
            Some(param),
            "file paths are never read",
        ),
        (
            "a bare path",
            chat_with_parts(json!([image_part("/etc/passwd")])),
            Some(param),
            "unsupported URL",
        ),
        (
            "no url",
            chat_with_parts(json!([{"type": "image_url", "image_url": {"detail": "low"}}])),
            Some(param),
            "must be a non-empty string",
        ),
        (
            "a string image_url",
            chat_with_parts(json!([{"type": "image_url", "image_url": chelsea.clone()}])),
            Some("messages[0].content[0].image_url"),
            "must be an object",
        ),
        (
            "an unknown detail",
            chat_with_parts(json!([{"type": "image_url", "image_url": {"url": chelsea.clone(), "detail": "ultra"}}])),
            Some("messages[0].content[0].image_url.detail"),
            "auto, low, high",
        ),
        (
            "an image in an assistant message",
            json!({"model": VL, "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image_part(&chelsea)]}]}),
            Some("messages[1].content[0]"),
            "only allowed in user messages",
        ),
        (
            "an image placeholder typed into the text",
            chat_with_parts(json!([{"type": "text", "text": "look: <|image_pad|>"}])),
            Some("messages"),
            "image placeholders",
        ),
        (
            "a pixel budget over the model's",
            {
                let mut r = chat_with_parts(json!([text.clone()]));
                r["mm_processor_kwargs"] = json!({"max_pixels": 100_000_000});
                r
            },
            Some("mm_processor_kwargs.max_pixels"),
            "between",
        ),
        (
            "a zero pixel minimum",
            {
                let mut r = chat_with_parts(json!([text.clone()]));
                r["mm_processor_kwargs"] = json!({"min_pixels": 0});
                r
            },
            Some("mm_processor_kwargs.min_pixels"),
            "at least 1",
        ),
        (
            "a pixel minimum of the wrong type",
            {
                let mut r = chat_with_parts(json!([text.clone()]));
                r["mm_processor_kwargs"] = json!({"min_pixels": "many"});
                r
            },
            Some("mm_processor_kwargs.min_pixels"),
            "`mm_processor_kwargs.min_pixels` has the wrong type",
        ),
        (
            "an unknown processor setting",
            {
                let mut r = chat_with_parts(json!([text.clone()]));
                r["mm_processor_kwargs"] = json!({"fps": 2});
                r
            },
            Some("mm_processor_kwargs"),
            "not a supported parameter",
        ),
    ];
    for (what, body, param, needle) in cases {
        let r = server.post("/v1/chat/completions", body);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{what}: {e}");
        assert_eq!(e["error"]["param"].as_str(), param, "{what}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{what}: {e}");
    }
    let r = server.post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": [image_part(&chelsea)]}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], param);
    // The server still answers, and a smaller per-request pixel budget gives fewer
    // image tokens.
    let tiny = data_url("synthetic-83x61.webp");
    let r = server.post(
        "/v1/chat/completions",
        chat_with_parts(json!([image_part(&tiny), text.clone()])),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let full = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let mut narrow = chat_with_parts(json!([image_part(&tiny), text]));
    narrow["mm_processor_kwargs"] = json!({"max_pixels": 28 * 28 * 2});
    let r = server.post("/v1/chat/completions", narrow);
    assert_eq!(r.status, 200, "{}", r.body);
    let small = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        small < full,
        "{small} prompt tokens with a narrower budget, {full} without"
    );
    drop(server);

    // An image larger than the server's image memory (64 tokens of chelsea.png take
    // 1.2 MB here).
    let server = Server::start_model(VL, &["--max-image-memory", "1000000"]);
    let r = server.post("/v1/chat/completions", chat_with_parts(json!([image_part(&chelsea)])));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("--max-image-memory"), "{}", r.body);
    let r = server.post(
        "/v1/chat/completions",
        chat_with_parts(json!([image_part(&data_url("synthetic-83x61.webp"))])),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    drop(server);

    // Images past the context window (1024 positions; 49 tokens per 200×200 image) are
    // refused as the prompt would be, before the rest are decoded.
    let server = Server::start_model(VL, &["--max-images-per-request", "32"]);
    let board = data_url("chessboard_RGB.png");
    let parts: Vec<Value> = (0..21).map(|_| image_part(&board)).collect();
    let r = server.post("/v1/chat/completions", chat_with_parts(json!(parts)));
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded", "{}", r.body);
    let parts: Vec<Value> = (0..18).map(|_| image_part(&board)).collect();
    let r = server.post("/v1/chat/completions", chat_with_parts(json!(parts)));
    assert_eq!(r.status, 200, "{}", r.body);
    drop(server);

    // A text-only model refuses images, naming the part.
    let server = Server::start(&[]);
    let r = server.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [image_part(&chelsea)]}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["code"], "model_not_supported");
    assert_eq!(e["error"]["param"], param);
    assert!(e["error"]["message"].as_str().unwrap().contains("text only"), "{e}");
    let r = server.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "mm_processor_kwargs": {"max_pixels": 50176}}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "mm_processor_kwargs", "{}", r.body);
}

#[test]
fn dummy_weights_serve_a_vision_language_config() {
    // config.json, tokenizer and processor files without the checkpoint.
    let dir = scratch_dir("dummy-qwen2.5-vl");
    let src = installed_model(VL);
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    ] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    let g = golden("models/tiny-qwen2.5-vl-chat.json");
    let case = &g["cases"]["conversation"];
    let server = Server::start_model(dir.to_str().unwrap(), &["--load-format", "dummy"]);
    let r = server.post(
        "/v1/chat/completions",
        greedy_request(with_urls(&case["messages"], &data_url)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["usage"]["prompt_tokens"], case["prompt_tokens"]);
    assert_eq!(v["usage"]["completion_tokens"], 16);
    drop(server);

    // transformers' default pixel budget (up to 1280 tokens), so that `detail` matters.
    std::fs::write(
        dir.join("preprocessor_config.json"),
        json!({"min_pixels": 3136, "max_pixels": 1003520}).to_string(),
    )
    .unwrap();
    let server = Server::start_model(dir.to_str().unwrap(), &["--load-format", "dummy"]);
    // A 640 × 427 photo: 345 image tokens in full, fewer with `detail: "low"` (at most
    // 512 × 512 pixels' area).
    let rocket = data_url("rocket.jpg");
    let tokens = |detail: &str| {
        let part = json!({"type": "image_url", "image_url": {"url": rocket, "detail": detail}});
        // Unseeded sampling over random weights may pick EOS first: ignored, so that the
        // reply's length is the one asked for.
        let mut body = chat_with_parts(json!([part]));
        body["ignore_eos"] = json!(true);
        let r = server.post("/v1/chat/completions", body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["usage"]["completion_tokens"], 2);
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let (auto, high, low) = (tokens("auto"), tokens("high"), tokens("low"));
    assert_eq!(auto, high);
    // smart_resize within 512 × 512 pixels: 392 × 616, 14 × 22 = 308 tokens, not 15 × 23.
    assert_eq!(auto - low, 345 - 308, "low detail {low} prompt tokens, auto {auto}");
}
