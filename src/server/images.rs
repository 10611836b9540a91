//! The images of a chat request: read from their URLs (`data:` or fetched under the
//! server's policy), decoded within the pixel limit and preprocessed for the model's
//! vision tower; then each `<|image_pad|>` the chat template wrote is widened to one
//! token per merged patch of its image. Blocking work: run it off the reactor.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::api::openai::{ImagePart, ImageProcessorOverrides};
use crate::engine::SubmitError;
use crate::manager::VisionSettings;
use crate::media::fetch::{media_bytes, FetchError, FetchPolicy};
use crate::media::image::{decode, preprocess, smart_resize, ImageError, PixelValues, VisionPreprocess};

use super::error::ApiError;

/// The serve flags on images, and the slots that bound decoding across requests.
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
    /// Images decoded and preprocessed at once, over all requests (one per core): a
    /// burst of large images queues here instead of filling memory with decoded
    /// pixels. Fetches do not hold a slot.
    pub decode_slots: Arc<Semaphore>,
}

impl ImageLimits {
    pub fn new(fetch: FetchPolicy, max_per_request: usize, max_pixels: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ImageLimits {
            fetch,
            max_per_request,
            max_pixels,
            decode_slots: Arc::new(Semaphore::new(cores)),
        }
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits::new(FetchPolicy::default(), 8, 50_000_000)
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

/// Reads, decodes and preprocesses each image, in order, refusing the request as soon
/// as its text and image tokens reach the context window (`max_model_len`). Blocking (fetches and decodes): call it on the blocking pool, inside a
/// tokio runtime (decode slots are awaited there).
pub fn load_images(
    parts: &[ImagePart],
    limits: &ImageLimits,
    vision: &VisionSettings,
    config: &VisionPreprocess,
    text_tokens: usize,
    max_model_len: usize,
) -> Result<Vec<PixelValues>, ApiError> {
    let mut tokens = text_tokens;
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let bytes = media_bytes(&part.url, &limits.fetch).map_err(|e| fetch_error(part, e))?;
        let _slot = tokio::runtime::Handle::try_current()
            .ok()
            .and_then(|rt| rt.block_on(limits.decode_slots.clone().acquire_owned()).ok());
        let image = decode(&bytes, limits.max_pixels).map_err(|e| image_error(part, e))?;
        drop(bytes);
        let (height, width) = smart_resize(
            image.height,
            image.width,
            config.factor(),
            config.min_pixels,
            config.max_pixels,
        )
        .map_err(|e| image_error(part, e))?;
        tokens += vision.tokens_for([1, height / config.patch_size, width / config.patch_size]);
        if tokens >= max_model_len {
            // The placeholder's own token is in `text_tokens`; the count is a bound.
            return Err(ApiError::from(SubmitError::PromptTooLong {
                prompt: tokens,
                max: max_model_len,
            }));
        }
        out.push(preprocess(&image, config).map_err(|e| image_error(part, e))?);
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vision() -> VisionSettings {
        VisionSettings {
            preprocess: VisionPreprocess::default(),
            image_token: 9,
        }
    }

    fn image(grid: [usize; 3]) -> PixelValues {
        PixelValues {
            data: Vec::new(),
            grid,
            row_len: 0,
        }
    }

    #[test]
    fn each_placeholder_becomes_one_token_per_merged_patch_of_its_image() {
        let images = [image([1, 4, 6]), image([1, 2, 2])];
        let out = expand_image_tokens(&[1, 8, 9, 7, 8, 9, 7, 3], &vision(), &images).unwrap();
        let mut want = vec![1, 8];
        want.extend([9; 6]);
        want.extend([7, 8, 9, 7, 3]);
        assert_eq!(out, want);
        // Placeholders and images must pair up.
        assert!(expand_image_tokens(&[1, 9, 9], &vision(), &images[..1]).is_err());
        assert!(expand_image_tokens(&[1, 2], &vision(), &images[..1]).is_err());
        assert_eq!(expand_image_tokens(&[1, 2], &vision(), &[]).unwrap(), vec![1, 2]);
    }

    #[test]
    fn a_request_may_narrow_the_pixel_budget_but_not_widen_it() {
        let model = VisionPreprocess::default();
        let narrow = ImageProcessorOverrides {
            min_pixels: None,
            max_pixels: Some(100_000),
        };
        let config = request_preprocess(&model, &narrow).unwrap();
        assert_eq!((config.min_pixels, config.max_pixels), (model.min_pixels, 100_000));
        let tiny = ImageProcessorOverrides {
            min_pixels: None,
            max_pixels: Some(28 * 28),
        };
        // min_pixels follows a budget under it.
        assert_eq!(request_preprocess(&model, &tiny).unwrap().min_pixels, 28 * 28);
        for bad in [
            (None, Some(model.max_pixels + 1)),
            (None, Some(100)),
            (Some(200_000), Some(100_000)),
            (Some(model.max_pixels + 1), None),
        ] {
            let overrides = ImageProcessorOverrides {
                min_pixels: bad.0,
                max_pixels: bad.1,
            };
            assert!(request_preprocess(&model, &overrides).is_err(), "{bad:?}");
        }
    }
}
