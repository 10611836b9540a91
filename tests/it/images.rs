//! Image decoding and the Qwen2-VL preprocessing against transformers' image processor
//! (goldens from scripts/image_goldens.py): the three CC0 photos, a grey, an RGBA and a
//! 16-bit PNG, and generated tiny, very wide, grey-with-alpha, GIF and WebP images.

use inferd::media::image::{decode, preprocess, VisionPreprocess};

use super::common::{fixture, golden};

#[test]
fn decoding_and_preprocessing_match_transformers() {
    let goldens = golden("images.json");
    let config = VisionPreprocess::default();
    let mut report = Vec::new();
    for (name, want) in goldens["images"].as_object().unwrap() {
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        let image = decode(&bytes, 1 << 30).unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = [image.width as u64, image.height as u64];
        assert_eq!(want["size"], serde_json::json!(size), "{name}");

        // Decoded pixels: exact but for JPEG (decoders differ in their IDCT).
        let stride = want["decoded_stride"].as_u64().unwrap() as usize;
        let (mut decoded_diff, mut decoded_max, mut n) = (0u64, 0u64, 0u64);
        for (i, w) in want["decoded_samples"].as_array().unwrap().iter().enumerate() {
            let d = (i64::from(image.data[i * stride]) - w.as_i64().unwrap()).unsigned_abs();
            decoded_diff += d;
            decoded_max = decoded_max.max(d);
            n += 1;
        }
        let jpeg = name.ends_with(".jpg");
        if !jpeg {
            assert_eq!(decoded_max, 0, "{name}: decoded pixels differ from PIL's");
        }

        let pixels = preprocess(&image, &config).unwrap();
        assert_eq!(serde_json::json!(pixels.grid), want["grid"], "{name}");
        let shape = [pixels.data.len() / pixels.row_len, pixels.row_len];
        assert_eq!(serde_json::json!(shape), want["shape"], "{name}");
        let stride = want["stride"].as_u64().unwrap() as usize;
        let (mut exact, mut max, mut total) = (0usize, 0f64, 0usize);
        for (i, w) in want["samples"].as_array().unwrap().iter().enumerate() {
            let d = (f64::from(pixels.data[i * stride]) - w.as_f64().unwrap()).abs();
            exact += usize::from(d < 1e-5);
            max = max.max(d);
            total += 1;
        }
        let sum: f64 = pixels.data.iter().map(|&v| f64::from(v)).sum();
        let sum_error = (sum - want["sum"].as_f64().unwrap()).abs() / want["abs_sum"].as_f64().unwrap();
        report.push(format!(
            "{name}: decoded mean |diff| {:.3} max {decoded_max}; pixel values {exact}/{total} exact, max |diff| {max:.4}, relative sum error {sum_error:.2e}",
            decoded_diff as f64 / n as f64
        ));
        // JPEG: the decoders' IDCTs differ by a level or two here and there; one level
        // of an 8-bit channel is 1/(255·std) ≈ 0.015 after normalization.
        if jpeg {
            assert!(max < 0.1 && sum_error < 1e-3, "{}", report.last().unwrap());
        } else {
            // Bit for bit: the same 8-bit resampling, the same float32 normalization.
            assert!(exact == total && sum_error < 1e-12, "{}", report.last().unwrap());
        }
    }
    eprintln!("{}", report.join("\n"));
}
