//! The OpenAPI 3 description of Cohort's own API (`GET /openapi.json`) and a page to
//! browse it (`GET /docs`).
//!
//! The document is generated from the code: each handler carries a `#[utoipa::path]`
//! next to it, request bodies are the very types the handlers deserialize (derived
//! schemas), and the response shapes below are what the handlers write. KServe v2 and
//! OpenAI routes are not in it: they follow their own published specifications.
//!
//! `/docs` is a self-contained page (no CDN: nodes often cannot reach one) that fetches
//! `/openapi.json` and lists each operation with its parameters, body and responses.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Cohort's error envelope.
#[derive(Serialize, ToSchema)]
pub struct ErrorEnvelope {
    error: ErrorBody,
}

/// The error inside the envelope.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code: INVALID_INPUT, UNAUTHENTICATED, FORBIDDEN, RATE_LIMITED,
    /// MODEL_NOT_FOUND, NOT_FOUND, METHOD_NOT_ALLOWED, PAYLOAD_TOO_LARGE, OVERLOADED,
    /// NO_REPLICA, TIMEOUT, INFERENCE_FAILED.
    code: String,
    /// What went wrong, for people.
    message: String,
    /// The request's id (also in the `x-request-id` header).
    request_id: String,
    /// Which field or input, when it applies.
    #[schema(value_type = Object)]
    details: serde_json::Value,
}

/// Time spent on a request.
#[derive(Serialize, ToSchema)]
pub struct TimingDoc {
    queue_us: u64,
    compute_us: u64,
    total_us: u64,
}

/// The answer of an infer request.
#[derive(Serialize, ToSchema)]
pub struct InferResponseDoc {
    request_id: String,
    model: String,
    version: String,
    /// Output name → nested array.
    #[schema(value_type = Object)]
    outputs: serde_json::Value,
    timing: TimingDoc,
    /// The replica that answered.
    replica: String,
    /// Requests in the engine call that served this one.
    batch_size: u64,
}

/// The answer of a batch request.
#[derive(Serialize, ToSchema)]
pub struct BatchResponseDoc {
    request_id: String,
    model: String,
    /// Counts of succeeded and failed items.
    #[schema(value_type = Object)]
    summary: serde_json::Value,
    /// One per item, in order: `outputs` or `error`.
    #[schema(value_type = Vec<Object>)]
    results: Vec<serde_json::Value>,
}

/// A model as listed.
#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    name: String,
    version: String,
    engine: String,
    /// ready, loading, restarting, draining, failed, unloaded.
    state: String,
    device: String,
    #[schema(value_type = Vec<Object>)]
    inputs: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    outputs: Vec<serde_json::Value>,
    replicas_ready: u64,
    replicas_desired: u64,
    /// Each replica's state, device, queue depth, requests served, memory (show only).
    #[schema(value_type = Option<Vec<Object>>)]
    replicas: Option<Vec<serde_json::Value>>,
}

/// The models of a node.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    models: Vec<ModelInfo>,
    /// The node's devices.
    #[schema(value_type = Vec<Object>)]
    devices: Vec<serde_json::Value>,
}

/// A token as the API shows it: never its secret or hash.
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    id: String,
    name: String,
    /// user or admin.
    role: String,
    allowed_models: Vec<String>,
    ip_allow: Vec<String>,
    rate_per_minute: Option<u32>,
    monthly_quota: Option<u64>,
    used_this_month: u64,
    expires_at_ms: Option<u64>,
    /// active, paused, expired or revoked.
    status: String,
    created_at_ms: u64,
    created_by: String,
}

/// A new token, with its secret.
#[derive(Serialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    token: TokenView,
    /// Send as `Authorization: Bearer <secret>`. Shown this once.
    secret: String,
}

/// Every token.
#[derive(Serialize, ToSchema)]
pub struct TokenList {
    tokens: Vec<TokenView>,
}

/// One admin action.
#[derive(Serialize, ToSchema)]
pub struct AuditEntryDoc {
    seq: u64,
    at_ms: u64,
    /// The token id that acted (`local` with auth off).
    who: String,
    /// token.create, token.update, token.pause, token.resume, token.revoke,
    /// model.register, model.scale, model.unload, model.preload, model.delete, node.remove.
    action: String,
    target: String,
    request_id: String,
    client_ip: String,
    #[schema(value_type = Object)]
    detail: serde_json::Value,
    /// ok, unchanged, or why it was refused.
    outcome: String,
}

/// A page of the audit log.
#[derive(Serialize, ToSchema)]
pub struct AuditList {
    entries: Vec<AuditEntryDoc>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<u64>,
}

/// The refusals of an admin route.
#[derive(utoipa::IntoResponses)]
pub enum AdminRefusals {
    /// No token, or not a token of this cluster.
    #[response(status = 401, description = "No valid token")]
    Unauthenticated(ErrorEnvelope),
    /// A user token, or one paused, expired or from an address it may not use.
    #[response(status = 403, description = "Not an admin token, or not allowed now")]
    Forbidden(ErrorEnvelope),
}

/// The refusals of a route any token may use.
#[derive(utoipa::IntoResponses)]
pub enum TokenRefusals {
    /// No token, or not a token of this cluster.
    #[response(status = 401, description = "No valid token")]
    Unauthenticated(ErrorEnvelope),
    /// The token may not use this model, or is paused, expired, or from an address it may
    /// not use.
    #[response(status = 403, description = "Token not allowed")]
    Forbidden(ErrorEnvelope),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (cht_...). Health probes need none; with auth off, none is needed.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cohort",
        description = "Cohort's own HTTP API: inference, models, tokens, audit, cluster, health. KServe v2 (/v2) and OpenAI (/v1) routes follow their own specifications.",
    ),
    paths(
        crate::health::healthz,
        crate::health::readyz,
        crate::health::detailed,
        crate::health::metrics,
        crate::inference::infer,
        crate::inference::batch,
        crate::models::list,
        crate::models::show,
        crate::models::scale,
        crate::models::unload,
        crate::models::preload,
        crate::models::delete,
        crate::cluster::register_model,
        crate::cluster::status,
        crate::cluster::remove_node,
        crate::tokens::create,
        crate::tokens::list,
        crate::tokens::show,
        crate::tokens::update,
        crate::tokens::revoke,
        crate::tokens::audit,
        crate::reqlog::list,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "inference", description = "Run models"),
        (name = "models", description = "Models and their replicas on this node"),
        (name = "tokens", description = "API tokens (admin)"),
        (name = "audit", description = "The audit log of admin actions and the sampled request log (admin)"),
        (name = "cluster", description = "Cluster members and Raft (admin)"),
        (name = "health", description = "Probes, details and metrics"),
    )
)]
pub struct ApiDoc;

/// The document as JSON text, made once.
fn document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        serde_json::to_string(&doc).unwrap_or_else(|e| {
            format!(r#"{{"openapi":"3.1.0","info":{{"title":"Cohort","version":"?","description":"cannot render: {e}"}},"paths":{{}}}}"#)
        })
    })
}

/// `GET /openapi.json`
pub async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

/// `GET /docs`
pub async fn docs() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            ),
        ],
        DOCS_HTML,
    )
        .into_response()
}

const DOCS_HTML: &str = include_str!("docs.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_the_request_bodies() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/api/v1/models/{model}/infer",
            "/api/v1/models/{model}/batch",
            "/api/v1/tokens",
            "/api/v1/tokens/{id}",
            "/api/v1/audit",
            "/api/v1/requests",
            "/api/v1/cluster",
            "/healthz",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let schemas = &doc["components"]["schemas"];
        for s in [
            "InferBody",
            "BatchBody",
            "ScaleBody",
            "TokenBody",
            "RegisterBody",
            "ErrorEnvelope",
        ] {
            assert!(schemas[s].is_object(), "{s}");
        }
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            serde_json::json!([{}])
        );
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
