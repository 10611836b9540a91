//! The `/load_model` event stream's wire format: transformers serve's events, byte for
//! byte (`{"status": "loading", "model": …, "stage": …, "progress": {…}}`, then `ready`
//! or `error`), printed as Python's `json.dumps` prints them.

use serde_json::{json, Value};

use crate::manager::{LoadEvent, LoadProgress};

/// One event of `model`'s load as its SSE data.
pub fn load_event_bytes(model: &str, event: &LoadEvent) -> String {
    python_json(&load_event_json(model, event))
}

fn load_event_json(model: &str, event: &LoadEvent) -> Value {
    let stage = |stage: &str| json!({"status": "loading", "model": model, "stage": stage});
    match event {
        LoadEvent::Progress(LoadProgress::Processor) => stage("processor"),
        LoadEvent::Progress(LoadProgress::Config) => stage("config"),
        LoadEvent::Progress(LoadProgress::Download { current, total }) => {
            json!({"status": "loading", "model": model, "stage": "download",
                "progress": {"current": current, "total": total}})
        }
        LoadEvent::Progress(LoadProgress::Weights { current, total }) => {
            json!({"status": "loading", "model": model, "stage": "weights",
                "progress": {"current": current, "total": total}})
        }
        LoadEvent::Ready { cached } => json!({"status": "ready", "model": model, "cached": cached}),
        LoadEvent::Error(message) => json!({"status": "error", "model": model, "message": message}),
    }
}

/// JSON with Python's default separators (`", "`, `": "`), ASCII-only like `json.dumps`.
fn python_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", python_json(&Value::String(k.clone())), python_json(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(python_json).collect::<Vec<_>>().join(", ")),
        Value::String(s) => {
            let mut out = String::with_capacity(s.len() + 2);
            for c in serde_json::to_string(s).unwrap_or_default().chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
            out
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_print_as_transformers_serve_prints_them() {
        let weights = LoadEvent::Progress(LoadProgress::Weights { current: 3, total: 272 });
        assert_eq!(
            load_event_bytes("a/b@main", &weights),
            r#"{"status": "loading", "model": "a/b@main", "stage": "weights", "progress": {"current": 3, "total": 272}}"#
        );
        let error = LoadEvent::Error("caf\u{e9} \"x\"".into());
        assert_eq!(
            load_event_bytes("a/b@main", &error),
            r#"{"status": "error", "model": "a/b@main", "message": "caf\u00e9 \"x\""}"#
        );
    }
}
