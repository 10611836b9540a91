//! What the engine's and the manager's refusals become at the HTTP edge: each mapped
//! once onto an OpenAI error (`api::ApiError`) with its status and code.

use hyper::StatusCode;

use crate::api::ApiError;
use crate::engine::{SubmitError, TokenRole};
use crate::manager::LoadError;

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::TokenOutOfRange { role, .. } if role != TokenRole::Prompt => {
                let param = match role {
                    TokenRole::Biased => "logit_bias",
                    TokenRole::Stop => "stop_token_ids",
                    _ => "tool_choice",
                };
                ApiError::invalid(param, e.to_string())
            }
            SubmitError::PromptTooLong { .. } => ApiError {
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
                ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", e.to_string())
            },
            SubmitError::EmptyPrompt | SubmitError::TokenOutOfRange { .. } | SubmitError::EncoderInput(_) => {
                ApiError::bad_request(e.to_string())
            }
            SubmitError::Overloaded { .. } => ApiError {
                code: Some("overloaded"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string())
            },
            SubmitError::ShutDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()),
        }
    }
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        let message = e.to_string();
        match e {
            LoadError::InvalidId(_) => ApiError {
                code: Some("invalid_model"),
                ..ApiError::invalid("model", message)
            },
            LoadError::NotFound(_) => ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
            },
            LoadError::OutOfMemory(_) => ApiError {
                code: Some("insufficient_memory"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            LoadError::HubUnavailable(_) => ApiError {
                code: Some("hub_unavailable"),
                ..ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
            },
            LoadError::Failed(_) => ApiError::internal(message),
        }
    }
}
