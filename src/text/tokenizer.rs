//! A model's tokenizer (`tokenizer.json` through the `tokenizers` crate) together with
//! what `tokenizer_config.json` says about it: special tokens and the chat template.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::template::{ChatTemplate, SpecialTokens};
use super::TextError;

/// `bos_token` and friends are a string or an AddedToken object in HF files.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

impl TokenSpec {
    fn into_string(self) -> String {
        match self {
            TokenSpec::Text(s) | TokenSpec::Added { content: s } => s,
        }
    }
}

/// `chat_template` is one string, or a list of named templates.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfigFile {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    chat_template: Option<TemplateSpec>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub special_tokens: SpecialTokens,
    chat_template: TemplateState,
}

enum TemplateState {
    Ready(Box<ChatTemplate>),
    Missing,
    /// A list of named templates without one named `default` (transformers refuses it).
    NoDefault(Vec<String>),
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and the chat template
    /// (`chat_template.jinja` if present, as transformers >= 4.43 saves it, else the
    /// `chat_template` field; from a list, the one named `default`).
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TextError::MissingFile { path });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TextError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfigFile = if config_path.is_file() {
            let bytes = read(&config_path)?;
            serde_json::from_slice(&bytes).map_err(|e| TextError::Tokenizer {
                path: config_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            TokenizerConfigFile::default()
        };
        let special_tokens = SpecialTokens {
            bos_token: config.bos_token.map(TokenSpec::into_string),
            eos_token: config.eos_token.map(TokenSpec::into_string),
            pad_token: config.pad_token.map(TokenSpec::into_string),
            unk_token: config.unk_token.map(TokenSpec::into_string),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Ok(Some(String::from_utf8_lossy(&read(&jinja_path)?).into_owned()))
        } else {
            match config.chat_template {
                Some(TemplateSpec::One(s)) => Ok(Some(s)),
                Some(TemplateSpec::Named(list)) => match list.iter().position(|t| t.name == "default") {
                    Some(i) => Ok(list.into_iter().nth(i).map(|t| t.template)),
                    None => Err(list.into_iter().map(|t| t.name).collect()),
                },
                None => Ok(None),
            }
        };
        let chat_template = match source {
            Ok(Some(s)) => TemplateState::Ready(Box::new(ChatTemplate::new(s, special_tokens.clone())?)),
            Ok(None) => TemplateState::Missing,
            Err(names) => TemplateState::NoDefault(names),
        };
        Ok(Tokenizer {
            inner,
            special_tokens,
            chat_template,
        })
    }

    /// The model's chat template, or why it has none to use.
    pub fn chat_template(&self) -> Result<&ChatTemplate, TextError> {
        match &self.chat_template {
            TemplateState::Ready(t) => Ok(t),
            TemplateState::Missing => Err(TextError::NoChatTemplate),
            TemplateState::NoDefault(names) => Err(TextError::NoDefaultChatTemplate(names.join(", "))),
        }
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Decode(e.to_string()))
    }

    /// The `tokenizers` tokenizer itself (what structured outputs read token bytes from).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's own vocabulary, without added (special) tokens.
    pub fn base_vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TextError> {
    std::fs::read(path).map_err(|source| TextError::Io {
        path: path.clone(),
        source,
    })
}
