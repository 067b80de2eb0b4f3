//! `GET /api/v1/cluster` and `DELETE /api/v1/cluster/nodes/{id}`.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use cohort_cluster::{ClusterError, ClusterHandle};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::{json_response, AppState};

const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
pub struct ClusterQuery {
    /// Answer through the leader (ReadIndex): a linearizable view.
    #[serde(default)]
    consistent: bool,
}

fn handle(state: &AppState) -> Result<&ClusterHandle, ApiError> {
    state
        .ctx
        .cluster
        .get()
        .ok_or_else(|| ApiError::NoReplica("the cluster membership is not running".into()))
}

fn map_err(e: ClusterError) -> ApiError {
    match e {
        ClusterError::Timeout | ClusterError::NotLeader { .. } => ApiError::Timeout(format!(
            "the cluster did not answer in time (no leader or no quorum?): {e}"
        )),
        other => ApiError::NoReplica(other.to_string()),
    }
}

/// `GET /api/v1/cluster[?consistent=true]`
pub async fn status(
    State(state): State<AppState>,
    Query(q): Query<ClusterQuery>,
) -> Result<Response, ApiError> {
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
        "models": view.state.models.keys().collect::<Vec<_>>(),
    })))
}

/// `DELETE /api/v1/cluster/nodes/{id}`: removes a member.
pub async fn remove_node(
    State(state): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    let cluster = handle(&state)?;
    let view = cluster
        .view(false, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    if !view.raft.voters.contains(&id) && !view.raft.learners.contains(&id) {
        return Err(ApiError::NotFound(format!("cluster member {id}")));
    }
    let committed = cluster
        .remove_member(id, CLUSTER_TIMEOUT)
        .await
        .map_err(map_err)?;
    Ok(json_response(
        &json!({"removed": id, "index": committed.index}),
    ))
}
