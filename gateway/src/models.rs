//! Models: list, show, and the replica controls (scale, preload, unload).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_actors::router::ModelRoute;
use cohort_actors::{ControlError, ReplicaState, SupervisorMsg};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::tokens::record;
use crate::{json_body, json_response, AppState, RequestId};

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
#[utoipa::path(get, path = "/api/v1/models", tag = "models",
    responses(
        (status = 200, description = "The models this node serves (those the token may use)", body = crate::openapi::ModelList),
        crate::openapi::TokenRefusals,
    )
)]
pub async fn list(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    let table = state.ctx.router.snapshot();
    let models: Vec<Value> = table
        .models()
        .into_iter()
        .filter(|(name, _)| caller.allows_model(name))
        .map(|(_, r)| describe(r, false))
        .collect();
    json_response(&json!({ "models": models, "devices": state.ctx.devices }))
}

/// `GET /api/v1/models/{model}`
#[utoipa::path(get, path = "/api/v1/models/{model}", tag = "models",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    responses(
        (status = 200, description = "The model with its replicas", body = crate::openapi::ModelInfo),
        crate::openapi::TokenRefusals,
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
    )
)]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScaleBody {
    /// Replicas this node should run.
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
#[utoipa::path(post, path = "/api/v1/models/{model}/scale", tag = "models",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    request_body = ScaleBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
        (status = 200, description = "The model with its replicas", body = crate::openapi::ModelInfo),
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn scale(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
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
    // The replicas as the change left them, before the audit entry's round trip.
    let shown = show_now(&state, &model);
    let detail = json!({"replicas": parsed.replicas});
    record(&state, caller.audit(&rid, "model.scale", &model, detail)).await;
    shown
}

/// `POST /api/v1/models/{model}/unload`: stop every replica (each drains first); the model
/// stays registered and can be preloaded again.
#[utoipa::path(post, path = "/api/v1/models/{model}/unload", tag = "models",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    responses(
        (status = 200, description = "The model with its replicas", body = crate::openapi::ModelInfo),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn unload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, |reply| SupervisorMsg::SetReplicas {
        model: model.clone(),
        replicas: 0,
        reply,
    })
    .await?;
    record(
        &state,
        caller.audit(&rid, "model.unload", &model, json!({})),
    )
    .await;
    show_now(&state, &model)
}

/// `POST /api/v1/models/{model}/preload`: load an unloaded model with the replicas it had
/// (at least one), and answer once one is ready (202 if that takes over a minute).
#[utoipa::path(post, path = "/api/v1/models/{model}/preload", tag = "models",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    responses(
        (status = 200, description = "Loaded (or failed: see the replicas)", body = crate::openapi::ModelInfo),
        (status = 202, description = "Still loading after a minute", body = crate::openapi::ModelInfo),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn preload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    control(&state, |reply| SupervisorMsg::Preload {
        model: model.clone(),
        reply,
    })
    .await?;
    record(
        &state,
        caller.audit(&rid, "model.preload", &model, json!({})),
    )
    .await;
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

/// `DELETE /api/v1/models/{model}`: removes the model from the cluster's registry (with
/// its deployment and assignments) and stops this node's replicas of it (each drains
/// first). A model in a node's configuration is registered again when that node starts.
#[utoipa::path(delete, path = "/api/v1/models/{model}", tag = "models",
    params(("model" = String, Path, description = "The model's name", example = "echo")),
    responses(
        (status = 200, description = "Deleted", body = Object),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such model", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let cluster = crate::cluster::handle(&state)?;
    let served_here = state.ctx.router.snapshot().get(&model).is_some();
    let meta = caller.audit(&rid, "model.delete", &model, json!({}));
    let committed = cluster
        .propose_audited(
            cohort_cluster::Command::RemoveModel {
                name: model.clone(),
            },
            meta,
            Duration::from_secs(10),
        )
        .await
        .map_err(crate::cluster::map_err)?;
    let registered = matches!(committed.outcome, cohort_cluster::ApplyOutcome::Applied);
    if !registered && !served_here {
        return Err(ApiError::ModelNotFound(model));
    }
    if served_here {
        control(&state, |reply| SupervisorMsg::SetReplicas {
            model: model.clone(),
            replicas: 0,
            reply,
        })
        .await?;
    }
    Ok(json_response(&json!({
        "model": model,
        "deleted": true,
        "was_registered": registered,
        "replicas_stopped_here": served_here,
    })))
}
