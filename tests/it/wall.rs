//! DESIGN.md's wall: the engine and backends speak ids and tensors only; models and
//! loaders may parse JSON files but know nothing of the server, tokenizers or templates
//! (the loader's hub client, `loader/download.rs`, is an HTTP client of its own); the
//! API layer knows nothing of the server; modules use only lower layers, and sibling
//! modules form no import loop.

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
fn each_layer_mentions_none_of_what_it_must_not_know() {
    let src = crate::common::repo_root().join("src");
    let rules: [(&str, &[&str]); 5] = [
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
        // The wire formats know nothing of the server that speaks them.
        (
            "api",
            &["crate::server", "crate::manager", "hyper::server", "hyper::body"],
        ),
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

/// The layers of the crate, lowest first (docs/architecture.md): a module may use only
/// modules of lower layers, so there is no import loop between top-level modules and
/// no arrow that runs back up (`api` does not know `server`, `models` not `engine`).
const LAYERS: &[&[&str]] = &[
    &["log", "units"],
    &["loader", "media", "text"],
    &["backend"],
    &["models"],
    &["engine"],
    &["api"],
    &["manager"],
    &["server", "client"],
    &["bench", "chat", "fuzzing"],
];

/// Source lines that are code (doc and line comments left out), joined.
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each `crate::NAME` a text uses (the logging macros count as `log`).
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + "crate::".len()..];
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // `$crate::` in a macro is its own module; `foo_crate::` is another path.
        if !before.is_some_and(|c| c == '$' || c.is_alphanumeric() || c == '_') {
            out.push(match name.as_str() {
                "info" | "warn" | "debug" | "error" => "log".to_owned(),
                _ => name,
            });
        }
        rest = after;
    }
    out
}

#[test]
fn modules_use_only_lower_layers() {
    let src = crate::common::repo_root().join("src");
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (path, text) in &files {
        let rel = std::path::Path::new(path).strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let from = layer(&top).unwrap_or_else(|| panic!("src/{top} is in no layer of LAYERS"));
        for used in crate_paths(&code(text)) {
            if used == top {
                continue;
            }
            seen.insert(used.clone());
            match layer(&used) {
                Some(to) if to < from => {}
                _ => violations.push(format!("{} uses crate::{used}", rel.display())),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    // The check reads what it thinks it reads.
    assert!(
        seen.contains("engine") && seen.contains("backend") && seen.contains("log"),
        "{seen:?}"
    );
    assert_eq!(
        crate_paths("use crate::a::b; crate::info!(); $crate::x; my_crate::y"),
        ["a", "log"]
    );
}

/// Within each folder, the files (a module's submodules) use one another without a
/// loop: `super::x` and `crate::top::x` paths between siblings form no cycle. (A
/// folder's `mod.rs`, which composes its submodules, is not a sibling.)
#[test]
fn sibling_modules_form_no_import_loop() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = crate::common::repo_root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    // folder -> sibling -> siblings it uses
    let mut graphs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let stems: BTreeMap<String, BTreeSet<String>> = files.iter().fold(BTreeMap::new(), |mut m, (p, _)| {
        let p = std::path::Path::new(p);
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        if stem != "mod" {
            m.entry(p.parent().unwrap().display().to_string())
                .or_default()
                .insert(stem);
        }
        m
    });
    for (path, text) in &files {
        let p = std::path::Path::new(path);
        let (dir, stem) = (p.parent().unwrap(), p.file_stem().unwrap().to_string_lossy());
        let Some(siblings) = stems.get(&dir.display().to_string()) else {
            continue;
        };
        if stem == "mod" || dir == src {
            continue;
        }
        let module = dir.strip_prefix(&src).unwrap().display().to_string().replace('/', "::");
        let text = code(text);
        let uses: BTreeSet<String> = siblings
            .iter()
            .filter(|s| *s != stem.as_ref())
            .filter(|s| {
                [
                    format!("super::{s}::"),
                    format!("super::{s}::{{"),
                    format!("crate::{module}::{s}::"),
                ]
                .iter()
                .any(|pat| text.contains(pat.as_str()))
                    || text.contains(&format!("super::{s};"))
            })
            .cloned()
            .collect();
        graphs.entry(module).or_default().insert(stem.into_owned(), uses);
    }
    fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|n| n == node) {
                return Some(path[i..].iter().cloned().chain([node.to_owned()]).collect());
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(node.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
    }
    let loops: Vec<String> = graphs
        .iter()
        .filter_map(|(module, g)| cycle(g).map(|c| format!("{module}: {}", c.join(" -> "))))
        .collect();
    assert!(loops.is_empty(), "{}", loops.join("\n"));
    // The check sees the uses it should (server::generate uses server::images).
    assert!(
        graphs["server"]["generate"].contains("images"),
        "{:?}",
        graphs["server"]
    );
    let looped = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert!(cycle(&looped).is_some());
}
