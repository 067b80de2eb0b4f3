//! `/api/v1/tokens` (create, list, show, change, revoke) and `GET /api/v1/audit`.
//!
//! Tokens live in the replicated ClusterState; every change goes through Raft as an
//! audited command, so the audit log records who did it in the same entry. A token's
//! secret is returned once, by the create call; the state keeps only its keyed hash.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cohort_cluster::tokens::{parse_cidr, valid_glob};
use cohort_cluster::{
    ApplyOutcome, AuditQuery, Command, Rejection, TokenRecord, TokenRole, TokenStatus,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::cluster::{handle as cluster, map_err as cluster_err};
use crate::error::ApiError;
use crate::{json_body, json_response, AppState, RequestId};

const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

fn status_of(t: &TokenRecord, now: u64) -> &'static str {
    match t.status {
        TokenStatus::Revoked => "revoked",
        TokenStatus::Paused => "paused",
        TokenStatus::Active if t.expires_at_ms.is_some_and(|e| e <= now) => "expired",
        TokenStatus::Active => "active",
    }
}

/// A token as the API shows it (never its hash).
fn view(t: &TokenRecord, now: u64) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "allowed_models": t.allowed_models,
        "ip_allow": t.ip_allow,
        "rate_per_minute": t.rate_per_minute,
        "monthly_quota": t.monthly_quota,
        "used_this_month": t.used_in(now),
        "expires_at_ms": t.expires_at_ms,
        "status": status_of(t, now),
        "created_at_ms": t.created_at_ms,
        "created_by": t.created_by,
    })
}

/// The fields a create or a change may set. For a change, an absent field stays as it
/// is, and `null` clears a limit.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenBody {
    /// A name for people (required on create).
    name: Option<String>,
    /// `user` (default) or `admin`.
    #[schema(value_type = Option<String>, pattern = "^(user|admin)$")]
    role: Option<TokenRole>,
    /// Glob patterns of the models the token may use; empty: all.
    allowed_models: Option<Vec<String>>,
    /// Addresses or CIDRs it may come from; empty: any.
    ip_allow: Option<Vec<String>>,
    /// Requests a minute on each node; null: no limit.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>, minimum = 1)]
    rate_per_minute: Option<Option<u32>>,
    /// Requests a calendar month (UTC); null: no quota.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u64>)]
    monthly_quota: Option<Option<u64>>,
    /// When it stops being accepted (ms since the Unix epoch); null: never.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u64>)]
    expires_at_ms: Option<Option<u64>>,
    /// Convenience: expires this many seconds from now.
    expires_in_s: Option<u64>,
    /// `active` or `paused` (a change only; revoke with DELETE).
    #[schema(pattern = "^(active|paused)$")]
    status: Option<String>,
}

/// Present-but-null (`Some(None)`) apart from absent (`None`).
fn nullable<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn field_err(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidInput {
        message: message.into(),
        details: Some(json!({ "field": field })),
    }
}

impl TokenBody {
    /// Applies the body to `t`, checking each field.
    fn apply(self, t: &mut TokenRecord, now: u64, creating: bool) -> Result<(), ApiError> {
        if let Some(name) = self.name {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(field_err(
                    "name",
                    "name must be 1 to 128 printable characters",
                ));
            }
            t.name = name;
        } else if creating {
            return Err(field_err("name", "a token needs a name"));
        }
        if let Some(role) = self.role {
            t.role = role;
        }
        if let Some(models) = self.allowed_models {
            if models.len() > 64 {
                return Err(field_err("allowed_models", "at most 64 patterns"));
            }
            if let Some(bad) = models.iter().find(|p| !valid_glob(p)) {
                return Err(field_err(
                    "allowed_models",
                    format!("{bad:?} is not a model pattern (letters, digits, - _ . and the wildcards * ?)"),
                ));
            }
            t.allowed_models = models;
        }
        if let Some(ips) = self.ip_allow {
            if ips.len() > 64 {
                return Err(field_err("ip_allow", "at most 64 entries"));
            }
            if let Some(bad) = ips.iter().find(|e| parse_cidr(e).is_none()) {
                return Err(field_err(
                    "ip_allow",
                    format!("{bad:?} is not an address or a CIDR such as 10.0.0.0/8"),
                ));
            }
            t.ip_allow = ips;
        }
        if let Some(rate) = self.rate_per_minute {
            if rate == Some(0) {
                return Err(field_err(
                    "rate_per_minute",
                    "must be at least 1 (or null for no limit)",
                ));
            }
            t.rate_per_minute = rate;
        }
        if let Some(quota) = self.monthly_quota {
            t.monthly_quota = quota;
        }
        match (self.expires_at_ms, self.expires_in_s) {
            (Some(_), Some(_)) => {
                return Err(field_err(
                    "expires_in_s",
                    "give expires_at_ms or expires_in_s, not both",
                ))
            }
            (Some(at), None) => t.expires_at_ms = at,
            (None, Some(s)) => {
                let ms = s.checked_mul(1000).and_then(|ms| now.checked_add(ms));
                t.expires_at_ms =
                    Some(ms.ok_or_else(|| field_err("expires_in_s", "too far away"))?);
            }
            (None, None) => {}
        }
        if let Some(status) = self.status {
            if creating {
                return Err(field_err(
                    "status",
                    "a new token is active; pause it with PATCH",
                ));
            }
            t.status = match status.as_str() {
                "active" => TokenStatus::Active,
                "paused" => TokenStatus::Paused,
                _ => {
                    return Err(field_err(
                        "status",
                        "status must be active or paused (revoke with DELETE)",
                    ))
                }
            };
        }
        Ok(())
    }
}

fn parse_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<TokenBody, ApiError> {
    let body = json_body(state, headers, body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("malformed token: {e}")))
}

fn outcome(o: ApplyOutcome) -> Result<(), ApiError> {
    match o {
        ApplyOutcome::Applied | ApplyOutcome::Unchanged | ApplyOutcome::Duplicate => Ok(()),
        ApplyOutcome::Rejected(Rejection::NotFound { id, .. }) => {
            Err(ApiError::NotFound(format!("token {id:?} not found")))
        }
        ApplyOutcome::Rejected(Rejection::Conflict(m)) => Err(ApiError::invalid(m)),
        ApplyOutcome::Rejected(r) => Err(ApiError::invalid(r.to_string())),
    }
}

/// `POST /api/v1/tokens`: 201 with the token and its secret (shown this once).
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body = TokenBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
        (status = 201, description = "The token, with its secret (shown this once)", body = crate::openapi::TokenCreated),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = parse_body(&state, &headers, body)?;
    let cluster = cluster(&state)?;
    let now = cohort_cluster::raft_actor::now_ms();
    let minted = cluster
        .token_key()
        .mint()
        .map_err(|e| ApiError::InferenceFailed(format!("no randomness: {e}")))?;
    let mut t = TokenRecord::new(&minted, "", TokenRole::User, now, &caller.who);
    body.apply(&mut t, now, true)?;
    let meta = caller.audit(
        &rid,
        "token.create",
        &t.id,
        json!({"name": t.name, "role": t.role}),
    );
    let committed = cluster
        .propose_audited(Command::UpsertToken(t.clone()), meta, CLUSTER_TIMEOUT)
        .await
        .map_err(cluster_err)?;
    outcome(committed.outcome)?;
    let mut v = view(&t, now);
    v["secret"] = json!(minted.secret);
    Ok((StatusCode::CREATED, json_response(&v)).into_response())
}

/// `GET /api/v1/tokens`
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token (never a secret or a hash)", body = crate::openapi::TokenList),
        crate::openapi::AdminRefusals,
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let now = cohort_cluster::raft_actor::now_ms();
    let tokens = cluster(&state)?.tokens();
    let list: Vec<Value> = tokens.values().map(|t| view(t, now)).collect();
    Ok(json_response(&json!({ "tokens": list })))
}

fn get_token(state: &AppState, id: &str) -> Result<TokenRecord, ApiError> {
    cluster(state)?
        .tokens()
        .get(id)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("token {id:?} not found")))
}

/// `GET /api/v1/tokens/{id}`
#[utoipa::path(get, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "The token", body = crate::openapi::TokenView),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such token", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = get_token(&state, &id)?;
    Ok(json_response(&view(
        &t,
        cohort_cluster::raft_actor::now_ms(),
    )))
}

/// `PATCH /api/v1/tokens/{id}`: changes the fields given.
#[utoipa::path(patch, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id")),
    request_body = TokenBody,
    responses(
        (status = 400, description = "Malformed request", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
        (status = 200, description = "The token as changed", body = crate::openapi::TokenView),
        (status = 404, description = "No such token", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = parse_body(&state, &headers, body)?;
    let now = cohort_cluster::raft_actor::now_ms();
    let detail = json!({
        "status": body.status,
        "role": body.role,
        "name": body.name,
        "allowed_models": body.allowed_models,
        "ip_allow": body.ip_allow,
        "rate_per_minute": body.rate_per_minute,
        "monthly_quota": body.monthly_quota,
        "expires_at_ms": body.expires_at_ms,
        "expires_in_s": body.expires_in_s,
    });
    let action = match body.status.as_deref() {
        Some("paused") => "token.pause",
        Some("active") => "token.resume",
        _ => "token.update",
    };
    // Read, change, and commit only if nobody changed the token in between (this node's
    // copy may also lag the cluster's): on a conflict, read again (the refused entry has
    // been applied here, so the copy is now at least as new) and redo the change.
    for _ in 0..UPDATE_ATTEMPTS {
        let before = get_token(&state, &id)?;
        if before.status == TokenStatus::Revoked {
            return Err(ApiError::invalid(format!("token {id:?} is revoked")));
        }
        let mut after = before.clone();
        body.clone().apply(&mut after, now, false)?;
        let meta = caller.audit(&rid, action, &id, detail.clone());
        let committed = cluster(&state)?
            .propose_audited(
                Command::UpdateToken {
                    before: Box::new(before),
                    after: Box::new(after),
                },
                meta,
                CLUSTER_TIMEOUT,
            )
            .await
            .map_err(cluster_err)?;
        if matches!(
            committed.outcome,
            ApplyOutcome::Rejected(Rejection::Conflict(_))
        ) {
            continue;
        }
        outcome(committed.outcome)?;
        let t = get_token(&state, &id)?;
        return Ok(json_response(&view(&t, now)));
    }
    Err(ApiError::Overloaded(format!(
        "token {id:?} kept changing while this update was tried {UPDATE_ATTEMPTS} times; try again"
    )))
}

/// How often a token update is tried when other changes keep getting in first.
const UPDATE_ATTEMPTS: usize = 16;

/// `DELETE /api/v1/tokens/{id}`: revokes the token for good.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "The revoked token", body = crate::openapi::TokenView),
        crate::openapi::AdminRefusals,
        (status = 404, description = "No such token", body = crate::openapi::ErrorEnvelope),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_token(&state, &id)?;
    let meta = caller.audit(&rid, "token.revoke", &id, json!({}));
    let committed = cluster(&state)?
        .propose_audited(
            Command::RevokeToken { id: id.clone() },
            meta,
            CLUSTER_TIMEOUT,
        )
        .await
        .map_err(cluster_err)?;
    outcome(committed.outcome)?;
    let t = get_token(&state, &id)?;
    Ok(json_response(&view(
        &t,
        cohort_cluster::raft_actor::now_ms(),
    )))
}

/// Records an admin action that changes nothing replicated (a node's own replicas). The
/// action has already happened: a failure to record it is logged, not answered.
pub(crate) async fn record(state: &AppState, meta: cohort_cluster::AuditMeta) {
    let Some(cluster) = state.ctx.cluster.get() else {
        tracing::warn!(action = %meta.action, "no cluster: the audit entry is lost");
        return;
    };
    if let Err(e) = cluster
        .propose(Command::Audit(meta.clone()), CLUSTER_TIMEOUT)
        .await
    {
        tracing::warn!(action = %meta.action, target = %meta.target, error = %e, "cannot record the audit entry");
    }
}

/// The query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only entries at or after this time (ms since the Unix epoch).
    since: Option<u64>,
    /// Only entries with a sequence number below this (the previous page's `next_before`).
    before: Option<u64>,
    /// Only this action, or a family (`token` matches `token.create`).
    action: Option<String>,
    /// Only this token's actions.
    who: Option<String>,
    /// At most this many (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// `GET /api/v1/audit?since=&before=&action=&who=&limit=`: newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(AuditParams),
    responses(
        (status = 200, description = "Admin actions, newest first", body = crate::openapi::AuditList),
        (status = 400, description = "Bad query", body = crate::openapi::ErrorEnvelope),
        crate::openapi::AdminRefusals,
    )
)]
pub async fn audit(
    State(state): State<AppState>,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidInput {
        message: format!("bad query string: {}", e.body_text()),
        details: Some(
            json!({"expected": "since, before: numbers; action, who: text; limit: 1 to 1000"}),
        ),
    })?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(field_err("limit", "limit must be between 1 and 1000"));
    }
    let entries = cluster(&state)?
        .audit(
            AuditQuery {
                since_ms: q.since,
                before_seq: q.before,
                action: q.action,
                who: q.who,
                limit,
            },
            CLUSTER_TIMEOUT,
        )
        .await
        .map_err(cluster_err)?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "at_ms": e.at_ms,
                "who": e.meta.who,
                "action": e.meta.action,
                "target": e.meta.target,
                "request_id": e.meta.request_id,
                "client_ip": e.meta.client_ip,
                "detail": serde_json::from_str::<Value>(&e.meta.detail).unwrap_or(Value::String(e.meta.detail)),
                "outcome": e.outcome,
            })
        })
        .collect();
    Ok(json_response(
        &json!({ "entries": entries, "next_before": next }),
    ))
}
