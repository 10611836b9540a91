//! Qwen2.5-VL's vision tower against transformers (goldens from scripts/vl_goldens.py):
//! the seeded random checkpoint inferd-test/tiny-qwen2.5-vl, two images at once (a photo
//! whose windows are padded, and a small image that is one window), preprocessed by
//! `media::image` with the same small pixel budget.

use inferd::backend::cpu::CpuBackend;
use inferd::backend::Backend;
use inferd::loader::Checkpoint;
use inferd::media::image::{decode, preprocess, VisionPreprocess};
use inferd::models::qwen2_5_vl::{VisionConfig, VisionTower};

use super::common::{fixture, golden, installed_model};

#[test]
fn the_vision_tower_matches_transformers() {
    let want = golden("models/tiny-qwen2.5-vl-vision.json");
    let dir = installed_model("inferd-test/tiny-qwen2.5-vl");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let backend = CpuBackend::default();
    let tower = VisionTower::load(
        &backend,
        VisionConfig::from_json(&config).unwrap(),
        &Checkpoint::open(&dir).unwrap(),
    )
    .unwrap();
    let images = vl_images(&want, &want["images"]);
    let grids: Vec<[usize; 3]> = images.iter().map(|p| p.grid).collect();
    assert_eq!(serde_json::json!(grids), want["grids"]);
    let pixel_sum: f64 = images.iter().flat_map(|p| &p.data).map(|&v| f64::from(v)).sum();
    assert!((pixel_sum - want["pixel_values_sum"].as_f64().unwrap()).abs() < 1e-6 * pixel_sum.abs().max(1.0));

    let (values, rows, cols) = backend.to_host(tower.forward(&backend, &images));
    assert_eq!(serde_json::json!([rows, cols]), want["shape"]);
    let expected: Vec<f64> = want["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for (got, want) in values.iter().zip(&expected) {
        max_err = max_err.max((f64::from(*got) - want).abs());
        max_ref = max_ref.max(want.abs());
    }
    eprintln!("vision tower: {rows} × {cols} embeddings, max |error| {max_err:.2e} (max |value| {max_ref:.2})");
    // float32 throughout on both sides; the goldens are rounded to 1e-7.
    assert!(max_err < 1e-4, "max |error| {max_err:.2e}");
}

/// One section is plain RoPE: `rotary_sections` with every frequency on the first
/// stream equals `rotary` (and the other streams are ignored).
#[test]
fn rotary_sections_with_one_section_is_rotary() {
    use inferd::backend::AttentionShape;
    let backend = CpuBackend::default();
    let shape = AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
    };
    let rows = 9;
    let width = shape.q_width() + 2 * shape.kv_width();
    let values: Vec<f32> = (0..rows * width)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let inv_freq: Vec<f32> = (0..8).map(|i| 1.0 / 10_000f32.powf(i as f32 / 8.0)).collect();
    let freq = backend.weight_from_f32(inv_freq);
    let positions: Vec<u32> = (0..rows as u32).map(|i| i * 13 + 2).collect();
    let mut a = backend.upload(values.clone(), rows, width);
    backend.rotary(&mut a, &positions, &freq, shape);
    let mut b = backend.upload(values, rows, width);
    let triples: Vec<[u32; 3]> = positions.iter().map(|&p| [p, 999, 7]).collect();
    backend.rotary_sections(&mut b, &triples, [8, 0, 0], &freq, shape);
    assert_eq!(backend.to_host(a), backend.to_host(b));
}

/// The goldens' images, preprocessed with their pixel budget.
fn vl_images(want: &serde_json::Value, names: &serde_json::Value) -> Vec<inferd::media::image::PixelValues> {
    let settings = VisionPreprocess {
        min_pixels: want["min_pixels"].as_u64().unwrap() as usize,
        max_pixels: want["max_pixels"].as_u64().unwrap() as usize,
        ..VisionPreprocess::default()
    };
    names
        .as_array()
        .unwrap()
        .iter()
        .map(|name| {
            let bytes = std::fs::read(fixture(&format!("images/{}", name.as_str().unwrap()))).unwrap();
            preprocess(&decode(&bytes, 1 << 24).unwrap(), &settings).unwrap()
        })
        .collect()
}

/// The whole model on prompts with one and with two images: logits of the rows that see
/// the images (prefilled in chunks of 7 tokens over reversed blocks), and 16 greedy
/// tokens through the engine (image features spliced in, M-RoPE positions, decode
/// positions after the images' delta).
#[test]
fn the_vision_language_model_matches_transformers() {
    use inferd::backend::ForwardBatch;
    use inferd::engine::{Engine, EngineConfig, SamplingParams};
    use inferd::models::qwen2_5_vl::VisionLanguageModel;
    use inferd::models::{EncoderInput, EngineModel, LogitsFor};
    use std::sync::Arc;

    let want = golden("models/tiny-qwen2.5-vl.json");
    let dir = installed_model("inferd-test/tiny-qwen2.5-vl");
    let backend = CpuBackend::default();
    let mut model = VisionLanguageModel::load(&backend, &dir, &mut |_, _| {}).unwrap();
    let mut worst = 0f64;
    for (name, case) in want["cases"].as_object().unwrap() {
        let images = Arc::new(inferd::models::ImageSet::new(vl_images(&want, &case["images"])));
        let prompt = super::common::ids(&case["prompt"]);
        let input = EncoderInput::Images(images.clone());
        model.begin_request(&backend, 1, &prompt, &input).unwrap();
        let (block_size, chunk) = (16, 7);
        let num_blocks = prompt.len().div_ceil(block_size);
        let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
        let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(num_blocks, block_size));
        let mut rows = Vec::new();
        for (i, piece) in prompt.chunks(chunk).enumerate() {
            let mut batch = ForwardBatch::single(piece, i * chunk, &block_table, block_size);
            batch.seqs[0].key = 1;
            let logits = model
                .forward(&backend, &batch, &mut cache, LogitsFor::AllTokens)
                .unwrap();
            let (values, n, vocab) = backend.to_host(logits);
            rows.extend(values.chunks(vocab).take(n).map(<[f32]>::to_vec));
        }
        model.end_request(1);
        for (r, expected) in case["logit_rows"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["logits"].as_array().unwrap())
        {
            let got = &rows[r.as_u64().unwrap() as usize];
            for (g, e) in got.iter().zip(expected.as_array().unwrap()) {
                worst = worst.max((f64::from(*g) - e.as_f64().unwrap()).abs());
            }
        }
        assert!(worst < 1e-4, "{name}: max |logit error| {worst:.2e}");

        let mut engine = Engine::new(
            CpuBackend::default(),
            VisionLanguageModel::load(&backend, &dir, &mut |_, _| {}).unwrap(),
            EngineConfig::default(),
            vec![],
        );
        let params = SamplingParams {
            max_tokens: Some(16),
            temperature: 0.0,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let tokens = super::common::run_alone(&mut engine, 5, prompt.clone(), params, Some(input));
        assert_eq!(tokens, super::common::ids(&case["greedy"]), "{name}: greedy tokens");
    }
    eprintln!("vision-language model: max |logit error| {worst:.2e} over the rows that see the images");
}

/// Images that do not fit the tower (a grid not in whole merge units, rows of another
/// patch size, data of the wrong length) and prompts whose image tokens do not match the
/// images are refused before any compute, not panics.
#[test]
fn mismatched_images_and_prompts_are_refused() {
    use inferd::media::image::PixelValues;
    use inferd::models::qwen2_5_vl::VisionLanguageModel;
    use inferd::models::{EncoderInput, EngineModel};
    use std::sync::Arc;

    let dir = installed_model("inferd-test/tiny-qwen2.5-vl");
    let backend = CpuBackend::default();
    let mut model = VisionLanguageModel::load(&backend, &dir, &mut |_, _| {}).unwrap();
    let pad = model.image_token();
    let image = |grid: [usize; 3], row_len: usize, rows: usize| PixelValues {
        data: vec![0.0; rows * row_len],
        grid,
        row_len,
    };
    let good = image([1, 4, 6], 1176, 24);
    let cases = [
        (vec![image([1, 3, 6], 1176, 18)], vec![1, pad, pad, 2]),
        (vec![image([1, 4, 6], 588, 24)], vec![1, pad, 2]),
        (vec![image([1, 4, 6], 1176, 23)], vec![1, pad, 2]),
        (vec![image([0, 4, 6], 1176, 0)], vec![1, pad, 2]),
        // 6 image tokens expected, 5 given; two images for one run.
        (vec![good.clone()], [vec![1], vec![pad; 5], vec![2]].concat()),
        (vec![good.clone(), good], [vec![1], vec![pad; 6], vec![2]].concat()),
    ];
    for (i, (images, prompt)) in cases.into_iter().enumerate() {
        let input = EncoderInput::Images(Arc::new(inferd::models::ImageSet::new(images)));
        let result = model.begin_request(&backend, i as u64, &prompt, &input);
        assert!(result.is_err(), "case {i} was accepted");
    }
}
