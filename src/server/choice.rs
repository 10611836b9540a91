//! One completion (choice) of a reply being assembled from engine events: the
//! incremental detokenizer, stop strings, and the tool-call and reasoning parsers that
//! route its text; then its OpenAI JSON (message, log-probabilities, usage). Shared by
//! chat and text completions and the Responses API.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::api::openai::GenerationFields;
use crate::engine::{EngineEvent, FinishReason, TokenLogprobs};
use crate::text::{
    collect_calls, IncrementalDetokenizer, ReasoningParser, StopMatcher, Tokenizer, ToolCall, ToolCallParser, ToolEvent,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `tools`: the request offered tools, so `<tool_call>` blocks are parsed out.
    /// `reasoning`: `<think>` blocks go to `reasoning_content`.
    /// `one_call`: the reply ends with its first call (a named `tool_choice`, or
    /// `parallel_tool_calls: false`).
    /// `include_reasoning: false`: the reasoning is split off and not shown.
    Chat {
        logprobs: bool,
        tools: bool,
        reasoning: bool,
        include_reasoning: bool,
        one_call: bool,
    },
    Text,
}

/// One completion (choice) being assembled.
pub(super) struct Choice {
    detokenizer: IncrementalDetokenizer,
    stops: StopMatcher,
    pub text: String,
    pub tokens: usize,
    pub logprobs: Vec<Value>,
    reasoning_parser: Option<ReasoningParser>,
    pub reasoning: String,
    tool_parser: Option<ToolCallParser>,
    pub tool_calls: Vec<ToolCall>,
    /// A call's arguments are complete (what ends a `one_call` reply).
    call_ended: bool,
    pub finish: Option<&'static str>,
    /// vLLM's `include_stop_str_in_output`.
    include_stop_str: bool,
    /// vLLM's `return_tokens_as_token_ids`: log-probability entries say `token_id:<id>`.
    token_ids_as_text: bool,
}

impl Choice {
    pub(super) fn new(generation: &GenerationFields, kind: Kind) -> Self {
        Choice {
            detokenizer: IncrementalDetokenizer::new(generation.skip_special_tokens),
            stops: StopMatcher::new(generation.stop.iter().cloned()),
            include_stop_str: generation.include_stop_str,
            token_ids_as_text: generation.return_tokens_as_token_ids,
            text: String::new(),
            tokens: 0,
            logprobs: Vec::new(),
            reasoning_parser: matches!(kind, Kind::Chat { reasoning: true, .. }).then(ReasoningParser::new),
            reasoning: String::new(),
            tool_parser: matches!(kind, Kind::Chat { tools: true, .. }).then(ToolCallParser::new),
            tool_calls: Vec::new(),
            call_ended: false,
            finish: None,
        }
    }

    /// Final text through the reasoning split and the tool-call parser (each when
    /// enabled): returns (content, tool-call events, reasoning) and records them. `end`:
    /// the stream is over.
    fn route(&mut self, text: String, end: bool) -> (String, Vec<ToolEvent>, String) {
        let (reasoning, text) = match &mut self.reasoning_parser {
            Some(parser) => {
                let (mut r, mut c) = parser.push(&text);
                if end {
                    let (r2, c2) = parser.finish();
                    r.push_str(&r2);
                    c.push_str(&c2);
                }
                (r, c)
            }
            None => (String::new(), text),
        };
        self.reasoning.push_str(&reasoning);
        let (content, calls) = self.route_tools(text, end);
        (content, calls, reasoning)
    }

    fn route_tools(&mut self, text: String, end: bool) -> (String, Vec<ToolEvent>) {
        let Some(parser) = &mut self.tool_parser else {
            self.text.push_str(&text);
            return (text, Vec::new());
        };
        let mut events = parser.push(&text);
        if end {
            events.extend(parser.finish());
        }
        collect_calls(&mut self.tool_calls, &events);
        let mut content = String::new();
        events.retain(|event| match event {
            ToolEvent::Content(t) => {
                content.push_str(t);
                false
            }
            ToolEvent::CallEnd => {
                self.call_ended = true;
                false
            }
            _ => true,
        });
        self.text.push_str(&content);
        (content, events)
    }

    /// The text released by the stop matcher, followed by the stop string it matched
    /// when the request keeps stop strings.
    fn with_stop_string(&self, mut text: String, matched: Option<String>) -> String {
        if let Some(stop) = matched.filter(|_| self.include_stop_str) {
            text.push_str(&stop);
        }
        text
    }

    /// `stop` becomes `tool_calls` when the reply called tools.
    fn finish_with(&mut self, reason: &'static str) -> &'static str {
        let reason = if reason == "stop" && !self.tool_calls.is_empty() {
            "tool_calls"
        } else {
            reason
        };
        self.finish = Some(reason);
        reason
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token as log-probability entries name it: its text, or `token_id:<id>`.
pub(super) fn token_text(tokenizer: &Tokenizer, id: u32, as_id: bool) -> String {
    if as_id {
        return format!("token_id:{id}");
    }
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprob(tokenizer: &Tokenizer, lp: &TokenLogprobs, as_id: bool) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id, as_id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let mut main = entry(lp.token, lp.logprob);
    main["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
    main
}

/// What one engine event changed in a choice (what streaming sends).
pub(super) struct ChoiceUpdate {
    pub index: usize,
    /// Text that became final.
    pub text: String,
    /// Tool calls that started (`CallStart`) or grew (`CallArgs`), in order.
    pub calls: Vec<ToolEvent>,
    /// Reasoning text that became final.
    pub reasoning: String,
    pub logprob: Option<Value>,
    /// Set when the choice just finished.
    pub finish: Option<&'static str>,
}

/// Applies one engine event to the choices.
pub(super) fn apply_event(
    tokenizer: &Tokenizer,
    kind: Kind,
    choices: &mut [Choice],
    event: EngineEvent,
) -> Result<Option<ChoiceUpdate>, String> {
    match event {
        EngineEvent::Token {
            index,
            token,
            logprobs,
            stop,
        } => {
            let choice = &mut choices[index];
            if choice.finish.is_some() {
                return Ok(None);
            }
            choice.tokens += 1;
            // A stop token's text is left out, as vLLM leaves it out (unless kept).
            let piece = if stop && !choice.include_stop_str {
                String::new()
            } else {
                choice.detokenizer.push(tokenizer, token).map_err(|e| e.to_string())?
            };
            let out = choice.stops.push(&piece);
            let stopped = out.matched.is_some();
            let text = choice.with_stop_string(out.text, out.matched);
            let (text, calls, reasoning) = choice.route(text, stopped);
            let as_id = choice.token_ids_as_text;
            let logprob = logprobs.map(|lp| match kind {
                Kind::Chat { .. } => chat_logprob(tokenizer, &lp, as_id),
                Kind::Text => text_logprob(tokenizer, &lp, as_id),
            });
            if let Some(l) = &logprob {
                choice.logprobs.push(l.clone());
            }
            if stopped || (matches!(kind, Kind::Chat { one_call: true, .. }) && choice.call_ended) {
                choice.finish_with("stop");
            }
            Ok(Some(ChoiceUpdate {
                index,
                text,
                calls,
                reasoning,
                logprob,
                finish: choice.finish,
            }))
        }
        EngineEvent::Finished { index, reason, .. } => {
            let choice = &mut choices[index];
            if choice.finish.is_some() {
                return Ok(None);
            }
            let rest = choice.detokenizer.flush(tokenizer).map_err(|e| e.to_string())?;
            let out = choice.stops.push(&rest);
            let mut text = choice.with_stop_string(out.text, out.matched);
            if !choice.stops.is_stopped() {
                text.push_str(&choice.stops.finish());
            }
            let reason = if choice.stops.is_stopped() {
                "stop"
            } else {
                finish_reason(reason)
            };
            let (text, calls, reasoning) = choice.route(text, true);
            let reason = choice.finish_with(reason);
            Ok(Some(ChoiceUpdate {
                index,
                text,
                calls,
                reasoning,
                logprob: None,
                finish: Some(reason),
            }))
        }
        // The caller's (a request's, not a choice's).
        EngineEvent::PromptLogprobs(_) => Ok(None),
        EngineEvent::Failed(e) => Err(e),
    }
}

/// A completions log-probability entry (the chosen token, its log-probability, and the
/// alternatives as (token, log-probability) pairs), before `completion_logprobs`
/// lays entries out.
pub(super) fn text_logprob(tokenizer: &Tokenizer, lp: &TokenLogprobs, as_id: bool) -> Value {
    json!({"token": token_text(tokenizer, lp.token, as_id), "logprob": lp.logprob,
        "top": lp.top.iter().map(|&(id, l)| (token_text(tokenizer, id, as_id), l)).collect::<Vec<_>>()})
}

/// `call_<request id>_<choice>_<call>`: unique within the server's request ids.
pub(super) fn tool_call_id(request_id: &str, choice: usize, call: usize) -> String {
    format!("call_{request_id}_{choice}_{call}")
}

/// The assistant message of a finished chat choice.
pub(super) fn chat_message(request_id: &str, index: usize, choice: &Choice, kind: Kind) -> Value {
    let mut message = chat_message_body(request_id, index, choice);
    if !choice.reasoning.is_empty()
        && !matches!(
            kind,
            Kind::Chat {
                include_reasoning: false,
                ..
            }
        )
    {
        message["reasoning_content"] = Value::String(choice.reasoning.clone());
    }
    message
}

fn chat_message_body(request_id: &str, index: usize, choice: &Choice) -> Value {
    if choice.tool_calls.is_empty() {
        return json!({"role": "assistant", "content": choice.text});
    }
    let calls: Vec<Value> = choice
        .tool_calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            json!({"id": tool_call_id(request_id, index, k), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    // The text around the blocks is mostly the newlines that separate them.
    let text = choice.text.trim_end();
    let content = if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    };
    json!({"role": "assistant", "content": content, "tool_calls": calls})
}

pub(super) fn usage_json(prompt_tokens: usize, choices: &[Choice]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_fields() -> GenerationFields {
        crate::api::parse_chat_request(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .unwrap()
            .generation
    }

    /// A scripted Qwen reply with two tool calls, fed one token at a time.
    #[test]
    fn tool_calls_are_parsed_out_of_a_token_stream_into_the_chat_message() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2.5-coder-0.5b");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let reply = "<think>\nTwo tools.\n</think>\n\nChecking both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let kind = Kind::Chat {
            logprobs: false,
            tools: true,
            reasoning: true,
            include_reasoning: true,
            one_call: false,
        };
        let mut choices = vec![Choice::new(&test_fields(), kind)];
        let mut streamed = String::new();
        let mut calls = Vec::new();
        let ids = tokenizer.encode(reply, false).unwrap();
        let events = ids
            .iter()
            .map(|&token| EngineEvent::Token {
                index: 0,
                token,
                logprobs: None,
                stop: false,
            })
            .chain([EngineEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                usage: Default::default(),
            }]);
        for event in events {
            if let Some(update) = apply_event(&tokenizer, kind, &mut choices, event).unwrap() {
                assert!(!update.text.contains("tool_call"), "markup leaked: {:?}", update.text);
                streamed.push_str(&update.text);
                calls.extend(update.calls);
            }
        }
        assert_eq!(streamed, "Checking both.\n\n");
        assert_eq!(calls.iter().filter(|e| matches!(e, ToolEvent::CallStart(_))).count(), 2);
        assert_eq!(choices[0].finish, Some("tool_calls"));
        let message = chat_message("req_1", 0, &choices[0], kind);
        assert_eq!(message["content"], "Checking both.");
        assert_eq!(message["reasoning_content"], "Two tools.");
        // vLLM's `include_reasoning: false`: split off all the same, not shown.
        let hidden = Kind::Chat {
            include_reasoning: false,
            logprobs: false,
            tools: true,
            reasoning: true,
            one_call: false,
        };
        let quiet = chat_message("req_1", 0, &choices[0], hidden);
        assert!(quiet.get("reasoning_content").is_none());
        assert_eq!(quiet["content"], "Checking both.");
        assert_eq!(message["tool_calls"][0]["id"], "call_req_1_0_0");
        assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(message["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(
            message["tool_calls"][1]["function"],
            json!({"name": "get_time", "arguments": "{}"})
        );
    }

    /// `parallel_tool_calls: false` and named choices: the reply ends with its first call.
    #[test]
    fn a_one_call_reply_ends_after_its_first_call() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2.5-coder-0.5b");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let reply = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        let kind = Kind::Chat {
            logprobs: false,
            tools: true,
            reasoning: false,
            include_reasoning: true,
            one_call: true,
        };
        let mut choices = vec![Choice::new(&test_fields(), kind)];
        let mut updates = 0;
        for token in tokenizer.encode(reply, false).unwrap() {
            let event = EngineEvent::Token {
                index: 0,
                token,
                logprobs: None,
                stop: false,
            };
            updates += apply_event(&tokenizer, kind, &mut choices, event).unwrap().is_some() as usize;
        }
        assert_eq!(choices[0].finish, Some("tool_calls"));
        assert_eq!(
            choices[0].tool_calls,
            vec![ToolCall {
                name: "a".into(),
                arguments: "{\"x\": 1}".into()
            }]
        );
        // Tokens after the finish change nothing (the engine is cancelled meanwhile).
        assert!(updates < tokenizer.encode(reply, false).unwrap().len());
    }
}
