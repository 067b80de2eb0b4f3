//! Models: list, show, and the replica controls (scale, preload, unload).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_actors::router::ModelRoute;
use cohort_actors::{ControlError, ReplicaState, SupervisorMsg};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::{json_body, json_response, AppState};

/// The model's state: `ready` when any replica serves, else the first replica's state.
fn model_state(route: &ModelRoute) -> &'static str {
    if route.replicas.iter().any(|r| r.is_ready()) {
        return ReplicaState::Ready.as_str();
    }
    if route.config.replicas == 0 {
        return "unloaded";
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
    json_response(&json!({ "models": models, "devices": state.ctx.devices }))
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

/// The body of a scale request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    replicas: usize,
}

/// How long a preload waits for a ready replica before answering 202.
const PRELOAD_WAIT: Duration = Duration::from_secs(60);

/// Sends a replica change to the supervisor and maps its answer.
pub(crate) async fn control(
    state: &AppState,
    msg: impl FnOnce(ractor::RpcReplyPort<Result<(), ControlError>>) -> SupervisorMsg,
) -> Result<(), ApiError> {
    let answer = state
        .supervisor
        .call(msg, Some(Duration::from_secs(30)))
        .await
        .map_err(|e| ApiError::NoReplica(format!("the node supervisor did not answer: {e}")))?;
    match answer {
        ractor::rpc::CallResult::Success(Ok(())) => Ok(()),
        ractor::rpc::CallResult::Success(Err(ControlError::ModelNotFound(m))) => {
            Err(ApiError::ModelNotFound(m))
        }
        ractor::rpc::CallResult::Success(Err(e @ ControlError::Invalid(_))) => {
            Err(ApiError::invalid(e.to_string()))
        }
        ractor::rpc::CallResult::Success(Err(e)) => Err(ApiError::NoReplica(e.to_string())),
        _ => Err(ApiError::NoReplica(
            "the node supervisor did not answer in time".into(),
        )),
    }
}

fn show_now(state: &AppState, model: &str) -> Result<Response, ApiError> {
    let table = state.ctx.router.snapshot();
    let route = table
        .get(model)
        .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))?;
    Ok(json_response(&describe(route, true)))
}

/// `POST /api/v1/models/{model}/scale` with `{"replicas": n}`: run n replicas on this node.
/// Scaling down drains the removed replicas: they finish their queues first.
pub async fn scale(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&state, &headers, body)?;
    let parsed: ScaleBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("body must be {{\"replicas\": n}}: {e}")))?;
    control(&state, |reply| SupervisorMsg::SetReplicas {
        model: model.clone(),
        replicas: parsed.replicas,
        reply,
    })
    .await?;
    show_now(&state, &model)
}

/// `POST /api/v1/models/{model}/unload`: stop every replica (each drains first); the model
/// stays registered and can be preloaded again.
pub async fn unload(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, |reply| SupervisorMsg::SetReplicas {
        model: model.clone(),
        replicas: 0,
        reply,
    })
    .await?;
    show_now(&state, &model)
}

/// `POST /api/v1/models/{model}/preload`: load an unloaded model with the replicas it had
/// (at least one), and answer once one is ready (202 if that takes over a minute).
pub async fn preload(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, |reply| SupervisorMsg::Preload {
        model: model.clone(),
        reply,
    })
    .await?;
    let deadline = tokio::time::Instant::now() + PRELOAD_WAIT;
    loop {
        let table = state.ctx.router.snapshot();
        let route = table
            .get(&model)
            .ok_or_else(|| ApiError::ModelNotFound(model.clone()))?;
        let ready = route.replicas.iter().any(|r| r.is_ready());
        let failed = !route.replicas.is_empty()
            && route
                .replicas
                .iter()
                .all(|r| r.state() == ReplicaState::Failed);
        if ready || failed {
            return Ok(json_response(&describe(route, true)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(
                (StatusCode::ACCEPTED, json_response(&describe(route, true))).into_response(),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
