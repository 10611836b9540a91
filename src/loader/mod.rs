//! Finding checkpoints (Hugging Face cache layout or plain folders), fetching them from
//! the hub, and mapping their safetensors weights into memory.

#[cfg(feature = "download")]
pub mod download;
pub mod hub;
pub mod safetensors;

pub use hub::{resolve_model, HubError, ModelDir, ModelRef};
pub use safetensors::{Checkpoint, Dtype, LoadError, TensorView};
