//! Whisper tiny.en against transformers (float32, CPU): log-mel features, encoder output,
//! decoder logits and greedy ids, from `tests/goldens/whisper.json`
//! (`scripts/whisper_goldens.py`).
//!
//! Tolerances (measured maxima in brackets): mel features 2e-4 absolute [2.5e-5 on the
//! sweep; transformers takes torch's float32 STFT, we a float64 FFT]; encoder output
//! 5e-4 [5.8e-5]; decoder top-8 logits 5e-4 [5.3e-5].

use std::sync::Arc;

use inferd::backend::cpu::CpuBackend;
use inferd::backend::{Backend, ForwardBatch};
use inferd::engine::sampling::SpeechRules;
use inferd::engine::{Engine, EngineConfig, EngineEvent, RequestId, SamplingParams};
use inferd::media::audio::{self, LogMel, MelConfig, MelExtractor};
use inferd::models::whisper::WhisperGeneration;
use inferd::models::{load_whisper, EncoderInput, EngineModel, LogitsFor, WhisperModel};

use crate::common::{golden, ids, installed_model, repo_root};

const REPO: &str = "openai/whisper-tiny.en";

pub fn jfk() -> Vec<f32> {
    let bytes = std::fs::read(repo_root().join("tests/fixtures/audio/jfk.wav")).unwrap();
    let audio = audio::decode(&bytes, 60.0).unwrap();
    assert_eq!(audio.sample_rate, 16_000);
    audio.samples
}

fn sweep() -> Vec<f32> {
    (0..160_000)
        .map(|i| {
            let t = i as f64 / 16_000.0;
            let phase = 2.0 * std::f64::consts::PI * (100.0 * t + (7000.0 - 100.0) * t * t / 20.0);
            (0.5 * phase.sin()) as f32
        })
        .collect()
}

pub fn long45(speech: &[f32]) -> Vec<f32> {
    let mut out: Vec<f32> = speech.repeat(4);
    out.resize(45 * 16_000, 0.0);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn log_mel_features_match_transformers() {
    let g = golden("whisper.json");
    let stride = g["frame_stride"].as_u64().unwrap() as usize;
    let extractor = MelExtractor::new(MelConfig::default());
    let speech = jfk();
    let inputs: [(&str, Vec<f32>); 4] = [
        ("silence", vec![0.0; 5 * 16_000]),
        ("sweep", sweep()),
        ("jfk", speech.clone()),
        ("long45", long45(&speech)),
    ];
    for (name, samples) in inputs {
        let want = &g["mel"][name];
        assert_eq!(
            samples.len() as u64,
            want["samples"].as_u64().unwrap(),
            "{name}: input length"
        );
        let mel = extractor.long_features(&samples);
        assert_eq!(mel.frames as u64, want["frames"].as_u64().unwrap(), "{name}: frames");
        let mut sampled = Vec::new();
        for f in (0..mel.frames).step_by(stride) {
            for m in 0..mel.n_mels {
                sampled.push(mel.values[m * mel.frames + f]);
            }
        }
        let diff = max_diff(&sampled, &floats(&want["values"]));
        eprintln!("mel {name}: max |diff| {diff:e}");
        assert!(diff < 2e-4, "{name}: mel differs by {diff}");
        let max = mel.values.iter().fold(f32::MIN, |a, &b| a.max(b));
        assert!((max - want["max"].as_f64().unwrap() as f32).abs() < 2e-3, "{name}: max");
    }
}

fn load() -> WhisperModel<CpuBackend> {
    let mut last = (0, 0);
    let model = load_whisper(&CpuBackend::default(), &installed_model(REPO), &mut |c, t| {
        last = (c, t)
    })
    .unwrap();
    assert_eq!(last.0, last.1, "progress ends at the total");
    model
}

fn jfk_mel() -> LogMel {
    MelExtractor::new(MelConfig::default()).window_features(&jfk())
}

#[test]
fn encoder_and_decoder_match_transformers() {
    let g = golden("whisper.json");
    let backend = CpuBackend::default();
    let mut model = load();
    let mel = jfk_mel();
    let encoded = model.encode(&backend, &mel).unwrap();
    let (values, rows, cols) = backend.to_host(encoded);
    assert_eq!((rows, cols), (1500, 384));
    let mut worst = 0.0f32;
    for (r, want) in g["encoder"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["encoder"]["values"].as_array().unwrap())
    {
        let r = r.as_u64().unwrap() as usize;
        worst = worst.max(max_diff(&values[r * cols..(r + 1) * cols], &floats(want)));
    }
    eprintln!("encoder: max |diff| {worst:e}");
    assert!(worst < 5e-4, "encoder output differs by {worst}");

    // Decoder logits over the golden sequence, in one prefill.
    model
        .begin_request(&backend, 7, &[], &EncoderInput::Audio(Arc::new(mel)))
        .unwrap();
    let input = ids(&g["decoder"]["input_ids"]);
    let block_size = 16;
    let blocks: Vec<u32> = (0..input.len().div_ceil(block_size) as u32).collect();
    let mut batch = ForwardBatch::single(&input, 0, &blocks, block_size);
    batch.seqs[0].key = 7;
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(blocks.len(), block_size));
    let logits = model
        .forward(&backend, &batch, &mut cache, LogitsFor::AllTokens)
        .unwrap();
    let (logits, _, vocab) = backend.to_host(logits);
    let mut worst = 0.0f32;
    for case in g["decoder"]["top_logits"].as_array().unwrap() {
        let p = case["position"].as_u64().unwrap() as usize;
        let row = &logits[p * vocab..(p + 1) * vocab];
        let want_ids = ids(&case["ids"]);
        let ours: Vec<f32> = want_ids.iter().map(|&i| row[i as usize]).collect();
        worst = worst.max(max_diff(&ours, &floats(&case["logits"])));
        // Same top token.
        let argmax = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        assert_eq!(argmax, want_ids[0], "position {p}: top token");
    }
    eprintln!("decoder logits: max |diff| {worst:e}");
    assert!(worst < 5e-4, "decoder logits differ by {worst}");
    model.end_request(7);
    assert!(!model.has_request(7));
}

/// tiny.en's decoding settings and an engine over it.
fn engine() -> (WhisperGeneration, Engine<CpuBackend, WhisperModel<CpuBackend>>) {
    let gen = WhisperGeneration::from_dir(&installed_model(REPO)).unwrap();
    let engine = Engine::new(
        CpuBackend::default(),
        load(),
        EngineConfig::default(),
        vec![gen.eos_token_id],
    );
    (gen, engine)
}

fn run(
    engine: &mut Engine<CpuBackend, WhisperModel<CpuBackend>>,
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
    mel: LogMel,
) -> Vec<u32> {
    crate::common::run_alone(engine, id, prompt, params, Some(EncoderInput::Audio(Arc::new(mel))))
}

#[test]
fn greedy_ids_match_transformers_with_and_without_timestamps() {
    let g = golden("whisper.json");
    let (gen, mut engine) = engine();
    let params = |timestamps: bool| SamplingParams {
        temperature: 0.0,
        speech: Some(Arc::new(SpeechRules::whisper(&gen, timestamps))),
        ..SamplingParams::default()
    };
    let plain = run(
        &mut engine,
        1,
        gen.prompt(&[], None, false, false),
        params(false),
        jfk_mel(),
    );
    assert_eq!(plain.last(), Some(&gen.eos_token_id));
    assert_eq!(plain[..plain.len() - 1], ids(&g["greedy"]["ids"])[..]);
    let stamped = run(
        &mut engine,
        2,
        gen.prompt(&[], None, false, true),
        params(true),
        jfk_mel(),
    );
    assert_eq!(stamped[..stamped.len() - 1], ids(&g["greedy_timestamps"]["ids"])[..]);
    assert_eq!(engine.stats().kv_blocks_used, 0);
}

/// Requests with different audio decode in the same steps (each its own cross-attention
/// K/V) and get exactly what each gets alone.
#[test]
fn concurrent_requests_batch_and_match_their_solo_runs() {
    let (gen, mut engine) = engine();
    let extractor = MelExtractor::new(MelConfig::default());
    let speech = jfk();
    let long = long45(&speech);
    let inputs = [
        (false, extractor.window_features(&speech)),
        (true, extractor.window_features(&speech)),
        (true, extractor.long_features(&long).window(1000, 3000)),
        (false, extractor.window_features(&speech[16_000 * 4..])),
    ];
    let params = |timestamps: bool| SamplingParams {
        temperature: 0.0,
        speech: Some(Arc::new(SpeechRules::whisper(&gen, timestamps))),
        ..SamplingParams::default()
    };
    let solo: Vec<Vec<u32>> = inputs
        .iter()
        .enumerate()
        .map(|(i, (ts, mel))| {
            run(
                &mut engine,
                100 + i as u64,
                gen.prompt(&[], None, false, *ts),
                params(*ts),
                mel.clone(),
            )
        })
        .collect();
    let mut receivers = Vec::new();
    for (i, (ts, mel)) in inputs.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt = gen.prompt(&[], None, false, *ts);
        engine
            .add_request_with_input(
                RequestId(200 + i as u64),
                prompt,
                params(*ts),
                Some(EncoderInput::Audio(Arc::new(mel.clone()))),
                tx,
            )
            .unwrap();
        receivers.push(rx);
    }
    let mut widest = 0;
    let mut admitted = Vec::new();
    while engine.has_work() {
        engine.step();
        widest = widest.max(engine.stats().running);
        admitted.push(engine.stats().running);
    }
    // One encoder pass a step: the requests join one by one, decoding in between.
    assert_eq!(admitted[..4], [1, 2, 3, 4]);
    assert_eq!(widest, inputs.len(), "all four ran in the same steps");
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut out = Vec::new();
        while let Ok(EngineEvent::Token { token, .. }) = rx.try_recv() {
            out.push(token);
        }
        assert_eq!(out, solo[i], "request {i}");
    }
    assert_eq!(engine.stats().kv_blocks_used, 0);
    // An encoder input is required, and its shape checked.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = engine.add_request(RequestId(300), gen.prompt(&[], None, false, false), params(false), tx);
    assert!(err.is_err());
    // A bad input fails its own request only, in a step shared with a good one.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bad = LogMel {
        values: vec![0.0; 80 * 10],
        n_mels: 80,
        frames: 10,
    };
    engine
        .add_request_with_input(
            RequestId(301),
            gen.prompt(&[], None, false, false),
            params(false),
            Some(EncoderInput::Audio(Arc::new(bad))),
            tx,
        )
        .unwrap();
    let (tx, mut good) = tokio::sync::mpsc::unbounded_channel();
    engine
        .add_request_with_input(
            RequestId(302),
            gen.prompt(&[], None, false, false),
            params(false),
            Some(EncoderInput::Audio(Arc::new(inputs[0].1.clone()))),
            tx,
        )
        .unwrap();
    while engine.has_work() {
        engine.step();
    }
    assert!(matches!(rx.try_recv(), Ok(EngineEvent::Failed(e)) if e.contains("log-mel")));
    let mut out = Vec::new();
    while let Ok(EngineEvent::Token { token, .. }) = good.try_recv() {
        out.push(token);
    }
    assert_eq!(out, solo[0]);
}

/// Decoder K/V depend on the audio, so the prefix cache shares blocks only between
/// requests with the same audio, however long their common text prompt.
#[test]
fn prefix_cache_is_keyed_by_audio() {
    let (gen, mut engine) = engine();
    let extractor = MelExtractor::new(MelConfig::default());
    let speech = jfk();
    // 40 prompt tokens: two full blocks of 16.
    let text_prompt: Vec<u32> = (300..338).collect();
    let prompt = gen.prompt(&text_prompt, None, false, false);
    assert!(prompt.len() >= 40);
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(4),
        speech: Some(Arc::new(SpeechRules::whisper(&gen, false))),
        ..SamplingParams::default()
    };
    let hits = |engine: &Engine<CpuBackend, WhisperModel<CpuBackend>>| engine.stats().prefix_cache_hits;
    let a = run(
        &mut engine,
        1,
        prompt.clone(),
        params.clone(),
        extractor.window_features(&speech),
    );
    let after_first = hits(&engine);
    let b = run(
        &mut engine,
        2,
        prompt.clone(),
        params.clone(),
        extractor.window_features(&speech[16_000 * 5..]),
    );
    assert_eq!(hits(&engine), after_first, "other audio: no block shared");
    let again = run(
        &mut engine,
        3,
        prompt.clone(),
        params.clone(),
        extractor.window_features(&speech),
    );
    assert!(
        hits(&engine) >= after_first + 2,
        "same audio: the prompt's full blocks are shared"
    );
    assert_eq!(again, a);
    assert_ne!(a, b);
}

#[test]
fn mel_with_128_bins_matches_transformers() {
    let g = golden("whisper.json");
    let stride = g["frame_stride"].as_u64().unwrap() as usize;
    let mel = MelExtractor::new(MelConfig {
        n_mels: 128,
        ..MelConfig::default()
    })
    .window_features(&jfk());
    assert_eq!((mel.n_mels, mel.frames), (128, 3000));
    let mut sampled = Vec::new();
    for f in (0..mel.frames).step_by(stride) {
        for m in 0..mel.n_mels {
            sampled.push(mel.values[m * mel.frames + f]);
        }
    }
    let diff = max_diff(&sampled, &floats(&g["mel128_jfk"]["values"]));
    assert!(diff < 2e-4, "128-bin mel differs by {diff}");
}

/// A seeded random multilingual Whisper: language detection and the language / task
/// tokens of the prompt, against transformers' `detect_language` and `generate`.
#[test]
fn multilingual_prompts_and_language_detection_match_transformers() {
    let g = &golden("whisper.json")["tiny_multilingual"];
    let dir = installed_model("inferd-test/tiny-whisper");
    let gen = WhisperGeneration::from_dir(&dir).unwrap();
    assert!(gen.is_multilingual);
    let model = load_whisper(&CpuBackend::default(), &dir, &mut |_, _| {}).unwrap();
    let mut engine = Engine::new(
        CpuBackend::default(),
        model,
        EngineConfig::default(),
        vec![gen.eos_token_id],
    );
    let mel = jfk_mel();
    let (prompt, languages) = gen.language_detection().unwrap();
    let params = SamplingParams::likeliest_of(&languages);
    let detected = run(&mut engine, 1, prompt, params, mel.clone());
    assert_eq!(detected, vec![g["detected_language_id"].as_u64().unwrap() as u32]);
    let lang = |code: &str| gen.lang_to_id.iter().find(|(c, _)| c == code).unwrap().1;
    let params = SamplingParams {
        temperature: 0.0,
        speech: Some(Arc::new(SpeechRules::whisper(&gen, false))),
        ..SamplingParams::default()
    };
    for (i, (key, language, translate)) in [
        ("transcribe_fr", lang("fr"), false),
        ("translate_de", lang("de"), true),
        ("auto_transcribe", detected[0], false),
    ]
    .into_iter()
    .enumerate()
    {
        let prompt = gen.prompt(&[], Some(language), translate, false);
        assert_eq!(
            prompt.len(),
            4,
            "{key}: <|startoftranscript|> language task <|notimestamps|>"
        );
        let out = run(&mut engine, 10 + i as u64, prompt, params.clone(), mel.clone());
        assert_eq!(out, ids(&g[key]), "{key}");
    }
}

/// A memory budget counts each request's cross-attention K/V (18.4 MB for tiny.en), so
/// it caps how many requests run at once, and the KV pool gets what is left.
#[test]
fn memory_budgets_count_the_per_request_encoder_state() {
    use inferd::engine::KvCacheBudget;
    let model = load();
    let per_request = 4 * 2 * 1500 * 384 * 4;
    assert_eq!(model.bytes_per_request(), per_request);
    let config = EngineConfig::default()
        .with_budget(&model, KvCacheBudget::Bytes(100 << 20))
        .unwrap();
    assert_eq!(config.max_num_seqs, (100 << 20) / 2 / per_request);
    let kv_bytes = config.num_blocks * EngineConfig::bytes_per_block(&model, config.block_size);
    assert!(kv_bytes + config.max_num_seqs * per_request <= 100 << 20);
    assert!(config.num_blocks >= config.max_num_seqs * 448 / config.block_size);
}
