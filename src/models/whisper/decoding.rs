//! How Whisper decodes, as transformers' Whisper `generate` does: its languages, the
//! decoding settings of a checkpoint (prompt, special tokens, suppressions, timestamp
//! rules' parameters), and the segment / seek rule that cuts a window's output.

use std::path::Path;

use crate::models::config::{read_json, ConfigError};

/// Whisper's languages: ISO 639-1 code (as in `<|en|>`) and the name OpenAI's
/// verbose_json reports, in Whisper's token order.
pub const LANGUAGES: &[(&str, &str)] = &[
    ("en", "english"),
    ("zh", "chinese"),
    ("de", "german"),
    ("es", "spanish"),
    ("ru", "russian"),
    ("ko", "korean"),
    ("fr", "french"),
    ("ja", "japanese"),
    ("pt", "portuguese"),
    ("tr", "turkish"),
    ("pl", "polish"),
    ("ca", "catalan"),
    ("nl", "dutch"),
    ("ar", "arabic"),
    ("sv", "swedish"),
    ("it", "italian"),
    ("id", "indonesian"),
    ("hi", "hindi"),
    ("fi", "finnish"),
    ("vi", "vietnamese"),
    ("he", "hebrew"),
    ("uk", "ukrainian"),
    ("el", "greek"),
    ("ms", "malay"),
    ("cs", "czech"),
    ("ro", "romanian"),
    ("da", "danish"),
    ("hu", "hungarian"),
    ("ta", "tamil"),
    ("no", "norwegian"),
    ("th", "thai"),
    ("ur", "urdu"),
    ("hr", "croatian"),
    ("bg", "bulgarian"),
    ("lt", "lithuanian"),
    ("la", "latin"),
    ("mi", "maori"),
    ("ml", "malayalam"),
    ("cy", "welsh"),
    ("sk", "slovak"),
    ("te", "telugu"),
    ("fa", "persian"),
    ("lv", "latvian"),
    ("bn", "bengali"),
    ("sr", "serbian"),
    ("az", "azerbaijani"),
    ("sl", "slovenian"),
    ("kn", "kannada"),
    ("et", "estonian"),
    ("mk", "macedonian"),
    ("br", "breton"),
    ("eu", "basque"),
    ("is", "icelandic"),
    ("hy", "armenian"),
    ("ne", "nepali"),
    ("mn", "mongolian"),
    ("bs", "bosnian"),
    ("kk", "kazakh"),
    ("sq", "albanian"),
    ("sw", "swahili"),
    ("gl", "galician"),
    ("mr", "marathi"),
    ("pa", "punjabi"),
    ("si", "sinhala"),
    ("km", "khmer"),
    ("sn", "shona"),
    ("yo", "yoruba"),
    ("so", "somali"),
    ("af", "afrikaans"),
    ("oc", "occitan"),
    ("ka", "georgian"),
    ("be", "belarusian"),
    ("tg", "tajik"),
    ("sd", "sindhi"),
    ("gu", "gujarati"),
    ("am", "amharic"),
    ("yi", "yiddish"),
    ("lo", "lao"),
    ("uz", "uzbek"),
    ("fo", "faroese"),
    ("ht", "haitian creole"),
    ("ps", "pashto"),
    ("tk", "turkmen"),
    ("nn", "nynorsk"),
    ("mt", "maltese"),
    ("sa", "sanskrit"),
    ("lb", "luxembourgish"),
    ("my", "myanmar"),
    ("bo", "tibetan"),
    ("tl", "tagalog"),
    ("mg", "malagasy"),
    ("as", "assamese"),
    ("tt", "tatar"),
    ("haw", "hawaiian"),
    ("ln", "lingala"),
    ("ha", "hausa"),
    ("ba", "bashkir"),
    ("jw", "javanese"),
    ("su", "sundanese"),
    ("yue", "cantonese"),
];

/// The name of a language code (`en` -> `english`).
pub fn language_name(code: &str) -> Option<&'static str> {
    LANGUAGES.iter().find(|(c, _)| *c == code).map(|&(_, name)| name)
}

/// Seconds per timestamp token step (and per encoder position).
pub const TIME_PRECISION: f64 = 0.02;
/// Mel frames per encoder position (the second convolution's stride).
pub const INPUT_STRIDE: usize = 2;

/// The decoding settings of a Whisper checkpoint (`generation_config.json` plus the
/// tokenizer's special tokens), and the prompt and segment rules transformers' Whisper
/// `generate` applies.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperGeneration {
    pub decoder_start_token_id: u32,
    pub eos_token_id: u32,
    pub no_timestamps_token_id: u32,
    /// `<|startofprev|>`, before a text prompt.
    pub prev_sot_token_id: Option<u32>,
    pub suppress_tokens: Vec<u32>,
    pub begin_suppress_tokens: Vec<u32>,
    pub max_initial_timestamp_index: Option<u32>,
    pub is_multilingual: bool,
    /// Language code (`en`) -> token id, for multilingual checkpoints.
    pub lang_to_id: Vec<(String, u32)>,
    pub transcribe_token_id: Option<u32>,
    pub translate_token_id: Option<u32>,
}

impl WhisperGeneration {
    /// Reads `generation_config.json` from a Whisper checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("generation_config.json");
        let value: serde_json::Value = read_json(&path)?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.clone(),
            reason,
        };
        let id = |key: &str| value.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let ids = |key: &str| -> Vec<u32> {
            value
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect())
                .unwrap_or_default()
        };
        let table = |key: &str| -> Vec<(String, u32)> {
            value
                .get(key)
                .and_then(|v| v.as_object())
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let lang_to_id = table("lang_to_id")
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("<|").trim_end_matches("|>").to_owned(), v))
            .collect();
        let tasks = table("task_to_id");
        let task = |name: &str| tasks.iter().find(|(k, _)| k == name).map(|&(_, v)| v);
        let eos = match value.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
            Some(v) => v.as_u64().map(|v| v as u32),
            None => None,
        };
        Ok(WhisperGeneration {
            decoder_start_token_id: id("decoder_start_token_id")
                .ok_or_else(|| invalid("`decoder_start_token_id` is missing".into()))?,
            eos_token_id: eos.ok_or_else(|| invalid("`eos_token_id` is missing".into()))?,
            no_timestamps_token_id: id("no_timestamps_token_id")
                .ok_or_else(|| invalid("`no_timestamps_token_id` is missing".into()))?,
            prev_sot_token_id: id("prev_sot_token_id"),
            suppress_tokens: ids("suppress_tokens"),
            begin_suppress_tokens: ids("begin_suppress_tokens"),
            max_initial_timestamp_index: id("max_initial_timestamp_index"),
            is_multilingual: value.get("is_multilingual").and_then(|v| v.as_bool()).unwrap_or(false),
            lang_to_id,
            transcribe_token_id: task("transcribe"),
            translate_token_id: task("translate"),
        })
    }

    /// The first timestamp token, `<|0.00|>`.
    pub fn timestamp_begin(&self) -> u32 {
        self.no_timestamps_token_id + 1
    }

    /// What detects a multilingual model's language, as transformers' `detect_language`:
    /// the prompt (`<|startoftranscript|>`), then one greedy token among the language
    /// tokens returned. `None` when the model lists no languages.
    pub fn language_detection(&self) -> Option<(Vec<u32>, Vec<u32>)> {
        if self.lang_to_id.is_empty() {
            return None;
        }
        let languages = self.lang_to_id.iter().map(|&(_, id)| id).collect();
        Some((vec![self.decoder_start_token_id], languages))
    }

    /// The language code of a language token.
    pub fn language_code(&self, id: u32) -> Option<&str> {
        self.lang_to_id
            .iter()
            .find(|&&(_, i)| i == id)
            .map(|(code, _)| code.as_str())
    }

    /// The decoder prompt of one window: `[<|startofprev|> prompt…]`, `<|startoftranscript|>`,
    /// then for multilingual models the language and task, and `<|notimestamps|>` unless
    /// timestamps are wanted.
    pub fn prompt(&self, text_prompt: &[u32], language: Option<u32>, translate: bool, timestamps: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if let (Some(prev), false) = (self.prev_sot_token_id, text_prompt.is_empty()) {
            ids.push(prev);
            ids.extend_from_slice(text_prompt);
        }
        ids.push(self.decoder_start_token_id);
        if self.is_multilingual {
            if let Some(lang) = language {
                ids.push(lang);
            }
            let task = if translate {
                self.translate_token_id
            } else {
                self.transcribe_token_id
            };
            ids.extend(task);
        }
        if !timestamps {
            ids.push(self.no_timestamps_token_id);
        }
        ids
    }
}

/// One stretch of transcript with its times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Generated ids of the segment (timestamps included, as transformers returns them).
    pub tokens: Vec<u32>,
    pub start: f64,
    pub end: f64,
    /// Mel frame where the window that produced it began.
    pub seek: usize,
}

/// Splits one window's generated ids (EOS stripped) into segments at consecutive
/// timestamp pairs, and says how many mel frames to advance: the whole window when it
/// ended on a single timestamp or had no pair, else up to the last pair's timestamp
/// (the text after it is decoded again from there). As transformers'
/// `_retrieve_segment`. `window_frames`: the frames of this window that hold audio.
pub fn split_segments(ids: &[u32], timestamp_begin: u32, seek: usize, window_frames: usize) -> (Vec<Segment>, usize) {
    let time_offset = seek as f64 * TIME_PRECISION / INPUT_STRIDE as f64;
    let is_ts = |t: u32| t >= timestamp_begin;
    let at = |t: u32| t.saturating_sub(timestamp_begin) as f64 * TIME_PRECISION;
    let n = ids.len();
    let single_end = n >= 2 && !is_ts(ids[n - 2]) && is_ts(ids[n - 1]);
    let mut cuts: Vec<usize> = (0..n.saturating_sub(1))
        .filter(|&i| is_ts(ids[i]) && is_ts(ids[i + 1]))
        .map(|i| i + 1)
        .collect();
    if cuts.is_empty() {
        let last_ts = ids.iter().rev().copied().find(|&t| is_ts(t));
        let positions = match last_ts {
            Some(t) if t != timestamp_begin => (t - timestamp_begin) as f64,
            _ => (window_frames / INPUT_STRIDE) as f64,
        };
        let segment = Segment {
            tokens: ids.to_vec(),
            start: time_offset,
            end: time_offset + positions * TIME_PRECISION,
            seek,
        };
        return (vec![segment], window_frames);
    }
    if single_end {
        cuts.push(n);
    } else if let Some(last) = cuts.last_mut() {
        *last += 1;
    }
    let mut segments = Vec::with_capacity(cuts.len());
    let mut from = 0;
    for (k, &cut) in cuts.iter().enumerate() {
        let tokens = &ids[from..cut];
        let end_token = if k + 1 == cuts.len() && !single_end {
            tokens[tokens.len() - 2]
        } else {
            tokens[tokens.len() - 1]
        };
        segments.push(Segment {
            tokens: tokens.to_vec(),
            start: time_offset + at(tokens[0]),
            end: time_offset + at(end_token),
            seek,
        });
        from = cut;
    }
    let advance = if single_end {
        window_frames
    } else {
        ids[cuts[cuts.len() - 1] - 2].saturating_sub(timestamp_begin) as usize * INPUT_STRIDE
    };
    (segments, advance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_timestamp_pairs() {
        let tb = 100;
        // <|0.00|> a b <|8.00|><|8.00|> c <|11.00|>: ends on a single timestamp.
        let ids = [tb, 1, 2, tb + 400, tb + 400, 3, tb + 550];
        let (segs, advance) = split_segments(&ids, tb, 0, 3000);
        assert_eq!(advance, 3000);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].start, segs[0].end), (0.0, 8.0));
        assert_eq!(segs[0].tokens, vec![tb, 1, 2, tb + 400]);
        assert_eq!((segs[1].start, segs[1].end), (8.0, 11.0));
        // Ending on a pair: seek to its time; the offset of the window carries through.
        let ids = [tb, 1, tb + 100, tb + 100, 2, tb + 200, tb + 200];
        let (segs, advance) = split_segments(&ids, tb, 1000, 3000);
        assert_eq!(advance, 200 * 2);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[1].start, segs[1].end), (12.0, 14.0));
        // Text cut off after a pair is dropped (decoded again from the pair).
        let ids = [tb, 1, tb + 100, tb + 100, 2, 3];
        let (segs, advance) = split_segments(&ids, tb, 0, 3000);
        assert_eq!((segs.len(), advance), (1, 200));
        // No pair at all: one segment over the window.
        let (segs, advance) = split_segments(&[5, 6], tb, 0, 1234);
        assert_eq!((segs.len(), advance, segs[0].end), (1, 1234, 617.0 * 0.02));
    }
}
