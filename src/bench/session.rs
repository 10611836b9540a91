//! A benchmark session: the same seeded workload, at each load of the plan, against
//! each target in turn (HTTP servers, or an engine in this process), then the knee of
//! each target's series, goodput under the SLO, ratios against the first target, and
//! the JSON document that records it all (schema in docs/bench.md).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use super::sweep::{self, Knee, Load};
use super::{run, run_offline, workload, Arrival, BenchRequest, HttpSettings, Pace, ProgressMode, Report, Slo};
use crate::client::Target;
use crate::engine::EngineHandle;
use crate::text::Tokenizer;

/// The JSON document's schema name; bumped when a field changes meaning.
pub const SCHEMA: &str = "inferd-bench/1";

/// Which loads a session runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// These, in order.
    Loads(Vec<Load>),
    /// Synchronous, throughput, and rates between: `points` runs in all.
    Sweep { points: usize },
}

/// What the session sends to.
pub enum Driver {
    /// Servers, one after the other, each with a name.
    Http(Vec<(String, HttpSettings)>),
    /// An engine in this process, fed token ids (`vocab`: the model's vocabulary).
    Offline {
        engine: EngineHandle,
        vocab: usize,
        device: String,
        /// Print where each run's step time went (`--profile`).
        profile: bool,
        sampling: super::BenchSampling,
    },
}

pub struct SessionOptions {
    pub plan: Plan,
    /// Most requests in flight for rate and throughput runs (`None`: no limit).
    pub max_concurrency: Option<usize>,
    pub arrival: Arrival,
    /// Requests per run; `None`: `requests_per_client` x concurrency (at least 16) for
    /// concurrency runs, and 64 for the others.
    pub num_requests: Option<usize>,
    pub requests_per_client: usize,
    pub warmup: usize,
    pub seed: u64,
    pub stream: bool,
    pub slo: Slo,
    pub progress: ProgressMode,
}

/// One target's runs, in increasing load.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub url: String,
    /// What the server's `GET /version` said (`version`, as vLLM and inferd answer it),
    /// when it answered.
    pub server_version: Option<String>,
    pub runs: Vec<Report>,
    pub knee: Option<Knee>,
    /// The run with the highest goodput (requests/s), when there is an SLO and some
    /// request met it.
    pub best_goodput: Option<usize>,
}

impl Series {
    pub fn peak_output_tokens_per_s(&self) -> f64 {
        self.runs.iter().map(|r| r.output_tokens_per_s).fold(0.0, f64::max)
    }
}

/// One measure of one run (or of a whole series) of a target against the baseline's.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub target: String,
    pub baseline: String,
    /// The run's label in both series, or `peak` for the best run of each.
    pub run: String,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Lower is better for these two: target / baseline all the same.
    pub ttft_p50: f64,
    pub itl_p50: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput_requests_per_s: Option<f64>,
}

/// `a / b`, or NaN (null in JSON, `—` in the report) when `b` measured nothing.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 && b.is_finite() {
        a / b
    } else {
        f64::NAN
    }
}

/// Each later target against the first: the runs both have (by label), and the peaks.
pub fn compare(series: &[Series]) -> Vec<Ratio> {
    let Some(base) = series.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for other in &series[1..] {
        for run in &other.runs {
            let Some(b) = base.runs.iter().find(|b| b.label == run.label) else {
                continue;
            };
            out.push(Ratio {
                target: other.name.clone(),
                baseline: base.name.clone(),
                run: run.label.clone(),
                output_tokens_per_s: ratio(run.output_tokens_per_s, b.output_tokens_per_s),
                requests_per_s: ratio(run.requests_per_s, b.requests_per_s),
                ttft_p50: ratio(run.ttft_ms.p50, b.ttft_ms.p50),
                itl_p50: ratio(run.itl_ms.p50, b.itl_ms.p50),
                goodput_requests_per_s: match (&run.goodput, &b.goodput) {
                    (Some(g), Some(h)) => Some(ratio(g.requests_per_s, h.requests_per_s)),
                    _ => None,
                },
            });
        }
        // Runs that measured something (a run that lost every request has no latency).
        fn measured(s: &Series) -> impl Iterator<Item = &Report> {
            s.runs.iter().filter(|r| r.requests > r.failed)
        }
        let best = |s: &Series, f: fn(&Report) -> f64| measured(s).map(f).fold(0.0, f64::max);
        let min = |s: &Series, f: fn(&Report) -> f64| measured(s).map(f).fold(f64::INFINITY, f64::min);
        out.push(Ratio {
            target: other.name.clone(),
            baseline: base.name.clone(),
            run: "peak".into(),
            output_tokens_per_s: ratio(other.peak_output_tokens_per_s(), base.peak_output_tokens_per_s()),
            requests_per_s: ratio(best(other, |r| r.requests_per_s), best(base, |r| r.requests_per_s)),
            ttft_p50: ratio(min(other, |r| r.ttft_ms.p50), min(base, |r| r.ttft_ms.p50)),
            itl_p50: ratio(min(other, |r| r.itl_ms.p50), min(base, |r| r.itl_ms.p50)),
            goodput_requests_per_s: base.best_goodput.zip(other.best_goodput).map(|(b, o)| {
                let g = |s: &Series, i: usize| s.runs[i].goodput.as_ref().map_or(0.0, |g| g.requests_per_s);
                ratio(g(other, o), g(base, b))
            }),
        });
    }
    out
}

/// Runs the plan against every target of `driver`.
pub async fn run_session(
    options: &SessionOptions,
    workload: &workload::WorkloadSpec,
    tokenizer: Option<&Tokenizer>,
    driver: &Driver,
) -> Result<Vec<Series>, String> {
    let targets: Vec<(String, String)> = match driver {
        Driver::Http(list) => list
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    format!("http://{}{}", s.target.authority, s.target.base_path),
                )
            })
            .collect(),
        Driver::Offline { device, .. } => vec![("offline".into(), format!("engine on {device}"))],
    };
    let many = targets.len() > 1;
    let mut series = Vec::new();
    for (index, (name, url)) in targets.into_iter().enumerate() {
        if many {
            println!("== {name} ({url})");
        }
        let one = |load: Load, point: u64| {
            let name = name.clone();
            async move {
                let count = options.num_requests.unwrap_or(match load {
                    Load::Concurrency(c) => (options.requests_per_client * c).max(16),
                    _ => 64,
                });
                let pace = Pace {
                    load,
                    max_concurrency: options.max_concurrency,
                    arrival: options.arrival,
                    stream: options.stream,
                    seed: options.seed.wrapping_add(point),
                    label: if many {
                        format!("{name}, {}", load.label())
                    } else {
                        load.label()
                    },
                    progress: options.progress,
                };
                if options.warmup > 0 {
                    // Prompts of their own, so the run's are not already in a prefix cache.
                    let warm = workload.requests(tokenizer, options.warmup, options.seed ^ 0x5741_524d_5550);
                    let warm_pace = Pace {
                        load: Load::Concurrency(options.warmup),
                        progress: ProgressMode::Off,
                        ..pace.clone()
                    };
                    let report = send(driver, index, &warm_pace, &warm, options.seed ^ 1).await;
                    if report.failed == report.requests {
                        return Err(format!(
                            "{name}: every warm-up request failed: {}",
                            report.errors.join("; ")
                        ));
                    }
                }
                let requests = workload.requests(tokenizer, count, pace.seed);
                let mut report = send(driver, index, &pace, &requests, pace.seed).await;
                report.judge(&options.slo);
                println!("{}", report.summary());
                if !report.errors.is_empty() {
                    println!("  first errors: {}", report.errors.join("; "));
                }
                Ok(report)
            }
        };
        let runs = match &options.plan {
            Plan::Loads(loads) => {
                let mut runs = Vec::new();
                for (i, load) in loads.iter().enumerate() {
                    // (Concurrency runs keep the seeds they had before sweeps existed.)
                    let point = match load {
                        Load::Concurrency(c) => *c as u64,
                        _ => i as u64,
                    };
                    runs.push(one(*load, point).await?);
                }
                runs
            }
            Plan::Sweep { points } => {
                let sync = one(Load::Synchronous, 0).await?;
                let all = one(Load::Throughput, 1).await?;
                let mut runs = vec![sync];
                let rates = sweep::sweep_rates(runs[0].requests_per_s, all.requests_per_s, *points);
                if rates.is_empty() && *points > 2 {
                    println!(
                        "  (no rates between: all at once reached {:.2} req/s, one at a time {:.2})",
                        all.requests_per_s, runs[0].requests_per_s
                    );
                }
                for (k, rate) in rates.into_iter().enumerate() {
                    runs.push(one(Load::Rate(rate), 2 + k as u64).await?);
                }
                runs.push(all);
                runs
            }
        };
        let knee = if runs.len() > 1 { sweep::knee(&runs) } else { None };
        if runs.len() > 1 {
            match &knee {
                Some(k) => println!(
                    "knee{}: {} ({:.2} req/s, {:.1} output tok/s): median latency {:.1} ms against a floor of {:.1} ms; {:.1} ms at {}",
                    if many { format!(" of {name}") } else { String::new() },
                    k.label,
                    k.requests_per_s,
                    k.output_tokens_per_s,
                    k.latency_p50_ms,
                    k.floor_ms,
                    k.next_latency_p50_ms,
                    k.next_label
                ),
                None => println!(
                    "knee{}: none (median latency stayed within {}x of its floor, or left it at the lightest load)",
                    if many { format!(" of {name}") } else { String::new() },
                    sweep::KNEE_FACTOR
                ),
            }
        }
        let best_goodput = runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.goodput
                    .as_ref()
                    .filter(|g| g.good_requests > 0)
                    .map(|g| (i, g.requests_per_s))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        let server_version = match driver {
            Driver::Http(list) => server_version(&list[index].1).await,
            Driver::Offline { .. } => Some(env!("CARGO_PKG_VERSION").to_owned()),
        };
        series.push(Series {
            name,
            url,
            server_version,
            runs,
            knee,
            best_goodput,
        });
    }
    Ok(series)
}

/// `GET /version`'s `version`, if the server has that route.
async fn server_version(settings: &HttpSettings) -> Option<String> {
    let mut conn = crate::client::Connection::open(&settings.target).await.ok()?;
    let key = settings.api_key.as_deref();
    let (status, body) = crate::client::send(&mut conn, &settings.target, "/version", key, None)
        .await
        .ok()?;
    let bytes = crate::client::read_all(body).await.ok()?;
    if !status.is_success() {
        return None;
    }
    let doc: Value = serde_json::from_slice(&bytes).ok()?;
    doc.get("version")?.as_str().map(str::to_owned)
}

async fn send(driver: &Driver, index: usize, pace: &Pace, requests: &[BenchRequest], seed: u64) -> Report {
    match driver {
        Driver::Http(list) => run(&list[index].1, pace, requests).await,
        Driver::Offline {
            engine,
            vocab,
            profile,
            sampling,
            ..
        } => {
            let ids = workload::random_prompt_ids(*vocab, requests, seed);
            let before = StepTimes::read(engine.metrics());
            let report = run_offline(engine, pace, requests, &ids, sampling).await;
            if *profile {
                eprintln!("{}", StepTimes::read(engine.metrics()).since(&before));
            }
            report
        }
    }
}

/// The ratio table, as text.
pub fn ratios_text(ratios: &[Ratio]) -> String {
    let x = |v: f64| {
        if v.is_finite() {
            format!("{v:.2}x")
        } else {
            "-".into()
        }
    };
    let mut out = String::new();
    for r in ratios {
        let goodput = r
            .goodput_requests_per_s
            .map(|g| format!(", goodput {}", x(g)))
            .unwrap_or_default();
        out.push_str(&format!(
            "{} / {}, {}: output tok/s {}, req/s {}, TTFT p50 {}, ITL p50 {}{goodput}\n",
            r.target,
            r.baseline,
            r.run,
            x(r.output_tokens_per_s),
            x(r.requests_per_s),
            x(r.ttft_p50),
            x(r.itl_p50)
        ));
    }
    out
}

/// What the document says about the run beyond its numbers.
pub struct Context {
    pub command: Vec<String>,
    pub model: String,
    pub endpoint: String,
    pub ignore_eos: bool,
    pub workload: Value,
    pub plan: Value,
}

/// The session as a JSON document (schema [`SCHEMA`], described in docs/bench.md).
pub fn document(context: &Context, options: &SessionOptions, series: &[Series], ratios: &[Ratio]) -> Value {
    json!({
        "schema": SCHEMA,
        "created": rfc3339_utc(SystemTime::now()),
        "inferd_version": env!("CARGO_PKG_VERSION"),
        "command": context.command,
        "host": host(),
        "model": context.model,
        "endpoint": context.endpoint,
        "stream": options.stream,
        "ignore_eos": context.ignore_eos,
        "seed": options.seed,
        "warmup": options.warmup,
        "arrival": options.arrival,
        "max_concurrency": options.max_concurrency,
        "plan": context.plan,
        "workload": context.workload,
        "slo": if options.slo.is_empty() { Value::Null } else { json!(options.slo) },
        "knee_factor": sweep::KNEE_FACTOR,
        "targets": series,
        "comparison": ratios,
    })
}

/// The machine the benchmark ran on (the client's; the server may be elsewhere).
pub fn host() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_bytes": crate::engine::total_memory(),
    })
}

/// `2026-12-04T22:30:05Z`.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    crate::text::template::strftime("%Y-%m-%dT%H:%M:%SZ", secs as i64)
}

/// Parses the targets of `--url` (named by host:port) and `--target NAME=URL`.
pub fn targets(urls: &[String], named: &[String]) -> Result<Vec<(String, Target)>, String> {
    let mut out: Vec<(String, Target)> = Vec::new();
    for url in urls {
        let target = Target::parse(url)?;
        out.push((target.authority.clone(), target));
    }
    for spec in named {
        let (name, url) = spec
            .split_once('=')
            .filter(|(n, _)| !n.trim().is_empty())
            .ok_or_else(|| format!("--target {spec}: not NAME=URL"))?;
        out.push((name.trim().to_owned(), Target::parse(url.trim())?));
    }
    for (i, (name, _)) in out.iter().enumerate() {
        if out[..i].iter().any(|(n, _)| n == name) {
            return Err(format!(
                "two targets are named {name}: name them with --target NAME=URL"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_423_405), "2026-12-04T22:30:05Z");
    }

    #[test]
    fn targets_are_named_by_address_or_by_the_user() {
        let t = targets(
            &["http://127.0.0.1:8000".into()],
            &["slow=http://127.0.0.1:9000/v1".into()],
        )
        .unwrap();
        assert_eq!(t[0].0, "127.0.0.1:8000");
        assert_eq!((t[1].0.as_str(), t[1].1.base_path.as_str()), ("slow", "/v1"));
        assert!(targets(&[], &["=http://x:1".into()]).is_err());
        assert!(targets(&["http://a:1".into(), "http://a:1".into()], &[]).is_err());
    }
}

/// An engine's step counters, to tell where a run's step time went (`--profile`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub steps: u64,
    pub steps_ahead: u64,
    pub profile: crate::engine::StepProfile,
}

impl StepTimes {
    pub fn read(metrics: &crate::engine::EngineMetrics) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        StepTimes {
            steps: metrics.steps.load(Relaxed),
            steps_ahead: metrics.steps_ahead.load(Relaxed),
            profile: metrics.profile(),
        }
    }

    /// One line: per step, the engine thread's planning, waiting and processing, and
    /// the stream's forward pass, between `before` and now.
    pub fn since(&self, before: &StepTimes) -> String {
        let steps = self.steps.saturating_sub(before.steps);
        if steps == 0 {
            return "profile: no steps".into();
        }
        let per_step = |now: f64, then: f64| (now - then) / steps as f64 * 1e3;
        let (p, b) = (&self.profile, &before.profile);
        format!(
            "profile: {steps} steps ({} launched ahead); per step, engine thread: plan {:.3} ms, wait {:.3} ms, process {:.3} ms; stream: forward {:.3} ms",
            self.steps_ahead.saturating_sub(before.steps_ahead),
            per_step(p.plan, b.plan),
            per_step(p.wait, b.wait),
            per_step(p.process, b.process),
            per_step(p.forward, b.forward),
        )
    }
}
