//! The model registry behind the server: models load on demand (one shared load per
//! model, whose progress events any number of clients can follow), requests lease a
//! loaded model while they run, and models idle past `--model-timeout` (or the least
//! recently used idle ones, when memory is short) are unloaded and their memory freed.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Device};
use crate::engine::{available_memory, Engine, EngineConfig, EngineHandle, KvCacheBudget};
use crate::loader::hub::{resolve_model, HubError, ModelDir, ModelRef};
use crate::media::audio::{MelConfig, MelExtractor};
use crate::media::image::VisionPreprocess;
use crate::models::qwen2_5_vl::VisionLanguageModel;
use crate::models::whisper::WhisperGeneration;
use crate::models::{load_decoder, load_decoder_dummy, load_whisper, DecoderModel, GenerationConfig, WhisperModel};
use crate::text::Tokenizer;

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

/// The weights of a model, by what it does. Made once per load and moved into its
/// engine: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum LoadedModel {
    /// A text decoder (chat, completions, responses).
    Text(DecoderModel<CpuBackend>),
    /// Speech to text (transcriptions, translations).
    Speech(WhisperModel<CpuBackend>),
    /// Text and images in, text out (chat with images).
    Vision(VisionLanguageModel<CpuBackend>),
    #[cfg(feature = "cuda")]
    CudaText(DecoderModel<CudaBackend>),
    #[cfg(feature = "cuda")]
    CudaSpeech(WhisperModel<CudaBackend>),
    #[cfg(feature = "cuda")]
    CudaVision(VisionLanguageModel<CudaBackend>),
}

/// A model of any kind on one backend (what `load_on` makes, moved on at once).
#[allow(clippy::large_enum_variant)]
enum Kind<B: Backend> {
    Text(DecoderModel<B>),
    Speech(WhisperModel<B>),
    Vision(VisionLanguageModel<B>),
}

/// Uploads a model folder's weights to `backend`.
fn load_on<B: Backend>(
    backend: &B,
    dir: &std::path::Path,
    dummy: bool,
    weights: &mut dyn FnMut(usize, usize),
) -> Result<Kind<B>, LoadError> {
    let failed = |e: &dyn std::fmt::Display| LoadError::Failed(e.to_string());
    let kind = model_type(dir);
    if dummy && kind == "whisper" {
        return Err(LoadError::Failed(
            "--load-format dummy is for text decoders, not Whisper".into(),
        ));
    }
    match kind.as_str() {
        "whisper" => {
            return load_whisper(backend, dir, weights)
                .map(Kind::Speech)
                .map_err(|e| failed(&e))
        }
        VISION_LANGUAGE_MODEL_TYPE => {
            return if dummy {
                VisionLanguageModel::load_dummy(backend, dir, weights)
            } else {
                VisionLanguageModel::load(backend, dir, weights)
            }
            .map(Kind::Vision)
            .map_err(|e| failed(&e))
        }
        _ => {}
    }
    if dummy {
        load_decoder_dummy(backend, dir, weights)
    } else {
        load_decoder(backend, dir, weights)
    }
    .map(Kind::Text)
    .map_err(|e| failed(&e))
}

impl LoadedModel {
    /// Uploads a model folder's weights to `device` (`dummy`: seeded random weights).
    pub fn load(
        device: &Device,
        dir: &std::path::Path,
        dummy: bool,
        weights: &mut dyn FnMut(usize, usize),
    ) -> Result<LoadedModel, LoadError> {
        Ok(match device {
            Device::Cpu(b) => match load_on(b, dir, dummy, weights)? {
                Kind::Text(m) => LoadedModel::Text(m),
                Kind::Speech(m) => LoadedModel::Speech(m),
                Kind::Vision(m) => LoadedModel::Vision(m),
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => match load_on(b, dir, dummy, weights)? {
                Kind::Text(m) => LoadedModel::CudaText(m),
                Kind::Speech(m) => LoadedModel::CudaSpeech(m),
                Kind::Vision(m) => LoadedModel::CudaVision(m),
            },
        })
    }

    /// The decoder's config, for text (and vision-language) models.
    pub fn text_config(&self) -> Option<&crate::models::DecoderConfig> {
        match self {
            LoadedModel::Text(m) => Some(&m.config),
            LoadedModel::Vision(m) => Some(m.decoder_config()),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaText(m) => Some(&m.config),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaVision(m) => Some(m.decoder_config()),
            _ => None,
        }
    }

    /// The vision tower's config, for vision-language models.
    fn vision_config(&self) -> Option<&crate::models::qwen2_5_vl::VisionConfig> {
        match self {
            LoadedModel::Vision(m) => Some(m.vision().config()),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaVision(m) => Some(m.vision().config()),
            _ => None,
        }
    }

    fn image_token(&self) -> Option<u32> {
        match self {
            LoadedModel::Vision(m) => Some(m.image_token()),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaVision(m) => Some(m.image_token()),
            _ => None,
        }
    }

    fn whisper_config(&self) -> Option<&crate::models::whisper::WhisperConfig> {
        match self {
            LoadedModel::Speech(m) => Some(&m.config),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaSpeech(m) => Some(&m.config),
            _ => None,
        }
    }

    /// Sizes the KV cache of `config` from `budget`, with `device`'s KV element size.
    pub fn engine_config(
        &self,
        device: &Device,
        config: EngineConfig,
        budget: KvCacheBudget,
    ) -> Result<EngineConfig, String> {
        let element = device.kv_bytes_per_element();
        match self {
            LoadedModel::Text(m) => config.with_budget_for(m, budget, element),
            LoadedModel::Speech(m) => config.with_budget_for(m, budget, element),
            LoadedModel::Vision(m) => config.with_budget_for(m, budget, element),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaText(m) => config.with_budget_for(m, budget, element),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaSpeech(m) => config.with_budget_for(m, budget, element),
            #[cfg(feature = "cuda")]
            LoadedModel::CudaVision(m) => config.with_budget_for(m, budget, element),
        }
        .map_err(|e| e.to_string())
    }

    /// Greedy or sampled generation of one prompt on an engine of its own, on `device`
    /// (the one it was loaded on): `inferd generate`. Speech models have no text prompt.
    pub fn generate(
        self,
        device: &Device,
        config: EngineConfig,
        eos: Vec<u32>,
        prompt: Vec<u32>,
        params: crate::engine::SamplingParams,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, Option<crate::engine::FinishReason>), crate::engine::GenerateError> {
        match (self, device) {
            (LoadedModel::Text(m), Device::Cpu(b)) => {
                crate::engine::generate(&mut Engine::new(b.clone(), m, config, eos), prompt, params, on_token)
            }
            (LoadedModel::Vision(m), Device::Cpu(b)) => {
                crate::engine::generate(&mut Engine::new(b.clone(), m, config, eos), prompt, params, on_token)
            }
            #[cfg(feature = "cuda")]
            (LoadedModel::CudaText(m), Device::Cuda(b)) => {
                crate::engine::generate(&mut Engine::new(b.clone(), m, config, eos), prompt, params, on_token)
            }
            #[cfg(feature = "cuda")]
            (LoadedModel::CudaVision(m), Device::Cuda(b)) => {
                crate::engine::generate(&mut Engine::new(b.clone(), m, config, eos), prompt, params, on_token)
            }
            _ => unreachable!("generate runs text models on the device they were loaded on"),
        }
    }

    /// Starts the model's engine on `device` (the one it was loaded on).
    pub fn spawn(self, device: &Device, config: EngineConfig, eos: Vec<u32>) -> EngineHandle {
        match (self, device) {
            (LoadedModel::Text(m), Device::Cpu(b)) => EngineHandle::spawn(Engine::new(b.clone(), m, config, eos)),
            (LoadedModel::Speech(m), Device::Cpu(b)) => EngineHandle::spawn(Engine::new(b.clone(), m, config, eos)),
            (LoadedModel::Vision(m), Device::Cpu(b)) => EngineHandle::spawn(Engine::new(b.clone(), m, config, eos)),
            #[cfg(feature = "cuda")]
            (LoadedModel::CudaVision(m), Device::Cuda(b)) => {
                EngineHandle::spawn(Engine::new(b.clone(), m, config, eos))
            }
            #[cfg(feature = "cuda")]
            (LoadedModel::CudaText(m), Device::Cuda(b)) => EngineHandle::spawn(Engine::new(b.clone(), m, config, eos)),
            #[cfg(feature = "cuda")]
            (LoadedModel::CudaSpeech(m), Device::Cuda(b)) => {
                EngineHandle::spawn(Engine::new(b.clone(), m, config, eos))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("a model is started on the device it was loaded on"),
        }
    }
}

/// The KV cache budget on `device`: `budget` on the CPU; on a GPU, `budget` when it is a
/// byte count (`--kv-cache-memory`), else what `gpu_memory_utilization` leaves.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn kv_budget_on(
    device: &Device,
    budget: KvCacheBudget,
    gpu_memory_utilization: f64,
) -> Result<KvCacheBudget, String> {
    match device {
        Device::Cpu(_) => Ok(budget),
        #[cfg(feature = "cuda")]
        Device::Cuda(b) => match budget {
            KvCacheBudget::Bytes(_) => Ok(budget),
            KvCacheBudget::FractionOfAvailable(_) => gpu_kv_budget(b, gpu_memory_utilization),
        },
    }
}

/// Scratch for one step's activations and logits on a GPU, outside the KV pool.
#[cfg(feature = "cuda")]
const GPU_ACTIVATION_RESERVE: usize = 2 << 30;

/// KV cache bytes on a GPU: `utilization` of its memory, less what is in use now (the
/// weights) and a reserve for activations.
#[cfg(feature = "cuda")]
fn gpu_kv_budget(backend: &CudaBackend, utilization: f64) -> Result<KvCacheBudget, String> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(format!("--gpu-memory-utilization must be in (0, 1], got {utilization}"));
    }
    let room = gpu_room(backend, utilization).map_err(|e| e.to_string())?;
    if room.bytes == 0 {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Err(format!(
            "{:.1} of {:.1} GiB are in use and --gpu-memory-utilization {utilization} allows {:.1} GiB: no room left for a KV cache",
            gib(room.total - room.free),
            gib(room.total),
            gib(room.total) * utilization
        ));
    }
    Ok(KvCacheBudget::Bytes(room.bytes))
}

/// GPU memory now, and what `utilization` of it leaves for new buffers.
#[cfg(feature = "cuda")]
struct GpuRoom {
    free: usize,
    total: usize,
    /// Free memory less the headroom `utilization` keeps and the activation reserve.
    bytes: usize,
}

#[cfg(feature = "cuda")]
fn gpu_room(backend: &CudaBackend, utilization: f64) -> Result<GpuRoom, crate::backend::cuda::CudaError> {
    let (free, total) = backend.memory()?;
    let headroom = (total as f64 * (1.0 - utilization)) as usize;
    Ok(GpuRoom {
        free,
        total,
        bytes: free.saturating_sub(headroom).saturating_sub(GPU_ACTIVATION_RESERVE),
    })
}

/// What a speech model needs beyond its weights: its feature extractor and decoding
/// settings.
pub struct SpeechSettings {
    pub mel: MelExtractor,
    pub generation: WhisperGeneration,
}

/// What a vision-language model needs beyond its weights: its image processor's
/// settings and the token each image's features replace.
#[derive(Debug, Clone)]
pub struct VisionSettings {
    pub preprocess: VisionPreprocess,
    /// `<|image_pad|>`: the chat template writes one per image; the prompt holds one per
    /// merged patch.
    pub image_token: u32,
}

impl VisionSettings {
    /// Image tokens an image of `grid` (t, h, w patches) takes in the prompt.
    pub fn tokens_for(&self, grid: [usize; 3]) -> usize {
        let merge = self.preprocess.merge_size;
        grid[0] * grid[1] * grid[2] / (merge * merge)
    }
}

/// The `model_type` of the vision-language models inferd serves.
const VISION_LANGUAGE_MODEL_TYPE: &str = "qwen2_5_vl";

/// A model's files, read and uploaded: what `generate` and the server both start from.
pub struct ModelFiles {
    pub dir: ModelDir,
    pub tokenizer: Tokenizer,
    pub generation_config: GenerationConfig,
    pub model: LoadedModel,
    /// For speech models.
    pub speech: Option<SpeechSettings>,
    /// For vision-language models.
    pub vision: Option<VisionSettings>,
}

/// `model_type` of a folder's config.json (empty when unreadable: the model loader
/// reports the problem).
fn model_type(dir: &std::path::Path) -> String {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// The image processor settings of a vision-language folder (transformers' defaults
/// where `preprocessor_config.json` is missing).
fn vision_preprocess(dir: &std::path::Path) -> Result<VisionPreprocess, String> {
    let path = dir.join("preprocessor_config.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            VisionPreprocess::from_json(&value)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VisionPreprocess::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The feature extractor and decoding settings of a Whisper folder.
fn speech_settings(dir: &std::path::Path) -> Result<SpeechSettings, String> {
    let path = dir.join("preprocessor_config.json");
    let value: serde_json::Value = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let mel = MelConfig::from_json(&value)?;
    let generation = WhisperGeneration::from_dir(dir).map_err(|e| e.to_string())?;
    Ok(SpeechSettings {
        mel: MelExtractor::new(mel),
        generation,
    })
}

impl ModelFiles {
    /// Reads a model from the cache or a local folder, reporting each stage.
    /// `dummy`: seeded random weights from config.json instead of the checkpoint's.
    pub fn load(
        id_or_path: &str,
        backend: &Device,
        dummy: bool,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<ModelFiles, LoadError> {
        progress(LoadProgress::Processor);
        // Not cached: the small files come now, the weights in their own stage.
        let (dir, pending) = match resolve_model(id_or_path) {
            Ok(dir) => (dir, None),
            Err(HubError::NotCached { .. }) => {
                let download = remote::plan(&ModelRef::parse(id_or_path)?)?;
                remote::fetch(&download, false, &mut |_, _| {})?;
                (remote::snapshot(&download), Some(download))
            }
            Err(e) => return Err(e.into()),
        };
        let failed = |e: &dyn std::fmt::Display| LoadError::Failed(e.to_string());
        let tokenizer = Tokenizer::from_dir(&dir.path).map_err(|e| failed(&e))?;
        progress(LoadProgress::Config);
        let generation_config = GenerationConfig::from_dir(&dir.path).map_err(|e| failed(&e))?;
        let dir = match pending {
            Some(download) => {
                remote::fetch(&download, true, &mut |current, total| {
                    progress(LoadProgress::Download {
                        current,
                        total: Some(total),
                    })
                })?;
                remote::finish(&download)?
            }
            None => dir,
        };
        let mut weights = |current, total| progress(LoadProgress::Weights { current, total });
        let speech = if model_type(&dir.path) == "whisper" {
            Some(speech_settings(&dir.path).map_err(|e| failed(&e))?)
        } else {
            None
        };
        let model = LoadedModel::load(backend, &dir.path, dummy, &mut weights)?;
        let vision = match (model.vision_config(), model.image_token()) {
            (Some(config), Some(image_token)) => {
                let preprocess = vision_preprocess(&dir.path).map_err(|e| failed(&e))?;
                if preprocess.patch_size != config.patch_size
                    || preprocess.temporal_patch_size != config.temporal_patch_size
                    || preprocess.merge_size != config.spatial_merge_size
                {
                    return Err(LoadError::Failed(format!(
                        "preprocessor_config.json makes patches of {}×{} (×{} frames) merged {}×{}, the vision tower reads {}×{} (×{}) merged {}×{}",
                        preprocess.patch_size,
                        preprocess.patch_size,
                        preprocess.temporal_patch_size,
                        preprocess.merge_size,
                        preprocess.merge_size,
                        config.patch_size,
                        config.patch_size,
                        config.temporal_patch_size,
                        config.spatial_merge_size,
                        config.spatial_merge_size
                    )));
                }
                Some(VisionSettings {
                    preprocess,
                    image_token,
                })
            }
            _ => None,
        };
        if let (Some(speech), Some(config)) = (&speech, model.whisper_config()) {
            let mel = speech.mel.config();
            if mel.n_mels != config.num_mel_bins || mel.frames_per_window() != config.mel_frames() {
                return Err(LoadError::Failed(format!(
                    "preprocessor_config.json makes [{}, {}] features, the model reads [{}, {}]",
                    mel.n_mels,
                    mel.frames_per_window(),
                    config.num_mel_bins,
                    config.mel_frames()
                )));
            }
        }
        Ok(ModelFiles {
            dir,
            tokenizer,
            generation_config,
            model,
            speech,
            vision,
        })
    }

    /// EOS ids from every place a model may declare them.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.generation_config.eos_token_ids();
        if let Some(config) = self.model.text_config() {
            ids.extend(&config.eos_token_ids);
        }
        if let Some(config) = self.model.whisper_config() {
            ids.extend(config.eos_token_id);
        }
        let eos_token = self.tokenizer.special_tokens.eos_token.as_deref();
        if let Some(id) = eos_token.and_then(|t| self.tokenizer.token_to_id(t)) {
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A loaded model, serving requests.
pub struct ServedModel {
    /// `org/name@revision` (or the folder, for a local model): its registry key and the
    /// name responses give.
    pub name: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
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

/// One load in progress: its events so far (any number of followers replay them and
/// wait for more) and, at the end, its outcome.
pub struct LoadJob {
    pub model: String,
    events: Mutex<Vec<Value>>,
    published: watch::Sender<usize>,
    outcome: OnceLock<Result<Arc<ServedModel>, LoadError>>,
}

impl LoadJob {
    fn new(model: String) -> Self {
        LoadJob {
            model,
            events: Mutex::new(Vec::new()),
            published: watch::channel(0).0,
            outcome: OnceLock::new(),
        }
    }

    fn emit(&self, event: Value) {
        let mut events = lock(&self.events);
        events.push(event);
        self.published.send_replace(events.len());
    }

    fn finish(&self, outcome: Result<Arc<ServedModel>, LoadError>) {
        let event = match &outcome {
            Ok(_) => ready_event(&self.model, false),
            Err(e) => json!({"status": "error", "model": self.model, "message": e.to_string()}),
        };
        // The outcome first: whoever wakes up for the last event finds it.
        let _ = self.outcome.set(outcome);
        self.emit(event);
    }

    /// The events after the first `seen`, waiting until there is one. The last event
    /// of a load is its terminal one (`ready` or `error`); empty if nothing will come.
    pub async fn events_after(&self, seen: usize) -> Vec<Value> {
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

/// `{"status": "ready", "model": …, "cached": …}`
pub fn ready_event(model: &str, cached: bool) -> Value {
    json!({"status": "ready", "model": model, "cached": cached})
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
    slots: Mutex<HashMap<String, Slot>>,
}

/// Weights and download events are rate-limited to one per this interval (plus the
/// first and the last).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

impl ModelManager {
    /// A manager that loads models as requests name them.
    pub fn new(settings: ModelSettings) -> Arc<Self> {
        Arc::new(ModelManager {
            settings,
            forced: None,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// A manager pinned to one model, loaded now (errors are the caller's to report).
    pub fn with_forced(settings: ModelSettings, id_or_path: &str) -> Result<Arc<Self>, LoadError> {
        let model = Arc::new(build(&settings, id_or_path, &mut |_| {})?);
        let slots = HashMap::from([(model.name.clone(), Slot::Ready(model.clone()))]);
        Ok(Arc::new(ModelManager {
            settings,
            forced: Some(model),
            slots: Mutex::new(slots),
        }))
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
            return Some(ModelLease::new(forced.clone()));
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
        let (mut last_weights, mut last_download): (Option<Instant>, Option<Instant>) = (None, None);
        let mut report = |p: LoadProgress| {
            let event = match p {
                LoadProgress::Processor => json!({"status": "loading", "model": key, "stage": "processor"}),
                LoadProgress::Config => json!({"status": "loading", "model": key, "stage": "config"}),
                LoadProgress::Download { current, total } => {
                    let due = last_download.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
                    if !(due || Some(current) == total) {
                        return;
                    }
                    last_download = Some(Instant::now());
                    json!({"status": "loading", "model": key, "stage": "download",
                        "progress": {"current": current, "total": total}})
                }
                LoadProgress::Weights { current, total } => {
                    let due = last_weights.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
                    if !(due || current == 1 || current == total) {
                        return;
                    }
                    last_weights = Some(Instant::now());
                    json!({"status": "loading", "model": key, "stage": "weights",
                        "progress": {"current": current, "total": total}})
                }
            };
            job.emit(event);
        };
        // A panic in a loader (a malformed checkpoint the checks missed) must end the
        // load with an error, not leave its followers waiting forever.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.make_room(&key)?;
            build(&self.settings, &key, &mut report).map(Arc::new)
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
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

    /// Unloads least recently used idle models until the new model's weights (the
    /// size of its cached checkpoint, when it is cached) fit in the available memory and
    /// in `--models-memory`.
    /// Bytes a new model's weights may take on the device models load to: available host
    /// memory, or on a GPU what `--gpu-memory-utilization` leaves free less the activation
    /// reserve (the KV pools of loaded models fill the rest, so loading a second model
    /// unloads idle ones first).
    fn available_for_weights(&self) -> u64 {
        match &self.settings.backend {
            Device::Cpu(_) => available_memory().unwrap_or(usize::MAX) as u64,
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => match gpu_room(b, self.settings.gpu_memory_utilization) {
                Ok(room) => room.bytes as u64,
                Err(_) => u64::MAX, // the load reports the device's state
            },
        }
    }

    fn make_room(&self, key: &str) -> Result<(), LoadError> {
        let Ok(dir) = resolve_model(key) else {
            return Ok(()); // not cached: the load reports that
        };
        let need = checkpoint_bytes(&dir.path);
        if let Some(budget) = self.settings.memory_budget.filter(|&b| need > b) {
            return Err(LoadError::OutOfMemory(format!(
                "`{key}` does not fit in --models-memory: its weights take {need} bytes, the budget is {budget}"
            )));
        }
        loop {
            let available = self.available_for_weights();
            let loaded: u64 = self.all_loaded().iter().map(|m| m.weight_bytes).sum();
            let over_budget = self.settings.memory_budget.is_some_and(|b| loaded + need > b);
            if available >= need && !over_budget {
                return Ok(());
            }
            let victim = {
                let mut slots = lock(&self.slots);
                let lru = slots
                    .iter()
                    .filter_map(|(k, s)| match s {
                        Slot::Ready(m) if !self.is_forced(m) => m.idle_for().map(|idle| (k.clone(), idle)),
                        _ => None,
                    })
                    .max_by_key(|(_, idle)| *idle)
                    .map(|(k, _)| k);
                lru.and_then(|k| match slots.remove(&k) {
                    Some(Slot::Ready(m)) => Some(m),
                    _ => None,
                })
            };
            let Some(victim) = victim else {
                let why = if over_budget {
                    format!(
                        "loaded models hold {loaded} of the {} bytes of --models-memory",
                        self.settings.memory_budget.unwrap_or(0)
                    )
                } else {
                    format!("{available} bytes are available")
                };
                return Err(LoadError::OutOfMemory(format!(
                    "no room to load `{key}`: its weights take {need} bytes, {why}, and no idle model is left to unload"
                )));
            };
            crate::info!("unloading {} (least recently used) to make room for {key}", victim.name);
            victim.engine.shutdown();
            drop(victim);
            release_free_memory();
        }
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

/// Hub downloads for loads, or (built without the `download` feature) their absence.
#[cfg(feature = "download")]
mod remote {
    use super::LoadError;
    use crate::loader::download::{Download, DownloadError, HubClient};
    use crate::loader::hub::{hub_cache_dir, ModelDir, ModelRef};

    impl From<DownloadError> for LoadError {
        fn from(e: DownloadError) -> Self {
            match e {
                DownloadError::Offline { .. }
                | DownloadError::NotFound { .. }
                | DownloadError::Unauthorized { .. }
                | DownloadError::NotAModel { .. } => LoadError::NotFound(e.to_string()),
                DownloadError::Http { .. } => LoadError::HubUnavailable(e.to_string()),
                DownloadError::Io { .. } => LoadError::Failed(e.to_string()),
            }
        }
    }

    pub fn plan(model: &ModelRef) -> Result<Download, LoadError> {
        Ok(Download::plan(&HubClient::from_env(), model, &hub_cache_dir())?)
    }

    /// The weights (`weights: true`) or everything else.
    pub fn fetch(download: &Download, weights: bool, progress: &mut dyn FnMut(u64, u64)) -> Result<(), LoadError> {
        Ok(download.fetch(|f| f.is_weights() == weights, &mut |_, _, done, total| {
            progress(done, total)
        })?)
    }

    pub fn snapshot(download: &Download) -> ModelDir {
        ModelDir {
            path: download.snapshot_dir(),
            display_name: String::new(),
            commit: Some(download.commit.clone()),
        }
    }

    pub fn finish(download: &Download) -> Result<ModelDir, LoadError> {
        Ok(download.finish()?)
    }
}

#[cfg(not(feature = "download"))]
mod remote {
    use super::LoadError;
    use crate::loader::hub::{ModelDir, ModelRef};

    pub enum Download {}

    pub fn plan(model: &ModelRef) -> Result<Download, LoadError> {
        Err(LoadError::NotFound(format!(
            "`{model}` is not cached, and this build of inferd cannot download (no `download` feature)"
        )))
    }

    pub fn fetch(download: &Download, _: bool, _: &mut dyn FnMut(u64, u64)) -> Result<(), LoadError> {
        match *download {}
    }

    pub fn snapshot(download: &Download) -> ModelDir {
        match *download {}
    }

    pub fn finish(download: &Download) -> Result<ModelDir, LoadError> {
        match *download {}
    }
}

/// Loads a model and starts its engine.
fn build(
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
        config = files
            .model
            .engine_config(&settings.backend, config, budget)
            .map_err(no_room)?;
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
    let engine = model.spawn(&settings.backend, config, eos);
    Ok(ServedModel {
        name: dir.display_name,
        engine,
        tokenizer: Arc::new(tokenizer),
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

/// Bytes of a folder's safetensors files.
fn checkpoint_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.len())
        .sum()
}

/// Hands memory the allocator holds but no longer uses back to the system, so that an
/// unloaded model's memory is really free (glibc keeps freed heap memory, in every
/// thread's arena, for reuse otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the kernel; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
