//! `GET /api/v1/models` and `GET /api/v1/models/{model}`.

use axum::extract::{Path, State};
use axum::response::Response;
use cohort_actors::router::ModelRoute;
use cohort_actors::ReplicaState;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::{json_response, AppState};

/// The model's state: `ready` when any replica serves, else the first replica's state.
fn model_state(route: &ModelRoute) -> &'static str {
    if route.replicas.iter().any(|r| r.is_ready()) {
        return ReplicaState::Ready.as_str();
    }
    route
        .replicas
        .first()
        .map_or("unloaded", |r| r.state().as_str())
}

fn describe(route: &ModelRoute, with_replicas: bool) -> Value {
    let c = &route.config;
    let meta = route.replicas.iter().find_map(|r| r.metadata().cloned());
    let ready = route.replicas.iter().filter(|r| r.is_ready()).count();
    let mut v = json!({
        "name": c.name,
        "version": c.version,
        "engine": c.engine.as_str(),
        "state": model_state(route),
        "device": c.device,
        "inputs": meta.as_ref().map(|m| json!(m.inputs)).unwrap_or(json!([])),
        "outputs": meta.as_ref().map(|m| json!(m.outputs)).unwrap_or(json!([])),
        "replicas_ready": ready,
        "replicas_desired": c.replicas,
    });
    if with_replicas {
        let replicas: Vec<_> = route.replicas.iter().map(|r| r.status()).collect();
        v["replicas"] = json!(replicas);
        v["batching"] = json!(c.batching);
    }
    v
}

/// `GET /api/v1/models`
pub async fn list(State(state): State<AppState>) -> Response {
    let table = state.ctx.router.snapshot();
    let models: Vec<Value> = table
        .models()
        .into_iter()
        .map(|(_, r)| describe(r, false))
        .collect();
    json_response(&json!({ "models": models }))
}

/// `GET /api/v1/models/{model}`
pub async fn show(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let table = state.ctx.router.snapshot();
    let route = table
        .get(&model)
        .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
    Ok(json_response(&describe(route, true)))
}
