//! One load: its progress (rate-limited), kept for every follower to replay, then its
//! outcome; and `build`, which reads a model and starts its engine.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::memory::{checkpoint_bytes, kv_budget_on};
use super::{lock, LoadError, ModelFiles, ModelSettings, ReasoningMode, ServedModel};
use crate::text::GrammarCompiler;

/// Where a load is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadProgress {
    Processor,
    Config,
    /// Bytes of the files being fetched from the hub.
    Download {
        current: u64,
        total: Option<u64>,
    },
    /// Checkpoint tensors uploaded, 1..=total.
    Weights {
        current: usize,
        total: usize,
    },
}

/// What a load reports: progress, then one terminal event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadEvent {
    Progress(LoadProgress),
    /// In memory (`cached`: it already was).
    Ready {
        cached: bool,
    },
    Error(String),
}

impl LoadEvent {
    /// Whether this is a load's last event.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, LoadEvent::Progress(_))
    }
}

/// One load in progress: its events so far (any number of followers replay them and
/// wait for more) and, at the end, its outcome.
pub struct LoadJob {
    pub model: String,
    events: Mutex<Vec<LoadEvent>>,
    published: watch::Sender<usize>,
    outcome: OnceLock<Result<Arc<ServedModel>, LoadError>>,
}

impl LoadJob {
    pub(super) fn new(model: String) -> Self {
        LoadJob {
            model,
            events: Mutex::new(Vec::new()),
            published: watch::channel(0).0,
            outcome: OnceLock::new(),
        }
    }

    fn emit(&self, event: LoadEvent) {
        let mut events = lock(&self.events);
        events.push(event);
        self.published.send_replace(events.len());
    }

    /// A reporter of this load's progress: weights and download events at most one per
    /// `PROGRESS_INTERVAL` (plus the first and the last of each).
    pub(super) fn reporter(&self) -> impl FnMut(LoadProgress) + '_ {
        let (mut last_weights, mut last_download): (Option<Instant>, Option<Instant>) = (None, None);
        move |p: LoadProgress| {
            let due = |last: &mut Option<Instant>, edge: bool| {
                let due = edge || last.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            let report = match p {
                LoadProgress::Processor | LoadProgress::Config => true,
                LoadProgress::Download { current, total } => due(&mut last_download, Some(current) == total),
                LoadProgress::Weights { current, total } => due(&mut last_weights, current == 1 || current == total),
            };
            if report {
                self.emit(LoadEvent::Progress(p));
            }
        }
    }

    pub(super) fn finish(&self, outcome: Result<Arc<ServedModel>, LoadError>) {
        let event = match &outcome {
            Ok(_) => LoadEvent::Ready { cached: false },
            Err(e) => LoadEvent::Error(e.to_string()),
        };
        // The outcome first: whoever wakes up for the last event finds it.
        let _ = self.outcome.set(outcome);
        self.emit(event);
    }

    /// The events after the first `seen`, waiting until there is one. The last event
    /// of a load is its terminal one (`ready` or `error`); empty if nothing will come.
    pub async fn events_after(&self, seen: usize) -> Vec<LoadEvent> {
        let mut published = self.published.subscribe();
        loop {
            {
                let events = lock(&self.events);
                if events.len() > seen {
                    return events[seen..].to_vec();
                }
            }
            if published.changed().await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Waits for the load to end.
    pub async fn wait(&self) -> Result<Arc<ServedModel>, LoadError> {
        let mut published = self.published.subscribe();
        loop {
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            if published.changed().await.is_err() {
                return Err(LoadError::Failed("the load was abandoned".into()));
            }
        }
    }
}

/// Weights and download events are rate-limited to one per this interval (plus the
/// first and the last).
pub(super) const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// Loads a model and starts its engine.
pub(super) fn build(
    settings: &ModelSettings,
    id_or_path: &str,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<ServedModel, LoadError> {
    let files = ModelFiles::load(id_or_path, &settings.backend, settings.dummy_weights, progress)?;
    let eos = files.eos_ids();
    let mut config = settings.engine;
    if config.num_blocks == 0 {
        let no_room = |e: String| LoadError::OutOfMemory(format!("no room for `{id_or_path}`'s KV cache: {e}"));
        let budget =
            kv_budget_on(&settings.backend, settings.kv_budget, settings.gpu_memory_utilization).map_err(no_room)?;
        config = files.model.engine_config(config, budget).map_err(no_room)?;
    }
    let reasoning = match settings.reasoning {
        ReasoningMode::On => true,
        ReasoningMode::Off => false,
        ReasoningMode::Auto => files
            .tokenizer
            .chat_template()
            .is_ok_and(|t| t.source().contains("<think>")),
    };
    let ModelFiles {
        dir,
        tokenizer,
        generation_config,
        model,
        speech,
        vision,
    } = files;
    let weight_bytes = if settings.dummy_weights {
        0
    } else {
        checkpoint_bytes(&dir.path)
    };
    let engine = model.spawn(config, eos.clone());
    let tokenizer = Arc::new(tokenizer);
    Ok(ServedModel {
        name: dir.display_name,
        folder: dir.path,
        grammars: Arc::new(GrammarCompiler::new(tokenizer.clone(), engine.vocab_size(), eos)),
        engine,
        tokenizer,
        generation_config,
        reasoning,
        speech: speech.map(Arc::new),
        vision: vision.map(Arc::new),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        weight_bytes,
        in_flight: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
    })
}
