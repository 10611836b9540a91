//! The engine's guarantees, written once over the backend: continuous batching gives
//! outputs independent of batch composition, preemption, cancellation, prefix caching,
//! n > 1, limits. Every case ends with every KV block free. `tests/it/engine.rs` runs
//! them on the CPU backend, `tests/gpu` on the CUDA backend.

use std::time::{Duration, Instant};

use inferd::backend::Backend;
use inferd::engine::{
    self, Engine, EngineConfig, EngineEvent, EngineHandle, FinishReason, RequestId, SamplingParams, SubmitError,
    TokenRole,
};
use inferd::models::{load_decoder, DecoderModel};

use crate::common::installed_model;

fn load<B: Backend>(backend: &B, repo: &str) -> DecoderModel<B> {
    load_decoder(backend, &installed_model(repo), &mut |_, _| {}).unwrap()
}

/// Deterministic pseudo-random prompts and parameters for request `i`.
fn request(i: usize, vocab: u32) -> (Vec<u32>, SamplingParams) {
    let len = 3 + (i * 7) % 37;
    let prompt = (0..len)
        .map(|j| ((i * 131 + j * 17 + 5) as u32) % (vocab - 3) + 3)
        .collect();
    let max_tokens = 1 + (i * 5) % 23;
    let params = match i % 4 {
        // Greedy, with and without processors.
        0 => SamplingParams {
            max_tokens: Some(max_tokens),
            ..SamplingParams::greedy()
        },
        1 => SamplingParams {
            max_tokens: Some(max_tokens),
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        },
        // Seeded sampling.
        2 => SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: 0.9,
            top_p: 0.9,
            top_k: Some(50),
            seed: Some(i as u64),
            ..Default::default()
        },
        _ => SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: 1.3,
            min_p: 0.05,
            seed: Some(1000 + i as u64),
            logprobs: Some(2),
            ..Default::default()
        },
    };
    (prompt, params)
}

/// Runs requests on a synchronous engine, all queued at once; returns each request's
/// tokens per completion index (`run_events`, the tokens alone).
fn run_batch<B: Backend + 'static>(
    engine: &mut Engine<B>,
    requests: &[(Vec<u32>, SamplingParams)],
) -> Vec<Vec<Vec<u32>>> {
    let events = run_events(engine, requests, None);
    events
        .into_iter()
        .map(|completions| {
            let finished = completions
                .iter()
                .filter(|c| matches!(c.last(), Some(EngineEvent::Finished { .. })))
                .count();
            assert_eq!(finished, completions.len(), "every completion finishes");
            completions
                .into_iter()
                .map(|c| {
                    c.into_iter()
                        .filter_map(|e| match e {
                            EngineEvent::Token { token, .. } => Some(token),
                            _ => None,
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn config(num_blocks: usize, block_size: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        num_blocks,
        max_num_seqs: 64,
        max_num_batched_tokens: 96,
        max_waiting: 1024,
        ..EngineConfig::default()
    }
}

fn assert_all_blocks_free<B: Backend + 'static>(engine: &Engine<B>) {
    assert_eq!(engine.scheduler().num_blocks_in_use(), 0, "blocks leaked");
    engine.scheduler().pool.check_invariants();
}

pub fn sixty_four_concurrent_requests_match_each_request_run_alone<B: Backend + Clone + 'static>(backend: &B) {
    let mut model = load(backend, "inferd-test/tiny-llama");
    let vocab = model.config.vocab_size as u32;
    let requests: Vec<_> = (0..64).map(|i| request(i, vocab)).collect();
    let mut alone = Vec::new();
    for r in &requests {
        let mut engine = Engine::new(backend.clone(), model, config(64, 16), vec![2]);
        alone.push(run_batch(&mut engine, std::slice::from_ref(r)).remove(0));
        assert_all_blocks_free(&engine);
        model = engine.into_model();
    }
    let mut engine = Engine::new(backend.clone(), model, config(512, 16), vec![2]);
    let together = run_batch(&mut engine, &requests);
    assert_eq!(engine.stats().preemptions, 0);
    assert!(engine.stats().steps < 64 * 10, "requests were batched");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} ({:?}) differs in a batch", requests[i].1);
    }
    assert_all_blocks_free(&engine);
    // Seeded sampling reproduces, run again in another order.
    let reversed: Vec<_> = requests.iter().rev().cloned().collect();
    let again = run_batch(&mut engine, &reversed);
    for (i, out) in again.iter().rev().enumerate() {
        assert_eq!(out, &together[i], "request {i} run again");
    }
    assert_all_blocks_free(&engine);
}

pub fn a_pool_too_small_for_all_sequences_preempts_and_still_matches<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen3");
    let vocab = model.config.vocab_size as u32;
    let mut requests: Vec<_> = (0..24).map(|i| request(i, vocab)).collect();
    // Some requests fork several long completions while the pool is under pressure.
    for (i, r) in requests.iter_mut().enumerate().filter(|(i, _)| i % 5 == 2) {
        r.1.n = 3;
        r.1.max_tokens = Some(30 + i);
        r.1.ignore_eos = true;
    }
    let mut engine = Engine::new(backend.clone(), model, config(1024, 4), vec![2]);
    let roomy = run_batch(&mut engine, &requests);
    assert_eq!(engine.stats().preemptions, 0);
    let model = engine.into_model();
    // 24 blocks of 4 tokens: a few sequences at a time at most.
    let mut engine = Engine::new(backend.clone(), model, config(24, 4), vec![2]);
    let tight = run_batch(&mut engine, &requests);
    assert!(engine.stats().preemptions > 0, "the small pool must force preemption");
    assert_eq!(roomy, tight);
    assert_all_blocks_free(&engine);
}

pub fn a_shared_prefix_is_computed_once<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen2");
    let prefix: Vec<u32> = (0..200).map(|i| 3 + (i * 37) % 380).collect();
    let with_suffix = |s: &[u32]| prefix.iter().chain(s).copied().collect::<Vec<u32>>();
    let params = SamplingParams {
        max_tokens: Some(8),
        ..SamplingParams::greedy()
    };
    let (a, b) = (with_suffix(&[11, 12, 13]), with_suffix(&[21, 22, 23, 24, 25]));
    let mut engine = Engine::new(backend.clone(), model, config(256, 16), vec![]);
    let (tx, mut rx_a) = tokio::sync::mpsc::unbounded_channel();
    engine.add_request(RequestId(1), a, params.clone(), tx).unwrap();
    while engine.has_work() {
        engine.step();
    }
    let computed_before = engine.stats().tokens_computed;
    let (tx, mut rx_b) = tokio::sync::mpsc::unbounded_channel();
    engine.add_request(RequestId(2), b.clone(), params.clone(), tx).unwrap();
    while engine.has_work() {
        engine.step();
    }
    let computed = engine.stats().tokens_computed - computed_before;
    // 12 full blocks (192 tokens) of the prefix come from the cache: the rest of the
    // prompt, then one token per decode step after the first.
    assert_eq!(computed as usize, (b.len() - 192) + 7);
    let mut tokens_b = Vec::new();
    let mut cached = None;
    while let Ok(event) = rx_b.try_recv() {
        match event {
            EngineEvent::Token { token, .. } => tokens_b.push(token),
            EngineEvent::Finished { usage, .. } => cached = Some(usage.cached_prompt_tokens),
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    assert_eq!(cached, Some(192));
    while rx_a.try_recv().is_ok() {}
    assert_all_blocks_free(&engine);
    // Same output as on an engine that never saw the prefix.
    let model = engine.into_model();
    let mut fresh = Engine::new(backend.clone(), model, config(256, 16), vec![]);
    let (alone, _) = engine::generate(&mut fresh, b, params, &mut |_| true).unwrap();
    assert_eq!(tokens_b, alone);
}

pub fn n_completions_share_the_prompt_and_reproduce_with_a_seed<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen2");
    let prompt: Vec<u32> = (0..37).map(|i| 3 + i * 5).collect();
    let params = SamplingParams {
        n: 4,
        temperature: 1.0,
        seed: Some(42),
        max_tokens: Some(12),
        ..Default::default()
    };
    let mut engine = Engine::new(backend.clone(), model, config(64, 8), vec![]);
    let first = run_batch(&mut engine, &[(prompt.clone(), params.clone())]).remove(0);
    assert_eq!(first.len(), 4);
    assert!(first.iter().all(|c| c.len() == 12));
    assert!(first.windows(2).any(|w| w[0] != w[1]), "completions differ");
    // The 4 completions computed the 37-token prompt once plus a 5-token tail each.
    let computed = engine.stats().tokens_computed as usize;
    assert_eq!(computed, 37 + 3 * 5 + 4 * 11);
    let second = run_batch(&mut engine, &[(prompt, params)]).remove(0);
    assert_eq!(first, second);
    assert_all_blocks_free(&engine);
}

pub fn cancelling_mid_generation_frees_every_block<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-llama");
    let mut engine = Engine::new(backend.clone(), model, config(64, 4), vec![]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let params = SamplingParams {
        max_tokens: Some(100),
        ..SamplingParams::greedy()
    };
    engine.add_request(RequestId(7), vec![5; 30], params, tx).unwrap();
    for _ in 0..5 {
        engine.step();
    }
    assert!(engine.scheduler().num_blocks_in_use() > 0);
    assert!(matches!(rx.try_recv(), Ok(EngineEvent::Token { .. })));
    engine.cancel(RequestId(7));
    assert!(!engine.has_work());
    assert_all_blocks_free(&engine);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn the_engine_thread_serves_streams_and_dropping_one_cancels_it<B: Backend + Clone + 'static>(backend: &B) {
    use std::sync::atomic::Ordering::Relaxed;
    let model = load(backend, "inferd-test/tiny-llama");
    let handle = EngineHandle::spawn(Engine::new(backend.clone(), model, config(64, 4), vec![2]));
    let params = SamplingParams {
        max_tokens: Some(10_000),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut long = handle.submit(vec![9; 20], params).unwrap();
    let mut short = handle
        .submit(
            vec![3, 4, 5],
            SamplingParams {
                max_tokens: Some(5),
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
        )
        .unwrap();
    let mut tokens = 0;
    loop {
        match short.blocking_next().expect("stream open") {
            EngineEvent::Token { .. } => tokens += 1,
            EngineEvent::Finished { reason, usage, .. } => {
                assert_eq!(
                    (reason, usage.completion_tokens, usage.prompt_tokens),
                    (FinishReason::Length, 5, 3)
                );
                break;
            }
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    assert_eq!(tokens, 5);
    assert!(matches!(long.blocking_next(), Some(EngineEvent::Token { .. })));
    drop(long);
    wait_for("the dropped request's blocks", || {
        handle.metrics().kv_blocks_used.load(Relaxed) == 0 && handle.metrics().running.load(Relaxed) == 0
    });
}

pub fn invalid_requests_are_refused_before_the_engine<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen2");
    let vocab = model.config.vocab_size as u32;
    // A pool larger than the model's window, so the window is the limit.
    let pool_blocks = model.config.max_position_embeddings.div_ceil(16) + 4;
    let handle = EngineHandle::spawn(Engine::new(backend.clone(), model, config(pool_blocks, 16), vec![]));
    let max = handle.max_model_len();
    let submit = |prompt: Vec<u32>, params: SamplingParams| handle.submit(prompt, params).err();
    assert_eq!(
        submit(vec![], SamplingParams::default()),
        Some(SubmitError::EmptyPrompt)
    );
    assert_eq!(
        submit(vec![1; max + 5], SamplingParams::default()),
        Some(SubmitError::PromptTooLong { prompt: max + 5, max })
    );
    // Parameter ranges are the API layer's (api::sampling); the engine checks what only
    // it knows: token ids against the vocabulary.
    let out_of_range = |role: TokenRole, p: SamplingParams| {
        assert_eq!(
            submit(vec![1, 2], p),
            Some(SubmitError::TokenOutOfRange {
                role,
                id: vocab,
                vocab_size: vocab as usize
            })
        )
    };
    assert_eq!(
        submit(vec![1, vocab], SamplingParams::default()),
        Some(SubmitError::TokenOutOfRange {
            role: TokenRole::Prompt,
            id: vocab,
            vocab_size: vocab as usize
        })
    );
    out_of_range(
        TokenRole::Stop,
        SamplingParams {
            stop_token_ids: vec![vocab],
            ..Default::default()
        },
    );
    out_of_range(
        TokenRole::Biased,
        SamplingParams {
            logit_bias: vec![(vocab, 1.0)],
            ..Default::default()
        },
    );
    out_of_range(
        TokenRole::Forced,
        SamplingParams {
            forced_prefixes: vec![vec![1, vocab]],
            ..Default::default()
        },
    );
}

pub fn a_full_waiting_queue_reports_overload<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-llama");
    let config = EngineConfig {
        max_num_seqs: 1,
        max_waiting: 2,
        ..config(64, 16)
    };
    let handle = EngineHandle::spawn(Engine::new(backend.clone(), model, config, vec![]));
    let params = SamplingParams {
        max_tokens: Some(200),
        ..SamplingParams::greedy()
    };
    let results: Vec<_> = (0..8).map(|_| handle.submit(vec![7; 10], params.clone())).collect();
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(SubmitError::Overloaded { .. })))
        .count();
    assert!(
        overloaded >= 4,
        "{overloaded} of 8 refused with max_waiting 2 and one running"
    );
    drop(results);
    wait_for("cancelled requests to go", || {
        handle
            .metrics()
            .kv_blocks_used
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
            && handle.metrics().pending.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    // Nothing is left counted against the queue: a new request is accepted and served.
    let mut stream = handle
        .submit(
            vec![7; 10],
            SamplingParams {
                max_tokens: Some(2),
                ..params
            },
        )
        .unwrap();
    while !matches!(stream.blocking_next(), Some(EngineEvent::Finished { .. })) {}
}

/// Every event of one request that ran alone: prompt log-probabilities, tokens, and
/// the usage it finished with.
fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> (Vec<(u32, f32, usize)>, Vec<u32>, usize) {
    let (mut prompt, mut tokens, mut cached) = (Vec::new(), Vec::new(), 0);
    while let Ok(event) = rx.try_recv() {
        match event {
            EngineEvent::PromptLogprobs(entries) => {
                assert!(tokens.is_empty(), "prompt log-probabilities come before tokens");
                prompt.extend(entries.iter().map(|(lp, rank)| (lp.token, lp.logprob, *rank)));
            }
            EngineEvent::Token { token, .. } => tokens.push(token),
            EngineEvent::Finished { usage, .. } => cached = usage.cached_prompt_tokens,
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    (prompt, tokens, cached)
}

/// vLLM's `prompt_logprobs`: each prompt token's log-probability given the tokens before
/// it is what the decode path reports for that token as the next one (checked by
/// forcing it with `allowed_token_ids`: log-probabilities are of the raw logits), in
/// one chunk or many, and a prompt the prefix cache holds is computed again for them.
pub fn prompt_logprobs_are_the_next_token_logprobs_of_each_prefix<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen2");
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 29) % 380).collect();
    let params = SamplingParams {
        max_tokens: Some(3),
        prompt_logprobs: Some(2),
        ..SamplingParams::greedy()
    };
    let mut engine = Engine::new(backend.clone(), model, config(64, 8), vec![]);
    let run = |engine: &mut Engine<B>, params: &SamplingParams| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .add_request(RequestId(7), prompt.clone(), params.clone(), tx)
            .unwrap();
        while engine.has_work() {
            engine.step();
        }
        drain(&mut rx)
    };
    let (entries, tokens, _) = run(&mut engine, &params);
    assert_eq!(entries.len(), prompt.len() - 1);
    assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), prompt[1..]);
    // Again, with the prompt in the prefix cache: the same, and nothing taken from it.
    let (again, tokens_again, cached) = run(&mut engine, &params);
    assert_eq!((&again, &tokens_again, cached), (&entries, &tokens, 0));
    let plain = SamplingParams {
        prompt_logprobs: None,
        ..params.clone()
    };
    let (none, plain_tokens, cached) = run(&mut engine, &plain);
    assert!(none.is_empty() && cached > 0);
    assert_eq!(
        plain_tokens, tokens,
        "asking for prompt log-probabilities changes no token"
    );
    assert_all_blocks_free(&engine);
    // Against the decode path, one prefix at a time.
    let model = engine.into_model();
    let mut fresh = Engine::new(backend.clone(), model, config(64, 8), vec![]);
    for (p, &(token, logprob, rank)) in entries.iter().enumerate().step_by(7) {
        let forced = SamplingParams {
            max_tokens: Some(1),
            logprobs: Some(1),
            allowed_token_ids: Some(vec![token]),
            ..SamplingParams::greedy()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        fresh
            .add_request(RequestId(9), prompt[..p + 1].to_vec(), forced, tx)
            .unwrap();
        while fresh.has_work() {
            fresh.step();
        }
        let reported = std::iter::from_fn(|| rx.try_recv().ok())
            .find_map(|e| match e {
                EngineEvent::Token { logprobs, .. } => logprobs,
                _ => None,
            })
            .expect("a token with log-probabilities");
        assert_eq!(reported.token, token);
        assert!(
            (reported.logprob - logprob).abs() < 1e-4,
            "position {}: {logprob} vs {}",
            p + 1,
            reported.logprob
        );
        assert_eq!(rank == 1, reported.top[0].0 == token, "rank 1 is the likeliest token");
    }
}

/// vLLM's `priority`: waiting requests start lowest value first, arrival order among
/// equals; `cache_salt`: cached blocks are shared only between equal salts.
pub fn priority_orders_admission_and_cache_salt_separates_prefixes<B: Backend + Clone + 'static>(backend: &B) {
    let model = load(backend, "inferd-test/tiny-qwen2");
    let mut engine = Engine::new(
        backend.clone(),
        model,
        EngineConfig {
            max_num_seqs: 1,
            ..config(64, 8)
        },
        vec![],
    );
    let mut receivers = Vec::new();
    for (id, priority) in [(1, 0), (2, 5), (3, -1), (4, 0), (5, -1)] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let params = SamplingParams {
            max_tokens: Some(2),
            priority,
            ..SamplingParams::greedy()
        };
        engine.add_request(RequestId(id), vec![5, 6, 7], params, tx).unwrap();
        receivers.push((id, rx));
    }
    let mut finished = Vec::new();
    while engine.has_work() {
        engine.step();
        for (id, rx) in receivers.iter_mut() {
            while let Ok(event) = rx.try_recv() {
                if matches!(event, EngineEvent::Finished { .. }) {
                    finished.push(*id);
                }
            }
        }
    }
    assert_eq!(finished, vec![3, 5, 1, 4, 2]);

    let prompt: Vec<u32> = (0..40).map(|i| 3 + i).collect();
    let mut cached_with = |salt: Option<u64>| {
        let params = SamplingParams {
            max_tokens: Some(1),
            cache_salt: salt,
            ..SamplingParams::greedy()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.add_request(RequestId(20), prompt.clone(), params, tx).unwrap();
        while engine.has_work() {
            engine.step();
        }
        drain(&mut rx).2
    };
    assert_eq!(cached_with(Some(1)), 0);
    assert_eq!(cached_with(Some(2)), 0, "another salt shares nothing");
    assert_eq!(cached_with(None), 0, "nor does no salt");
    // Four full blocks: the last token is always computed (its logits pick the next).
    assert_eq!(cached_with(Some(1)), 32, "the same salt shares the prefix");
}

/// Structured outputs on a random-weight model (whose choices the grammar alone keeps in
/// line): every output is a complete document of its grammar, the same alone, in a batch
/// of 32 and under preemption, with greedy, seeded top-k / top-p, log-probabilities and
/// n > 1. The grammars are compiled over the Qwen2.5 tokenizer, whose first 256 ids are
/// its byte tokens: a 384-token model can spell any document with them.
pub fn constrained_outputs_follow_their_grammar_alone_batched_and_preempted<B: Backend + Clone + 'static>(backend: &B) {
    use std::sync::Arc;

    use inferd::engine::{Constraint, ConstraintStart};
    use inferd::text::{GrammarCompiler, GrammarSpec, JsonStyle, Tokenizer};
    use serde_json::json;

    const EOS: u32 = 2;
    let tokenizer = Arc::new(Tokenizer::from_dir(&crate::common::fixture("models/qwen2.5-coder-0.5b")).unwrap());
    let compiler = GrammarCompiler::new(tokenizer.clone(), 384, vec![EOS]);
    let schema = json!({
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["x", "yy"]}},
        "required": ["n", "tag"],
        "additionalProperties": false
    });
    let specs = [
        GrammarSpec::JsonSchema(schema),
        GrammarSpec::Regex("[a-f]{2,5}-[0-9]{1,3}".into()),
        GrammarSpec::Choice(vec!["alpha".into(), "beta".into(), "gamma".into()]),
        GrammarSpec::Grammar("root ::= \"(\" [0-9] (\"+\" [0-9]){0,3} \")\"".into()),
    ];
    let grammars: Vec<_> = specs
        .iter()
        .map(|s| compiler.compile(s, &JsonStyle::default()).unwrap())
        .collect();
    let model = load(backend, "inferd-test/tiny-qwen2");
    let vocab = model.config.vocab_size as u32;
    let requests: Vec<(Vec<u32>, SamplingParams)> = (0..32)
        .map(|i| {
            let (prompt, mut params) = request(i, vocab);
            params.max_tokens = Some(48);
            params.constraint = Some(Constraint {
                grammar: grammars[i % grammars.len()].clone(),
                start: ConstraintStart::Now,
            });
            if i % 7 == 3 {
                params.n = 2;
                params.seed = Some(i as u64);
            }
            (prompt, params)
        })
        .collect();
    let check = |outputs: &[Vec<Vec<u32>>]| {
        for (i, completions) in outputs.iter().enumerate() {
            for tokens in completions {
                assert_eq!(tokens.last(), Some(&EOS), "request {i} ends its document: {tokens:?}");
                let text = tokenizer.decode(&tokens[..tokens.len() - 1], false).unwrap();
                let ok = match i % grammars.len() {
                    0 => serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| {
                        v["n"].as_u64().is_some_and(|n| n <= 999)
                            && ["x", "yy"].contains(&v["tag"].as_str().unwrap_or(""))
                            && v.as_object().unwrap().len() == 2
                    }),
                    1 => {
                        let (letters, digits) = text.split_once('-').unwrap_or(("", ""));
                        (2..=5).contains(&letters.len())
                            && letters.chars().all(|c| ('a'..='f').contains(&c))
                            && (1..=3).contains(&digits.len())
                            && digits.chars().all(|c| c.is_ascii_digit())
                    }
                    2 => ["alpha", "beta", "gamma"].contains(&text.as_str()),
                    _ => {
                        let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or("");
                        let parts: Vec<&str> = inner.split('+').collect();
                        (1..=4).contains(&parts.len())
                            && parts.iter().all(|p| p.len() == 1 && p.as_bytes()[0].is_ascii_digit())
                    }
                };
                assert!(ok, "request {i}: {text:?} does not follow its grammar");
            }
        }
    };
    let mut alone = Vec::new();
    let mut model = model;
    for r in &requests {
        let mut engine = Engine::new(backend.clone(), model, config(64, 16), vec![EOS]);
        alone.push(run_batch(&mut engine, std::slice::from_ref(r)).remove(0));
        assert_all_blocks_free(&engine);
        model = engine.into_model();
    }
    check(&alone);
    let mut engine = Engine::new(backend.clone(), model, config(512, 16), vec![EOS]);
    let together = run_batch(&mut engine, &requests);
    assert_eq!(together, alone, "a batch of 32 changes no document");
    let model = engine.into_model();
    let mut engine = Engine::new(backend.clone(), model, config(20, 4), vec![EOS]);
    let tight = run_batch(&mut engine, &requests);
    assert!(engine.stats().preemptions > 0, "the small pool must force preemption");
    assert_eq!(tight, alone, "preemption changes no document");
    assert_all_blocks_free(&engine);
}

/// Every event of every request, per completion index, in order (`run_batch` keeps
/// tokens only).
type Events = Vec<Vec<Vec<EngineEvent>>>;

/// Runs requests on an engine, all queued at once, cancelling request `cancel` once it
/// has been sent two tokens; returns each request's events per completion index.
fn run_events<B: Backend + 'static>(
    engine: &mut Engine<B>,
    requests: &[(Vec<u32>, SamplingParams)],
    cancel: Option<usize>,
) -> Events {
    let mut receivers = Vec::new();
    for (i, (prompt, params)) in requests.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .add_request(RequestId(i as u64), prompt.clone(), params.clone(), tx)
            .unwrap();
        receivers.push(rx);
    }
    let mut events: Events = requests.iter().map(|(_, p)| vec![Vec::new(); p.n]).collect();
    let mut steps = 0;
    while engine.has_work() {
        engine.step();
        steps += 1;
        assert!(steps < 100_000, "the engine does not make progress");
        for (i, rx) in receivers.iter_mut().enumerate() {
            while let Ok(event) = rx.try_recv() {
                match &event {
                    EngineEvent::Token { index, .. } | EngineEvent::Finished { index, .. } => {
                        events[i][*index].push(event.clone())
                    }
                    EngineEvent::PromptLogprobs(_) => {}
                    EngineEvent::Failed(e) => panic!("request failed: {e}"),
                }
            }
        }
        if let Some(victim) = cancel.filter(|&v| events[v][0].len() == 2) {
            engine.cancel(RequestId(victim as u64));
        }
    }
    events
}

/// What must not depend on scheduling: the events less the count of prompt tokens the
/// prefix cache served (when a request is admitted depends on the schedule).
fn without_cached_counts(mut events: Events) -> Events {
    for event in events.iter_mut().flatten().flatten() {
        if let EngineEvent::Finished { usage, .. } = event {
            usage.cached_prompt_tokens = 0;
        }
    }
    events
}

/// Async scheduling (step N+1 launched before step N's outputs are read) gives the
/// serial loop's events, event for event: greedy and seeded draws chosen on the device,
/// rows sampled on the device with filters, logit bias and log-probabilities (which run
/// ahead too), rows whose penalties read the last token and rows sampled on the host
/// (both read before the next step is planned), stop tokens seen a
/// step late whose extra token never shows, n > 1, preemption in a small pool, and a
/// request cancelled while a step of it is in flight. Every block is free after.
pub fn async_scheduling_gives_the_serial_events<B: Backend + Clone + 'static>(backend: &B) {
    let mut model = load(backend, "inferd-test/tiny-qwen2");
    let vocab = model.config.vocab_size as u32;
    let mut requests: Vec<_> = (0..40).map(|i| request(i, vocab)).collect();
    // Most requests sample on the device only (what lets a step run ahead). A quarter
    // are short: filters and log-probabilities (with a logit bias, or with penalties
    // that read the last token, or with `allowed_token_ids`, sampled on the host), and
    // while the last two kinds run every step is read before the next is planned.
    for (i, r) in requests.iter_mut().enumerate() {
        r.1.max_tokens = Some(if i % 4 == 3 { 2 + i % 3 } else { 8 + i % 17 });
        if i % 8 == 7 {
            r.1.repetition_penalty = 1.2;
            r.1.frequency_penalty = 0.3;
        } else if i % 4 == 3 {
            r.1.logit_bias = vec![(5, 2.0), (6, -1.0)];
        }
        if i == 19 {
            r.1.allowed_token_ids = Some((3..200).collect());
        }
        if i % 4 == 1 || i % 4 == 2 {
            r.1 = SamplingParams {
                max_tokens: r.1.max_tokens,
                temperature: if i % 4 == 1 { 0.0 } else { 0.8 },
                seed: Some(7 * i as u64),
                ..Default::default()
            };
        }
        // n > 1 with seeded draws on the device (and one greedy), and replies of one
        // and two tokens.
        if i % 10 == 2 || i == 13 {
            r.1.n = 2;
        }
        if i == 1 || i == 5 {
            r.1.max_tokens = Some(1 + i / 4);
        }
    }
    let serial_config = |num_blocks| EngineConfig {
        async_scheduling: false,
        ..config(num_blocks, 4)
    };
    let async_config = |num_blocks| EngineConfig {
        async_scheduling: true,
        ..config(num_blocks, 4)
    };
    // Stop ids that end requests mid-way: each device-sampled request stops at the
    // seventh token of its serial reply (once the short host-sampled requests are done,
    // so that the stops come in steps that ran ahead).
    let mut engine = Engine::new(backend.clone(), model, serial_config(1024), vec![]);
    let first = run_events(&mut engine, &requests, None);
    let first_computed = engine.stats().tokens_computed;
    model = engine.into_model();
    // Without stop ids every end is by length, known ahead: not one token more is computed.
    let mut engine = Engine::new(backend.clone(), model, async_config(1024), vec![]);
    assert_eq!(
        without_cached_counts(run_events(&mut engine, &requests, None)),
        without_cached_counts(first.clone())
    );
    assert!(engine.stats().steps_ahead > 0);
    assert_eq!(engine.stats().tokens_computed, first_computed);
    model = engine.into_model();
    let mut stopped = Vec::new();
    for (i, r) in requests
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| i % 4 == 1 || i % 4 == 2)
    {
        // One stops on its first token.
        let at = if i == 9 { 0 } else { 6 };
        if let Some(EngineEvent::Token { token, .. }) = first[i][0].get(at) {
            r.1.stop_token_ids = vec![*token];
            stopped.push(i);
        }
    }
    assert!(stopped.len() > 5);

    let mut engine = Engine::new(backend.clone(), model, serial_config(1024), vec![]);
    let serial = run_events(&mut engine, &requests, None);
    let serial_computed = engine.stats().tokens_computed;
    assert_eq!(engine.stats().steps_ahead, 0);
    assert_all_blocks_free(&engine);
    model = engine.into_model();
    for &i in &stopped {
        let last = serial[i][0].last();
        assert!(
            matches!(
                last,
                Some(EngineEvent::Finished {
                    reason: FinishReason::Stop,
                    ..
                })
            ),
            "request {i} stops at its stop id: {last:?}"
        );
    }

    let mut engine = Engine::new(backend.clone(), model, async_config(1024), vec![]);
    let ahead = run_events(&mut engine, &requests, None);
    let stats = engine.stats();
    assert!(stats.steps_ahead > stats.steps / 2, "steps ran ahead: {stats:?}");
    // The only extra work: the token after each stop, computed before the stop was read
    // (an end by length is known ahead and never computed).
    let stops = serial.iter().flatten().filter(|events| {
        matches!(
            events.last(),
            Some(EngineEvent::Finished {
                reason: FinishReason::Stop,
                ..
            })
        )
    });
    assert!(
        stats.tokens_computed > serial_computed,
        "some stops were read a step late"
    );
    assert!(stats.tokens_computed <= serial_computed + stops.count() as u64);
    assert_all_blocks_free(&engine);
    model = engine.into_model();
    assert_eq!(without_cached_counts(ahead), without_cached_counts(serial.clone()));

    // A small pool: sequences are preempted with a token in flight.
    let mut engine = Engine::new(backend.clone(), model, async_config(40), vec![]);
    let tight = run_events(&mut engine, &requests, None);
    assert!(engine.stats().preemptions > 0, "the small pool must force preemption");
    assert!(engine.stats().steps_ahead > 0);
    assert_all_blocks_free(&engine);
    model = engine.into_model();
    assert_eq!(without_cached_counts(tight), without_cached_counts(serial.clone()));

    // Cancelled with a step in flight: nothing of it is sent after the cancel, and the
    // others are untouched.
    let victim = 8;
    let mut engine = Engine::new(backend.clone(), model, async_config(1024), vec![]);
    let cancelled = run_events(&mut engine, &requests, Some(victim));
    assert_all_blocks_free(&engine);
    assert!(serial[victim][0].len() > 4);
    assert_eq!(cancelled[victim][0][..], serial[victim][0][..2]);
    let others = |events: &Events| -> Events {
        let mut events = without_cached_counts(events.clone());
        events.remove(victim);
        events
    };
    assert_eq!(others(&cancelled), others(&serial));
}

/// Decode-only steps padded to their batch-size bucket (what CUDA graphs are captured
/// for) give the unpadded events exactly, serial and with async scheduling: the padded
/// rows write only to the scratch block past the pool, and no real row's values move.
pub fn padded_decode_batches_give_the_same_events<B: Backend + Clone + 'static>(backend: &B) {
    let mut model = Some(load(backend, "inferd-test/tiny-llama"));
    let vocab = model.as_ref().unwrap().config.vocab_size as u32;
    // 11 requests: decode batches of 11 and fewer, padded to 16, 8, 4, 2. Sampled on the
    // device (greedy, seeded draws) so that steps run ahead with async scheduling, and
    // then with host-sampled rows mixed in.
    let device_sampled: Vec<_> = (0..11)
        .map(|i| {
            let (prompt, _) = request(i, vocab);
            let params = SamplingParams {
                max_tokens: Some(4 + 2 * i),
                temperature: if i % 2 == 0 { 0.0 } else { 0.7 },
                seed: Some(i as u64),
                ..Default::default()
            };
            (prompt, params)
        })
        .collect();
    let mixed: Vec<_> = (0..11)
        .map(|i| {
            let (prompt, mut params) = request(i, vocab);
            params.max_tokens = Some(4 + 2 * i);
            (prompt, params)
        })
        .collect();
    padded_events_equal_unpadded(backend, &mut model, &device_sampled, true);
    padded_events_equal_unpadded(backend, &mut model, &mixed, false);
}

/// Runs `requests` unpadded, padded, and padded with async scheduling (`ahead`: steps
/// must run ahead then), and compares the events.
fn padded_events_equal_unpadded<B: Backend + Clone + 'static>(
    backend: &B,
    model: &mut Option<DecoderModel<B>>,
    requests: &[(Vec<u32>, SamplingParams)],
    ahead: bool,
) {
    let mut runs = Vec::new();
    for (pad, async_scheduling) in [(false, false), (true, false), (true, true)] {
        let config = EngineConfig {
            pad_decode_batches: pad,
            async_scheduling,
            ..config(128, 4)
        };
        let mut engine = Engine::new(backend.clone(), model.take().unwrap(), config, vec![2]);
        runs.push(without_cached_counts(run_events(&mut engine, requests, None)));
        let padded = engine.stats().padded_rows;
        assert_eq!(padded > 0, pad, "padded rows: {padded}");
        if async_scheduling && ahead {
            assert!(engine.stats().steps_ahead > 0);
        }
        assert_all_blocks_free(&engine);
        *model = Some(engine.into_model());
    }
    assert_eq!(runs[1], runs[0]);
    assert_eq!(runs[2], runs[0]);
}
