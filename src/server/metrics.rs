//! Server metrics in the Prometheus text format: requests by route and status, latency
//! histograms (time to first token, time between tokens), token counts, and the engine's
//! own gauges (queue, running, KV blocks, prefix-cache hits).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::EngineMetrics;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Ordering::Relaxed));
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

#[derive(Default)]
pub struct ServerMetrics {
    /// (route, status) -> count. Touched once per request, off the engine's path.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

impl ServerMetrics {
    pub fn count_request(&self, route: &'static str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route, status)).or_default() += 1;
        }
    }

    /// The server's own series, then each loaded model's engine series, labelled
    /// `model="org/name@revision"`.
    pub fn render(&self, engines: &[(&str, &EngineMetrics)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP inferd_requests_total HTTP requests by route and status.\n# TYPE inferd_requests_total counter"
        );
        if let Ok(map) = self.requests.lock() {
            for ((route, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "inferd_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        if let Some((in_use, free)) = heap_bytes() {
            let _ = writeln!(
                out,
                "# HELP inferd_heap_bytes The allocator's heap: bytes in use, and freed bytes it keeps.\n# TYPE inferd_heap_bytes gauge\ninferd_heap_bytes{{state=\"in_use\"}} {in_use}\ninferd_heap_bytes{{state=\"free\"}} {free}"
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "inferd_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "inferd_inter_token_latency_seconds",
            "Time between streamed tokens.",
        );
        let r = Ordering::Relaxed;
        for (name, help, value) in [
            (
                "inferd_prompt_tokens_total",
                "Prompt tokens of served requests.",
                self.prompt_tokens.load(r),
            ),
            (
                "inferd_completion_tokens_total",
                "Tokens generated for served requests.",
                self.completion_tokens.load(r),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        type Read = fn(&EngineMetrics) -> u64;
        let series: [(&str, &str, &str, Read); 12] = [
            (
                "inferd_engine_tokens_generated_total",
                "counter",
                "Tokens sampled by the engine.",
                |e| e.tokens_generated.load(Ordering::Relaxed),
            ),
            (
                "inferd_engine_tokens_computed_total",
                "counter",
                "Tokens run through the model.",
                |e| e.tokens_computed.load(Ordering::Relaxed),
            ),
            (
                "inferd_engine_preemptions_total",
                "counter",
                "Sequences preempted for KV blocks.",
                |e| e.preemptions.load(Ordering::Relaxed),
            ),
            ("inferd_engine_steps_total", "counter", "Engine steps.", |e| {
                e.steps.load(Ordering::Relaxed)
            }),
            (
                "inferd_prefix_cache_queries_total",
                "counter",
                "Prefix-cache block lookups.",
                |e| e.prefix_cache_queries.load(Ordering::Relaxed),
            ),
            (
                "inferd_prefix_cache_hits_total",
                "counter",
                "Prefix-cache block hits.",
                |e| e.prefix_cache_hits.load(Ordering::Relaxed),
            ),
            (
                "inferd_requests_waiting",
                "gauge",
                "Requests queued, not yet running.",
                |e| e.waiting.load(Ordering::Relaxed) as u64,
            ),
            (
                "inferd_requests_pending",
                "gauge",
                "Requests accepted and not yet admitted (counts toward --max-waiting).",
                |e| e.pending.load(Ordering::Relaxed) as u64,
            ),
            (
                "inferd_sequences_running",
                "gauge",
                "Sequences in the running batch.",
                |e| e.running.load(Ordering::Relaxed) as u64,
            ),
            ("inferd_kv_blocks_total", "gauge", "KV cache blocks in the pool.", |e| {
                e.kv_blocks_total.load(Ordering::Relaxed) as u64
            }),
            (
                "inferd_kv_blocks_used",
                "gauge",
                "KV cache blocks held by sequences.",
                |e| e.kv_blocks_used.load(Ordering::Relaxed) as u64,
            ),
            (
                "inferd_engine_last_step_microseconds",
                "gauge",
                "Duration of the last engine step.",
                |e| e.last_step_micros.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, read) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, engine) in engines {
                let model = label_value(model);
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", read(engine));
            }
        }
        render_fleet(&mut out, engines);
        out
    }
}

/// A label value with `\` and `"` escaped.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The model-server protocol of the Kubernetes inference gateways (Gateway API Inference
/// Extension, llm-d): the series their endpoint picker reads to choose a replica, with
/// vLLM's types, meanings and label names under inferd's prefix (docs/scale-out.md
/// gives the picker's configuration for them).
fn render_fleet(out: &mut String, engines: &[(&str, &EngineMetrics)]) {
    let r = Ordering::Relaxed;
    type Read = fn(&EngineMetrics) -> f64;
    let gauges: [(&str, &str, Read); 3] = [
        (
            "inferd:num_requests_waiting",
            "Requests waiting to run: accepted and not yet admitted, or preempted.",
            |e| e.pending.load(Ordering::Relaxed).max(e.waiting.load(Ordering::Relaxed)) as f64,
        ),
        ("inferd:num_requests_running", "Sequences in the running batch.", |e| {
            e.running.load(Ordering::Relaxed) as f64
        }),
        (
            "inferd:kv_cache_usage_perc",
            "Fraction of KV cache blocks held by sequences, from 0 to 1.",
            |e| {
                let total = e.kv_blocks_total.load(Ordering::Relaxed);
                if total == 0 {
                    0.0
                } else {
                    e.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64
                }
            },
        ),
    ];
    for (name, help, read) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (model, engine) in engines {
            let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {}", label_value(model), read(engine));
        }
    }
    let name = "inferd:cache_config_info";
    let _ = writeln!(
        out,
        "# HELP {name} The KV cache's configuration, in its labels: tokens per block, blocks in all.\n# TYPE {name} gauge"
    );
    for (model, engine) in engines {
        let _ = writeln!(
            out,
            "{name}{{model_name=\"{}\",block_size=\"{}\",num_gpu_blocks=\"{}\"}} 1",
            label_value(model),
            engine.kv_block_size.load(r),
            engine.kv_blocks_total.load(r),
        );
    }
}

/// glibc's heap statistics (`mallinfo2`, glibc 2.33+): bytes in use (small and mmapped
/// blocks) and freed bytes the allocator keeps; a leak grows the first.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_bytes() -> Option<(usize, usize)> {
    #[repr(C)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: mallinfo2 only reads the allocator's counters (under its locks).
    let info = unsafe { mallinfo2() };
    // `fordblks` counts the fastbins' free blocks (`fsmblks`) too.
    Some((info.uordblks + info.hblkhd, info.fordblks))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_bytes() -> Option<(usize, usize)> {
    None
}
