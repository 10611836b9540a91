//! OpenAI wire formats: parsing and validating request JSON into engine-ready requests
//! (every error names its parameter), and the response objects.

pub mod error;
pub mod fields;
pub mod openai;

pub mod responses;
pub mod sampling;
pub mod structured;
pub mod tokens;

pub use error::ApiError;
pub use openai::{parse_chat_request, parse_completion_request, ChatRequest, CompletionRequest, ToolChoice};
pub use sampling::{SamplingDefaults, SamplingRequest};
pub use structured::StructuredRequest;
