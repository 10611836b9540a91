//! The request-field table (`api::fields::FIELD_TABLE`): docs/api-fields.md is it,
//! rendered, and every row does what it says: each field is accepted, or refused with a
//! 400 naming it, on every route that lists it; values a row says are refused, are.

use inferd::api::fields::{field_table_markdown, Route, Treatment, FIELD_TABLE};
use inferd::api::responses::parse_responses_request;
use inferd::api::{parse_chat_request, parse_completion_request, ApiError};
use serde_json::{json, Value};

use crate::common::repo_root;

/// A valid value of each field (merged into a minimal body of the route).
fn sample(route: Route, name: &str) -> Value {
    let value = match (route, name) {
        (_, "model") => json!("org/model"),
        (_, "messages") => json!([{"role": "user", "content": "hi"}]),
        (Route::Completions, "prompt") => json!([[1, 2, 3], "two"]),
        (Route::Responses, "prompt") => json!({"id": "pmpt_1"}),
        (_, "input") => json!("hi"),
        (_, "instructions") => json!("Be brief."),
        (_, "stream") => json!(true),
        (_, "stream_options") => {
            return json!({"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true, "include_obfuscation": false}})
        }
        (_, "max_tokens" | "max_completion_tokens" | "max_output_tokens") => json!(5),
        (_, "temperature") => json!(0.5),
        (_, "top_p") => json!(0.9),
        (_, "n") => json!(2),
        (_, "seed") => json!(7),
        (_, "stop") => json!(["\n\n"]),
        (_, "presence_penalty" | "frequency_penalty") => json!(0.5),
        (_, "logit_bias") => json!({"5": 1.5}),
        (Route::Chat, "logprobs") => json!(true),
        (_, "logprobs") => json!(2),
        (Route::Chat, "top_logprobs") => return json!({"logprobs": true, "top_logprobs": 2}),
        (_, "top_logprobs") => json!(0),
        (_, "echo") => json!(true),
        (_, "suffix") => json!(""),
        (_, "best_of") => json!(1),
        (_, "tools") => json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        (_, "tool_choice") => json!("auto"),
        (_, "parallel_tool_calls") => json!(false),
        (_, "response_format") => {
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}})
        }
        (_, "text") => {
            json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}, "verbosity": "low"})
        }
        (_, "modalities") => json!(["text"]),
        (_, "audio") => json!({"voice": "alloy", "format": "wav"}),
        (_, "prediction") => json!({"type": "content", "content": "x"}),
        (_, "web_search_options") => json!({}),
        (_, "functions") => json!([{"name": "f"}]),
        (_, "function_call") => json!("auto"),
        (_, "reasoning_effort") => json!("low"),
        (_, "reasoning") => json!({"effort": "low"}),
        (_, "store") => json!(false),
        (_, "previous_response_id") => json!("resp_1"),
        (_, "metadata") => json!({"k": "v"}),
        (_, "truncation") => json!("disabled"),
        (_, "include") => json!([]),
        (_, "background") => json!(false),
        (_, "conversation") => json!("conv_1"),
        (_, "max_tool_calls") => json!(3),
        (_, "user" | "safety_identifier" | "prompt_cache_key" | "request_id" | "cache_salt") => json!("abc-1"),
        (_, "service_tier") => json!("auto"),
        (_, "prompt_cache_retention") => json!("24h"),
        (_, "verbosity") => json!("low"),
        (_, "top_k") => json!(5),
        (_, "min_p") => json!(0.1),
        (_, "repetition_penalty") => json!(1.1),
        (_, "min_tokens") => json!(1),
        (_, "ignore_eos" | "include_stop_str_in_output" | "return_tokens_as_token_ids" | "add_special_tokens") => {
            json!(true)
        }
        (_, "stop_token_ids") => json!([5]),
        (_, "skip_special_tokens" | "add_generation_prompt" | "use_beam_search" | "include_reasoning") => json!(false),
        (_, "spaces_between_special_tokens") => json!(true),
        (_, "bad_words") => json!(["foo"]),
        (_, "allowed_token_ids") => json!([1, 2]),
        (_, "truncate_prompt_tokens") => json!(5),
        (_, "prompt_logprobs") => json!(1),
        (_, "continue_final_message") => {
            return json!({"continue_final_message": true, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]})
        }
        (_, "chat_template") => json!("{{ messages[0].content }}"),
        (_, "chat_template_kwargs") => json!({"enable_thinking": false}),
        (_, "documents") => json!([{"title": "a", "text": "b"}]),
        (_, "mm_processor_kwargs") => json!({"max_pixels": 200000}),
        (_, "priority") => json!(-3),
        (_, "length_penalty") => json!(1.0),
        (_, "structured_outputs") => json!({"json": {"type": "object"}}),
        (_, "guided_json") => json!({"type": "object"}),
        (_, "guided_regex") => json!("a+"),
        (_, "guided_choice") => json!(["a", "b"]),
        (_, "guided_grammar") => json!("root ::= \"x\""),
        (_, "guided_whitespace_pattern") => {
            return json!({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?"})
        }
        (_, "guided_decoding_backend") => json!("guidance"),
        (_, "logits_processors") => json!(["my.module:Processor"]),
        (_, "prompt_embeds") => json!("AAAA"),
        (_, "vllm_xargs" | "kv_transfer_params") => json!({}),
        (_, "generation_config") => json!({"top_k": 5}),
        (_, "no_repeat_ngram_size") => json!(3),
        _ => panic!("no sample value for `{name}` on {}: add one", route.path()),
    };
    json!({ name: value })
}

/// Values of accepted fields that the table's notes say are refused.
fn refused_values(route: Route) -> Vec<Value> {
    match route {
        Route::Chat => vec![
            json!({"modalities": ["text", "audio"]}),
            json!({"response_format": {"type": "structural_tag"}}),
            json!({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}),
            json!({"structured_outputs": {"structural_tag": {}}}),
            json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
            json!({"structured_outputs": {}}),
            // Checked before any model is chosen: no load for a constraint that cannot compile.
            json!({"structured_outputs": {"regex": "(a"}}),
            json!({"structured_outputs": {"grammar": "root ::= undefined"}}),
            json!({"guided_decoding_backend": 1}),
            json!({"use_beam_search": true}),
            json!({"continue_final_message": true}),
            json!({"stream_options": {"include_usage": true}}),
            // Fields with no effect are still type-checked.
            json!({"user": 5}),
            json!({"store": "yes"}),
            json!({"metadata": [1]}),
        ],
        Route::Completions => vec![
            json!({"suffix": "x"}),
            json!({"best_of": 3}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            json!({"guided_json": 5}),
            json!({"truncate_prompt_tokens": 0}),
            json!({"n": 2, "prompt": vec!["x"; 600]}),
            json!({"user": ["u"]}),
            json!({"kv_transfer_params": "x"}),
        ],
        Route::Responses => vec![
            json!({"background": true}),
            json!({"include": ["message.output_text.logprobs"]}),
            json!({"truncation": "auto"}),
            json!({"top_logprobs": 3}),
            json!({"text": {"format": {"type": "json_schema", "name": "a", "schema": "x"}}}),
            json!({"text": {"format": {"type": "xml"}}}),
            json!({"service_tier": 1}),
            json!({"max_tool_calls": "3"}),
        ],
    }
}

fn parse(route: Route, fields: &Value) -> Result<(), ApiError> {
    let mut body = match route {
        Route::Chat => json!({"messages": [{"role": "user", "content": "hi"}]}),
        Route::Completions => json!({"prompt": "hi"}),
        Route::Responses => json!({"input": "hi"}),
    };
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    match route {
        Route::Chat => parse_chat_request(&body).map(drop),
        Route::Completions => parse_completion_request(&body).map(drop),
        Route::Responses => {
            let mut counter = 0;
            let mut new_id = |p: &str| {
                counter += 1;
                format!("{p}_{counter}")
            };
            // What Responses passes on is checked by the chat parser, as the server does.
            let request = parse_responses_request(&body, &mut new_id)?;
            parse_chat_request(&request.chat_body(&[])?).map(drop)
        }
    }
}

#[test]
fn every_field_in_the_table_is_accepted_or_refused_as_it_says() {
    for route in [Route::Chat, Route::Completions, Route::Responses] {
        for rule in FIELD_TABLE.iter().filter(|r| r.takes(route)) {
            let fields = sample(route, rule.name);
            let outcome = parse(route, &fields);
            match rule.treatment {
                Treatment::Acted | Treatment::Ignored => {
                    if let Err(e) = outcome {
                        panic!("{} `{}` {fields}: refused: {}", route.path(), rule.name, e.message)
                    }
                }
                Treatment::Refused => {
                    let e = outcome.expect_err(&format!("{} `{}` is accepted", route.path(), rule.name));
                    assert_eq!(e.param.as_deref(), Some(rule.name), "{}", e.message);
                    assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST);
                    // `null` is the same as leaving it out.
                    parse(route, &json!({ rule.name: null })).unwrap();
                }
            }
        }
        for fields in refused_values(route) {
            let e = parse(route, &fields).expect_err(&format!("{} {fields} is accepted", route.path()));
            let name = fields.as_object().unwrap().keys().next().unwrap();
            assert!(
                e.param.as_deref().is_some_and(|p| p.starts_with(name.as_str())),
                "{fields}: {:?} {}",
                e.param,
                e.message
            );
        }
        let e = parse(route, &json!({"temperatur": 0.5})).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("temperatur"),
            "an unknown field is refused, naming it"
        );
    }
}

/// `INFERD_WRITE_DOCS=1` rewrites the table in docs/api-fields.md.
#[test]
fn the_docs_hold_the_field_table() {
    let path = repo_root().join("docs/api-fields.md");
    let docs = std::fs::read_to_string(&path).unwrap_or_default();
    let table = field_table_markdown();
    let (begin, end) = ("<!-- field table: begin -->\n", "<!-- field table: end -->");
    if std::env::var_os("INFERD_WRITE_DOCS").is_some() {
        let (head, tail) = match (docs.find(begin), docs.find(end)) {
            (Some(b), Some(e)) => (docs[..b].to_owned(), docs[e + end.len()..].to_owned()),
            _ => (docs.clone(), "\n".to_owned()),
        };
        std::fs::write(&path, format!("{head}{begin}{table}{end}{tail}")).unwrap();
        return;
    }
    assert!(
        docs.contains(&format!("{begin}{table}{end}")),
        "docs/api-fields.md is not the table in src/api/fields.rs: run INFERD_WRITE_DOCS=1 cargo test --release --test it -- fields::the_docs"
    );
}
