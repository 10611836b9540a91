//! Finding checkpoints (Hugging Face cache layout or plain folders) and mapping their
//! safetensors weights into memory.

pub mod hub;
pub mod safetensors;

pub use hub::{resolve_model, HubError, ModelDir, ModelRef};
pub use safetensors::{Checkpoint, Dtype, LoadError, TensorView};
