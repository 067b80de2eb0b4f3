//! The gateway's errors and the one place where they become HTTP statuses.
//!
//! A handler returns [`ApiError`]; its `IntoResponse` sets the status (and `Retry-After`
//! where it applies) and parks the error in the response's extensions. The request-id
//! middleware then writes the envelope, so every error carries the request's id:
//!
//! ```json
//! {"error": {"code": "MODEL_NOT_FOUND", "message": "...", "request_id": "...", "details": {}}}
//! ```

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_actors::InferError;
use serde_json::{json, Value};

/// An error answered to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or does not fit the model.
    #[error("{message}")]
    InvalidInput {
        message: String,
        details: Option<Value>,
    },
    /// The body or the batch is larger than the node accepts.
    #[error("{message}")]
    PayloadTooLarge {
        message: String,
        details: Option<Value>,
    },
    /// No such model.
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    /// No such route or resource (the message says which).
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A replica's queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// No replica can serve the model now.
    #[error("{0}")]
    NoReplica(String),
    /// The deadline passed.
    #[error("{0}")]
    Timeout(String),
    /// The client did not send its request (its body) in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// The engine failed.
    #[error("{0}")]
    InferenceFailed(String),
    /// No token, or one that is not (or no longer) a token of this cluster.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token may not do this: wrong role, model or address, paused, expired.
    #[error("{0}")]
    Forbidden(String),
    /// Over the token's rate limit or monthly quota.
    #[error("{message}")]
    RateLimited {
        message: String,
        /// Seconds until a retry can succeed.
        retry_after_s: u64,
    },
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_S: &str = "1";

impl ApiError {
    /// A 400 INVALID_INPUT without details.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidInput {
            message: message.into(),
            details: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded(_) | ApiError::NoReplica(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InferenceFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable code of the envelope (also a metric label).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidInput { .. } => "INVALID_INPUT",
            ApiError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ApiError::ModelNotFound(_) => "MODEL_NOT_FOUND",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ApiError::Overloaded(_) => "OVERLOADED",
            ApiError::NoReplica(_) => "NO_REPLICA",
            ApiError::Timeout(_) => "TIMEOUT",
            ApiError::RequestTimeout(_) => "REQUEST_TIMEOUT",
            ApiError::InferenceFailed(_) => "INFERENCE_FAILED",
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
        }
    }

    fn details(&self) -> Option<&Value> {
        match self {
            ApiError::InvalidInput { details, .. } | ApiError::PayloadTooLarge { details, .. } => {
                details.as_ref()
            }
            _ => None,
        }
    }

    /// The `{"code", "message", "details"}` object (without the envelope), as a batch
    /// item's error.
    pub fn item_json(&self) -> Value {
        let mut v = json!({"code": self.code(), "message": self.to_string()});
        if let Some(d) = self.details() {
            v["details"] = d.clone();
        }
        v
    }

    /// The full envelope with the request's id.
    pub fn envelope(&self, request_id: &str) -> Value {
        let mut inner = self.item_json();
        inner["request_id"] = Value::String(request_id.to_string());
        if inner.get("details").is_none() {
            inner["details"] = json!({});
        }
        json!({ "error": inner })
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let message = e.to_string();
        match e {
            InferError::ModelNotFound(m) => ApiError::ModelNotFound(m),
            InferError::NoReplica { .. } | InferError::ReplicaStopping { .. } => {
                ApiError::NoReplica(message)
            }
            InferError::InvalidInput(ie) => ApiError::InvalidInput {
                message,
                details: Some(json!({"input": ie.input, "reason": ie.reason})),
            },
            InferError::Overloaded { .. } => ApiError::Overloaded(message),
            InferError::Timeout { .. } => ApiError::Timeout(message),
            InferError::InferenceFailed(_) => ApiError::InferenceFailed(message),
        }
    }
}

/// The error of a response, rendered into the envelope by the request-id middleware.
#[derive(Clone)]
pub struct PendingError(pub ApiError);

impl ApiError {
    /// Adds the headers this error calls for (`Retry-After`, `WWW-Authenticate`), in
    /// every dialect.
    pub fn add_headers(&self, headers: &mut axum::http::HeaderMap) {
        match self {
            ApiError::Overloaded(_) | ApiError::NoReplica(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
            }
            ApiError::RateLimited { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cohort\""),
                );
            }
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = self.status().into_response();
        self.add_headers(res.headers_mut());
        res.extensions_mut().insert(PendingError(self));
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_status() {
        let cases = [
            (ApiError::invalid("x"), 400, "INVALID_INPUT"),
            (
                ApiError::PayloadTooLarge {
                    message: "x".into(),
                    details: None,
                },
                413,
                "PAYLOAD_TOO_LARGE",
            ),
            (ApiError::ModelNotFound("m".into()), 404, "MODEL_NOT_FOUND"),
            (ApiError::Overloaded("x".into()), 503, "OVERLOADED"),
            (ApiError::NoReplica("x".into()), 503, "NO_REPLICA"),
            (ApiError::Timeout("x".into()), 504, "TIMEOUT"),
            (ApiError::RequestTimeout("x".into()), 408, "REQUEST_TIMEOUT"),
            (
                ApiError::InferenceFailed("x".into()),
                500,
                "INFERENCE_FAILED",
            ),
            (
                ApiError::Unauthenticated("x".into()),
                401,
                "UNAUTHENTICATED",
            ),
            (ApiError::Forbidden("x".into()), 403, "FORBIDDEN"),
            (
                ApiError::RateLimited {
                    message: "x".into(),
                    retry_after_s: 7,
                },
                429,
                "RATE_LIMITED",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{code}");
            assert_eq!(e.code(), code);
            let env = e.envelope("rid");
            assert_eq!(env["error"]["code"], code);
            assert_eq!(env["error"]["request_id"], "rid");
        }
    }

    #[test]
    fn overload_says_when_to_retry() {
        let res = ApiError::Overloaded("full".into()).into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        let res = ApiError::RateLimited {
            message: "slow down".into(),
            retry_after_s: 42,
        }
        .into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "42");
        let res = ApiError::Unauthenticated("who?".into()).into_response();
        assert!(res.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn input_errors_name_the_input() {
        let e: ApiError = InferError::InvalidInput(cohort_engines::InputError {
            input: "x".into(),
            reason: "expected shape [-1, 64], got [1, 3]".into(),
        })
        .into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.envelope("r")["error"]["details"]["input"], "x");
    }
}
