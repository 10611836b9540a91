//! The Responses store (`--responses-store`): one contract for memory, SQLite and
//! PostgreSQL; a server killed with SIGKILL mid-conversation keeps every response whose
//! `response.completed` reached its client; two servers on one PostgreSQL continue each
//! other's conversations; time-to-live and cap sweeps; a full disk and a stopped
//! database answer 503 and recover.
//!
//! PostgreSQL tests need `INFERD_TEST_POSTGRES` (a server URL; `scripts/test` starts one
//! with `scripts/postgres`) and skip, saying so, without it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferd::server::store::{new_id, ResponseStore, Retention, StoreUrl, Stored};
use serde_json::{json, Value};

use super::common::{repo_root, scratch_dir};
use super::server::Server;

/// Tests that use the PostgreSQL server (one of them stops it for a while).
static POSTGRES: Mutex<()> = Mutex::new(());

fn postgres_url() -> Option<String> {
    let url = std::env::var("INFERD_TEST_POSTGRES").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: INFERD_TEST_POSTGRES is not set (scripts/test starts a server with scripts/postgres)");
    }
    url
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh database on the test server (dropped with the cluster's data folder, which
/// scripts/postgres keeps under the temporary folder): its URL.
fn fresh_database(url: &str, rt: &tokio::runtime::Runtime) -> String {
    let name = format!("inferd_test_{}", &new_id()[..12]);
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    });
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn postgres(command: &str) {
    let out = std::process::Command::new(repo_root().join("scripts/postgres"))
        .arg(command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/postgres {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stored(n: usize, created_at: i64) -> Stored {
    Stored {
        response: json!({"id": format!("resp_{n}"), "created_at": created_at, "output": [{"n": n}]}),
        input_items: vec![json!({"type": "message", "content": format!("question {n}")})],
        conversation: vec![json!({"role": "user", "content": format!("question {n}")})],
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What every kind of store does the same way.
fn check_contract(url: StoreUrl, rt: &tokio::runtime::Runtime) {
    let what = url.describe();
    let retention = |max_count, max_bytes| Retention {
        ttl: Duration::from_secs(30 * 86_400),
        max_count,
        max_bytes,
        sweep_every: Duration::from_secs(3600),
    };
    // One creation time for every record here, so that records compare equal.
    let t = now();
    rt.block_on(async {
        let store = ResponseStore::open(url.clone(), retention(None, u64::MAX))
            .await
            .unwrap();
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for (n, id) in ids.iter().enumerate() {
            store.put(id, &stored(n, t)).await.unwrap();
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(store.get(id).await.unwrap(), Some(stored(n, t)), "{what}");
        }
        // An id is stored once (ids are random; a collision is an error, not an overwrite).
        assert!(store.put(&ids[0], &stored(9, t)).await.is_err(), "{what}");
        assert_eq!(store.get(&ids[0]).await.unwrap(), Some(stored(0, t)), "{what}");
        assert!(store.remove(&ids[1]).await.unwrap(), "{what}");
        assert!(!store.remove(&ids[1]).await.unwrap(), "{what}");
        assert_eq!(store.get(&ids[1]).await.unwrap(), None, "{what}");
        assert_eq!(store.get("nope").await.unwrap(), None, "{what}");
        // Past its time to live: not served even before a sweep, then swept.
        let old = new_id();
        store.put(&old, &stored(7, t - 31 * 86_400)).await.unwrap();
        assert_eq!(store.get(&old).await.unwrap(), None, "{what}");
        let swept = store.sweep().await.unwrap();
        assert!(swept.expired >= 1, "{what}: {swept:?}");
        assert!(store.get(&ids[2]).await.unwrap().is_some(), "{what}");
        drop(store);

        // Caps: the oldest go first. (On a shared database the caps count other rows
        // too, so this part runs on a store of its own.)
        let size = {
            let s = stored(0, t);
            let list = |items: Vec<Value>| Value::from(items).to_string().len();
            (s.response.to_string().len() + list(s.input_items) + list(s.conversation)) as u64
        };
        let store = ResponseStore::open(url.clone(), retention(Some(4), 2 * size + size / 2))
            .await
            .unwrap();
        store.sweep().await.unwrap();
        let ids: Vec<String> = (0..5).map(|_| new_id()).collect();
        for (n, id) in ids.iter().enumerate() {
            store.put(id, &stored(n, t)).await.unwrap();
        }
        store.sweep().await.unwrap();
        let kept: Vec<bool> = futures_kept(&store, &ids).await;
        assert_eq!(
            kept,
            [false, false, false, true, true],
            "{what}: the byte cap keeps the newest two"
        );
    });
}

async fn futures_kept(store: &ResponseStore, ids: &[String]) -> Vec<bool> {
    let mut kept = Vec::new();
    for id in ids {
        kept.push(store.get(id).await.unwrap().is_some());
    }
    kept
}

#[test]
fn every_kind_of_store_keeps_the_same_contract() {
    let rt = runtime();
    check_contract(StoreUrl::Memory, &rt);
    let dir = scratch_dir("store-contract");
    check_contract(
        StoreUrl::Sqlite {
            path: dir.join("a.sqlite3"),
            full_sync: false,
        },
        &rt,
    );
    // Commits that wait for the disk behave the same.
    check_contract(
        StoreUrl::Sqlite {
            path: dir.join("b.sqlite3"),
            full_sync: true,
        },
        &rt,
    );
    let Some(url) = postgres_url() else { return };
    let _pg = POSTGRES.lock().unwrap_or_else(|e| e.into_inner());
    check_contract(StoreUrl::Postgres(fresh_database(&url, &rt)), &rt);
}

/// Sends a streamed Responses request over HTTP/1.0 (the body is the bare event stream,
/// ended by the server closing) and reads until the connection ends; `seen` counts the
/// terminal event as soon as it has arrived whole. Returns the finished response.
fn stream_response(port: u16, body: &Value, seen: &AtomicUsize) -> Option<Value> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let body = body.to_string();
    let head = format!(
        "POST /v1/responses HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).ok()?;
    c.write_all(body.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut completed = None;
    loop {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if completed.is_none() {
            completed = completed_event(&buf);
            if completed.is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    completed
}

/// The response of the stream's terminal event when it finished (`response.completed`,
/// or `response.incomplete` for a length cut).
fn completed_event(buf: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(buf);
    let (at, name) = [
        "event: response.completed\ndata: ",
        "event: response.incomplete\ndata: ",
    ]
    .into_iter()
    .find_map(|name| Some((text.find(name)?, name)))?;
    let rest = &text[at + name.len()..];
    let end = rest.find("\n\n")?;
    let event: Value = serde_json::from_str(&rest[..end]).ok()?;
    Some(event["response"].clone())
}

fn rows(path: &Path) -> Vec<(String, String, String)> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut q = c
        .prepare("SELECT response, input_items, conversation FROM inferd_responses")
        .unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn sqlite_arg(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

#[test]
fn a_server_killed_mid_conversation_keeps_every_response_it_completed() {
    let dir = scratch_dir("store-kill");
    let db = dir.join("responses.sqlite3");
    let store = sqlite_arg(&db);
    let s = Server::start(&["--responses-store", &store]);
    let port = s.port;
    let seen = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(Mutex::new(BTreeMap::<String, Value>::new()));
    // 50 conversations of up to three turns, of different lengths, all at once.
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let (seen, completed) = (seen.clone(), completed.clone());
            std::thread::spawn(move || {
                let mut previous: Option<String> = None;
                for turn in 0..3 {
                    let mut body = json!({
                        "input": format!("Conversation {i}, turn {turn}: name a number."),
                        "temperature": 0,
                        "max_output_tokens": 4 + (i * 7 + turn * 13) % 40,
                        "stream": true,
                    });
                    if let Some(p) = &previous {
                        body["previous_response_id"] = json!(p);
                    }
                    let Some(response) = stream_response(port, &body, &seen) else {
                        return;
                    };
                    let id = response["id"].as_str().unwrap().to_owned();
                    completed.lock().unwrap().insert(id.clone(), response);
                    previous = Some(id);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    s.signal("KILL");
    for t in threads {
        t.join().unwrap();
    }
    drop(s);
    let completed = completed.lock().unwrap().clone();
    let all_rows = rows(&db);
    eprintln!(
        "killed with {} responses completed at their clients, {} stored",
        completed.len(),
        all_rows.len()
    );
    assert!(completed.len() >= 40 && completed.len() < 150, "{}", completed.len());
    // Nothing half-written: every row is a whole response with its conversation.
    for (response, items, conversation) in &all_rows {
        let response: Value = serde_json::from_str(response).unwrap();
        assert!(
            matches!(response["status"].as_str(), Some("completed" | "incomplete")),
            "{response}"
        );
        assert!(
            response["output"].as_array().is_some_and(|o| !o.is_empty()),
            "{response}"
        );
        let items: Value = serde_json::from_str(items).unwrap();
        assert!(items.as_array().is_some_and(|i| !i.is_empty()));
        let conversation: Value = serde_json::from_str(conversation).unwrap();
        assert_eq!(conversation.as_array().unwrap().last().unwrap()["role"], "assistant");
    }

    // Restarted on the same file: each is there whole, and continues.
    let s = Server::start(&["--responses-store", &store]);
    for (id, response) in &completed {
        let r = get_response(&s, id);
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        assert_eq!(&r.json(), response, "{id}");
        let r = s.post(
            "/v1/responses",
            json!({"input": "And one more?", "previous_response_id": id, "max_output_tokens": 1}),
        );
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        assert!(r.json()["usage"]["input_tokens"].as_u64().unwrap() > 20);
    }
}

#[test]
fn sweeps_remove_expired_responses_and_the_oldest_over_the_cap() {
    let dir = scratch_dir("store-sweep");
    let db = dir.join("responses.sqlite3");
    let store = sqlite_arg(&db);
    let (ids, unstored) = {
        let s = Server::start(&[
            "--responses-store",
            &store,
            "--responses-store-size",
            "3",
            "--responses-sweep-every",
            "300ms",
        ]);
        let create = |n: usize, store: bool| {
            created_id(&s.post(
                "/v1/responses",
                json!({"input": format!("Say {n}."), "max_output_tokens": 1, "store": store}),
            ))
        };
        let ids: Vec<String> = (0..5).map(|n| create(n, true)).collect();
        // `store: false` writes nothing.
        let unstored = create(9, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while rows(&db).len() > 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = |id: &str| get_response(&s, id).status;
        let kept: Vec<u16> = ids.iter().map(|id| status(id)).collect();
        assert_eq!(kept, [404, 404, 200, 200, 200]);
        assert_eq!(status(&unstored), 404);
        assert_eq!(rows(&db).len(), 3);
        (ids, unstored)
    };
    // Restarted with a time to live of one second: the first sweep empties the table.
    std::thread::sleep(Duration::from_millis(2100));
    let s = Server::start(&["--responses-store", &store, "--responses-ttl", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rows(&db).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rows(&db).is_empty());
    for id in ids.iter().chain([&unstored]) {
        let r = get_response(&s, id);
        assert_eq!(r.status, 404);
        assert_eq!(r.json()["error"]["code"], "response_not_found");
    }
}

/// `unshare` a mount namespace with a small tmpfs at `dir` for the server alone; the
/// test reaches it through /proc/PID/root. Needs root (CI runs as root).
fn namespaced_tmpfs(dir: &Path) -> Option<Vec<String>> {
    let ok = std::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=4m tmpfs \"$0\"",
            &dir.display().to_string(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped the full-disk part: `unshare -m` with a tmpfs mount needs root");
        return None;
    }
    Some(vec![
        "unshare".into(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        "mount -t tmpfs -o size=4m tmpfs \"$0\" && exec \"$@\"".into(),
        dir.display().to_string(),
    ])
}

/// Fills the 4 MiB file system until a write fails (at most 16 MiB are written, so a
/// mistake cannot fill a real disk); returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 64 << 10];
    let full = (0..256).any(|_| f.write_all(&block).is_err());
    assert!(full, "{} took 16 MiB: not the 4 MiB tmpfs", dir.display());
    path
}

/// The id of a response just created, which must have succeeded.
fn created_id(r: &super::server::Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

/// `GET /v1/responses/{id}` on `s`.
fn get_response(s: &Server, id: &str) -> super::server::Response {
    s.request("GET", &format!("/v1/responses/{id}"), &[], None)
}

fn expect_unavailable(r: &super::server::Response) {
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "store_unavailable", "{}", r.body);
}

#[test]
fn a_full_disk_answers_503_and_recovers_when_space_comes_back() {
    let dir = scratch_dir("store-full");
    let Some(wrap) = namespaced_tmpfs(&dir) else { return };
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let store = sqlite_arg(&dir.join("responses.sqlite3"));
    let s = Server::launch_wrapped(
        &wrap,
        &["HuggingFaceTB/SmolLM2-135M-Instruct", "--responses-store", &store],
        &[],
    );
    let ask = |extra: Value| {
        let mut body = json!({"input": "Say hi.", "max_output_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        s.post("/v1/responses", body)
    };
    let before = created_id(&ask(json!({})));
    let inside = PathBuf::from(format!("/proc/{}/root{}", s.pid(), dir.display()));
    let filler = fill(&inside);

    expect_unavailable(&ask(json!({})));
    // Streamed: the stream ends with the failure, never `response.completed`.
    let r = ask(json!({"stream": true}));
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("response.completed"), "{}", r.body);
    assert!(r.body.contains("event: response.failed"), "{}", r.body);
    assert!(r.body.contains("store_unavailable"), "{}", r.body);
    // What needs no write still works.
    assert_eq!(ask(json!({"store": false})).status, 200);
    let r = get_response(&s, &before);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s
        .log_lines()
        .iter()
        .any(|l| l.contains("responses store") && l.contains("full")));

    std::fs::remove_file(filler).unwrap();
    let after = created_id(&ask(json!({})));
    assert_eq!(get_response(&s, &after).status, 200);
}

#[test]
fn two_servers_on_one_postgres_continue_each_others_conversations_and_survive_its_restart() {
    let Some(url) = postgres_url() else { return };
    let _pg = POSTGRES.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    let db = fresh_database(&url, &rt);
    let a = Server::start(&["--responses-store", &db]);
    let b = a.launch_beside(&["HuggingFaceTB/SmolLM2-135M-Instruct", "--responses-store", &db], &[]);
    let ask = |s: &Server, input: &str, previous: Option<&str>| {
        let mut body = json!({"input": input, "temperature": 0, "max_output_tokens": 8});
        if let Some(p) = previous {
            body["previous_response_id"] = json!(p);
        }
        s.post("/v1/responses", body)
    };
    let first = ask(&a, "My name is Ada. Remember it.", None).json();
    let first_id = first["id"].as_str().unwrap();
    let second = ask(&b, "What is my name?", Some(first_id));
    assert_eq!(second.status, 200, "{}", second.body);
    let second = second.json();
    // B saw A's turn: its prompt holds both questions and A's reply.
    assert!(second["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64());
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(get_response(&a, second_id).json(), second);
    // Many writers on both at once: every id distinct, every response readable on both.
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let port = if i % 2 == 0 { a.port } else { b.port };
                scope.spawn(move || {
                    let body = json!({"input": format!("Count to {i}."), "max_output_tokens": 8});
                    created_id(&Server::request_port(port, "POST", "/v1/responses", &body))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    for id in &ids {
        for s in [&a, &b] {
            assert_eq!(get_response(s, id).status, 200);
        }
    }
    // Deleted on one, gone on the other.
    assert_eq!(
        b.request("DELETE", &format!("/v1/responses/{first_id}"), &[], None)
            .status,
        200
    );
    assert_eq!(get_response(&a, first_id).status, 404);

    // The database stops: requests that need it get 503 (within the store's deadline),
    // requests that do not still work; it comes back and so do they.
    postgres("stop");
    // Started again even if an assertion below fails, for the tests after this one.
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            if std::thread::panicking() {
                postgres("start");
            }
        }
    }
    let restart = Restart;
    let started = Instant::now();
    expect_unavailable(&ask(&a, "Hello?", None));
    expect_unavailable(&get_response(&a, second_id));
    expect_unavailable(&ask(&b, "Go on.", Some(second_id)));
    assert!(started.elapsed() < Duration::from_secs(30));
    let r = b.post(
        "/v1/responses",
        json!({"input": "Hi", "max_output_tokens": 1, "store": false}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    postgres("start");
    drop(restart);
    let third_id = created_id(&ask(&b, "Go on.", Some(second_id)));
    assert_eq!(get_response(&a, &third_id).status, 200);
}

#[test]
fn without_a_writable_cache_folder_the_default_store_is_memory_and_says_so() {
    // No --responses-store: the default file would be under /proc, where no one writes.
    let s = Server::launch(
        &["HuggingFaceTB/SmolLM2-135M-Instruct"],
        &[("XDG_CACHE_HOME", "/proc/inferd-nowhere")],
    );
    assert!(
        s.startup
            .iter()
            .any(|l| l.contains("keeping stored responses in memory")),
        "{:?}",
        s.startup
    );
    let id = created_id(&s.post("/v1/responses", json!({"input": "Hi", "max_output_tokens": 1})));
    assert_eq!(get_response(&s, &id).status, 200);
}
