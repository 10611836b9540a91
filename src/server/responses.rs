//! The Responses API: `POST /v1/responses` (whole or as its event stream), and the
//! stored responses behind `previous_response_id`, `GET` / `DELETE /v1/responses/{id}`
//! and `GET /v1/responses/{id}/input_items`. Generation is the chat path's: the request
//! becomes a chat request, and the chat choice's text, reasoning and tool-call events
//! become output items.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use super::choice::{apply_event, Choice, ChoiceUpdate, Kind};
use super::generate::prepare_chat;
use super::http::{json_response, sse_response, HttpResponse};
use super::store::{self, StoreError, Stored};
use super::ServerState;
use crate::api::responses::{parse_responses_request, rename_param, ResponsesRequest};
use crate::api::ApiError;
use crate::engine::{EngineEvent, RequestStream};
use crate::manager::ModelLease;
use crate::text::ToolEvent;

/// The store failed (database down, disk full): 503, logged.
fn unavailable(e: StoreError) -> ApiError {
    crate::error!("responses store: {e}");
    ApiError {
        code: Some("store_unavailable"),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("the responses store is unavailable ({e}); retry later, or send `store: false`"),
        )
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        code: Some("response_not_found"),
        ..ApiError::not_found(format!("no stored response `{id}`"))
    }
}

/// `POST /v1/responses`
pub async fn create(state: Arc<ServerState>, body: Value) -> Result<HttpResponse, ApiError> {
    let rid = store::new_id();
    let mut counter = 0;
    let mut new_id = |prefix: &str| {
        counter += 1;
        format!("{prefix}_{rid}_in{counter}")
    };
    let request = parse_responses_request(&body, &mut new_id)?;
    let history = match &request.previous_response_id {
        Some(prev) => {
            state
                .responses
                .get(prev)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| ApiError {
                    param: Some("previous_response_id".into()),
                    ..not_found(prev)
                })?
                .conversation
        }
        None => Vec::new(),
    };
    let chat_body = request.chat_body(&history)?;
    let chat = prepare_chat(&state, &chat_body).await.map_err(rename_param)?;
    if chat.params.n != 1 {
        return Err(ApiError::invalid("n", "the Responses API makes one reply"));
    }
    let prompt_tokens = chat.prompt_ids.len();
    let stream = chat
        .model
        .engine
        .submit_with_input(chat.prompt_ids, chat.params.clone(), chat.input)
        .map_err(|e| rename_param(ApiError::from(e)))?;
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut base = Map::new();
    base.insert("id".into(), json!(format!("resp_{rid}")));
    base.insert("object".into(), json!("response"));
    base.insert("created_at".into(), json!(created));
    base.insert("model".into(), json!(chat.model.name));
    base.extend(request.echo.clone());
    let builder = ResponseBuilder::new(Value::Object(base), rid, prompt_tokens);
    let choice = Choice::new(&chat.generation, chat.kind);
    let run = Run {
        state,
        model: chat.model,
        kind: chat.kind,
        stream,
        choice,
        builder,
        request,
        history,
        start: Instant::now(),
        _image_memory: chat.image_memory,
    };
    if run.request.stream {
        let (response, tx) = sse_response();
        tokio::spawn(run.stream(tx));
        return Ok(response);
    }
    let response = run.collect().await?;
    Ok(json_response(StatusCode::OK, &response))
}

/// A stored response for the GET routes: 404 if there is none, 503 if the store failed.
async fn lookup(state: &ServerState, id: &str) -> Result<Stored, ApiError> {
    state
        .responses
        .get(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/responses/{id}`
pub async fn retrieve(state: &ServerState, id: &str) -> Result<HttpResponse, ApiError> {
    let stored = lookup(state, id).await?;
    Ok(json_response(StatusCode::OK, &stored.response))
}

/// `DELETE /v1/responses/{id}`
pub async fn delete(state: &ServerState, id: &str) -> Result<HttpResponse, ApiError> {
    if !state.responses.remove(id).await.map_err(unavailable)? {
        return Err(not_found(id));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// `GET /v1/responses/{id}/input_items`
pub async fn input_items(state: &ServerState, id: &str) -> Result<HttpResponse, ApiError> {
    let stored = lookup(state, id).await?;
    let items = stored.input_items;
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": items, "first_id": items.first().map(|i| i["id"].clone()),
                "last_id": items.last().map(|i| i["id"].clone()), "has_more": false}),
    ))
}

struct Run {
    state: Arc<ServerState>,
    model: ModelLease,
    kind: Kind,
    stream: RequestStream,
    choice: Choice,
    builder: ResponseBuilder,
    request: ResponsesRequest,
    history: Vec<Value>,
    start: Instant,
    /// The request's share of the image memory, given back with the run.
    _image_memory: Option<super::images::ImageMemory>,
}

impl Run {
    /// The next update, or the end: `Ok(None)` when the choice finished.
    async fn next(&mut self) -> Result<Option<ChoiceUpdate>, String> {
        loop {
            if self.choice.finish.is_some() {
                return Ok(None);
            }
            let Some(event) = self.stream.next().await else {
                return Err("the engine stopped before the response finished".into());
            };
            if matches!(event, EngineEvent::Token { .. }) && self.builder.output_tokens == 0 {
                let ttft = self.start.elapsed().as_secs_f64();
                self.state.metrics.time_to_first_token.observe(ttft);
            }
            let counts = matches!(event, EngineEvent::Token { .. });
            let choices = std::slice::from_mut(&mut self.choice);
            let update = apply_event(&self.model.tokenizer, self.kind, choices, event)?;
            if counts {
                self.builder.output_tokens += 1;
                if update
                    .as_ref()
                    .is_some_and(|u| !u.reasoning.is_empty() && u.text.is_empty())
                {
                    self.builder.reasoning_tokens += 1;
                }
            }
            if let Some(update) = update {
                return Ok(Some(update));
            }
        }
    }

    /// Stores the finished response (when asked to) with its conversation; returns once
    /// it is committed, so what a client is told is finished can be retrieved.
    async fn finish(&mut self, response: &Value) -> Result<(), StoreError> {
        self.state
            .metrics
            .completion_tokens
            .fetch_add(self.builder.output_tokens as u64, Ordering::Relaxed);
        if !self.request.store || response["status"] == "failed" {
            return Ok(());
        }
        let mut conversation = std::mem::take(&mut self.history);
        conversation.extend(self.request.messages.iter().cloned());
        let mut reply = json!({"role": "assistant", "content": self.choice.text.trim_end()});
        if !self.choice.reasoning.is_empty() {
            reply["reasoning_content"] = json!(self.choice.reasoning);
        }
        let calls: Vec<Value> = response["output"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|item| item["type"] == "function_call")
            .map(|item| {
                json!({"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}})
            })
            .collect();
        if !calls.is_empty() {
            reply["tool_calls"] = Value::Array(calls);
        }
        conversation.push(reply);
        let id = response["id"].as_str().unwrap_or_default().to_owned();
        let stored = Stored {
            response: response.clone(),
            input_items: std::mem::take(&mut self.request.input_items),
            conversation,
        };
        self.state.responses.put(&id, &stored).await
    }

    async fn collect(mut self) -> Result<Value, ApiError> {
        loop {
            match self.next().await {
                Ok(Some(update)) => {
                    self.builder.apply(&update);
                }
                Ok(None) => break,
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
        let reason = self.choice.finish.unwrap_or("stop");
        self.builder.close(reason);
        let response = self.builder.response(reason);
        self.finish(&response).await.map_err(unavailable)?;
        Ok(response)
    }

    async fn stream(mut self, tx: tokio::sync::mpsc::Sender<bytes::Bytes>) {
        let send = |event: Value| {
            let tx = tx.clone();
            async move {
                let kind = event["type"].as_str().unwrap_or_default().to_owned();
                let frame = format!("event: {kind}\ndata: {event}\n\n");
                tx.send(bytes::Bytes::from(frame)).await.is_ok()
            }
        };
        let opening = self.builder.opening();
        for event in opening {
            if !send(event).await {
                return;
            }
        }
        loop {
            let update = tokio::select! {
                update = self.next() => update,
                _ = tx.closed() => return, // the client went away: dropping the stream cancels
            };
            match update {
                Ok(Some(update)) => {
                    for event in self.builder.apply(&update) {
                        if !send(event).await {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    for event in self.builder.failure("server_error", &e) {
                        let _ = send(event).await;
                    }
                    return;
                }
            }
        }
        let reason = self.choice.finish.unwrap_or("stop");
        let mut events = self.builder.close(reason);
        let response = self.builder.response(reason);
        let terminal = if response["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        // Stored first: a client told a response finished can always retrieve it. If the
        // store fails, the terminal event is a failure instead.
        match self.finish(&response).await {
            Ok(()) => events.push(self.builder.event(json!({"type": terminal, "response": response}))),
            Err(e) => {
                let e = unavailable(e);
                events.extend(self.builder.failure(e.code.unwrap_or("server_error"), &e.message));
            }
        }
        for event in events {
            if !send(event).await {
                return;
            }
        }
    }
}

/// An output item being written.
enum Open {
    Reasoning {
        index: usize,
        id: String,
        text: String,
    },
    Message {
        index: usize,
        id: String,
        text: String,
    },
    Call {
        index: usize,
        item: Value,
        arguments: String,
    },
}

/// Turns a choice's updates into output items and the events that announce them.
struct ResponseBuilder {
    base: Value,
    rid: String,
    sequence: u64,
    output: Vec<Value>,
    open: Option<Open>,
    /// Whitespace held back between items (the newlines around tool-call blocks).
    pending_space: String,
    counts: HashMap<&'static str, usize>,
    input_tokens: usize,
    output_tokens: usize,
    reasoning_tokens: usize,
    incomplete: bool,
}

impl ResponseBuilder {
    fn new(base: Value, rid: String, input_tokens: usize) -> Self {
        ResponseBuilder {
            base,
            rid,
            sequence: 0,
            output: Vec::new(),
            open: None,
            pending_space: String::new(),
            counts: HashMap::new(),
            input_tokens,
            output_tokens: 0,
            reasoning_tokens: 0,
            incomplete: false,
        }
    }

    fn event(&mut self, mut event: Value) -> Value {
        event["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        event
    }

    /// `msg_<rid>`, then `msg_<rid>_2`, ...
    fn new_id(&mut self, prefix: &'static str) -> String {
        let n = self.counts.entry(prefix).or_insert(0);
        *n += 1;
        if *n == 1 {
            format!("{prefix}_{}", self.rid)
        } else {
            format!("{prefix}_{}_{n}", self.rid)
        }
    }

    fn snapshot(&self, status: &str) -> Value {
        let mut response = self.base.clone();
        response["status"] = json!(status);
        response["output"] = Value::Array(self.output.clone());
        response["error"] = Value::Null;
        response["incomplete_details"] = Value::Null;
        response["usage"] = Value::Null;
        response
    }

    /// `response.created` (queued) and `response.in_progress`.
    fn opening(&mut self) -> Vec<Value> {
        let created = json!({"type": "response.created", "response": self.snapshot("queued")});
        let progress = json!({"type": "response.in_progress", "response": self.snapshot("in_progress")});
        vec![self.event(created), self.event(progress)]
    }

    fn apply(&mut self, update: &ChoiceUpdate) -> Vec<Value> {
        let mut events = Vec::new();
        if !update.reasoning.is_empty() {
            self.reasoning(&update.reasoning, &mut events);
        }
        if !update.text.is_empty() {
            self.text(&update.text, &mut events);
        }
        for call in &update.calls {
            match call {
                ToolEvent::CallStart(name) => self.call_start(name, &mut events),
                ToolEvent::CallArgs(args) => self.call_args(args, &mut events),
                ToolEvent::Content(_) | ToolEvent::CallEnd => {}
            }
        }
        if update.finish == Some("length") {
            self.incomplete = true;
        }
        events
    }

    fn reasoning(&mut self, delta: &str, events: &mut Vec<Value>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close_open(events);
            let (index, id) = (self.output.len(), self.new_id("rs"));
            let item = json!({"id": id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"});
            let added = json!({"type": "response.output_item.added", "output_index": index, "item": item});
            events.push(self.event(added));
            self.output.push(Value::Null); // its slot, filled when it closes
            self.open = Some(Open::Reasoning {
                index,
                id,
                text: String::new(),
            });
        }
        if let Some(Open::Reasoning { index, id, text }) = &mut self.open {
            text.push_str(delta);
            let event = json!({"type": "response.reasoning_text.delta", "item_id": id, "output_index": index,
                "content_index": 0, "delta": delta});
            events.push(self.event(event));
        }
    }

    fn text(&mut self, delta: &str, events: &mut Vec<Value>) {
        if delta.trim().is_empty() {
            self.pending_space.push_str(delta);
            return;
        }
        let delta = if matches!(self.open, Some(Open::Message { .. })) {
            format!("{}{delta}", std::mem::take(&mut self.pending_space))
        } else {
            self.open_message(events);
            delta.trim_start().to_owned()
        };
        if let Some(Open::Message { index, id, text }) = &mut self.open {
            text.push_str(&delta);
            let event = json!({"type": "response.output_text.delta", "item_id": id, "output_index": index,
                "content_index": 0, "delta": delta, "logprobs": []});
            events.push(self.event(event));
        }
    }

    fn open_message(&mut self, events: &mut Vec<Value>) {
        self.close_open(events);
        self.pending_space.clear();
        let (index, id) = (self.output.len(), self.new_id("msg"));
        let item = json!({"id": id, "type": "message", "role": "assistant", "status": "in_progress", "content": []});
        let added = json!({"type": "response.output_item.added", "output_index": index, "item": item});
        events.push(self.event(added));
        let part = json!({"type": "response.content_part.added", "item_id": id, "output_index": index,
            "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}});
        events.push(self.event(part));
        self.output.push(Value::Null);
        self.open = Some(Open::Message {
            index,
            id,
            text: String::new(),
        });
    }

    fn call_start(&mut self, name: &str, events: &mut Vec<Value>) {
        self.close_open(events);
        self.pending_space.clear();
        let index = self.output.len();
        let (id, call_id) = (self.new_id("fc"), self.new_id("call"));
        let item = json!({"id": id, "type": "function_call", "status": "in_progress", "call_id": call_id,
            "name": name, "arguments": ""});
        let added = json!({"type": "response.output_item.added", "output_index": index, "item": item.clone()});
        events.push(self.event(added));
        self.output.push(Value::Null);
        self.open = Some(Open::Call {
            index,
            item,
            arguments: String::new(),
        });
    }

    fn call_args(&mut self, delta: &str, events: &mut Vec<Value>) {
        if let Some(Open::Call {
            index, item, arguments, ..
        }) = &mut self.open
        {
            arguments.push_str(delta);
            let event = json!({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                "output_index": index, "delta": delta});
            events.push(self.event(event));
        }
    }

    /// Ends the item being written, with its `.done` events.
    fn close_open(&mut self, events: &mut Vec<Value>) {
        let status = if self.incomplete { "incomplete" } else { "completed" };
        match self.open.take() {
            None => {}
            Some(Open::Reasoning { index, id, text }) => {
                let done = json!({"type": "response.reasoning_text.done", "item_id": id, "output_index": index,
                    "content_index": 0, "text": text});
                events.push(self.event(done));
                let item = json!({"id": id, "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}], "status": status});
                self.item_done(index, item, events);
            }
            Some(Open::Message { index, id, text }) => {
                let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                let done = json!({"type": "response.output_text.done", "item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": []});
                events.push(self.event(done));
                let part_done = json!({"type": "response.content_part.done", "item_id": id, "output_index": index,
                    "content_index": 0, "part": part.clone()});
                events.push(self.event(part_done));
                let item = json!({"id": id, "type": "message", "role": "assistant", "status": status,
                    "content": [part]});
                self.item_done(index, item, events);
            }
            Some(Open::Call {
                index,
                mut item,
                arguments,
            }) => {
                let done = json!({"type": "response.function_call_arguments.done", "item_id": item["id"],
                    "output_index": index, "name": item["name"], "arguments": arguments});
                events.push(self.event(done));
                item["arguments"] = json!(arguments);
                item["status"] = json!(status);
                self.item_done(index, item, events);
            }
        }
    }

    fn item_done(&mut self, index: usize, item: Value, events: &mut Vec<Value>) {
        self.output[index] = item.clone();
        let done = json!({"type": "response.output_item.done", "output_index": index, "item": item});
        events.push(self.event(done));
    }

    /// Closes what is open; a reply with no output at all still gets its (empty) message.
    fn close(&mut self, reason: &str) -> Vec<Value> {
        if reason == "length" {
            self.incomplete = true;
        }
        let mut events = Vec::new();
        self.close_open(&mut events);
        if self.output.is_empty() {
            self.open_message(&mut events);
            self.close_open(&mut events);
        }
        events
    }

    fn response(&self, reason: &str) -> Value {
        let status = if self.incomplete || reason == "length" {
            "incomplete"
        } else {
            "completed"
        };
        let mut response = self.snapshot(status);
        if status == "incomplete" {
            response["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        response["usage"] = json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        });
        response
    }

    /// An `error` event, then `response.failed`.
    fn failure(&mut self, code: &str, message: &str) -> Vec<Value> {
        let error = json!({"type": "error", "code": code, "message": message, "param": null});
        let mut response = self.snapshot("failed");
        response["error"] = json!({"code": code, "message": message});
        let failed = json!({"type": "response.failed", "response": response});
        vec![self.event(error), self.event(failed)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(reasoning: &str, text: &str, calls: Vec<ToolEvent>, finish: Option<&'static str>) -> ChoiceUpdate {
        ChoiceUpdate {
            index: 0,
            text: text.into(),
            calls,
            reasoning: reasoning.into(),
            logprob: None,
            finish,
        }
    }

    /// Reasoning, then text, then a call: three output items, each opened, grown and
    /// closed in turn, with sequence numbers counting up.
    #[test]
    fn reasoning_text_and_a_call_become_three_items_in_order() {
        let mut b = ResponseBuilder::new(json!({"id": "resp_x"}), "x".into(), 10);
        let mut events = b.opening();
        for u in [
            update("Think", "", vec![], None),
            update("ing.", "", vec![], None),
            update("", "\n\n", vec![], None),
            update("", "Checking.", vec![], None),
            update(
                "",
                "\n",
                vec![ToolEvent::CallStart("f".into()), ToolEvent::CallArgs("{\"a\"".into())],
                None,
            ),
            update("", "", vec![ToolEvent::CallArgs(": 1}".into())], Some("stop")),
        ] {
            events.extend(b.apply(&u));
        }
        events.extend(b.close("stop"));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        assert!(events.iter().enumerate().all(|(n, e)| e["sequence_number"] == n));
        let response = b.response("stop");
        let output = response["output"].as_array().unwrap();
        assert_eq!(output[0]["type"], "reasoning");
        assert_eq!(output[0]["content"][0]["text"], "Thinking.");
        assert_eq!(output[1]["content"][0]["text"], "Checking.");
        assert_eq!(
            (&output[2]["name"], &output[2]["arguments"], &output[2]["call_id"]),
            (&json!("f"), &json!("{\"a\": 1}"), &json!("call_x"))
        );
        assert_eq!(response["status"], "completed");
    }

    #[test]
    fn an_empty_reply_still_has_its_message() {
        let mut b = ResponseBuilder::new(json!({}), "x".into(), 1);
        let events = b.close("stop");
        assert_eq!(events.len(), 5);
        let response = b.response("stop");
        assert_eq!(response["output"][0]["content"][0]["text"], "");
    }
}
