//! What a fleet sees of inferd: the token routes a Dynamo worker drives
//! (`/inferd/v1/generate`, `/inferd/v1/kv_events`, `/inferd/v1/worker`), the gauges
//! the Kubernetes gateways' endpoint picker scrapes, `--served-model-name`, and a
//! model served from a plain folder. (tests/python/test_dynamo.py runs the worker
//! itself behind Dynamo's frontend.)

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::common::installed_model;
use super::server::Server;

const SMOL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// The JSON lines of a newline-delimited body.
fn lines(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Token ids of a completion choice, read from its `token_id:<id>` logprob entries.
fn choice_ids(choice: &Value) -> Vec<u32> {
    choice["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| as_id(t.as_str().unwrap()))
        .collect()
}

fn as_id(entry: &str) -> u32 {
    entry.strip_prefix("token_id:").unwrap().parse().unwrap()
}

fn chunk_ids(chunks: &[&Value]) -> Vec<u32> {
    chunks
        .iter()
        .flat_map(|c| {
            c["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
        })
        .collect()
}

fn prompt_ids(s: &Server, text: &str) -> Vec<u32> {
    let r = s.post("/tokenize", json!({"prompt": text}));
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_value(r.json()["tokens"].clone()).unwrap()
}

#[test]
fn the_token_route_generates_what_completions_do_chunk_by_chunk() {
    let s = Server::start(&[]);
    let ids = prompt_ids(&s, "The capital of France is");
    // Greedy, through /v1/completions with the same ids: the reference.
    let want = s.post(
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 12, "temperature": 0, "return_tokens_as_token_ids": true, "logprobs": 2}),
    );
    assert_eq!(want.status, 200, "{}", want.body);
    let want = want.json();
    let r = s.post(
        "/inferd/v1/generate",
        json!({"token_ids": ids, "model": SMOL,
               "sampling_options": {"temperature": 0, "guided_decoding": null},
               "stop_conditions": {"max_tokens": 12, "stop": null, "stop_token_ids_hidden": [2]},
               "output_options": {"logprobs": 2, "skip_special_tokens": true}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let chunks = lines(&r.body);
    let all: Vec<&Value> = chunks.iter().collect();
    assert_eq!(chunk_ids(&all), choice_ids(&want["choices"][0]), "{chunks:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last["finish_reason"], want["choices"][0]["finish_reason"]);
    assert_eq!(last["completion_usage"]["completion_tokens"], 12);
    assert_eq!(last["completion_usage"]["prompt_tokens"], ids.len());
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.get("finish_reason").is_none()));
    // Logprobs: one per token, and the top two alternatives, ranked from 1, as text.
    let reference = &want["choices"][0]["logprobs"];
    let mut k = 0;
    for c in &chunks {
        if c["token_ids"] == json!([]) {
            continue; // the end of a sequence may come alone
        }
        let lps = c["log_probs"].as_array().unwrap();
        let tops = c["top_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), c["token_ids"].as_array().unwrap().len());
        for (lp, top) in lps.iter().zip(tops) {
            let expected = reference["token_logprobs"][k].as_f64().unwrap();
            assert!((lp.as_f64().unwrap() - expected).abs() < 1e-4, "{lp} vs {expected}");
            let top = top.as_array().unwrap();
            assert_eq!(top.len(), 2);
            assert_eq!(top[0]["rank"], 1);
            assert_eq!(top[1]["rank"], 2);
            let named: BTreeMap<u32, f64> = reference["top_logprobs"][k]
                .as_object()
                .unwrap()
                .iter()
                .map(|(t, l)| (as_id(t), l.as_f64().unwrap()))
                .collect();
            for alt in top {
                let id = alt["token_id"].as_u64().unwrap() as u32;
                assert!((named[&id] - alt["logprob"].as_f64().unwrap()).abs() < 1e-4, "{alt}");
                let text = s.post("/detokenize", json!({"tokens": [id]})).json()["prompt"].clone();
                assert_eq!(alt["token"], text);
            }
            k += 1;
        }
    }
    // Sampling with a seed: the same tokens as the same request on /v1/completions; n
    // sequences come back under their indexes, each with its own end.
    let sampled = json!({"prompt": ids, "max_tokens": 8, "temperature": 0.9, "seed": 42, "n": 2,
                         "logprobs": 0, "return_tokens_as_token_ids": true});
    let want = s.post("/v1/completions", sampled).json();
    let r = s.post(
        "/inferd/v1/generate",
        json!({"token_ids": ids, "sampling_options": {"temperature": 0.9, "seed": 42, "n": 2},
               "stop_conditions": {"max_tokens": 8}}),
    );
    let chunks = lines(&r.body);
    for i in 0..2 {
        let mine: Vec<&Value> = chunks.iter().filter(|c| c["index"] == i).collect();
        assert_eq!(chunk_ids(&mine), choice_ids(&want["choices"][i]));
        assert_eq!(mine.iter().filter(|c| c.get("finish_reason").is_some()).count(), 1);
    }
}

#[test]
fn the_token_route_refuses_what_it_cannot_honour_naming_the_field() {
    let s = Server::start(&["--served-model-name", "smol"]);
    for (body, status, param) in [
        (json!({}), 400, "token_ids"),
        (json!({"token_ids": "abc"}), 400, "token_ids"),
        (json!({"token_ids": []}), 400, ""),
        (json!({"token_ids": [1], "model": "other"}), 404, "model"),
        (
            json!({"token_ids": [1], "sampling_options": {"use_beam_search": true}}),
            400,
            "sampling_options.use_beam_search",
        ),
        (
            json!({"token_ids": [1], "sampling_options": {"top_p": 0}}),
            400,
            "sampling_options.top_p",
        ),
        (
            json!({"token_ids": [1], "sampling_options": {"guided_decoding": {"regex": "("}}}),
            400,
            "sampling_options.guided_decoding",
        ),
        (
            json!({"token_ids": [1], "stop_conditions": {"max_tokens": 0}}),
            400,
            "stop_conditions.max_tokens",
        ),
        (
            json!({"token_ids": [1], "stop_conditions": {"max_thinking_tokens": 5}}),
            400,
            "stop_conditions.max_thinking_tokens",
        ),
        (
            json!({"token_ids": [1], "output_options": {"prompt_logprobs": 1}}),
            400,
            "output_options.prompt_logprobs",
        ),
        (json!({"token_ids": [99999999]}), 400, ""),
        (json!({"token_ids": vec![1; 5000]}), 422, "token_ids"),
        (
            json!({"token_ids": [1], "prefill_result": {"disaggregated_params": {}}}),
            400,
            "prefill_result",
        ),
    ] {
        let r = s.post("/inferd/v1/generate", body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let error = &r.json()["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.body);
        if !param.is_empty() {
            assert_eq!(error["param"], param, "{body}: {}", r.body);
        }
    }
    let r = s.request("GET", "/inferd/v1/generate", &[], None);
    assert_eq!(r.status, 405);
    // A structured constraint holds on the token route too.
    let ids = prompt_ids(&s, "Answer yes or no:");
    let r = s.post(
        "/inferd/v1/generate",
        json!({"token_ids": ids, "sampling_options": {"temperature": 0, "guided_decoding": {"choice": ["yes", "no"], "json": null}},
               "stop_conditions": {"max_tokens": 5}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks = lines(&r.body);
    let mut tokens = chunk_ids(&chunks.iter().collect::<Vec<_>>());
    // The stop token that ended it comes with the tokens (the frontend hides it).
    assert_eq!(tokens.pop(), Some(2), "{chunks:?}");
    let text = s.post("/detokenize", json!({"tokens": tokens})).json()["prompt"].clone();
    assert!(text == "yes" || text == "no", "{text}");
}

/// Reads newline-delimited JSON from a raw response stream, past its head.
struct LineStream {
    reader: BufReader<TcpStream>,
}

impl LineStream {
    fn open(port: u16, path: &str) -> LineStream {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        LineStream { reader }
    }

    /// The next JSON line (chunked framing: size lines and blank lines are skipped).
    fn next(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "stream ended");
            let t = line.trim();
            if t.starts_with('{') {
                return serde_json::from_str(t).unwrap();
            }
        }
    }
}

fn generate(s: &Server, ids: &[u32], max_tokens: usize) {
    let r = s.post(
        "/inferd/v1/generate",
        json!({"token_ids": ids, "sampling_options": {"temperature": 0}, "stop_conditions": {"max_tokens": max_tokens}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn kv_events_tell_a_router_what_the_prefix_cache_holds() {
    // 6 blocks of 16 tokens: a second long prompt must evict the first one's blocks.
    let s = Server::start(&["--num-blocks", "6"]);
    let mut events = LineStream::open(s.port, "/inferd/v1/kv_events");
    assert_eq!(events.next(), json!({"type": "config", "block_size": 16}));
    let a: Vec<u32> = (100..150).collect(); // 3 full blocks, and 2 tokens
    generate(&s, &a, 1);
    // Stored: the full blocks of the prompt, as one chain from the root, with their ids.
    let stored = events.next();
    assert_eq!(stored["type"], "stored", "{stored}");
    assert_eq!(stored["parent_hash"], Value::Null);
    assert_eq!(stored["num_block_tokens"], json!([16, 16, 16]));
    assert_eq!(stored["token_ids"], json!(a[..48]));
    let a_hashes: Vec<i64> = serde_json::from_value(stored["block_hashes"].clone()).unwrap();
    assert_eq!(a_hashes.len(), 3);
    assert_eq!(a_hashes.iter().collect::<HashSet<_>>().len(), 3);
    // The same prompt again: a prefix-cache hit, nothing new to tell.
    generate(&s, &a, 1);
    // Another long prompt needs the blocks: the first prompt's leave the cache.
    let b: Vec<u32> = (200..290).collect();
    generate(&s, &b, 1);
    let mut removed = Vec::new();
    let mut b_stored = Vec::new();
    while b_stored.len() < 5 || removed.len() < 3 {
        let e = events.next();
        match e["type"].as_str().unwrap() {
            "removed" => removed.extend(serde_json::from_value::<Vec<i64>>(e["block_hashes"].clone()).unwrap()),
            "stored" => {
                let hashes: Vec<i64> = serde_json::from_value(e["block_hashes"].clone()).unwrap();
                // A chain continues from the last block already told.
                let parent = e["parent_hash"].as_i64();
                assert_eq!(parent, b_stored.last().copied(), "{e}");
                b_stored.extend(hashes);
            }
            other => panic!("unexpected {other}: {e}"),
        }
    }
    removed.sort_unstable();
    let mut want = a_hashes.clone();
    want.sort_unstable();
    assert_eq!(removed, want, "the first prompt's blocks are the ones evicted");
    // A router that connects now is told what is cached, parents first.
    let mut late = LineStream::open(s.port, "/inferd/v1/kv_events");
    assert_eq!(late.next()["type"], "config");
    let mut seen: Vec<i64> = Vec::new();
    for _ in 0..5 {
        let e = late.next();
        assert_eq!(e["type"], "stored", "{e}");
        let parent = e["parent_hash"].as_i64();
        assert!(
            parent.is_none() || seen.contains(&parent.unwrap()),
            "child before parent: {e}"
        );
        seen.extend(serde_json::from_value::<Vec<i64>>(e["block_hashes"].clone()).unwrap());
    }
    assert_eq!(seen, b_stored);
}

/// The series of the gateways' model-server protocol: (name, labels, meaning).
const FLEET: &[(&str, &[&str])] = &[
    ("inferd:num_requests_waiting", &["model_name"]),
    ("inferd:num_requests_running", &["model_name"]),
    ("inferd:kv_cache_usage_perc", &["model_name"]),
    (
        "inferd:cache_config_info",
        &["model_name", "block_size", "num_gpu_blocks"],
    ),
];

/// One metric family: its type, and its samples (labels, value).
type Family = (String, Vec<(BTreeMap<String, String>, f64)>);

/// `name -> family` of a Prometheus text exposition.
fn exposition(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels: BTreeMap<String, String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            out.entry(name.to_owned())
                .or_default()
                .1
                .push((labels, value.parse().unwrap()));
        }
    }
    out
}

#[test]
fn the_gateway_picker_reads_queue_running_kv_usage_and_cache_config() {
    let s = Server::start(&[
        "--served-model-name",
        "smol",
        "--num-blocks",
        "128",
        "--max-num-seqs",
        "2",
    ]);
    let worker = s.request("GET", "/inferd/v1/worker", &[], None).json();
    let check = |text: &str| {
        let families = exposition(text);
        for (name, labels) in FLEET {
            let (kind, samples) = &families[*name];
            assert_eq!(kind, "gauge", "{name}");
            assert_eq!(samples.len(), 1, "{name}");
            let keys: Vec<&str> = samples[0].0.keys().map(String::as_str).collect();
            let mut want = labels.to_vec();
            want.sort_unstable();
            assert_eq!(keys, want, "{name}");
            assert_eq!(samples[0].0["model_name"], "smol");
        }
        let info = &families["inferd:cache_config_info"].1[0].0;
        assert_eq!(
            info["block_size"].parse::<u64>().unwrap(),
            worker["kv_cache_block_size"].as_u64().unwrap()
        );
        assert_eq!(info["num_gpu_blocks"].parse::<u64>().unwrap(), 128);
        let value = |n: &str| families[n].1[0].1;
        (
            value("inferd:num_requests_waiting"),
            value("inferd:num_requests_running"),
            value("inferd:kv_cache_usage_perc"),
        )
    };
    assert_eq!(check(&s.request("GET", "/metrics", &[], None).body), (0.0, 0.0, 0.0));
    // Four long streams on a batch of two: two run, two wait, blocks are held.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "ignore_eos": true,
                      "max_tokens": 500, "stream": true})
    .to_string();
    let mut streams: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
            write!(
                t,
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            t
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (waiting, running, usage) = check(&s.request("GET", "/metrics", &[], None).body);
        if waiting == 2.0 && running == 2.0 && usage > 0.0 {
            assert!(usage <= 1.0, "{usage}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never saw 2 waiting, 2 running: {waiting} {running} {usage}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = [0u8; 64];
    for t in &mut streams {
        let _ = t.read(&mut buf);
    }
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(60);
    while check(&s.request("GET", "/metrics", &[], None).body) != (0.0, 0.0, 0.0) {
        assert!(Instant::now() < deadline, "the dropped streams left work behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn served_model_names_and_a_plain_folder() {
    let folder = installed_model(SMOL);
    let path = folder.to_str().unwrap();
    let s = Server::launch(&[path, "--served-model-name", "smol", "team/smol-v1"], &[]);
    let models = s.request("GET", "/v1/models", &[], None).json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smol", "team/smol-v1"]);
    for name in ["smol", "team/smol-v1"] {
        let r = s.post(
            "/v1/chat/completions",
            json!({"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["model"], "smol");
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            "The capital of France is Paris."
        );
    }
    let r = s.post(
        "/v1/chat/completions",
        json!({"model": SMOL, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // Loading another model is refused the same way; loading a served name is ready.
    let r = s.post("/load_model", json!({"model": SMOL}));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = s.post("/load_model", json!({"model": "team/smol-v1"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let worker = s.request("GET", "/inferd/v1/worker", &[], None).json();
    assert_eq!(worker["folder"], path);
    assert_eq!(worker["served_model_names"], json!(["smol", "team/smol-v1"]));
    drop(s);
    // Names without a model to serve: refused at start, saying why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args(["serve", "--served-model-name", "smol"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--served-model-name"));
}

#[test]
fn a_listening_router_does_not_keep_a_model_loaded() {
    // Models on demand, unloaded after a second idle: the events stream loads it (it
    // names it) but holds no lease; the unload tells the router `cleared` and ends.
    let s = Server::launch(&["--model-timeout", "1"], &[]);
    let mut events = LineStream::open(s.port, &format!("/inferd/v1/kv_events?model={SMOL}"));
    assert_eq!(events.next()["type"], "config");
    let r = s.post(
        "/v1/completions",
        json!({"model": SMOL, "prompt": "Once upon a time there was a little dragon who lived in a cave by the sea. ".repeat(3), "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(events.next()["type"], "stored");
    assert_eq!(events.next(), json!({"type": "cleared"}));
    let mut rest = String::new();
    events.reader.read_to_string(&mut rest).unwrap();
    assert!(!rest.contains('{'), "after `cleared`: {rest}");
    let models = s.request("GET", "/v1/models", &[], None).json();
    let smol = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == SMOL)
        .cloned();
    assert_eq!(smol.unwrap()["loaded"], false);
}
