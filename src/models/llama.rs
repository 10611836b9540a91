//! The dense decoder of Llama, Qwen2 and Qwen3, written once over the backend trait;
//! the families differ only in config flags (qkv bias, q/k norm, rope scaling, tying).
//!
//! Layer math, as in transformers' `LlamaDecoderLayer`:
//!   h = x + o_proj(attn(rope(qkv(rms_norm(x)))));  x' = h + down(silu(gate(n)) * up(n)), n = rms_norm(h)
//! q/k/v and gate/up are fused into one matrix each at load.

use crate::backend::{AttentionShape, Backend, ForwardBatch, KvCacheShape};
use crate::loader::{Checkpoint, LoadError};

use super::config::{DecoderConfig, RopeScaling};
use super::{check_batch, logit_rows, EngineModel, ForwardError, LogitsFor};

struct DecoderLayer<B: Backend> {
    input_layernorm: B::Weight,
    /// `[q; k; v]` projections stacked: `[qkv_width, hidden]`.
    qkv_proj: B::Weight,
    qkv_bias: Option<B::Weight>,
    /// Qwen3 per-head norms of q and k.
    qk_norm: Option<(B::Weight, B::Weight)>,
    o_proj: B::Weight,
    o_proj_bias: Option<B::Weight>,
    post_attention_layernorm: B::Weight,
    /// `[gate; up]` stacked: `[2 * intermediate, hidden]`.
    gate_up_proj: B::Weight,
    gate_up_bias: Option<B::Weight>,
    down_proj: B::Weight,
    down_bias: Option<B::Weight>,
}

pub struct DecoderModel<B: Backend> {
    pub config: DecoderConfig,
    shape: AttentionShape,
    embed_tokens: B::Weight,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Weight,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<B::Weight>,
    /// Rotary inverse frequencies `[head_dim / 2]` with the config's scaling applied.
    inv_freq: B::Weight,
}

/// Rotary inverse frequencies, computed in f32 the way transformers'
/// `ROPE_INIT_FUNCTIONS` do for `default`, `linear` and `llama3`.
pub fn rope_inv_freq(config: &DecoderConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta;
    let default: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => default,
        RopeScaling::Linear { factor } => default.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            default
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Checkpoint tensors per decoder layer.
fn names_per_layer(config: &DecoderConfig) -> usize {
    9 + 3 * usize::from(config.qkv_bias)
        + 2 * usize::from(config.qk_norm)
        + usize::from(config.o_proj_bias)
        + 3 * usize::from(config.mlp_bias)
}

impl<B: Backend> DecoderModel<B> {
    /// Names of every checkpoint tensor this config reads, in load order.
    pub fn tensor_names(config: &DecoderConfig) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_owned()];
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            names.push(format!("{p}input_layernorm.weight"));
            for proj in ["q", "k", "v"] {
                names.push(format!("{p}self_attn.{proj}_proj.weight"));
                if config.qkv_bias {
                    names.push(format!("{p}self_attn.{proj}_proj.bias"));
                }
            }
            if config.qk_norm {
                names.push(format!("{p}self_attn.q_norm.weight"));
                names.push(format!("{p}self_attn.k_norm.weight"));
            }
            names.push(format!("{p}self_attn.o_proj.weight"));
            if config.o_proj_bias {
                names.push(format!("{p}self_attn.o_proj.bias"));
            }
            names.push(format!("{p}post_attention_layernorm.weight"));
            for proj in ["gate", "up", "down"] {
                names.push(format!("{p}mlp.{proj}_proj.weight"));
                if config.mlp_bias {
                    names.push(format!("{p}mlp.{proj}_proj.bias"));
                }
            }
        }
        names.push("model.norm.weight".to_owned());
        if !config.tie_word_embeddings {
            names.push("lm_head.weight".to_owned());
        }
        names
    }

    /// The shape a checkpoint tensor of this config must have (`None`: not a tensor
    /// this decoder knows).
    pub fn expected_shape(config: &DecoderConfig, name: &str) -> Option<Vec<usize>> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let shape = AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let matrix = match name.rsplit_once('.').map(|(stem, _)| stem).unwrap_or("") {
            s if s.ends_with("embed_tokens") || s == "lm_head" => vec![config.vocab_size, h],
            s if s.ends_with("layernorm") || s == "model.norm" => vec![h],
            s if s.ends_with("q_norm") || s.ends_with("k_norm") => vec![shape.head_dim],
            s if s.ends_with("q_proj") => vec![shape.q_width(), h],
            s if s.ends_with("k_proj") || s.ends_with("v_proj") => vec![shape.kv_width(), h],
            s if s.ends_with("o_proj") => vec![h, shape.q_width()],
            s if s.ends_with("gate_proj") || s.ends_with("up_proj") => vec![i, h],
            s if s.ends_with("down_proj") => vec![h, i],
            _ => return None,
        };
        // Biases are the first dimension of their matrix.
        Some(if name.ends_with(".bias") {
            vec![matrix[0]]
        } else {
            matrix
        })
    }

    /// Every checkpoint tensor this config reads, with its shape, in load order.
    pub fn tensor_shapes(config: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
        Self::tensor_names(config)
            .into_iter()
            .map(|name| {
                let shape = Self::expected_shape(config, &name).unwrap_or_default();
                (name, shape)
            })
            .collect()
    }

    /// Uploads the weights, checking every shape first. `progress(current, total)` is
    /// called once per tensor read (total = `tensor_names(config).len()`).
    pub fn load(
        backend: &B,
        config: DecoderConfig,
        checkpoint: &Checkpoint,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, LoadError> {
        let names = Self::tensor_names(&config);
        let total = names.len();
        // Check presence and shape of everything before converting anything.
        let shape = AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        for name in &names {
            let t = checkpoint.tensor(name)?;
            let expected = Self::expected_shape(&config, name).unwrap_or_else(|| t.shape.to_vec());
            t.expect_shape(&expected)?;
        }

        let mut current = 0;
        let mut tick = |n: usize| {
            current += n;
            progress(current, total);
        };
        let get = |name: &str| checkpoint.tensor(name);
        // Biases of stacked projections are stacked the same way, as one f32 vector.
        let stacked_bias = |names: &[String]| super::stacked_vector(backend, checkpoint, names);
        let embed_tokens = backend.weight(&get("model.embed_tokens.weight")?);
        tick(1);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let t = |suffix: &str| get(&format!("{p}{suffix}"));
            let names = |suffixes: &[&str]| suffixes.iter().map(|s| format!("{p}{s}")).collect::<Vec<_>>();
            let input_layernorm = backend.weight(&t("input_layernorm.weight")?);
            let qkv_proj = backend.weight_stacked(&[
                t("self_attn.q_proj.weight")?,
                t("self_attn.k_proj.weight")?,
                t("self_attn.v_proj.weight")?,
            ]);
            let qkv_bias = match config.qkv_bias {
                true => Some(stacked_bias(&names(&[
                    "self_attn.q_proj.bias",
                    "self_attn.k_proj.bias",
                    "self_attn.v_proj.bias",
                ]))?),
                false => None,
            };
            let qk_norm = match config.qk_norm {
                true => Some((
                    backend.weight(&t("self_attn.q_norm.weight")?),
                    backend.weight(&t("self_attn.k_norm.weight")?),
                )),
                false => None,
            };
            let o_proj = backend.weight(&t("self_attn.o_proj.weight")?);
            let o_proj_bias = match config.o_proj_bias {
                true => Some(stacked_bias(&names(&["self_attn.o_proj.bias"]))?),
                false => None,
            };
            let post_attention_layernorm = backend.weight(&t("post_attention_layernorm.weight")?);
            let gate_up_proj = backend.weight_stacked(&[t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?]);
            let down_proj = backend.weight(&t("mlp.down_proj.weight")?);
            let (gate_up_bias, down_bias) = match config.mlp_bias {
                true => (
                    Some(stacked_bias(&names(&["mlp.gate_proj.bias", "mlp.up_proj.bias"]))?),
                    Some(stacked_bias(&names(&["mlp.down_proj.bias"]))?),
                ),
                false => (None, None),
            };
            let per_layer = names_per_layer(&config);
            tick(per_layer);
            layers.push(DecoderLayer {
                input_layernorm,
                qkv_proj,
                qkv_bias,
                qk_norm,
                o_proj,
                o_proj_bias,
                post_attention_layernorm,
                gate_up_proj,
                gate_up_bias,
                down_proj,
                down_bias,
            });
        }
        let norm = backend.weight(&get("model.norm.weight")?);
        tick(1);
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let w = backend.weight(&get("lm_head.weight")?);
            tick(1);
            Some(w)
        };
        let inv_freq = backend.weight_from_f32(rope_inv_freq(&config));
        Ok(DecoderModel {
            config,
            shape,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn attention_shape(&self) -> AttentionShape {
        self.shape
    }
}

impl<B: Backend + 'static> EngineModel<B> for DecoderModel<B>
where
    B::Weight: 'static,
{
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The KV cache shape for `num_blocks` blocks of `block_size` tokens.
    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
        }
    }

    /// Runs the batch, writing its K/V into `cache`, and returns logits
    /// `[rows, vocab]` for the requested rows.
    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor<'_>,
    ) -> Result<B::Tensor, ForwardError> {
        let cfg = &self.config;
        check_batch(batch, cfg.vocab_size, cfg.max_position_embeddings)?;
        let input = backend.embedding(&self.embed_tokens, &batch.token_ids);
        Ok(self.forward_embedded(backend, input, Rope::Positions, batch, cache, logits_for))
    }
}

/// The positions rotary embeddings turn by.
pub enum Rope<'a> {
    /// The batch's positions.
    Positions,
    /// Position triples (time, height, width) and the frequencies each takes (M-RoPE).
    Sections(&'a [[u32; 3]], [usize; 3]),
}

impl<B: Backend> DecoderModel<B> {
    /// The token embeddings of `ids`.
    pub fn embed(&self, backend: &B, ids: &[u32]) -> B::Tensor {
        backend.embedding(&self.embed_tokens, ids)
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The decoder from its input rows on (embeddings, some of them replaced by a
    /// vision-language model's image features), with the batch checked by the caller.
    pub fn forward_embedded(
        &self,
        backend: &B,
        input: B::Tensor,
        rope: Rope<'_>,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor<'_>,
    ) -> B::Tensor {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps;
        let mut residual = input;
        let mut normed = backend.rms_norm(&residual, &self.layers[0].input_layernorm, eps);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut qkv = backend.linear(&normed, &layer.qkv_proj, layer.qkv_bias.as_ref());
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                backend.qk_norm(&mut qkv, q_norm, k_norm, eps, self.shape);
            }
            match rope {
                Rope::Positions => backend.rotary(&mut qkv, &batch.positions, &self.inv_freq, self.shape),
                Rope::Sections(positions, sections) => {
                    backend.rotary_sections(&mut qkv, positions, sections, &self.inv_freq, self.shape)
                }
            }
            backend.write_kv(cache, l, &qkv, &batch.slot_mapping, self.shape);
            let attn = backend.attention(&qkv, cache, l, batch, self.shape);
            let attn_out = backend.linear(&attn, &layer.o_proj, layer.o_proj_bias.as_ref());
            normed = backend.add_rms_norm(&mut residual, &attn_out, &layer.post_attention_layernorm, eps);
            let gate_up = backend.linear(&normed, &layer.gate_up_proj, layer.gate_up_bias.as_ref());
            let mlp_out = backend.linear(&backend.silu_mul(&gate_up), &layer.down_proj, layer.down_bias.as_ref());
            // The next layer's input norm (or the final norm) fused with the residual add.
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |next| &next.input_layernorm);
            normed = backend.add_rms_norm(&mut residual, &mlp_out, next_norm, eps);
        }
        let hidden = logit_rows(backend, normed, batch, logits_for);
        backend.linear(&hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }
}
