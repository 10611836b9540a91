//! The model manager over HTTP: on-demand loads, `/load_model` progress events in
//! transformers serve's bytes, shared and cached loads, failed loads that leave nothing
//! behind, a second model, and the idle timeout freeing memory.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::common::{installed_model, scratch_dir};
use super::server::Server;

const SMOL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn events(s: &Server, model: &str) -> Vec<Value> {
    let r = s.post("/load_model", json!({"model": model}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("text/event-stream; charset=utf-8"));
    r.events().iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

fn loaded(s: &Server) -> Vec<String> {
    let models = s.request("GET", "/v1/models", &[], None).json();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn chat(s: &Server, model: Option<&str>) -> super::server::Response {
    let mut body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "temperature": 0, "max_tokens": 8});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    s.post("/v1/chat/completions", body)
}

#[test]
fn load_model_reports_every_stage_then_serves_and_caches() {
    let s = Server::launch(&[], &[]);
    let r = s.post("/load_model", json!({"model": SMOL}));
    // Byte for byte what transformers serve sends (Python's json.dumps spacing).
    assert!(r.body.starts_with(
        "data: {\"status\": \"loading\", \"model\": \"HuggingFaceTB/SmolLM2-135M-Instruct@main\", \"stage\": \"processor\"}\n\n\
         data: {\"status\": \"loading\", \"model\": \"HuggingFaceTB/SmolLM2-135M-Instruct@main\", \"stage\": \"config\"}\n\n\
         data: {\"status\": \"loading\", \"model\": \"HuggingFaceTB/SmolLM2-135M-Instruct@main\", \"stage\": \"weights\", \"progress\": {\"current\": 1, \"total\": 272}}\n\n"
    ), "{}", r.body);
    let events: Vec<Value> = r.events().iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let weights: Vec<u64> = events[2..events.len() - 1]
        .iter()
        .map(|e| {
            assert_eq!(
                (&e["stage"], &e["progress"]["total"]),
                (&json!("weights"), &json!(272)),
                "{e}"
            );
            e["progress"]["current"].as_u64().unwrap()
        })
        .collect();
    assert!(weights.windows(2).all(|w| w[0] < w[1]), "{weights:?}");
    assert_eq!((weights[0], *weights.last().unwrap()), (1, 272));
    assert_eq!(
        events.last().unwrap(),
        &json!({"status": "ready", "model": "HuggingFaceTB/SmolLM2-135M-Instruct@main", "cached": false})
    );
    // In memory now: one event.
    assert_eq!(
        self::events(&s, SMOL),
        vec![json!({"status": "ready", "model": "HuggingFaceTB/SmolLM2-135M-Instruct@main", "cached": true})]
    );
    let r = chat(&s, Some(SMOL));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "HuggingFaceTB/SmolLM2-135M-Instruct@main");
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );

    // A second model loads when a request names it; both stay loaded.
    let r = chat(&s, Some("Qwen/Qwen2.5-Coder-0.5B-Instruct@main"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "Qwen/Qwen2.5-Coder-0.5B-Instruct@main");
    assert_eq!(
        loaded(&s),
        vec![
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct"
        ]
    );
    let m = s.request("GET", "/metrics", &[], None).body;
    assert!(
        m.contains("inferd_kv_blocks_total{model=\"Qwen/Qwen2.5-Coder-0.5B-Instruct@main\"} 256"),
        "{m}"
    );

    // Errors: unknown model (an error event, then a 404 for generation), bad ids and
    // missing names (400 before anything is touched).
    let missing = self::events(&s, "nobody/nothing");
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert_eq!(missing[1]["status"], "error");
    assert_eq!(missing[1]["model"], "nobody/nothing@main");
    // (Test servers run with HF_HUB_OFFLINE=1: no hub to try.)
    assert!(
        missing[1]["message"]
            .as_str()
            .unwrap()
            .contains("not in the Hugging Face cache"),
        "{missing:?}"
    );
    let r = chat(&s, Some("nobody/nothing"));
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );
    for bad in ["../../etc", "/abs/path", "a//b", "org/name@../x", ""] {
        let r = s.post("/load_model", json!({"model": bad}));
        assert_eq!(
            (r.status, r.json()["error"]["param"].clone()),
            (400, json!("model")),
            "{bad}: {}",
            r.body
        );
        let r = chat(&s, Some(bad));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = s.post("/load_model", json!({}));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("model")));
    let r = chat(&s, None);
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("model")));
}

/// Concurrent loads of one model share one load, and every follower sees it all.
#[test]
fn concurrent_loads_share_one_load() {
    let s = Server::launch(&[], &[]);
    let port = s.port;
    let runs: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let r = super::server::Server::request_port(port, "POST", "/load_model", &json!({"model": SMOL}));
                r.events().len()
            })
        })
        .collect();
    let counts: Vec<usize> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    // Each saw processor, config, weights..., ready (not a cached single event).
    assert!(counts.iter().all(|&n| n > 4), "{counts:?}");
    let log = s.log_lines().join("\n");
    assert_eq!(
        log.matches("loaded HuggingFaceTB/SmolLM2-135M-Instruct@main").count(),
        1,
        "{log}"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn idle_models_are_unloaded_and_their_memory_freed() {
    let s = Server::launch(&["--model-timeout", "2"], &[]);
    let before = rss_bytes(s.pid());
    assert_eq!(chat(&s, Some(SMOL)).status, 200);
    let with_model = rss_bytes(s.pid());
    assert_eq!(loaded(&s), vec![SMOL]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !loaded(&s).is_empty() {
        assert!(Instant::now() < deadline, "still loaded after 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The bf16 weights alone are 270 MB; the engine stops (and frees them) just after
    // the model leaves the registry.
    assert!(with_model > before + 200_000_000, "{before} -> {with_model}");
    let freed = |after: u64| after + 200_000_000 < with_model;
    let mut after = rss_bytes(s.pid());
    while !freed(after) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = rss_bytes(s.pid());
    }
    assert!(
        freed(after),
        "unloading freed too little: {before} -> {with_model} -> {after}"
    );
    // A later request loads it again.
    assert_eq!(chat(&s, Some(SMOL)).status, 200);
    assert_eq!(loaded(&s), vec![SMOL]);
}

/// A cache holding SmolLM2 and a broken copy of it (truncated weights, or a missing
/// tokenizer): each failed load is one error event, and leaves nothing loaded.
#[test]
fn failed_loads_end_with_one_error_and_leave_nothing_behind() {
    let cache = scratch_dir("manager-broken-cache");
    let smol = installed_model(SMOL);
    let add = |repo: &str, edit: &dyn Fn(&Path)| {
        let snapshot = cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots/0000");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(snapshot.parent().unwrap().parent().unwrap().join("refs")).unwrap();
        std::fs::write(snapshot.parent().unwrap().parent().unwrap().join("refs/main"), "0000").unwrap();
        for entry in std::fs::read_dir(&smol).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
        }
        edit(&snapshot);
    };
    add(SMOL, &|_| {});
    add("test/truncated", &|dir| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("model.safetensors"))
            .unwrap();
        file.set_len(10_000_000).unwrap();
    });
    add("test/no-tokenizer", &|dir| {
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap()
    });
    let s = Server::launch(&[], &[("HF_HUB_CACHE", cache.to_str().unwrap())]);
    for repo in ["test/truncated", "test/no-tokenizer"] {
        for _ in 0..2 {
            let events = events(&s, repo);
            let (last, rest) = events.split_last().unwrap();
            assert_eq!(last["status"], "error", "{events:?}");
            assert!(rest.iter().all(|e| e["status"] == "loading"), "{events:?}");
            assert!(!last["message"].as_str().unwrap().is_empty());
            assert_eq!(loaded(&s), Vec::<String>::new());
        }
        let r = chat(&s, Some(repo));
        assert_eq!(r.status, 500, "{}", r.body);
    }
    // The good model still loads and serves.
    assert_eq!(chat(&s, Some(SMOL)).status, 200);
    assert_eq!(loaded(&s), vec![SMOL]);
}

/// `--models-memory`: a second model that does not fit beside the first unloads the
/// least recently used idle one; a model larger than the whole budget is refused.
#[test]
fn models_memory_unloads_the_least_recently_used_idle_model_to_make_room() {
    let cache = scratch_dir("manager-budget-cache");
    let link = |repo: &str, source: &str| {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = repo_dir.join("snapshots/0000");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "0000").unwrap();
        for entry in std::fs::read_dir(installed_model(source)).unwrap() {
            let entry = entry.unwrap();
            let target = std::fs::canonicalize(entry.path()).unwrap();
            std::os::unix::fs::symlink(target, snapshot.join(entry.file_name())).unwrap();
        }
    };
    link("test/smol-a", SMOL);
    link("test/smol-b", SMOL);
    link("test/qwen", "Qwen/Qwen2.5-Coder-0.5B-Instruct");
    // SmolLM2's bf16 checkpoint is ~270 MB: one fits, two do not.
    let s = Server::launch(
        &["--models-memory", "400000000"],
        &[("HF_HUB_CACHE", cache.to_str().unwrap())],
    );
    assert_eq!(chat(&s, Some("test/smol-a")).status, 200);
    assert_eq!(loaded(&s), vec!["test/smol-a"]);
    assert_eq!(chat(&s, Some("test/smol-b")).status, 200);
    assert_eq!(loaded(&s), vec!["test/smol-b"]);
    let log = s.log_lines().join("\n");
    assert!(
        log.contains("unloading test/smol-a@main (least recently used) to make room for test/smol-b@main"),
        "{log}"
    );
    let r = chat(&s, Some("test/qwen"));
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (503, json!("insufficient_memory")),
        "{}",
        r.body
    );
    assert_eq!(loaded(&s), vec!["test/smol-b"]);
}

/// A request that is bad in any way is refused (400 naming the field) before it can
/// cause a load: the model stays unloaded, and `/metrics` has no engine for it. A good
/// request then loads it (so the check can see a load).
#[test]
fn bad_requests_are_refused_before_any_load() {
    let s = Server::launch(&[], &[]);
    let messages = json!([{"role": "user", "content": "hi"}]);
    let bad = [
        ("/v1/chat/completions", json!({"temperature": -1}), "temperature"),
        ("/v1/chat/completions", json!({"top_k": -5}), "top_k"),
        ("/v1/chat/completions", json!({"n": 0}), "n"),
        ("/v1/chat/completions", json!({"top_p": 0}), "top_p"),
        ("/v1/chat/completions", json!({"max_tokens": 0}), "max_tokens"),
        (
            "/v1/chat/completions",
            json!({"presence_penalty": 9}),
            "presence_penalty",
        ),
        ("/v1/chat/completions", json!({"logit_bias": {"3": 500}}), "logit_bias"),
        (
            "/v1/chat/completions",
            json!({"min_tokens": 9, "max_tokens": 2}),
            "min_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"generation_config": {"top_p": 7}}),
            "generation_config",
        ),
        ("/v1/chat/completions", json!({"frobnicate": 1}), "frobnicate"),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}),
            "temperature",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 0}), "n"),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 99}), "logprobs"),
        ("/v1/responses", json!({"input": "x", "temperature": -1}), "temperature"),
        ("/v1/responses", json!({"input": "x", "top_p": 3}), "top_p"),
    ];
    for (route, fields, param) in bad {
        let mut body = json!({"model": SMOL});
        if route == "/v1/chat/completions" {
            body["messages"] = messages.clone();
        }
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let r = s.post(route, body.clone());
        assert_eq!(
            (r.status, r.json()["error"]["param"].clone()),
            (400, json!(param)),
            "{route} {body}: {}",
            r.body
        );
    }
    let engines = |s: &Server| {
        let m = s.request("GET", "/metrics", &[], None).body;
        m.lines()
            .filter(|l| l.starts_with("inferd_kv_blocks_total{model="))
            .count()
    };
    assert_eq!(engines(&s), 0);
    assert!(loaded(&s).is_empty(), "{:?}", loaded(&s));
    let r = chat(&s, Some(SMOL));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(engines(&s), 1);
    assert_eq!(loaded(&s), vec![SMOL]);
}
