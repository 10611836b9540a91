//! A small client for OpenAI-compatible servers, for `inferd bench` and `inferd chat`:
//! plain HTTP/1.1 keep-alive connections (hyper's client connection API, no pool
//! crate), one request at a time per connection, server-sent events read as they
//! arrive, and the timing of a completion's events.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// `http://host:port` split up (TLS is not supported: benchmark a server directly).
#[derive(Debug, Clone)]
pub struct Target {
    pub authority: String,
    pub base_path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--url {url}: only http:// URLs are supported"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(format!("--url {url}: no host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let base_path = format!("/{}", path.trim_end_matches('/'));
        Ok(Target {
            authority,
            base_path: base_path.trim_end_matches('/').to_owned(),
        })
    }
}

pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(target: &Target) -> Result<Connection, String> {
        let stream = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {} failed: {e}", target.authority))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender })
    }

    /// Whether the server kept the connection open for another request.
    pub fn is_reusable(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Whether the connection can take a request now: false when the server closed it
    /// since (an idle keep-alive timeout), which `is_reusable` may not have seen yet.
    pub async fn is_ready(&mut self) -> bool {
        !self.sender.is_closed() && self.sender.ready().await.is_ok()
    }
}

/// Why a completion request produced no outcome.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    /// Nothing came back (the connection failed as the request left): the request can
    /// be sent again on another connection.
    pub before_reply: bool,
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub error: Option<String>,
    /// Seconds from sending to the first generated text (the whole reply when not streaming).
    pub ttft: Option<f64>,
    /// Seconds between successive text-carrying events.
    pub itl: Vec<f64>,
    pub latency: f64,
    /// Events that carried generated text.
    pub chunks: usize,
    /// From the server's `usage` when it sends one.
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(default)]
    choices: Vec<FrameChoice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct FrameChoice {
    delta: Option<Delta>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    tool_calls: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

impl Frame {
    fn carries_text(&self) -> bool {
        self.choices.iter().any(|c| {
            c.text.as_deref().is_some_and(|t| !t.is_empty())
                || c.delta.as_ref().is_some_and(|d| {
                    d.content.as_deref().is_some_and(|t| !t.is_empty())
                        || d.reasoning_content.as_deref().is_some_and(|t| !t.is_empty())
                        || d.tool_calls.is_some()
                })
        })
    }
}

/// POSTs a JSON `body` to `path` (a GET without one); the reply's status and its
/// unread body.
pub async fn send(
    conn: &mut Connection,
    target: &Target,
    path: &str,
    api_key: Option<&str>,
    body: Option<Bytes>,
) -> Result<(StatusCode, Incoming), String> {
    let method = if body.is_some() { "POST" } else { "GET" };
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{}{path}", target.base_path))
        .header("host", &target.authority)
        .header("content-type", "application/json");
    if let Some(key) = api_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    conn.sender.ready().await.map_err(|e| e.to_string())?;
    let response = conn.sender.send_request(request).await.map_err(|e| e.to_string())?;
    Ok((response.status(), response.into_body()))
}

/// The whole body.
pub async fn read_all(body: Incoming) -> Result<Bytes, String> {
    Ok(body.collect().await.map_err(|e| e.to_string())?.to_bytes())
}

/// Calls `each` with every `data:` payload of an event stream, as it arrives, until the
/// stream ends or `each` returns false.
pub async fn read_events(body: &mut Incoming, mut each: impl FnMut(&[u8]) -> bool) -> Result<(), String> {
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        // Events end with a blank line; handle every complete one.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            for line in event.split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data:") {
                    if !each(data.trim_ascii()) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// POSTs a completion request and times the reply; a transport failure is an `Err` (the
/// connection is then unusable), an error answer is an `Outcome` with `error` set.
pub async fn timed_completion(
    conn: &mut Connection,
    target: &Target,
    path: &str,
    api_key: Option<&str>,
    body: Bytes,
    stream: bool,
) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let (status, mut body) = send(conn, target, path, api_key, Some(body))
        .await
        .map_err(|message| Failure {
            message,
            before_reply: true,
        })?;
    let after_reply = |message: String| Failure {
        message,
        before_reply: false,
    };
    let mut outcome = Outcome::default();
    if !status.is_success() || !stream {
        let bytes = read_all(body).await.map_err(after_reply)?;
        outcome.latency = start.elapsed().as_secs_f64();
        if !status.is_success() {
            outcome.error = Some(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            return Ok(outcome);
        }
        match serde_json::from_slice::<Frame>(&bytes) {
            Ok(frame) => {
                outcome.ttft = Some(outcome.latency);
                outcome.chunks = 1;
                if let Some(u) = frame.usage {
                    outcome.prompt_tokens = u.prompt_tokens;
                    outcome.completion_tokens = u.completion_tokens;
                }
            }
            Err(e) => outcome.error = Some(format!("unreadable reply: {e}")),
        }
        return Ok(outcome);
    }
    let mut last_text: Option<Instant> = None;
    read_events(&mut body, |data| {
        // (transformers serve ends its streams without `[DONE]`: not required.)
        if data == b"[DONE]" {
            return true;
        }
        let now = Instant::now();
        let Ok(frame) = serde_json::from_slice::<Frame>(data) else {
            outcome.error = Some(format!("unreadable event: {}", String::from_utf8_lossy(data)));
            return true;
        };
        if let Some(e) = frame.error.as_ref() {
            outcome.error = Some(format!("error event: {e}"));
        }
        if let Some(u) = frame.usage.as_ref() {
            outcome.prompt_tokens = u.prompt_tokens;
            outcome.completion_tokens = u.completion_tokens;
        }
        if frame.carries_text() {
            outcome.chunks += 1;
            match last_text {
                None => outcome.ttft = Some((now - start).as_secs_f64()),
                Some(prev) => outcome.itl.push((now - prev).as_secs_f64()),
            }
            last_text = Some(now);
        }
        true
    })
    .await
    .map_err(after_reply)?;
    outcome.latency = start.elapsed().as_secs_f64();
    Ok(outcome)
}
