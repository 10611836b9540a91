//! DESIGN.md's wall: the engine and backends speak ids and tensors only; models and
//! loaders may parse JSON files but know nothing of the server, tokenizers or templates
//! (the loader's hub client, `loader/download.rs`, is an HTTP client of its own).

use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn engine_models_backend_and_loader_do_not_mention_http_or_text_crates() {
    let src = crate::common::repo_root().join("src");
    let rules: [(&str, &[&str]); 4] = [
        (
            "engine",
            &["hyper", "http::", "axum", "serde_json", "tokenizers", "minijinja"],
        ),
        (
            "backend",
            &["hyper", "http::", "axum", "serde_json", "tokenizers", "minijinja"],
        ),
        ("models", &["hyper", "http::", "axum", "tokenizers", "minijinja"]),
        ("loader", &["hyper", "axum", "tokenizers", "minijinja", "crate::server"]),
    ];
    let mut violations = Vec::new();
    for (dir, banned) in rules {
        let mut files = Vec::new();
        sources(&src.join(dir), &mut files);
        assert!(!files.is_empty(), "src/{dir} has no sources");
        for (path, text) in files {
            for word in banned {
                if text.contains(word) {
                    violations.push(format!("{path} mentions `{word}`"));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
