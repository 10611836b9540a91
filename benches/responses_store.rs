//! The responses store alone: how long `put` (committed) and `get` take for a typical
//! stored response, per store kind, without a model in the way.
//!   cargo bench --bench responses_store [-- COUNT]
//! PostgreSQL is measured when `INFERD_TEST_POSTGRES` names a server (scripts/postgres).

use std::time::{Duration, Instant};

use inferd::server::store::{new_id, ResponseStore, Retention, StoreUrl, Stored};
use serde_json::json;

/// A response like a short chat turn's: ~1 KB of JSON in all.
fn record(n: usize) -> Stored {
    let text = "The capital of France is Paris. ".repeat(8);
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Stored {
        response: json!({"id": format!("resp_{n}"), "object": "response", "created_at": created_at,
            "status": "completed", "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 37, "output_tokens": 64, "total_tokens": 101}}),
        input_items: vec![
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}),
        ],
        conversation: vec![
            json!({"role": "user", "content": "What is the capital of France?"}),
            json!({"role": "assistant", "content": text}),
        ],
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn main() {
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("inferd-store-bench-{}", std::process::id()));
    let mut kinds = vec![
        ("memory", StoreUrl::Memory),
        (
            "sqlite",
            StoreUrl::Sqlite {
                path: dir.join("normal.sqlite3"),
                full_sync: false,
            },
        ),
        (
            "sqlite, synchronous=full",
            StoreUrl::Sqlite {
                path: dir.join("full.sqlite3"),
                full_sync: true,
            },
        ),
    ];
    if let Some(url) = std::env::var("INFERD_TEST_POSTGRES").ok().filter(|u| !u.is_empty()) {
        kinds.push(("postgres", StoreUrl::Postgres(url)));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("{count} records of {} bytes each", {
        let r = record(0);
        r.response.to_string().len()
            + serde_json::Value::from(r.input_items).to_string().len()
            + serde_json::Value::from(r.conversation).to_string().len()
    });
    println!("| store | put p50 ms | put p99 ms | get p50 ms | get p99 ms |");
    println!("|---|---|---|---|---|");
    for (name, url) in kinds {
        rt.block_on(async {
            let retention = Retention {
                ttl: Duration::from_secs(86_400),
                max_count: None,
                max_bytes: u64::MAX,
                sweep_every: Duration::from_secs(3600),
            };
            let store = ResponseStore::open(url, retention).await.unwrap();
            let ids: Vec<String> = (0..count).map(|_| new_id()).collect();
            let mut puts = Vec::with_capacity(count);
            for (n, id) in ids.iter().enumerate() {
                let r = record(n);
                let t = Instant::now();
                store.put(id, &r).await.unwrap();
                puts.push(t.elapsed());
            }
            let mut gets = Vec::with_capacity(count);
            for id in &ids {
                let t = Instant::now();
                assert!(store.get(id).await.unwrap().is_some());
                gets.push(t.elapsed());
            }
            for id in &ids {
                store.remove(id).await.unwrap();
            }
            puts.sort();
            gets.sort();
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {:.3} |",
                percentile(&puts, 0.5),
                percentile(&puts, 0.99),
                percentile(&gets, 0.5),
                percentile(&gets, 0.99)
            );
        });
    }
    let _ = std::fs::remove_dir_all(dir);
}
