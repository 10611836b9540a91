//! `inferd bench`: a serving benchmark client for any OpenAI-compatible server. A run
//! sends a fixed set of requests at a concurrency limit (and optionally a Poisson
//! arrival rate), times each reply as it streams, and reports throughput and latency
//! percentiles, as text and as JSON.

pub mod plot;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

use crate::client::{self, Connection, Outcome, Target};
use crate::engine::sampling::Rng;
use crate::engine::{EngineEvent, EngineHandle, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub prompt: String,
    /// The prompt's length by the benchmark's own count (the server's `usage` wins).
    pub prompt_tokens: usize,
    pub max_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub target: Target,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    /// Send `ignore_eos: true` so every reply is exactly `max_tokens` long.
    pub ignore_eos: bool,
    pub api_key: Option<String>,
    /// Most requests in flight.
    pub concurrency: usize,
    /// Poisson arrivals at this many requests per second; `None`: all at once.
    pub request_rate: Option<f64>,
    pub seed: u64,
    pub progress: bool,
}

impl RunSettings {
    fn body(&self, request: &BenchRequest) -> Bytes {
        let mut body = match self.endpoint {
            Endpoint::Chat => json!({"model": self.model, "messages": [{"role": "user", "content": request.prompt}]}),
            Endpoint::Completions => json!({"model": self.model, "prompt": request.prompt}),
        };
        body["max_tokens"] = json!(request.max_tokens);
        body["temperature"] = json!(0);
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if self.stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }
}

/// Mean and percentiles of one measure, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    /// Linear interpolation between closest ranks (numpy's default), of seconds, in ms.
    pub fn of(values: &[f64]) -> Distribution {
        if values.is_empty() {
            return Distribution::default();
        }
        let mut v: Vec<f64> = values.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Distribution {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub concurrency: usize,
    pub request_rate: Option<f64>,
    pub stream: bool,
    pub requests: usize,
    pub failed: usize,
    /// The first few failures, for the reader.
    pub errors: Vec<String>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Text-carrying stream events per second (one per reply when not streaming).
    pub chunks_per_s: f64,
    pub ttft_ms: Distribution,
    pub itl_ms: Distribution,
    pub latency_ms: Distribution,
    /// Each successful request's latency and TTFT, in ms (for the plots).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
    #[serde(skip)]
    pub ttfts_ms: Vec<f64>,
}

impl Report {
    fn new(pace: &Pace, requests: &[BenchRequest], outcomes: &[Outcome], duration: f64) -> Report {
        let ok: Vec<(&BenchRequest, &Outcome)> = requests
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| o.error.is_none())
            .collect();
        let input_tokens = ok.iter().map(|(r, o)| o.prompt_tokens.unwrap_or(r.prompt_tokens)).sum();
        let output_tokens = ok.iter().map(|(_, o)| o.completion_tokens.unwrap_or(o.chunks)).sum();
        let chunks: usize = ok.iter().map(|(_, o)| o.chunks).sum();
        let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
        let ttft: Vec<f64> = ok.iter().filter_map(|(_, o)| o.ttft).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|(_, o)| o.itl.iter().copied()).collect();
        let latency: Vec<f64> = ok.iter().map(|(_, o)| o.latency).collect();
        Report {
            concurrency: pace.concurrency,
            request_rate: pace.request_rate,
            stream: pace.stream,
            requests: outcomes.len(),
            failed: outcomes.len() - ok.len(),
            errors: outcomes.iter().filter_map(|o| o.error.clone()).take(5).collect(),
            duration_s: duration,
            requests_per_s: per_s(ok.len() as f64),
            input_tokens,
            output_tokens,
            input_tokens_per_s: per_s(input_tokens as f64),
            output_tokens_per_s: per_s(output_tokens as f64),
            chunks_per_s: per_s(chunks as f64),
            ttft_ms: Distribution::of(&ttft),
            itl_ms: Distribution::of(&itl),
            latency_ms: Distribution::of(&latency),
            latencies_ms: latency.iter().map(|s| s * 1e3).collect(),
            ttfts_ms: ttft.iter().map(|s| s * 1e3).collect(),
        }
    }

    /// A few human-readable lines.
    pub fn summary(&self) -> String {
        let d = |x: &Distribution| format!("mean {:.1} p50 {:.1} p90 {:.1} p99 {:.1}", x.mean, x.p50, x.p90, x.p99);
        let rate = self
            .request_rate
            .map(|r| format!(", {r} req/s offered"))
            .unwrap_or_default();
        format!(
            "concurrency {}{rate}: {} requests ({} failed) in {:.2} s\n  \
             {:.2} req/s, input {:.1} tok/s, output {:.1} tok/s, {:.1} chunks/s\n  \
             TTFT ms    {}\n  ITL ms     {}\n  latency ms {}",
            self.concurrency,
            self.requests,
            self.failed,
            self.duration_s,
            self.requests_per_s,
            self.input_tokens_per_s,
            self.output_tokens_per_s,
            self.chunks_per_s,
            d(&self.ttft_ms),
            d(&self.itl_ms),
            d(&self.latency_ms),
        )
    }
}

/// How requests are sent: how many at once, at what rate.
#[derive(Debug, Clone)]
pub struct Pace {
    pub concurrency: usize,
    pub request_rate: Option<f64>,
    pub stream: bool,
    pub seed: u64,
    pub progress: bool,
}

impl RunSettings {
    pub fn pace(&self) -> Pace {
        Pace {
            concurrency: self.concurrency,
            request_rate: self.request_rate,
            stream: self.stream,
            seed: self.seed,
            progress: self.progress,
        }
    }
}

/// Sends every request to the server and waits for all of them.
pub async fn run(settings: &RunSettings, requests: &[BenchRequest]) -> Report {
    let settings = Arc::new(settings.clone());
    let idle: Arc<Mutex<Vec<Connection>>> = Arc::new(Mutex::new(Vec::new()));
    let pace = settings.pace();
    drive(&pace, requests, |_, request| {
        let (settings, idle) = (settings.clone(), idle.clone());
        let body = settings.body(request);
        async move { one_request(&settings, &idle, body).await }
    })
    .await
}

/// Feeds the requests to `send` at the pace asked (a concurrency limit, and Poisson
/// arrivals when a rate is set), and reports.
async fn drive<F, Fut>(pace: &Pace, requests: &[BenchRequest], send: F) -> Report
where
    F: Fn(usize, &BenchRequest) -> Fut,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(pace.concurrency.max(1)));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut rng = Rng::seeded(pace.seed);
    let start = Instant::now();
    let mut next_arrival = 0.0f64;
    let progress = pace.progress.then(|| {
        let (done, total) = (done.clone(), requests.len());
        tokio::spawn(async move {
            loop {
                let n = done.load(std::sync::atomic::Ordering::Relaxed);
                eprint!("\r  {n}/{total} requests");
                if n >= total {
                    eprintln!();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });
    let mut tasks = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        if let Some(rate) = pace.request_rate {
            // Exponential gaps: a Poisson process of `rate` arrivals per second.
            next_arrival += -(1.0 - rng.next_f64()).ln() / rate;
            let due = start + Duration::from_secs_f64(next_arrival);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let done = done.clone();
        let work = send(i, request);
        tasks.push(tokio::spawn(async move {
            let outcome = work.await;
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("request task failed: {e}")),
            ..Default::default()
        }));
    }
    let duration = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        let _ = p.await;
    }
    Report::new(pace, requests, &outcomes, duration)
}

/// Drives an engine directly, without HTTP (`inferd bench --offline`): each request's
/// prompt is token ids, replies are greedy and `ignore_eos`, exactly `max_tokens` long.
pub async fn run_offline(
    engine: &EngineHandle,
    pace: &Pace,
    requests: &[BenchRequest],
    prompts: &[Vec<u32>],
) -> Report {
    drive(pace, requests, |i, request| {
        let engine = engine.clone();
        let ids = prompts.get(i).cloned().unwrap_or_default();
        let params = SamplingParams {
            max_tokens: Some(request.max_tokens),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        async move { engine_request(&engine, ids, params).await }
    })
    .await
}

async fn engine_request(engine: &EngineHandle, ids: Vec<u32>, params: SamplingParams) -> Outcome {
    let start = Instant::now();
    let prompt_tokens = ids.len();
    let mut outcome = Outcome {
        prompt_tokens: Some(prompt_tokens),
        ..Default::default()
    };
    let mut stream = match engine.submit(ids, params) {
        Ok(stream) => stream,
        Err(e) => {
            outcome.error = Some(e.to_string());
            return outcome;
        }
    };
    let mut last: Option<Instant> = None;
    while let Some(event) = stream.next().await {
        match event {
            EngineEvent::Token { .. } => {
                let now = Instant::now();
                match last {
                    None => outcome.ttft = Some((now - start).as_secs_f64()),
                    Some(prev) => outcome.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
                outcome.chunks += 1;
            }
            EngineEvent::Finished { .. } => break,
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Failed(e) => {
                outcome.error = Some(e);
                break;
            }
        }
    }
    outcome.completion_tokens = Some(outcome.chunks);
    outcome.latency = start.elapsed().as_secs_f64();
    outcome
}

async fn one_request(settings: &RunSettings, idle: &Mutex<Vec<Connection>>, body: Bytes) -> Outcome {
    let pooled = idle.lock().await.pop();
    let mut conn = match pooled {
        Some(c) => c,
        None => match Connection::open(&settings.target).await {
            Ok(c) => c,
            Err(e) => {
                return Outcome {
                    error: Some(e),
                    ..Default::default()
                }
            }
        },
    };
    let path = settings.endpoint.path();
    let key = settings.api_key.as_deref();
    match client::timed_completion(&mut conn, &settings.target, path, key, body, settings.stream).await {
        Ok(outcome) => {
            if conn.is_reusable() {
                idle.lock().await.push(conn);
            }
            outcome
        }
        Err(e) => Outcome {
            error: Some(e),
            ..Default::default()
        },
    }
}

/// Prompts of about `len` tokens: random vocabulary tokens decoded to text when a
/// tokenizer is at hand (as vLLM's random dataset does), else a sentence repeated.
pub fn synthetic_requests(
    tokenizer: Option<&crate::text::Tokenizer>,
    count: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
    seed: u64,
) -> Vec<BenchRequest> {
    let mut rng = Rng::seeded(seed);
    let mut pick = |len: usize| {
        let spread = (len as f64 * range_ratio).round() as i64;
        let offset = if spread > 0 {
            (rng.next_u64() % (2 * spread as u64 + 1)) as i64 - spread
        } else {
            0
        };
        (len as i64 + offset).max(1) as usize
    };
    let lens: Vec<(usize, usize)> = (0..count).map(|_| (pick(input_len), pick(output_len))).collect();
    let mut rng = Rng::seeded(seed ^ 0x9e37_79b9_7f4a_7c15);
    lens.into_iter()
        .enumerate()
        .map(|(i, (input, output))| {
            let prompt = match tokenizer {
                Some(t) => random_text(t, input, &mut rng),
                // Each request differs in its first word, so no two share a cached prefix.
                None => format!("{i} {}", "hello world ".repeat(input.saturating_sub(1).div_ceil(2))),
            };
            BenchRequest {
                prompt,
                prompt_tokens: input,
                max_tokens: output,
            }
        })
        .collect()
}

fn random_text(tokenizer: &crate::text::Tokenizer, len: usize, rng: &mut Rng) -> String {
    // Plain vocabulary entries only: no special or added tokens.
    let vocab = tokenizer.base_vocab_size() as u64;
    let ids: Vec<u32> = (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect();
    tokenizer.decode(&ids, true).unwrap_or_default()
}

/// Reports as a JSON document, with what produced them (`target`: the URL, or
/// `offline`).
pub fn reports_json(target: &str, model: &str, endpoint: &str, ignore_eos: bool, reports: &[Report]) -> Value {
    json!({
        "target": target,
        "model": model,
        "endpoint": endpoint,
        "ignore_eos": ignore_eos,
        "runs": reports,
    })
}

/// Random prompts of exactly `len` token ids below `vocab` (no tokenizer needed).
pub fn random_prompt_ids(vocab: usize, requests: &[BenchRequest], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::seeded(seed ^ 0x006f_6666_6c69_6e65);
    requests
        .iter()
        .map(|r| {
            (0..r.prompt_tokens)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect()
}
