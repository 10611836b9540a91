//! The loads of a session and where latency leaves its floor.
//!
//! A sweep, in guidellm's manner: a synchronous run (one request at a time) measures the
//! floor and the rate one client reaches, a throughput run (every request at once)
//! measures the most the server can do, and rates evenly spaced above the first up to
//! the second fill the curve (guidellm's `linspace(sync, max, N - 1)[1:]`). The knee is
//! the highest load whose median request latency is still within [`KNEE_FACTOR`] of the
//! lowest median seen: past it, requests queue (or fail).

use serde::Serialize;

use super::Report;

/// Latency (p50) above this multiple of its floor has left the floor.
pub const KNEE_FACTOR: f64 = 1.5;

/// The load one run puts on a server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Load {
    /// At most this many requests in flight, each sent when one ends.
    Concurrency(usize),
    /// Requests arriving at this many per second.
    Rate(f64),
    /// One request at a time.
    Synchronous,
    /// Every request at once.
    Throughput,
}

impl Load {
    pub fn label(&self) -> String {
        match self {
            Load::Concurrency(c) => format!("concurrency {c}"),
            Load::Rate(r) => format!("rate {}/s", round_sig(*r, 3)),
            Load::Synchronous => "synchronous".into(),
            Load::Throughput => "throughput".into(),
        }
    }
}

/// `points - 2` rates evenly spaced above a synchronous run's request rate, the last at
/// the throughput run's, so that the sweep has `points` runs in all (as guidellm).
pub fn sweep_rates(synchronous_rps: f64, throughput_rps: f64, points: usize) -> Vec<f64> {
    let rates = points.saturating_sub(2);
    let ordered = synchronous_rps > 0.0 && throughput_rps > synchronous_rps;
    if rates == 0 || !ordered {
        return Vec::new();
    }
    let step = (throughput_rps - synchronous_rps) / rates as f64;
    (1..=rates).map(|k| synchronous_rps + step * k as f64).collect()
}

/// Where on a load axis a report sits: its concurrency for concurrency runs, else the
/// request rate (offered for rate runs, achieved for synchronous and throughput ones).
pub fn load_x(report: &Report) -> f64 {
    match report.load {
        Load::Concurrency(c) => c as f64,
        Load::Rate(r) => r,
        Load::Synchronous | Load::Throughput => report.requests_per_s,
    }
}

/// The axis [`load_x`] measures for these reports.
pub fn load_axis<'a>(mut reports: impl Iterator<Item = &'a Report>) -> &'static str {
    if reports.all(|r| matches!(r.load, Load::Concurrency(_))) {
        "concurrency"
    } else {
        "request rate (req/s)"
    }
}

/// The last load before median latency leaves its floor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Knee {
    /// Index of the run in the series.
    pub run: usize,
    pub label: String,
    pub load_x: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub latency_p50_ms: f64,
    /// The lowest median latency of the series.
    pub floor_ms: f64,
    /// The first run past the knee (latency above KNEE_FACTOR x floor).
    pub next_label: String,
    pub next_latency_p50_ms: f64,
}

/// The knee of a series of runs in increasing load, or `None` when latency never left
/// its floor (the series did not reach saturation) or left it at the first run. A run
/// that lost more than half its requests has left the floor too.
pub fn knee(reports: &[Report]) -> Option<Knee> {
    let failing = |r: &Report| 2 * r.failed > r.requests;
    let floor = reports
        .iter()
        .filter(|r| !failing(r))
        .map(|r| r.latency_ms.p50)
        .fold(f64::INFINITY, f64::min);
    let past = reports
        .iter()
        .position(|r| failing(r) || r.latency_ms.p50 > KNEE_FACTOR * floor)?;
    let run = past.checked_sub(1)?;
    let (at, next) = (&reports[run], &reports[past]);
    Some(Knee {
        run,
        label: at.label.clone(),
        load_x: load_x(at),
        requests_per_s: at.requests_per_s,
        output_tokens_per_s: at.output_tokens_per_s,
        latency_p50_ms: at.latency_ms.p50,
        floor_ms: floor,
        next_label: next.label.clone(),
        next_latency_p50_ms: next.latency_ms.p50,
    })
}

/// `x` to `digits` significant digits (for labels).
pub fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Distribution;

    fn report(load: Load, rps: f64, p50: f64) -> Report {
        Report {
            label: load.label(),
            load,
            concurrency: 1,
            stream: true,
            requests: 10,
            failed: 0,
            errors: vec![],
            duration_s: 1.0,
            requests_per_s: rps,
            input_tokens: 0,
            output_tokens: 0,
            input_tokens_per_s: 0.0,
            output_tokens_per_s: rps * 10.0,
            chunks_per_s: 0.0,
            ttft_ms: Distribution::default(),
            itl_ms: Distribution::default(),
            tpot_ms: Distribution::default(),
            latency_ms: Distribution {
                p50,
                ..Default::default()
            },
            goodput: None,
            samples: vec![],
            itls: vec![],
        }
    }

    #[test]
    fn sweep_rates_fill_between_the_ends() {
        assert_eq!(sweep_rates(1.0, 5.0, 6), vec![2.0, 3.0, 4.0, 5.0]);
        assert_eq!(sweep_rates(1.0, 5.0, 2), Vec::<f64>::new());
        // A server no faster all at once than one at a time: nothing between.
        assert_eq!(sweep_rates(3.0, 2.0, 8), Vec::<f64>::new());
    }

    #[test]
    fn knee_is_the_last_run_before_latency_leaves_its_floor() {
        let runs = [
            report(Load::Synchronous, 1.0, 100.0),
            report(Load::Rate(2.0), 2.0, 110.0),
            report(Load::Rate(3.0), 2.9, 140.0),
            report(Load::Rate(4.0), 3.2, 400.0),
            report(Load::Throughput, 3.3, 900.0),
        ];
        let k = knee(&runs).unwrap();
        assert_eq!((k.run, k.label.as_str(), k.load_x), (2, "rate 3/s", 3.0));
        assert_eq!((k.floor_ms, k.next_latency_p50_ms), (100.0, 400.0));
        // Never left: no knee; left at once: none either.
        assert_eq!(knee(&runs[..3]), None);
        let mut first_high = runs.clone();
        first_high[0].latency_ms.p50 = 1000.0;
        assert_eq!(knee(&first_high), None);
        // A run that mostly failed has left the floor, whatever its survivors' latency.
        let mut failing = runs.clone();
        failing[2].failed = 6;
        failing[2].latency_ms.p50 = 50.0;
        assert_eq!(knee(&failing).unwrap().label, "rate 2/s");
        // Synchronous and throughput runs sit at their achieved rate.
        assert_eq!(load_x(&runs[4]), 3.3);
        assert_eq!(load_axis(runs.iter()), "request rate (req/s)");
        assert_eq!(load_axis(runs[..0].iter()), "concurrency");
    }
}
