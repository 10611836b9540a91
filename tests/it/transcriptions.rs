//! `/v1/audio/transcriptions` over HTTP with Whisper tiny.en: jfk.wav in every response
//! format and streamed, equal to transformers' transcript (the `text` field trimmed, as
//! OpenAI returns it); 45 s of audio transcribed in windows with the segments and seek
//! of transformers' long-form generate; other sample rates and channel counts; and every
//! bad request answered with a 400 in the OpenAI error shape.

use serde_json::Value;

use crate::common::{golden, ids};
use crate::server::{Response, Server};
use crate::whisper::{jfk, long45};

const WHISPER: &str = "openai/whisper-tiny.en";

/// 16-bit PCM WAV bytes of interleaved samples.
pub fn wav(samples: &[f32], rate: u32, channels: u16) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    out.extend_from_slice(&(channels * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes());
    }
    out
}

/// A multipart form: `(name, filename, bytes)` per part.
pub fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "inferd-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn transcribe(server: &Server, audio: &[u8], fields: &[(&str, &str)]) -> Response {
    let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![("file", Some("audio.wav"), audio)];
    parts.extend(fields.iter().map(|(k, v)| (*k, None, v.as_bytes())));
    let (content_type, body) = form(&parts);
    server.request_bytes(
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", &content_type)],
        &body,
    )
}

fn jfk_wav() -> Vec<u8> {
    std::fs::read(crate::common::repo_root().join("tests/fixtures/audio/jfk.wav")).unwrap()
}

#[test]
fn jfk_in_every_format_and_streamed() {
    let g = golden("whisper.json");
    let want = g["greedy"]["text"].as_str().unwrap().trim();
    let server = Server::start_model(WHISPER, &[]);
    let audio = jfk_wav();

    let r = transcribe(&server, &audio, &[("model", WHISPER)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["text"], want);
    assert_eq!(body["usage"], serde_json::json!({"type": "duration", "seconds": 11}));

    let r = transcribe(&server, &audio, &[("model", WHISPER), ("response_format", "text")]);
    assert_eq!((r.status, r.body.as_str()), (200, format!("{want}\n").as_str()));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));

    // verbose_json: the segments of transformers' return_timestamps=True decode.
    let r = transcribe(
        &server,
        &audio,
        &[
            ("model", WHISPER),
            ("response_format", "verbose_json"),
            ("timestamp_granularities[]", "segment"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(
        (body["task"].as_str(), body["language"].as_str()),
        (Some("transcribe"), Some("english"))
    );
    assert_eq!(body["duration"], 11.0);
    let segments = body["segments"].as_array().unwrap();
    let offsets = g["greedy_timestamps"]["offsets"].as_array().unwrap();
    assert_eq!(segments.len(), offsets.len());
    let mut all_tokens = Vec::new();
    for (i, (s, o)) in segments.iter().zip(offsets).enumerate() {
        assert_eq!(s["id"], i);
        assert_eq!(s["text"], o["text"]);
        assert_eq!(s["start"].as_f64(), o["timestamp"][0].as_f64());
        assert_eq!(s["end"].as_f64(), o["timestamp"][1].as_f64());
        assert!(s["avg_logprob"].as_f64().unwrap() < 0.0);
        all_tokens.extend(ids(&s["tokens"]));
    }
    // Segments share their boundary timestamps; without the repeats they are the ids.
    all_tokens.dedup();
    let mut want_ids = ids(&g["greedy_timestamps"]["ids"]);
    want_ids.dedup();
    assert_eq!(all_tokens, want_ids);

    let r = transcribe(&server, &audio, &[("model", WHISPER), ("response_format", "srt")]);
    assert_eq!(
        r.body,
        "1\n00:00:00,000 --> 00:00:08,000\nAnd so my fellow Americans ask not what your country can do for you\n\n\
         2\n00:00:08,000 --> 00:00:11,000\nask what you can do for your country.\n\n"
    );
    let r = transcribe(&server, &audio, &[("model", WHISPER), ("response_format", "vtt")]);
    assert_eq!(
        r.body,
        "WEBVTT\n\n00:00:00.000 --> 00:00:08.000\nAnd so my fellow Americans ask not what your country can do for you\n\n\
         00:00:08.000 --> 00:00:11.000\nask what you can do for your country.\n\n"
    );

    // Streamed: deltas that add up to the text, then `done`, then [DONE].
    let r = transcribe(&server, &audio, &[("model", WHISPER), ("stream", "true")]);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (done, deltas) = parsed.split_last().unwrap();
    assert!(deltas.len() > 5, "one delta per word or so");
    let joined: String = deltas
        .iter()
        .map(|d| {
            assert_eq!(d["type"], "transcript.text.delta");
            d["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(joined, want);
    assert_eq!(
        (done["type"].as_str(), done["text"].as_str()),
        (Some("transcript.text.done"), Some(want))
    );

    // A prompt conditions the decoder (and is not part of the transcript).
    let r = transcribe(
        &server,
        &audio,
        &[("model", WHISPER), ("prompt", "President Kennedy's inaugural address.")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["text"]
        .as_str()
        .unwrap()
        .contains("ask not what your country can do for you"));

    // Other rates and channel counts: 44.1 kHz stereo (resampled and mixed down), 8 kHz.
    let speech = jfk();
    let up = inferd::media::audio::resample(
        &inferd::media::audio::Audio {
            samples: speech.clone(),
            sample_rate: 16_000,
        },
        44_100,
    );
    let stereo: Vec<f32> = up.samples.iter().flat_map(|&s| [s, s]).collect();
    let r = transcribe(&server, &wav(&stereo, 44_100, 2), &[("model", WHISPER)]);
    assert_eq!(
        (r.status, r.json()["text"].as_str()),
        (200, Some(want)),
        "44.1 kHz stereo"
    );

    // The engine is idle and its KV blocks are all free afterwards (the engine thread
    // publishes its gauges after the step that sent the last reply: poll briefly).
    let start = std::time::Instant::now();
    loop {
        let metrics = server.request("GET", "/metrics", &[], None).body;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("inferd_kv_blocks_used"))
            .unwrap()
            .to_owned();
        if line.ends_with(" 0") {
            break;
        }
        assert!(start.elapsed().as_secs() < 10, "{line}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn long_audio_goes_window_by_window_like_transformers() {
    let g = golden("whisper.json");
    let server = Server::start_model(WHISPER, &[]);
    let audio = wav(&long45(&jfk()), 16_000, 1);
    let r = transcribe(
        &server,
        &audio,
        &[("model", WHISPER), ("response_format", "verbose_json")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["duration"], 45.0);
    assert_eq!(body["text"].as_str(), g["long45"]["text"].as_str().map(str::trim));
    let segments = body["segments"].as_array().unwrap();
    let offsets = g["long45"]["offsets"].as_array().unwrap();
    assert_eq!(segments.len(), offsets.len(), "{segments:#?}");
    let mut last_end = 0.0;
    for (s, o) in segments.iter().zip(offsets) {
        assert_eq!(s["text"], o["text"]);
        let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
        assert!(
            (start - o["timestamp"][0].as_f64().unwrap()).abs() < 0.006,
            "{s} vs {o}"
        );
        assert!((end - o["timestamp"][1].as_f64().unwrap()).abs() < 0.006, "{s} vs {o}");
        assert!(start >= last_end - 1e-9 && end >= start, "monotonic: {s}");
        last_end = end;
    }
    // The second window began where the first one's last timestamp pair said (29.0 s).
    assert!(segments.iter().any(|s| s["seek"] == 2900), "{segments:#?}");
    // srt numbering and clocks run in order; vtt has its header.
    let srt = transcribe(&server, &audio, &[("model", WHISPER), ("response_format", "srt")]).body;
    let blocks: Vec<&str> = srt.trim_end().split("\n\n").collect();
    assert_eq!(blocks.len(), offsets.len());
    for (i, b) in blocks.iter().enumerate() {
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines[0], (i + 1).to_string());
        let (a, z) = lines[1].split_once(" --> ").unwrap();
        assert!(
            a.len() == 12 && z.len() == 12 && a <= z && a.as_bytes()[8] == b',',
            "{b}"
        );
    }
    // Streamed, long audio arrives segment by segment: nothing re-decoded is sent twice.
    let events = transcribe(&server, &audio, &[("model", WHISPER), ("stream", "true")]).events();
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (done, deltas) = parsed.split_last().unwrap();
    assert_eq!(deltas.len(), offsets.len());
    let joined: String = deltas.iter().map(|d| d["delta"].as_str().unwrap()).collect();
    assert_eq!(Some(joined.as_str()), body["text"].as_str());
    assert_eq!(done["text"], body["text"]);
    let vtt = transcribe(&server, &audio, &[("model", WHISPER), ("response_format", "vtt")]).body;
    assert!(vtt.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:08.000\n"), "{vtt}");
    assert_eq!(vtt.matches(" --> ").count(), offsets.len());
}

fn assert_400(r: &Response, param: Option<&str>, needle: &str) {
    assert_eq!(r.status, 400, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{}", r.body);
    assert_eq!(e["param"].as_str(), param, "{}", r.body);
    assert!(
        e["message"].as_str().unwrap().contains(needle),
        "`{needle}` not in {}",
        r.body
    );
}

#[test]
fn bad_transcription_requests_are_400s() {
    let server = Server::launch(&["--max-audio-seconds", "5", "--max-audio-bytes", "300000"], &[]);
    let audio = jfk_wav();
    let short = wav(&jfk()[..16_000 * 3], 16_000, 1);
    let post = |parts: &[(&str, Option<&str>, &[u8])]| {
        let (ct, body) = form(parts);
        server.request_bytes("POST", "/v1/audio/transcriptions", &[("content-type", &ct)], &body)
    };
    let m = WHISPER.as_bytes();
    assert_400(&post(&[("model", None, m)]), Some("file"), "no `file`");
    assert_400(
        &post(&[("model", None, m), ("file", None, b"notafile")]),
        Some("file"),
        "file upload",
    );
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), b"")]),
        Some("file"),
        "empty",
    );
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), b"this is not audio at all")]),
        Some("file"),
        "not audio",
    );
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), &audio[..44])]),
        Some("file"),
        "could not be decoded",
    );
    let six_seconds = wav(&jfk()[..16_000 * 6], 16_000, 1);
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), &six_seconds)]),
        Some("file"),
        "longer than the limit of 5 s",
    );
    // jfk.wav (352 kB) is over this server's upload limit.
    let r = post(&[("model", None, m), ("file", Some("a.wav"), &audio)]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("300000 bytes"),
        "{}",
        r.body
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), &short),
            ("prompt", None, b"Hi <|endoftext|> there"),
        ]),
        Some("prompt"),
        "special tokens",
    );
    let absurd_rate = wav(&jfk()[..16_000], 1_000_000, 1);
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), &absurd_rate)]),
        Some("file"),
        "1000000 Hz",
    );
    let s = short.as_slice();
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), s), ("foo", None, b"bar")]),
        Some("foo"),
        "unknown field",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("response_format", None, b"xml"),
        ]),
        Some("response_format"),
        "xml",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("temperature", None, b"5"),
        ]),
        Some("temperature"),
        "[0, 1]",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("stream", None, b"maybe"),
        ]),
        Some("stream"),
        "true or false",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("response_format", None, b"verbose_json"),
            ("timestamp_granularities[]", None, b"word"),
        ]),
        Some("timestamp_granularities[]"),
        "word timestamps",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("timestamp_granularities[]", None, b"segment"),
        ]),
        Some("timestamp_granularities[]"),
        "verbose_json",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("response_format", None, b"srt"),
            ("stream", None, b"true"),
        ]),
        Some("stream"),
        "json and text",
    );
    assert_400(
        &post(&[("model", None, m), ("file", Some("a.wav"), s), ("model", None, m)]),
        Some("model"),
        "more than once",
    );
    assert_400(
        &post(&[
            ("model", None, m),
            ("file", Some("a.wav"), s),
            ("language", None, b"de"),
        ]),
        Some("language"),
        "English-only",
    );
    // Not multipart at all.
    let r = server.request(
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", "application/json")],
        Some("{\"model\": \"x\"}"),
    );
    assert_400(&r, None, "multipart/form-data");
    let r = server.request_bytes(
        "POST",
        "/v1/audio/transcriptions",
        &[("content-type", "multipart/form-data; boundary=zz")],
        b"--zz\r\nbroken",
    );
    assert_400(&r, None, "malformed multipart");
    // Translation needs a multilingual model.
    let (ct, body) = form(&[("model", None, m), ("file", Some("a.wav"), s)]);
    let r = server.request_bytes("POST", "/v1/audio/translations", &[("content-type", &ct)], &body);
    assert_400(&r, Some("model"), "English-only");
    let (ct, body) = form(&[
        ("model", None, m),
        ("file", Some("a.wav"), s),
        ("language", None, b"en"),
    ]);
    let r = server.request_bytes("POST", "/v1/audio/translations", &[("content-type", &ct)], &body);
    assert_400(&r, Some("language"), "unknown field");
    // Whisper named for chat; a text model named for transcription.
    let r = server.post(
        "/v1/chat/completions",
        serde_json::json!({"model": WHISPER, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_400(&r, Some("model"), "speech-to-text");
    assert_eq!(r.json()["error"]["code"], "model_not_supported");
    let r = post(&[
        ("model", None, b"HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("file", Some("a.wav"), s),
    ]);
    assert_400(&r, Some("model"), "text model");
    // After all that, a good request still works.
    let r = post(&[("model", None, m), ("file", Some("a.wav"), s)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["text"].as_str().unwrap().contains("fellow Americans"),
        "{}",
        r.body
    );
}

/// FLAC decodes to the very samples of the WAV it was made from; Ogg Vorbis and MP3
/// (lossy) to the same audio within a codec's error (aligned for the encoder's delay),
/// and all three transcribe to the same words.
#[test]
fn flac_ogg_and_mp3_uploads() {
    let dir = crate::common::repo_root().join("tests/fixtures/audio");
    let excerpt = &jfk()[..5 * 16_000];
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let flac = inferd::media::audio::decode(&read("jfk-5s.flac"), 60.0).unwrap();
    assert_eq!((flac.sample_rate, flac.samples.as_slice()), (16_000, excerpt));
    for (name, min_snr_db) in [("jfk-5s.ogg", 15.0), ("jfk-5s.mp3", 15.0)] {
        let audio = inferd::media::audio::decode(&read(name), 60.0).unwrap();
        assert_eq!(audio.sample_rate, 16_000, "{name}");
        let len = audio.samples.len() as i64;
        assert!((len - 80_000).abs() < 2_400, "{name}: {len} samples");
        // Signal-to-noise over the middle 4 s at the best alignment.
        let snr = |shift: i64| {
            let (mut signal, mut noise) = (0.0f64, 0.0f64);
            for i in 8_000..72_000i64 {
                let (Some(&a), Some(&b)) = (excerpt.get(i as usize), audio.samples.get((i + shift) as usize)) else {
                    continue;
                };
                signal += (a as f64).powi(2);
                noise += (a as f64 - b as f64).powi(2);
            }
            10.0 * (signal / noise.max(1e-12)).log10()
        };
        let best = (-2_000..=2_000).map(snr).fold(f64::MIN, f64::max);
        assert!(best > min_snr_db, "{name}: SNR {best:.1} dB");
    }
    let server = Server::start_model(WHISPER, &[]);
    let want = transcribe(&server, &wav(excerpt, 16_000, 1), &[("model", WHISPER)]).json()["text"].clone();
    assert!(want.as_str().unwrap().contains("fellow Americans"), "{want}");
    let r = transcribe(&server, &read("jfk-5s.flac"), &[("model", WHISPER)]);
    assert_eq!(r.json()["text"], want, "flac");
    for name in ["jfk-5s.ogg", "jfk-5s.mp3"] {
        // A lossy codec may move a word ("asked" for "ask"), not the speech.
        let r = transcribe(&server, &read(name), &[("model", WHISPER)]);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert!(
            r.json()["text"]
                .as_str()
                .unwrap()
                .starts_with("And so my fellow Americans"),
            "{name}: {}",
            r.body
        );
    }
}

/// A multilingual model (seeded random weights): the language is detected when not
/// given, or taken from the form; translation runs; unknown languages are refused.
#[test]
fn multilingual_models_detect_languages_and_translate() {
    let g = &golden("whisper.json")["tiny_multilingual"];
    let tiny = "inferd-test/tiny-whisper";
    let server = Server::start_model(tiny, &[]);
    let audio = jfk_wav();
    let detected = g["detected_language_id"].as_u64().unwrap() - 50259;
    let languages = [
        "english",
        "chinese",
        "german",
        "spanish",
        "russian",
        "korean",
        "french",
        "japanese",
        "portuguese",
        "turkish",
    ];
    let r = transcribe(&server, &audio, &[("model", tiny), ("response_format", "verbose_json")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["language"], languages[detected as usize]);
    assert_eq!(r.json()["task"], "transcribe");
    let r = transcribe(
        &server,
        &audio,
        &[("model", tiny), ("language", "fr"), ("response_format", "verbose_json")],
    );
    assert_eq!(
        (r.status, r.json()["language"].as_str()),
        (200, Some("french")),
        "{}",
        r.body
    );
    let r = transcribe(&server, &audio, &[("model", tiny), ("language", "xx")]);
    assert_400(&r, Some("language"), "not a language");
    let (ct, body) = form(&[
        ("file", Some("a.wav"), &audio),
        ("model", None, tiny.as_bytes()),
        ("response_format", None, b"verbose_json"),
    ]);
    let r = server.request_bytes("POST", "/v1/audio/translations", &[("content-type", &ct)], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["task"], "translate");
}
