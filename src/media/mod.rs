//! Media inputs turned into what models read: audio decoded, resampled and made into a
//! log-mel spectrogram (Whisper).

pub mod audio;
