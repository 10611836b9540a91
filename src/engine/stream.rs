//! The step stream: where the model, its KV cache and its backend live, and where a
//! step's forward pass and the device's share of sampling run, in launch order (as a
//! CUDA stream runs its kernels). The engine launches steps onto it and reads their
//! outputs later; what it tells the model between steps (an encoder's input, the end of
//! a request) is queued in the same order.
//!
//! Two modes, one code path (`Device::execute`): inline, each launch runs at once on the
//! engine's thread (the serial loop); or on a thread of its own (async scheduling), where
//! the engine schedules step N+1 and processes step N's outputs while step N+1 computes.
//! A step may take some of its input ids from the step launched just before it (the
//! tokens that step chose on the device), so the engine need not wait for them.

use std::panic::AssertUnwindSafe;

use crossbeam_channel::{Receiver, Sender};

use crate::backend::{Backend, ForwardBatch, RowSampling, TokenLogprobs};
use crate::models::{EncoderInput, EngineModel, ForwardError, LogitsFor};

/// How a logits row is turned into a token, decided by the engine at launch.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RowChoice {
    /// A prompt chunk not at its end (or a request already gone): nothing is chosen.
    Skip,
    /// `Backend::sample_rows` with this row's edits, filters, uniform number and
    /// log-probabilities, where the logits are (greedy and unfiltered rows included).
    Sample(Box<RowSampling>),
    /// The whole row comes to the host (Whisper's rules, `allowed_token_ids`, grammars,
    /// forced text).
    Host,
}

/// One step as the engine launches it.
pub(super) struct StepWork {
    pub batch: ForwardBatch,
    /// `(slot in batch.token_ids, row of the previous step)`: ids the previous step
    /// chose on the device, which the engine has not read yet.
    pub from_previous: Vec<(usize, usize)>,
    /// Batch rows that get logits: the last of each chunk, or (when some chunks owe
    /// prompt log-probabilities) these rows.
    pub logits_rows: Option<Vec<usize>>,
    /// Of the logits rows: those whose values come to the host for prompt
    /// log-probabilities.
    pub prompt_rows: Vec<usize>,
    /// Of the logits rows: the one of each chunk that sampling reads (`None`: row c is
    /// chunk c's).
    pub last_rows: Option<Vec<usize>>,
    /// Per chunk.
    pub choices: Vec<RowChoice>,
}

/// What a step brings back to the host.
#[derive(Debug, Default)]
pub(super) struct StepValues {
    /// `[prompt_rows, prompt_vocab]`, row-major.
    pub prompt_values: Vec<f32>,
    pub prompt_vocab: usize,
    /// Per chunk: the token chosen on the device.
    pub tokens: Vec<Option<u32>>,
    /// Per chunk: the log-probabilities a `RowChoice::Sample` row asked for.
    pub logprobs: Vec<Option<TokenLogprobs>>,
    /// Per chunk: its row in `values`, for `RowChoice::Host`.
    pub host_row: Vec<Option<usize>>,
    /// `[host rows, vocab]`, row-major.
    pub values: Vec<f32>,
    pub vocab: usize,
    /// How long the forward pass and the reads took on the stream.
    pub forward_secs: f64,
}

pub(super) enum StepOutcome {
    Done(StepValues),
    /// The model refused the batch: its requests fail.
    Refused(ForwardError),
    /// The backend panicked (a CUDA fault): every request fails.
    Panicked(String),
}

/// A reply that is either here or on its way from the stream's thread.
pub(super) enum Pending<T> {
    Ready(T),
    Later(Receiver<T>),
}

impl<T> Pending<T> {
    /// Waits for the value; `None` when the stream's thread is gone.
    pub fn wait(self) -> Option<T> {
        match self {
            Pending::Ready(value) => Some(value),
            Pending::Later(rx) => rx.recv().ok(),
        }
    }
}

enum Work {
    Step(Box<StepWork>, Sender<StepOutcome>),
    Begin {
        key: u64,
        prompt: Vec<u32>,
        input: EncoderInput,
        reply: Sender<Result<(), String>>,
    },
    End(u64),
}

/// What the stream owns.
struct Device<B: Backend, M> {
    backend: B,
    model: M,
    cache: B::KvCache,
    /// The tokens the last step chose on the device, per chunk.
    last_tokens: Vec<Option<u32>>,
}

impl<B: Backend, M: EngineModel<B>> Device<B, M> {
    fn step(&mut self, mut work: StepWork) -> StepOutcome {
        for &(slot, row) in &work.from_previous {
            // A missing id means the previous step failed, and with it the requests
            // whose ids these are: their rows are computed and dropped.
            work.batch.token_ids[slot] = self.last_tokens.get(row).copied().flatten().unwrap_or(0);
        }
        // Moved into the step by value (`&mut M` is `Send` where `&M` would need `Sync`).
        let (backend, model, cache, work_ref) = (&self.backend, &mut self.model, &mut self.cache, &work);
        let start = std::time::Instant::now();
        let run = guarded::<B, _>(move || {
            let logits_for = match &work_ref.logits_rows {
                None => LogitsFor::LastOfEachSequence,
                Some(rows) => LogitsFor::Rows(rows),
            };
            let logits = model.forward(backend, &work_ref.batch, cache, logits_for)?;
            Ok(read_rows(backend, logits, work_ref))
        });
        self.last_tokens.clear();
        match run {
            Ok(Ok(mut values)) => {
                values.forward_secs = start.elapsed().as_secs_f64();
                self.last_tokens.clone_from(&values.tokens);
                StepOutcome::Done(values)
            }
            Ok(Err(e)) => StepOutcome::Refused(e),
            Err(message) => StepOutcome::Panicked(message),
        }
    }

    fn execute(&mut self, work: Work) {
        match work {
            Work::Step(step, reply) => {
                let _ = reply.send(self.step(*step));
            }
            Work::Begin {
                key,
                prompt,
                input,
                reply,
            } => {
                let (backend, model) = (&self.backend, &mut self.model);
                let result = match guarded::<B, _>(move || model.begin_request(backend, key, &prompt, &input)) {
                    Ok(done) => done.map_err(|e| e.to_string()),
                    Err(message) => Err(format!("the encoder failed: {message}")),
                };
                let _ = reply.send(result);
            }
            Work::End(key) => {
                let model = &mut self.model;
                if let Err(message) = guarded::<B, _>(move || model.end_request(key)) {
                    crate::warn!("dropping a request's model state failed: {message}");
                }
            }
        }
    }
}

/// Runs `work` where the backend wants its host work done (`Backend::run_step`), a
/// panic (a backend fault) caught as its message: the stream goes on with what comes
/// next, as the engine does with the requests it fails.
fn guarded<B: Backend, R: Send>(work: impl FnOnce() -> R + Send) -> Result<R, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| B::run_step(work)))
        .map_err(|panic| crate::log::panic_message(&*panic).unwrap_or_else(|| "a step panicked".into()))
}

/// Brings to the host what the engine needs of a step's logits: the prompt rows'
/// values, the tokens `Backend::sample_rows` chose for sampled rows, and the values of host rows
/// (all of them on a host backend without a copy).
fn read_rows<B: Backend>(backend: &B, logits: B::Tensor, work: &StepWork) -> StepValues {
    let mut out = StepValues {
        tokens: vec![None; work.choices.len()],
        logprobs: vec![None; work.choices.len()],
        host_row: vec![None; work.choices.len()],
        ..Default::default()
    };
    let logits = match &work.last_rows {
        None => logits,
        Some(last) => {
            let wanted = backend.gather_rows(&logits, &work.prompt_rows);
            (out.prompt_values, _, out.prompt_vocab) = backend.to_host(wanted);
            backend.gather_rows(&logits, last)
        }
    };
    let rows_of = |f: &dyn Fn(&RowChoice) -> bool| -> Vec<usize> {
        (0..work.choices.len()).filter(|&r| f(&work.choices[r])).collect()
    };
    let sample_rows = rows_of(&|c| matches!(c, RowChoice::Sample(_)));
    if !sample_rows.is_empty() {
        let sampling: Vec<&RowSampling> = sample_rows
            .iter()
            .map(|&r| match &work.choices[r] {
                RowChoice::Sample(s) => &**s,
                _ => unreachable!("a sampled row"),
            })
            .collect();
        for (&r, sampled) in sample_rows
            .iter()
            .zip(backend.sample_rows(&logits, &sample_rows, &sampling))
        {
            out.tokens[r] = Some(sampled.token);
            out.logprobs[r] = sampled.logprobs;
        }
    }
    let host_rows = rows_of(&|c| *c == RowChoice::Host);
    if !host_rows.is_empty() {
        // Only the rows that need them (all of them: no copy on a host backend).
        let tensor = if host_rows.len() == work.choices.len() {
            logits
        } else {
            backend.gather_rows(&logits, &host_rows)
        };
        let (values, _, vocab) = backend.to_host(tensor);
        for (k, &r) in host_rows.iter().enumerate() {
            out.host_row[r] = Some(k);
        }
        out.values = values;
        out.vocab = vocab;
    }
    out
}

enum Mode<B: Backend, M> {
    Inline(Box<Device<B, M>>),
    Thread {
        work: Sender<Work>,
        thread: std::thread::JoinHandle<Device<B, M>>,
    },
}

impl<B: Backend, M> Mode<B, M> {
    /// Waits for everything launched, and takes back what the stream owned.
    fn into_device(self) -> Device<B, M> {
        match self {
            Mode::Inline(device) => *device,
            Mode::Thread { work, thread } => {
                drop(work); // the thread ends once it has run what it was sent
                match thread.join() {
                    Ok(device) => device,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
    }
}

pub(super) struct Stream<B: Backend, M> {
    /// Always `Some` but while being taken apart.
    mode: Option<Mode<B, M>>,
}

impl<B: Backend + 'static, M: EngineModel<B>> Stream<B, M> {
    /// `threaded`: the stream runs on a thread of its own (async scheduling).
    pub fn new(backend: B, model: M, cache: B::KvCache, threaded: bool) -> Self {
        let device = Device {
            backend,
            model,
            cache,
            last_tokens: Vec::new(),
        };
        let mode = if threaded {
            let (tx, rx) = crossbeam_channel::unbounded::<Work>();
            let thread = std::thread::Builder::new()
                .name("inferd-step".into())
                .spawn(move || {
                    let mut device = device;
                    for work in rx {
                        device.execute(work);
                    }
                    device
                })
                .expect("spawn the step thread");
            Mode::Thread { work: tx, thread }
        } else {
            Mode::Inline(Box::new(device))
        };
        Stream { mode: Some(mode) }
    }

    fn mode(&mut self) -> &mut Mode<B, M> {
        self.mode.as_mut().expect("a stream in use has its mode")
    }

    pub fn is_threaded(&self) -> bool {
        matches!(self.mode, Some(Mode::Thread { .. }))
    }

    fn submit<T>(&mut self, make: impl FnOnce(Sender<T>) -> Work) -> Pending<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let work = make(tx);
        match self.mode() {
            Mode::Inline(device) => {
                device.execute(work);
                Pending::Ready(rx.try_recv().expect("an inline reply"))
            }
            Mode::Thread { work: queue, .. } => {
                // A thread that is gone drops the reply: the step reads as failed.
                let _ = queue.send(work);
                Pending::Later(rx)
            }
        }
    }

    /// Queues a step; its outputs come back through the `Pending`.
    pub fn launch(&mut self, work: StepWork) -> Pending<StepOutcome> {
        self.submit(|reply| Work::Step(Box::new(work), reply))
    }

    /// Runs the encoder of request `key` (after every step launched so far), and waits.
    pub fn begin_request(&mut self, key: u64, prompt: Vec<u32>, input: EncoderInput) -> Result<(), String> {
        self.submit(|reply| Work::Begin {
            key,
            prompt,
            input,
            reply,
        })
        .wait()
        .unwrap_or_else(|| Err("the step thread is gone".into()))
    }

    /// Drops what the model kept for request `key`, once the steps launched so far ran.
    pub fn end_request(&mut self, key: u64) {
        match self.mode() {
            Mode::Inline(device) => device.execute(Work::End(key)),
            Mode::Thread { work, .. } => {
                let _ = work.send(Work::End(key));
            }
        }
    }

    /// Waits for everything launched, and hands the model back.
    pub fn into_model(mut self) -> M {
        self.mode.take().expect("a stream has its mode").into_device().model
    }
}

impl<B: Backend, M> Drop for Stream<B, M> {
    /// The weights and the KV cache are freed before the engine is gone (the model
    /// manager measures the memory an unload gave back right after).
    fn drop(&mut self) {
        if let Some(mode @ Mode::Thread { .. }) = self.mode.take() {
            if !std::thread::panicking() {
                mode.into_device();
            }
        }
    }
}
