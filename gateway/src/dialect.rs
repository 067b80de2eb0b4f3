//! Which API a path belongs to, and the paths every layer treats as probes.
//!
//! One classification for the whole gateway: auth and the concurrency guard answer their
//! refusals in the path's error shape, the request log and the metrics label requests
//! with it.

use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Which API a request spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Cohort's own `/api/...`.
    Rest,
    /// KServe v2 / Open Inference Protocol, `/v2...`.
    Kserve,
    /// OpenAI, `/v1/...`.
    Openai,
    /// Anything else (health, metrics, the API description, unknown paths).
    Other,
}

impl Dialect {
    /// The dialect of a request path.
    pub fn of(path: &str) -> Dialect {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/api") {
            Dialect::Rest
        } else if under("/v2") {
            Dialect::Kserve
        } else if under("/v1") {
            Dialect::Openai
        } else {
            Dialect::Other
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Rest => "rest",
            Dialect::Kserve => "kserve",
            Dialect::Openai => "openai",
            Dialect::Other => "other",
        }
    }

    /// `e` in this dialect's error shape: KServe's `{"error": "..."}`, OpenAI's error
    /// object, else Cohort's envelope.
    pub fn error(self, e: ApiError) -> Response {
        match self {
            Dialect::Kserve => crate::kserve::error_response(e),
            Dialect::Openai => crate::openai::error_response(e),
            Dialect::Rest | Dialect::Other => e.into_response(),
        }
    }
}

/// Health probes and the metrics scrape: never counted against the concurrency limit and
/// never written to the request log (they are still counted in the metrics).
pub fn is_probe(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v2/health/live" | "/v2/health/ready"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified() {
        assert_eq!(Dialect::of("/api/v1/models/a/infer"), Dialect::Rest);
        assert_eq!(Dialect::of("/v2"), Dialect::Kserve);
        assert_eq!(Dialect::of("/v2/models/a/infer"), Dialect::Kserve);
        assert_eq!(Dialect::of("/v1/embeddings"), Dialect::Openai);
        assert_eq!(Dialect::of("/v1x"), Dialect::Other);
        assert_eq!(Dialect::of("/metrics"), Dialect::Other);
        assert!(is_probe("/v2/health/ready") && is_probe("/metrics"));
        assert!(!is_probe("/v2/health/other") && !is_probe("/api/v1/models"));
    }

    #[test]
    fn errors_take_the_dialects_shape() {
        // KServe and OpenAI write their body at once; the envelope is left to the
        // request-id middleware, which finds the error in the response's extensions.
        for d in [Dialect::Kserve, Dialect::Openai] {
            let res = d.error(ApiError::Forbidden("no".into()));
            assert_eq!(res.status().as_u16(), 403);
            assert!(res
                .extensions()
                .get::<crate::error::PendingError>()
                .is_none());
        }
        let res = Dialect::Rest.error(ApiError::Forbidden("no".into()));
        assert_eq!(res.status().as_u16(), 403);
        assert!(res
            .extensions()
            .get::<crate::error::PendingError>()
            .is_some());
    }
}
