//! The engine: continuous batching over the paged KV cache. One step is
//! `schedule()` -> `forward(plan)` -> `sample + commit`; `Engine` is that loop and owns
//! every piece of its state, and `EngineHandle` runs it on its own thread, taking
//! requests over a channel and returning each request's tokens on a channel of its own.
//! The engine knows token ids only: no HTTP, JSON or text (a structured-output grammar
//! reaches it compiled, and speaks to it in token masks).

pub mod config;
pub mod constraint;
pub mod handle;
pub mod kv_cache;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{Backend, ForwardBatch, SeqChunk};
use crate::models::{DecoderModel, EncoderInput, EngineModel};

pub use config::{
    available_memory, bucket_for, decode_buckets, total_memory, BudgetError, EngineConfig, KvCacheBudget,
};
pub use handle::{EngineHandle, EngineMetrics, RequestStream};

pub use constraint::{Constraint, ConstraintStart};
pub use kv_cache::{BlockHash, KvEvent};
pub use sampling::{SamplingParams, TokenLogprobs, TokenRole};
pub use scheduler::{Scheduler, SchedulerConfig, StepPlan};
pub use sequence::RequestId;

use sampling::{Rng, SamplingContext};
use sequence::{Sequence, PLACEHOLDER};
use stream::{Pending, RowChoice, StepOutcome, StepValues, StepWork, Stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token.
    Stop,
    /// `max_tokens`, or the context window (or the whole KV pool) is full.
    Length,
}

/// Token counts of one finished sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// What a request's channel carries. Sequences of one request (`n > 1`) interleave;
/// each ends with its own `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Token {
        index: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        /// The token ended the sequence as a stop token (EOS or a stop token id): its
        /// text is not part of the reply unless the request keeps stop strings.
        stop: bool,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        usage: Usage,
    },
    /// Log-probabilities of prompt tokens (`SamplingParams::prompt_logprobs`), in
    /// order from position 1, each with its rank; the prompt may come in several such
    /// events (one per prefill chunk), all before the first `Token`.
    PromptLogprobs(Vec<(TokenLogprobs, usize)>),
    /// The request failed; nothing more follows.
    Failed(String),
}

pub type EventSender = UnboundedSender<EngineEvent>;

/// Why a request is refused before it reaches the scheduler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, but the context window holds {max}")]
    PromptTooLong { prompt: usize, max: usize },
    #[error("{role} {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        role: TokenRole,
        id: u32,
        vocab_size: usize,
    },
    #[error("the server is overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },
    #[error("the engine has shut down")]
    ShutDown,
    #[error("{0}")]
    EncoderInput(String),
}

struct RequestState {
    params: SamplingParams,
    /// EOS (unless ignored) and stop token ids.
    stop_ids: Vec<u32>,
    events: EventSender,
    unfinished: usize,
    forked: bool,
    /// For models with an encoder: its input, until the encoder has run.
    encoder_input: Option<EncoderInput>,
    /// The prefix-cache salt of its sequences (the encoder input's content hash).
    cache_salt: Option<kv_cache::BlockHash>,
}

/// Counters the HTTP layer exports (copied into `EngineMetrics` by the engine thread).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub tokens_generated: u64,
    /// Tokens run through the model (prompt chunks and decode inputs).
    pub tokens_computed: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Steps launched before the outputs of the one before them were read (async
    /// scheduling).
    pub steps_ahead: u64,
    /// Rows added to decode-only steps to fill their batch-size bucket
    /// (`EngineConfig::pad_decode_batches`).
    pub padded_rows: u64,
    /// Where the steps' time went, summed over every step.
    pub profile: StepProfile,
    pub last_step_secs: f64,
}

/// What the engine reads of its model (which lives on the step stream).
#[derive(Debug, Clone, Copy)]
struct ModelInfo {
    vocab_size: usize,
    max_positions: usize,
    needs_encoder_input: bool,
    encoder_input_kind: Option<&'static str>,
}

/// Seconds summed over steps: the engine thread's own work, what it waited for, and the
/// forward passes on the step stream. With async scheduling `plan` and `process` overlap
/// `forward`; in the serial loop `wait` is the forward.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepProfile {
    /// Scheduling, building the batch and its sampling choices, launching.
    pub plan: f64,
    /// The engine thread blocked on the stream: outputs not ready, or (run in place)
    /// the forward pass itself.
    pub wait: f64,
    /// Reading outputs: host sampling, stops, events, retiring sequences.
    pub process: f64,
    /// The forward passes and the device's sampling, on the stream.
    pub forward: f64,
}

pub struct Engine<B: Backend + 'static, M: EngineModel<B> = DecoderModel<B>> {
    /// The model, its KV cache and the backend, where steps run.
    stream: Stream<B, M>,
    model: ModelInfo,
    /// Steps launched whose outputs are not read yet, oldest first: with async
    /// scheduling, the one computing (and, briefly, the one queued behind it).
    in_flight: VecDeque<InFlight>,
    /// With `pad_decode_batches` (decoders only): the KV block padded rows write to,
    /// past the pool's blocks, and the batch sizes decode-only steps are padded to.
    padding: Option<(u32, Vec<usize>)>,
    scheduler: Scheduler,
    config: EngineConfig,
    requests: HashMap<RequestId, RequestState>,
    eos_ids: Vec<u32>,
    stats: EngineStats,
    /// Who hears of changes to the prefix cache (`listen_kv_events`).
    kv_listeners: Vec<UnboundedSender<KvEvent>>,
}

impl<B: Backend + 'static, M: EngineModel<B>> Engine<B, M> {
    /// `eos_ids`: the tokens that end generation for this model (config, generation
    /// config and tokenizer EOS).
    pub fn new(backend: B, model: M, config: EngineConfig, eos_ids: Vec<u32>) -> Self {
        // Padded rows need no per-request state: decoders without an encoder only.
        let pads = config.pad_decode_batches && model.encoder_input_kind().is_none();
        let padding = pads.then(|| {
            let scratch = u32::try_from(config.num_blocks).expect("block ids fit in u32");
            (scratch, config::decode_buckets(config.max_num_seqs))
        });
        let cache_blocks = config.num_blocks + usize::from(pads);
        let cache = backend.alloc_kv_cache(model.kv_cache_shape(cache_blocks, config.block_size));
        let info = ModelInfo {
            vocab_size: model.vocab_size(),
            max_positions: model.max_positions(),
            needs_encoder_input: model.needs_encoder_input(),
            encoder_input_kind: model.encoder_input_kind(),
        };
        let scheduler = Scheduler::new(SchedulerConfig {
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
        });
        Engine {
            stream: Stream::new(backend, model, cache, config.async_scheduling),
            model: info,
            in_flight: VecDeque::new(),
            padding,
            scheduler,
            config,
            requests: HashMap::new(),
            eos_ids,
            stats: EngineStats {
                kv_blocks_total: config.num_blocks,
                ..Default::default()
            },
            kv_listeners: Vec::new(),
        }
    }

    /// Sends `listener` what the prefix cache holds now, then every change to it (after
    /// each step, `publish_kv_events`) until the listener is dropped.
    pub fn listen_kv_events(&mut self, listener: UnboundedSender<KvEvent>) {
        // What others have not heard yet goes to them first; the newcomer's snapshot
        // already holds it.
        self.publish_kv_events();
        for event in self.scheduler.pool.record_events(true) {
            let _ = listener.send(event);
        }
        self.kv_listeners.push(listener);
    }

    /// Sends the changes to the prefix cache since the last call to every listener.
    pub fn publish_kv_events(&mut self) {
        if self.kv_listeners.is_empty() {
            return;
        }
        self.kv_listeners.retain(|l| !l.is_closed());
        if self.kv_listeners.is_empty() {
            self.scheduler.pool.record_events(false);
            return;
        }
        for event in self.scheduler.pool.take_events() {
            for listener in &self.kv_listeners {
                let _ = listener.send(event.clone());
            }
        }
    }

    /// Tells every listener that nothing is cached any more (the engine is stopping).
    pub fn clear_kv_listeners(&mut self) {
        for listener in self.kv_listeners.drain(..) {
            let _ = listener.send(KvEvent::Cleared);
        }
        self.scheduler.pool.record_events(false);
    }

    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size
    }

    /// Takes the model back (the engine's KV cache is dropped), once every step
    /// launched has run.
    pub fn into_model(self) -> M {
        self.stream.into_model()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The tokens that end a sequence (unless a request ignores EOS).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Longest sequence (prompt + output) the engine can hold.
    pub fn max_model_len(&self) -> usize {
        self.model.max_positions.min(self.scheduler.max_tokens_per_sequence())
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || !self.in_flight.is_empty()
    }

    /// Requests queued that have never run yet.
    pub fn unadmitted_requests(&self) -> std::collections::HashSet<RequestId> {
        let mut ids = self.scheduler.unadmitted_requests();
        ids.retain(|id| self.requests.contains_key(id));
        ids
    }

    pub fn stats(&self) -> EngineStats {
        let mut stats = self.stats;
        stats.waiting = self.scheduler.waiting.len();
        stats.running = self.scheduler.running.len();
        stats.kv_blocks_used = self.scheduler.num_blocks_in_use();
        (stats.prefix_cache_queries, stats.prefix_cache_hits) = self.scheduler.pool.prefix_cache_stats();
        stats.preemptions = self.scheduler.num_preemptions;
        stats
    }

    /// Checks a request against the model and limits, before it is queued.
    pub fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), SubmitError> {
        validate_request(prompt, params, self.model.vocab_size, self.max_model_len())
    }

    /// Queues a request; its events go to `events`.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        events: EventSender,
    ) -> Result<(), SubmitError> {
        self.add_request_with_input(id, prompt, params, None, events)
    }

    /// Queues a request with its encoder input (required by models with an encoder,
    /// refused by others).
    pub fn add_request_with_input(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        encoder_input: Option<EncoderInput>,
        events: EventSender,
    ) -> Result<(), SubmitError> {
        self.validate(&prompt, &params)?;
        let takes = self.model.encoder_input_kind;
        match &encoder_input {
            None if self.model.needs_encoder_input => {
                return Err(SubmitError::EncoderInput(format!(
                    "this model needs {} input",
                    takes.unwrap_or("encoder")
                )))
            }
            Some(input) if takes != Some(input.kind()) => {
                return Err(SubmitError::EncoderInput(format!(
                    "this model takes no {} input",
                    input.kind()
                )))
            }
            _ => {}
        }
        let max_model_len = self.max_model_len();
        let max_len = match params.max_tokens {
            // (At least one token: what `max_tokens: 0` always gave.)
            Some(m) => (prompt.len() + m.max(1)).min(max_model_len),
            None => max_model_len,
        };
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend(&self.eos_ids);
        }
        let rng = Rng::seeded(params.seed.unwrap_or_else(fresh_seed));
        // Cached decoder K/V depend on the audio or images too: blocks are shared only
        // between requests with the same input (and the same `cache_salt`).
        let encoder_salt = encoder_input
            .as_ref()
            .map(|input| kv_cache::BlockHash(input.content_hash()));
        let cache_salt = match params.cache_salt {
            Some(salt) => Some(kv_cache::hash_block(encoder_salt, &[(salt >> 32) as u32, salt as u32])),
            None => encoder_salt,
        };
        let mut seq = Sequence::new(id, 0, prompt, rng)
            .with_cache_salt(cache_salt)
            .with_constraint(params.constraint.as_ref())
            .with_max_len(max_len);
        seq.needs_encoder = encoder_input.is_some();
        seq.priority = params.priority;
        seq.prompt_logprobs_done = params.prompt_logprobs.map(|_| 1);
        self.scheduler.enqueue(seq);
        self.requests.insert(
            id,
            RequestState {
                encoder_input,
                cache_salt,
                unfinished: params.n,
                forked: params.n == 1,
                params,
                stop_ids,
                events,
            },
        );
        Ok(())
    }

    /// Drops a request wherever it is, freeing its blocks; no more events are sent.
    pub fn cancel(&mut self, id: RequestId) {
        self.scheduler.remove_request(id);
        self.requests.remove(&id);
        self.stream.end_request(id.0);
        // A step in flight for requests that are all gone is not read (the stream still
        // runs it, before anything launched later).
        let requests = &self.requests;
        self.in_flight
            .retain(|step| step.chunks.iter().any(|c| requests.contains_key(&c.request)));
    }

    /// Fails every request the engine holds with `message` and frees their blocks: what
    /// the engine thread does when a step panics (a backend error), so that it keeps
    /// serving new requests instead of dying with them.
    pub fn fail_all(&mut self, message: &str) {
        // Every request, and sequences whose request was already gone.
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.extend(
            self.scheduler
                .running
                .iter()
                .chain(self.scheduler.waiting.iter())
                .map(|s| s.request),
        );
        self.fail_requests(ids, message);
        // What is in flight is theirs; its outputs are never read.
        self.in_flight.clear();
    }

    /// `fail_request` for each of `ids` (repeats allowed).
    fn fail_requests(&mut self, mut ids: Vec<RequestId>, message: &str) {
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.fail_request(id, message);
        }
    }

    /// Tells request `id` it failed (when it is still there) and drops it: its
    /// sequences, their blocks, and what the model kept for it.
    fn fail_request(&mut self, id: RequestId, message: &str) {
        if let Some(req) = self.requests.get(&id) {
            let _ = req.events.send(EngineEvent::Failed(message.to_owned()));
        }
        self.cancel(id);
    }

    /// Runs the encoder of every request in the plan that has not had it yet. A request
    /// whose input the encoder refuses fails alone; returns false when one did (the plan
    /// is then stale: the step is skipped, and the next one plans again).
    fn encode_inputs(&mut self, plan: &StepPlan) -> bool {
        let mut failed = Vec::new();
        for &(i, _) in &plan.chunks {
            let seq = &mut self.scheduler.running[i];
            if !seq.needs_encoder {
                continue;
            }
            seq.needs_encoder = false;
            let id = seq.request;
            let prompt = seq.prompt().to_vec();
            if let Some(input) = self.requests.get_mut(&id).and_then(|r| r.encoder_input.take()) {
                let waiting = Instant::now();
                let begun = self.stream.begin_request(id.0, prompt, input);
                self.stats.profile.wait += waiting.elapsed().as_secs_f64();
                if let Err(e) = begun {
                    failed.push((id, e));
                }
            }
        }
        for (id, e) in &failed {
            self.fail_request(*id, e);
        }
        failed.is_empty()
    }

    /// One scheduling step: plans and launches a step, and reads the outputs of the one
    /// before it (with async scheduling; of this one otherwise). Returns the number of
    /// tokens launched (0 when nothing could be).
    pub fn step(&mut self) -> usize {
        let start = Instant::now();
        let wait_before = self.stats.profile.wait;
        // A step whose outputs decide what the next one computes is read first.
        if self.in_flight.back().is_some_and(|s| !s.pipelined) {
            self.finish_in_flight(0);
        }
        let (planning, wait_planning) = (Instant::now(), self.stats.profile.wait);
        let launched = self.launch();
        let plan = planning.elapsed().as_secs_f64() - (self.stats.profile.wait - wait_planning);
        self.finish_in_flight(usize::from(self.stream.is_threaded() && launched > 0));
        let total = start.elapsed().as_secs_f64();
        self.stats.profile.plan += plan;
        self.stats.profile.process += total - plan - (self.stats.profile.wait - wait_before);
        if launched > 0 {
            self.stats.last_step_secs = total;
        }
        launched
    }

    /// Reads the outputs of the oldest steps in flight until `keep` are left.
    fn finish_in_flight(&mut self, keep: usize) {
        while self.in_flight.len() > keep {
            let step = self.in_flight.pop_front().expect("a step in flight");
            self.finish(step);
        }
    }

    /// Plans the next step and launches it; returns its token count.
    fn launch(&mut self) -> usize {
        let plan = self.scheduler.schedule();
        if plan.chunks.is_empty() {
            if let Some(seq) = self
                .scheduler
                .waiting
                .front()
                .filter(|_| self.scheduler.running.is_empty() && self.in_flight.is_empty())
            {
                // Nothing runs and the first in line cannot start: with every block free
                // that means it can never fit. Fail it rather than spin.
                let id = seq.request;
                if let Some(req) = self.requests.remove(&id) {
                    let _ = req
                        .events
                        .send(EngineEvent::Failed("the request does not fit in the KV cache".into()));
                }
                self.scheduler.remove_request(id);
                self.stream.end_request(id.0);
            }
            return 0;
        }
        if !self.encode_inputs(&plan) {
            return 0;
        }
        let (mut batch, from_previous) = self.build_batch(&plan);
        let num_tokens = batch.num_tokens();
        self.stats.tokens_computed += num_tokens as u64;
        let prompt = self.prompt_logprob_rows(&plan, &batch);
        let padded = self.pad_decode_batch(&mut batch);
        self.stats.padded_rows += padded as u64;
        // How each chunk's logits row becomes a token. A step may be followed before its
        // outputs are read when every token it chooses is chosen on the device and
        // nothing about the next step depends on which it is (no grammar, no forced
        // text; stops are applied a step late and the extra token dropped).
        let mut pipelined = self.stream.is_threaded() && prompt.is_none();
        let mut chunks = Vec::with_capacity(plan.chunks.len());
        let mut choices = Vec::with_capacity(plan.chunks.len());
        for &(i, n) in &plan.chunks {
            let seq = &mut self.scheduler.running[i];
            let samples = seq.num_computed + n == seq.tokens.len();
            let choice = match self.requests.get(&seq.request) {
                Some(req) if samples => {
                    let ctx = SamplingContext::new(&req.params, &seq.tokens, seq.prompt_len, &req.stop_ids);
                    let constrained = seq.constraint.as_ref().is_some_and(|c| c.constrains_next());
                    let choice = if constrained || sampling::needs_host(&ctx) {
                        RowChoice::Host
                    } else {
                        // Placeholders are a suffix; a request whose edits read its tokens
                        // never gets one (its steps are never run ahead).
                        assert!(
                            !sampling::reads_history(&req.params) || ctx.output.last() != Some(&PLACEHOLDER),
                            "penalties planned over a token not read yet"
                        );
                        RowChoice::Sample(Box::new(sampling::row_sampling(&ctx, &mut seq.rng)))
                    };
                    // Penalties and bans read the tokens generated so far: the next
                    // step's edits need this one's token.
                    pipelined &= choice != RowChoice::Host
                        && !sampling::reads_history(&req.params)
                        && seq.constraint.is_none()
                        && req.params.forced_prefixes.is_empty();
                    choice
                }
                _ => RowChoice::Skip,
            };
            chunks.push(Launched {
                uid: seq.uid,
                request: seq.request,
                start: seq.num_computed,
                len: n,
                epoch: seq.epoch,
                samples: choice != RowChoice::Skip,
            });
            choices.push(choice);
        }
        self.scheduler.advance(&plan);
        if pipelined {
            for (row, c) in chunks.iter().enumerate().filter(|(_, c)| c.samples) {
                let seq = &mut self.scheduler.running[plan.chunks[row].0];
                debug_assert_eq!(seq.uid, c.uid);
                seq.tokens.push(PLACEHOLDER);
                seq.placeholder_row = Some(row);
            }
        }
        let logits_rows = match &prompt {
            Some(p) => Some(p.rows.clone()),
            // The padded rows get no logits (each chunk is one row here).
            None if padded > 0 => Some((0..plan.chunks.len()).collect()),
            None => None,
        };
        let work = StepWork {
            batch,
            from_previous,
            logits_rows,
            prompt_rows: prompt
                .as_ref()
                .map_or_else(Vec::new, |p| p.prompt.iter().map(|e| e.0).collect()),
            last_rows: prompt.as_ref().map(|p| p.last.clone()),
            choices,
        };
        // The masks of constrained sequences that sample this step are computed while the
        // forward pass runs (nothing is allocated for a step without them).
        let mut states: Vec<&mut constraint::ConstraintState> = self
            .scheduler
            .running
            .iter_mut()
            .filter(|seq| seq.constraint.is_some())
            .filter(|seq| chunks.iter().any(|c| c.samples && c.uid == seq.uid))
            .filter_map(|seq| seq.constraint.as_deref_mut())
            .filter(|state| state.constrains_next())
            .collect();
        let stream = &mut self.stream;
        let launched = Instant::now();
        let reply = constraint::prepare_during(&mut states, || stream.launch(work));
        drop(states);
        if !self.stream.is_threaded() {
            // Run in place: the launch was the forward pass.
            self.stats.profile.wait += launched.elapsed().as_secs_f64();
        }
        self.stats.steps_ahead += u64::from(!self.in_flight.is_empty());
        self.in_flight.push_back(InFlight {
            chunks,
            pipelined,
            prompt,
            reply,
        });
        num_tokens
    }

    /// Reads a step's outputs: registers the blocks it filled, sends prompt
    /// log-probabilities, samples, sends tokens and retires finished sequences.
    fn finish(&mut self, step: InFlight) {
        let waiting = Instant::now();
        let outcome = step
            .reply
            .wait()
            .unwrap_or_else(|| StepOutcome::Panicked("the step thread is gone".into()));
        self.stats.profile.wait += waiting.elapsed().as_secs_f64();
        self.stats.steps += 1;
        let mut values = match outcome {
            StepOutcome::Done(values) => {
                self.stats.profile.forward += values.forward_secs;
                values
            }
            // The model refused the batch: its requests fail.
            StepOutcome::Refused(e) => {
                return self.fail_requests(step.chunks.iter().map(|c| c.request).collect(), &e.to_string())
            }
            StepOutcome::Panicked(message) => {
                // As if it panicked here: the engine's thread fails every request.
                self.in_flight.clear();
                std::panic::resume_unwind(Box::new(message));
            }
        };
        let running: HashMap<u64, usize> = self
            .scheduler
            .running
            .iter()
            .enumerate()
            .map(|(i, s)| (s.uid, i))
            .collect();
        for c in &step.chunks {
            // A sequence preempted since gave those blocks back.
            if let Some(&i) = running.get(&c.uid) {
                if self.scheduler.running[i].epoch == c.epoch {
                    self.scheduler.register_computed(i, c.start + c.len);
                }
            }
        }
        if let Some(prompt) = &step.prompt {
            self.send_prompt_logprobs(&step.chunks, &running, prompt, &values);
        }
        self.process_outputs(&step.chunks, &running, &mut values);
    }

    /// The logits rows a step needs when some of its chunks owe prompt log-probabilities:
    /// those prompt rows, and the last row of every chunk (what sampling reads). `None`
    /// when no chunk does (the usual step: the last rows only).
    fn prompt_logprob_rows(&self, plan: &StepPlan, batch: &ForwardBatch) -> Option<PromptRows> {
        let mut out = PromptRows::default();
        for (c, &(i, n)) in plan.chunks.iter().enumerate() {
            let seq = &self.scheduler.running[i];
            let chunk = &batch.seqs[c];
            if let Some(done) = seq.prompt_logprobs_done {
                // Row j of the chunk predicts the token at position start + j + 1.
                let start = seq.num_computed;
                for pos in done.max(start + 1)..(start + n + 1).min(seq.prompt_len) {
                    out.prompt.push((out.rows.len(), c, pos));
                    out.rows.push(chunk.query_start + pos - start - 1);
                }
            }
            out.last.push(out.rows.len());
            out.rows.push(chunk.query_start + chunk.query_len - 1);
        }
        (!out.prompt.is_empty()).then_some(out)
    }

    /// Sends each request its prompt log-probabilities out of the step's prompt rows (as
    /// `prompt_logprob_rows` laid them out).
    fn send_prompt_logprobs(
        &mut self,
        chunks: &[Launched],
        running: &HashMap<u64, usize>,
        rows: &PromptRows,
        values: &StepValues,
    ) {
        let vocab = values.prompt_vocab;
        let at: Vec<_> = chunks.iter().map(|c| self.locate(running, c.uid)).collect();
        let mut per_chunk: Vec<Vec<(TokenLogprobs, usize)>> = vec![Vec::new(); chunks.len()];
        for (k, &(_, c, pos)) in rows.prompt.iter().enumerate() {
            let Some(at) = at[c] else {
                continue;
            };
            let seq = self.scheduler.sequence_mut(at);
            let Some(req) = self.requests.get(&seq.request) else {
                continue;
            };
            let top = req.params.prompt_logprobs.unwrap_or(0);
            per_chunk[c].push(sampling::token_logprobs(
                &values.prompt_values[k * vocab..(k + 1) * vocab],
                seq.tokens[pos],
                top,
            ));
        }
        for (c, entries) in per_chunk.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            let Some(at) = at[c] else {
                continue;
            };
            let seq = self.scheduler.sequence_mut(at);
            seq.prompt_logprobs_done = Some(seq.prompt_logprobs_done.unwrap_or(1) + entries.len());
            if let Some(req) = self.requests.get(&seq.request) {
                let _ = req.events.send(EngineEvent::PromptLogprobs(entries));
            }
        }
    }

    /// The forward batch of a plan, and the slots of its token ids that the step in
    /// flight is choosing (placeholders, with that step's row).
    fn build_batch(&self, plan: &StepPlan) -> (ForwardBatch, Vec<(usize, usize)>) {
        let bs = self.config.block_size;
        let mut batch = ForwardBatch {
            block_size: bs,
            ..Default::default()
        };
        let mut from_previous = Vec::new();
        for &(i, n) in &plan.chunks {
            let seq = &self.scheduler.running[i];
            let start = seq.num_computed;
            batch.seqs.push(SeqChunk {
                key: seq.request.0,
                query_start: batch.token_ids.len(),
                query_len: n,
                context_len: start + n,
                block_table: seq.blocks.iter().map(|b| b.0).collect(),
            });
            for pos in start..start + n {
                let token = seq.tokens[pos];
                if token == PLACEHOLDER {
                    assert_eq!(pos + 1, seq.tokens.len(), "only the last token is in flight");
                    let row = seq.placeholder_row.expect("a placeholder names its row");
                    from_previous.push((batch.token_ids.len(), row));
                }
                batch.token_ids.push(token);
                batch.positions.push(pos as u32);
                batch
                    .slot_mapping
                    .push(seq.blocks[pos / bs].0 * bs as u32 + (pos % bs) as u32);
            }
        }
        (batch, from_previous)
    }

    /// Where sequence `uid` is (`Scheduler::locate`), looked up first in `running`, a map
    /// of `running` made when the step's outputs came (valid until sequences retire).
    fn locate(&self, running: &HashMap<u64, usize>, uid: u64) -> Option<Result<usize, usize>> {
        match running.get(&uid) {
            Some(&i) => Some(Ok(i)),
            None => self.scheduler.locate(uid),
        }
    }

    /// Pads a decode-only batch (one token per sequence) to its bucket with rows of
    /// token 0 at position 0 writing to the scratch block; returns the rows added.
    fn pad_decode_batch(&self, batch: &mut ForwardBatch) -> usize {
        let Some((scratch, buckets)) = &self.padding else {
            return 0;
        };
        if batch.seqs.iter().any(|s| s.query_len != 1) {
            return 0;
        }
        let real = batch.seqs.len();
        let target = config::bucket_for(buckets, real);
        for _ in real..target {
            batch.seqs.push(SeqChunk {
                key: u64::MAX,
                query_start: batch.token_ids.len(),
                query_len: 1,
                context_len: 1,
                block_table: vec![*scratch],
            });
            batch.token_ids.push(0);
            batch.positions.push(0);
            batch.slot_mapping.push(scratch * batch.block_size as u32);
        }
        target - real
    }

    /// Takes a token for every sequence whose chunk reached its end (the device's
    /// choice, or a host draw from its row), sends events, retires finished sequences,
    /// forks `n > 1` requests after their prompt. `running`: where the step's sequences
    /// were in `running` when it finished.
    fn process_outputs(&mut self, chunks: &[Launched], running: &HashMap<u64, usize>, values: &mut StepValues) {
        let mut finished = Vec::new();
        let mut forks = Vec::new();
        for (row, c) in chunks.iter().enumerate() {
            if !c.samples {
                continue; // a prompt chunk; the sequence is not at its end yet
            }
            let Some(at) = self.locate(running, c.uid) else {
                continue; // gone since: cancelled, failed, or stopped a step earlier
            };
            let seq = self.scheduler.sequence_mut(at);
            if let Some(error) = seq.constraint.as_ref().and_then(|c| c.error.clone()) {
                // Its grammar failed: the request fails alone (its sequences go with the
                // requests whose receiver is gone, below).
                if let Some(req) = self.requests.remove(&seq.request) {
                    let _ = req.events.send(EngineEvent::Failed(error));
                }
                continue;
            }
            let Some(req) = self.requests.get_mut(&seq.request) else {
                finished.push(c.uid);
                continue;
            };
            if !req.forked {
                req.forked = true;
                forks.push(c.uid);
            }
            // The token's position: a placeholder's when the step was followed before
            // this read (the step after it may have added another).
            let pos = c.start + c.len;
            let (token, logprobs) = match (values.tokens[row], values.host_row[row]) {
                (Some(token), _) => (token, values.logprobs[row].take()),
                (None, Some(k)) => {
                    let vocab = values.vocab;
                    let row_logits = &mut values.values[k * vocab..(k + 1) * vocab];
                    let ctx = SamplingContext::new(&req.params, &seq.tokens[..pos], seq.prompt_len, &req.stop_ids)
                        .with_mask(seq.constraint.as_deref().and_then(|c| c.mask()));
                    sampling::sample(row_logits, &ctx, &mut seq.rng)
                }
                (None, None) => unreachable!("every row that reached its end brings a token or its values"),
            };
            if pos < seq.tokens.len() {
                assert_eq!(seq.tokens[pos], PLACEHOLDER, "a token goes where its step left room");
                seq.tokens[pos] = token;
            } else {
                seq.tokens.push(token);
            }
            let len = pos + 1;
            self.stats.tokens_generated += 1;
            let reason = if req.stop_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if len >= seq.max_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(state) = seq.constraint.as_mut() {
                state.advance(token, reason.is_some());
            }
            let mut delivered = req
                .events
                .send(EngineEvent::Token {
                    index: seq.index,
                    token,
                    logprobs,
                    stop: reason == Some(FinishReason::Stop),
                })
                .is_ok();
            if let Some(reason) = reason {
                let usage = Usage {
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: len - seq.prompt_len,
                    cached_prompt_tokens: seq.num_cached_prompt_tokens.unwrap_or(0),
                };
                delivered &= req
                    .events
                    .send(EngineEvent::Finished {
                        index: seq.index,
                        reason,
                        usage,
                    })
                    .is_ok();
                req.unfinished -= 1;
                finished.push(c.uid);
            }
            if !delivered {
                // The receiver is gone: the caller lost interest.
                let id = seq.request;
                self.requests.remove(&id);
            }
        }
        // The other completions of a request start once its prompt is computed: they
        // queue first in line, holding no blocks, and admission finds the prompt's full
        // blocks in the prefix cache (the parent registered them), so they share them and
        // recompute only the tail for their own first logits.
        for &uid in &forks {
            let Some(at) = self.locate(running, uid) else {
                continue;
            };
            let parent = self.scheduler.sequence_mut(at);
            let id = parent.request;
            let Some(req) = self.requests.get(&id) else { continue };
            let (prompt, max_len) = (parent.prompt().to_vec(), parent.max_len);
            let base_seed = req.params.seed;
            // Pushed to the front in reverse, so they run in index order, next in line.
            for index in (1..req.params.n).rev() {
                let seed = base_seed.map_or_else(fresh_seed, |s| s.wrapping_add(index as u64));
                let child = Sequence::new(id, index, prompt.clone(), Rng::seeded(seed))
                    .with_cache_salt(req.cache_salt)
                    .with_constraint(req.params.constraint.as_ref())
                    .with_max_len(max_len);
                self.scheduler.waiting.push_front(child);
            }
        }
        // Retired last to first in `running` (indices stay valid), then any in `waiting`.
        let mut retire: Vec<Result<usize, usize>> =
            finished.iter().filter_map(|&uid| self.locate(running, uid)).collect();
        retire.sort_unstable_by_key(|at| match at {
            Ok(i) => (0, std::cmp::Reverse(*i)),
            Err(i) => (1, std::cmp::Reverse(*i)),
        });
        retire.dedup();
        for at in retire {
            self.scheduler.finish_at(at);
        }
        // Requests whose receiver went away, or that are complete.
        let gone: Vec<RequestId> = self
            .scheduler
            .running
            .iter()
            .chain(self.scheduler.waiting.iter())
            .map(|s| s.request)
            .filter(|id| !self.requests.contains_key(id))
            .collect();
        for id in gone {
            self.scheduler.remove_request(id);
        }
        self.requests.retain(|_, r| r.unfinished > 0);
        // What the model kept for a request goes with it.
        let mut touched: Vec<RequestId> = chunks.iter().map(|c| c.request).collect();
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            if !self.requests.contains_key(&id) {
                self.stream.end_request(id.0);
            }
        }
    }
}

/// Request checks shared by `Engine` and `EngineHandle` (which refuses bad requests
/// without a round trip to the engine thread).
pub fn validate_request(
    prompt: &[u32],
    params: &SamplingParams,
    vocab_size: usize,
    max_model_len: usize,
) -> Result<(), SubmitError> {
    if prompt.is_empty() {
        return Err(SubmitError::EmptyPrompt);
    }
    if prompt.len() >= max_model_len {
        return Err(SubmitError::PromptTooLong {
            prompt: prompt.len(),
            max: max_model_len,
        });
    }
    let prompt_token = prompt.iter().find(|&&t| t as usize >= vocab_size);
    if let Some((role, id)) = prompt_token
        .map(|&id| (TokenRole::Prompt, id))
        .or_else(|| params.token_out_of_range(vocab_size))
    {
        return Err(SubmitError::TokenOutOfRange { role, id, vocab_size });
    }
    Ok(())
}

/// A seed for requests that did not ask for one.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("generation failed: {0}")]
    Failed(String),
    #[error("generate runs one completion, not {0}")]
    SeveralCompletions(usize),
}

/// Runs one request to completion, synchronously, on an engine with no other work
/// (`inferd generate`, benchmarks, tests). `on_token` returns false to stop early.
/// Returns the generated ids and why generation ended (`None` if stopped early).
pub fn generate<B: Backend, M: EngineModel<B>>(
    engine: &mut Engine<B, M>,
    prompt: Vec<u32>,
    params: SamplingParams,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError> {
    if params.n != 1 {
        return Err(GenerateError::SeveralCompletions(params.n));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let id = (0..)
        .map(|i| RequestId(u64::MAX - i))
        .find(|id| !engine.requests.contains_key(id))
        .expect("a free request id");
    engine.add_request(id, prompt, params, tx)?;
    let mut tokens = Vec::new();
    while engine.has_work() {
        engine.step();
        while let Ok(event) = rx.try_recv() {
            match event {
                EngineEvent::Token { token, .. } => {
                    tokens.push(token);
                    if !on_token(token) {
                        engine.cancel(id);
                        return Ok((tokens, None));
                    }
                }
                EngineEvent::Finished { reason, .. } => return Ok((tokens, Some(reason))),
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Failed(e) => return Err(GenerateError::Failed(e)),
            }
        }
    }
    Ok((tokens, None))
}

/// A step's logits rows when some owe prompt log-probabilities.
#[derive(Default)]
struct PromptRows {
    /// Batch rows to compute logits for.
    rows: Vec<usize>,
    /// Per chunk, the index in `rows` of its last row.
    last: Vec<usize>,
    /// (index in `rows`, chunk, prompt position whose token it predicts).
    prompt: Vec<(usize, usize, usize)>,
}

/// A chunk of a step in flight, named by its sequence's uid (the sequence may move in
/// `running`, or go, before the step's outputs are read).
struct Launched {
    uid: u64,
    request: RequestId,
    /// Its first position, and its token count.
    start: usize,
    len: usize,
    /// The sequence's `epoch` at launch.
    epoch: u32,
    /// Its chunk reached the end of the sequence: a token is chosen from its row.
    samples: bool,
}

/// A step launched and not read yet.
struct InFlight {
    chunks: Vec<Launched>,
    /// The next step was (or may be) launched before this one is read.
    pipelined: bool,
    prompt: Option<PromptRows>,
    reply: Pending<StepOutcome>,
}
