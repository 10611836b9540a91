//! `inferd bench`: a serving benchmark client for any OpenAI-compatible server. A run
//! sends a seeded workload at one load (a concurrency limit, a request rate, one at a
//! time, or all at once), times each reply as it streams, and reports throughput,
//! latency percentiles and goodput under latency targets. A session runs a series of
//! loads (a list, or a sweep from one-at-a-time to saturation with its knee found)
//! against one server or several in turn, and writes JSON, plots and an HTML report.
//!
//! - [`workload`]: what is sent; [`slo`]: targets and goodput; [`sweep`]: the loads of
//!   a session and the knee; [`session`]: running a session against its targets;
//!   [`plot`] and [`html`]: the pictures and the report; [`progress`]: what a run
//!   prints while it goes.

pub mod html;
pub mod kernels;
pub mod plot;
pub mod progress;
pub mod session;
pub mod slo;
pub mod sweep;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

use crate::client::{self, Connection, Outcome, Target};
use crate::engine::sampling::Rng;
use crate::engine::{EngineEvent, EngineHandle, SamplingParams};

pub use progress::ProgressMode;
pub use slo::{Goodput, Sample, Slo};
pub use sweep::Load;
pub use workload::{BenchRequest, Dataset, WorkloadSpec};

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

/// How the benchmark's requests sample (`--temperature`, `--top-p`, `--top-k`):
/// greedy by default. Offline, request `i` of a run is seeded with `i`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BenchSampling {
    /// As given (f64, so that 0.7 is written 0.7); requests take them as f32.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
}

impl Default for BenchSampling {
    fn default() -> Self {
        BenchSampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
        }
    }
}

impl BenchSampling {
    /// The flags' ranges, as the API checks them.
    pub fn new(temperature: f64, top_p: f64, top_k: Option<usize>) -> Result<Self, String> {
        if !(0.0..=2.0).contains(&temperature) {
            return Err("--temperature must be in [0, 2]".into());
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err("--top-p must be in (0, 1]".into());
        }
        if top_k == Some(0) {
            return Err("--top-k must be at least 1".into());
        }
        Ok(BenchSampling {
            temperature,
            top_p,
            top_k,
        })
    }

    fn params(&self, index: usize, max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            temperature: self.temperature as f32,
            top_p: self.top_p as f32,
            top_k: self.top_k,
            seed: Some(index as u64),
            ..SamplingParams::default()
        }
    }
}

/// How requests reach one HTTP server.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub target: Target,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    /// Send `ignore_eos: true` so every reply is exactly `max_tokens` long.
    pub ignore_eos: bool,
    pub api_key: Option<String>,
    pub sampling: BenchSampling,
}

impl HttpSettings {
    fn body(&self, request: &BenchRequest) -> Bytes {
        let mut body = match self.endpoint {
            Endpoint::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &request.system {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": request.prompt}));
                json!({"model": self.model, "messages": messages})
            }
            Endpoint::Completions => {
                let prompt = match &request.system {
                    Some(system) => format!("{system}\n\n{}", request.prompt),
                    None => request.prompt.clone(),
                };
                json!({"model": self.model, "prompt": prompt})
            }
        };
        body["max_tokens"] = json!(request.max_tokens);
        body["temperature"] = json!(self.sampling.temperature);
        if self.sampling.top_p < 1.0 {
            body["top_p"] = json!(self.sampling.top_p);
        }
        if let Some(k) = self.sampling.top_k {
            body["top_k"] = json!(k);
        }
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

/// Arrival times of requests at a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exponential gaps: a Poisson process.
    Poisson,
    /// Evenly spaced.
    Constant,
}

/// How one run sends its requests.
#[derive(Debug, Clone)]
pub struct Pace {
    pub load: Load,
    /// Most requests in flight for rate and throughput loads (`None`: no limit).
    pub max_concurrency: Option<usize>,
    pub arrival: Arrival,
    pub stream: bool,
    pub seed: u64,
    /// Named in progress lines.
    pub label: String,
    pub progress: ProgressMode,
}

impl Pace {
    fn concurrency_limit(&self, requests: usize) -> usize {
        let open = self.max_concurrency.unwrap_or(requests).max(1);
        match self.load {
            Load::Synchronous => 1,
            Load::Concurrency(c) => c.max(1),
            Load::Rate(_) | Load::Throughput => open,
        }
    }
}

/// Mean and percentiles of one measure, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    /// Of values in milliseconds.
    pub fn of(values: &[f64]) -> Distribution {
        if values.is_empty() {
            return Distribution::default();
        }
        Distribution {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: slo::percentile(values, 0.5),
            p90: slo::percentile(values, 0.9),
            p99: slo::percentile(values, 0.99),
            max: values.iter().copied().fold(f64::MIN, f64::max),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `concurrency 4`, `rate 2.5/s`, `synchronous`, `throughput`.
    pub label: String,
    pub load: Load,
    /// The most requests in flight it allowed.
    pub concurrency: usize,
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
    /// Over every gap between successive tokens of every request.
    pub itl_ms: Distribution,
    /// Each request's own time per output token, vLLM's TPOT (replies of two tokens
    /// or more).
    pub tpot_ms: Distribution,
    pub latency_ms: Distribution,
    /// Under the session's SLO, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput: Option<Goodput>,
    /// Each successful request's measures (for goodput and the plots).
    #[serde(skip)]
    pub samples: Vec<Sample>,
    /// Every inter-token gap, in ms.
    #[serde(skip)]
    pub itls: Vec<f64>,
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
        let samples: Vec<Sample> = ok
            .iter()
            .map(|(_, o)| {
                let ttft = o.ttft.unwrap_or(o.latency) * 1e3;
                let latency = o.latency * 1e3;
                let tokens = o.completion_tokens.unwrap_or(o.chunks);
                let itl = if o.itl.is_empty() {
                    0.0
                } else {
                    o.itl.iter().sum::<f64>() * 1e3 / o.itl.len() as f64
                };
                Sample {
                    ttft_ms: ttft,
                    itl_ms: itl,
                    tpot_ms: if tokens > 1 {
                        (latency - ttft) / (tokens - 1) as f64
                    } else {
                        0.0
                    },
                    latency_ms: latency,
                    output_tokens: tokens,
                }
            })
            .collect();
        let itls: Vec<f64> = ok.iter().flat_map(|(_, o)| o.itl.iter().map(|s| s * 1e3)).collect();
        let of = |f: fn(&Sample) -> f64| Distribution::of(&samples.iter().map(f).collect::<Vec<_>>());
        Report {
            label: pace.load.label(),
            load: pace.load,
            concurrency: pace.concurrency_limit(requests.len()),
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
            ttft_ms: of(|s| s.ttft_ms),
            itl_ms: Distribution::of(&itls),
            // (As vLLM: one-token replies have no time per output token.)
            tpot_ms: Distribution::of(
                &samples
                    .iter()
                    .filter(|s| s.output_tokens > 1)
                    .map(|s| s.tpot_ms)
                    .collect::<Vec<_>>(),
            ),
            latency_ms: of(|s| s.latency_ms),
            goodput: None,
            samples,
            itls,
        }
    }

    /// Goodput under `slo` (none for an empty one).
    pub fn judge(&mut self, slo: &Slo) {
        self.goodput = (!slo.is_empty()).then(|| slo.goodput(&self.samples, self.requests, self.duration_s));
    }

    /// A few human-readable lines.
    pub fn summary(&self) -> String {
        let d = |x: &Distribution| format!("mean {:.1} p50 {:.1} p90 {:.1} p99 {:.1}", x.mean, x.p50, x.p90, x.p99);
        let goodput = self
            .goodput
            .as_ref()
            .map(|g| {
                format!(
                    "\n  goodput {:.2} req/s, {:.1} output tok/s ({}/{} requests within targets; {})",
                    g.requests_per_s,
                    g.output_tokens_per_s,
                    g.good_requests,
                    self.requests,
                    if g.met { "targets met" } else { "targets missed" }
                )
            })
            .unwrap_or_default();
        format!(
            "{}: {} requests ({} failed) in {:.2} s\n  \
             {:.2} req/s, input {:.1} tok/s, output {:.1} tok/s, {:.1} chunks/s\n  \
             TTFT ms    {}\n  ITL ms     {}\n  latency ms {}{goodput}",
            self.label,
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

/// Sends every request to the server and waits for all of them.
pub async fn run(settings: &HttpSettings, pace: &Pace, requests: &[BenchRequest]) -> Report {
    let settings = Arc::new(settings.clone());
    let idle: Arc<Mutex<Vec<Connection>>> = Arc::new(Mutex::new(Vec::new()));
    drive(pace, requests, |_, request| {
        let (settings, idle) = (settings.clone(), idle.clone());
        let body = settings.body(request);
        let max_tokens = request.max_tokens;
        async move { one_request(&settings, &idle, body, max_tokens).await }
    })
    .await
}

/// Feeds the requests to `send` at the pace asked (a concurrency limit, and arrivals
/// at a rate when one is set), and reports.
async fn drive<F, Fut>(pace: &Pace, requests: &[BenchRequest], send: F) -> Report
where
    F: Fn(usize, &BenchRequest) -> Fut,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(pace.concurrency_limit(requests.len())));
    let mut rng = Rng::seeded(pace.seed ^ 0x6172_7269_7661_6c73);
    let start = Instant::now();
    let mut next_arrival = 0.0f64;
    let progress = progress::Progress::start(pace.progress, &pace.label, requests.len());
    let mut tasks = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        if let (Load::Rate(rate), true) = (pace.load, i > 0) {
            // The first request leaves at once; each next one a gap later.
            next_arrival += match pace.arrival {
                Arrival::Poisson => -(1.0 - rng.next_f64()).ln() / rate,
                Arrival::Constant => 1.0 / rate,
            };
            let due = start + Duration::from_secs_f64(next_arrival);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let done = progress.counter();
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
    progress.finish().await;
    Report::new(pace, requests, &outcomes, duration)
}

/// Drives an engine directly, without HTTP (`inferd bench --offline`): each request's
/// prompt is token ids, replies are `ignore_eos`, exactly `max_tokens` long, sampled as
/// `sampling` says.
pub async fn run_offline(
    engine: &EngineHandle,
    pace: &Pace,
    requests: &[BenchRequest],
    prompts: &[Vec<u32>],
    sampling: &BenchSampling,
) -> Report {
    drive(pace, requests, |i, request| {
        let engine = engine.clone();
        let ids = prompts.get(i).cloned().unwrap_or_default();
        let params = sampling.params(i, request.max_tokens);
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

async fn one_request(
    settings: &HttpSettings,
    idle: &Mutex<Vec<Connection>>,
    body: Bytes,
    max_tokens: usize,
) -> Outcome {
    let failed = |message: String| Outcome {
        error: Some(message),
        ..Default::default()
    };
    // A pooled connection the server closed while it sat idle is dropped, not used.
    let mut pooled = None;
    loop {
        let next = idle.lock().await.pop();
        let Some(mut c) = next else { break };
        if c.is_ready().await {
            pooled = Some(c);
            break;
        }
    }
    let reused = pooled.is_some();
    let mut conn = match pooled {
        Some(c) => c,
        None => match Connection::open(&settings.target).await {
            Ok(c) => c,
            Err(e) => return failed(e),
        },
    };
    let path = settings.endpoint.path();
    let key = settings.api_key.as_deref();
    let stream = settings.stream;
    let mut result = client::timed_completion(&mut conn, &settings.target, path, key, body.clone(), stream).await;
    if reused && result.as_ref().is_err_and(|f| f.before_reply) {
        // The server closed the kept connection as the request left: once more, on a
        // fresh one (nothing reached it).
        conn = match Connection::open(&settings.target).await {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        result = client::timed_completion(&mut conn, &settings.target, path, key, body, stream).await;
    }
    match result {
        Ok(mut outcome) => {
            if outcome.completion_tokens.is_none() && settings.ignore_eos && !settings.stream {
                // A whole reply without `usage`: ignore_eos made it max_tokens long.
                outcome.completion_tokens = Some(max_tokens);
            }
            if conn.is_reusable() {
                idle.lock().await.push(conn);
            }
            outcome
        }
        Err(f) => failed(f.message),
    }
}
