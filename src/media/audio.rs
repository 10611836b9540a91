//! Audio for speech models: any of WAV, FLAC, MP3 or Ogg Vorbis decoded (symphonia),
//! mixed down to mono, resampled to 16 kHz (rubato's FFT resampler), and the log-mel
//! spectrogram computed exactly as transformers' `WhisperFeatureExtractor` does it:
//! periodic Hann window of `n_fft`, frames every `hop_length` samples over the audio
//! reflect-padded by `n_fft / 2` on each side, power spectrum, Slaney mel filters from
//! 0 to 8 kHz, `log10(max(mel, 1e-10))`, clamped to `max - 8`, then `(x + 4) / 4`.

use std::io::Cursor;
use std::sync::Arc;

use realfft::RealFftPlanner;
use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Sample rate every speech model here reads.
pub const SAMPLE_RATE: u32 = 16_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AudioError {
    #[error("the audio file is empty")]
    Empty,
    #[error("the file is not audio in a supported format (wav, flac, mp3, ogg): {0}")]
    Unsupported(String),
    #[error("the audio could not be decoded: {0}")]
    Corrupt(String),
    #[error("the audio holds no samples")]
    NoSamples,
    #[error("the audio is longer than the limit of {limit_secs} s")]
    TooLong { limit_secs: f64 },
}

/// Decoded audio: mono samples in [-1, 1] at `sample_rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Decodes a whole audio file from memory and mixes it to mono. `max_secs` bounds the
/// decoded length: decoding stops with `TooLong` as soon as it is passed, so a hostile
/// file cannot make the server hold more than that much audio.
pub fn decode(bytes: &[u8], max_secs: f64) -> Result<Audio, AudioError> {
    decode_guarded(bytes, max_secs, None)
}

/// `decode`, resampled to `rate` while decoding: only the output rate's samples (and
/// one chunk of the source's) are ever held, however high the file's own rate.
pub fn decode_at_rate(bytes: &[u8], rate: u32, max_secs: f64) -> Result<Audio, AudioError> {
    decode_guarded(bytes, max_secs, Some(rate))
}

/// Highest sample rate a file may declare.
const MAX_SOURCE_RATE: u32 = 384_000;

fn decode_guarded(bytes: &[u8], max_secs: f64, rate: Option<u32>) -> Result<Audio, AudioError> {
    // A demuxer or codec that panics on a hostile file must not take the caller down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_unguarded(bytes, max_secs, rate)))
        .unwrap_or_else(|_| Err(AudioError::Corrupt("the decoder failed on this file".into())))
}

fn decode_unguarded(bytes: &[u8], max_secs: f64, target_rate: Option<u32>) -> Result<Audio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let source = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymphoniaError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                AudioError::Corrupt("the file ends before its audio data".into())
            }
            e => AudioError::Unsupported(e.to_string()),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Unsupported("no audio track".into()))?;
    let track_id = track.id;
    let mut sample_rate = track.codec_params.sample_rate;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unsupported(e.to_string()))?;
    let mut sink: Option<StreamingResampler> = None;
    let mut mono: Vec<f32> = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet is skipped, as players do.
            Err(SymphoniaError::DecodeError(_)) => continue,
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        let spec = *decoded.spec();
        let rate = *sample_rate.get_or_insert(spec.rate);
        if rate == 0 || rate > MAX_SOURCE_RATE {
            return Err(AudioError::Unsupported(format!(
                "a sample rate of {rate} Hz (at most {MAX_SOURCE_RATE})"
            )));
        }
        let channels = spec.channels.count().max(1);
        let buf = match &mut buffer {
            Some(b) if b.capacity() >= decoded.capacity() * channels => b,
            _ => buffer.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        mono.clear();
        mono.extend(
            buf.samples()
                .chunks_exact(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32),
        );
        if mono.iter().any(|s| !s.is_finite()) {
            return Err(AudioError::Corrupt("non-finite samples".into()));
        }
        let sink = sink.get_or_insert_with(|| StreamingResampler::new(rate, target_rate.unwrap_or(rate)));
        sink.push(&mono);
        if sink.input_len() as f64 > max_secs * rate as f64 {
            return Err(AudioError::TooLong { limit_secs: max_secs });
        }
    }
    let sink = sink.filter(|s| s.input_len() > 0).ok_or(AudioError::NoSamples)?;
    let sample_rate = sink.to;
    Ok(Audio {
        samples: sink.finish(),
        sample_rate,
    })
}

/// Resamples mono audio to `rate` (see `StreamingResampler`).
pub fn resample(audio: &Audio, rate: u32) -> Audio {
    let mut resampler = StreamingResampler::new(audio.sample_rate, rate);
    resampler.push(&audio.samples);
    Audio {
        samples: resampler.finish(),
        sample_rate: rate,
    }
}

/// Mono rate conversion fed piece by piece, with rubato's synchronous FFT resampler
/// (band-limited, no aliasing), compensating its delay so that sample 0 stays sample 0.
/// Holds at most one chunk of input; the output is `ceil(len * to / from)` samples.
pub struct StreamingResampler {
    from: u32,
    to: u32,
    /// `None` when the rates are equal.
    fft: Option<FftFixedIn<f32>>,
    pending: Vec<f32>,
    out: Vec<f32>,
    input_len: usize,
}

const RESAMPLE_CHUNK: usize = 1024;

impl StreamingResampler {
    pub fn new(from: u32, to: u32) -> Self {
        let fft = (from != to).then(|| {
            FftFixedIn::<f32>::new(from as usize, to as usize, RESAMPLE_CHUNK, 1, 1).expect("valid resampler rates")
        });
        StreamingResampler {
            from,
            to,
            fft,
            pending: Vec::with_capacity(RESAMPLE_CHUNK),
            out: Vec::new(),
            input_len: 0,
        }
    }

    /// Samples pushed so far.
    pub fn input_len(&self) -> usize {
        self.input_len
    }

    pub fn push(&mut self, samples: &[f32]) {
        self.input_len += samples.len();
        let Some(fft) = &mut self.fft else {
            self.out.extend_from_slice(samples);
            return;
        };
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (RESAMPLE_CHUNK - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == RESAMPLE_CHUNK {
                let produced = fft
                    .process(std::slice::from_ref(&self.pending), None)
                    .expect("resampler input of the right size");
                self.out.extend_from_slice(&produced[0]);
                self.pending.clear();
            }
        }
    }

    /// The whole output.
    pub fn finish(mut self) -> Vec<f32> {
        let Some(mut fft) = self.fft.take() else {
            return self.out;
        };
        let want = (self.input_len * self.to as usize).div_ceil(self.from as usize);
        let delay = fft.output_delay();
        // The last partial chunk, then silence, until the delayed tail has come out.
        while self.out.len() < want + delay {
            self.pending.resize(RESAMPLE_CHUNK, 0.0);
            let produced = fft
                .process(std::slice::from_ref(&self.pending), None)
                .expect("resampler input of the right size");
            self.out.extend_from_slice(&produced[0]);
            self.pending.clear();
        }
        self.out.drain(..delay);
        self.out.truncate(want);
        self.out
    }
}

/// The settings of a `WhisperFeatureExtractor` (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct MelConfig {
    pub n_fft: usize,
    pub hop_length: usize,
    pub n_mels: usize,
    pub sampling_rate: u32,
    /// Samples per 30-second window (`n_samples`); shorter audio is zero-padded to it.
    pub n_samples: usize,
}

impl Default for MelConfig {
    fn default() -> Self {
        MelConfig {
            n_fft: 400,
            hop_length: 160,
            n_mels: 80,
            sampling_rate: SAMPLE_RATE,
            n_samples: 480_000,
        }
    }
}

impl MelConfig {
    /// Reads `preprocessor_config.json` (fields missing there keep Whisper's defaults).
    pub fn from_json(value: &serde_json::Value) -> Result<MelConfig, String> {
        let d = MelConfig::default();
        let get = |key: &str, default: usize| -> Result<usize, String> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0 && n < 1 << 24)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("preprocessor_config.json: `{key}` must be a positive integer")),
            }
        };
        let config = MelConfig {
            n_fft: get("n_fft", d.n_fft)?,
            hop_length: get("hop_length", d.hop_length)?,
            n_mels: get("feature_size", d.n_mels)?,
            sampling_rate: get("sampling_rate", d.sampling_rate as usize)? as u32,
            n_samples: get("n_samples", d.n_samples)?,
        };
        if config.n_fft < 4 || config.n_samples < config.n_fft {
            return Err("preprocessor_config.json: n_fft and n_samples are inconsistent".into());
        }
        Ok(config)
    }

    /// Mel frames in one 30-second window (3000 for Whisper).
    pub fn frames_per_window(&self) -> usize {
        self.n_samples / self.hop_length
    }
}

/// A log-mel spectrogram, `[n_mels, frames]` row-major, as transformers returns
/// `input_features[0]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub values: Vec<f32>,
    pub n_mels: usize,
    pub frames: usize,
}

impl LogMel {
    /// A hash of the features (shape and exact values), the same on every run.
    pub fn content_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (self.n_mels, self.frames).hash(&mut h);
        for v in &self.values {
            v.to_bits().hash(&mut h);
        }
        h.finish()
    }

    /// Frames `start..start + len` as `[n_mels, len]`, zero where the spectrogram ends
    /// (the padding transformers gives the last window of long audio).
    pub fn window(&self, start: usize, len: usize) -> LogMel {
        let mut values = vec![0.0f32; self.n_mels * len];
        let end = (start + len).min(self.frames);
        if start < end {
            for m in 0..self.n_mels {
                let row = &self.values[m * self.frames..(m + 1) * self.frames];
                values[m * len..m * len + (end - start)].copy_from_slice(&row[start..end]);
            }
        }
        LogMel {
            values,
            n_mels: self.n_mels,
            frames: len,
        }
    }
}

/// Precomputed window, mel filters and FFT plan for one `MelConfig`.
pub struct MelExtractor {
    config: MelConfig,
    window: Vec<f64>,
    /// `[n_mels, n_fft / 2 + 1]`.
    filters: Vec<f64>,
    fft: Arc<dyn realfft::RealToComplex<f64>>,
}

impl MelExtractor {
    pub fn new(config: MelConfig) -> Self {
        let n = config.n_fft;
        // numpy's hanning(n + 1)[:-1]: the periodic window.
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let filters = slaney_mel_filters(n / 2 + 1, config.n_mels, 0.0, 8000.0, config.sampling_rate as f64);
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n);
        MelExtractor {
            config,
            window,
            filters,
            fft,
        }
    }

    pub fn config(&self) -> &MelConfig {
        &self.config
    }

    /// Features of one 30-second window: the audio is zero-padded (or cut) to
    /// `n_samples` first, giving exactly `frames_per_window()` frames.
    pub fn window_features(&self, samples: &[f32]) -> LogMel {
        let n = self.config.n_samples;
        self.features(&samples[..samples.len().min(n)], n)
    }

    /// Features of audio of any length (at least 30 s of it, zero-padded, as transformers
    /// does for long-form transcription with `truncation=False`): `len / hop_length`
    /// frames, normalized over the whole clip.
    pub fn long_features(&self, samples: &[f32]) -> LogMel {
        if samples.len() <= self.config.n_samples {
            return self.window_features(samples);
        }
        // Long audio is padded to a multiple of the hop, as padding="longest" does.
        let hop = self.config.hop_length;
        self.features(samples, samples.len().div_ceil(hop) * hop)
    }

    /// The features of `samples` followed by zeros up to `len` samples (the padding is
    /// read as zeros, never copied).
    fn features(&self, samples: &[f32], len: usize) -> LogMel {
        let n_fft = self.config.n_fft;
        let hop = self.config.hop_length;
        let half = n_fft / 2;
        let bins = n_fft / 2 + 1;
        // Reflect padding (numpy's "reflect": the edge sample is not repeated).
        let value = |j: usize| samples.get(j).map_or(0.0, |&v| v as f64);
        let at = |i: isize| -> f64 {
            let n = len as isize;
            let mut j = i;
            if n == 1 {
                return value(0);
            }
            // Reflect until inside; more than one bounce only for audio shorter than n_fft/2.
            loop {
                if j < 0 {
                    j = -j;
                } else if j >= n {
                    j = 2 * (n - 1) - j;
                } else {
                    return value(j as usize);
                }
            }
        };
        let padded_len = len + 2 * half;
        // transformers drops the last frame.
        let frames = (1 + (padded_len - n_fft) / hop) - 1;
        let mels = self.config.n_mels;
        let mut values = vec![0.0f32; mels * frames];
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut power = vec![0.0f64; bins];
        let mut column = vec![0.0f64; mels];
        let mut log_max = f32::NEG_INFINITY;
        for f in 0..frames {
            let start = (f * hop) as isize - half as isize;
            for (i, x) in input.iter_mut().enumerate() {
                *x = at(start + i as isize) * self.window[i];
            }
            self.fft
                .process(&mut input, &mut spectrum)
                .expect("FFT buffers of the planned size");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                // numpy keeps the spectrum as complex64 before squaring its magnitude.
                let (re, im) = (c.re as f32 as f64, c.im as f32 as f64);
                *p = re * re + im * im;
            }
            for (m, out) in column.iter_mut().enumerate() {
                let filter = &self.filters[m * bins..(m + 1) * bins];
                let mel: f64 = filter.iter().zip(&power).map(|(w, p)| w * p).sum();
                *out = mel.max(1e-10).log10();
            }
            for (m, &v) in column.iter().enumerate() {
                // The spectrogram is float32 before the clamp.
                let v = v as f32;
                values[m * frames + f] = v;
                log_max = log_max.max(v);
            }
        }
        for v in values.iter_mut() {
            *v = (v.max(log_max - 8.0) + 4.0) / 4.0;
        }
        LogMel {
            values,
            n_mels: mels,
            frames,
        }
    }
}

fn hertz_to_mel_slaney(hz: f64) -> f64 {
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= 1000.0 {
        15.0 + (hz / 1000.0).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hertz_slaney(mel: f64) -> f64 {
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= 15.0 {
        1000.0 * (logstep * (mel - 15.0)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Triangular filters spaced evenly on the Slaney mel scale, Slaney-normalized (each
/// filter's area is constant), `[n_mels, bins]` (transformers' `mel_filter_bank` with
/// `norm="slaney", mel_scale="slaney"`).
fn slaney_mel_filters(bins: usize, n_mels: usize, f_min: f64, f_max: f64, sampling_rate: f64) -> Vec<f64> {
    let (mel_min, mel_max) = (hertz_to_mel_slaney(f_min), hertz_to_mel_slaney(f_max));
    let filter_freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hertz_slaney(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let nyquist = (sampling_rate as usize / 2) as f64;
    let fft_freqs: Vec<f64> = (0..bins).map(|i| nyquist * i as f64 / (bins - 1) as f64).collect();
    let mut filters = vec![0.0f64; n_mels * bins];
    for m in 0..n_mels {
        let (lo, mid, hi) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (b, &f) in fft_freqs.iter().enumerate() {
            let down = (f - lo) / (mid - lo);
            let up = (hi - f) / (hi - mid);
            filters[m * bins + b] = down.min(up).max(0.0) * enorm;
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slaney_scale_round_trips_and_filters_cover_the_band() {
        for hz in [0.0, 500.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hertz_slaney(hertz_to_mel_slaney(hz)) - hz).abs() < 1e-9);
        }
        let filters = slaney_mel_filters(201, 80, 0.0, 8000.0, 16000.0);
        for m in 0..80 {
            assert!(
                filters[m * 201..(m + 1) * 201].iter().any(|&w| w > 0.0),
                "filter {m} is empty"
            );
        }
    }

    #[test]
    fn resampling_keeps_a_tone_and_its_timing() {
        let tone = |rate: u32, secs: f64, shift: f64| -> Vec<f32> {
            (0..(rate as f64 * secs) as usize)
                .map(|i| (2.0 * std::f64::consts::PI * 440.0 * (i as f64 + shift) / rate as f64).sin() as f32 * 0.5)
                .collect()
        };
        let out = resample(
            &Audio {
                samples: tone(44_100, 1.0, 0.0),
                sample_rate: 44_100,
            },
            16_000,
        );
        assert_eq!(out.samples.len(), 16_000);
        // Away from the edges the resampled tone is the tone at the new rate, at most
        // half an output sample (31 us) early or late.
        let error = |shift: f64| {
            let want = tone(16_000, 1.0, shift);
            out.samples[800..15_200]
                .iter()
                .zip(&want[800..15_200])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
        };
        let (best, shift) = (-50..=50)
            .map(|k| (error(k as f64 / 100.0), k as f64 / 100.0))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        assert!(
            best < 2e-3 && shift.abs() <= 0.5,
            "max error {best} at a shift of {shift} samples"
        );
    }

    #[test]
    fn streaming_resampling_equals_resampling_at_once() {
        let samples: Vec<f32> = (0..44_100).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let whole = resample(
            &Audio {
                samples: samples.clone(),
                sample_rate: 44_100,
            },
            16_000,
        )
        .samples;
        let mut streaming = StreamingResampler::new(44_100, 16_000);
        for piece in samples.chunks(777) {
            streaming.push(piece);
        }
        assert_eq!(streaming.finish(), whole);
    }

    #[test]
    fn silence_gives_the_floor_and_windows_pad_with_zeros() {
        let mel = MelExtractor::new(MelConfig::default()).window_features(&[0.0; 1000]);
        assert_eq!((mel.n_mels, mel.frames), (80, 3000));
        // log10(1e-10) = -10 everywhere; max - 8 clamps nothing; (-10 + 4) / 4 = -1.5.
        assert!(mel.values.iter().all(|&v| (v + 1.5).abs() < 1e-6));
        let w = mel.window(2990, 20);
        assert_eq!(w.frames, 20);
        assert_eq!(w.values[0], mel.values[2990]);
        assert_eq!(w.values[10], 0.0);
    }

    /// Found by `fuzz/run-all`: a WAV header declaring a zero sample rate makes
    /// symphonia 0.5 panic (`TimeBase::new`); the guard turns that into a refused file.
    #[test]
    fn a_wav_with_a_zero_sample_rate_is_refused() {
        let file = include_bytes!("../../fuzz/seeds/audio/wav-zero-rate.wav");
        assert!(matches!(decode(file, 30.0), Err(AudioError::Corrupt(_))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Real files with bytes overwritten and cut short: an error or audio with
        /// samples, never an endless loop or a panic that escapes `decode` (a panic inside
        /// symphonia is caught there and becomes an error, so this cannot tell one apart).
        #[test]
        fn damaged_files_never_panic(
            which in 0usize..4,
            in_header in proptest::prelude::any::<bool>(),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..16),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let files: [&[u8]; 4] = [
                include_bytes!("../../tests/fixtures/audio/jfk-5s.flac"),
                include_bytes!("../../tests/fixtures/audio/jfk-5s.ogg"),
                include_bytes!("../../tests/fixtures/audio/jfk-5s.mp3"),
                &include_bytes!("../../tests/fixtures/audio/jfk.wav")[..20_000],
            ];
            let mut bytes = files[which].to_vec();
            // Damage the container headers (the first 256 bytes) or anywhere.
            let span = if in_header { 256 } else { bytes.len() };
            for (at, value) in edits {
                let i = at.index(span);
                bytes[i] = value;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok(audio) = decode(&bytes, 60.0) {
                proptest::prop_assert!(!audio.samples.is_empty() && audio.sample_rate > 0);
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(decode(&[], 60.0), Err(AudioError::Empty));
        assert!(matches!(
            decode(b"definitely not audio", 60.0),
            Err(AudioError::Unsupported(_))
        ));
    }
}
