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
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, concurrency) in runs.iter().zip([1, 3]) {
        assert_eq!(run["concurrency"], concurrency);
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
