//! The engine on its own thread. Requests arrive on a crossbeam channel; each request's
//! events leave on its own channel (`RequestStream`). The thread owns the engine: no
//! lock on the step path. Dropping a stream cancels its request, which frees its blocks
//! at the next step.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{
    validate_request, Engine, EngineConfig, EngineEvent, EngineStats, EventSender, KvEvent, RequestId, SamplingParams,
    SubmitError,
};
use crate::backend::Backend;
use crate::models::{EncoderInput, EngineModel};

enum Command {
    Submit {
        id: RequestId,
        prompt: Vec<u32>,
        params: Box<SamplingParams>,
        encoder_input: Option<EncoderInput>,
        events: EventSender,
    },
    Cancel(RequestId),
    /// Send the prefix cache's contents, then its changes, here.
    ListenKv(UnboundedSender<KvEvent>),
    /// Stop now: requests still running see their event channel close.
    Shutdown,
}

/// Live counters, written by the engine thread after every step.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Requests submitted and not yet picked up by the engine thread or admitted.
    pub pending: AtomicUsize,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Tokens per block (fixed at start).
    pub kv_block_size: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub tokens_computed: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    pub last_step_micros: AtomicU64,
    /// `EngineStats::steps_ahead`.
    pub steps_ahead: AtomicU64,
    /// `EngineStats::profile`, in microseconds: plan, wait, process, forward.
    pub profile_micros: [AtomicU64; 4],
}

impl EngineMetrics {
    fn publish(&self, s: &EngineStats) {
        let r = Ordering::Relaxed;
        self.waiting.store(s.waiting, r);
        self.running.store(s.running, r);
        self.kv_blocks_total.store(s.kv_blocks_total, r);
        self.kv_blocks_used.store(s.kv_blocks_used, r);
        self.prefix_cache_queries.store(s.prefix_cache_queries, r);
        self.prefix_cache_hits.store(s.prefix_cache_hits, r);
        self.tokens_generated.store(s.tokens_generated, r);
        self.tokens_computed.store(s.tokens_computed, r);
        self.preemptions.store(s.preemptions, r);
        self.steps.store(s.steps, r);
        self.last_step_micros.store((s.last_step_secs * 1e6) as u64, r);
        self.steps_ahead.store(s.steps_ahead, r);
        let p = &s.profile;
        for (slot, secs) in self.profile_micros.iter().zip([p.plan, p.wait, p.process, p.forward]) {
            slot.store((secs * 1e6) as u64, r);
        }
    }

    /// `profile_micros` read back as seconds.
    pub fn profile(&self) -> super::StepProfile {
        let [plan, wait, process, forward] = self
            .profile_micros
            .each_ref()
            .map(|m| m.load(Ordering::Relaxed) as f64 / 1e6);
        super::StepProfile {
            plan,
            wait,
            process,
            forward,
        }
    }
}

/// A cloneable way to reach the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    metrics: Arc<EngineMetrics>,
    next_id: Arc<AtomicU64>,
    vocab_size: usize,
    max_model_len: usize,
    max_waiting: usize,
    config: EngineConfig,
    eos_ids: Arc<[u32]>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// One request's events. Dropping it cancels the request.
pub struct RequestStream {
    pub id: RequestId,
    events: UnboundedReceiver<EngineEvent>,
    commands: Sender<Command>,
}

impl RequestStream {
    /// The next event, waiting for it (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        self.events.blocking_recv()
    }

    /// The next event, awaiting it.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// The next event if one is there now.
    pub fn try_next(&mut self) -> Option<EngineEvent> {
        self.events.try_recv().ok()
    }

    /// The next event if one is there, else wakes `cx` when one is (several streams
    /// are awaited together this way).
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<EngineEvent>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn<B: Backend + 'static, M: EngineModel<B>>(engine: Engine<B, M>) -> Self
    where
        B::KvCache: 'static,
        B::Weight: 'static,
    {
        let (commands, inbox) = crossbeam_channel::unbounded();
        let metrics = Arc::new(EngineMetrics::default());
        metrics.publish(&engine.stats());
        metrics
            .kv_block_size
            .store(engine.config().block_size, Ordering::Relaxed);
        let vocab_size = engine.vocab_size();
        let max_model_len = engine.max_model_len();
        let max_waiting = engine.config().max_waiting;
        let config = *engine.config();
        let eos_ids: Arc<[u32]> = engine.eos_ids().into();
        let thread_metrics = metrics.clone();
        // The thread ends by itself once every handle and stream (every sender) is gone,
        // or at `shutdown`.
        let thread = std::thread::Builder::new()
            .name("inferd-engine".into())
            .spawn(move || run(engine, inbox, thread_metrics))
            .expect("spawn the engine thread");
        EngineHandle {
            commands,
            metrics,
            next_id: Arc::new(AtomicU64::new(0)),
            vocab_size,
            max_model_len,
            max_waiting,
            config,
            eos_ids,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        }
    }

    /// Stops the engine thread and waits for it, so that the model's weights and KV
    /// cache are freed when this returns. Requests still running end (their streams
    /// close). Blocks: call it off the async reactor.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// The model's vocabulary (its logits' width).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The engine's sizes: KV block size and count, batch limits.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// The tokens that end a sequence (unless a request ignores EOS).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// What the prefix cache holds now (as `Stored` events, parents first), then every
    /// change to it, until the receiver is dropped; `Cleared` when the engine stops.
    pub fn kv_events(&self) -> Result<UnboundedReceiver<KvEvent>, SubmitError> {
        let (tx, rx) = unbounded_channel();
        self.commands
            .send(Command::ListenKv(tx))
            .map_err(|_| SubmitError::ShutDown)?;
        Ok(rx)
    }

    /// `Overloaded` when a request submitted now would be refused for a full queue (for
    /// callers with costly input to prepare first; `submit` checks again).
    pub fn check_room(&self) -> Result<(), SubmitError> {
        let waiting = self.metrics.pending.load(Ordering::SeqCst);
        if waiting >= self.max_waiting {
            return Err(SubmitError::Overloaded { waiting });
        }
        Ok(())
    }

    /// Validates and queues a request. Refused with `Overloaded` when `max_waiting`
    /// requests are already waiting.
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestStream, SubmitError> {
        self.submit_with_input(prompt, params, None)
    }

    /// `submit`, with the encoder input a model with an encoder needs.
    pub fn submit_with_input(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        encoder_input: Option<EncoderInput>,
    ) -> Result<RequestStream, SubmitError> {
        validate_request(&prompt, &params, self.vocab_size, self.max_model_len)?;
        let waiting = self.metrics.pending.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.metrics.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded { waiting });
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (events, rx) = unbounded_channel();
        let sent = self.commands.send(Command::Submit {
            id,
            prompt,
            params: Box::new(params),
            encoder_input,
            events,
        });
        if sent.is_err() {
            self.metrics.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShutDown);
        }
        Ok(RequestStream {
            id,
            events: rx,
            commands: self.commands.clone(),
        })
    }

    /// Stops a request now (dropping its stream does the same).
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }
}

fn run<B: Backend, M: EngineModel<B>>(mut engine: Engine<B, M>, inbox: Receiver<Command>, metrics: Arc<EngineMetrics>) {
    // Requests the engine holds but has not admitted yet count as pending.
    let mut not_admitted: Vec<RequestId> = Vec::new();
    loop {
        // Idle: wait for work. Busy: take whatever arrived, then step.
        let first = if engine.has_work() {
            inbox.try_recv().ok()
        } else {
            match inbox.recv() {
                Ok(command) => Some(command),
                Err(_) => {
                    engine.clear_kv_listeners();
                    return; // every handle is gone
                }
            }
        };
        for command in first.into_iter().chain(inbox.try_iter()) {
            match command {
                Command::Submit {
                    id,
                    prompt,
                    params,
                    encoder_input,
                    events,
                } => {
                    if events.is_closed() {
                        metrics.pending.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    match engine.add_request_with_input(id, prompt, *params, encoder_input, events.clone()) {
                        Ok(()) => not_admitted.push(id),
                        Err(e) => {
                            metrics.pending.fetch_sub(1, Ordering::SeqCst);
                            let _ = events.send(EngineEvent::Failed(e.to_string()));
                        }
                    }
                }
                Command::Cancel(id) => engine.cancel(id),
                Command::ListenKv(listener) => engine.listen_kv_events(listener),
                Command::Shutdown => {
                    engine.clear_kv_listeners();
                    return;
                }
            }
        }
        if engine.has_work() {
            // A panicking step (a backend error: a CUDA fault, device memory exhausted
            // mid-step) fails the requests it held; the engine goes on with new ones.
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step())) {
                let message = crate::log::panic_message(&*panic).unwrap_or_else(|| "a step panicked".into());
                crate::warn!("engine step failed, its requests fail: {message}");
                engine.fail_all(&format!("the engine failed: {message}"));
            }
        }
        // Admitted (or gone) requests stop counting against max_waiting.
        if !not_admitted.is_empty() {
            let still_waiting = engine.unadmitted_requests();
            let before = not_admitted.len();
            not_admitted.retain(|id| still_waiting.contains(id));
            metrics.pending.fetch_sub(before - not_admitted.len(), Ordering::SeqCst);
        }
        metrics.publish(&engine.stats());
        engine.publish_kv_events();
    }
}
