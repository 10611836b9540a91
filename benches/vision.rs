//! What an image costs on the CPU (docs/perf.md): decoding and the Qwen2-VL image
//! processor at Qwen2.5-VL's own pixel budget (3136..12845056 pixels), per fixture, and
//! with `--tower` the vision tower of Qwen2.5-VL-3B's shape (seeded random bf16 weights:
//! the compute of the real one) on one image.
//!
//!   cargo bench --bench vision [-- --tower]
//!
//! Preprocessing: best of 5 runs after a warm-up. The tower: one run after a warm-up on
//! a small image. Prints one JSON line per measurement.

use std::time::Instant;

use inferd::backend::cpu::CpuBackend;
use inferd::media::image::{decode, preprocess, VisionPreprocess};
use inferd::models::dummy_checkpoint;
use inferd::models::qwen2_5_vl::{VisionConfig, VisionTower};

const IMAGES: &[&str] = &["chelsea.png", "coffee.png", "rocket.jpg", "logo.png"];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/images/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = f();
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let start = Instant::now();
        out = f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    (best, out)
}

fn main() {
    let tower = std::env::args().any(|a| a == "--tower");
    // Qwen2.5-VL's preprocessor_config.json: transformers' defaults but min/max pixels.
    let config = VisionPreprocess {
        min_pixels: 3136,
        max_pixels: 12_845_056,
        ..VisionPreprocess::default()
    };
    for name in IMAGES {
        let bytes = fixture(name);
        let (decode_secs, image) = best_of(5, || decode(&bytes, 50_000_000).expect("decode"));
        let (preprocess_secs, pixels) = best_of(5, || preprocess(&image, &config).expect("preprocess"));
        println!(
            "{}",
            serde_json::json!({
                "image": name, "width": image.width, "height": image.height,
                "grid": pixels.grid, "tokens": pixels.grid.iter().product::<usize>() / 4,
                "decode_ms": decode_secs * 1e3, "preprocess_ms": preprocess_secs * 1e3,
            })
        );
    }
    if !tower {
        return;
    }
    // Qwen2.5-VL-3B-Instruct's vision_config.
    let raw = serde_json::json!({"vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    }});
    let vision = VisionConfig::from_json(&raw).expect("vision config");
    let backend = CpuBackend::default();
    let checkpoint = dummy_checkpoint(&VisionTower::<CpuBackend>::tensor_shapes(&vision), 0).expect("dummy weights");
    let tower = VisionTower::load(&backend, vision, &checkpoint).expect("tower");
    let small = preprocess(&decode(&fixture("synthetic-83x61.webp"), 1 << 20).unwrap(), &config).unwrap();
    tower.forward(&backend, std::slice::from_ref(&small));
    let image = decode(&fixture("chelsea.png"), 50_000_000).unwrap();
    let pixels = preprocess(&image, &config).unwrap();
    let start = Instant::now();
    tower.forward(&backend, std::slice::from_ref(&pixels));
    let secs = start.elapsed().as_secs_f64();
    let patches: usize = pixels.grid.iter().product();
    println!(
        "{}",
        serde_json::json!({
            "tower": "Qwen2.5-VL-3B vision (random bf16 weights)", "image": "chelsea.png",
            "patches": patches, "tokens": patches / 4, "seconds": secs,
            "ms_per_token": secs * 1e3 / (patches / 4) as f64,
        })
    );
}
