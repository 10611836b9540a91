//! Model definitions: configs parsed from Hugging Face files, and the decoders written
//! once over the backend trait.

pub mod config;
pub mod llama;

use std::path::Path;

use crate::backend::Backend;
use crate::loader::{Checkpoint, LoadError};

pub use config::{Architecture, ConfigError, DecoderConfig, GenerationConfig, RopeScaling};
pub use llama::{DecoderModel, ForwardError, LogitsFor};

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
