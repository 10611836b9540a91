//! Whole models on the GPU: the tiny checkpoints and Qwen2.5-VL against transformers'
//! goldens, f32 greedy decoding against the CPU backend, bf16 logits against
//! transformers on the GPU, the engine's batching, Whisper.

use super::*;

/// Logits of every prompt position in one pass.
fn prompt_logits<B: Backend + 'static>(backend: &B, model: &DecoderModel<B>, prompt: &[u32]) -> Vec<Vec<f32>> {
    let block_size = 16;
    let blocks: Vec<u32> = (0..prompt.len().div_ceil(block_size) as u32).rev().collect();
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(blocks.len(), block_size));
    let batch = ForwardBatch::single(prompt, 0, &blocks, block_size);
    let logits = model
        .forward(backend, &batch, &mut cache, LogitsFor::AllTokens)
        .unwrap();
    let (values, _, vocab) = backend.to_host(logits);
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn greedy<B: Backend + 'static>(
    backend: B,
    model: DecoderModel<B>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, DecoderModel<B>) {
    let params = SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    solo(backend, model, prompt, params)
}

/// One request on an engine of its own.
fn solo<B: Backend + 'static>(
    backend: B,
    model: DecoderModel<B>,
    prompt: &[u32],
    params: SamplingParams,
) -> (Vec<u32>, DecoderModel<B>) {
    let n = params.max_tokens.unwrap_or(16);
    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: (prompt.len() + n).div_ceil(block_size) + 1,
        max_num_seqs: 1,
        max_num_batched_tokens: 512,
        max_waiting: 1,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(backend, model, config, vec![]);
    let (ids, _) = engine::generate(&mut engine, prompt.to_vec(), params, &mut |_| true).unwrap();
    (ids, engine.into_model())
}

/// The tiny checkpoints with awkward shapes (GQA 3:1 with head_dim 16, qkv bias with tied
/// embeddings, q/k norm) against transformers' float32 goldens, as the CPU suite does.
#[test]
fn tiny_checkpoints_match_transformers_float32_goldens() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let golden = golden(&format!("models/{name}.json"));
        let model = load_decoder(&g, &installed_model(&format!("inferd-test/{name}")), &mut |_, _| {}).unwrap();
        let mut model = Some(model);
        for case in golden["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let logits = prompt_logits(&g, model.as_ref().unwrap(), &prompt);
            let mut worst = 0.0f32;
            for top in case["top_logits"].as_array().unwrap() {
                let pos = top["position"].as_u64().unwrap() as usize;
                for (&id, want) in ids(&top["ids"]).iter().zip(top["logits"].as_array().unwrap()) {
                    worst = worst.max((logits[pos][id as usize] - want.as_f64().unwrap() as f32).abs());
                }
            }
            eprintln!("{name} {}: max |logit error| {worst:.2e}", case["name"]);
            assert!(worst <= 5e-4, "{name}: logits differ from transformers by {worst}");
            let want = ids(&case["greedy_ids"]);
            let (got, m) = greedy(g.clone(), model.take().unwrap(), &prompt, want.len());
            assert_eq!(got, want, "{name} {}: greedy tokens", case["name"]);
            model = Some(m);
        }
    }
}

/// Full-size random-weight models (SmolLM2-135M's and Qwen2.5-0.5B's configs): greedy
/// decoding in f32 gives the CPU backend's tokens, one for one, and the logits agree.
#[test]
fn float32_greedy_decoding_equals_the_cpu_backend() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let c = CpuBackend::with_weights(WeightDtype::F32);
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b"] {
        let dir = fixture(&format!("models/{name}"));
        let mc = load_decoder_dummy(&c, &dir, &mut |_, _| {}).unwrap();
        let mg = load_decoder_dummy(&g, &dir, &mut |_, _| {}).unwrap();
        let mut rng = Rng(9);
        let vocab = mc.config.vocab_size;
        let prompt: Vec<u32> = (0..40).map(|_| rng.below(vocab) as u32).collect();
        let (lc, lg) = (prompt_logits(&c, &mc, &prompt), prompt_logits(&g, &mg, &prompt));
        let flat = |l: &Vec<Vec<f32>>| l.concat();
        let e = rel_err(&flat(&lg), &flat(&lc));
        eprintln!("{name}: prompt logits relative error {e:.2e}");
        assert!(e < 1e-4, "{name}: logits differ by {e:.2e}");
        let (ids_c, _) = greedy(c.clone(), mc, &prompt, 48);
        let (ids_g, _) = greedy(g.clone(), mg, &prompt, 48);
        assert_eq!(ids_g, ids_c, "{name}: greedy tokens, CUDA f32 vs CPU");
    }
}

/// bf16 weights on the GPU against transformers run on the GPU: goldens written by
/// `scripts/gpu_goldens.py` (INFERD_GPU_GOLDENS). transformers there computes in bf16
/// (`torch_bf16`) and, from the same bf16 weights, in f32 (`torch_f32`). inferd keeps
/// activations in f32 and rounds GEMM inputs and the KV cache to bf16, so it must be at
/// least as close to `torch_f32` as transformers' own bf16 run is, and no further from
/// `torch_bf16` than twice that (or 1e-2).
#[test]
fn bfloat16_logits_match_transformers_on_the_gpu() {
    let Some(g) = gpu(WeightDtype::Bf16) else { return };
    let Ok(path) = std::env::var("INFERD_GPU_GOLDENS") else {
        eprintln!("skipped: INFERD_GPU_GOLDENS is not set (scripts/gpu-check sets it)");
        return;
    };
    let goldens: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for case in goldens["cases"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let model = load_decoder(&g, &installed_model(name), &mut |_, _| {}).unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let ours = prompt_logits(&g, &model, &prompt).concat();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
                .collect()
        };
        let (t_bf16, t_f32) = (floats(&case["torch_bf16"]), floats(&case["torch_f32"]));
        let (to_f32, to_bf16, torch_own) = (
            rel_err(&ours, &t_f32),
            rel_err(&ours, &t_bf16),
            rel_err(&t_bf16, &t_f32),
        );
        eprintln!(
            "{name}: ours vs torch f32 {to_f32:.2e}, ours vs torch bf16 {to_bf16:.2e}, torch bf16 vs f32 {torch_own:.2e}"
        );
        assert!(
            to_f32 <= torch_own,
            "{name}: {to_f32:.2e} from transformers' f32 logits, more than its own bf16 run ({torch_own:.2e})"
        );
        assert!(
            to_bf16 <= (2.0 * torch_own).max(1e-2),
            "{name}: {to_bf16:.2e} from transformers' bf16 logits"
        );
    }
}

/// The engine on the GPU: requests batched together (prefill and decode mixed, prompts
/// chunked; greedy rows reduced on the device, seeded sampling and log-probability rows
/// copied out, in the same steps) give their solo tokens, a shared prefix is reused from
/// the cache, and every block comes back.
#[test]
fn engine_batches_and_prefix_cache_match_solo_runs_on_the_gpu() {
    // f32: batched GEMMs may sum in another order than solo ones; in f32 that cannot
    // flip a greedy choice of these random weights, in bf16 it could.
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let dir = fixture("models/smollm2-135m");
    let model = load_decoder_dummy(&g, &dir, &mut |_, _| {}).unwrap();
    let mut rng = Rng(3);
    let shared: Vec<u32> = (0..48).map(|_| rng.below(49_152) as u32).collect();
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            let mut p = if i % 3 == 0 { shared.clone() } else { Vec::new() };
            p.extend((0..5 + 13 * i).map(|_| rng.below(49_152) as u32));
            p
        })
        .collect();
    let n = 24;
    let params = |i: usize| match i % 3 {
        0 => SamplingParams {
            max_tokens: Some(n),
            ..SamplingParams::greedy()
        },
        1 => SamplingParams {
            max_tokens: Some(n),
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
        _ => SamplingParams {
            max_tokens: Some(n),
            logprobs: Some(2),
            ..SamplingParams::greedy()
        },
    };
    let mut model = Some(model);
    let mut solo_ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (ids, m) = solo(g.clone(), model.take().unwrap(), p, params(i));
        solo_ids.push(ids);
        model = Some(m);
    }
    let config = EngineConfig {
        block_size: 16,
        num_blocks: 256,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_waiting: 64,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(g.clone(), model.take().unwrap(), config, vec![]);
    let mut receivers = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .add_request(RequestId(i as u64), p.clone(), params(i), tx)
            .unwrap();
        receivers.push(rx);
    }
    while engine.has_work() {
        engine.step();
    }
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e {
                EngineEvent::Token { token, .. } => got.push(token),
                EngineEvent::Finished { .. } => break,
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Failed(e) => panic!("request {i}: {e}"),
            }
        }
        assert_eq!(got, solo_ids[i], "request {i}: batched tokens differ from its solo run");
    }
    assert!(engine.stats().prefix_cache_hits > 0, "the shared prefix was reused");
    assert_eq!(engine.scheduler().num_blocks_in_use(), 0, "every block returned");
}

/// Whisper on the GPU: the seeded multilingual checkpoint detects the language and
/// decodes transformers' tokens (tests/goldens/whisper.json) on jfk.wav.
/// Qwen2.5-VL on the GPU (float32): the vision tower's embeddings of two images against
/// transformers' goldens, and the whole model's 16 greedy tokens for one and for two
/// images through the engine, as the CPU suite checks them (`tests/it/vision.rs`).
#[test]
fn vision_language_goldens_on_the_gpu() {
    use inferd::media::image::{decode, preprocess, VisionPreprocess};
    use inferd::models::qwen2_5_vl::VisionLanguageModel;
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let dir = installed_model("inferd-test/tiny-qwen2.5-vl");
    let images_of = |want: &serde_json::Value, names: &serde_json::Value| {
        let settings = VisionPreprocess {
            min_pixels: want["min_pixels"].as_u64().unwrap() as usize,
            max_pixels: want["max_pixels"].as_u64().unwrap() as usize,
            ..VisionPreprocess::default()
        };
        let names = names.as_array().unwrap();
        names
            .iter()
            .map(|n| {
                let bytes = std::fs::read(fixture(&format!("images/{}", n.as_str().unwrap()))).unwrap();
                preprocess(&decode(&bytes, 1 << 24).unwrap(), &settings).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let tower = golden("models/tiny-qwen2.5-vl-vision.json");
    let model = VisionLanguageModel::load(&g, &dir, &mut |_, _| {}).unwrap();
    let embeddings = host_gpu(&g, model.vision().forward(&g, &images_of(&tower, &tower["images"])));
    let want: Vec<f32> = tower["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    check("vision tower embeddings", &embeddings, &want, 1e-4);
    let goldens = golden("models/tiny-qwen2.5-vl.json");
    let mut engine = Engine::new(g.clone(), model, EngineConfig::default(), vec![]);
    for (id, (name, case)) in goldens["cases"].as_object().unwrap().iter().enumerate() {
        let images = inferd::models::ImageSet::new(images_of(&goldens, &case["images"]));
        let input = inferd::models::EncoderInput::Images(Arc::new(images));
        let params = SamplingParams {
            max_tokens: Some(16),
            temperature: 0.0,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let tokens = common::run_alone(&mut engine, id as u64, ids(&case["prompt"]), params, Some(input));
        assert_eq!(tokens, ids(&case["greedy"]), "{name}: greedy tokens on the GPU");
    }
}

#[test]
fn whisper_multilingual_goldens_on_the_gpu() {
    let Some(g) = gpu(WeightDtype::F32) else { return };
    let gold = &golden("whisper.json")["tiny_multilingual"];
    let dir = installed_model("inferd-test/tiny-whisper");
    let gen = WhisperGeneration::from_dir(&dir).unwrap();
    let model = load_whisper(&g, &dir, &mut |_, _| {}).unwrap();
    let mut engine = Engine::new(g.clone(), model, EngineConfig::default(), vec![gen.eos_token_id]);
    let bytes = std::fs::read(fixture("audio/jfk.wav")).unwrap();
    let audio = audio::decode(&bytes, 60.0).unwrap();
    let mel = inferd::models::EncoderInput::Audio(Arc::new(
        MelExtractor::new(MelConfig::default()).window_features(&audio.samples),
    ));
    let mut run = |id: u64, prompt: Vec<u32>, params: SamplingParams| {
        common::run_alone(&mut engine, id, prompt, params, Some(mel.clone()))
    };
    let (prompt, languages) = gen.language_detection().unwrap();
    let params = SamplingParams::likeliest_of(&languages);
    let detected = run(1, prompt, params);
    assert_eq!(detected, vec![gold["detected_language_id"].as_u64().unwrap() as u32]);
    let fr = gen.lang_to_id.iter().find(|(c, _)| c == "fr").unwrap().1;
    let params = SamplingParams {
        temperature: 0.0,
        speech: Some(Arc::new(SpeechRules::whisper(&gen, false))),
        ..SamplingParams::default()
    };
    let out = run(2, gen.prompt(&[], Some(fr), false, false), params);
    assert_eq!(out, ids(&gold["transcribe_fr"]), "transcribe_fr");
}
