//! Whisper: an audio encoder and a text decoder with cross-attention, written over the
//! backend trait (as transformers' `WhisperForConditionalGeneration`).
//!
//!   encoder: x = gelu(conv2(gelu(conv1(mel)))) + positions;
//!            per layer x += attn(ln(x)); x += fc2(gelu(fc1(ln(x)))); out = ln(x)
//!   decoder: x = embed(ids) + positions[pos];
//!            per layer x += self_attn(ln(x)) (paged KV cache, causal);
//!                      x += cross_attn(ln(x), encoder out); x += mlp(ln(x))
//!            logits = ln(x) · embed_tokensᵀ
//!
//! The encoder runs once per request (`begin_request`); each decoder layer's cross
//! K/V are computed from its output then and kept until `end_request`, so decode steps
//! batch requests with different audio.

mod decoding;

use std::collections::HashMap;
use std::path::Path;

use crate::backend::{AttentionShape, Backend, DenseAttention, ForwardBatch, KvCacheShape};
use crate::loader::{Checkpoint, LoadError};
use crate::media::audio::LogMel;

use super::config::{read_json, ConfigError};
use super::{check_batch, logit_rows, EncoderInput, EngineModel};
use super::{ForwardError, LogitsFor};

pub use decoding::{
    language_name, split_segments, Segment, WhisperGeneration, INPUT_STRIDE, LANGUAGES, TIME_PRECISION,
};

/// `config.json` of a Whisper checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    /// Encoder positions: mel frames / 2 (1500 for 30 s).
    pub max_source_positions: usize,
    /// Decoder positions (448).
    pub max_target_positions: usize,
    pub vocab_size: usize,
    pub eos_token_id: Option<u32>,
}

const LAYER_NORM_EPS: f32 = 1e-5;

impl WhisperConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let value: serde_json::Value = read_json(&path)?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.clone(),
            reason,
        };
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or_default();
        if model_type != "whisper" {
            return Err(ConfigError::UnsupportedModel {
                path: path.clone(),
                model_type: model_type.to_owned(),
            });
        }
        let field = |key: &str| -> Result<usize, ConfigError> {
            value
                .get(key)
                .and_then(|v| v.as_u64())
                .filter(|&n| n > 0 && n < 1 << 24)
                .map(|n| n as usize)
                .ok_or_else(|| invalid(format!("`{key}` must be a positive integer")))
        };
        let config = WhisperConfig {
            d_model: field("d_model")?,
            encoder_layers: field("encoder_layers")?,
            decoder_layers: field("decoder_layers")?,
            encoder_attention_heads: field("encoder_attention_heads")?,
            decoder_attention_heads: field("decoder_attention_heads")?,
            encoder_ffn_dim: field("encoder_ffn_dim")?,
            decoder_ffn_dim: field("decoder_ffn_dim")?,
            num_mel_bins: field("num_mel_bins")?,
            max_source_positions: field("max_source_positions")?,
            max_target_positions: field("max_target_positions")?,
            vocab_size: field("vocab_size")?,
            eos_token_id: value.get("eos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
        };
        for heads in [config.encoder_attention_heads, config.decoder_attention_heads] {
            if !config.d_model.is_multiple_of(heads) || config.d_model / heads > crate::backend::MAX_HEAD_DIM {
                return Err(invalid(format!(
                    "d_model {} does not split into {heads} heads",
                    config.d_model
                )));
            }
        }
        if let Some(act) = value.get("activation_function").and_then(|v| v.as_str()) {
            if act != "gelu" {
                return Err(invalid(format!(
                    "activation_function `{act}` is not supported (only gelu)"
                )));
            }
        }
        Ok(config)
    }

    fn encoder_shape(&self) -> AttentionShape {
        let heads = self.encoder_attention_heads;
        AttentionShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: self.d_model / heads,
        }
    }

    fn decoder_shape(&self) -> AttentionShape {
        let heads = self.decoder_attention_heads;
        AttentionShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: self.d_model / heads,
        }
    }

    /// Mel frames one encoder pass reads (3000).
    pub fn mel_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

struct Norm<B: Backend> {
    weight: B::Weight,
    bias: B::Weight,
}

struct Mlp<B: Backend> {
    fc1: B::Weight,
    fc1_bias: B::Weight,
    fc2: B::Weight,
    fc2_bias: B::Weight,
}

struct EncoderLayer<B: Backend> {
    attn_norm: Norm<B>,
    q: B::Weight,
    q_bias: B::Weight,
    /// Whisper's key projections have no bias.
    k: B::Weight,
    v: B::Weight,
    v_bias: B::Weight,
    out: B::Weight,
    out_bias: B::Weight,
    mlp_norm: Norm<B>,
    mlp: Mlp<B>,
}

struct DecoderLayer<B: Backend> {
    self_norm: Norm<B>,
    /// `[q; k; v]` stacked, with the bias `[q_b; 0; v_b]`.
    qkv: B::Weight,
    qkv_bias: B::Weight,
    self_out: B::Weight,
    self_out_bias: B::Weight,
    cross_norm: Norm<B>,
    cross_q: B::Weight,
    cross_q_bias: B::Weight,
    cross_k: B::Weight,
    cross_v: B::Weight,
    cross_v_bias: B::Weight,
    cross_out: B::Weight,
    cross_out_bias: B::Weight,
    mlp_norm: Norm<B>,
    mlp: Mlp<B>,
}

/// One request's cross-attention keys and values, per decoder layer.
struct CrossKv<B: Backend> {
    layers: Vec<(B::Tensor, B::Tensor)>,
}

pub struct WhisperModel<B: Backend> {
    pub config: WhisperConfig,
    conv1: B::Weight,
    conv1_bias: B::Weight,
    conv2: B::Weight,
    conv2_bias: B::Weight,
    encoder_positions: B::Weight,
    encoder_layers: Vec<EncoderLayer<B>>,
    encoder_norm: Norm<B>,
    embed_tokens: B::Weight,
    decoder_positions: B::Weight,
    decoder_layers: Vec<DecoderLayer<B>>,
    decoder_norm: Norm<B>,
    /// Keyed by request.
    cross: HashMap<u64, CrossKv<B>>,
}

impl<B: Backend> WhisperModel<B> {
    /// Names of every checkpoint tensor this config reads.
    pub fn tensor_names(config: &WhisperConfig) -> Vec<String> {
        let mut names: Vec<String> = [
            "model.encoder.conv1.weight",
            "model.encoder.conv1.bias",
            "model.encoder.conv2.weight",
            "model.encoder.conv2.bias",
            "model.encoder.embed_positions.weight",
        ]
        .map(String::from)
        .to_vec();
        let attn = |p: &str, names: &mut Vec<String>| {
            for t in [
                "q_proj.weight",
                "q_proj.bias",
                "k_proj.weight",
                "v_proj.weight",
                "v_proj.bias",
                "out_proj.weight",
                "out_proj.bias",
            ] {
                names.push(format!("{p}.{t}"));
            }
        };
        let norm_mlp = |p: &str, names: &mut Vec<String>| {
            for t in [
                "final_layer_norm.weight",
                "final_layer_norm.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
            ] {
                names.push(format!("{p}.{t}"));
            }
        };
        for l in 0..config.encoder_layers {
            let p = format!("model.encoder.layers.{l}");
            names.push(format!("{p}.self_attn_layer_norm.weight"));
            names.push(format!("{p}.self_attn_layer_norm.bias"));
            attn(&format!("{p}.self_attn"), &mut names);
            norm_mlp(&p, &mut names);
        }
        names.push("model.encoder.layer_norm.weight".into());
        names.push("model.encoder.layer_norm.bias".into());
        names.push("model.decoder.embed_tokens.weight".into());
        names.push("model.decoder.embed_positions.weight".into());
        for l in 0..config.decoder_layers {
            let p = format!("model.decoder.layers.{l}");
            names.push(format!("{p}.self_attn_layer_norm.weight"));
            names.push(format!("{p}.self_attn_layer_norm.bias"));
            attn(&format!("{p}.self_attn"), &mut names);
            names.push(format!("{p}.encoder_attn_layer_norm.weight"));
            names.push(format!("{p}.encoder_attn_layer_norm.bias"));
            attn(&format!("{p}.encoder_attn"), &mut names);
            norm_mlp(&p, &mut names);
        }
        names.push("model.decoder.layer_norm.weight".into());
        names.push("model.decoder.layer_norm.bias".into());
        names
    }

    /// The shape each checkpoint tensor must have.
    fn expected_shape(config: &WhisperConfig, name: &str) -> Vec<usize> {
        let d = config.d_model;
        let ffn = if name.starts_with("model.encoder") {
            config.encoder_ffn_dim
        } else {
            config.decoder_ffn_dim
        };
        let bias = name.ends_with(".bias");
        match name {
            "model.encoder.conv1.weight" => vec![d, config.num_mel_bins, 3],
            "model.encoder.conv2.weight" => vec![d, d, 3],
            "model.encoder.embed_positions.weight" => vec![config.max_source_positions, d],
            "model.decoder.embed_positions.weight" => vec![config.max_target_positions, d],
            "model.decoder.embed_tokens.weight" => vec![config.vocab_size, d],
            n if n.contains(".fc1.") => {
                if bias {
                    vec![ffn]
                } else {
                    vec![ffn, d]
                }
            }
            n if n.contains(".fc2.") => {
                if bias {
                    vec![d]
                } else {
                    vec![d, ffn]
                }
            }
            _ if bias || name.contains("norm") => vec![d],
            _ => vec![d, d],
        }
    }

    pub fn load(
        backend: &B,
        config: WhisperConfig,
        checkpoint: &Checkpoint,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, LoadError> {
        let names = Self::tensor_names(&config);
        for name in &names {
            checkpoint
                .tensor(name)?
                .expect_shape(&Self::expected_shape(&config, name))?;
        }
        let total = names.len();
        let matrix = |name: &str| -> Result<B::Weight, LoadError> { Ok(backend.weight(&checkpoint.tensor(name)?)) };
        let vec_of = |name: &str| -> Result<B::Weight, LoadError> {
            Ok(backend.weight_from_f32(checkpoint.tensor(name)?.to_f32_vec()))
        };
        let norm_of = |p: &str| -> Result<Norm<B>, LoadError> {
            Ok(Norm {
                weight: vec_of(&format!("{p}.weight"))?,
                bias: vec_of(&format!("{p}.bias"))?,
            })
        };
        let d = config.d_model;
        // A conv weight `[out, in, k]` read as the matrix `[out, in * k]`.
        let conv = |name: &str| -> Result<B::Weight, LoadError> {
            let t = checkpoint.tensor(name)?;
            let shape = [t.shape[0], t.shape[1] * t.shape[2]];
            Ok(backend.weight(&crate::loader::TensorView { shape: &shape, ..t }))
        };
        let qkv = |p: &str| -> Result<(B::Weight, B::Weight), LoadError> {
            let w = backend.weight_stacked(&[
                checkpoint.tensor(&format!("{p}.q_proj.weight"))?,
                checkpoint.tensor(&format!("{p}.k_proj.weight"))?,
                checkpoint.tensor(&format!("{p}.v_proj.weight"))?,
            ]);
            let mut bias = checkpoint.tensor(&format!("{p}.q_proj.bias"))?.to_f32_vec();
            bias.extend(std::iter::repeat_n(0.0, d));
            bias.extend(checkpoint.tensor(&format!("{p}.v_proj.bias"))?.to_f32_vec());
            Ok((w, backend.weight_from_f32(bias)))
        };
        let mlp = |p: &str| -> Result<Mlp<B>, LoadError> {
            Ok(Mlp {
                fc1: matrix(&format!("{p}.fc1.weight"))?,
                fc1_bias: vec_of(&format!("{p}.fc1.bias"))?,
                fc2: matrix(&format!("{p}.fc2.weight"))?,
                fc2_bias: vec_of(&format!("{p}.fc2.bias"))?,
            })
        };
        // Progress: how many of `names` (in load order) are read once `prefix`'s are.
        let through = |prefix: &str| names.iter().rposition(|n| n.starts_with(prefix)).map_or(0, |i| i + 1);
        let conv1 = conv("model.encoder.conv1.weight")?;
        let conv1_bias = vec_of("model.encoder.conv1.bias")?;
        let conv2 = conv("model.encoder.conv2.weight")?;
        let conv2_bias = vec_of("model.encoder.conv2.bias")?;
        let encoder_positions = matrix("model.encoder.embed_positions.weight")?;
        progress(through("model.encoder.embed_positions."), total);
        let mut encoder_layers = Vec::with_capacity(config.encoder_layers);
        for l in 0..config.encoder_layers {
            let p = format!("model.encoder.layers.{l}");
            let a = format!("{p}.self_attn");
            encoder_layers.push(EncoderLayer {
                attn_norm: norm_of(&format!("{p}.self_attn_layer_norm"))?,
                q: matrix(&format!("{a}.q_proj.weight"))?,
                q_bias: vec_of(&format!("{a}.q_proj.bias"))?,
                k: matrix(&format!("{a}.k_proj.weight"))?,
                v: matrix(&format!("{a}.v_proj.weight"))?,
                v_bias: vec_of(&format!("{a}.v_proj.bias"))?,
                out: matrix(&format!("{p}.self_attn.out_proj.weight"))?,
                out_bias: vec_of(&format!("{p}.self_attn.out_proj.bias"))?,
                mlp_norm: norm_of(&format!("{p}.final_layer_norm"))?,
                mlp: mlp(&p)?,
            });
            progress(through(&format!("{p}.")), total);
        }
        let encoder_norm = norm_of("model.encoder.layer_norm")?;
        let embed_tokens = matrix("model.decoder.embed_tokens.weight")?;
        let decoder_positions = matrix("model.decoder.embed_positions.weight")?;
        progress(through("model.decoder.embed_positions."), total);
        let mut decoder_layers = Vec::with_capacity(config.decoder_layers);
        for l in 0..config.decoder_layers {
            let p = format!("model.decoder.layers.{l}");
            let (qkv, qkv_bias) = qkv(&format!("{p}.self_attn"))?;
            let c = format!("{p}.encoder_attn");
            decoder_layers.push(DecoderLayer {
                self_norm: norm_of(&format!("{p}.self_attn_layer_norm"))?,
                qkv,
                qkv_bias,
                self_out: matrix(&format!("{p}.self_attn.out_proj.weight"))?,
                self_out_bias: vec_of(&format!("{p}.self_attn.out_proj.bias"))?,
                cross_norm: norm_of(&format!("{p}.encoder_attn_layer_norm"))?,
                cross_q: matrix(&format!("{c}.q_proj.weight"))?,
                cross_q_bias: vec_of(&format!("{c}.q_proj.bias"))?,
                cross_k: matrix(&format!("{c}.k_proj.weight"))?,
                cross_v: matrix(&format!("{c}.v_proj.weight"))?,
                cross_v_bias: vec_of(&format!("{c}.v_proj.bias"))?,
                cross_out: matrix(&format!("{c}.out_proj.weight"))?,
                cross_out_bias: vec_of(&format!("{c}.out_proj.bias"))?,
                mlp_norm: norm_of(&format!("{p}.final_layer_norm"))?,
                mlp: mlp(&p)?,
            });
            progress(through(&format!("{p}.")), total);
        }
        let decoder_norm = norm_of("model.decoder.layer_norm")?;
        progress(total, total);
        Ok(WhisperModel {
            config,
            conv1,
            conv1_bias,
            conv2,
            conv2_bias,
            encoder_positions,
            encoder_layers,
            encoder_norm,
            embed_tokens,
            decoder_positions,
            decoder_layers,
            decoder_norm,
            cross: HashMap::new(),
        })
    }

    /// The end of a layer: `residual += attn`, the MLP over its norm, `residual += mlp`;
    /// returns `next`'s norm of the residual (the next block's input).
    fn mlp_block(
        &self,
        backend: &B,
        residual: &mut B::Tensor,
        attn: &B::Tensor,
        norm: &Norm<B>,
        mlp: &Mlp<B>,
        next: &Norm<B>,
    ) -> B::Tensor {
        let normed = backend.add_layer_norm(residual, attn, &norm.weight, &norm.bias, LAYER_NORM_EPS);
        let mut h = backend.linear(&normed, &mlp.fc1, Some(&mlp.fc1_bias));
        backend.gelu(&mut h);
        let out = backend.linear(&h, &mlp.fc2, Some(&mlp.fc2_bias));
        backend.add_layer_norm(residual, &out, &next.weight, &next.bias, LAYER_NORM_EPS)
    }

    /// The encoder over one 30-second window of log-mel features
    /// (`[num_mel_bins, 2 * max_source_positions]`) -> `[max_source_positions, d_model]`.
    pub fn encode(&self, backend: &B, mel: &LogMel) -> Result<B::Tensor, ForwardError> {
        let cfg = &self.config;
        if mel.n_mels != cfg.num_mel_bins || mel.frames != cfg.mel_frames() {
            return Err(ForwardError::BadEncoderInput(format!(
                "expected [{}, {}] log-mel features, got [{}, {}]",
                cfg.num_mel_bins,
                cfg.mel_frames(),
                mel.n_mels,
                mel.frames
            )));
        }
        // Time-major for the convolutions: [frames, mels].
        let mut t = vec![0.0f32; mel.values.len()];
        for m in 0..mel.n_mels {
            for f in 0..mel.frames {
                t[f * mel.n_mels + m] = mel.values[m * mel.frames + f];
            }
        }
        let x = backend.upload(t, mel.frames, mel.n_mels);
        let mut x = backend.linear(&backend.im2col_1d(&x, 3, 1, 1), &self.conv1, Some(&self.conv1_bias));
        backend.gelu(&mut x);
        let mut x = backend.linear(&backend.im2col_1d(&x, 3, 2, 1), &self.conv2, Some(&self.conv2_bias));
        backend.gelu(&mut x);
        let positions: Vec<u32> = (0..cfg.max_source_positions as u32).collect();
        backend.add(&mut x, &backend.embedding(&self.encoder_positions, &positions));
        let shape = cfg.encoder_shape();
        let mut residual = x;
        let mut normed = backend.layer_norm(
            &residual,
            &self.encoder_layers[0].attn_norm.weight,
            &self.encoder_layers[0].attn_norm.bias,
            LAYER_NORM_EPS,
        );
        for (l, layer) in self.encoder_layers.iter().enumerate() {
            let q = backend.linear(&normed, &layer.q, Some(&layer.q_bias));
            let k = backend.linear(&normed, &layer.k, None);
            let v = backend.linear(&normed, &layer.v, Some(&layer.v_bias));
            let seq = DenseAttention {
                q_start: 0,
                q_len: cfg.max_source_positions,
                k: &k,
                v: &v,
            };
            let attn = backend.attention_dense(&q, &[seq], shape, false);
            let attn = backend.linear(&attn, &layer.out, Some(&layer.out_bias));
            let next = self
                .encoder_layers
                .get(l + 1)
                .map_or(&self.encoder_norm, |n| &n.attn_norm);
            normed = self.mlp_block(backend, &mut residual, &attn, &layer.mlp_norm, &layer.mlp, next);
        }
        Ok(normed)
    }

    pub fn has_request(&self, key: u64) -> bool {
        self.cross.contains_key(&key)
    }
}

impl<B: Backend + 'static> EngineModel<B> for WhisperModel<B>
where
    B::Weight: 'static,
    B::Tensor: 'static,
{
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_target_positions
    }

    fn needs_encoder_input(&self) -> bool {
        true
    }

    /// Each decoder layer's cross-attention K and V, `[max_source_positions, d_model]` f32.
    fn bytes_per_request(&self) -> usize {
        let c = &self.config;
        c.decoder_layers * 2 * c.max_source_positions * c.d_model * std::mem::size_of::<f32>()
    }

    /// Runs the encoder for request `key` and keeps each decoder layer's cross-attention K/V.
    fn encoder_input_kind(&self) -> Option<&'static str> {
        Some("audio")
    }

    fn begin_request(
        &mut self,
        backend: &B,
        key: u64,
        _prompt: &[u32],
        input: &EncoderInput,
    ) -> Result<(), ForwardError> {
        let EncoderInput::Audio(mel) = input else {
            return Err(ForwardError::BadEncoderInput(format!(
                "Whisper takes audio, not {}",
                input.kind()
            )));
        };
        let encoded = self.encode(backend, mel)?;
        let layers = self
            .decoder_layers
            .iter()
            .map(|layer| {
                (
                    backend.linear(&encoded, &layer.cross_k, None),
                    backend.linear(&encoded, &layer.cross_v, Some(&layer.cross_v_bias)),
                )
            })
            .collect();
        self.cross.insert(key, CrossKv { layers });
        Ok(())
    }

    fn end_request(&mut self, key: u64) {
        self.cross.remove(&key);
    }

    fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        let shape = self.config.decoder_shape();
        KvCacheShape {
            num_layers: self.config.decoder_layers,
            num_blocks,
            block_size,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
        }
    }

    /// The decoder over a batch (each sequence's `key` names its request, whose encoder
    /// has run) -> logits for the requested rows.
    fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        logits_for: LogitsFor<'_>,
    ) -> Result<B::Tensor, ForwardError> {
        let cfg = &self.config;
        check_batch(batch, cfg.vocab_size, cfg.max_target_positions)?;
        let cross: Vec<&CrossKv<B>> = batch
            .seqs
            .iter()
            .map(|s| {
                self.cross
                    .get(&s.key)
                    .ok_or_else(|| ForwardError::BadEncoderInput("a sequence's audio was not encoded".into()))
            })
            .collect::<Result<_, _>>()?;
        let shape = cfg.decoder_shape();
        let mut residual = backend.embedding(&self.embed_tokens, &batch.token_ids);
        backend.add(
            &mut residual,
            &backend.embedding(&self.decoder_positions, &batch.positions),
        );
        let first = &self.decoder_layers[0].self_norm;
        let mut normed = backend.layer_norm(&residual, &first.weight, &first.bias, LAYER_NORM_EPS);
        for (l, layer) in self.decoder_layers.iter().enumerate() {
            let qkv = backend.linear(&normed, &layer.qkv, Some(&layer.qkv_bias));
            backend.write_kv(cache, l, &qkv, &batch.slot_mapping, shape);
            let attn = backend.attention(&qkv, cache, l, batch, shape);
            let attn = backend.linear(&attn, &layer.self_out, Some(&layer.self_out_bias));
            normed = backend.add_layer_norm(
                &mut residual,
                &attn,
                &layer.cross_norm.weight,
                &layer.cross_norm.bias,
                LAYER_NORM_EPS,
            );
            let q = backend.linear(&normed, &layer.cross_q, Some(&layer.cross_q_bias));
            let seqs: Vec<DenseAttention<'_, B::Tensor>> = batch
                .seqs
                .iter()
                .zip(&cross)
                .map(|(s, c)| DenseAttention {
                    q_start: s.query_start,
                    q_len: s.query_len,
                    k: &c.layers[l].0,
                    v: &c.layers[l].1,
                })
                .collect();
            let attn = backend.attention_dense(&q, &seqs, shape, false);
            let attn = backend.linear(&attn, &layer.cross_out, Some(&layer.cross_out_bias));
            let next = self
                .decoder_layers
                .get(l + 1)
                .map_or(&self.decoder_norm, |n| &n.self_norm);
            normed = self.mlp_block(backend, &mut residual, &attn, &layer.mlp_norm, &layer.mlp, next);
        }
        let hidden = logit_rows(backend, normed, batch, logits_for);
        Ok(backend.linear(&hidden, &self.embed_tokens, None))
    }
}
