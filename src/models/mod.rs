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
use crate::media::image::PixelValues;

pub use config::{Architecture, ConfigError, DecoderConfig, GenerationConfig, RopeScaling};
pub use llama::DecoderModel;
pub use whisper::{WhisperConfig, WhisperModel};

/// Why a forward pass refused its batch (shared by every model).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("position {position} is beyond the model's context of {max} tokens")]
    PositionOutOfRange { position: u32, max: usize },
    #[error("a sequence in the batch has no tokens to compute")]
    EmptySequence,
    #[error("bad encoder input: {0}")]
    BadEncoderInput(String),
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor<'a> {
    /// The last token of each sequence (generation).
    LastOfEachSequence,
    /// Every token of the batch (scoring, tests).
    AllTokens,
    /// These rows of the batch, in this order (prompt log-probabilities as well as the
    /// rows generation samples from).
    Rows(&'a [usize]),
}

/// What a request gives a model besides its prompt tokens: an encoder's input.
#[derive(Debug, Clone)]
pub enum EncoderInput {
    /// A window of log-mel features (Whisper).
    Audio(Arc<LogMel>),
    /// Preprocessed images, in the order of their tokens in the prompt.
    Images(Arc<ImageSet>),
}

/// A request's preprocessed images with their content hash, computed once where they
/// are made (off the engine thread: hashing every pixel value of large images takes a
/// while).
#[derive(Debug)]
pub struct ImageSet {
    pixels: Vec<PixelValues>,
    hash: u64,
}

impl ImageSet {
    pub fn new(pixels: Vec<PixelValues>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for image in &pixels {
            image.grid.hash(&mut h);
            for v in &image.data {
                v.to_bits().hash(&mut h);
            }
        }
        ImageSet {
            pixels,
            hash: h.finish(),
        }
    }
}

impl std::ops::Deref for ImageSet {
    type Target = [PixelValues];
    fn deref(&self) -> &[PixelValues] {
        &self.pixels
    }
}

impl EncoderInput {
    /// A hash of the content (prefix-cache blocks are shared only between requests
    /// with the same input).
    pub fn content_hash(&self) -> u64 {
        match self {
            EncoderInput::Audio(mel) => mel.content_hash(),
            EncoderInput::Images(images) => images.hash,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            EncoderInput::Audio(_) => "audio",
            EncoderInput::Images(_) => "image",
        }
    }
}

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
        logits_for: LogitsFor<'_>,
    ) -> Result<B::Tensor, ForwardError>;
    /// Bytes the model keeps per running request besides its KV blocks (a Whisper
    /// request's cross-attention keys and values), for memory budgets.
    fn bytes_per_request(&self) -> usize {
        0
    }
    /// Whether requests must bring an `EncoderInput` (Whisper's audio).
    fn needs_encoder_input(&self) -> bool {
        false
    }
    /// The kind of `EncoderInput` the model takes (`EncoderInput::kind`), if any.
    fn encoder_input_kind(&self) -> Option<&'static str> {
        None
    }
    /// Runs the encoder for request `key`, whose prompt is `prompt`.
    fn begin_request(
        &mut self,
        _backend: &B,
        _key: u64,
        _prompt: &[u32],
        _input: &EncoderInput,
    ) -> Result<(), ForwardError> {
        Err(ForwardError::BadEncoderInput("this model has no encoder".into()))
    }
    /// Frees what the model kept for request `key` (nothing for a plain decoder).
    fn end_request(&mut self, _key: u64) {}
}

/// Several 1-D tensors (the biases of projections stacked into one weight) read as one
/// f32 vector, in order.
pub(crate) fn stacked_vector<B: Backend>(
    backend: &B,
    checkpoint: &Checkpoint,
    names: &[String],
) -> Result<B::Weight, LoadError> {
    let mut values = Vec::new();
    for name in names {
        values.extend(checkpoint.tensor(name)?.to_f32_vec());
    }
    Ok(backend.weight_from_f32(values))
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
    logits_for: LogitsFor<'_>,
) -> B::Tensor {
    match logits_for {
        LogitsFor::AllTokens => hidden,
        LogitsFor::Rows(rows) => backend.gather_rows(&hidden, rows),
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
    let checkpoint = dummy_checkpoint(&DecoderModel::<B>::tensor_shapes(&config), 0)?;
    Ok(DecoderModel::load(backend, config, &checkpoint, progress)?)
}

/// A checkpoint of seeded random bf16 weights with these names and shapes
/// (`--load-format dummy`): matrices uniform with the standard deviation of
/// transformers' initializer (0.02), vectors (norms) 1, biases 0. For benchmarks of
/// model shapes whose weights are not at hand; its outputs mean nothing.
pub fn dummy_checkpoint(tensors: &[(String, Vec<usize>)], seed: u64) -> Result<Checkpoint, LoadError> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: plenty for filler weights.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let bound = 0.02f32 * 3f32.sqrt();
    let fill = |value: f32| half::bf16::from_f32(value).to_bits().to_le_bytes();
    let encoded: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = if name.ends_with(".bias") {
                (0..n).flat_map(|_| fill(0.0)).collect()
            } else if shape.len() == 1 {
                (0..n).flat_map(|_| fill(1.0)).collect()
            } else {
                (0..n)
                    .flat_map(|_| fill(((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound))
                    .collect()
            };
            (name.as_str(), "BF16", shape.clone(), bytes)
        })
        .collect();
    Checkpoint::from_bytes(
        Path::new("<dummy weights>"),
        crate::loader::safetensors::encode_safetensors(&encoded),
    )
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
