//! `inferd serve` flags: transformers serve's torch-only options and impossible settings
//! are refused before anything loads; --dtype and --log-level take effect.

use std::process::Command;

use serde_json::json;

use super::server::Server;

#[test]
fn torch_only_and_impossible_flags_are_refused_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--compile"], "--compile"),
        (&["--attn-implementation", "sdpa"], "--attn-implementation"),
        (&["--quantization", "bnb-4bit"], "--quantization"),
        (&["--trust-remote-code"], "--trust-remote-code"),
        (&["--dtype", "float16"], "float16"),
        (&["--dtype", "int3"], "--dtype"),
        (&["--device", "cuda"], "--device cuda"),
        (&["--device", "mps"], "--device mps"),
        (&["--log-level", "loud"], "--log-level"),
        (&["--cb-use-cuda-graph"], "--cb-use-cuda-graph"),
        (&["--cb-max-memory-percent", "80"], "(0, 1]"),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--port", "0"])
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn dtype_and_log_level_take_effect() {
    let question =
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0});
    // float32 weights (the checkpoint is bf16): the same greedy answer; warning level
    // prints no access log.
    let s = Server::start(&[
        "--dtype",
        "torch.float32",
        "--log-level",
        "warning",
        "--cb-use-cuda-graph",
        "false",
    ]);
    let r = s.post("/v1/chat/completions", question.clone());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(s.log_lines(), Vec::<String>::new());
    drop(s);
    // The default level logs one line per request, with its id and status; probes
    // and pollers that succeed (several a second in a fleet) only at debug.
    let s = Server::start(&["--dtype", "bfloat16", "--continuous-batching"]);
    let r = s.request("GET", "/health", &[("x-request-id", "probe-7")], None);
    assert_eq!(r.status, 200);
    assert_eq!(s.request("GET", "/metrics", &[], None).status, 200);
    let r = s.request("GET", "/v1/models", &[("x-request-id", "list-7")], None);
    assert_eq!(r.status, 200);
    let lines = s.log_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("inferd: GET /v1/models 200 list-7 "), "{lines:?}");
}
