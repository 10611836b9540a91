//! Qwen-style tool calls in generated text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks (the Qwen2.5 / Qwen3 / Hermes chat-template convention), parsed as the text
//! streams. Text outside the blocks is content; markup never leaks into it. A block is
//! reported once its JSON object is complete (a JSON-aware scan, so braces or
//! `</tool_call>` inside strings do not end it); a block that never completes, or whose
//! JSON is not a call, is given back as plain content.

use serde_json::Value;

use super::stop::longest_suffix_prefix;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A parsed call: the function name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What a piece of text turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    Call(ToolCall),
}

#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    /// Text not yet classified.
    buf: String,
    in_call: bool,
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds streamed text; returns what became certain.
    pub fn push(&mut self, piece: &str) -> Vec<ToolEvent> {
        self.buf.push_str(piece);
        let mut events = Vec::new();
        loop {
            if !self.in_call {
                match self.buf.find(OPEN) {
                    Some(at) => {
                        push_content(&mut events, &self.buf[..at]);
                        self.buf.drain(..at + OPEN.len());
                        self.in_call = true;
                    }
                    None => {
                        // Hold back a tail that could be the start of `<tool_call>`.
                        let keep = longest_suffix_prefix(&self.buf, OPEN);
                        let release = self.buf.len() - keep;
                        push_content(&mut events, &self.buf[..release]);
                        self.buf.drain(..release);
                        return events;
                    }
                }
            } else {
                let Some(end) = json_object_end(&self.buf) else {
                    return events;
                };
                let rest = self.buf[end..].trim_start();
                if rest.len() < CLOSE.len() && CLOSE.starts_with(rest) {
                    return events; // the closing tag is still arriving
                }
                let body = self.buf[..end].to_owned();
                match (parse_call(&body), rest.strip_prefix(CLOSE)) {
                    (Some(call), Some(after)) => {
                        events.push(ToolEvent::Call(call));
                        let consumed = self.buf.len() - after.len();
                        self.buf.drain(..consumed);
                    }
                    _ => {
                        // Not a well-formed block: it was content after all.
                        push_content(&mut events, &format!("{OPEN}{body}"));
                        self.buf.drain(..end);
                    }
                }
                self.in_call = false;
            }
        }
    }

    /// The end of the stream: an unfinished block is content.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if self.in_call {
            push_content(&mut events, &format!("{OPEN}{rest}"));
        } else {
            push_content(&mut events, &rest);
        }
        self.in_call = false;
        events
    }
}

fn push_content(events: &mut Vec<ToolEvent>, text: &str) {
    if !text.is_empty() {
        events.push(ToolEvent::Content(text.to_owned()));
    }
}

/// Byte offset just past the first complete JSON object in `s` (after optional
/// whitespace), or `None` if it is not complete yet. Strings and escapes are respected.
fn json_object_end(s: &str) -> Option<usize> {
    let start = s.len() - s.trim_start().len();
    if !s[start..].starts_with('{') {
        // Not an object at all: end the "block" right away so it becomes content.
        return if s[start..].is_empty() { None } else { Some(start) };
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in s[start..].char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(start + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

fn parse_call(body: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".to_owned(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let mut p = ToolCallParser::new();
        let mut content = String::new();
        let mut calls = Vec::new();
        let events = pieces.iter().flat_map(|piece| p.push(piece)).collect::<Vec<_>>();
        for e in events.into_iter().chain(p.finish()) {
            match e {
                ToolEvent::Content(t) => content.push_str(&t),
                ToolEvent::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn markup_split_across_tokens_never_leaks_into_content() {
        let pieces = [
            "Let me check.",
            "\n<tool",
            "_call>\n{\"na",
            "me\": \"get_weather\", \"argu",
            "ments\": {\"city\": \"Paris\"}}\n</tool_",
            "call>",
        ];
        let (content, calls) = run(&pieces);
        assert_eq!(content, "Let me check.\n");
        assert_eq!(calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
    }

    #[test]
    fn two_calls_and_braces_or_closing_tags_inside_strings() {
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"}</tool_call>{\", \"n\": {\"x\": [1, {\"y\": 2}]}}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        for split in [1, 3, 7, 13] {
            let pieces: Vec<String> = text
                .chars()
                .collect::<Vec<_>>()
                .chunks(split)
                .map(|c| c.iter().collect())
                .collect();
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (content, calls) = run(&pieces);
            assert_eq!(content.trim(), "", "split {split}");
            assert_eq!(
                calls,
                vec![
                    call("a", r#"{"q":"}</tool_call>{","n":{"x":[1,{"y":2}]}}"#),
                    call("b", "{}")
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn truncated_or_malformed_blocks_degrade_to_content() {
        let (content, calls) = run(&["Sure <tool_call>{\"name\": \"a\", \"argum"]);
        assert_eq!(
            (content.as_str(), calls.len()),
            ("Sure <tool_call>{\"name\": \"a\", \"argum", 0)
        );
        let (content, calls) = run(&["<tool_call>not json</tool_call> ok"]);
        assert_eq!(calls.len(), 0);
        assert_eq!(content, "<tool_call>not json</tool_call> ok");
        let (content, calls) = run(&["<tool_call>{\"arguments\": {}}</tool_call>"]);
        assert_eq!(
            (content.as_str(), calls.len()),
            ("<tool_call>{\"arguments\": {}}</tool_call>", 0)
        );
        let (content, _) = run(&["a < b and <tool"]);
        assert_eq!(content, "a < b and <tool");
    }
}
