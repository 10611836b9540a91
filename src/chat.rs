//! `inferd chat`: an interactive terminal chat against any OpenAI-compatible server (a
//! local `inferd serve` is started when no URL is given). It loads the model through
//! `/load_model` and draws the stages as progress bars, streams replies token by token,
//! keeps the conversation, and takes slash commands. Ctrl-C stops the reply being
//! streamed, not the program.

use std::error::Error;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::StatusCode;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::client::{self, Connection, Target};

pub struct ChatOptions {
    /// A running server; `None` starts `inferd serve` here.
    pub url: Option<String>,
    /// `None`: the server's first loaded model (or first listed one).
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub system: Option<String>,
}

const HELP: &str = "commands:
  /help               this list
  /clear              forget the conversation
  /model NAME         load NAME and talk to it
  /image PATH|URL     attach an image (a file, sent inline, or an http(s) URL) to your
                      next message, for vision-language models
  /set KEY=VALUE      a request field for every reply (JSON value, e.g. temperature=0.7,
                      max_tokens=200, stop=[\"\\n\"]; KEY=null removes it); /set alone lists them
  /save FILE          write the conversation and settings as JSON
  /exit               quit (Ctrl-D too)
Ctrl-C stops the reply being written.";

/// A local server, stopped with the chat.
struct LocalServer(Child);

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_local_server() -> Result<(LocalServer, String), Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", "--port", "0", "--log-level", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr from the local server")?;
    let server = LocalServer(child);
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining the server's stderr so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(" on http://") => {
                let url = line.rsplit(" on ").next().unwrap_or_default().trim().to_owned();
                return Ok((server, url));
            }
            Ok(line) if line.starts_with("error") => return Err(line.into()),
            Ok(_) => {}
            Err(_) => return Err("the local server did not start".into()),
        }
    }
}

pub fn run(options: ChatOptions) -> Result<(), Box<dyn Error>> {
    let (_local, url) = match &options.url {
        Some(url) => (None, url.clone()),
        None => {
            let (server, url) = start_local_server()?;
            (Some(server), url)
        }
    };
    let target = Target::parse(&url)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(Session::new(target, options).run())
}

struct Session {
    target: Target,
    api_key: Option<String>,
    model: String,
    system: Option<String>,
    messages: Vec<Value>,
    params: Map<String, Value>,
    /// `/image` URLs for the next user message.
    images: Vec<String>,
    conn: Option<Connection>,
}

/// An image for a message: an http(s) URL as is, a file as a `data:` URL.
fn image_url(arg: &str) -> Result<String, String> {
    if arg.starts_with("http://") || arg.starts_with("https://") || arg.starts_with("data:") {
        return Ok(arg.to_owned());
    }
    let bytes = std::fs::read(arg).map_err(|e| format!("{arg}: {e}"))?;
    let mime = match bytes.as_slice() {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xff, 0xd8, 0xff, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        _ => return Err(format!("{arg}: not a PNG, JPEG, GIF or WebP file")),
    };
    use base64::Engine as _;
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

impl Session {
    fn new(target: Target, options: ChatOptions) -> Self {
        let mut session = Session {
            target,
            api_key: options.api_key,
            model: options.model.unwrap_or_default(),
            system: options.system,
            messages: Vec::new(),
            params: Map::new(),
            images: Vec::new(),
            conn: None,
        };
        session.clear();
        session
    }

    fn clear(&mut self) {
        self.images.clear();
        self.messages = self
            .system
            .iter()
            .map(|s| json!({"role": "system", "content": s}))
            .collect();
    }

    /// POSTs `body` to `path` (GETs without one) on the kept connection, reopened when
    /// the server closed it.
    async fn request(&mut self, path: &str, body: Option<Bytes>) -> Result<(StatusCode, Incoming), String> {
        // (A person types slower than servers keep idle connections: uvicorn closes
        // them after 5 s.)
        let kept = match self.conn.take() {
            Some(mut c) => c.is_ready().await.then_some(c),
            None => None,
        };
        let conn = match kept {
            Some(c) => self.conn.insert(c),
            None => self.conn.insert(Connection::open(&self.target).await?),
        };
        client::send(conn, &self.target, path, self.api_key.as_deref(), body).await
    }

    async fn run(mut self) -> Result<(), Box<dyn Error>> {
        let mut interrupts = signal(SignalKind::interrupt())?;
        if self.model.is_empty() {
            self.model = self.default_model().await?;
        }
        let model = self.model.clone();
        if self.load(&model).await.is_err() {
            return Err(format!("cannot load {model}").into());
        }
        println!(
            "chatting with {} at {} (/help for commands)",
            self.model, self.target.authority
        );
        let lines = stdin_lines();
        let mut lines = lines;
        loop {
            print!("> ");
            std::io::stdout().flush()?;
            let line = tokio::select! {
                line = lines.recv() => line,
                _ = interrupts.recv() => {
                    println!("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits)");
                    continue;
                }
            };
            let Some(line) = line else {
                println!();
                return Ok(()); // end of input
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(command) = line.strip_prefix('/') {
                if !self.command(command).await? {
                    return Ok(());
                }
                continue;
            }
            let content = if self.images.is_empty() {
                json!(line)
            } else {
                let mut parts: Vec<Value> = self
                    .images
                    .drain(..)
                    .map(|url| json!({"type": "image_url", "image_url": {"url": url}}))
                    .collect();
                parts.push(json!({"type": "text", "text": line}));
                Value::Array(parts)
            };
            self.messages.push(json!({"role": "user", "content": content}));
            self.reply(&mut interrupts).await;
        }
    }

    /// Handles `/command`; false means quit.
    async fn command(&mut self, command: &str) -> Result<bool, Box<dyn Error>> {
        let (name, arg) = command.split_once(' ').unwrap_or((command, ""));
        let arg = arg.trim();
        match name {
            "exit" | "quit" => return Ok(false),
            "help" => println!("{HELP}"),
            "clear" => {
                self.clear();
                println!("(conversation cleared)");
            }
            "model" if !arg.is_empty() => {
                if self.load(arg).await.is_ok() {
                    self.model = arg.to_owned();
                }
            }
            "image" if !arg.is_empty() => match image_url(arg) {
                Ok(url) => {
                    self.images.push(url);
                    println!("(image {} attached to your next message)", self.images.len());
                }
                Err(e) => println!("error: {e}"),
            },
            "set" if arg.is_empty() => println!("{}", Value::Object(self.params.clone())),
            "set" => match arg.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    let key = key.trim().to_owned();
                    let value = value.trim();
                    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
                    if value.is_null() {
                        self.params.remove(&key);
                    } else {
                        self.params.insert(key, value);
                    }
                }
                _ => println!("usage: /set KEY=VALUE"),
            },
            "save" if !arg.is_empty() => {
                let doc = json!({"model": self.model, "settings": self.params, "messages": self.messages});
                match std::fs::write(arg, serde_json::to_string_pretty(&doc)? + "\n") {
                    Ok(()) => println!("(saved to {arg})"),
                    Err(e) => println!("error: {arg}: {e}"),
                }
            }
            _ => println!("unknown command /{command} (/help lists them)"),
        }
        Ok(true)
    }

    /// The server's first loaded model, else its first listed one.
    async fn default_model(&mut self) -> Result<String, Box<dyn Error>> {
        let (status, body) = self.request("/v1/models", None).await?;
        let body = client::read_all(body).await?;
        if !status.is_success() {
            return Err(format!("GET /v1/models: {}", error_message(&body)).into());
        }
        let list: Value = serde_json::from_slice(&body)?;
        let models = list["data"].as_array().cloned().unwrap_or_default();
        let pick = models.iter().find(|m| m["loaded"] == true).or(models.first());
        match pick.and_then(|m| m["id"].as_str()) {
            Some(id) => Ok(id.to_owned()),
            None => Err("the server lists no model: name one (`inferd chat ORG/NAME`)".into()),
        }
    }

    /// `/load_model`, drawn as progress bars. A server without the route loads on the
    /// first request instead.
    async fn load(&mut self, model: &str) -> Result<(), ()> {
        let start = Instant::now();
        let body = Bytes::from(json!({"model": model}).to_string());
        let (status, mut body) = match self.request("/load_model", Some(body)).await {
            Ok(reply) => reply,
            Err(e) => {
                println!("error: {e}");
                return Err(());
            }
        };
        if status.as_u16() == 404 {
            return Ok(());
        }
        if !status.is_success() {
            let text = client::read_all(body).await.unwrap_or_default();
            println!("error: {}", error_message(&text));
            return Err(());
        }
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(100));
        let mut stage = String::new();
        // What each stage reached, for the line that stays once the bar is gone.
        let mut seen: Vec<(String, Option<(u64, u64)>)> = Vec::new();
        let mut outcome: Result<String, String> = Err("the server closed the stream".into());
        let read = client::read_events(&mut body, |data| {
            let Ok(event) = serde_json::from_slice::<Value>(data) else {
                return true;
            };
            match event["status"].as_str() {
                Some("loading") => {
                    let now = event["stage"].as_str().unwrap_or_default().to_owned();
                    let (current, total) = (
                        event["progress"]["current"].as_u64(),
                        event["progress"]["total"].as_u64(),
                    );
                    if now != stage {
                        stage = now;
                        let template = match stage.as_str() {
                            "download" => "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                            "weights" => "{spinner} {msg} [{bar:30}] {pos}/{len} tensors",
                            _ => "{spinner} {msg}",
                        };
                        if let Ok(style) = ProgressStyle::with_template(template) {
                            bar.set_style(style.progress_chars("=> "));
                        }
                        bar.set_message(format!("{model}: {stage}"));
                    }
                    if let (Some(current), Some(total)) = (current, total) {
                        bar.set_length(total);
                        bar.set_position(current);
                    }
                    match seen.last_mut() {
                        Some((name, counts)) if *name == stage => *counts = current.zip(total),
                        _ => seen.push((stage.clone(), current.zip(total))),
                    }
                    true
                }
                Some("ready") => {
                    let name = event["model"].as_str().unwrap_or(model);
                    outcome = Ok(if event["cached"].as_bool() == Some(true) {
                        format!("{name} ready (already loaded)")
                    } else {
                        let stages: Vec<String> = seen
                            .iter()
                            .map(|(stage, counts)| match (stage.as_str(), counts) {
                                ("download", Some((done, _))) => format!("download {:.1} MB", *done as f64 / 1e6),
                                (_, Some((done, total))) => format!("{stage} {done}/{total}"),
                                (_, None) => stage.clone(),
                            })
                            .collect();
                        format!(
                            "{name} loaded in {:.1} s ({})",
                            start.elapsed().as_secs_f64(),
                            stages.join(", ")
                        )
                    });
                    false
                }
                _ => {
                    outcome = Err(event["message"].as_str().unwrap_or("the load failed").to_owned());
                    false
                }
            }
        })
        .await;
        bar.finish_and_clear();
        match (read, outcome) {
            (Ok(()), Ok(line)) => {
                println!("{line}");
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => {
                println!("error: {e}");
                Err(())
            }
        }
    }

    /// Streams one reply; Ctrl-C stops it (what came so far stays in the conversation).
    async fn reply(&mut self, interrupts: &mut tokio::signal::unix::Signal) {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), Value::Array(self.messages.clone()));
        body.extend(self.params.clone());
        body.insert("stream".into(), json!(true));
        let body = Bytes::from(Value::Object(body).to_string());
        let (status, mut stream) = match self.request("/v1/chat/completions", Some(body)).await {
            Ok(reply) => reply,
            Err(e) => {
                self.conn = None;
                self.messages.pop();
                println!("error: {e}");
                return;
            }
        };
        if !status.is_success() {
            let text = client::read_all(stream).await.unwrap_or_default();
            self.messages.pop();
            println!("error: {}", error_message(&text));
            return;
        }
        let mut text = String::new();
        let mut failure = None;
        let stopped = {
            let read = client::read_events(&mut stream, |data| {
                if data == b"[DONE]" {
                    return false;
                }
                let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
                    return true;
                };
                if chunk.get("error").is_some() {
                    failure = Some(error_message(data));
                    return false;
                }
                if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(piece);
                    print!("{piece}");
                    let _ = std::io::stdout().flush();
                }
                true
            });
            tokio::select! {
                result = read => result.err().map(|e| (false, Some(e))).unwrap_or((false, None)),
                _ = interrupts.recv() => (true, None),
            }
        };
        let (stopped, read_error) = stopped;
        if read_error.is_some() {
            failure = read_error;
        }
        if stopped {
            // Dropping the stream closes the connection, which cancels the request.
            drop(stream);
            self.conn = None;
            println!(" [stopped]");
        } else {
            println!();
        }
        if let Some(e) = failure {
            println!("error: {e}");
        }
        if text.is_empty() {
            self.messages.pop();
        } else {
            self.messages.push(json!({"role": "assistant", "content": text}));
        }
    }
}

/// The `message` of an OpenAI-shaped error body, or the body itself.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// Lines of standard input, read on their own thread; the channel closes at EOF.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
