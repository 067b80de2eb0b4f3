//! Access control: who is calling, and may they.
//!
//! The [`authenticate`] middleware runs on every routed request. It looks up the route's
//! [`Access`] class (public, read, infer, admin), and when auth is on it reads the
//! `Authorization: Bearer cht_<id>_<key>` header, finds the token in the token table the
//! RaftActor publishes (no message, no lock held beyond a map read), checks the keyed hash,
//! then status, expiry, client address, role and model. Inference requests also take one
//! request from the token's rate-limit bucket (per node) and count against its monthly
//! quota: counts build up here and are sent through Raft every `auth.usage_flush_ms`,
//! so a quota may be passed by what the nodes counted in the last interval.
//!
//! Refusals are answered in the dialect of the route: Cohort's envelope (`/api/v1`),
//! KServe's `{"error": "..."}` (`/v2`), or OpenAI's error object (`/v1`):
//! 401 UNAUTHENTICATED (no token, unknown, revoked), 403 FORBIDDEN (role, model, address,
//! paused, expired), 429 RATE_LIMITED with Retry-After (rate, quota).
//!
//! With auth off every caller is the local administrator (`local`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use cohort_cluster::tokens::{ip_allowed, parse_secret};
use cohort_cluster::{
    next_month_start_ms, AuditMeta, ClusterHandle, Command, TokenRecord, TokenRole, TokenStatus,
};

use cohort_actors::RejectReason;

use crate::dialect::Dialect;
use crate::error::ApiError;
use crate::reqlog::CallerTag;
use crate::{AppState, RequestId};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health probes, the API description).
    Public,
    /// Any valid token (listings, metadata, metrics); models are checked.
    Read,
    /// Any valid token; models are checked; counts against rate limit and quota.
    Infer,
    /// Admin tokens only.
    Admin,
}

/// The class of a route, by its matched path and method. Unknown routes need an admin.
pub fn access(path: &str, method: &Method) -> Access {
    match path {
        "/healthz" | "/readyz" | "/v2/health/live" | "/v2/health/ready" | "/openapi.json"
        | "/docs" => Access::Public,
        "/api/v1/models/{model}/infer"
        | "/api/v1/models/{model}/batch"
        | "/v2/models/{model}/infer"
        | "/v2/models/{model}/versions/{version}/infer"
        | "/v1/embeddings" => Access::Infer,
        "/api/v1/models" | "/api/v1/models/{model}" if method == Method::GET => Access::Read,
        "/metrics"
        | "/v2"
        | "/v2/models/{model}"
        | "/v2/models/{model}/versions/{version}"
        | "/v2/models/{model}/ready"
        | "/v2/models/{model}/versions/{version}/ready"
        | "/v2/models/{model}/config"
        | "/v2/models/{model}/versions/{version}/config"
        | "/v2/models/{model}/stats"
        | "/v2/models/{model}/versions/{version}/stats"
        | "/v2/repository/index"
        | "/v1/models" => Access::Read,
        _ => Access::Admin,
    }
}

/// Who is calling, for handlers (model checks, audit records).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's id, or `local` when auth is off.
    pub who: Arc<str>,
    /// Whether the caller may do admin actions.
    pub admin: bool,
    /// The model patterns it may use; `None`: all.
    pub allowed_models: Option<Arc<[String]>>,
    /// The client's address, when known.
    pub ip: Option<IpAddr>,
    /// An inference route whose model is in the body (`/v1/embeddings`): the rate limit
    /// and quota are charged by [`Caller::use_model`] once the handler knows the model and
    /// the token may use it, not by the middleware.
    deferred: Option<Arc<Charge>>,
}

/// What one inference request costs a token: a request from its rate limit and one from
/// its monthly quota.
#[derive(Debug)]
struct Charge {
    id: String,
    rate_per_minute: Option<u32>,
    monthly_quota: Option<u64>,
}

impl Caller {
    fn local(ip: Option<IpAddr>) -> Caller {
        static LOCAL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Caller {
            who: Arc::clone(LOCAL.get_or_init(|| Arc::from("local"))),
            admin: true,
            allowed_models: None,
            ip,
            deferred: None,
        }
    }

    /// For a route whose model is in the body: 403 unless this caller may use `model`,
    /// then the rate limit and quota (429), charged only now, so a request for a model the
    /// token may not use costs it nothing.
    pub fn use_model(&self, state: &AppState, model: &str) -> Result<(), ApiError> {
        self.check_model(model).inspect_err(|e| {
            state.ctx.metrics.rejected(reject_reason(e));
        })?;
        match &self.deferred {
            // The usage as stored now: a flush since the middleware ran moved counts from
            // pending to the stored figure.
            Some(charge) => charge_token(state, charge, current_usage(state, &charge.id))
                .inspect_err(|e| {
                    state.ctx.metrics.rejected(reject_reason(e));
                }),
            None => Ok(()),
        }
    }

    /// Whether this caller may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|patterns| {
            patterns
                .iter()
                .any(|p| cohort_cluster::tokens::glob_match(p, model))
        })
    }

    /// 403 unless this caller may use `model`.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.allows_model(model) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token may not use model {model:?}"
            )))
        }
    }

    /// An audit record of an action by this caller.
    pub fn audit(
        &self,
        request_id: &RequestId,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> AuditMeta {
        AuditMeta {
            who: self.who.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            request_id: request_id.0.to_string(),
            client_ip: self.ip.map(|i| i.to_string()).unwrap_or_default(),
            detail: detail.to_string(),
        }
    }
}

/// A token bucket: `rate` requests a minute, bursts up to a minute's worth.
#[derive(Debug, Clone)]
struct Bucket {
    rate: u32,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: f64::from(rate),
            at: now,
        }
    }

    /// Takes one request; `Err(seconds)` until one is available.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let per_s = f64::from(self.rate) / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_s).min(f64::from(self.rate));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if per_s <= 0.0 {
            Err(60)
        } else {
            Err(((1.0 - self.tokens) / per_s).ceil().max(1.0) as u64)
        }
    }
}

/// The gateway's part of access control: rate-limit buckets and usage not yet sent.
#[derive(Debug)]
pub struct AuthState {
    enabled: bool,
    buckets: Mutex<HashMap<String, Bucket>>,
    pending: Mutex<HashMap<String, u64>>,
}

impl AuthState {
    /// Auth on or off.
    pub fn new(enabled: bool) -> AuthState {
        AuthState {
            enabled,
            buckets: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn pending_of(&self, id: &str) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    fn count(&self, id: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get_mut(id) {
            Some(n) => *n += 1,
            None => {
                pending.insert(id.to_string(), 1);
            }
        }
    }

    fn take_rate(&self, id: &str, rate: u32) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry(id.to_string())
            .or_insert_with(|| Bucket::new(rate, now));
        if bucket.rate != rate {
            // The limit was changed: start over at the new rate.
            *bucket = Bucket::new(rate, now);
        }
        bucket.take(now)
    }

    /// Sends the usage counted so far through Raft; what cannot be sent is kept for the
    /// next time.
    pub async fn flush_usage(&self, cluster: &ClusterHandle, timeout: Duration) {
        // The counts stay in `pending` until their proposal is applied (and the token table
        // that includes them published): a quota check in between still sees them, so the
        // flush never opens a window in which a spent quota admits a request.
        let counts: Vec<(String, u64)> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        for (id, amount) in counts {
            let cmd = Command::RecordTokenUsage {
                id: id.clone(),
                amount,
            };
            match cluster.propose(cmd, timeout).await {
                Ok(_) => {
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = pending.get_mut(&id) {
                        *n = n.saturating_sub(amount);
                        if *n == 0 {
                            pending.remove(&id);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(token = %id, amount, error = %e, "cannot record token usage; will retry")
                }
            }
        }
    }
}

/// Sends counted usage every `every` until `stop` fires, then once more.
pub async fn usage_flusher(
    auth: Arc<AuthState>,
    ctx: Arc<cohort_actors::NodeContext>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if let Some(cluster) = ctx.cluster.get() {
            auth.flush_usage(cluster, Duration::from_secs(5)).await;
        }
        if stopping {
            return;
        }
    }
}

/// Checks a bearer secret against the token table; the token when it is one of ours.
fn find_token<'a>(
    tokens: &'a BTreeMap<String, TokenRecord>,
    key: &cohort_cluster::TokenKey,
    secret: &str,
) -> Result<&'a TokenRecord, ApiError> {
    let unknown = || ApiError::Unauthenticated("the token is not valid".into());
    let (id, k) = parse_secret(secret).ok_or_else(unknown)?;
    let token = tokens.get(id).ok_or_else(unknown)?;
    if !key.verify(k, &token.key_hash) {
        return Err(unknown());
    }
    if token.status == TokenStatus::Revoked {
        return Err(ApiError::Unauthenticated("the token was revoked".into()));
    }
    Ok(token)
}

fn bearer(req: &Request) -> Result<&str, ApiError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthenticated(
                "this endpoint needs a token: send `Authorization: Bearer <token>`".into(),
            )
        })?
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the Authorization header is not text".into()))?;
    let (scheme, rest) = value.trim().split_once(' ').ok_or_else(|| {
        ApiError::Unauthenticated("the Authorization header must be `Bearer <token>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthenticated(
            "the Authorization header must be `Bearer <token>`".into(),
        ));
    }
    Ok(rest.trim())
}

/// Everything about one token and one request, except the rate limit and usage.
fn authorize(
    token: &TokenRecord,
    access: Access,
    model: Option<&str>,
    ip: Option<IpAddr>,
    now: u64,
) -> Result<(), ApiError> {
    if token.status == TokenStatus::Paused {
        return Err(ApiError::Forbidden("the token is paused".into()));
    }
    if token.expires_at_ms.is_some_and(|t| t <= now) {
        return Err(ApiError::Forbidden("the token has expired".into()));
    }
    if !token.ip_allow.is_empty() && !ip.is_some_and(|ip| ip_allowed(&token.ip_allow, ip)) {
        return Err(ApiError::Forbidden(format!(
            "the token may not be used from {}",
            ip.map_or_else(|| "an unknown address".to_string(), |i| i.to_string())
        )));
    }
    if access == Access::Admin && token.role != TokenRole::Admin {
        return Err(ApiError::Forbidden(
            "this endpoint needs an admin token".into(),
        ));
    }
    if let Some(model) = model {
        if !token.allows_model(model) {
            return Err(ApiError::Forbidden(format!(
                "this token may not use model {model:?}"
            )));
        }
    }
    Ok(())
}

/// The model a path names (its `{model}` segment, percent-decoded as the handlers'
/// `Path` extractor decodes it), for the routes that have one. Matching the raw segment
/// would let `/v2/models/team%41/infer` pass a `team*1`-style model rule and then be served
/// as `teamA`. A segment that is not UTF-8 once decoded keeps U+FFFD in place of the bad
/// bytes: no model name has that character, and the handler refuses such a path anyway.
pub(crate) fn path_model<'a>(template: &str, path: &'a str) -> Option<Cow<'a, str>> {
    let idx = template.split('/').position(|s| s == "{model}")?;
    let segment = path.split('/').nth(idx)?;
    Some(percent_encoding::percent_decode_str(segment).decode_utf8_lossy())
}

/// The access-control middleware (a route layer: it sees the matched route).
pub async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // Auth off: every caller is the local administrator; nothing to classify.
    if !state.auth.enabled() {
        req.extensions_mut().insert(Caller::local(ip));
        return next.run(req).await;
    }
    let Some(template) = req.extensions().get::<MatchedPath>().cloned() else {
        return next.run(req).await;
    };
    let template = template.as_str();
    let access = access(template, req.method());
    if access == Access::Public {
        req.extensions_mut().insert(Caller::local(ip));
        return next.run(req).await;
    }
    let dialect = Dialect::of(template);
    match check(&state, &req, template, access, ip) {
        Ok(caller) => {
            let tag = CallerTag(Arc::clone(&caller.who));
            req.extensions_mut().insert(caller);
            let mut res = next.run(req).await;
            // For the request log: which token it was.
            res.extensions_mut().insert(tag);
            res
        }
        Err((e, token)) => {
            state.ctx.metrics.rejected(reject_reason(&e));
            let mut res = dialect.error(e);
            if let Some(id) = token {
                res.extensions_mut()
                    .insert(CallerTag(Arc::from(id.as_str())));
            }
            res
        }
    }
}

/// How a refusal is counted in `cohort_auth_rejections_total`.
fn reject_reason(e: &ApiError) -> RejectReason {
    match e {
        ApiError::Unauthenticated(_) => RejectReason::Unauthenticated,
        ApiError::Forbidden(_) => RejectReason::Forbidden,
        ApiError::RateLimited { message, .. } if message.contains("quota") => RejectReason::Quota,
        _ => RejectReason::RateLimited,
    }
}

/// The caller, or why not (with the token's id once it is known).
fn check(
    state: &AppState,
    req: &Request,
    template: &str,
    access: Access,
    ip: Option<IpAddr>,
) -> Result<Caller, (ApiError, Option<String>)> {
    let cluster = state.ctx.cluster.get().ok_or_else(|| {
        (
            ApiError::NoReplica("the cluster is not running: tokens cannot be checked".into()),
            None,
        )
    })?;
    let secret = bearer(req).map_err(|e| (e, None))?;
    let tokens = cluster.tokens();
    let token = find_token(&tokens, cluster.token_key(), secret).map_err(|e| (e, None))?;
    check_token(state, token, template, req.uri().path(), access, ip)
        .map_err(|e| (e, Some(token.id.clone())))
}

fn check_token(
    state: &AppState,
    token: &TokenRecord,
    template: &str,
    path: &str,
    access: Access,
    ip: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let now = cohort_cluster::raft_actor::now_ms();
    let model = path_model(template, path);
    authorize(token, access, model.as_deref(), ip, now)?;
    let mut deferred = None;
    if access == Access::Infer {
        let charge = Charge {
            id: token.id.clone(),
            rate_per_minute: token.rate_per_minute,
            monthly_quota: token.monthly_quota,
        };
        if model.is_some() {
            charge_token(state, &charge, (token.used_in(now), now))?;
        } else {
            // The model is in the body: the handler charges once it has checked it.
            deferred = Some(Arc::new(charge));
        }
    }
    Ok(Caller {
        who: Arc::from(token.id.as_str()),
        admin: token.role == TokenRole::Admin,
        allowed_models: (!token.allowed_models.is_empty())
            .then(|| Arc::from(token.allowed_models.clone())),
        ip,
        deferred,
    })
}

/// The token's stored usage this month, and the time it is reckoned at (0 used when the
/// token is gone: it is refused elsewhere).
fn current_usage(state: &AppState, id: &str) -> (u64, u64) {
    let now = cohort_cluster::raft_actor::now_ms();
    let used = state
        .ctx
        .cluster
        .get()
        .and_then(|c| c.tokens().get(id).map(|t| t.used_in(now)))
        .unwrap_or(0);
    (used, now)
}

/// Takes one request from the token's rate limit and counts one against its quota, given
/// the token's stored usage this month and the time.
fn charge_token(state: &AppState, c: &Charge, (used, now_ms): (u64, u64)) -> Result<(), ApiError> {
    if let Some(rate) = c.rate_per_minute {
        state
            .auth
            .take_rate(&c.id, rate)
            .map_err(|s| ApiError::RateLimited {
                message: format!("over the token's rate limit of {rate} requests a minute"),
                retry_after_s: s,
            })?;
    }
    if let Some(quota) = c.monthly_quota {
        if used + state.auth.pending_of(&c.id) >= quota {
            return Err(ApiError::RateLimited {
                message: format!("over the token's monthly quota of {quota} requests"),
                retry_after_s: next_month_start_ms(now_ms)
                    .saturating_sub(now_ms)
                    .div_ceil(1000),
            });
        }
    }
    state.auth.count(&c.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenRecord {
        TokenRecord {
            id: "0123456789abcdef".into(),
            name: "t".into(),
            key_hash: vec![],
            role: TokenRole::User,
            allowed_models: vec!["mlp*".into()],
            ip_allow: vec![],
            rate_per_minute: None,
            monthly_quota: None,
            used: 0,
            used_month: 0,
            expires_at_ms: None,
            status: TokenStatus::Active,
            created_at_ms: 0,
            created_by: "local".into(),
        }
    }

    #[test]
    fn routes_are_classified() {
        assert_eq!(access("/healthz", &Method::GET), Access::Public);
        assert_eq!(access("/api/v1/models", &Method::GET), Access::Read);
        assert_eq!(access("/api/v1/models", &Method::POST), Access::Admin);
        assert_eq!(
            access("/api/v1/models/{model}", &Method::DELETE),
            Access::Admin
        );
        assert_eq!(access("/v1/embeddings", &Method::POST), Access::Infer);
        assert_eq!(access("/api/v1/tokens", &Method::GET), Access::Admin);
        assert_eq!(
            access("/v2/repository/models/{model}/load", &Method::POST),
            Access::Admin
        );
        assert_eq!(access("/something/new", &Method::GET), Access::Admin);
    }

    #[test]
    fn model_from_path() {
        assert_eq!(
            path_model(
                "/v2/models/{model}/versions/{version}/infer",
                "/v2/models/mlp/versions/1/infer"
            ),
            Some("mlp".into())
        );
        assert_eq!(path_model("/v1/embeddings", "/v1/embeddings"), None);
        // Decoded as the handlers decode it: the rules see the name that is served.
        let infer = "/v2/models/{model}/infer";
        assert_eq!(
            path_model(infer, "/v2/models/team%41/infer"),
            Some("teamA".into())
        );
        assert_eq!(
            path_model(infer, "/v2/models/a%ff/infer"),
            Some("a\u{fffd}".into())
        );
    }

    #[test]
    fn authorize_checks_status_expiry_ip_role_and_model() {
        let now = 1_000_000;
        let t = token();
        assert!(authorize(&t, Access::Infer, Some("mlp"), None, now).is_ok());
        let forbidden = |r: Result<(), ApiError>| matches!(r, Err(ApiError::Forbidden(_)));
        assert!(forbidden(authorize(
            &t,
            Access::Infer,
            Some("echo"),
            None,
            now
        )));
        assert!(forbidden(authorize(&t, Access::Admin, None, None, now)));
        let mut paused = token();
        paused.status = TokenStatus::Paused;
        assert!(forbidden(authorize(&paused, Access::Read, None, None, now)));
        let mut expired = token();
        expired.expires_at_ms = Some(now);
        assert!(forbidden(authorize(
            &expired,
            Access::Read,
            None,
            None,
            now
        )));
        let mut ips = token();
        ips.ip_allow = vec!["10.0.0.0/8".into()];
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let inside: IpAddr = "10.2.3.4".parse().unwrap();
        assert!(forbidden(authorize(
            &ips,
            Access::Read,
            None,
            Some(local),
            now
        )));
        assert!(forbidden(authorize(&ips, Access::Read, None, None, now)));
        assert!(authorize(&ips, Access::Read, None, Some(inside), now).is_ok());
    }

    #[test]
    fn buckets_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, 30, "2 a minute: one every 30 s");
        assert!(b.take(t0 + Duration::from_secs(29)).is_err());
        assert!(b.take(t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn secrets_are_checked_against_the_hash() {
        let key = cohort_cluster::TokenKey::from_cookie("c");
        let m = key.mint().unwrap();
        let mut t = token();
        t.id = m.id.clone();
        t.key_hash = m.hash.clone();
        let table: BTreeMap<String, TokenRecord> = [(t.id.clone(), t.clone())].into();
        assert!(find_token(&table, &key, &m.secret).is_ok());
        let other = key.mint().unwrap();
        assert!(matches!(
            find_token(&table, &key, &other.secret),
            Err(ApiError::Unauthenticated(_))
        ));
        let forged = format!("cht_{}_{}", m.id, "A".repeat(43));
        assert!(find_token(&table, &key, &forged).is_err());
        let mut revoked = t;
        revoked.status = TokenStatus::Revoked;
        let table: BTreeMap<String, TokenRecord> = [(revoked.id.clone(), revoked)].into();
        assert!(matches!(
            find_token(&table, &key, &m.secret),
            Err(ApiError::Unauthenticated(_))
        ));
    }
}
