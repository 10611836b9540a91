//! Qwen2.5-VL's vision tower, written over the backend trait: patches (from
//! `media::image::preprocess`) embedded by the 3-D patch convolution (a linear map over a
//! flattened patch), blocks of RMSNorm, attention with 2-D rotary positions (height and
//! width) and a SwiGLU MLP, attending within windows of 4 × 4 merged tokens except in the
//! full-attention blocks, then the patch merger (RMSNorm, 2 × 2 patches concatenated, an
//! MLP with GELU) to one embedding per merged token, in the processor's order.
//!
//! The language model is `models::llama`'s decoder (a Qwen2) with multimodal rotary
//! positions (M-RoPE): each image's run of `<|image_pad|>` tokens takes the image's
//! features in place of token embeddings, and (time, height, width) positions; text
//! positions go on after an image from its largest position plus one.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::llama::Rope;
use super::{check_batch, DecoderConfig, DecoderModel, EncoderInput, EngineModel, ForwardError, LogitsFor, ModelError};
use crate::backend::{AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape, MAX_HEAD_DIM};
use crate::loader::safetensors::{Checkpoint, TensorView};
use crate::loader::LoadError;
use crate::media::image::PixelValues;

/// `vision_config` of a Qwen2.5-VL `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn from_json(config: &Value) -> Result<Self, String> {
        let v = config
            .get("vision_config")
            .ok_or("config.json has no `vision_config`")?;
        let get = |key: &str, default: Option<usize>| -> Result<usize, String> {
            match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("vision_config.{key} must be a positive integer")),
                None => default.ok_or_else(|| format!("vision_config.{key} is missing")),
            }
        };
        let c = VisionConfig {
            depth: get("depth", None)?,
            hidden_size: get("hidden_size", None)?,
            intermediate_size: get("intermediate_size", None)?,
            num_heads: get("num_heads", None)?,
            in_channels: get("in_chans", Some(3))?,
            out_hidden_size: get("out_hidden_size", None)?,
            patch_size: get("patch_size", Some(14))?,
            spatial_merge_size: get("spatial_merge_size", Some(2))?,
            temporal_patch_size: get("temporal_patch_size", Some(2))?,
            window_size: get("window_size", Some(112))?,
            fullatt_block_indexes: v
                .get("fullatt_block_indexes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).map(|n| n as usize).collect())
                .unwrap_or_default(),
            rope_theta: v
                .get("rope_theta")
                .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
        };
        let head_dim = c.hidden_size / c.num_heads;
        if !c.hidden_size.is_multiple_of(c.num_heads) || !head_dim.is_multiple_of(4) || head_dim > MAX_HEAD_DIM {
            return Err(format!(
                "vision_config: hidden_size {} over {} heads must give a head size divisible by 4 and at most 512",
                c.hidden_size, c.num_heads
            ));
        }
        if !c.window_size.is_multiple_of(c.spatial_merge_size * c.patch_size) {
            return Err("vision_config.window_size must be a multiple of patch_size × spatial_merge_size".into());
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn patch_width(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

struct VisionBlock<B: Backend> {
    norm1: B::Weight,
    norm2: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    q_bias: B::Weight,
    k_bias: B::Weight,
    v_bias: B::Weight,
    proj: B::Weight,
    proj_bias: B::Weight,
    gate_up: B::Weight,
    gate_up_bias: B::Weight,
    down: B::Weight,
    down_bias: B::Weight,
}

pub struct VisionTower<B: Backend> {
    config: VisionConfig,
    patch_embed: B::Weight,
    blocks: Vec<VisionBlock<B>>,
    merger_norm: B::Weight,
    merger_fc1: B::Weight,
    merger_fc1_bias: B::Weight,
    merger_fc2: B::Weight,
    merger_fc2_bias: B::Weight,
    /// The height frequencies then the same for the width (`head_dim / 2`).
    inv_freq: B::Weight,
}

/// The rows `part` of 3 of a `[3n, cols]` tensor (the fused qkv projection), as a view.
fn third<'a>(t: &TensorView<'a>, part: usize, shape: &'a [usize]) -> TensorView<'a> {
    let len = t.bytes.len() / 3;
    TensorView {
        shape,
        bytes: &t.bytes[part * len..(part + 1) * len],
        ..*t
    }
}

impl<B: Backend> VisionTower<B> {
    /// The tensors under `visual.` (the hub's names) with their shapes.
    pub fn tensor_shapes(config: &VisionConfig) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let merged = h * config.merge_unit();
        let p = config.patch_size;
        let mut expected: Vec<(String, Vec<usize>)> = vec![(
            "visual.patch_embed.proj.weight".into(),
            vec![h, config.in_channels, config.temporal_patch_size, p, p],
        )];
        for b in 0..config.depth {
            let q = |s: &str| format!("visual.blocks.{b}.{s}");
            expected.extend([
                (q("norm1.weight"), vec![h]),
                (q("norm2.weight"), vec![h]),
                (q("attn.qkv.weight"), vec![3 * h, h]),
                (q("attn.qkv.bias"), vec![3 * h]),
                (q("attn.proj.weight"), vec![h, h]),
                (q("attn.proj.bias"), vec![h]),
                (q("mlp.gate_proj.weight"), vec![i, h]),
                (q("mlp.gate_proj.bias"), vec![i]),
                (q("mlp.up_proj.weight"), vec![i, h]),
                (q("mlp.up_proj.bias"), vec![i]),
                (q("mlp.down_proj.weight"), vec![h, i]),
                (q("mlp.down_proj.bias"), vec![h]),
            ]);
        }
        expected.extend([
            ("visual.merger.ln_q.weight".into(), vec![h]),
            ("visual.merger.mlp.0.weight".into(), vec![merged, merged]),
            ("visual.merger.mlp.0.bias".into(), vec![merged]),
            (
                "visual.merger.mlp.2.weight".into(),
                vec![config.out_hidden_size, merged],
            ),
            ("visual.merger.mlp.2.bias".into(), vec![config.out_hidden_size]),
        ]);
        expected
    }

    /// The tensors under `visual.` (the hub's names), every shape checked first.
    pub fn load(backend: &B, config: VisionConfig, checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        for (name, shape) in &Self::tensor_shapes(&config) {
            checkpoint.tensor(name)?.expect_shape(shape)?;
        }
        let get = |name: &str| checkpoint.tensor(name);
        let vector = |names: &[String]| super::stacked_vector(backend, checkpoint, names);
        let embed = get("visual.patch_embed.proj.weight")?;
        let embed_shape = [h, config.patch_width()];
        let patch_embed = backend.weight(&TensorView {
            shape: &embed_shape,
            ..embed
        });
        let square = [h, h];
        let mut blocks = Vec::with_capacity(config.depth);
        for b in 0..config.depth {
            let name = |s: &str| format!("visual.blocks.{b}.{s}");
            let qkv = get(&name("attn.qkv.weight"))?;
            let qkv_bias = get(&name("attn.qkv.bias"))?.to_f32_vec();
            blocks.push(VisionBlock {
                norm1: backend.weight(&get(&name("norm1.weight"))?),
                norm2: backend.weight(&get(&name("norm2.weight"))?),
                q: backend.weight(&third(&qkv, 0, &square)),
                k: backend.weight(&third(&qkv, 1, &square)),
                v: backend.weight(&third(&qkv, 2, &square)),
                q_bias: backend.weight_from_f32(qkv_bias[..h].to_vec()),
                k_bias: backend.weight_from_f32(qkv_bias[h..2 * h].to_vec()),
                v_bias: backend.weight_from_f32(qkv_bias[2 * h..].to_vec()),
                proj: backend.weight(&get(&name("attn.proj.weight"))?),
                proj_bias: backend.weight(&get(&name("attn.proj.bias"))?),
                gate_up: backend
                    .weight_stacked(&[get(&name("mlp.gate_proj.weight"))?, get(&name("mlp.up_proj.weight"))?]),
                gate_up_bias: vector(&[name("mlp.gate_proj.bias"), name("mlp.up_proj.bias")])?,
                down: backend.weight(&get(&name("mlp.down_proj.weight"))?),
                down_bias: backend.weight(&get(&name("mlp.down_proj.bias"))?),
            });
        }
        // Axial rotary: head_dim / 4 frequencies over (head_dim / 2), for the height and
        // again for the width.
        let spatial = config.head_dim() / 2;
        let freqs: Vec<f32> = (0..spatial / 2)
            .map(|k| (1.0 / config.rope_theta.powf((2 * k) as f64 / spatial as f64)) as f32)
            .collect();
        let inv_freq = backend.weight_from_f32(freqs.iter().chain(&freqs).copied().collect());
        Ok(VisionTower {
            patch_embed,
            blocks,
            merger_norm: backend.weight(&get("visual.merger.ln_q.weight")?),
            merger_fc1: backend.weight(&get("visual.merger.mlp.0.weight")?),
            merger_fc1_bias: backend.weight(&get("visual.merger.mlp.0.bias")?),
            merger_fc2: backend.weight(&get("visual.merger.mlp.2.weight")?),
            merger_fc2_bias: backend.weight(&get("visual.merger.mlp.2.bias")?),
            inv_freq,
            config,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Image embeddings `[Σ t·h·w / merge², out_hidden_size]` for the images in order
    /// (each image's rows in the processor's order, as the language model splices them).
    pub fn forward(&self, backend: &B, images: &[PixelValues]) -> B::Tensor {
        let c = &self.config;
        let unit = c.merge_unit();
        let layout = Layout::of(c, images);
        // Patches, reordered window by window (whole merge units at a time).
        let mut values = Vec::with_capacity(layout.patches * c.patch_width());
        for image in images {
            assert_eq!(image.row_len, c.patch_width(), "vision: patch width");
            values.extend_from_slice(&image.data);
        }
        let patches = backend.upload(values, layout.patches, c.patch_width());
        let rows: Vec<usize> = layout
            .window_index
            .iter()
            .flat_map(|&u| u * unit..(u + 1) * unit)
            .collect();
        let patches = backend.gather_rows(&patches, &rows);
        let positions: Vec<[u32; 3]> = rows.iter().map(|&r| layout.positions[r]).collect();
        let mut x = backend.linear(&patches, &self.patch_embed, None);

        let hd = c.head_dim();
        let q_shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: 0,
            head_dim: hd,
        };
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_heads,
            head_dim: hd,
        };
        let sections = [hd / 4, hd / 4, 0];
        for (b, block) in self.blocks.iter().enumerate() {
            let segments = if c.fullatt_block_indexes.contains(&b) {
                &layout.images
            } else {
                &layout.windows
            };
            let normed = backend.rms_norm(&x, &block.norm1, 1e-6);
            let mut q = backend.linear(&normed, &block.q, Some(&block.q_bias));
            let mut k = backend.linear(&normed, &block.k, Some(&block.k_bias));
            let v = backend.linear(&normed, &block.v, Some(&block.v_bias));
            backend.rotary_sections(&mut q, &positions, sections, &self.inv_freq, q_shape);
            backend.rotary_sections(&mut k, &positions, sections, &self.inv_freq, q_shape);
            let kv: Vec<(B::Tensor, B::Tensor)> = segments
                .iter()
                .map(|&(start, len)| {
                    let rows: Vec<usize> = (start..start + len).collect();
                    (backend.gather_rows(&k, &rows), backend.gather_rows(&v, &rows))
                })
                .collect();
            let seqs: Vec<DenseAttention<'_, B::Tensor>> = segments
                .iter()
                .zip(&kv)
                .map(|(&(start, len), (k, v))| DenseAttention {
                    q_start: start,
                    q_len: len,
                    k,
                    v,
                })
                .collect();
            let attended = backend.attention_dense(&q, &seqs, shape, false);
            let out = backend.linear(&attended, &block.proj, Some(&block.proj_bias));
            backend.add(&mut x, &out);
            let normed = backend.rms_norm(&x, &block.norm2, 1e-6);
            let gate_up = backend.linear(&normed, &block.gate_up, Some(&block.gate_up_bias));
            let out = backend.linear(&backend.silu_mul(&gate_up), &block.down, Some(&block.down_bias));
            backend.add(&mut x, &out);
        }
        // The merger: each merge unit's rows side by side, then the MLP.
        let normed = backend.rms_norm(&x, &self.merger_norm, 1e-6);
        let (values, rows, cols) = backend.to_host(normed);
        let merged = backend.upload(values, rows / unit, cols * unit);
        let mut hidden = backend.linear(&merged, &self.merger_fc1, Some(&self.merger_fc1_bias));
        backend.gelu(&mut hidden);
        let out = backend.linear(&hidden, &self.merger_fc2, Some(&self.merger_fc2_bias));
        // Back from window order to the processor's.
        let mut back = vec![0usize; layout.window_index.len()];
        for (i, &u) in layout.window_index.iter().enumerate() {
            back[u] = i;
        }
        backend.gather_rows(&out, &back)
    }
}

/// Where every patch goes: its (height, width) position, the order of merge units by
/// window, and the attention segments (row ranges after that reordering).
struct Layout {
    patches: usize,
    /// Per patch, in the processor's order: [height, width, 0].
    positions: Vec<[u32; 3]>,
    /// Merge units (global index) in window order.
    window_index: Vec<usize>,
    /// (first row, rows) of each non-empty window, and of each image's frame.
    windows: Vec<(usize, usize)>,
    images: Vec<(usize, usize)>,
}

impl Layout {
    fn of(c: &VisionConfig, images: &[PixelValues]) -> Layout {
        let m = c.spatial_merge_size;
        let unit = c.merge_unit();
        let window = c.window_size / m / c.patch_size;
        let mut layout = Layout {
            patches: 0,
            positions: Vec::new(),
            window_index: Vec::new(),
            windows: Vec::new(),
            images: Vec::new(),
        };
        let mut first_unit = 0;
        for image in images {
            let [t, h, w] = image.grid;
            let (lh, lw) = (h / m, w / m);
            // Positions: block-major over the m × m merge blocks.
            for _ in 0..t {
                for bh in 0..lh {
                    for bw in 0..lw {
                        for mh in 0..m {
                            for mw in 0..m {
                                layout.positions.push([(bh * m + mh) as u32, (bw * m + mw) as u32, 0]);
                            }
                        }
                    }
                }
            }
            // Windows of `window × window` merged tokens, padded at the bottom and the
            // right (a full extra window when a side divides evenly, as transformers
            // does; empty windows vanish).
            let (nh, nw) = (
                (lh + window - lh % window) / window,
                (lw + window - lw % window) / window,
            );
            let image_start = layout.patches;
            for f in 0..t {
                for wh in 0..nh {
                    for ww in 0..nw {
                        let before = layout.window_index.len();
                        for y in wh * window..((wh + 1) * window).min(lh) {
                            for x in ww * window..((ww + 1) * window).min(lw) {
                                layout.window_index.push(first_unit + (f * lh + y) * lw + x);
                            }
                        }
                        let units = layout.window_index.len() - before;
                        if units > 0 {
                            layout.windows.push((before * unit, units * unit));
                        }
                    }
                }
            }
            // Full attention: each frame on its own.
            for f in 0..t {
                layout.images.push((image_start + f * lh * lw * unit, lh * lw * unit));
            }
            let units = t * lh * lw;
            first_unit += units;
            layout.patches += units * unit;
        }
        layout
    }
}

/// M-RoPE positions of a prompt whose images (their grids in `grids`, in order) each
/// appear as one run of `image_token`s, one per merged patch; and the delta later
/// positions take (`position = index + delta`). transformers' `get_rope_index` for
/// images: text counts on from the last position; an image at `start` takes
/// `(start, start + row, start + column)`, and the text after it starts at `start +
/// max(rows, columns)`.
pub fn mrope_positions(
    prompt: &[u32],
    image_token: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<(Vec<[u32; 3]>, i64), String> {
    let mut positions = Vec::with_capacity(prompt.len());
    let mut grids = grids.iter();
    let mut next = 0u32;
    let mut i = 0;
    while i < prompt.len() {
        if prompt[i] != image_token {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let run = prompt[i..].iter().take_while(|&&t| t == image_token).count();
        let &[t, h, w] = grids.next().ok_or("the prompt has more image token runs than images")?;
        let (lh, lw) = (h / merge, w / merge);
        if run != t * lh * lw {
            return Err(format!(
                "an image of {} tokens has a run of {run} image tokens",
                t * lh * lw
            ));
        }
        for ti in 0..t {
            for y in 0..lh {
                for x in 0..lw {
                    positions.push([next + ti as u32, next + y as u32, next + x as u32]);
                }
            }
        }
        next += lh.max(lw) as u32;
        i += run;
    }
    if grids.next().is_some() {
        return Err("there are more images than image token runs in the prompt".into());
    }
    Ok((positions, i64::from(next) - prompt.len() as i64))
}

/// What the model keeps for a request with images.
struct ImagePrompt {
    /// Image features, one row of `hidden` values per image token, in prompt order.
    features: Vec<f32>,
    /// Prompt index of every image token, in order (row `k` of `features` is token
    /// `image_rows[k]`).
    image_rows: Vec<usize>,
    positions: Vec<[u32; 3]>,
    delta: i64,
}

/// Qwen2.5-VL: the vision tower and the language model.
pub struct VisionLanguageModel<B: Backend> {
    decoder: DecoderModel<B>,
    vision: VisionTower<B>,
    image_token: u32,
    sections: [usize; 3],
    requests: HashMap<u64, ImagePrompt>,
}

impl<B: Backend> VisionLanguageModel<B> {
    /// Reads a Qwen2.5-VL folder (`config.json` with its `vision_config`, the weights).
    pub fn load(backend: &B, dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        Self::from_dir(backend, dir, false, progress)
    }

    /// Reads `config.json` alone and makes seeded random weights for it, the vision
    /// tower's too (`--load-format dummy`).
    pub fn load_dummy(backend: &B, dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        Self::from_dir(backend, dir, true, progress)
    }

    fn from_dir(
        backend: &B,
        dir: &Path,
        dummy: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let config = DecoderConfig::from_dir(dir)?;
        let path = dir.join("config.json");
        let invalid = |reason: String| super::ConfigError::Invalid {
            path: path.clone(),
            reason,
        };
        let raw: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("unreadable".into()))?;
        let sections = config
            .mrope_section
            .ok_or_else(|| invalid("a vision-language model needs rope_scaling.mrope_section".into()))?;
        let image_token = raw
            .get("image_token_id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| invalid("image_token_id is missing".into()))?;
        let vision_config = VisionConfig::from_json(&raw).map_err(invalid)?;
        if vision_config.out_hidden_size != config.hidden_size {
            return Err(invalid(format!(
                "vision_config.out_hidden_size {} differs from hidden_size {}",
                vision_config.out_hidden_size, config.hidden_size
            ))
            .into());
        }
        let checkpoint = if dummy {
            let mut tensors = DecoderModel::<B>::tensor_shapes(&config);
            tensors.extend(VisionTower::<B>::tensor_shapes(&vision_config));
            super::dummy_checkpoint(&tensors, 0)?
        } else {
            Checkpoint::open(dir)?
        };
        let decoder = DecoderModel::load(backend, config, &checkpoint, progress)?;
        let vision = VisionTower::load(backend, vision_config, &checkpoint)?;
        Ok(VisionLanguageModel {
            decoder,
            vision,
            image_token,
            sections,
            requests: HashMap::new(),
        })
    }

    pub fn decoder_config(&self) -> &DecoderConfig {
        self.decoder.config()
    }

    pub fn image_token(&self) -> u32 {
        self.image_token
    }

    pub fn vision(&self) -> &VisionTower<B> {
        &self.vision
    }
}

impl<B: Backend + 'static> EngineModel<B> for VisionLanguageModel<B>
where
    B::Weight: 'static,
{
    fn vocab_size(&self) -> usize {
        self.decoder.vocab_size()
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        self.decoder.kv_cache_shape(num_blocks, block_size)
    }

    fn encoder_input_kind(&self) -> Option<&'static str> {
        Some("image")
    }

    fn begin_request(
        &mut self,
        backend: &B,
        key: u64,
        prompt: &[u32],
        input: &EncoderInput,
    ) -> Result<(), ForwardError> {
        let EncoderInput::Images(images) = input else {
            return Err(ForwardError::BadEncoderInput(format!(
                "this model takes images, not {}",
                input.kind()
            )));
        };
        let vision = self.vision.config();
        let merge = vision.spatial_merge_size;
        // Images made with other patch settings than the tower's are refused here, before
        // any compute (the tower asserts its shapes).
        for image in images.iter() {
            let [t, h, w] = image.grid;
            let rows = t.checked_mul(h).and_then(|n| n.checked_mul(w));
            if t == 0
                || h == 0
                || w == 0
                || !h.is_multiple_of(merge)
                || !w.is_multiple_of(merge)
                || image.row_len != vision.patch_width()
                || rows.and_then(|n| n.checked_mul(image.row_len)) != Some(image.data.len())
            {
                return Err(ForwardError::BadEncoderInput(format!(
                    "an image's patches ({:?} grid of rows of {}) do not fit the vision tower (patches of {}, merged {merge} × {merge})",
                    image.grid,
                    image.row_len,
                    vision.patch_width()
                )));
            }
        }
        let grids: Vec<[usize; 3]> = images.iter().map(|p| p.grid).collect();
        let (positions, delta) =
            mrope_positions(prompt, self.image_token, &grids, merge).map_err(ForwardError::BadEncoderInput)?;
        let image_rows: Vec<usize> = (0..prompt.len()).filter(|&i| prompt[i] == self.image_token).collect();
        let (features, rows, _) = backend.to_host(self.vision.forward(backend, images));
        if rows != image_rows.len() {
            return Err(ForwardError::BadEncoderInput(format!(
                "{rows} image features for {} image tokens",
                image_rows.len()
            )));
        }
        self.requests.insert(
            key,
            ImagePrompt {
                features,
                image_rows,
                positions,
                delta,
            },
        );
        Ok(())
    }

    fn end_request(&mut self, key: u64) {
        self.requests.remove(&key);
    }

    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor<'_>,
    ) -> Result<B::Tensor, ForwardError> {
        let cfg = self.decoder.config();
        check_batch(batch, cfg.vocab_size, cfg.max_position_embeddings)?;
        let mut input = self.decoder.embed(backend, &batch.token_ids);
        let mut positions = Vec::with_capacity(batch.positions.len());
        // Image features replace the embeddings of the image tokens in this batch.
        let mut replaced: Vec<(usize, &[f32])> = Vec::new();
        let hidden = cfg.hidden_size;
        for seq in &batch.seqs {
            let prompt = self.requests.get(&seq.key);
            for row in seq.query_start..seq.query_start + seq.query_len {
                let index = batch.positions[row] as usize;
                positions.push(match prompt {
                    Some(p) if index < p.positions.len() => p.positions[index],
                    Some(p) => [(index as i64 + p.delta) as u32; 3],
                    None => [index as u32; 3],
                });
                if let Some(p) = prompt {
                    if let Ok(k) = p.image_rows.binary_search(&index) {
                        replaced.push((row, &p.features[k * hidden..(k + 1) * hidden]));
                    }
                }
            }
        }
        if !replaced.is_empty() {
            let (mut values, rows, cols) = backend.to_host(input);
            for (row, features) in replaced {
                values[row * cols..(row + 1) * cols].copy_from_slice(features);
            }
            input = backend.upload(values, rows, cols);
        }
        Ok(self.decoder.forward_embedded(
            backend,
            input,
            Rope::Sections(&positions, self.sections),
            batch,
            cache,
            logits_for,
        ))
    }
}
