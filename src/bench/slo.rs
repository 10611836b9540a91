//! Latency targets (`--slo ttft=200ms,itl:p99=50ms`) and goodput: the requests, and
//! their tokens, per second that met every target, as vLLM's benchmark counts it (a
//! request is good when its own TTFT, mean inter-token latency, TPOT and end-to-end
//! latency are each within their target). Each target also names a percentile (p90
//! unless given), which judges the run as a whole: the run meets the targets when that
//! percentile of each measure over all its requests is within the target.

use serde::Serialize;

/// One request's measures, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    pub ttft_ms: f64,
    /// The mean gap between successive tokens of this request (0 with one token).
    pub itl_ms: f64,
    /// (latency - TTFT) / (output tokens - 1): vLLM's time per output token.
    pub tpot_ms: f64,
    pub latency_ms: f64,
    pub output_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Ttft,
    Itl,
    Tpot,
    Latency,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft",
            Metric::Itl => "itl",
            Metric::Tpot => "tpot",
            Metric::Latency => "latency",
        }
    }

    fn of(self, s: &Sample) -> f64 {
        match self {
            Metric::Ttft => s.ttft_ms,
            Metric::Itl => s.itl_ms,
            Metric::Tpot => s.tpot_ms,
            Metric::Latency => s.latency_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    pub metric: Metric,
    /// 50, 90 or 99: which percentile over the run's requests judges the run.
    pub percentile: u8,
    pub limit_ms: f64,
}

/// Every target a run is held to.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Slo {
    pub targets: Vec<Target>,
}

impl Slo {
    /// `ttft=200ms,itl:p99=50ms,latency=2s`: metrics ttft, itl, tpot, latency (or e2el);
    /// durations in ms (the default unit) or s; percentiles p50, p90 (default), p99.
    pub fn parse(text: &str) -> Result<Slo, String> {
        let mut targets: Vec<Target> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .or_else(|| part.split_once(':').filter(|(_, v)| !v.starts_with('p')))
                .ok_or_else(|| format!("--slo: `{part}` is not METRIC=DURATION (for example ttft=200ms)"))?;
            let (name, percentile) = match key.split_once(':') {
                Some((name, p)) => (name.trim(), parse_percentile(p.trim())?),
                None => (key.trim(), 90),
            };
            let metric = match name {
                "ttft" => Metric::Ttft,
                "itl" => Metric::Itl,
                "tpot" => Metric::Tpot,
                "latency" | "e2el" => Metric::Latency,
                other => return Err(format!("--slo: unknown measure `{other}` (ttft, itl, tpot or latency)")),
            };
            if targets.iter().any(|t| t.metric == metric) {
                return Err(format!("--slo: `{name}` is given twice"));
            }
            targets.push(Target {
                metric,
                percentile,
                limit_ms: parse_duration_ms(value.trim())?,
            });
        }
        if targets.is_empty() {
            return Err("--slo: no targets (for example ttft=200ms,itl=50ms)".into());
        }
        Ok(Slo { targets })
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Whether one request met every target.
    pub fn is_good(&self, sample: &Sample) -> bool {
        self.targets.iter().all(|t| t.metric.of(sample) <= t.limit_ms)
    }

    /// What the run's requests achieved against the targets, over `duration_s`.
    pub fn goodput(&self, samples: &[Sample], requests: usize, duration_s: f64) -> Goodput {
        let good: Vec<&Sample> = samples.iter().filter(|s| self.is_good(s)).collect();
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
        let checks: Vec<Check> = self
            .targets
            .iter()
            .map(|t| {
                let values: Vec<f64> = samples.iter().map(|s| t.metric.of(s)).collect();
                let observed = percentile(&values, t.percentile as f64 / 100.0);
                Check {
                    target: *t,
                    observed_ms: observed,
                    met: !values.is_empty() && observed <= t.limit_ms,
                }
            })
            .collect();
        Goodput {
            good_requests: good.len(),
            fraction: if requests > 0 {
                good.len() as f64 / requests as f64
            } else {
                0.0
            },
            requests_per_s: per_s(good.len() as f64),
            output_tokens_per_s: per_s(good.iter().map(|s| s.output_tokens).sum::<usize>() as f64),
            met: checks.iter().all(|c| c.met),
            checks,
        }
    }

    /// `ttft<=200ms (p90), itl<=50ms (p99)`.
    pub fn describe(&self) -> String {
        self.targets
            .iter()
            .map(|t| format!("{}<={}ms (p{})", t.metric.name(), t.limit_ms, t.percentile))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A run's goodput under an SLO.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goodput {
    /// Requests that met every target (failed requests never do).
    pub good_requests: usize,
    /// Of all requests sent.
    pub fraction: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Whether every target's percentile over the run is within it.
    pub met: bool,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub target: Target,
    /// The target's percentile of its measure over the run's requests.
    pub observed_ms: f64,
    pub met: bool,
}

fn parse_percentile(p: &str) -> Result<u8, String> {
    match p {
        "p50" => Ok(50),
        "p90" => Ok(90),
        "p99" => Ok(99),
        other => Err(format!("--slo: percentile `{other}` is not p50, p90 or p99")),
    }
}

/// `200ms`, `0.2s`, `200` (milliseconds).
pub fn parse_duration_ms(text: &str) -> Result<f64, String> {
    crate::units::parse_duration(text, "ms")
        .map(|d| d.as_secs_f64() * 1000.0)
        .map_err(|e| format!("--slo: {e}"))
}

/// Linear interpolation between closest ranks (numpy's default); 0 for no values.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ttft: f64, itl: f64, latency: f64) -> Sample {
        Sample {
            ttft_ms: ttft,
            itl_ms: itl,
            tpot_ms: itl,
            latency_ms: latency,
            output_tokens: 10,
        }
    }

    #[test]
    fn targets_parse_with_units_and_percentiles() {
        let slo = Slo::parse("ttft=200ms, itl:p99=0.05s,e2el=3").unwrap();
        assert_eq!(
            slo.targets,
            vec![
                Target {
                    metric: Metric::Ttft,
                    percentile: 90,
                    limit_ms: 200.0
                },
                Target {
                    metric: Metric::Itl,
                    percentile: 99,
                    limit_ms: 50.0
                },
                Target {
                    metric: Metric::Latency,
                    percentile: 90,
                    limit_ms: 3.0
                },
            ]
        );
        // vLLM's own spelling, METRIC:VALUE, reads too.
        assert_eq!(Slo::parse("ttft:200").unwrap().targets[0].limit_ms, 200.0);
        for bad in [
            "",
            "ttft",
            "ttft=-1ms",
            "ttft=fast",
            "speed=1s",
            "ttft:p95=1s",
            "ttft=1s,ttft=2s",
        ] {
            assert!(Slo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn goodput_counts_requests_within_every_target() {
        let slo = Slo::parse("ttft=100,itl:p50=20").unwrap();
        let samples = [
            sample(50.0, 10.0, 500.0),  // good
            sample(150.0, 10.0, 500.0), // TTFT over
            sample(50.0, 30.0, 900.0),  // ITL over
            sample(99.0, 19.0, 700.0),  // good
        ];
        // Five sent, one failed: the fraction is of all five.
        let g = slo.goodput(&samples, 5, 2.0);
        assert_eq!(g.good_requests, 2);
        assert_eq!(g.fraction, 0.4);
        assert_eq!(g.requests_per_s, 1.0);
        assert_eq!(g.output_tokens_per_s, 10.0);
        // p90 TTFT over the four is 134.7 ms: over 100. p50 ITL is 14.5 ms: within.
        assert!(!g.checks[0].met && g.checks[1].met && !g.met);
        assert!((g.checks[0].observed_ms - 134.7).abs() < 1e-9);
    }
}
