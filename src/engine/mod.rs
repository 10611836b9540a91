//! Driving generation. This is the single-sequence driver used by `inferd generate` and
//! the numerics tests: it already speaks the paged KV layout (block table + slot mapping)
//! that the continuous-batching scheduler shares, with one sequence owning every block.

pub mod sampling;

use std::time::Instant;

use crate::backend::{Backend, ForwardBatch};
use crate::models::{DecoderModel, ForwardError, LogitsFor};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    /// Generation ends after emitting any of these (the token is included in the output).
    pub stop_token_ids: Vec<u32>,
    pub block_size: usize,
    /// Longest prompt chunk per forward pass (chunked prefill).
    pub max_prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 128,
            stop_token_ids: Vec::new(),
            block_size: 16,
            max_prefill_chunk: 512,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    /// Time of the decode steps (every generated token after the first).
    pub decode_secs: f64,
}

impl GenerateStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens; the model's context is {max}")]
    PromptTooLong { prompt: usize, max: usize },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Greedy decoding of one sequence. `on_token` sees each new id and returns `false` to
/// stop early. Returns the generated ids.
pub fn generate_greedy<B: Backend>(
    backend: &B,
    model: &DecoderModel<B>,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenerateStats), GenerateError> {
    let max_len = model.config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() >= max_len {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            max: max_len,
        });
    }
    let max_new = params.max_new_tokens.min(max_len - prompt.len());
    let total = prompt.len() + max_new;
    let block_size = params.block_size;
    let num_blocks = total.div_ceil(block_size).max(1);
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(num_blocks, block_size));
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut output = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok((output, stats));
    }

    let start = Instant::now();
    let mut logits = None;
    for (i, chunk) in prompt.chunks(params.max_prefill_chunk.max(1)).enumerate() {
        let batch = ForwardBatch::single(chunk, i * params.max_prefill_chunk.max(1), &block_table, block_size);
        logits = Some(model.forward(backend, &batch, &mut cache, LogitsFor::LastOfEachSequence)?);
    }
    let (values, _, _) = backend.to_host(&logits.expect("prompt is not empty"));
    let mut next = sampling::argmax(&values);
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    loop {
        output.push(next);
        stats.generated_tokens += 1;
        if !on_token(next) || params.stop_token_ids.contains(&next) || output.len() == max_new {
            break;
        }
        let batch = ForwardBatch::single(&[next], prompt.len() + output.len() - 1, &block_table, block_size);
        let logits = model.forward(backend, &batch, &mut cache, LogitsFor::LastOfEachSequence)?;
        let (values, _, _) = backend.to_host(&logits);
        next = sampling::argmax(&values);
    }
    stats.decode_secs = start.elapsed().as_secs_f64();
    Ok((output, stats))
}
