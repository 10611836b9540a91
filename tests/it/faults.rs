//! Clients that misbehave at the connection level: half-sent request heads and bodies,
//! idle keep-alive connections, and a client that stops reading a stream. Each is cut
//! off within its timeout, and no one else notices.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use super::common::tiny_chat_model;
use super::server::Server;

/// The sum of a metric's series in a `/metrics` page (every model's).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until no sequence runs and no KV block is used; panics after `within`.
pub fn wait_idle(s: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = s.request("GET", "/metrics", &[], None).body;
        if metric(&m, "inferd_sequences_running") == 0.0
            && metric(&m, "inferd_kv_blocks_used") == 0.0
            && metric(&m, "inferd_requests_waiting") == 0.0
        {
            return;
        }
        assert!(Instant::now() < deadline, "the engine did not go idle:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the server closes the connection (or `within` passes): what came, and
/// how long the close took.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    stream.set_read_timeout(Some(within)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open ({e}) after {:?}", start.elapsed()),
        }
    }
    (seen, start.elapsed())
}

fn chat(tokens: usize, stream: bool) -> String {
    json!({"messages": [{"role": "user", "content": "Tell me a story."}],
           "max_tokens": tokens, "ignore_eos": true, "stream": stream})
    .to_string()
}

/// A half-sent head is closed after --read-timeout-secs, a half-sent body gets 408, an
/// idle keep-alive connection is closed after as long; meanwhile requests beside them
/// are answered at once.
#[test]
fn half_sent_requests_and_idle_connections_are_closed_after_the_read_timeout() {
    let model = tiny_chat_model("faults-read");
    let s = Server::start_model(
        model.to_str().unwrap(),
        &["--load-format", "dummy", "--read-timeout-secs", "1"],
    );

    let mut half_head = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    half_head
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: app")
        .unwrap();

    let body = chat(4, false);
    let mut half_body = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    half_body
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                body.len(),
                &body[..body.len() / 2]
            )
            .as_bytes(),
        )
        .unwrap();

    let mut idle = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut first = [0u8; 4096];
    let n = idle.read(&mut first).unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );

    // Requests beside them are served while they hang.
    let start = Instant::now();
    for _ in 0..5 {
        let r = s.post("/v1/chat/completions", serde_json::from_str(&chat(4, false)).unwrap());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());

    for (name, stream) in [("half head", &mut half_head), ("idle keep-alive", &mut idle)] {
        let (rest, after) = read_until_closed(stream, Duration::from_secs(10));
        assert!(after < Duration::from_secs(5), "{name}: closed after {after:?}");
        // hyper closes a connection whose head never came without a reply.
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{name}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    let (reply, after) = read_until_closed(&mut half_body, Duration::from_secs(10));
    assert!(after < Duration::from_secs(5), "half body: closed after {after:?}");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        reply.contains("\"type\":\"invalid_request_error\"") && reply.contains("stopped arriving"),
        "{reply}"
    );
}

/// A client that stops reading a stream fills its socket and the stream's bounded buffer;
/// it does not slow the engine or other streams, and after --write-timeout-secs without
/// progress its connection is closed and its request cancelled (its KV blocks freed),
/// though it never read again.
#[test]
fn a_client_that_stops_reading_is_cut_off_without_slowing_anyone() {
    let model = tiny_chat_model("faults-write");
    let s = Server::start_model(
        model.to_str().unwrap(),
        // A context window (16 384 tokens) with room for the 12 000 asked for.
        &[
            "--load-format",
            "dummy",
            "--write-timeout-secs",
            "2",
            "--num-blocks",
            "1024",
        ],
    );
    // A small receive buffer, so that the stall shows after a few hundred kB.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut stalled = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], s.port).into()).await.unwrap();
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    });
    // Fat events (20 alternatives each) and far more of them than the socket holds.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 12000, "ignore_eos": true, "stream": true,
                      "logprobs": true, "top_logprobs": 20})
    .to_string();
    stalled
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();

    // While it stalls, other streams run at their usual pace.
    let start = Instant::now();
    for _ in 0..5 {
        let r = s.post("/v1/chat/completions", serde_json::from_str(&chat(32, true)).unwrap());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    }
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());

    // The stalled request is cancelled long before its 12 000 tokens, without a read.
    wait_idle(&s, Duration::from_secs(30));
    let m = s.request("GET", "/metrics", &[], None).body;
    let generated = metric(&m, "inferd_engine_tokens_generated_total");
    assert!(
        generated < 12000.0,
        "{generated} tokens generated: the stall was not noticed"
    );

    // What it finally reads is a cut stream: no [DONE].
    let (seen, _) = read_until_closed(&mut stalled, Duration::from_secs(10));
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 200"), "{}", &seen[..seen.len().min(200)]);
    assert!(!seen.contains("data: [DONE]"), "the stream was not cut");
    let log = s.log_lines().join("\n");
    assert!(log.contains("accepted no data"), "{log}");
}

/// Request heads over hyper's limits (about 400 KiB, or more than 100 headers) are
/// answered 431 and the connection closed; the server answers the next request.
#[test]
fn oversized_request_heads_get_431() {
    let model = tiny_chat_model("faults-heads");
    let s = Server::start_model(model.to_str().unwrap(), &["--load-format", "dummy"]);
    let huge = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let many = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..150).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()
    );
    // A reset may beat the 431 to a client still writing its 1 MiB (then nothing is read).
    for (name, head, may_reset) in [("one 1 MiB header", huge, true), ("150 headers", many, false)] {
        let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        // The server may stop reading (and reset) before the whole head is written.
        let _ = stream.write_all(head.as_bytes());
        let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(10));
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("HTTP/1.1 431") || (may_reset && reply.is_empty()),
            "{name}: {}",
            &reply[..reply.len().min(200)]
        );
    }
    assert_eq!(s.request("GET", "/health", &[], None).status, 200);
}
