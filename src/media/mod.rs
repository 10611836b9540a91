//! Media inputs turned into what models read: audio decoded, resampled and made into a
//! log-mel spectrogram (Whisper); media named by URL fetched under a policy that refuses
//! private addresses.

pub mod audio;
pub mod fetch;
pub mod image;
