//! Hugging Face `config.json` and `generation_config.json` for the dense decoders
//! (Llama, Qwen2, Qwen3), parsed into one validated `DecoderConfig`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::MAX_HEAD_DIM;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path} is missing: a model folder needs a config.json")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: model_type `{model_type}` is not supported (supported: llama, qwen2, qwen3, qwen2_5_vl)")]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

/// Rotary position embedding, with the HF scaling variants the decoders use.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, inverse frequencies).
    Linear {
        factor: f32,
    },
    /// Llama 3.1: frequencies between two wavelengths are interpolated.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always for Qwen2, `attention_bias` otherwise).
    pub qkv_bias: bool,
    /// The attention output projection carries a bias (`attention_bias`, Llama and Qwen3).
    pub o_proj_bias: bool,
    /// gate/up/down projections carry biases (`mlp_bias`, Llama).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before rotary (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Qwen2-VL's multimodal rotary: how many of the `head_dim / 2` frequencies follow
    /// the time, height and width positions (`rope_scaling.mrope_section`).
    pub mrope_section: Option<[usize; 3]>,
}

/// `eos_token_id` is an integer or a list of them in HF files.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Deserialize)]
struct RawRope {
    /// transformers writes `rope_type`; older configs `type` (re-saved ones carry both).
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
    /// transformers >= 5 moves rope_theta into `rope_parameters`.
    rope_theta: Option<f32>,
    mrope_section: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::Missing { path: path.to_owned() });
    }
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ConfigError::Json {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl DecoderConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        // The architecture is checked first so that an unsupported model is named as
        // such, not as a field our decoder would need.
        let value: serde_json::Value = read_json(path)?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            // Qwen2.5-VL's language model is a Qwen2 decoder (with M-RoPE).
            "qwen2" | "qwen2_5_vl" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            _ => {
                return Err(ConfigError::UnsupportedModel {
                    path: path.to_owned(),
                    model_type,
                })
            }
        };
        let raw = RawConfig::deserialize(value).map_err(|e| ConfigError::Json {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(invalid(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            // Qwen3Config's default, not hidden / heads.
            None if architecture == Architecture::Qwen3 => 128,
            None if raw.hidden_size % heads == 0 => raw.hidden_size / heads,
            None => {
                return Err(invalid(format!(
                    "hidden_size {} is not divisible by {heads} heads",
                    raw.hidden_size
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
            return Err(invalid(format!(
                "head_dim {head_dim} must be even, positive and at most {MAX_HEAD_DIM}"
            )));
        }
        if raw.hidden_size == 0 || raw.intermediate_size == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            return Err(invalid(
                "hidden_size, intermediate_size, num_hidden_layers and vocab_size must be positive".into(),
            ));
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope.and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => match r.rope_type.as_deref().or(r.legacy_type.as_deref()).unwrap_or("default") {
                // M-RoPE turns by the default frequencies (its sections are read below).
                "default" | "mrope" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: r
                        .factor
                        .ok_or_else(|| invalid("linear rope scaling needs `factor`".into()))?,
                },
                "llama3" => {
                    let need = |v: Option<f32>, name: &str| {
                        v.ok_or_else(|| invalid(format!("llama3 rope scaling needs `{name}`")))
                    };
                    RopeScaling::Llama3 {
                        factor: need(r.factor, "factor")?,
                        low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: need(
                            r.original_max_position_embeddings,
                            "original_max_position_embeddings",
                        )?,
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "rope scaling type `{other}` is not supported (default, linear, llama3)"
                    )))
                }
            },
        };
        let mrope_section = match rope.and_then(|r| r.mrope_section.as_deref()) {
            None => None,
            Some(&[t, h, w]) if t + h + w == head_dim / 2 => Some([t, h, w]),
            Some(other) => {
                return Err(invalid(format!(
                    "mrope_section {other:?} must be three numbers adding up to head_dim / 2 ({})",
                    head_dim / 2
                )))
            }
        };
        Ok(DecoderConfig {
            mrope_section,
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            // The defaults of LlamaConfig (2048) and Qwen2Config / Qwen3Config (32768).
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(match architecture {
                Architecture::Llama => 2048,
                Architecture::Qwen2 | Architecture::Qwen3 => 32768,
            }),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            // Qwen2's o_proj never has a bias; Llama's and Qwen3's follow attention_bias.
            o_proj_bias: architecture != Architecture::Qwen2 && raw.attention_bias.unwrap_or(false),
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        })
    }
}

/// Sampling defaults a model ships in `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub max_length: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a model without one gets the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        read_json(&path)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}
