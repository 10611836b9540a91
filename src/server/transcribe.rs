//! `POST /v1/audio/transcriptions` and `/v1/audio/translations`: a multipart upload
//! decoded, resampled and turned into log-mel features off the reactor, then decoded by
//! the model's engine one 30-second window at a time (batched with other requests),
//! with transformers' timestamp-based seek between windows; answered as json, text,
//! verbose_json (segments), srt or vtt, or streamed as `transcript.text.delta` events.

use std::sync::Arc;

use bytes::Bytes;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::http::{json_response, read_body, sse_event, sse_response, text_response, HttpResponse};
use super::multipart::{self, Part};
use super::ServerState;
use crate::api::ApiError;
use crate::engine::sampling::SpeechRules;
use crate::engine::{EngineEvent, SamplingParams};
use crate::manager::{ModelLease, SpeechSettings};
use crate::media::audio::{self, AudioError, LogMel};
use crate::models::whisper::{self, split_segments};
use crate::models::EncoderInput;
use crate::text::IncrementalDetokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl Format {
    fn parse(value: &str) -> Result<Format, ApiError> {
        Ok(match value {
            "json" => Format::Json,
            "text" => Format::Text,
            "verbose_json" => Format::VerboseJson,
            "srt" => Format::Srt,
            "vtt" => Format::Vtt,
            other => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("`{other}` is not a response format (json, text, verbose_json, srt, vtt)"),
                ))
            }
        })
    }

    /// Formats that carry segment times.
    fn has_timestamps(self) -> bool {
        matches!(self, Format::VerboseJson | Format::Srt | Format::Vtt)
    }
}

/// A transcription request's form, validated.
struct Form {
    file: Vec<u8>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    temperature: f32,
    format: Format,
    stream: bool,
}

fn text_field(part: &Part) -> Result<String, ApiError> {
    String::from_utf8(part.data.clone())
        .map_err(|_| ApiError::invalid(part.name.clone(), format!("`{}` is not UTF-8 text", part.name)))
}

fn parse_form(parts: Vec<Part>, translate: bool) -> Result<Form, ApiError> {
    let mut form = Form {
        file: Vec::new(),
        model: None,
        language: None,
        prompt: None,
        temperature: 0.0,
        format: Format::Json,
        stream: false,
    };
    let mut seen: Vec<String> = Vec::new();
    let mut has_file = false;
    let mut granularities = Vec::new();
    for part in parts {
        let name = part.name.clone();
        let repeatable = name == "timestamp_granularities[]" || name == "include[]";
        if !repeatable && seen.contains(&name) {
            return Err(ApiError::invalid(
                name.clone(),
                format!("`{name}` is given more than once"),
            ));
        }
        seen.push(name.clone());
        match name.as_str() {
            "file" => {
                if part.filename.is_none() {
                    return Err(ApiError::invalid(
                        "file",
                        "`file` must be a file upload, not a text field",
                    ));
                }
                has_file = true;
                form.file = part.data;
            }
            "model" => form.model = Some(text_field(&part)?.trim().to_owned()).filter(|m| !m.is_empty()),
            "language" if !translate => {
                form.language = Some(text_field(&part)?.trim().to_ascii_lowercase()).filter(|l| !l.is_empty())
            }
            "prompt" => form.prompt = Some(text_field(&part)?),
            "temperature" => {
                let text = text_field(&part)?;
                form.temperature = text
                    .trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|t| (0.0..=1.0).contains(t))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "temperature",
                            format!("`temperature` must be a number in [0, 1], got `{text}`"),
                        )
                    })?;
            }
            "response_format" => form.format = Format::parse(text_field(&part)?.trim())?,
            "timestamp_granularities[]" | "timestamp_granularities" => granularities.push(text_field(&part)?),
            "stream" => {
                form.stream = match text_field(&part)?.trim() {
                    "true" | "True" | "1" => true,
                    "false" | "False" | "0" => false,
                    other => {
                        return Err(ApiError::invalid(
                            "stream",
                            format!("`stream` must be true or false, got `{other}`"),
                        ))
                    }
                }
            }
            "chunking_strategy" => {
                // Windows are always cut the way Whisper was trained (30 s, seeking on
                // timestamps): that is `auto`.
                if text_field(&part)?.trim() != "auto" {
                    return Err(ApiError::invalid(
                        "chunking_strategy",
                        "only `auto` chunking is supported",
                    ));
                }
            }
            other => {
                return Err(ApiError::invalid(
                    other.to_owned(),
                    format!(
                        "unknown field `{other}` for /v1/audio/{}",
                        if translate { "translations" } else { "transcriptions" }
                    ),
                ))
            }
        }
    }
    if !has_file {
        return Err(ApiError::invalid("file", "the form has no `file` upload"));
    }
    if form.file.is_empty() {
        return Err(ApiError::invalid("file", "the uploaded file is empty"));
    }
    for g in &granularities {
        match g.trim() {
            "segment" => {}
            "word" => {
                return Err(ApiError::invalid(
                    "timestamp_granularities[]",
                    "word timestamps are not supported; `segment` is",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    "timestamp_granularities[]",
                    format!("`{other}` is not a timestamp granularity (segment)"),
                ))
            }
        }
    }
    if !granularities.is_empty() && form.format != Format::VerboseJson {
        return Err(ApiError::invalid(
            "timestamp_granularities[]",
            "timestamp_granularities needs response_format `verbose_json`",
        ));
    }
    if form.stream && !matches!(form.format, Format::Json | Format::Text) {
        return Err(ApiError::invalid(
            "stream",
            "streaming is available for the json and text formats",
        ));
    }
    Ok(form)
}

impl From<AudioError> for ApiError {
    fn from(e: AudioError) -> Self {
        ApiError::invalid("file", e.to_string())
    }
}

/// Prompt text looked at (its end): far more than the 223 tokens a window keeps.
const PROMPT_TAIL_BYTES: usize = 8 * 1024;

/// The audio prepared for the model.
struct PreparedAudio {
    mel: LogMel,
    duration: f64,
}

fn prepare_audio(bytes: &[u8], speech: &SpeechSettings, max_secs: f64) -> Result<PreparedAudio, AudioError> {
    let audio = audio::decode_at_rate(bytes, speech.mel.config().sampling_rate, max_secs)?;
    let duration = audio.samples.len() as f64 / audio.sample_rate as f64;
    Ok(PreparedAudio {
        mel: speech.mel.long_features(&audio.samples),
        duration,
    })
}

/// One transcript segment, as verbose_json reports it.
struct Segment {
    seek: usize,
    start: f64,
    end: f64,
    text: String,
    tokens: Vec<u32>,
    avg_logprob: f64,
}

struct Job {
    prompt_ids: Vec<u32>,
    language: Option<u32>,
    translate: bool,
    timestamps: bool,
    temperature: f32,
    seed: Option<u64>,
}

/// Where streamed text goes. The deltas concatenate to the final (trimmed) text: the
/// leading space of the first is dropped.
struct DeltaSink<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    started: bool,
}

impl DeltaSink<'_> {
    /// Sends one SSE delta; false when the client has gone.
    async fn send(&mut self, delta: &str) -> bool {
        let delta = if self.started { delta } else { delta.trim_start() };
        if delta.is_empty() {
            return true;
        }
        self.started = true;
        let event = json!({"type": "transcript.text.delta", "delta": delta});
        self.tx.send(sse_event(&event.to_string())).await.is_ok()
    }
}

fn gone() -> ApiError {
    ApiError::bad_request("the client went away")
}

/// Decodes the whole audio, window after window. With `sink`, text deltas are sent as
/// they become final: token by token without timestamps, segment by segment with them
/// (text after a window's last timestamp pair is decoded again from there).
async fn transcribe(
    model: &ModelLease,
    speech: &SpeechSettings,
    mel: &LogMel,
    duration: f64,
    job: &Job,
    tx: Option<&mpsc::Sender<Bytes>>,
) -> Result<Vec<Segment>, ApiError> {
    let mut sink = tx.map(|tx| DeltaSink { tx, started: false });
    let generation = &speech.generation;
    let timestamp_begin = generation.timestamp_begin();
    let eos = generation.eos_token_id;
    let window = speech.mel.config().frames_per_window();
    let rules = Arc::new(SpeechRules::whisper(generation, job.timestamps));
    let tokenizer = model.tokenizer.clone();
    let decode = |ids: &[u32]| -> String {
        let text: Vec<u32> = ids.iter().copied().filter(|&t| t < eos).collect();
        tokenizer.decode(&text, true).unwrap_or_default()
    };
    let mut segments = Vec::new();
    let mut seek = 0;
    let (mut windows, max_windows) = (0, 2 * mel.frames.div_ceil(window) + 2);
    while seek < mel.frames {
        let frames = (mel.frames - seek).min(window);
        let prompt = generation.prompt(&job.prompt_ids, job.language, job.translate, job.timestamps);
        let params = SamplingParams {
            temperature: job.temperature,
            seed: job.seed,
            logprobs: Some(0),
            speech: Some(rules.clone()),
            ..SamplingParams::default()
        };
        let input = EncoderInput::Audio(Arc::new(mel.window(seek, window)));
        let mut stream = model.engine.submit_with_input(prompt, params, Some(input))?;
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut detok = IncrementalDetokenizer::new(true);
        let mut finished = false;
        while let Some(event) = stream.next().await {
            if sink.as_ref().is_some_and(|s| s.tx.is_closed()) {
                return Err(gone());
            }
            match event {
                EngineEvent::Token {
                    token, logprobs: lp, ..
                } => {
                    tokens.push(token);
                    logprobs.push(lp.map_or(0.0, |l| l.logprob as f64));
                    if let (Some(sink), false, true) = (sink.as_mut(), job.timestamps, token < eos) {
                        let delta = detok.push(&tokenizer, token).unwrap_or_default();
                        if !sink.send(&delta).await {
                            return Err(gone());
                        }
                    }
                }
                EngineEvent::Finished { .. } => {
                    finished = true;
                    break;
                }
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Failed(e) => return Err(ApiError::internal(format!("transcription failed: {e}"))),
            }
        }
        if !finished {
            return Err(ApiError::internal(
                "the engine stopped before the transcription was complete",
            ));
        }
        if tokens.last() == Some(&eos) {
            tokens.pop();
            logprobs.pop();
        }
        let mean = |lp: &[f64]| {
            if lp.is_empty() {
                0.0
            } else {
                lp.iter().sum::<f64>() / lp.len() as f64
            }
        };
        if !job.timestamps {
            if let Some(sink) = sink.as_mut() {
                if !sink.send(&detok.flush(&tokenizer).unwrap_or_default()).await {
                    return Err(gone());
                }
            }
            segments.push(Segment {
                seek,
                start: 0.0,
                end: duration,
                text: decode(&tokens),
                avg_logprob: mean(&logprobs),
                tokens,
            });
            break;
        }
        let (found, advance) = split_segments(&tokens, timestamp_begin, seek, frames);
        let mut offset = 0;
        for s in found {
            let lp = &logprobs[offset..offset + s.tokens.len()];
            offset += s.tokens.len();
            let text = decode(&s.tokens);
            // Segments with no text (a lone timestamp pair) say nothing.
            if text.trim().is_empty() {
                continue;
            }
            if let Some(sink) = sink.as_mut() {
                if !sink.send(&text).await {
                    return Err(gone());
                }
            }
            segments.push(Segment {
                seek: s.seek,
                start: s.start,
                end: s.end.min(duration.max(s.start)),
                text,
                avg_logprob: mean(lp),
                tokens: s.tokens,
            });
        }
        // Bounded work: a window that would not move goes on anyway, and past twice the
        // windows the audio holds (a model seeking back and forth in tiny steps) every
        // window is taken whole.
        windows += 1;
        seek += if windows > max_windows { frames } else { advance.max(1) };
    }
    if !job.timestamps {
        segments.retain(|s| !s.text.trim().is_empty());
    }
    Ok(segments)
}

fn clock(seconds: f64, decimal: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{decimal}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn srt(segments: &[Segment]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            i + 1,
            clock(s.start, ','),
            clock(s.end, ','),
            s.text.trim()
        ));
    }
    out
}

fn vtt(segments: &[Segment]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for s in segments {
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            clock(s.start, '.'),
            clock(s.end, '.'),
            s.text.trim()
        ));
    }
    out
}

/// Seconds billed, as OpenAI reports whisper usage.
fn usage(duration: f64) -> Value {
    json!({"type": "duration", "seconds": duration.ceil() as u64})
}

/// The model named by the form, loaded, which must be a speech model.
async fn speech_model(
    state: &ServerState,
    requested: Option<&str>,
) -> Result<(ModelLease, Arc<SpeechSettings>), ApiError> {
    let model = state.models.acquire(requested).await?;
    match model.speech.clone() {
        Some(speech) => Ok((model, speech)),
        None => Err(ApiError {
            code: Some("model_not_supported"),
            ..ApiError::invalid(
                "model",
                format!(
                    "`{}` is a text model; transcription needs a speech-to-text model (such as openai/whisper-tiny.en)",
                    model.name
                ),
            )
        }),
    }
}

pub async fn handle(
    state: Arc<ServerState>,
    req: Request<Incoming>,
    translate: bool,
) -> Result<HttpResponse, ApiError> {
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let boundary = multipart::boundary(&content_type).ok_or_else(|| {
        ApiError::bad_request(format!(
            "send the audio as multipart/form-data (with a `file` upload and a `model` field), not `{}`",
            if content_type.is_empty() {
                "no content type"
            } else {
                &content_type
            }
        ))
    })?;
    let body = read_body(req.into_body(), state.max_audio_bytes, state.read_timeout).await?;
    let parts = multipart::parse(&body, &boundary)
        .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
    drop(body);
    let form = parse_form(parts, translate)?;
    let (model, speech) = speech_model(&state, form.model.as_deref()).await?;
    let generation = &speech.generation;
    if translate && !generation.is_multilingual {
        return Err(ApiError::invalid(
            "model",
            format!(
                "`{}` is English-only; translation needs a multilingual Whisper model",
                model.name
            ),
        ));
    }
    let language = match (&form.language, generation.is_multilingual) {
        (None, _) => None,
        (Some(l), false) if l == "en" || l == "english" => None,
        (Some(l), false) => {
            return Err(ApiError::invalid(
                "language",
                format!("`{}` is English-only; it cannot transcribe language `{l}`", model.name),
            ))
        }
        (Some(l), true) => Some(
            generation
                .lang_to_id
                .iter()
                .find(|(code, _)| code == l)
                .map(|&(_, id)| id)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "language",
                        format!("`{l}` is not a language this model knows (ISO-639-1 codes such as `en`, `de`)"),
                    )
                })?,
        ),
    };
    // A text prompt conditions the decoder as previous text would: the last
    // `max_target_positions / 2 - 1` of its tokens.
    let prompt_ids = match form.prompt.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        Some(p) => {
            // Only the end is kept: tokenize no more text than could be kept.
            let mut start = p.len().saturating_sub(PROMPT_TAIL_BYTES);
            while !p.is_char_boundary(start) {
                start += 1;
            }
            let ids = model
                .tokenizer
                .encode(&format!(" {}", &p[start..]), false)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
            if ids.iter().any(|&t| t >= generation.eos_token_id) {
                return Err(ApiError::invalid("prompt", "the prompt may not contain special tokens"));
            }
            let keep = (model.engine.max_model_len() / 2).saturating_sub(1);
            ids[ids.len().saturating_sub(keep)..].to_vec()
        }
        None => Vec::new(),
    };
    let max_secs = state.max_audio_seconds;
    let (file, settings) = (form.file, speech.clone());
    // Decoding and features take CPU and up to a few hundred MB for long audio: a few
    // at a time, the rest wait their turn.
    let permit = super::media_permits()
        .acquire()
        .await
        .map_err(|_| ApiError::internal("audio preparation is shut down"))?;
    let audio = tokio::task::spawn_blocking(move || prepare_audio(&file, &settings, max_secs))
        .await
        .map_err(|e| ApiError::internal(format!("audio preparation failed: {e}")))??;
    drop(permit);
    let long = audio.mel.frames > speech.mel.config().frames_per_window();
    let language = match (language, generation.is_multilingual) {
        (None, true) => Some(detect_language(&model, &speech, &audio.mel).await?),
        (l, _) => l,
    };
    let job = Job {
        prompt_ids,
        language,
        translate,
        timestamps: form.format.has_timestamps() || long,
        temperature: form.temperature,
        seed: state.default_seed,
    };
    // Named as OpenAI's verbose_json does ("english"); a code Whisper does not list
    // stays a code.
    let code = language.map_or("en", |id| generation.language_code(id).unwrap_or_default());
    let language_name = whisper::language_name(code).unwrap_or(code).to_owned();
    if form.stream {
        let (response, tx) = sse_response();
        tokio::spawn(async move {
            let result = transcribe(&model, &speech, &audio.mel, audio.duration, &job, Some(&tx)).await;
            let last = match result {
                Ok(segments) => {
                    let text: String = segments.iter().map(|s| s.text.as_str()).collect();
                    json!({"type": "transcript.text.done", "text": text.trim(), "usage": usage(audio.duration)})
                }
                Err(e) => e.to_json(),
            };
            if tx.send(sse_event(&last.to_string())).await.is_ok() {
                let _ = tx.send(sse_event("[DONE]")).await;
            }
        });
        return Ok(response);
    }
    let segments = transcribe(&model, &speech, &audio.mel, audio.duration, &job, None).await?;
    let text: String = segments.iter().map(|s| s.text.as_str()).collect();
    let text = text.trim();
    Ok(match form.format {
        Format::Json => json_response(StatusCode::OK, &json!({"text": text, "usage": usage(audio.duration)})),
        Format::Text => text_response(StatusCode::OK, "text/plain; charset=utf-8", format!("{text}\n")),
        Format::Srt => text_response(StatusCode::OK, "text/plain; charset=utf-8", srt(&segments)),
        Format::Vtt => text_response(StatusCode::OK, "text/vtt; charset=utf-8", vtt(&segments)),
        Format::VerboseJson => {
            let round = |t: f64| (t * 100.0).round() / 100.0;
            let segments: Vec<Value> = segments
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "id": i,
                        "seek": s.seek,
                        "start": round(s.start),
                        "end": round(s.end),
                        "text": s.text,
                        "tokens": s.tokens,
                        "temperature": job.temperature,
                        "avg_logprob": s.avg_logprob,
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "task": if translate { "translate" } else { "transcribe" },
                    "language": language_name,
                    "duration": round(audio.duration),
                    "text": text,
                    "segments": segments,
                    "usage": usage(audio.duration),
                }),
            )
        }
    })
}

/// A multilingual model's language guess for the first window: the likeliest language
/// token after `<|startoftranscript|>` (as transformers' `detect_language`).
async fn detect_language(model: &ModelLease, speech: &SpeechSettings, mel: &LogMel) -> Result<u32, ApiError> {
    let (prompt, languages) = speech
        .generation
        .language_detection()
        .ok_or_else(|| ApiError::invalid("language", "this model lists no languages: give `language`"))?;
    let params = SamplingParams::likeliest_of(&languages);
    let window = EncoderInput::Audio(Arc::new(mel.window(0, speech.mel.config().frames_per_window())));
    let mut stream = model.engine.submit_with_input(prompt, params, Some(window))?;
    match stream.next().await {
        Some(EngineEvent::Token { token, .. }) => Ok(token),
        Some(EngineEvent::Failed(e)) => Err(ApiError::internal(format!("language detection failed: {e}"))),
        Some(EngineEvent::Finished { .. } | EngineEvent::PromptLogprobs(_)) | None => {
            Err(ApiError::internal("language detection produced no token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtitle_clocks() {
        assert_eq!(clock(0.0, ','), "00:00:00,000");
        assert_eq!(clock(3725.4567, '.'), "01:02:05.457");
    }
}
