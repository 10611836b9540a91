//! OpenAI wire formats: parsing and validating request JSON into engine-ready requests
//! (every error names its parameter), and the response objects.

pub mod openai;

pub use openai::{
    parse_chat_request, parse_completion_request, ChatRequest, CompletionRequest, SamplingDefaults, ToolChoice,
};
pub mod responses;
