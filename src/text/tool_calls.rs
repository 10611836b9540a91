//! Qwen-style tool calls in generated text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks (the Qwen2.5 / Qwen3 / Hermes chat-template convention), parsed as the text
//! streams. Text outside the blocks is content; markup never leaks into it.
//!
//! A block that opens the way models write it (`{"name": "...", "arguments": `) is
//! reported as soon as its name is known ([`ToolEvent::CallStart`]), and its arguments
//! then stream as they are written ([`ToolEvent::CallArgs`]: the fragments concatenate
//! to the arguments' JSON text exactly as the model wrote it), so a client sees a long
//! call arrive piece by piece. The scan is JSON-aware: braces or `</tool_call>` inside
//! strings do not end anything. A block in any other shape is held until its JSON object
//! is complete and then reported whole; a block that never gets as far as the name, or
//! whose JSON is not a call, is given back as plain content. Once a call has started it
//! stays a call: output cut off mid-arguments (by `max_tokens`) leaves them incomplete,
//! as OpenAI's do.

use serde_json::Value;

use super::stop::longest_suffix_prefix;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const ARGUMENT_KEYS: [&str; 2] = ["\"arguments\"", "\"parameters\""];

/// A parsed call: the function name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What a piece of text turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    /// A new call, with its function name.
    CallStart(String),
    /// More of the current call's arguments.
    CallArgs(String),
    /// The current call's arguments are complete.
    CallEnd,
}

#[derive(Debug, Clone, Default)]
enum State {
    #[default]
    Outside,
    /// After `<tool_call>`, before the name is known.
    Head,
    /// Streaming the arguments value.
    Args(ArgsScan),
    /// The block did not open as `{"name": …, "arguments": `: held whole.
    Whole,
    /// After the arguments: the closing `}` and `</tool_call>`.
    Tail,
}

#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    /// Text not yet classified.
    buf: String,
    state: State,
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
            match &mut self.state {
                State::Outside => match self.buf.find(OPEN) {
                    Some(at) => {
                        push_content(&mut events, &self.buf[..at]);
                        self.buf.drain(..at + OPEN.len());
                        self.state = State::Head;
                    }
                    None => {
                        // Hold back a tail that could be the start of `<tool_call>`.
                        let keep = longest_suffix_prefix(&self.buf, OPEN);
                        let release = self.buf.len() - keep;
                        push_content(&mut events, &self.buf[..release]);
                        self.buf.drain(..release);
                        return events;
                    }
                },
                State::Head => match match_head(&self.buf) {
                    Head::Partial => return events,
                    Head::Other => self.state = State::Whole,
                    Head::Call { name, consumed } => {
                        events.push(ToolEvent::CallStart(name));
                        self.buf.drain(..consumed);
                        self.state = State::Args(ArgsScan::default());
                    }
                },
                State::Args(scan) => {
                    let (used, fragment, done) = scan.push(&self.buf);
                    self.buf.drain(..used);
                    if !fragment.is_empty() {
                        events.push(ToolEvent::CallArgs(fragment));
                    }
                    if !done {
                        return events;
                    }
                    events.push(ToolEvent::CallEnd);
                    self.state = State::Tail;
                }
                State::Tail => {
                    let rest = self.buf.trim_start();
                    let rest = rest.strip_prefix('}').unwrap_or(rest).trim_start();
                    // Models also list several calls in one block: `{…},\n{…}`.
                    let listed = rest.strip_prefix(',').map(str::trim_start);
                    if let Some(next) = listed.filter(|l| l.starts_with('{')) {
                        let consumed = self.buf.len() - next.len();
                        self.buf.drain(..consumed);
                        self.state = State::Head;
                        continue;
                    }
                    if listed == Some("") || (rest.len() < CLOSE.len() && CLOSE.starts_with(rest)) {
                        return events; // the next call or the closing tag may still be arriving
                    }
                    let after = rest.strip_prefix(CLOSE).unwrap_or(rest);
                    let consumed = self.buf.len() - after.len();
                    self.buf.drain(..consumed);
                    self.state = State::Outside;
                }
                State::Whole => {
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
                            events.extend([
                                ToolEvent::CallStart(call.name),
                                ToolEvent::CallArgs(call.arguments),
                                ToolEvent::CallEnd,
                            ]);
                            let consumed = self.buf.len() - after.len();
                            self.buf.drain(..consumed);
                        }
                        _ => {
                            // Not a well-formed block: it was content after all.
                            push_content(&mut events, &format!("{OPEN}{body}"));
                            self.buf.drain(..end);
                        }
                    }
                    self.state = State::Outside;
                }
            }
        }
    }

    /// The end of the stream: a block that never named its function is content; the
    /// arguments of a started call end where the text ended.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match std::mem::take(&mut self.state) {
            State::Outside => push_content(&mut events, &rest),
            State::Head | State::Whole => push_content(&mut events, &format!("{OPEN}{rest}")),
            State::Args(scan) => {
                let held = scan.held() + &rest;
                if !held.is_empty() {
                    events.push(ToolEvent::CallArgs(held));
                }
                events.push(ToolEvent::CallEnd);
            }
            State::Tail => {}
        }
        events
    }
}

fn push_content(events: &mut Vec<ToolEvent>, text: &str) {
    if !text.is_empty() {
        events.push(ToolEvent::Content(text.to_owned()));
    }
}

enum Head {
    /// Could still become `{"name": "…", "arguments": `.
    Partial,
    /// Cannot: some other shape.
    Other,
    /// The name, and the bytes up to the arguments value.
    Call { name: String, consumed: usize },
}

/// Matches the opening of a block, `{"name": "…", "arguments": ` with any whitespace.
fn match_head(s: &str) -> Head {
    let mut at = 0;
    let skip_ws = |at: &mut usize| *at += s[*at..].len() - s[*at..].trim_start().len();
    // Each literal must follow; the buffer ending inside it is `Partial`.
    let expect = |at: &mut usize, options: &[&str]| -> Option<Head> {
        let rest = &s[*at..];
        for lit in options {
            if let Some(after) = rest.strip_prefix(lit) {
                *at = s.len() - after.len();
                return None;
            }
        }
        Some(if options.iter().any(|lit| lit.starts_with(rest)) {
            Head::Partial
        } else {
            Head::Other
        })
    };
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &["{"]) {
        return h;
    }
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &["\"name\""]) {
        return h;
    }
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &[":"]) {
        return h;
    }
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &["\""]) {
        return h;
    }
    let Some(len) = string_body_len(&s[at..]) else {
        return Head::Partial;
    };
    let Ok(name) = serde_json::from_str::<String>(&s[at - 1..at + len + 1]) else {
        return Head::Other;
    };
    at += len + 1;
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &[","]) {
        return h;
    }
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &ARGUMENT_KEYS) {
        return h;
    }
    skip_ws(&mut at);
    if let Some(h) = expect(&mut at, &[":"]) {
        return h;
    }
    Head::Call { name, consumed: at }
}

/// Length of a JSON string's body up to (not including) its closing quote, `s` starting
/// just after the opening one; `None` if the closing quote has not arrived.
fn string_body_len(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Follows one JSON value (the arguments) as it streams.
#[derive(Debug, Clone, Default)]
struct ArgsScan {
    /// Object or array: nesting depth and string state; its text streams through.
    depth: usize,
    in_string: bool,
    escaped: bool,
    started: bool,
    /// A string or scalar value, held until complete.
    held: String,
    /// `Some(true)` string, `Some(false)` other scalar, `None` container or unknown.
    scalar: Option<bool>,
}

impl ArgsScan {
    /// Consumes text: returns (bytes used, arguments text to report, value complete).
    fn push(&mut self, s: &str) -> (usize, String, bool) {
        let mut out = String::new();
        for (i, c) in s.char_indices() {
            if !self.started {
                if c.is_whitespace() {
                    continue;
                }
                self.started = true;
                match c {
                    '{' | '[' => {}
                    '"' => self.scalar = Some(true),
                    _ => self.scalar = Some(false),
                }
            }
            match self.scalar {
                Some(true) => {
                    // A string value (its text is the arguments), closed by the first
                    // unescaped quote after the opening one.
                    let closes = !self.held.is_empty() && !self.escaped && c == '"';
                    self.escaped = !self.escaped && c == '\\' && !self.held.is_empty();
                    self.held.push(c);
                    if closes {
                        let text = serde_json::from_str::<String>(&self.held).unwrap_or_default();
                        return (i + c.len_utf8(), text, true);
                    }
                }
                Some(false) => {
                    if matches!(c, ',' | '}' | ']') || c.is_whitespace() {
                        return (i, std::mem::take(&mut self.held), true);
                    }
                    self.held.push(c);
                }
                None => {
                    out.push(c);
                    if self.in_string {
                        match c {
                            _ if self.escaped => self.escaped = false,
                            '\\' => self.escaped = true,
                            '"' => self.in_string = false,
                            _ => {}
                        }
                        continue;
                    }
                    match c {
                        '"' => self.in_string = true,
                        '{' | '[' => self.depth += 1,
                        '}' | ']' => {
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 0 {
                                return (i + c.len_utf8(), out, true);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        (s.len(), out, false)
    }

    /// A scalar value cut off by the end of the stream.
    fn held(&self) -> String {
        self.held.clone()
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
    let mut scan = ArgsScan::default();
    match scan.push(&s[start..]) {
        (used, _, true) => Some(start + used),
        _ => None,
    }
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

/// Folds parser events into whole calls (what a non-streaming reply reports).
/// A whole reply that arrived in `pieces`, parsed: its content and its calls.
pub fn parse_pieces<S: AsRef<str>>(pieces: impl IntoIterator<Item = S>) -> (String, Vec<ToolCall>) {
    let mut parser = ToolCallParser::new();
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(parser.push(piece.as_ref()));
    }
    events.extend(parser.finish());
    let content = events
        .iter()
        .filter_map(|e| match e {
            ToolEvent::Content(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let mut calls = Vec::new();
    collect_calls(&mut calls, &events);
    (content, calls)
}

pub fn collect_calls(calls: &mut Vec<ToolCall>, events: &[ToolEvent]) {
    for event in events {
        match event {
            ToolEvent::CallStart(name) => calls.push(ToolCall {
                name: name.clone(),
                arguments: String::new(),
            }),
            ToolEvent::CallArgs(text) => {
                if let Some(call) = calls.last_mut() {
                    call.arguments.push_str(text);
                }
            }
            ToolEvent::Content(_) | ToolEvent::CallEnd => {}
        }
    }
}

/// A function a tool-call grammar allows: its name and, for a `strict` tool, the JSON
/// schema of its arguments (`None`: any JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct CallSchema {
    pub name: String,
    pub parameters: Option<Value>,
}

/// A Lark grammar (llguidance's dialect) for calls in the Qwen / Hermes block format, so
/// that strict tools get arguments that follow their schema. `opened`: the output
/// already holds the first `<tool_call>` (the grammar starts right after it); else it
/// starts with one. `several`: more calls may follow, each on its own line. Each
/// function's arguments are their own `%json` root, so a schema's `$ref`s to its own
/// `$defs` resolve; `layout` is stamped into each (llguidance's `x-guidance` options).
pub fn call_grammar(functions: &[CallSchema], opened: bool, several: bool, layout: &Value) -> String {
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let first = if opened { quoted("\n") } else { quoted("<tool_call>\n") };
    let close = quoted("\n</tool_call>");
    let mut lark = format!("start: {first} body {close}");
    if several {
        lark.push_str(&format!(" ({} body {close})*", quoted("\n<tool_call>\n")));
    }
    lark.push('\n');
    let alternatives: Vec<String> = (0..functions.len()).map(|i| format!("call_{i}")).collect();
    lark.push_str(&format!("body: {}\n", alternatives.join(" | ")));
    for (i, f) in functions.iter().enumerate() {
        let mut arguments = f
            .parameters
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        if let Some(object) = arguments.as_object_mut() {
            object.entry("x-guidance").or_insert_with(|| layout.clone());
        }
        let opening = format!("{{\"name\": {}, \"arguments\": ", quoted(&f.name));
        lark.push_str(&format!(
            "call_{i}: {} %json {arguments} {}\n",
            quoted(&opening),
            quoted("}")
        ));
    }
    lark
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, size: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(size).map(|c| c.iter().collect()).collect()
    }

    fn run<S: AsRef<str>>(pieces: &[S]) -> (String, Vec<ToolCall>) {
        parse_pieces(pieces)
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
        assert_eq!(calls, vec![call("get_weather", r#"{"city": "Paris"}"#)]);
    }

    #[test]
    fn arguments_stream_as_they_are_written() {
        let mut p = ToolCallParser::new();
        assert_eq!(p.push("<tool_call>\n{\"name\": \"f"), vec![]);
        assert_eq!(
            p.push("\", \"arguments\": {\"a\""),
            vec![ToolEvent::CallStart("f".into()), ToolEvent::CallArgs("{\"a\"".into())]
        );
        assert_eq!(p.push(": [1, \"]}\""), vec![ToolEvent::CallArgs(": [1, \"]}\"".into())]);
        assert_eq!(
            p.push("]}}\n</tool_call>\nDone."),
            vec![
                ToolEvent::CallArgs("]}".into()),
                ToolEvent::CallEnd,
                ToolEvent::Content("\nDone.".into())
            ]
        );
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn two_calls_and_braces_or_closing_tags_inside_strings() {
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"}</tool_call>{\", \"n\": {\"x\": [1, {\"y\": 2}]}}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        for size in [1, 3, 7, 13, 1000] {
            let (content, calls) = run(&split(text, size));
            assert_eq!(content.trim(), "", "split {size}");
            assert_eq!(
                calls,
                vec![
                    call("a", r#"{"q": "}</tool_call>{", "n": {"x": [1, {"y": 2}]}}"#),
                    call("b", "{}")
                ],
                "split {size}"
            );
        }
    }

    #[test]
    fn several_calls_listed_in_one_block() {
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}},\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call> ok";
        for size in [1, 4, 1000] {
            let (content, calls) = run(&split(text, size));
            assert_eq!(content, " ok", "split {size}");
            assert_eq!(calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")], "split {size}");
        }
    }

    #[test]
    fn other_shapes_are_reported_whole() {
        let text = "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"f\"}</tool_call><tool_call>{\"name\": \"g\", \"arguments\": \"{\\\"b\\\": 2}\"}</tool_call>";
        for size in [1, 5, 1000] {
            let (content, calls) = run(&split(text, size));
            assert_eq!(content, "", "split {size}");
            assert_eq!(
                calls,
                vec![call("f", r#"{"a":1}"#), call("g", r#"{"b": 2}"#)],
                "split {size}"
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
        // A call cut off inside its arguments stays a call (finish_reason says `length`).
        let (content, calls) = run(&["<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": [1,"]);
        assert_eq!((content.as_str(), calls), ("", vec![call("a", "{\"x\": [1,")]));
    }
}
