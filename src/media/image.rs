//! Images for vision-language models: decoding (PNG, JPEG, WebP, GIF's first frame) to
//! 8-bit RGB the way transformers loads them with PIL, and the preprocessing of
//! transformers' Qwen2-VL image processor (its torchvision backend, the default):
//! `smart_resize` to multiples of patch × merge within [min, max] pixels, antialiased
//! bicubic resampling as PyTorch computes it for 8-bit images (fixed point, like PIL),
//! rescale and normalize fused as transformers fuses them, and patches flattened with the
//! temporal patch of 2, with the (t, h, w) grid.

use std::borrow::Cow;
use std::io::Cursor;

use serde_json::Value;

/// A decoded image: 8-bit RGB, row-major, `height × width × 3`.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("the image data is empty")]
    Empty,
    #[error("the data is not an image in a supported format (PNG, JPEG, WebP or GIF)")]
    UnknownFormat,
    #[error("the image is {width}×{height} pixels, over the limit of {max} pixels")]
    TooLarge { width: u64, height: u64, max: u64 },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    #[error("the image is {width}×{height} pixels: its aspect ratio is over 200 (transformers' limit)")]
    AspectRatio { width: usize, height: usize },
}

/// Decodes an image of at most `max_pixels` pixels (checked from its header before any
/// pixel is decoded) to RGB. Transparency is composited over white and 16-bit channels
/// keep their high byte, as PIL's `convert("RGB")` after transformers' `convert_to_rgb`.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    // A decoder that panics on a hostile file must not take the caller down.
    std::panic::catch_unwind(|| decode_unguarded(bytes, max_pixels))
        .unwrap_or_else(|_| Err(ImageError::Corrupt("the decoder failed on this file".into())))
}

fn decode_unguarded(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Corrupt(e.to_string()))
    };
    let probe = reader()?;
    if probe.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let (width, height) = (u64::from(width), u64::from(height));
    if width * height > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            max: max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt("the image has no pixels".into()));
    }
    let mut reader = reader()?;
    let mut limits = image::Limits::default();
    // RGBA16 of the declared size, and some room for the decoder's own buffers.
    limits.max_alloc = Some(width * height * 8 + (64 << 20));
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    Ok(to_rgb(decoded))
}

/// PIL's `alpha_composite` of one channel over an opaque white background (its integer
/// arithmetic with 7 fractional bits).
fn over_white(channel: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let a = u32::from(alpha);
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / (a * 255 + 255 * (255 - a));
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = u32::from(channel) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

fn to_rgb(decoded: image::DynamicImage) -> RgbImage {
    use image::DynamicImage as D;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let high = |v: u16| (v >> 8) as u8;
    let data: Vec<u8> = match decoded {
        D::ImageRgb8(img) => img.into_raw(),
        D::ImageLuma8(img) => img.into_raw().into_iter().flat_map(|v| [v; 3]).collect(),
        D::ImageLumaA8(img) => img
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [over_white(p[0], p[1]); 3])
            .collect(),
        D::ImageRgba8(img) => img
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [over_white(p[0], p[3]), over_white(p[1], p[3]), over_white(p[2], p[3])])
            .collect(),
        D::ImageRgb16(img) => img.into_raw().into_iter().map(high).collect(),
        D::ImageLuma16(img) => img.into_raw().into_iter().flat_map(|v| [high(v); 3]).collect(),
        D::ImageLumaA16(img) => img
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [over_white(high(p[0]), high(p[1])); 3])
            .collect(),
        D::ImageRgba16(img) => img
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| {
                let a = high(p[3]);
                [
                    over_white(high(p[0]), a),
                    over_white(high(p[1]), a),
                    over_white(high(p[2]), a),
                ]
            })
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

/// The Qwen2-VL image processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionPreprocess {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Default for VisionPreprocess {
    /// transformers' defaults (OpenAI CLIP's mean and std).
    fn default() -> Self {
        VisionPreprocess {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl VisionPreprocess {
    /// Reads `preprocessor_config.json` (missing keys take transformers' defaults;
    /// `min_pixels` / `max_pixels` win over `size`, as in transformers).
    pub fn from_json(config: &Value) -> Result<Self, String> {
        let mut out = VisionPreprocess::default();
        let usize_of = |key: &str, value: &Value| -> Result<usize, String> {
            value
                .as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| format!("preprocessor_config.json: `{key}` must be a positive integer"))
        };
        for (key, slot) in [
            ("patch_size", &mut out.patch_size),
            ("temporal_patch_size", &mut out.temporal_patch_size),
            ("merge_size", &mut out.merge_size),
        ] {
            if let Some(v) = config.get(key) {
                *slot = usize_of(key, v)?;
            }
        }
        if let Some(size) = config.get("size").filter(|s| !s.is_null()) {
            if let Some(v) = size.get("shortest_edge") {
                out.min_pixels = usize_of("size.shortest_edge", v)?;
            }
            if let Some(v) = size.get("longest_edge") {
                out.max_pixels = usize_of("size.longest_edge", v)?;
            }
        }
        for (key, slot) in [("min_pixels", &mut out.min_pixels), ("max_pixels", &mut out.max_pixels)] {
            if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
                *slot = usize_of(key, v)?;
            }
        }
        for (key, slot) in [("image_mean", &mut out.image_mean), ("image_std", &mut out.image_std)] {
            if let Some(v) = config.get(key) {
                let values: Vec<f64> = v
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                *slot = values
                    .try_into()
                    .map_err(|_| format!("preprocessor_config.json: `{key}` must be three numbers"))?;
            }
        }
        if out.image_std.contains(&0.0) {
            return Err("preprocessor_config.json: `image_std` has a zero".into());
        }
        if out.min_pixels > out.max_pixels {
            return Err("preprocessor_config.json: min_pixels is over max_pixels".into());
        }
        Ok(out)
    }

    /// Side lengths are multiples of this.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// (height, width) an image of this size is resized to (`smart_resize`).
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize), ImageError> {
        smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels)
    }

    /// Values in one patch row: channels × temporal patch × patch².
    pub fn patch_width(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// transformers' `smart_resize`: the size closest to (height, width) whose sides are
/// multiples of `factor` and whose area lies within [min_pixels, max_pixels].
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(ImageError::Corrupt(format!(
            "a {width}×{height} image cannot be resized"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(ImageError::AspectRatio { width, height });
    }
    // Python's round() rounds halves to even.
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar == 0.0 || w_bar == 0.0 {
        // Only with min_pixels 0 (transformers returns the empty size).
        return Err(ImageError::Corrupt(format!(
            "a {width}×{height} image resizes to nothing with min_pixels {min_pixels}"
        )));
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One output position's taps along a dimension: the first input index and weights in
/// fixed point.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// The antialiased bicubic filter (Keys, a = -0.5) of PIL and PyTorch.
fn cubic_aa(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// The taps along one dimension of PyTorch's 8-bit antialiased bicubic resampling (what
/// torchvision runs for a uint8 image on the CPU): weights computed in f64, normalized,
/// then rounded to 16-bit fixed point with as many fractional bits as the largest
/// weight allows. Returns the taps and those bits.
fn taps(in_size: usize, out_size: usize) -> (Vec<Taps>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut max_weight = 0f64;
    let float_taps: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let start = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(in_size as i64);
            let mut weights: Vec<f64> = (start..end)
                .map(|j| cubic_aa((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                for w in &mut weights {
                    *w /= total;
                }
            }
            max_weight = weights.iter().fold(max_weight, |m, &w| m.max(w));
            (start as usize, weights)
        })
        .collect();
    let mut bits = 0;
    while bits < 22 && ((0.5 + max_weight * f64::from(1u32 << (bits + 1))) as i64) < (1 << 15) {
        bits += 1;
    }
    let one = f64::from(1u32 << bits);
    let taps = float_taps
        .into_iter()
        .map(|(start, weights)| Taps {
            start,
            // Rounded half away from zero, as a C cast of v ± 0.5.
            weights: weights
                .iter()
                .map(|&w| {
                    let v = w * one;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect(),
        })
        .collect();
    (taps, bits)
}

/// Σ src(start + j) · w[j] in fixed point, rounded and clamped to 8 bits.
fn tap_sum(taps: &Taps, bits: u32, src: impl Fn(usize) -> u8) -> u8 {
    let mut t = 1i32 << (bits - 1);
    for (j, &w) in taps.weights.iter().enumerate() {
        t += i32::from(src(taps.start + j)) * w;
    }
    (t >> bits).clamp(0, 255) as u8
}

/// Resizes to `height × width` exactly as torchvision's `resize(uint8 image, bicubic,
/// antialias=True)` on the CPU: PyTorch's 8-bit separable resampling, along the width
/// then the height with an 8-bit image between (a dimension that keeps its size is
/// skipped).
pub fn resize_bicubic(image: &RgbImage, height: usize, width: usize) -> Cow<'_, RgbImage> {
    let mut current = Cow::Borrowed(image);
    if width != current.width {
        let (taps, bits) = taps(current.width, width);
        let mut data = vec![0u8; current.height * width * 3];
        for y in 0..current.height {
            let row = &current.data[y * current.width * 3..(y + 1) * current.width * 3];
            for (x, t) in taps.iter().enumerate() {
                for c in 0..3 {
                    data[(y * width + x) * 3 + c] = tap_sum(t, bits, |j| row[j * 3 + c]);
                }
            }
        }
        current = Cow::Owned(RgbImage {
            width,
            height: current.height,
            data,
        });
    }
    if height != current.height {
        let (taps, bits) = taps(current.height, height);
        let stride = current.width * 3;
        let mut data = vec![0u8; height * stride];
        for (y, t) in taps.iter().enumerate() {
            for i in 0..stride {
                data[y * stride + i] = tap_sum(t, bits, |j| current.data[j * stride + i]);
            }
        }
        current = Cow::Owned(RgbImage {
            width: current.width,
            height,
            data,
        });
    }
    current
}

/// An image ready for the vision tower: `grid[0] · grid[1] · grid[2]` rows of
/// `3 · temporal_patch_size · patch_size²` values each.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    /// (t, h, w) in patches.
    pub grid: [usize; 3],
    pub row_len: usize,
}

/// The Qwen2-VL image processor on one image.
pub fn preprocess(image: &RgbImage, config: &VisionPreprocess) -> Result<PixelValues, ImageError> {
    let (height, width) = config.resized_size(image.height, image.width)?;
    let resized = resize_bicubic(image, height, width);
    // Planar, with the rescale (1/255) fused into the normalization in float32, as
    // transformers does.
    let mut plane = vec![0f32; 3 * height * width];
    for c in 0..3 {
        let mean = config.image_mean[c] as f32 * 255.0;
        let std = config.image_std[c] as f32 * 255.0;
        for (i, v) in plane[c * height * width..(c + 1) * height * width]
            .iter_mut()
            .enumerate()
        {
            *v = (f32::from(resized.data[i * 3 + c]) - mean) / std;
        }
    }
    let (p, m, t) = (config.patch_size, config.merge_size, config.temporal_patch_size);
    let (grid_h, grid_w) = (height / p, width / p);
    let row_len = config.patch_width();
    let mut data = Vec::with_capacity(grid_h * grid_w * row_len);
    // Rows in merge-window order: (block row, block column, row in block, column in
    // block); each row holds channel, temporal copy, patch row, patch column.
    for bh in 0..grid_h / m {
        for bw in 0..grid_w / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for c in 0..3 {
                        for _ in 0..t {
                            for py in 0..p {
                                let at = (c * height + y0 + py) * width + x0;
                                data.extend_from_slice(&plane[at..at + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PixelValues {
        data,
        grid: [1, grid_h, grid_w],
        row_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_follows_transformers() {
        // (451, 300) -> rounds to (448, 308); tiny images grow to min_pixels; huge ones
        // shrink under max_pixels; aspect ratios over 200 are refused.
        assert_eq!(smart_resize(300, 451, 28, 3136, 1003520), Ok((308, 448)));
        assert_eq!(smart_resize(10, 10, 28, 3136, 1003520), Ok((56, 56)));
        assert_eq!(smart_resize(4000, 6000, 28, 3136, 1003520), Ok((812, 1204)));
        assert!(matches!(
            smart_resize(10, 2001, 28, 3136, 1003520),
            Err(ImageError::AspectRatio { .. })
        ));
    }

    #[test]
    fn preprocessor_config_is_read_like_transformers() {
        // Qwen2.5-VL's preprocessor_config.json: min/max_pixels win over size.
        let config = serde_json::json!({
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "size": {"shortest_edge": 1, "longest_edge": 2}, "image_processor_type": "Qwen2VLImageProcessor"
        });
        let read = VisionPreprocess::from_json(&config).unwrap();
        assert_eq!(
            read,
            VisionPreprocess {
                max_pixels: 12845056,
                ..VisionPreprocess::default()
            }
        );
        let sized = serde_json::json!({"size": {"shortest_edge": 100, "longest_edge": 5000}, "merge_size": 1});
        let read = VisionPreprocess::from_json(&sized).unwrap();
        assert_eq!((read.min_pixels, read.max_pixels, read.factor()), (100, 5000, 14));
        for bad in [
            serde_json::json!({"patch_size": 0}),
            serde_json::json!({"image_std": [0.5, 0.0, 0.5]}),
            serde_json::json!({"image_mean": [0.5, 0.5]}),
            serde_json::json!({"min_pixels": 10, "max_pixels": 5}),
        ] {
            assert!(VisionPreprocess::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn alpha_is_composited_over_white_like_pil() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn undecodable_and_oversized_images_are_refused() {
        assert_eq!(decode(b"", 1000), Err(ImageError::Empty));
        assert_eq!(decode(b"not an image at all", 1000), Err(ImageError::UnknownFormat));
        let png = include_bytes!("../../tests/fixtures/images/chelsea.png");
        assert!(matches!(
            decode(png, 1000),
            Err(ImageError::TooLarge {
                width: 451,
                height: 300,
                ..
            })
        ));
        assert!(matches!(
            decode(&png[..png.len() / 2], 1 << 20),
            Err(ImageError::Corrupt(_))
        ));
    }
}
