//! `inferd bench` sessions: a sweep against a live server finds its knee; goodput counts
//! only the requests within the targets (against a fake server whose latencies are
//! known); side by side against inferd and a slow fake server; the HTML report renders
//! in headless Chromium with its plots; output to a pipe has no progress frames.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::common::scratch_dir;
use super::server::Server;

/// A streaming `/v1/completions` server whose n-th request (from 0) waits `ttft_ms(n)`
/// before its first token and `itl_ms` before each next one; replies are `max_tokens`
/// long, with a usage frame.
struct FakeServer {
    port: u16,
    served: Arc<AtomicUsize>,
}

impl FakeServer {
    fn start(ttft_ms: fn(usize) -> u64, itl_ms: u64) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &count, ttft_ms, itl_ms);
                });
            }
        });
        FakeServer { port, served }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Answers one request on its own connection: a GET (bench asks for `/version`) with
/// a 404, a POST with a stream, counted.
fn answer(stream: TcpStream, count: &AtomicUsize, ttft_ms: fn(usize) -> u64, itl_ms: u64) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    if !request_line.starts_with("POST ") {
        let mut out = stream;
        return out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let ttft_ms = ttft_ms(count.fetch_add(1, Ordering::SeqCst));
    if ttft_ms == REFUSE {
        let mut out = stream;
        let body = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
        return write!(
            out,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let Some(body) = read_body(&mut reader)? else {
        return Ok(());
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let tokens = request["max_tokens"].as_u64().unwrap_or(1).max(1);
    let mut out = stream;
    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")?;
    std::thread::sleep(Duration::from_millis(ttft_ms));
    for i in 0..tokens {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(itl_ms));
        }
        out.write_all(b"data: {\"choices\":[{\"index\":0,\"text\":\"x\"}]}\n\n")?;
        out.flush()?;
    }
    let usage =
        format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":{tokens}}}}}\n\n");
    out.write_all(usage.as_bytes())?;
    out.write_all(b"data: [DONE]\n\n")?;
    out.flush()
}

/// A fake server's TTFT that refuses the request with a 503 instead.
const REFUSE: u64 = u64::MAX;

/// Reads one request's header lines and its body (by Content-Length); `None` when the
/// connection closed, or stayed idle past its read timeout, first.
fn read_body(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return Ok(None);
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inferd"))
        .arg("bench")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `inferd bench ARGS --quiet --json FILE` (in a fresh scratch folder), which must
/// succeed: its stdout and its JSON document.
fn session(name: &str, args: &[&str]) -> (String, Value) {
    let json = scratch_dir(name).join("r.json");
    let out = bench(&[args, &["--quiet", "--json", json.to_str().unwrap()]].concat());
    (ok(&out), read_json(&json))
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn goodput_counts_only_the_requests_within_the_targets() {
    // Every other request is slow to start: 10 ms, then 150 ms, then 10 ms...
    let fake = FakeServer::start(|n| if n % 2 == 0 { 10 } else { 150 }, 5);
    let url = fake.url();
    let to_fake = ["--url", url.as_str(), "--model", "fake", "--warmup", "0"];
    let slo = ["--slo", "ttft=80ms,itl:p50=40ms", "--api-key", "sk-secret"];
    let (stdout, doc) = session(
        "bench-goodput",
        &[&to_fake[..], &["--num-requests", "10", "--output-len", "4"], &slo].concat(),
    );
    assert!(
        stdout.contains("5/10 requests within targets; targets missed"),
        "{stdout}"
    );
    let run = &doc["targets"][0]["runs"][0];
    let g = &run["goodput"];
    assert_eq!(
        (g["good_requests"].as_u64(), g["fraction"].as_f64()),
        (Some(5), Some(0.5)),
        "{g}"
    );
    // Goodput is the good half of the run's request rate and output tokens.
    let rps = run["requests_per_s"].as_f64().unwrap();
    assert!(
        (g["requests_per_s"].as_f64().unwrap() - rps / 2.0).abs() < 1e-9,
        "{run}"
    );
    assert!(
        (g["output_tokens_per_s"].as_f64().unwrap() - 4.0 * rps / 2.0).abs() < 1e-6,
        "{run}"
    );
    // Judged as a run: p90 TTFT is a slow request's (over 80 ms), p50 ITL about 5 ms.
    let checks = g["checks"].as_array().unwrap();
    assert_eq!(checks[0]["target"]["metric"], "ttft");
    assert!(checks[0]["observed_ms"].as_f64().unwrap() >= 140.0 && checks[0]["met"] == false);
    assert!(checks[1]["observed_ms"].as_f64().unwrap() < 40.0 && checks[1]["met"] == true);
    assert_eq!(g["met"], false);
    assert_eq!(doc["slo"][0]["limit_ms"], 80.0);
    // The command is recorded, the key in it hidden.
    let command = doc["command"].to_string();
    assert!(
        command.contains("\"--api-key\",\"***\"") && !command.contains("sk-secret"),
        "{command}"
    );
    assert_eq!(fake.served.load(Ordering::SeqCst), 10);
    assert_eq!(doc["targets"][0]["server_version"], Value::Null);
    // A target the server cannot meet counts none; a bad spec is refused.
    let (stdout, _) = session(
        "bench-goodput-none",
        &[
            &to_fake[..],
            &["--num-requests", "2", "--output-len", "2", "--slo", "latency=1ms"],
        ]
        .concat(),
    );
    assert!(stdout.contains("0/2 requests within targets"), "{stdout}");
    let out = bench(&["--url", &url, "--model", "fake", "--slo", "speed=1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown measure `speed`"));
}

#[test]
fn sweep_against_a_live_server_finds_the_knee() {
    // Two sequences at a time: all at once, requests queue and latency leaves its floor.
    let s = Server::start(&["--max-num-seqs", "2"]);
    let url = format!("http://127.0.0.1:{}", s.port);
    let (stdout, doc) = session(
        "bench-sweep",
        &[
            "--url",
            &url,
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--sweep",
            "4",
            "--num-requests",
            "12",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--warmup",
            "1",
        ],
    );
    assert_eq!(doc["plan"], serde_json::json!({"sweep": 4}));
    let series = &doc["targets"][0];
    let runs = series["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels.first(), Some(&"synchronous"), "{labels:?}");
    assert_eq!(labels.last(), Some(&"throughput"), "{labels:?}");
    let sync_rps = runs[0]["requests_per_s"].as_f64().unwrap();
    let all_rps = runs[runs.len() - 1]["requests_per_s"].as_f64().unwrap();
    // The rates are evenly spaced above the synchronous rate, the last at the
    // throughput run's (guidellm's spacing).
    let rates: Vec<f64> = runs[1..runs.len() - 1]
        .iter()
        .map(|r| {
            assert_eq!(r["load"]["kind"], "rate");
            r["load"]["value"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(rates.len(), 2, "{labels:?}");
    let step = (all_rps - sync_rps) / 2.0;
    assert!(
        (rates[0] - (sync_rps + step)).abs() < 1e-6 && (rates[1] - all_rps).abs() < 1e-6,
        "{rates:?}"
    );
    let knee = &series["knee"];
    assert!(knee.is_object(), "no knee: {stdout}");
    let at = knee["run"].as_u64().unwrap() as usize;
    // The floor is the series' lowest median latency; the knee's is within the factor
    // of it, and the next run's (the one it names) is not.
    let floor = knee["floor_ms"].as_f64().unwrap();
    let lowest = runs
        .iter()
        .map(|r| r["latency_ms"]["p50"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(floor, lowest, "{knee}");
    assert_eq!(knee["next_label"].as_str(), labels.get(at + 1).copied(), "{knee}");
    assert!(runs[at]["latency_ms"]["p50"].as_f64().unwrap() <= 1.5 * floor);
    assert!(runs[at + 1]["latency_ms"]["p50"].as_f64().unwrap() > 1.5 * floor);
    assert!(stdout.contains(&format!("knee: {}", labels[at])), "{stdout}");
    // The document says what ran where.
    assert_eq!(doc["inferd_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(series["server_version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["created"].as_str().unwrap().ends_with('Z'));
    assert!(doc["host"]["cpus"].as_u64().unwrap() >= 1);
    assert!(doc["command"].as_array().unwrap().iter().any(|a| a == "--sweep"));
    // Loads that contradict a sweep are refused.
    let out = bench(&["--url", &url, "--model", "m", "--sweep", "--concurrency", "4"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn side_by_side_gives_the_ratio_of_two_servers() {
    let s = Server::start(&[]);
    // 50 ms before the first token and between tokens: 6 tokens in 300 ms, 20 tok/s.
    let slow = FakeServer::start(|_| 50, 50);
    let inferd = format!("inferd=http://127.0.0.1:{}", s.port);
    let slow_url = format!("slow={}", slow.url());
    let (stdout, doc) = session(
        "bench-side-by-side",
        &[
            "--target",
            &inferd,
            "--target",
            &slow_url,
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--num-requests",
            "6",
            "--input-len",
            "16",
            "--output-len",
            "6",
            "--warmup",
            "1",
        ],
    );
    let targets = doc["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(
        (targets[0]["name"].as_str(), targets[1]["name"].as_str()),
        (Some("inferd"), Some("slow"))
    );
    let tps = |t: &Value| t["runs"][0]["output_tokens_per_s"].as_f64().unwrap();
    let slow_tps = tps(&targets[1]);
    // At most 20 (six tokens 50 ms apart after 50 ms); connections and a busy machine
    // only take from it.
    assert!((8.0..=20.5).contains(&slow_tps), "slow server at {slow_tps} tok/s");
    // The same seeded workload went to both: six requests each (and one warm-up).
    assert_eq!(slow.served.load(Ordering::SeqCst), 7);
    let ratios = doc["comparison"].as_array().unwrap();
    let at_c1 = ratios.iter().find(|r| r["run"] == "concurrency 1").unwrap();
    assert_eq!(
        (at_c1["target"].as_str(), at_c1["baseline"].as_str()),
        (Some("slow"), Some("inferd"))
    );
    let expected = slow_tps / tps(&targets[0]);
    let got = at_c1["output_tokens_per_s"].as_f64().unwrap();
    assert!((got - expected).abs() < 1e-9 && got < 1.0, "{got} vs {expected}");
    assert!(ratios.iter().any(|r| r["run"] == "peak"));
    assert!(stdout.contains("== slow (http://127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains(&format!("slow / inferd, concurrency 1: output tok/s {expected:.2}x")),
        "{stdout}"
    );
}

/// Chromium: `INFERD_CHROMIUM`, else /usr/bin/chromium (scripts/test installs it).
fn chromium() -> String {
    let path = std::env::var("INFERD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path}: no Chromium for the report test (scripts/test installs Debian's chromium; or set INFERD_CHROMIUM)"
    );
    path
}

fn headless(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn html_report_renders_with_its_plots_in_headless_chromium() {
    let fast = FakeServer::start(|n| 5 + (n % 3) as u64 * 5, 2);
    let slower = FakeServer::start(|n| 20 + (n % 3) as u64 * 10, 6);
    let dir = scratch_dir("bench-report");
    let report = dir.join("report.html");
    let plots = dir.join("plots");
    let (a, b) = (format!("fast={}", fast.url()), format!("slower={}", slower.url()));
    let out = bench(&[
        "--target",
        &a,
        "--target",
        &b,
        "--model",
        "fake",
        "--concurrency",
        "1,4",
        "--num-requests",
        "8",
        "--output-len",
        "5",
        "--slo",
        "ttft=30ms",
        "--warmup",
        "0",
        "--quiet",
        "--report",
        report.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    ok(&out);
    let html = std::fs::read_to_string(&report).unwrap();
    // Self-contained: nothing fetched from anywhere.
    for outside in ["src=\"http", "href=\"http", "url(http", "src=\"//", "<link"] {
        assert!(!html.contains(outside), "{outside}");
    }
    assert!(html.contains("slower / fast"));
    // Both servers overlaid on the throughput plot.
    let svg = std::fs::read_to_string(plots.join("throughput.svg")).unwrap();
    assert!(svg.contains("fast output tok/s") && svg.contains("slower goodput tok/s"));

    // The browser decoded every plot (the report's own script counts them) ...
    let url = format!("file://{}", report.display());
    let out = headless(&dir, &["--virtual-time-budget=5000", "--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&out.stdout);
    let plots_in_page = html.matches("<img class=\"plot\"").count();
    assert_eq!(plots_in_page, 5);
    assert!(
        dom.contains(&format!(
            "data-plots=\"{plots_in_page}\" data-plots-loaded=\"{plots_in_page}\""
        )),
        "{}\n{}",
        &dom[..dom.len().min(2000)],
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the screenshot shows them: the series' colours cover a good area.
    let shot = dir.join("shot.png");
    let out = headless(
        &dir,
        &[
            "--window-size=1100,3200",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1100, 3200));
    let near = |p: &image::Rgb<u8>, c: [i32; 3]| p.0.iter().zip(c).all(|(&a, b)| (a as i32 - b).abs() < 40);
    let blue = img.pixels().filter(|p| near(p, [31, 119, 180])).count();
    let red = img.pixels().filter(|p| near(p, [214, 39, 40])).count();
    assert!(blue > 2000 && red > 2000, "blue {blue}, red {red} pixels");
}

#[test]
fn output_to_a_pipe_has_no_progress_frames() {
    // 30 requests of about 100 ms one at a time: three seconds.
    let fake = FakeServer::start(|_| 20, 20);
    let url = fake.url();
    let json = scratch_dir("bench-progress").join("r.json");
    let out = bench(&[
        "--url",
        &url,
        "--model",
        "fake",
        "--num-requests",
        "30",
        "--output-len",
        "5",
        "--warmup",
        "0",
        "--progress-every",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\r') && !stderr.contains('\x1b'), "{stderr:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("requests done after")).collect();
    // A line a second at most, and at least one in a run of about three seconds.
    let secs = read_json(&json)["targets"][0]["runs"][0]["duration_s"]
        .as_f64()
        .unwrap();
    assert!(
        secs > 2.0 && !lines.is_empty() && lines.len() as f64 <= secs.floor(),
        "{secs} s:\n{stderr}"
    );
    assert!(lines[0].starts_with("bench: concurrency 1: "), "{stderr}");
}

#[test]
fn sharegpt_conversations_set_prompts_and_reply_lengths() {
    let fake = FakeServer::start(|_| 1, 1);
    let dir = scratch_dir("bench-sharegpt");
    let json = dir.join("r.json");
    let data = super::common::fixture("bench/sharegpt-tiny.json");
    let url = fake.url();
    let (data, json_path) = (data.to_str().unwrap(), json.to_str().unwrap());
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "--url",
            &url,
            "--model",
            "fake",
            "--dataset",
            "sharegpt",
            "--dataset-path",
            data,
        ];
        args.extend(["--num-requests", "6", "--warmup", "0", "--quiet", "--json", json_path]);
        args.extend(extra);
        ok(&bench(&args));
        read_json(&json)
    };
    let doc = run(&[]);
    // Each of the six usable conversations once, each asking for its reply's length
    // (words, with no tokenizer for this model): 6 + 11 + 5 + 4 + 5 + 16.
    assert_eq!(doc["targets"][0]["runs"][0]["output_tokens"], 47);
    assert_eq!(doc["workload"]["dataset"], "sharegpt");
    // An output length given overrides the replies' own.
    let doc = run(&["--output-len", "3"]);
    assert_eq!(doc["targets"][0]["runs"][0]["output_tokens"], 18);
    let out = bench(&["--url", &url, "--model", "fake", "--dataset", "sharegpt"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dataset sharegpt needs --dataset-path"));
}

#[test]
fn prefix_workload_is_served_from_the_prefix_cache() {
    let s = Server::start(&[]);
    let url = format!("http://127.0.0.1:{}", s.port);
    let hits = || -> u64 {
        let r = s.request("GET", "/metrics", &[], None);
        r.body
            .lines()
            .find(|l| l.starts_with("inferd_prefix_cache_hits_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("prefix cache hits in /metrics") as u64
    };
    let run = |dataset: &[&str]| {
        let mut args = vec![
            "--url",
            &url,
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--endpoint",
            "chat",
        ];
        args.extend(dataset);
        args.extend([
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--num-requests",
            "8",
            "--warmup",
            "0",
            "--quiet",
        ]);
        ok(&bench(&args));
    };
    let before = hits();
    run(&["--dataset", "random"]);
    let random = hits() - before;
    run(&["--dataset", "prefix", "--num-prefixes", "2", "--prefix-len", "96"]);
    let prefix = hits() - before - random;
    // Six of the eight requests find their 96-token system prompt cached (at least five
    // whole 16-token blocks each); random prompts share only the chat template's head.
    assert!(prefix >= 30, "prefix workload: {prefix} block hits");
    assert!(random * 3 < prefix, "random {random} vs prefix {prefix}");
}

/// A keep-alive server that answers whole (unstreamed) completions and closes a
/// connection left idle for `idle_ms`, as uvicorn does after 5 s.
fn keep_alive_server(idle_ms: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || -> std::io::Result<()> {
                stream.set_read_timeout(Some(Duration::from_millis(idle_ms)))?;
                let mut reader = BufReader::new(stream.try_clone()?);
                let mut out = stream;
                // (Its request line reads as one more header line.) Idle too long, or
                // closed: close our side.
                while read_body(&mut reader)?.is_some() {
                    let reply =
                        r#"{"choices":[{"index":0,"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                        reply.len()
                    )?;
                }
                Ok(())
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn connections_the_server_closed_while_idle_are_not_reused() {
    // Requests 200 ms apart; the server closes connections idle for 50 ms.
    let url = keep_alive_server(50);
    let out = bench(&[
        "--url",
        &url,
        "--model",
        "fake",
        "--no-stream",
        "--request-rate",
        "inf,5",
        "--arrival",
        "constant",
        "--num-requests",
        "6",
        "--output-len",
        "2",
        "--warmup",
        "1",
        "--quiet",
    ]);
    let stdout = ok(&out);
    // Runs in increasing load: `inf` is every request at once, after the rate.
    let rate = stdout.find("rate 5/s: 6 requests (0 failed)");
    let all = stdout.find("throughput: 6 requests (0 failed)");
    assert!(rate.is_some() && all > rate, "{stdout}");
}

#[test]
fn failed_requests_are_results_and_a_run_that_lost_all_is_an_error() {
    // Every fourth request is refused (an overloaded server): reported, not fatal.
    let flaky = FakeServer::start(|n| if n % 4 == 3 { REFUSE } else { 2 }, 1);
    let url = flaky.url();
    let args = [
        "--model",
        "fake",
        "--num-requests",
        "8",
        "--output-len",
        "2",
        "--warmup",
        "0",
        "--quiet",
    ];
    let out = bench(&[&["--url", url.as_str()][..], &args[..]].concat());
    let stdout = ok(&out);
    assert!(stdout.contains("concurrency 1: 8 requests (2 failed)"), "{stdout}");
    assert!(stdout.contains("503 Service Unavailable"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 8 requests failed"));
    // Refusing everything: nothing was measured, and bench says so.
    let down = FakeServer::start(|_| REFUSE, 1);
    let url = down.url();
    let out = bench(&[&["--url", url.as_str()][..], &args[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("every request of the concurrency 1 run failed"),
        "{stderr}"
    );
}

#[test]
fn contradictory_or_unused_flags_are_refused() {
    let cases: [(&[&str], &str); 8] = [
        (&["--offline", "--no-stream"], "are for servers"),
        (&["--no-stream", "--slo", "itl=5ms"], "no time between tokens"),
        (&["--concurrency", "2", "--max-concurrency", "3"], "shape rate runs"),
        (&["--concurrency", "2", "--request-rate", "3"], "two kinds of load"),
        (&["--sweep", "--request-rate", "3"], "chooses its own loads"),
        (
            &["--dataset", "random", "--dataset-path", "x.json"],
            "leave out --dataset-path",
        ),
        (&["--num-prefixes", "3"], "shape --dataset prefix"),
        (&["--request-rate", "0"], "positive numbers"),
    ];
    for (args, message) in cases {
        let out = bench(&[&["--model", "m", "--url", "http://127.0.0.1:9"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn a_terminal_gets_one_progress_line_redrawn_in_place() {
    // util-linux `script` gives bench a pseudo-terminal for stderr.
    let fake = FakeServer::start(|_| 20, 20);
    let url = fake.url();
    let command = format!(
        "{} bench --url {url} --model fake --num-requests 12 --output-len 5 --warmup 0 2>&1 >/dev/null",
        env!("CARGO_BIN_EXE_inferd")
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("util-linux script");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tty = String::from_utf8_lossy(&out.stdout);
    // Frames redrawn with a carriage return, ending on the whole count; no log lines.
    assert!(tty.matches("\r  concurrency 1: ").count() >= 2, "{tty:?}");
    assert!(tty.contains("\r  concurrency 1: 12/12 requests"), "{tty:?}");
    assert!(!tty.contains("requests done after"), "{tty:?}");
}
