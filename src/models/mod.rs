//! Model definitions: configs parsed from Hugging Face files, and the decoders written
//! once over the backend trait.

pub mod config;
pub mod llama;
pub mod qwen2_5_vl;
pub mod whisper;

use std::path::Path;

use std::sync::Arc;

use crate::backend::{Backend, ForwardBatch, KvCacheShape};
use crate::loader::{Checkpoint, LoadError};
use crate::media::audio::LogMel;

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
    /// Bytes the model keeps per running request besides its KV blocks (a Whisper
    /// request's cross-attention keys and values), for memory budgets.
    fn bytes_per_request(&self) -> usize {
        0
    }
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

/// Checks a batch against a model's vocabulary and positions before any compute.
pub(crate) fn check_batch(batch: &ForwardBatch, vocab_size: usize, max_positions: usize) -> Result<(), ForwardError> {
    if let Some(&id) = batch.token_ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ForwardError::TokenOutOfRange { id, vocab_size });
    }
    if let Some(&position) = batch.positions.iter().find(|&&p| p as usize >= max_positions) {
        return Err(ForwardError::PositionOutOfRange {
            position,
            max: max_positions,
        });
    }
    if batch.seqs.iter().any(|s| s.query_len == 0) {
        return Err(ForwardError::EmptySequence);
    }
    Ok(())
}

/// The rows of the final hidden states that get logits.
pub(crate) fn logit_rows<B: Backend>(
    backend: &B,
    hidden: B::Tensor,
    batch: &ForwardBatch,
    logits_for: LogitsFor,
) -> B::Tensor {
    match logits_for {
        LogitsFor::AllTokens => hidden,
        LogitsFor::LastOfEachSequence => {
            let rows: Vec<usize> = batch.seqs.iter().map(|s| s.query_start + s.query_len - 1).collect();
            backend.gather_rows(&hidden, &rows)
        }
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
