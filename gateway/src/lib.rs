//! Cohort's HTTP gateway: the `GatewayActor` and the axum server it owns.
//!
//! Every node runs one gateway on one port. It serves Cohort's REST API under `/api/v1`
//! (inference, models, health), `/healthz`, `/readyz` and `/metrics`. Every response
//! carries `x-request-id` (the client's, when it sent one), and every error is the one
//! envelope of [`error::ApiError`].
//!
//! Supervision: the [`GatewayActor`] binds the listener in `pre_start` and runs the server
//! as a task it watches. If that task ends without being asked to, the actor fails and the
//! NodeSupervisor restarts it on the same address. When the actor is stopped, the server
//! stops accepting, finishes the requests in flight, and only then does the actor stop.

pub mod auth;
mod cluster;
pub mod dialect;
pub mod error;
mod hardening;
mod health;
mod inference;
mod kserve;
mod models;
mod openai;
pub mod openapi;
pub mod reqlog;
pub mod tensor_json;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cohort_actors::{BoxFuture, GatewayFactory, NodeContext, SupervisorMsg};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::{ApiError, PendingError};

/// The header that carries a request's id.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<NodeContext>,
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Rate-limit buckets and usage counts of API tokens.
    pub auth: Arc<auth::AuthState>,
    /// The node's request log (`None` when `request_log.enabled` is off).
    pub reqlog: Option<Arc<reqlog::RequestLog>>,
}

/// The id of the request being served.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// Builds the axum application.
pub fn app(state: AppState) -> axum::Router {
    let limit = state.ctx.config.limits.max_body_bytes;
    let observed = state.clone();
    let router = axum::Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs))
        .route("/api/v1/health/detailed", get(health::detailed))
        .route("/api/v1/requests", get(reqlog::list))
        .route("/api/v1/cluster", get(cluster::status))
        .route(
            "/api/v1/cluster/nodes/{id}",
            axum::routing::delete(cluster::remove_node),
        )
        .route(
            "/api/v1/models",
            get(models::list).post(cluster::register_model),
        )
        .route(
            "/api/v1/models/{model}",
            get(models::show).delete(models::delete),
        )
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route(
            "/api/v1/tokens/{id}",
            get(tokens::show)
                .patch(tokens::update)
                .delete(tokens::revoke),
        )
        .route("/api/v1/audit", get(tokens::audit))
        .route("/api/v1/models/{model}/infer", post(inference::infer))
        .route("/api/v1/models/{model}/batch", post(inference::batch))
        .route("/api/v1/models/{model}/scale", post(models::scale))
        .route("/api/v1/models/{model}/unload", post(models::unload))
        .route("/api/v1/models/{model}/preload", post(models::preload))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/v2/models/{model}", get(kserve::model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve::model_metadata),
        )
        .route("/v2/models/{model}/ready", get(kserve::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve::model_ready),
        )
        .route("/v2/models/{model}/config", get(kserve::model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(kserve::model_config),
        )
        .route("/v2/models/{model}/stats", get(kserve::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(kserve::model_stats),
        )
        .route("/v2/models/{model}/infer", post(kserve::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(kserve::infer),
        )
        .route("/v2/repository/index", post(kserve::repository_index))
        .route("/v2/repository/models/{model}/load", post(kserve::load))
        .route("/v2/repository/models/{model}/unload", post(kserve::unload))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            hardening::Guard::new(&state.ctx),
            hardening::guard,
        ));
    // CORS off (the default) costs nothing: no layer at all.
    let router = if state.ctx.config.http.cors_allowed_origins.is_empty() {
        router
    } else {
        router.layer(middleware::from_fn_with_state(
            hardening::Cors::new(&state.ctx.config.http),
            hardening::cors,
        ))
    };
    router
        // Counts and records every request; layers added above it (auth, limits, CORS)
        // are inside it, so their refusals are recorded too.
        .layer(middleware::from_fn_with_state(observed, reqlog::observe))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// No route: 404 in the error shape of the path's API (OpenAI's under `/v1`, KServe's
/// under `/v2`, the envelope elsewhere).
async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    dialect::Dialect::of(path).error(ApiError::NotFound(format!(
        "no route for {} {path}",
        req.method()
    )))
}

/// A fresh request id: 32 hex digits, like a UUID's simple form. The first 16 are drawn at
/// random once per process, the last 16 are a per-process counter passed through a
/// bijective mixer (SplitMix64's finalizer), so ids never repeat within a process, do not
/// show how many requests came before, and cost no system call: a random UUID per request
/// asked the kernel for entropy every time.
fn new_request_id() -> Arc<str> {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Arc::from(format!("{prefix:016x}{:016x}", mix64(n)))
}

/// SplitMix64's finalizer: a bijection on u64 that spreads consecutive inputs apart.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Gives each request an id (the client's `x-request-id` when it is sane), puts it on the
/// response, and renders error envelopes with it.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id: Arc<str> = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(Arc::from)
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let span = tracing::debug_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    let dialect = dialect::Dialect::of(req.uri().path());
    let mut res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = res.status().as_u16(),
            us = started.elapsed().as_micros() as u64,
            "request done"
        )
    });
    let mut pending = res.extensions_mut().remove::<PendingError>();
    if pending.is_none() && res.status() == StatusCode::METHOD_NOT_ALLOWED {
        // The router's own 405 (empty body, `allow` header), in the path's error shape:
        // OpenAI's or KServe's body now (headers kept), the envelope below.
        match dialect {
            dialect::Dialect::Openai | dialect::Dialect::Kserve => {
                let headers = std::mem::take(res.headers_mut());
                res = dialect.error(ApiError::MethodNotAllowed);
                let mut name = None;
                for (n, value) in headers {
                    name = n.or(name);
                    if let Some(n) = name
                        .as_ref()
                        .filter(|n| **n != header::CONTENT_TYPE && **n != header::CONTENT_LENGTH)
                    {
                        res.headers_mut().append(n.clone(), value);
                    }
                }
            }
            dialect::Dialect::Rest | dialect::Dialect::Other => {
                pending = Some(PendingError(ApiError::MethodNotAllowed));
            }
        }
    }
    if let Some(PendingError(err)) = pending {
        let status = res.status();
        let mut headers = std::mem::take(res.headers_mut());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res = (status, json_response(&err.envelope(&id))).into_response();
        res.headers_mut().extend(headers);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    res
}

/// A JSON response with status 200.
pub(crate) fn json_response<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            ApiError::InferenceFailed(format!("cannot encode the response: {e}")).into_response()
        }
    }
}

/// The body of a JSON request: checks the content type, maps body errors (too large, too
/// slow, unreadable) to the envelope's codes, and refuses JSON nested deeper than the
/// node's `http.max_json_depth` before anything parses it.
pub(crate) fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::InvalidInput {
            message: format!(
                "content-type must be application/json, got {:?}",
                if ct.is_empty() { "nothing" } else { ct }
            ),
            details: Some(serde_json::json!({"header": "content-type"})),
        });
    }
    let body = body.map_err(hardening::body_error)?;
    hardening::json_depth(&body, state.ctx.config.http.max_json_depth)?;
    Ok(body)
}

/// The GatewayActor: owns the axum server task.
pub struct GatewayActor;

/// What the GatewayActor starts with.
pub struct GatewayArgs {
    pub ctx: Arc<NodeContext>,
    pub supervisor: ActorRef<SupervisorMsg>,
}

/// Messages to the GatewayActor.
pub enum GatewayMsg {
    /// The server task ended without being asked to.
    ServerExited(String),
}

// Local only: never sent to another node.
impl ractor::Message for GatewayMsg {}

/// The GatewayActor's state.
pub struct GatewayState {
    ctx: Arc<NodeContext>,
    reqlog: Option<Arc<reqlog::RequestLog>>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// How long a stopping gateway waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // On a restart, bind the port the node already announced.
        let addr = args.ctx.http_addr().unwrap_or(args.ctx.config.http_addr);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                let reason = format!("cannot listen for HTTP on {addr}: {e}");
                args.ctx.set_startup_error(reason.clone());
                return Err(reason.into());
            }
        };
        let addr = listener.local_addr()?;
        // The node's request log: the same one across restarts of this actor.
        let reqlog = reqlog::for_node(&args.ctx).await.map_err(|e| {
            args.ctx.set_startup_error(e.to_string());
            e.to_string()
        })?;
        args.ctx.set_http_addr(addr);
        let auth = Arc::new(auth::AuthState::new(args.ctx.config.auth_enabled()));
        let app = app(AppState {
            ctx: Arc::clone(&args.ctx),
            supervisor: args.supervisor,
            auth: Arc::clone(&auth),
            reqlog: reqlog.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(auth::usage_flusher(
            auth,
            Arc::clone(&args.ctx),
            Duration::from_millis(args.ctx.config.auth.usage_flush_ms),
            stopped.clone(),
        ));
        let http = args.ctx.config.http.clone();
        let server = tokio::spawn(async move {
            // `serve` returns once asked to stop, after the requests in flight are
            // answered; its own task turns a panic into a reason.
            let serving =
                tokio::spawn(async move { hardening::serve(listener, app, &http, stopped).await });
            let reason = match serving.await {
                Ok(()) => "server stopped".to_string(),
                Err(e) => format!("server failed: {e}"),
            };
            let _ = myself.cast(GatewayMsg::ServerExited(reason));
        });
        tracing::info!(%addr, auth = if args.ctx.config.auth_enabled() { "on" } else { "off" }, "gateway listening");
        Ok(GatewayState {
            ctx: args.ctx,
            reqlog,
            addr,
            stop,
            server: Some(server),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::ServerExited(reason) => {
                state.server = None;
                Err(format!("HTTP server on {} ended: {reason}", state.addr).into())
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.stop.send(true);
        if let Some(server) = state.server.take() {
            if tokio::time::timeout(DRAIN_TIMEOUT, server).await.is_err() {
                tracing::warn!("in-flight requests did not finish in time");
            }
        }
        if let Some(log) = state.reqlog.take() {
            reqlog::after_server_stopped(&state.ctx, log).await;
        }
        tracing::info!(addr = %state.addr, "gateway stopped");
        Ok(())
    }
}

/// Starts [`GatewayActor`]s for the NodeSupervisor.
pub struct HttpGateway;

impl GatewayFactory for HttpGateway {
    fn spawn(
        &self,
        ctx: Arc<NodeContext>,
        supervisor: ActorCell,
    ) -> BoxFuture<Result<ActorCell, String>> {
        Box::pin(async move {
            let args = GatewayArgs {
                ctx,
                supervisor: ActorRef::from(supervisor.clone()),
            };
            Actor::spawn_linked(None, GatewayActor, args, supervisor)
                .await
                .map(|(actor, _)| actor.get_cell())
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_hex_with_one_prefix() {
        let ids: Vec<Arc<str>> = (0..10_000).map(|_| new_request_id()).collect();
        let unique: std::collections::HashSet<&str> = ids.iter().map(|id| &**id).collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert_eq!(id[..16], ids[0][..16]);
        }
        // Consecutive ids differ in most of their last 16 digits.
        let differing = ids[0][16..]
            .chars()
            .zip(ids[1][16..].chars())
            .filter(|(a, b)| a != b)
            .count();
        assert!(differing >= 8, "{} {}", ids[0], ids[1]);
    }

    #[test]
    fn mix64_gives_distinct_outputs_on_a_sample() {
        let outs: std::collections::HashSet<u64> = (0..100_000u64).map(mix64).collect();
        assert_eq!(outs.len(), 100_000);
    }
}
