//! The model registry behind the server: models load on demand (one shared load per
//! model, whose progress events any number of clients can follow), requests lease a
//! loaded model while they run, and models idle past `--model-timeout` (or the least
//! recently used idle ones, when memory is short) are unloaded and their memory freed.

mod files;
mod load;
mod loaded;
mod memory;
mod remote;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Device;
use crate::engine::{EngineConfig, EngineHandle, KvCacheBudget};
use crate::loader::hub::{HubError, ModelRef};
use crate::models::GenerationConfig;
use crate::text::{GrammarCompiler, Tokenizer};

pub use files::{ModelFiles, SpeechSettings, VisionSettings};
use load::build;
pub use load::{LoadEvent, LoadJob, LoadProgress};
pub use loaded::{load_model, LoadedModel};
pub use memory::kv_budget_on;
use memory::release_free_memory;

/// `--reasoning`: split `<think>` blocks into `reasoning_content`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningMode {
    On,
    Off,
    /// When the model's chat template uses `<think>`.
    Auto,
}

/// How every model is set up when it loads (the `serve` flags).
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub backend: Device,
    /// `--gpu-memory-utilization`: the share of a GPU's memory inferd may fill (weights,
    /// KV cache and activations); the KV cache gets what the weights leave of it.
    pub gpu_memory_utilization: f64,
    /// `num_blocks: 0` means "from `kv_budget`".
    pub engine: EngineConfig,
    pub kv_budget: KvCacheBudget,
    pub reasoning: ReasoningMode,
    /// `None`: never unload idle models.
    pub idle_timeout: Option<Duration>,
    /// `--load-format dummy`: random weights from config.json (benchmarks only).
    pub dummy_weights: bool,
    /// `--models-memory`: the checkpoints of all loaded models together stay under this
    /// many bytes (least recently used idle models are unloaded to make room).
    pub memory_budget: Option<u64>,
}

/// Why a model could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    InvalidId(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfMemory(String),
    /// The hub could not be reached or answered with an error.
    #[error("{0}")]
    HubUnavailable(String),
    #[error("{0}")]
    Failed(String),
}

impl From<HubError> for LoadError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::InvalidId(_) => LoadError::InvalidId(e.to_string()),
            HubError::NotCached { .. } => LoadError::NotFound(e.to_string()),
            HubError::Io { .. } => LoadError::Failed(e.to_string()),
        }
    }
}

/// A loaded model, serving requests.
pub struct ServedModel {
    /// `org/name@revision` (or the folder, for a local model): its registry key and the
    /// name responses give.
    pub name: String,
    /// The folder its files are in (a hub snapshot, or the local folder it was given).
    pub folder: std::path::PathBuf,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Structured outputs: compiles (and caches) grammars over this tokenizer.
    pub grammars: Arc<GrammarCompiler>,
    pub generation_config: GenerationConfig,
    pub reasoning: bool,
    /// Set for speech-to-text models, which answer transcriptions only.
    pub speech: Option<Arc<SpeechSettings>>,
    /// Set for models that take images in chat.
    pub vision: Option<Arc<VisionSettings>>,
    /// Unix seconds of the load.
    pub created: u64,
    /// Bytes of its checkpoint (what `--models-memory` counts).
    pub weight_bytes: u64,
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl ServedModel {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| lock(&self.last_used).elapsed())
    }
}

/// A request's hold on a model: while any lease is alive the model is not unloaded.
pub struct ModelLease {
    model: Arc<ServedModel>,
}

impl ModelLease {
    fn new(model: Arc<ServedModel>) -> Self {
        model.in_flight.fetch_add(1, Ordering::SeqCst);
        model.touch();
        ModelLease { model }
    }
}

impl std::ops::Deref for ModelLease {
    type Target = ServedModel;
    fn deref(&self) -> &ServedModel {
        &self.model
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        self.model.touch();
        self.model.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What asking for a model gives.
pub enum LoadTicket {
    /// Already in memory.
    Ready(Arc<ServedModel>),
    Loading(Arc<LoadJob>),
}

enum Slot {
    Loading(Arc<LoadJob>),
    Ready(Arc<ServedModel>),
}

pub struct ModelManager {
    settings: ModelSettings,
    /// Serves every request, whatever model it names; never unloaded.
    forced: Option<Arc<ServedModel>>,
    /// `--served-model-name`: the names the forced model answers to (empty: any name).
    served_names: Vec<String>,
    slots: Mutex<HashMap<String, Slot>>,
}

impl ModelManager {
    /// A manager that loads models as requests name them.
    pub fn new(settings: ModelSettings) -> Arc<Self> {
        Arc::new(ModelManager {
            settings,
            forced: None,
            served_names: Vec::new(),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// A manager pinned to one model, loaded now (errors are the caller's to report).
    /// With `served_names`, the model answers to those names only and responses give
    /// the first; without, it answers whatever model a request names.
    pub fn with_forced(
        settings: ModelSettings,
        id_or_path: &str,
        served_names: Vec<String>,
    ) -> Result<Arc<Self>, LoadError> {
        let mut model = build(&settings, id_or_path, &mut |_| {})?;
        if let Some(first) = served_names.first() {
            model.name = first.clone();
        }
        let model = Arc::new(model);
        let slots = HashMap::from([(model.name.clone(), Slot::Ready(model.clone()))]);
        Ok(Arc::new(ModelManager {
            settings,
            forced: Some(model),
            served_names,
            slots: Mutex::new(slots),
        }))
    }

    /// The names a loaded model answers to: `--served-model-name`'s for the forced
    /// model, else its own (`org/name` for `main`, else `org/name@revision`).
    pub fn served_names(&self, model: &ServedModel) -> Vec<String> {
        let own = self.forced.as_ref().is_some_and(|f| std::ptr::eq(&**f, model));
        if own && !self.served_names.is_empty() {
            return self.served_names.clone();
        }
        vec![model.name.strip_suffix("@main").unwrap_or(&model.name).to_owned()]
    }

    /// Whether the forced model answers to `requested` (always, without served names).
    fn answers_to(&self, requested: Option<&str>) -> bool {
        match requested {
            Some(name) if !self.served_names.is_empty() => self.served_names.iter().any(|n| n == name),
            _ => true,
        }
    }

    /// `NotFound` when a request names a model this server does not answer to (with
    /// `--served-model-name`; any name is the forced model's without).
    pub fn check_served(&self, requested: Option<&str>) -> Result<(), LoadError> {
        if self.forced.is_none() || self.answers_to(requested) {
            return Ok(());
        }
        Err(LoadError::NotFound(format!(
            "the model `{}` is not served here; this server serves {}",
            requested.unwrap_or_default(),
            self.served_names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    pub fn forced(&self) -> Option<&Arc<ServedModel>> {
        self.forced.as_ref()
    }

    /// The registry key of a model a request names: `org/name@revision` (`main` by
    /// default). Anything that is not a hub id (paths, `..`, empty parts) is refused
    /// before the file system is touched.
    pub fn key(name: &str) -> Result<String, LoadError> {
        Ok(ModelRef::parse(name)?.to_string())
    }

    /// Every loaded model.
    pub fn all_loaded(&self) -> Vec<Arc<ServedModel>> {
        let mut models: Vec<Arc<ServedModel>> = lock(&self.slots)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(m) => Some(m.clone()),
                Slot::Loading(_) => None,
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        models
    }

    /// The model for a request: the forced one, a loaded one, or one loaded now (the
    /// request waits for it; a concurrent request for the same model shares the load).
    pub async fn acquire(self: &Arc<Self>, requested: Option<&str>) -> Result<ModelLease, LoadError> {
        if let Some(lease) = self.acquire_loaded(requested) {
            return Ok(lease);
        }
        if self.forced.is_some() {
            self.check_served(requested)?;
        }
        let name = requested.ok_or_else(|| {
            LoadError::InvalidId("`model` is required: name the model to use (`org/name[@revision]`)".into())
        })?;
        match self.start_load(&Self::key(name)?) {
            LoadTicket::Ready(model) => Ok(ModelLease::new(model)),
            LoadTicket::Loading(job) => Ok(ModelLease::new(job.wait().await?)),
        }
    }

    /// The model for a request when no load is needed (the forced one, or one in
    /// memory); `None` otherwise, bad names included (`acquire` reports those).
    pub fn acquire_loaded(&self, requested: Option<&str>) -> Option<ModelLease> {
        if let Some(forced) = &self.forced {
            return self.answers_to(requested).then(|| ModelLease::new(forced.clone()));
        }
        let key = Self::key(requested?).ok()?;
        // Leased under the registry lock, so the idle unloader cannot take it meanwhile.
        match lock(&self.slots).get(&key) {
            Some(Slot::Ready(model)) => Some(ModelLease::new(model.clone())),
            _ => None,
        }
    }

    /// Starts a load of `key`, joins the one running, or finds the model in memory.
    pub fn start_load(self: &Arc<Self>, key: &str) -> LoadTicket {
        let mut slots = lock(&self.slots);
        match slots.get(key) {
            Some(Slot::Ready(model)) => {
                model.touch();
                return LoadTicket::Ready(model.clone());
            }
            Some(Slot::Loading(job)) => return LoadTicket::Loading(job.clone()),
            None => {}
        }
        let job = Arc::new(LoadJob::new(key.to_owned()));
        slots.insert(key.to_owned(), Slot::Loading(job.clone()));
        drop(slots);
        let (manager, thread_job) = (self.clone(), job.clone());
        let spawned = std::thread::Builder::new()
            .name("inferd-load".into())
            .spawn(move || manager.run_load(&thread_job));
        if let Err(e) = spawned {
            lock(&self.slots).remove(key);
            job.finish(Err(LoadError::Failed(format!("cannot start a loader thread: {e}"))));
        }
        LoadTicket::Loading(job)
    }

    fn run_load(&self, job: &LoadJob) {
        let key = job.model.clone();
        let mut report = job.reporter();
        // A panic in a loader (a malformed checkpoint the checks missed) must end the
        // load with an error, not leave its followers waiting forever.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.make_room(&key)?;
            build(&self.settings, &key, &mut report).map(Arc::new)
        }))
        .unwrap_or_else(|panic| {
            let message = crate::log::panic_message(&*panic).unwrap_or_default();
            if message.starts_with(crate::backend::DEVICE_OUT_OF_MEMORY) {
                return Err(LoadError::OutOfMemory(format!("loading `{key}` failed: {message}")));
            }
            Err(LoadError::Failed(format!("loading `{key}` failed: {message}")))
        });
        {
            let mut slots = lock(&self.slots);
            match &outcome {
                Ok(model) => slots.insert(key.clone(), Slot::Ready(model.clone())),
                Err(_) => slots.remove(&key),
            };
        }
        match &outcome {
            Ok(_) => crate::info!("loaded {key}"),
            Err(e) => crate::warn!("loading {key} failed: {e}"),
        }
        job.finish(outcome);
    }

    fn is_forced(&self, model: &Arc<ServedModel>) -> bool {
        self.forced.as_ref().is_some_and(|f| Arc::ptr_eq(f, model))
    }

    /// Unloads models nobody has used for `--model-timeout` (never the forced one).
    /// Blocks while their engines stop: call it off the async reactor.
    pub fn unload_idle(&self) {
        let Some(timeout) = self.settings.idle_timeout else {
            return;
        };
        let expired: Vec<Arc<ServedModel>> = {
            let mut slots = lock(&self.slots);
            let keys: Vec<String> = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready(m) if !self.is_forced(m) && m.idle_for().is_some_and(|idle| idle >= timeout) => {
                        Some(k.clone())
                    }
                    _ => None,
                })
                .collect();
            keys.iter()
                .filter_map(|k| match slots.remove(k) {
                    Some(Slot::Ready(m)) => Some(m),
                    _ => None,
                })
                .collect()
        };
        let any = !expired.is_empty();
        for model in expired {
            crate::info!("unloading {} (idle for {} s)", model.name, timeout.as_secs());
            model.engine.shutdown();
        }
        if any {
            release_free_memory();
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
