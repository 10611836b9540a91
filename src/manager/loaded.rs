//! A model's weights on the backend they were uploaded to, behind one trait object: the
//! backend travels with the weights, so a model can only run where it was loaded.

use std::path::Path;

#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Device};
use crate::engine::{
    self, Engine, EngineConfig, EngineHandle, FinishReason, GenerateError, KvCacheBudget, SamplingParams,
};
use crate::models::qwen2_5_vl::{VisionConfig, VisionLanguageModel};
use crate::models::whisper::WhisperConfig;
use crate::models::{load_decoder, load_decoder_dummy, load_whisper, DecoderConfig, DecoderModel, WhisperModel};

use super::LoadError;

/// A loaded model: its weights and the backend holding them. Made once per load and
/// moved into its engine.
pub trait LoadedModel: Send {
    /// The decoder's config, for text (and vision-language) models.
    fn text_config(&self) -> Option<&DecoderConfig>;
    /// The vision tower's config and the image token, for vision-language models.
    fn vision(&self) -> Option<(&VisionConfig, u32)>;
    /// Whisper's config, for speech models.
    fn whisper_config(&self) -> Option<&WhisperConfig>;
    /// Sizes the KV cache of `config` from `budget`, with the backend's KV element size.
    fn engine_config(&self, config: EngineConfig, budget: KvCacheBudget) -> Result<EngineConfig, String>;
    /// Greedy or sampled generation of one prompt on an engine of its own (`inferd
    /// generate`). Speech models have no text prompt: refused.
    fn generate(
        self: Box<Self>,
        config: EngineConfig,
        eos: Vec<u32>,
        prompt: Vec<u32>,
        params: SamplingParams,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError>;
    /// Starts the model's engine thread.
    fn spawn(self: Box<Self>, config: EngineConfig, eos: Vec<u32>) -> EngineHandle;
}

/// Uploads a model folder's weights to `device` (`dummy`: seeded random weights).
pub fn load_model(
    device: &Device,
    dir: &Path,
    dummy: bool,
    weights: &mut dyn FnMut(usize, usize),
) -> Result<Box<dyn LoadedModel>, LoadError> {
    Ok(match device {
        Device::Cpu(b) => Box::new(OnBackend {
            model: load_on(b, dir, dummy, weights)?,
            backend: b.clone(),
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(b) => Box::new(OnBackend::<CudaBackend> {
            model: load_on(b, dir, dummy, weights)?,
            backend: b.clone(),
        }),
    })
}

/// The `model_type` of the vision-language models inferd serves.
const VISION_LANGUAGE_MODEL_TYPE: &str = "qwen2_5_vl";

/// A model of any kind on one backend.
#[allow(clippy::large_enum_variant)]
enum Kind<B: Backend> {
    /// A text decoder (chat, completions, responses).
    Text(DecoderModel<B>),
    /// Speech to text (transcriptions, translations).
    Speech(WhisperModel<B>),
    /// Text and images in, text out (chat with images).
    Vision(VisionLanguageModel<B>),
}

/// The weights and the backend they live on.
struct OnBackend<B: Backend> {
    backend: B,
    model: Kind<B>,
}

impl<B: Backend + Clone + Send + 'static> LoadedModel for OnBackend<B> {
    fn text_config(&self) -> Option<&DecoderConfig> {
        match &self.model {
            Kind::Text(m) => Some(&m.config),
            Kind::Vision(m) => Some(m.decoder_config()),
            Kind::Speech(_) => None,
        }
    }

    fn vision(&self) -> Option<(&VisionConfig, u32)> {
        match &self.model {
            Kind::Vision(m) => Some((m.vision().config(), m.image_token())),
            _ => None,
        }
    }

    fn whisper_config(&self) -> Option<&WhisperConfig> {
        match &self.model {
            Kind::Speech(m) => Some(&m.config),
            _ => None,
        }
    }

    fn engine_config(&self, config: EngineConfig, budget: KvCacheBudget) -> Result<EngineConfig, String> {
        let element = self.backend.kv_bytes_per_element();
        match &self.model {
            Kind::Text(m) => config.with_budget_for(m, budget, element),
            Kind::Speech(m) => config.with_budget_for(m, budget, element),
            Kind::Vision(m) => config.with_budget_for(m, budget, element),
        }
        .map_err(|e| e.to_string())
    }

    fn generate(
        self: Box<Self>,
        config: EngineConfig,
        eos: Vec<u32>,
        prompt: Vec<u32>,
        params: SamplingParams,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError> {
        let OnBackend { backend, model } = *self;
        match model {
            Kind::Text(m) => engine::generate(&mut Engine::new(backend, m, config, eos), prompt, params, on_token),
            Kind::Vision(m) => engine::generate(&mut Engine::new(backend, m, config, eos), prompt, params, on_token),
            Kind::Speech(_) => Err(GenerateError::Failed(
                "a speech-to-text model takes audio, not a text prompt".into(),
            )),
        }
    }

    fn spawn(self: Box<Self>, config: EngineConfig, eos: Vec<u32>) -> EngineHandle {
        let OnBackend { backend, model } = *self;
        match model {
            Kind::Text(m) => EngineHandle::spawn(Engine::new(backend, m, config, eos)),
            Kind::Speech(m) => EngineHandle::spawn(Engine::new(backend, m, config, eos)),
            Kind::Vision(m) => EngineHandle::spawn(Engine::new(backend, m, config, eos)),
        }
    }
}

/// Uploads a model folder's weights to `backend`.
fn load_on<B: Backend>(
    backend: &B,
    dir: &Path,
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

/// `model_type` of a folder's config.json (empty when unreadable: the model loader
/// reports the problem).
pub(super) fn model_type(dir: &Path) -> String {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}
