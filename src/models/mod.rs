//! Model definitions: configs parsed from Hugging Face files, and the decoders written
//! once over the backend trait.

pub mod config;
pub mod llama;
pub mod whisper;

use std::path::Path;

use std::sync::Arc;

use crate::backend::{Backend, ForwardBatch, KvCacheShape};
use crate::media::audio::LogMel;
use crate::loader::{Checkpoint, LoadError};

pub use config::{Architecture, ConfigError, DecoderConfig, GenerationConfig, RopeScaling};
pub use llama::{DecoderModel, ForwardError, LogitsFor};
pub use whisper::{WhisperConfig, WhisperModel};

/// What a request gives a model besides its prompt tokens: an encoder's input.
pub type EncoderInput = Arc<LogMel>;

/// What the engine drives: a model with a paged self-attention KV cache that turns a
/// batch of token chunks into logits. Models with an encoder get each request's input
/// before its first step, and drop what they kept for it after its last.
pub trait EngineModel<B: Backend>: Send + 'static {
    fn vocab_size(&self) -> usize;
    /// Positions the model can embed (its context window).
    fn max_positions(&self) -> usize;
    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape;
    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor,
    ) -> Result<B::Tensor, ForwardError>;
    /// Whether requests must bring an `EncoderInput`.
    fn needs_encoder_input(&self) -> bool {
        false
    }
    /// Runs the encoder for request `key`.
    fn begin_request(&mut self, _backend: &B, _key: u64, _input: &EncoderInput) -> Result<(), ForwardError> {
        Err(ForwardError::BadEncoderInput("this model has no encoder".into()))
    }
    /// Frees what the model kept for request `key` (nothing for a plain decoder).
    fn end_request(&mut self, _key: u64) {}
}

impl<B: Backend + 'static> EngineModel<B> for DecoderModel<B>
where
    B::Weight: 'static,
{
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }
    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        DecoderModel::kv_cache_shape(self, num_blocks, block_size)
    }
    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor,
    ) -> Result<B::Tensor, ForwardError> {
        DecoderModel::forward(self, backend, batch, cache, logits_for)
    }
}

impl<B: Backend + 'static> EngineModel<B> for WhisperModel<B>
where
    B::Weight: 'static,
    B::Tensor: 'static,
{
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.config.max_target_positions
    }
    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        WhisperModel::kv_cache_shape(self, num_blocks, block_size)
    }
    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor,
    ) -> Result<B::Tensor, ForwardError> {
        WhisperModel::forward(self, backend, batch, cache, logits_for)
    }
    fn needs_encoder_input(&self) -> bool {
        true
    }
    fn begin_request(&mut self, backend: &B, key: u64, input: &EncoderInput) -> Result<(), ForwardError> {
        WhisperModel::begin_request(self, backend, key, input)
    }
    fn end_request(&mut self, key: u64) {
        WhisperModel::end_request(self, key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] LoadError),
}

/// Reads `dir/config.json` and the weights next to it.
pub fn load_decoder<B: Backend>(
    backend: &B,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DecoderModel<B>, ModelError> {
    let config = DecoderConfig::from_dir(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok(DecoderModel::load(backend, config, &checkpoint, progress)?)
}

/// Reads `dir/config.json` alone and makes seeded random weights for it
/// (`--load-format dummy`).
pub fn load_decoder_dummy<B: Backend>(
    backend: &B,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DecoderModel<B>, ModelError> {
    let config = DecoderConfig::from_dir(dir)?;
    let checkpoint = DecoderModel::<B>::dummy_checkpoint(&config, 0)?;
    Ok(DecoderModel::load(backend, config, &checkpoint, progress)?)
}

/// Reads a Whisper checkpoint folder (`config.json` and the weights).
pub fn load_whisper<B: Backend>(
    backend: &B,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<WhisperModel<B>, ModelError> {
    let config = WhisperConfig::from_dir(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok(WhisperModel::load(backend, config, &checkpoint, progress)?)
}
