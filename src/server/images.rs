//! The images of a chat request: read from their URLs (`data:` or fetched under the
//! server's policy), decoded within the pixel limit and preprocessed for the model's
//! vision tower; then each `<|image_pad|>` the chat template wrote is widened to one
//! token per merged patch of its image. Blocking work: run it off the reactor.

use crate::api::openai::{ImagePart, ImageProcessorOverrides};
use crate::manager::VisionSettings;
use crate::media::fetch::{media_bytes, FetchError, FetchPolicy};
use crate::media::image::{decode, preprocess, ImageError, PixelValues, VisionPreprocess};

use super::error::ApiError;

/// The serve flags on images.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// `--no-remote-images`, `--allow-private-image-urls`, `--max-image-bytes`,
    /// `--image-fetch-timeout-secs`.
    pub fetch: FetchPolicy,
    /// `--max-images-per-request`.
    pub max_per_request: usize,
    /// `--max-image-pixels`: the largest image decoded (width × height, read from its
    /// header before decoding).
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            fetch: FetchPolicy::default(),
            max_per_request: 8,
            max_pixels: 50_000_000,
        }
    }
}

/// The model's image processor with a request's `mm_processor_kwargs`, which may narrow
/// its pixel budget but not widen it (the budget bounds each image's tokens and memory).
pub fn request_preprocess(
    model: &VisionPreprocess,
    overrides: &ImageProcessorOverrides,
) -> Result<VisionPreprocess, ApiError> {
    let mut out = model.clone();
    let smallest = model.factor() * model.factor();
    if let Some(max) = overrides.max_pixels {
        if max < smallest || max > model.max_pixels {
            return Err(ApiError::invalid(
                "mm_processor_kwargs",
                format!(
                    "`mm_processor_kwargs.max_pixels` must be between {smallest} and the model's {} (got {max})",
                    model.max_pixels
                ),
            ));
        }
        out.max_pixels = max;
        out.min_pixels = out.min_pixels.min(max);
    }
    if let Some(min) = overrides.min_pixels {
        if min > out.max_pixels {
            return Err(ApiError::invalid(
                "mm_processor_kwargs",
                format!(
                    "`mm_processor_kwargs.min_pixels` ({min}) is over the pixel budget of {}",
                    out.max_pixels
                ),
            ));
        }
        out.min_pixels = min;
    }
    Ok(out)
}

fn fetch_error(part: &ImagePart, e: FetchError) -> ApiError {
    if let FetchError::Refused { host, addr, kind } = &e {
        // The client is not told the address (it would map internal names).
        crate::warn!("refused an image URL: `{host}` resolves to {addr} ({kind})");
    }
    let code = match e {
        FetchError::DataUrl(_) | FetchError::TooLarge(_) => "invalid_image",
        _ => "invalid_image_url",
    };
    ApiError {
        code: Some(code),
        ..ApiError::invalid(part.param.clone(), format!("`{}`: {e}", part.param))
    }
}

fn image_error(part: &ImagePart, e: ImageError) -> ApiError {
    let code = match e {
        ImageError::Empty | ImageError::UnknownFormat | ImageError::Corrupt(_) => "invalid_image_format",
        ImageError::TooLarge { .. } | ImageError::AspectRatio { .. } => "invalid_image",
    };
    ApiError {
        code: Some(code),
        ..ApiError::invalid(part.param.clone(), format!("`{}`: {e}", part.param))
    }
}

/// Reads, decodes and preprocesses each image, in order. Blocking (fetches and decodes).
pub fn load_images(
    parts: &[ImagePart],
    limits: &ImageLimits,
    config: &VisionPreprocess,
) -> Result<Vec<PixelValues>, ApiError> {
    parts
        .iter()
        .map(|part| {
            let bytes = media_bytes(&part.url, &limits.fetch).map_err(|e| fetch_error(part, e))?;
            let image = decode(&bytes, limits.max_pixels).map_err(|e| image_error(part, e))?;
            drop(bytes);
            preprocess(&image, config).map_err(|e| image_error(part, e))
        })
        .collect()
}

/// `prompt` with each image token (one per image, as the chat template writes it)
/// repeated once per merged patch of its image, in order.
pub fn expand_image_tokens(
    prompt: &[u32],
    vision: &VisionSettings,
    images: &[PixelValues],
) -> Result<Vec<u32>, ApiError> {
    let placeholders = prompt.iter().filter(|&&t| t == vision.image_token).count();
    if placeholders != images.len() {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the chat template placed {placeholders} image placeholders for {} images (image placeholder tokens in message text are not allowed)",
                images.len()
            ),
        ));
    }
    let extra: usize = images.iter().map(|p| vision.tokens_for(p.grid).saturating_sub(1)).sum();
    let mut out = Vec::with_capacity(prompt.len() + extra);
    let mut images = images.iter();
    for &token in prompt {
        // (as many images as placeholders: counted above)
        match (token == vision.image_token).then(|| images.next()).flatten() {
            Some(image) => out.extend(std::iter::repeat_n(token, vision.tokens_for(image.grid))),
            None => out.push(token),
        }
    }
    Ok(out)
}
