//! `GET /api/v1/cluster` and `DELETE /api/v1/cluster/nodes/{id}`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_cluster::{
    ApplyOutcome, ClusterError, ClusterHandle, Command, ModelRecord, VersionRecord,
};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{json_body, json_response, AppState, RequestId};

const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClusterQuery {
    /// Answer through the leader (ReadIndex): a linearizable view.
    #[serde(default)]
    consistent: bool,
}

pub(crate) fn handle(state: &AppState) -> Result<&ClusterHandle, ApiError> {
    state
        .ctx
        .cluster
        .get()
        .ok_or_else(|| ApiError::NoReplica("the cluster membership is not running".into()))
}

pub(crate) fn map_err(e: ClusterError) -> ApiError {
    match e {
        ClusterError::Timeout | ClusterError::NotLeader { .. } => ApiError::Timeout(format!(
            "the cluster did not answer in time (no leader or no quorum?): {e}"
        )),
        other => ApiError::NoReplica(other.to_string()),
    }
}

/// `GET /api/v1/cluster[?consistent=true]`
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    params(ClusterQuery),
    responses(
        (status = 200, description = "Members, Raft state, registered models", body = Object),
        (status = 400, description = "Bad query", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
    )
)]
pub async fn status(
    State(state): State<AppState>,
    query: Result<Query<ClusterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidInput {
        message: format!("bad query string: {}", e.body_text()),
        details: Some(json!({"field": "consistent", "expected": "true or false"})),
    })?;
    let view = handle(&state)?
        .view(q.consistent, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    let nodes: Vec<_> = view
        .nodes
        .iter()
        .map(|m| {
            let r = &m.record;
            json!({
                "id": r.id,
                "name": r.name,
                "cluster_addr": r.cluster_addr,
                "http_addr": r.http_addr,
                "status": r.status,
                "role": r.role,
                "devices": r.devices,
                "labels": r.labels,
                "last_seen_ms": m.last_seen_ms,
            })
        })
        .collect();
    Ok(json_response(&json!({
        "cluster_id": view.cluster_id,
        "node_id": view.node_id,
        "nodes": nodes,
        "raft": {
            "leader_id": view.raft.leader_id,
            "term": view.raft.term,
            "role": view.raft.role,
            "commit_index": view.raft.commit_index,
            "applied_index": view.raft.applied_index,
            "snapshot_index": view.raft.snapshot_index,
            "first_index": view.raft.first_index,
            "last_index": view.raft.last_index,
            "voters": view.raft.voters,
            "learners": view.raft.learners,
        },
        "models": view.models,
    })))
}

/// `DELETE /api/v1/cluster/nodes/{id}`: removes a member.
#[utoipa::path(delete, path = "/api/v1/cluster/nodes/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "The member's Raft id")),
    responses(
        (status = 200, description = "Removed", body = Object),
        (status = 400, description = "Not a number", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such member", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn remove_node(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    path: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::InvalidInput {
        message: format!("a member id is a number: {}", e.body_text()),
        details: Some(json!({"field": "id"})),
    })?;
    let cluster = handle(&state)?;
    let view = cluster
        .view(false, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    if !view.raft.voters.contains(&id) && !view.raft.learners.contains(&id) {
        return Err(ApiError::NotFound(format!("cluster member {id} not found")));
    }
    let committed = cluster
        .remove_member(id, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    crate::tokens::record(
        &state,
        caller.audit(&rid, "node.remove", &id.to_string(), json!({})),
    )
    .await;
    Ok(json_response(
        &json!({"removed": id, "index": committed.index}),
    ))
}

/// The body of `POST /api/v1/models`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// The name clients use.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    name: String,
    /// One of candle-mlp, onnx, candle-bert, echo, sleep, fail.
    engine: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default = "default_version")]
    version: String,
}

fn default_version() -> String {
    "1".into()
}

const ENGINES: &[&str] = &["candle-mlp", "onnx", "candle-bert", "echo", "sleep", "fail"];

/// `POST /api/v1/models`: registers a model in the replicated cluster state (once
/// committed on a quorum). 201 when new, 200 when it was already registered. Where its
/// replicas run is placement's business (a later part); today each node serves the
/// models of its own configuration.
#[utoipa::path(post, path = "/api/v1/models", tag = "models",
    request_body = RegisterBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
        (status = 200, description = "Already registered", body = Object),
        (status = 201, description = "Registered", body = Object),
    )
)]
pub async fn register_model(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&state, &headers, body)?;
    let b: RegisterBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("malformed registration: {e}")))?;
    if !cohort_config::valid_name(&b.name) {
        return Err(ApiError::InvalidInput {
            message: format!("model name {:?} is not valid", b.name),
            details: Some(json!({"field": "name"})),
        });
    }
    if !ENGINES.contains(&b.engine.as_str()) {
        return Err(ApiError::InvalidInput {
            message: format!("engine must be one of {ENGINES:?}"),
            details: Some(json!({"field": "engine"})),
        });
    }
    if b.version.is_empty() || b.version.len() > 64 {
        return Err(ApiError::invalid("version must be 1 to 64 characters"));
    }
    let record = ModelRecord {
        name: b.name.clone(),
        engine: b.engine,
        path: b.path,
        versions: [(b.version, VersionRecord { published: true })]
            .into_iter()
            .collect(),
    };
    let meta = caller.audit(
        &rid,
        "model.register",
        &record.name,
        json!({"engine": record.engine, "path": record.path}),
    );
    let committed = handle(&state)?
        .propose_audited(Command::RegisterModel(record), meta, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    let (status, created) = match committed.outcome {
        ApplyOutcome::Applied => (StatusCode::CREATED, true),
        ApplyOutcome::Unchanged | ApplyOutcome::Duplicate => (StatusCode::OK, false),
        ApplyOutcome::Rejected(r) => return Err(ApiError::invalid(format!("{r:?}"))),
    };
    Ok((
        status,
        json_response(&json!({"model": b.name, "created": created, "index": committed.index})),
    )
        .into_response())
}
