//! The one error type of the HTTP API, and the one place errors become OpenAI error objects.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use enclave_engine::EngineError;
use serde_json::json;

/// An error as OpenAI's API reports it: `{"error": {"message", "type", "param", "code"}}`
/// with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error` for the client's mistakes, `server_error` for ours.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u32>,
    /// More headers to send (`x-ratelimit-*` on a 429); boxed to keep errors small.
    pub headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    /// A 400 for an invalid parameter, naming it.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
            retry_after: None,
            headers: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..Self::invalid(
                Some("model".to_string()),
                format!("The model `{model}` does not exist."),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            ..Self::invalid(None, message)
        }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..Self::invalid(None, "this route does not take that method")
        }
    }

    /// A 401: no credentials, or credentials that identify no one. The message never says
    /// which (unknown, revoked, expired), so a client cannot probe keys.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key"),
            ..Self::invalid(None, message)
        }
    }

    /// A 403: the caller is known but its role lacks `permission`.
    pub fn forbidden(permission: &str) -> Self {
        Self::denied(format!(
            "this key's role does not grant `{permission}`, which this route needs"
        ))
    }

    /// A 403 saying why.
    pub fn denied(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: Some("permission_denied"),
            ..Self::invalid(None, message)
        }
    }

    /// A 429: a rate limit of the caller's key or tenant is reached.
    /// A 429 for an address or key blocked after repeated authentication failures.
    pub fn blocked(retry_after: std::time::Duration) -> Self {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u32;
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: Some("blocked"),
            retry_after: Some(seconds),
            ..Self::invalid(
                None,
                format!("too many failed authentications; blocked for another {seconds} s"),
            )
        }
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: if message.contains("tokens") {
                "tokens"
            } else {
                "requests"
            },
            code: Some("rate_limit_exceeded"),
            ..Self::invalid(None, message)
        }
    }

    /// A 503 while the model loads or the queue is full; the client should retry.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
            retry_after: Some(1),
            headers: None,
        }
    }

    /// A 500: something broke on our side (never the client's mistake).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
            headers: None,
        }
    }

    /// An engine error for a request whose prompt is the parameter `prompt_param`
    /// (`messages` or `prompt`).
    pub fn from_engine(error: EngineError, prompt_param: &str) -> Self {
        match error {
            EngineError::InvalidRequest(message) => {
                let param = backticked_param(&message)
                    .or_else(|| message.contains("prompt").then(|| prompt_param.to_string()));
                Self::invalid(param, message)
            }
            e @ EngineError::ContextOverflow { .. } => Self {
                code: Some("context_length_exceeded"),
                ..Self::invalid(Some(prompt_param.to_string()), e.to_string())
            },
            e @ (EngineError::Template(_) | EngineError::Tokenizer(_)) => {
                Self::invalid(Some(prompt_param.to_string()), e.to_string())
            }
            e @ EngineError::Overloaded { .. } => {
                Self::unavailable("server_overloaded", e.to_string())
            }
            e @ EngineError::FlowFull { .. } => {
                let mut error = Self::rate_limited(e.to_string());
                error.retry_after = Some(1);
                error
            }
            e @ (EngineError::Model(_)
            | EngineError::Io { .. }
            | EngineError::File { .. }
            | EngineError::Internal(_)) => {
                tracing::error!(error = %e, "engine error");
                Self::internal(e.to_string())
            }
        }
    }

    /// A body that could not be read as the expected JSON.
    pub fn from_json_rejection(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let message = rejection.body_text();
        let timed_out = std::iter::successors(
            Some(&rejection as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .any(|e| e.is::<crate::conn::BodyTimedOut>());
        if timed_out {
            return Self {
                status: StatusCode::REQUEST_TIMEOUT,
                ..Self::invalid(None, "the request body did not arrive in time")
            };
        }
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self {
                status,
                ..Self::invalid(None, format!("the request body is too large: {message}"))
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self {
                status,
                ..Self::invalid(
                    None,
                    "the request body must be JSON with `Content-Type: application/json`",
                )
            },
            _ => Self::invalid(None, format!("the request body is not valid: {message}")),
        }
    }

    /// The JSON error object (also what a stream would carry).
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"enclave\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The parameter an engine message names first, as in "`top_p` must be in (0, 1], got 2".
fn backticked_param(message: &str) -> Option<String> {
    let rest = message.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_name_their_parameter() {
        let e = ApiError::from_engine(
            EngineError::InvalidRequest("`top_p` must be in (0, 1], got 2".into()),
            "messages",
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = ApiError::from_engine(
            EngineError::ContextOverflow {
                limit: 10,
                requested: 12,
                prompt: 4,
                completion: 8,
            },
            "prompt",
        );
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = ApiError::from_engine(EngineError::Overloaded { in_flight: 3 }, "prompt");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(1));
    }
}
