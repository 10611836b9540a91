//! What a model is made of besides its weights: its folder (from the cache, or fetched),
//! tokenizer, generation defaults, and the speech or vision settings its kind needs,
//! checked against the weights.

use std::path::Path;

use crate::backend::Device;
use crate::loader::hub::{resolve_model, HubError, ModelDir, ModelRef};
use crate::media::audio::{MelConfig, MelExtractor};
use crate::media::image::VisionPreprocess;
use crate::models::whisper::WhisperGeneration;
use crate::models::GenerationConfig;
use crate::text::Tokenizer;

use super::loaded::{load_model, model_type, LoadedModel};
use super::{remote, LoadError, LoadProgress};

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

/// A model's files, read and uploaded: what `generate` and the server both start from.
pub struct ModelFiles {
    pub dir: ModelDir,
    pub tokenizer: Tokenizer,
    pub generation_config: GenerationConfig,
    pub model: Box<dyn LoadedModel>,
    /// For speech models.
    pub speech: Option<SpeechSettings>,
    /// For vision-language models.
    pub vision: Option<VisionSettings>,
}

/// The image processor settings of a vision-language folder (transformers' defaults
/// where `preprocessor_config.json` is missing).
pub(super) fn vision_preprocess(dir: &Path) -> Result<VisionPreprocess, String> {
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
pub(super) fn speech_settings(dir: &Path) -> Result<SpeechSettings, String> {
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
        let model = load_model(backend, &dir.path, dummy, &mut weights)?;
        let vision = match model.vision() {
            Some((config, image_token)) => {
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
