//! The images of a chat request: read from their URLs (`data:` or fetched under the
//! server's policy, a bounded number of requests fetching at once), decoded within the
//! pixel limit (one image per core at once, server-wide) and preprocessed for the
//! model's vision tower within the server's image memory; then each `<|image_pad|>` the
//! chat template wrote is widened to one token per merged patch of its image.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::openai::{ImagePart, ImageProcessorOverrides};
use crate::engine::SubmitError;
use crate::manager::VisionSettings;
use crate::media::fetch::{media_bytes, FetchError, FetchPolicy};
use crate::media::image::{decode, preprocess, ImageError, PixelValues, VisionPreprocess};

use crate::api::ApiError;

/// The pixel budget of a `detail: "low"` image (OpenAI's low resolution, 512 × 512).
pub const LOW_DETAIL_PIXELS: usize = 512 * 512;

/// Requests fetching image URLs at once (each holds a blocking thread while it does).
const FETCH_SLOTS: usize = 64;

/// The serve flags on images, and what bounds image work across requests.
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
    /// `--max-image-memory`, in KiB: the preprocessed pixel values (4704 bytes per
    /// patch) all requests in flight may hold, from preprocessing to the end of the
    /// reply; past it a request is answered 503.
    memory_kib: u32,
    memory: Arc<Semaphore>,
    fetch_slots: Arc<Semaphore>,
}

impl ImageLimits {
    pub fn new(fetch: FetchPolicy, max_per_request: usize, max_pixels: u64, max_memory_bytes: u64) -> Self {
        let memory_kib = (max_memory_bytes >> 10).min(u64::from(u32::MAX >> 3)) as u32;
        ImageLimits {
            fetch,
            max_per_request,
            max_pixels,
            memory_kib,
            memory: Arc::new(Semaphore::new(memory_kib as usize)),
            fetch_slots: Arc::new(Semaphore::new(FETCH_SLOTS)),
        }
    }
}

/// A request's share of the image memory, given back when the request ends (dropped).
pub struct ImageMemory(#[allow(dead_code)] Vec<OwnedSemaphorePermit>);

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
                "mm_processor_kwargs.max_pixels",
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
        if min == 0 {
            return Err(ApiError::invalid(
                "mm_processor_kwargs.min_pixels",
                "`mm_processor_kwargs.min_pixels` must be at least 1",
            ));
        }
        if min > out.max_pixels {
            return Err(ApiError::invalid(
                "mm_processor_kwargs.min_pixels",
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

/// Reads, decodes and preprocesses each image, in order, one at a time (so a request
/// holds one image's file bytes at most): `data:` URLs decoded and other URLs fetched
/// under the policy (at most `FETCH_SLOTS` fetches at once: the others wait without
/// holding a thread), then decoded and preprocessed holding a `media_permits` slot.
/// Refused as soon as the text and image tokens reach the context window
/// (`max_model_len`; `text_tokens` counts each image's placeholder) or the pixel values
/// do not fit the server's image memory.
pub async fn load_images(
    parts: &[ImagePart],
    limits: &ImageLimits,
    vision: &VisionSettings,
    config: &VisionPreprocess,
    text_tokens: usize,
    max_model_len: usize,
) -> Result<(Vec<PixelValues>, ImageMemory), ApiError> {
    let mut tokens = text_tokens;
    let mut pixels = Vec::with_capacity(parts.len());
    let mut memory = Vec::with_capacity(parts.len());
    for part in parts {
        let bytes = fetch_image(part, limits).await?;
        let permit = super::media_permits()
            .acquire()
            .await
            .map_err(|_| ApiError::internal("image preparation is shut down"))?;
        let (part, limits, vision, config) = (part.clone(), limits.clone(), vision.clone(), config.clone());
        let (image, held, total) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut tokens = tokens;
            prepare_image(&part, &bytes, &limits, &vision, &config, &mut tokens, max_model_len)
                .map(|(image, held)| (image, held, tokens))
        })
        .await
        .map_err(|e| ApiError::internal(format!("image preparation failed: {e}")))??;
        tokens = total;
        pixels.push(image);
        memory.push(held);
    }
    Ok((pixels, ImageMemory(memory)))
}

/// One image's bytes: a `data:` URL's payload, or the URL fetched under the policy.
async fn fetch_image(part: &ImagePart, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    let remote = !part.url.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:"));
    let slot = match remote {
        true => Some(
            limits
                .fetch_slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ApiError::internal("image fetching is shut down"))?,
        ),
        false => None,
    };
    let (part, policy) = (part.clone(), limits.fetch.clone());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        media_bytes(&part.url, &policy).map_err(|e| fetch_error(&part, e))
    })
    .await
    .map_err(|e| ApiError::internal(format!("image fetch task failed: {e}")))?
}

/// Decodes and preprocesses one image, adding its tokens to `tokens` (less its
/// placeholder) and taking its pixel values out of the image memory. Blocking.
fn prepare_image(
    part: &ImagePart,
    bytes: &[u8],
    limits: &ImageLimits,
    vision: &VisionSettings,
    config: &VisionPreprocess,
    tokens: &mut usize,
    max_model_len: usize,
) -> Result<(PixelValues, OwnedSemaphorePermit), ApiError> {
    let low;
    let config = match part.low_detail && config.max_pixels > LOW_DETAIL_PIXELS {
        true => {
            low = VisionPreprocess {
                max_pixels: LOW_DETAIL_PIXELS,
                min_pixels: config.min_pixels.min(LOW_DETAIL_PIXELS),
                ..config.clone()
            };
            &low
        }
        false => config,
    };
    let image = decode(bytes, limits.max_pixels).map_err(|e| image_error(part, e))?;
    let (height, width) = config
        .resized_size(image.height, image.width)
        .map_err(|e| image_error(part, e))?;
    // The placeholder, counted already, becomes the image's tokens.
    *tokens += vision.tokens_for([1, height / config.patch_size, width / config.patch_size]) - 1;
    if *tokens >= max_model_len {
        return Err(ApiError::from(SubmitError::PromptTooLong {
            prompt: *tokens,
            max: max_model_len,
        }));
    }
    let patches = (height / config.patch_size) * (width / config.patch_size);
    let bytes = patches * config.patch_width() * std::mem::size_of::<f32>();
    let held = take_memory(limits, part, bytes.div_ceil(1024))?;
    let pixels = preprocess(&image, config).map_err(|e| image_error(part, e))?;
    Ok((pixels, held))
}

/// `kib` of the image memory, or the reason there is none: 400 for an image larger than
/// all of it, 503 (retry) while other requests hold it.
fn take_memory(limits: &ImageLimits, part: &ImagePart, kib: usize) -> Result<OwnedSemaphorePermit, ApiError> {
    if kib > limits.memory_kib as usize {
        return Err(ApiError {
            code: Some("invalid_image"),
            ..ApiError::invalid(
                part.param.clone(),
                format!(
                    "`{}`: its pixel values take {} MiB, more than the server's image memory of {} MiB (--max-image-memory); lower mm_processor_kwargs.max_pixels",
                    part.param,
                    kib >> 10,
                    limits.memory_kib >> 10
                ),
            )
        });
    }
    limits
        .memory
        .clone()
        .try_acquire_many_owned(kib as u32)
        .map_err(|_| ApiError {
            message:
                "the images of requests in flight fill the server's image memory (--max-image-memory); retry shortly"
                    .into(),
            ..ApiError::from(SubmitError::Overloaded { waiting: 0 })
        })
}

/// Refuses a prompt whose image placeholders (as the chat template wrote them) are not
/// one per image, as when a placeholder is typed into a message's text.
pub fn check_placeholders(prompt: &[u32], vision: &VisionSettings, images: usize) -> Result<(), ApiError> {
    let placeholders = prompt.iter().filter(|&&t| t == vision.image_token).count();
    if placeholders != images {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the chat template placed {placeholders} image placeholders for {images} images (image placeholder tokens in message text are not allowed)"
            ),
        ));
    }
    Ok(())
}

/// `prompt` with each image token (one per image, as the chat template writes it)
/// repeated once per merged patch of its image, in order.
pub fn expand_image_tokens(
    prompt: &[u32],
    vision: &VisionSettings,
    images: &[PixelValues],
) -> Result<Vec<u32>, ApiError> {
    check_placeholders(prompt, vision, images.len())?;
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

    /// The 200×200 fixture: 14 × 14 patches, 49 tokens, 901 KiB of pixel values.
    fn board() -> (ImagePart, Vec<u8>) {
        let bytes = include_bytes!("../../tests/fixtures/images/chessboard_RGB.png").to_vec();
        let part = ImagePart {
            url: "data:".into(),
            param: "messages[0].content[0].image_url.url".into(),
            low_detail: false,
        };
        (part, bytes)
    }

    #[test]
    fn images_count_against_the_context_window_and_the_image_memory() {
        let (vision, config) = (vision(), VisionPreprocess::default());
        let limits = ImageLimits::new(FetchPolicy::default(), 8, 1 << 24, 901 << 10);
        let (part, bytes) = board();
        let prepare = |limits: &ImageLimits, max_model_len| {
            // 10 text tokens, one of them the placeholder: 9 + 49 = 58 tokens.
            let mut tokens = 10;
            prepare_image(&part, &bytes, limits, &vision, &config, &mut tokens, max_model_len).map(|r| (r, tokens))
        };
        let ((pixels, held), tokens) = prepare(&limits, 59).unwrap();
        assert_eq!((vision.tokens_for(pixels.grid), tokens), (49, 58));
        let e = prepare(&limits, 58).err().unwrap();
        assert_eq!(e.code, Some("context_length_exceeded"));
        // The memory is held while the first request runs: the next one is told to retry.
        let e = prepare(&limits, 59).err().unwrap();
        assert_eq!(e.status, hyper::StatusCode::SERVICE_UNAVAILABLE, "{e:?}");
        drop(held);
        assert!(prepare(&limits, 59).is_ok());
        // An image larger than all of it is the request's error.
        let small = ImageLimits::new(FetchPolicy::default(), 8, 1 << 24, 900 << 10);
        let e = prepare(&small, 59).err().unwrap();
        assert_eq!((e.status.as_u16(), e.code), (400, Some("invalid_image")), "{e:?}");
    }

    #[test]
    fn low_detail_caps_an_image_at_512_by_512_pixels() {
        let (vision, config) = (vision(), VisionPreprocess::default());
        let limits = ImageLimits::new(FetchPolicy::default(), 8, 1 << 24, 1 << 30);
        // 640 × 427: over 512 × 512 pixels.
        let bytes = include_bytes!("../../tests/fixtures/images/rocket.jpg");
        let tokens_at = |low_detail| {
            let part = ImagePart {
                url: "data:".into(),
                param: "p".into(),
                low_detail,
            };
            let mut tokens = 1;
            let (pixels, _) = prepare_image(&part, bytes, &limits, &vision, &config, &mut tokens, 4096).unwrap();
            let [_, h, w] = pixels.grid;
            assert!(
                h * w * config.patch_size * config.patch_size
                    <= if low_detail {
                        LOW_DETAIL_PIXELS
                    } else {
                        config.max_pixels
                    }
            );
            tokens
        };
        let (auto, low) = (tokens_at(false), tokens_at(true));
        assert_eq!(auto, 345);
        assert!(low < auto, "low {low}, auto {auto}");
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
            (Some(0), None),
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
