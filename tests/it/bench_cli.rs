//! `inferd bench` against a real server: exact output lengths (ignore_eos), the counts
//! and percentiles in its JSON report, and a clear failure for an unreachable server.

use std::process::Command;

use super::common::scratch_dir;
use super::server::Server;

#[test]
fn bench_reports_exact_counts_against_a_live_server() {
    let s = Server::start(&[]);
    let report = scratch_dir("bench-cli").join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args(["bench", "--url", &format!("http://127.0.0.1:{}", s.port)])
        .args(["--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--concurrency", "1,3"])
        .args([
            "--num-requests",
            "6",
            "--input-len",
            "16",
            "--output-len",
            "5",
            "--quiet",
        ])
        .args(["--json", report.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("concurrency 3: 6 requests (0 failed)"), "{stdout}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(doc["schema"], "inferd-bench/1");
    assert_eq!(doc["targets"].as_array().unwrap().len(), 1);
    let runs = doc["targets"][0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, concurrency) in runs.iter().zip([1, 3]) {
        assert_eq!(run["concurrency"], concurrency);
        assert_eq!(
            run["load"],
            serde_json::json!({"kind": "concurrency", "value": concurrency})
        );
        assert_eq!(
            (run["requests"].as_u64(), run["failed"].as_u64()),
            (Some(6), Some(0)),
            "{run}"
        );
        // ignore_eos makes every reply exactly --output-len tokens (from the usage frames).
        assert_eq!(run["output_tokens"], 30, "{run}");
        // Random prompts of 16 vocabulary tokens come back as roughly 16 tokens each.
        let input = run["input_tokens"].as_u64().unwrap();
        assert!((6 * 10..=6 * 40).contains(&input), "{run}");
        let ttft = &run["ttft_ms"];
        assert!(
            ttft["p50"].as_f64().unwrap() > 0.0 && ttft["p50"].as_f64() <= ttft["p99"].as_f64(),
            "{run}"
        );
        assert!(run["itl_ms"]["mean"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    drop(s);
    // Nothing listening there any more: every warm-up request fails, and bench says so.
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args(["bench", "--url", "http://127.0.0.1:9", "--model", "x", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

/// `--offline` drives an engine in-process; `--load-format dummy` needs only a config.
#[test]
fn offline_bench_on_dummy_weights_writes_reports_and_plots() {
    let dir = scratch_dir("bench-offline");
    let config_dir = dir.join("model");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::copy(
        super::common::installed_model("inferd-test/tiny-qwen2").join("config.json"),
        config_dir.join("config.json"),
    )
    .unwrap();
    let report = dir.join("report.json");
    let plots = dir.join("plots");
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args([
            "bench",
            "--offline",
            "--load-format",
            "dummy",
            "--model",
            config_dir.to_str().unwrap(),
        ])
        .args([
            "--concurrency",
            "1,4",
            "--num-requests",
            "8",
            "--input-len",
            "12",
            "--output-len",
            "6",
        ])
        .args([
            "--quiet",
            "--profile",
            "--json",
            report.to_str().unwrap(),
            "--plots",
            plots.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // `--profile`: a line per run (warm-up included); the CPU's default async scheduling
    // launches steps ahead.
    let ahead: Vec<(u64, u64)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("profile: "))
        .map(|l| {
            let (steps, rest) = l.split_once(" steps (").unwrap();
            let ahead = rest.split_once(' ').unwrap().0;
            assert!(rest.contains("plan ") && rest.contains("forward "), "{l}");
            (steps.parse().unwrap(), ahead.parse().unwrap())
        })
        .collect();
    assert!(ahead.len() >= 2, "{stderr}");
    assert!(
        ahead
            .iter()
            .all(|&(steps, ahead)| steps > 0 && ahead > 0 && ahead <= steps),
        "{ahead:?}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(doc["targets"][0]["name"], "offline");
    assert_eq!(doc["endpoint"], "engine");
    for run in doc["targets"][0]["runs"].as_array().unwrap() {
        assert_eq!(
            (run["requests"].as_u64(), run["failed"].as_u64()),
            (Some(8), Some(0)),
            "{run}"
        );
        // Exact lengths both ways: prompts are token ids, replies ignore EOS.
        assert_eq!(
            (run["input_tokens"].as_u64(), run["output_tokens"].as_u64()),
            (Some(96), Some(48))
        );
    }
    for name in ["throughput", "latency_vs_load", "ttft", "itl", "latency"] {
        let svg = std::fs::read_to_string(plots.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        let png = image::open(plots.join(format!("{name}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (960, 480), "{name}");
    }
}

#[test]
fn serve_with_dummy_weights_answers_exact_lengths() {
    let s = Server::start(&["--load-format", "dummy"]);
    let r = s.post(
        "/v1/chat/completions",
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 7);
}

/// `--kernels` times every kernel family in a model's shapes (its config.json) on the
/// CPU: the stream reference first, then each family once, and the decode families once per batch,
/// each with a positive bandwidth and its share of the reference's.
#[test]
fn kernel_bench_times_every_family_against_the_stream_reference() {
    // Timed once, and once per decode batch.
    const ONCE: [&str; 6] = [
        "stream (x += y)",
        "rms_norm",
        "add_rms_norm",
        "silu_mul",
        "rotary",
        "write_kv",
    ];
    const PER_BATCH: [&str; 4] = [
        "attention (decode)",
        "linear (gate_up)",
        "argmax_rows",
        "sample_rows (top-p)",
    ];
    let model = super::common::installed_model("inferd-test/tiny-qwen2");
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args([
            "bench",
            "--kernels",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
        ])
        .args([
            "--concurrency",
            "1,3",
            "--input-len",
            "40",
            "--max-num-batched-tokens",
            "64",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("kernel"), "{stdout}");
    let mut families = Vec::new();
    for line in lines {
        // From the end: share of the stream reference, GB/s, MB per call, microseconds per call.
        let mut fields = line.split_whitespace().rev();
        let share: f64 = fields.next().unwrap().trim_end_matches('%').parse().unwrap();
        let gbps: f64 = fields.next().unwrap().parse().unwrap();
        let mb: f64 = fields.next().unwrap().parse().unwrap();
        let micros: f64 = fields.next().unwrap().parse().unwrap();
        // Tiny shapes print as 0.0 GB/s: only the time must be there.
        assert!(micros > 0.0 && mb >= 0.0 && gbps >= 0.0 && share >= 0.0, "{line}");
        let family = ONCE
            .into_iter()
            .chain(PER_BATCH)
            .find(|f| line.starts_with(&format!("{f} ")))
            .unwrap_or_else(|| panic!("an unknown family: {line}"));
        families.push(family);
    }
    assert_eq!(families[0], "stream (x += y)", "the reference is timed first: {stdout}");
    for once in ONCE {
        assert_eq!(families.iter().filter(|f| **f == once).count(), 1, "{once}: {stdout}");
    }
    for per_batch in PER_BATCH {
        assert_eq!(
            families.iter().filter(|f| **f == per_batch).count(),
            2,
            "{per_batch}: {stdout}"
        );
    }
    assert!(stdout.contains("3 x 40 context"), "{stdout}");

    for extra in [&["--offline"][..], &["--json", "x.json"], &["--input-len", "0"]] {
        let refused = Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["bench", "--kernels", "--model", model.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{extra:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("--kernels"),
            "{extra:?}"
        );
    }
}
