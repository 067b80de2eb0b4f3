//! `/healthz`, `/readyz`, `/api/v1/health/detailed` and `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_actors::SupervisorMsg;
use serde_json::json;

use crate::{json_response, AppState};

/// `GET /healthz`: the process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "Alive", body = Object)))]
pub async fn healthz() -> Response {
    json_response(&json!({"status": "ok"}))
}

/// `GET /readyz`: 200 once every configured model has a ready replica.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "Every model has a ready replica", body = Object),
        (status = 503, description = "Not yet, or a model failed", body = Object),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let table = state.ctx.router.snapshot();
    if table.all_ready() && !state.ctx.shutting_down() {
        return json_response(&json!({"status": "ready"}));
    }
    let waiting: Vec<&str> = table
        .models()
        .into_iter()
        .filter(|(_, r)| r.config.replicas > 0 && !r.replicas.iter().any(|x| x.is_ready()))
        .map(|(n, _)| n.as_str())
        .collect();
    let status = if state.ctx.shutting_down() {
        "shutting_down"
    } else {
        "not_ready"
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        json_response(&json!({"status": status, "waiting_for": waiting})),
    )
        .into_response()
}

/// The resident set size of this process, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `GET /api/v1/health/detailed`: replicas, queue depths, restarts, uptime, memory, and
/// the actor tree.
#[utoipa::path(get, path = "/api/v1/health/detailed", tag = "health",
    responses(
        (status = 200, description = "Replicas, queues, restarts, uptime, memory, actors", body = Object),
        crate::openapi::AdminRefusals,
    ))]
pub async fn detailed(State(state): State<AppState>) -> Response {
    let table = state.ctx.router.snapshot();
    let mut restarts = 0;
    let models: Vec<_> = table
        .models()
        .into_iter()
        .map(|(name, route)| {
            let replicas: Vec<_> = route.replicas.iter().map(|r| r.status()).collect();
            restarts += replicas.iter().map(|r| r.restarts).sum::<u64>();
            json!({"name": name, "version": route.config.version, "replicas": replicas})
        })
        .collect();
    let tree = ractor::call_t!(state.supervisor, SupervisorMsg::Tree, 1000).ok();
    let status = if table.all_ready() { "ok" } else { "degraded" };
    json_response(&json!({
        "status": status,
        "node": state.ctx.config.node_name,
        "uptime_s": state.ctx.started.elapsed().as_secs_f64(),
        "rss_bytes": rss_bytes(),
        "restarts_total": restarts,
        "devices": state.ctx.devices,
        "models": models,
        "actors": tree,
    }))
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        crate::openapi::TokenRefusals,
    ))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let table = state.ctx.router.snapshot();
    let uptime = state.ctx.started.elapsed();
    if let Some(cluster) = state.ctx.cluster.get() {
        state.ctx.metrics.observe_raft(cluster.gauges());
    }
    let text = state
        .ctx
        .metrics
        .render(&table, uptime.as_secs().max(Duration::ZERO.as_secs()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}
