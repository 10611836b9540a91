//! One error type for the whole HTTP edge, rendered in the OpenAI shape
//! `{"error": {"message", "type", "param", "code"}}` with its status. Client errors
//! say what was wrong; internal errors are logged and answered vaguely.

use hyper::StatusCode;

use crate::engine::SubmitError;
use crate::manager::LoadError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 naming the offending parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..ApiError::bad_request(message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("not_found"),
            ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::InvalidParam(p) => ApiError::invalid(p.param, p.to_string()),
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
