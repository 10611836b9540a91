//! The HTTP server over real sockets: a real `inferd serve` process on a free port,
//! raw HTTP/1.1 requests, every route, streaming and not, and the error cases.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A server process, killed on drop. Servers run one at a time (each loads a model and
/// computes on both cores), so tests holding one take a global lock.
pub struct Server {
    child: Child,
    pub port: u16,
    stderr: mpsc::Receiver<String>,
    /// What the server logged before it was serving.
    pub startup: Vec<String>,
    _one_at_a_time: Option<MutexGuard<'static, ()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_model("HuggingFaceTB/SmolLM2-135M-Instruct", args)
    }

    pub fn start_model(model: &str, args: &[&str]) -> Server {
        let mut all = vec![model];
        all.extend(args);
        Server::launch(&all, &[])
    }

    /// `inferd serve --port 0 --num-blocks 256 ARGS...` (256 unless ARGS say), offline,
    /// with extra environment.
    pub fn launch(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch_wrapped(&[], args, env)
    }

    /// As `launch`, with the server started through a command (`WRAP... inferd serve ...`).
    pub fn launch_wrapped(wrap: &[&str], args: &[&str], env: &[(&str, &str)]) -> Server {
        static LOCK: Mutex<()> = Mutex::new(());
        let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Server::spawn(wrap, args, env, Some(guard))
    }

    /// A second server running beside this one (its test already holds the one-at-a-time
    /// lock through this one).
    pub fn launch_beside(&self, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(&[], args, env, None)
    }

    fn spawn(wrap: &[&str], args: &[&str], env: &[(&str, &str)], guard: Option<MutexGuard<'static, ()>>) -> Server {
        let default_blocks: &[&str] = if args.contains(&"--num-blocks") {
            &[]
        } else {
            &["--num-blocks", "256"]
        };
        // Each server its own responses store (the default kind, SQLite), unless ARGS say
        // or the test is about the default's place (XDG_CACHE_HOME).
        let store = if args.contains(&"--responses-store") || env.iter().any(|(k, _)| *k == "XDG_CACHE_HOME") {
            Vec::new()
        } else {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = super::common::repo_root()
                .join("target")
                .join("test-scratch")
                .join("stores");
            let file = dir.join(format!("{}-{n}.sqlite3", std::process::id()));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
            vec!["--responses-store".to_owned(), format!("sqlite:{}", file.display())]
        };
        let inferd = env!("CARGO_BIN_EXE_inferd");
        let mut command = match wrap.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(inferd);
                c
            }
            None => Command::new(inferd),
        };
        let mut child = command
            .args(["serve", "--port", "0"])
            .args(default_blocks)
            .args(&store)
            .args(args)
            // No test reaches the real hub; the download tests point HF_ENDPOINT at a
            // fake one and turn this off.
            .env("HF_HUB_OFFLINE", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A reader thread forwards stderr lines (and keeps draining it afterwards, so the
        // server never blocks on a full pipe).
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut startup = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("serving") => {
                    break line.rsplit(':').next().unwrap().trim().parse().unwrap();
                }
                Ok(line) => startup.push(line),
                Err(e) => panic!("server did not start ({e}): {:?}", child.try_wait()),
            }
        };
        Server {
            child,
            port,
            stderr: rx,
            startup,
            _one_at_a_time: guard,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal (`"TERM"`, `"KILL"`, ...).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} {}", self.pid());
    }

    /// Waits for the process to exit by itself; `None` if it is still running after
    /// `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The server's stderr lines printed since the last call (after the serving line).
    pub fn log_lines(&self) -> Vec<String> {
        // Lines are forwarded by a thread: give it a moment to catch up.
        std::thread::sleep(Duration::from_millis(100));
        self.stderr.try_iter().collect()
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
        Server::request_to(self.port, method, path, headers, body)
    }

    /// A request with a raw body (any bytes, not only UTF-8 text).
    pub fn request_bytes(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        let mut raw = req.into_bytes();
        raw.extend_from_slice(body);
        stream.write_all(&raw).unwrap();
        let mut answer = Vec::new();
        if let Err(e) = stream.read_to_end(&mut answer) {
            assert!(!answer.is_empty(), "{method} {path}: {e}");
        }
        Response::parse(&answer)
    }

    /// A POST to a server from another thread (the `Server` itself stays put).
    pub fn request_port(port: u16, method: &str, path: &str, body: &Value) -> Response {
        Server::request_to(port, method, path, &[], Some(&body.to_string()))
    }

    fn request_to(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        stream.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        // A server may close without reading a refused body (413): a reset after the
        // response arrived is not an error here.
        if let Err(e) = stream.read_to_end(&mut raw) {
            assert!(!raw.is_empty(), "{method} {path}: {e}");
        }
        Response::parse(&raw)
    }

    pub fn post(&self, path: &str, body: Value) -> Response {
        self.request("POST", path, &[], Some(&body.to_string()))
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn parse(raw: &[u8]) -> Response {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned())))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers.iter().any(|(k, v)| k == "transfer-encoding" && v == "chunked") {
            body = dechunk(&body);
        }
        Response {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of an event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"))
                    .to_owned()
            })
            .collect()
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap().trim(), 16).unwrap();
        body = &body[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A server with the default flags. Each test has its own: a process outliving the test
/// binary (as a static would) would hold its output pipe open.
fn server() -> Server {
    Server::start(&["--max-body-bytes", "65536"])
}

fn ask(question: &str) -> Value {
    json!({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}], "temperature": 0})
}

#[test]
fn health_answers_and_echoes_the_request_id() {
    let s = server();
    let r = s.request("GET", "/health", &[("x-request-id", "abc-123")], None);
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    let r = s.request("GET", "/health", &[], None);
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
}

#[test]
fn chat_completion_answers_like_transformers() {
    let s = server();
    let r = s.post("/v1/chat/completions", ask("What is the capital of France?"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "HuggingFaceTB/SmolLM2-135M-Instruct@main");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "The capital of France is Paris."})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45})
    );
    assert_eq!(r.header("x-request-id"), v["id"].as_str());
}

#[test]
fn streamed_chat_reassembles_to_the_same_text_and_ends_with_done() {
    let s = server();
    let mut body = ask("What is 2+2?");
    body["max_tokens"] = json!(20);
    let whole = s.post("/v1/chat/completions", body.clone()).json();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream; charset=utf-8"));
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &whole["choices"][0]["finish_reason"]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"]);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

#[test]
fn stop_strings_n_and_logprobs_work_over_http() {
    let s = server();
    let mut body = ask("What is the capital of France?");
    body["stop"] = json!([" Paris"]);
    body["n"] = json!(2);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let v = s.post("/v1/chat/completions", body).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for c in choices {
        assert_eq!(c["message"]["content"], "The capital of France is");
        assert_eq!(c["finish_reason"], "stop");
        let lp = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lp[0]["token"], "The");
        assert!(lp[0]["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn text_completions_work_streamed_and_not() {
    let s = server();
    let body = json!({"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0});
    let v = s.post("/v1/completions", body.clone()).json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = s.post("/v1/completions", streamed);
    let events = r.events();
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(joined, text);
    let echo = s
        .post(
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 2, "echo": true}),
        )
        .json();
    assert!(echo["choices"][0]["text"].as_str().unwrap().starts_with("Hello"));
}

#[test]
fn models_tokenize_and_metrics_routes_answer() {
    let s = server();
    let models = s.request("GET", "/v1/models", &[], None).json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(models["data"][0]["loaded"], true);
    // A pinned server lists its model alone (other cached models are not served).
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
    let one = s.request("GET", "/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct", &[], None);
    assert_eq!(one.status, 200);
    assert_eq!(s.request("GET", "/v1/models/nobody/nothing", &[], None).status, 404);
    let t = s.post("/tokenize", json!({"prompt": "Hello world"})).json();
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    let d = s.post("/detokenize", json!({"tokens": t["tokens"]})).json();
    assert_eq!(d["prompt"], "Hello world");
    let m = s.request("GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("inferd_kv_blocks_total{model=\"HuggingFaceTB/SmolLM2-135M-Instruct@main\"} 256"),
        "{}",
        m.body
    );
    assert!(m
        .body
        .contains("inferd_requests_total{route=\"/v1/models\",status=\"200\"}"));
}

/// (body, status, param) for each bad request.
#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = server();
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{bad".into(), 400, None),
        ("[1, 2]".into(), 400, None),
        (json!({"messages": []}).to_string(), 400, Some("messages")),
        (json!({"model": "x"}).to_string(), 400, Some("messages")),
        (json!({"messages": "hi"}).to_string(), 400, Some("messages")),
        (
            json!({"messages": [{"content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}).to_string(),
            400,
            Some("frobnicate"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "generation_config": "{not json"}).to_string(),
            400,
            Some("generation_config"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tools": {"type": "function"}}).to_string(),
            400,
            Some("tools"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}).to_string(),
            400,
            Some("tool_choice"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}})
                .to_string(),
            400,
            Some("stream_options"),
        ),
        // 256 blocks of 16 tokens: this prompt does not fit.
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(5000)}]}).to_string(),
            422,
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x".repeat(70_000)}]}).to_string(),
            413,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let r = s.request("POST", "/v1/chat/completions", &[], Some(&body));
        assert_eq!(r.status, status, "{}: {}", &body[..body.len().min(80)], r.body);
        let e = &r.json()["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.body);
        assert!(e["type"].is_string());
        assert_eq!(e["param"].as_str(), param, "{}", r.body);
    }
    assert_eq!(s.request("GET", "/v1/chat/completions", &[], None).status, 405);
    assert_eq!(s.request("POST", "/v1/nothing", &[], Some("{}")).status, 404);
    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": "a", "suffix": "b"}), "suffix"),
        (
            "/v1/completions",
            json!({"prompt": "a", "echo": true, "logprobs": 21}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": 0}),
            "parallel_tool_calls",
        ),
    ] {
        let r = s.post(path, body);
        assert_eq!(
            (r.status, r.json()["error"]["param"].clone()),
            (400, json!(param)),
            "{}",
            r.body
        );
    }
}

#[test]
fn api_keys_and_a_full_queue_are_enforced() {
    let s = Server::start(&["--api-key", "sekret", "--max-waiting", "0", "--enable-cors"]);
    assert_eq!(
        s.request("GET", "/health", &[], None).status,
        200,
        "health needs no key"
    );
    let r = s.request("GET", "/v1/models", &[], None);
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (401, json!("authentication_error"))
    );
    assert_eq!(
        s.request("GET", "/v1/models", &[("authorization", "Bearer wrong")], None)
            .status,
        401
    );
    let ok = s.request("GET", "/v1/models", &[("authorization", "Bearer sekret")], None);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("access-control-allow-origin"), Some("*"));
    let pre = s.request("OPTIONS", "/v1/chat/completions", &[("origin", "http://x")], None);
    assert_eq!(pre.status, 204);
    let body = ask("hi").to_string();
    let full = s.request(
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer sekret")],
        Some(&body),
    );
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.header("retry-after"), Some("1"));
}

#[test]
fn clients_that_disconnect_mid_stream_leave_nothing_running() {
    let s = Server::start(&[]);
    // No max_tokens and EOS ignored: only cancellation can stop these sequences early.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "ignore_eos": true, "stream": true})
    .to_string();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).unwrap();
        // Read until a few events have arrived, then hang up.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        drop(stream);
    }
    let generated = |m: &str| -> u64 {
        let line = m
            .lines()
            .find(|l| l.starts_with("inferd_engine_tokens_generated_total{"))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let m = s.request("GET", "/metrics", &[], None).body;
        let model = "{model=\"HuggingFaceTB/SmolLM2-135M-Instruct@main\"}";
        if m.contains(&format!("inferd_sequences_running{model} 0\n"))
            && m.contains(&format!("inferd_kv_blocks_used{model} 0\n"))
        {
            break generated(&m);
        }
        assert!(Instant::now() < deadline, "sequences left running:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each stream was cut after a couple of tokens; uncancelled, they would each run to
    // the 4096-token window.
    assert!(settled < 50 * 40, "{settled} tokens generated for 50 cut streams");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        generated(&s.request("GET", "/metrics", &[], None).body),
        settled,
        "generation went on"
    );
}

/// SIGTERM during a streamed reply: the server stops accepting connections at once, the
/// reply in flight runs to its end (`data: [DONE]`) within the grace period, and the
/// process exits with status 0.
#[test]
fn sigterm_drains_the_streams_in_flight_then_exits_cleanly() {
    let mut s = Server::start(&["--shutdown-grace-secs", "120"]);
    let port = s.port;
    let tokens = 128;
    let reply = std::thread::spawn(move || {
        Server::request_port(
            port,
            "POST",
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": tokens, "ignore_eos": true, "stream": true, "temperature": 0}),
        )
    });
    // Once the reply is being generated (its KV blocks are in use), send SIGTERM.
    let start = Instant::now();
    loop {
        let metrics = s.request("GET", "/metrics", &[], None).body;
        if metrics
            .lines()
            .any(|l| l.starts_with("inferd_kv_blocks_used") && !l.ends_with(" 0"))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the reply never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", s.pid())])
        .status()
        .unwrap();
    assert!(killed.success());
    // New connections are refused soon after.
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still accepting connections after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The reply in flight ends whole.
    let r = reply.join().unwrap();
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let with_content = events.iter().filter(|e| e.contains("\"content\"")).count();
    assert!(
        with_content >= tokens / 2,
        "{with_content} content chunks of {tokens} tokens: {events:?}"
    );
    let status = s
        .wait_exit(Duration::from_secs(60))
        .expect("the server exits after draining");
    assert!(status.success(), "exit status {status}");
}

/// SIGTERM with a reply that cannot finish within --shutdown-grace-secs: the process
/// still exits (status 0) once the grace period is over, the reply is cut (no [DONE]) and
/// the log says how many connections were closed.
#[test]
fn sigterm_exits_when_the_grace_period_ends_even_with_streams_running() {
    let mut s = Server::start(&["--shutdown-grace-secs", "1"]);
    let port = s.port;
    // Raw bytes: a cut reply is not a well-formed chunked body.
    let reply = std::thread::spawn(move || {
        let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                          "max_tokens": 4000, "ignore_eos": true, "stream": true})
        .to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    });
    let start = Instant::now();
    while !s
        .request("GET", "/metrics", &[], None)
        .body
        .lines()
        .any(|l| l.starts_with("inferd_kv_blocks_used") && !l.ends_with(" 0"))
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the reply never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.signal("TERM");
    let signalled = Instant::now();
    let status = s.wait_exit(Duration::from_secs(30)).expect("the server exits");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 1 s grace period"
    );
    let log = s.log_lines().join("\n");
    assert!(log.contains("closing 1 connections still open"), "{log}");
    let raw = reply.join().unwrap();
    assert!(raw.starts_with("HTTP/1.1 200") && raw.contains("data: {"), "{raw}");
    assert!(!raw.contains("[DONE]"), "the reply was not cut");
}
