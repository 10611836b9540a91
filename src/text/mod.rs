//! Text in and out of a model: the tokenizer, chat templates, the incremental
//! detokenizer that turns a token stream into valid UTF-8 text pieces, stop strings,
//! tool-call parsing, the reasoning / answer split, and structured-output grammars.

pub mod detokenizer;
pub mod gbnf;
pub mod grammar;
pub mod reasoning;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod tool_calls;

use std::path::PathBuf;

pub use detokenizer::IncrementalDetokenizer;
pub use grammar::{Grammar, GrammarCompiler, GrammarError, GrammarMatcher, GrammarSpec, JsonStyle, TokenMask};
pub use reasoning::ReasoningParser;
pub use stop::{StopMatcher, StopOutput};
pub use template::{ChatInput, ChatTemplate, SpecialTokens};
pub use tokenizer::Tokenizer;
pub use tool_calls::{collect_calls, CallSchema, ToolCall, ToolCallParser, ToolEvent};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is missing")]
    MissingFile { path: PathBuf },
    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("this model has no chat template")]
    NoChatTemplate,
    #[error("this model has several chat templates ({0}) and none is named `default`")]
    NoDefaultChatTemplate(String),
}
