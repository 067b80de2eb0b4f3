//! Protections of the HTTP server against slow, large, deep or too many requests, and CORS.
//!
//! Everything here is set by the `[http]` section of the configuration
//! ([`cohort_config::HttpSection`]):
//!
//! - [`serve`]: the accept loop. Each connection is HTTP/1.1 served by hyper with a timeout
//!   on reading a request's header block (`header_read_timeout_ms`, the connection is
//!   closed; it also bounds how long an idle keep-alive connection stays open) and a limit
//!   on its size (`max_header_bytes`, 431). Writing an answer to a client that stops
//!   reading fails after `write_timeout_ms` without progress ([`WriteDeadline`]), and the
//!   connection is closed, so an unread answer is not held in memory for as long as the
//!   client keeps the connection open. Accept errors (too many open files...) are
//!   logged and retried after a short pause. When asked to stop, it stops accepting, lets
//!   the requests in flight finish, and closes the connections.
//! - [`guard`], a middleware: a deadline on receiving a request's body
//!   (`body_read_timeout_ms`, 408 REQUEST_TIMEOUT through [`body_error`]) and a limit on the
//!   requests served at once (`max_concurrent_requests`, 503 OVERLOADED with Retry-After;
//!   health probes and `/metrics` are not counted).
//! - [`check_json_depth`]: a linear scan that refuses JSON nested deeper than
//!   `max_json_depth` before serde parses it (400).
//! - [`cors`], a middleware: off unless `cors_allowed_origins` names origins.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cohort_config::HttpSection;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::error::ApiError;

// ---------------------------------------------------------------------------
// The accept loop

/// How long the loop pauses after an accept error that is not about one connection
/// (EMFILE, ENFILE, ENOBUFS...), so that it does not spin while the node is out of them.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `stop` turns true (or its sender is gone), then stops
/// accepting, waits for the connections' requests in flight to finish, and returns.
///
/// Every request carries [`ConnectInfo<SocketAddr>`] with the client's address.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    http: &HttpSection,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_read_timeout_ms))
        .max_header_size(http.max_header_bytes)
        .keep_alive(true);
    let write_timeout = Duration::from_millis(http.write_timeout_ms);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an HTTP connection; retrying shortly");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        // Small JSON answers go out at once rather than waiting for Nagle.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            // Handlers see the client's address (IP allow-lists, request logs).
            req.extensions_mut().insert(ConnectInfo(remote));
            app.clone().oneshot(req)
        });
        let stream = WriteDeadline::new(stream, write_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // A client that went away, a header block too slow or too large: the
                // connection's business, not the server's.
                tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection whose writes fail with `TimedOut` once one has made no progress for
/// `timeout`: a client that stops reading its answer (its receive window full) loses the
/// connection, and the answer's buffers are freed. Each byte the client takes restarts
/// the clock, so a slow reader that keeps reading is served.
pub(crate) struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Set while a write is blocked: when it started waiting, plus `timeout`.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After the inner write returned `poll`: clears the clock on progress, starts it on
    /// a block, and turns a block that outlived it into `TimedOut`.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Errors about one connection (the client gave up before it was accepted): accept the
/// next one at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

// ---------------------------------------------------------------------------
// Body deadline and concurrency limit

/// What [`guard`] needs, built once per server.
pub(crate) struct Guard {
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    body_timeout: Duration,
    rejected: prometheus::IntCounter,
}

impl Guard {
    pub(crate) fn new(ctx: &cohort_actors::NodeContext) -> Arc<Guard> {
        let http = &ctx.config.http;
        Arc::new(Guard {
            permits: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            max_concurrent: http.max_concurrent_requests,
            body_timeout: Duration::from_millis(http.body_read_timeout_ms),
            rejected: ctx
                .metrics
                .http_rejected
                .with_label_values(&["concurrency"]),
        })
    }
}

/// The middleware: puts a deadline on the request's body and holds one of the node's
/// request permits until the response's body has been produced (503 when none is left).
pub(crate) async fn guard(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let deadline = Instant::now() + guard.body_timeout;
    let req = req.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline,
            sleep: None,
            timeout: guard.body_timeout,
        })
    });
    let permit = if crate::dialect::is_probe(req.uri().path()) {
        None
    } else {
        match Arc::clone(&guard.permits).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                guard.rejected.inc();
                let err = ApiError::Overloaded(format!(
                    "this node is serving its maximum of {} requests at once; retry later",
                    guard.max_concurrent
                ));
                return crate::dialect::Dialect::of(req.uri().path()).error(err);
            }
        }
    };
    let mut res = next.run(req).await;
    if res.status() == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still be on its way: do not reuse the connection.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    match permit {
        Some(permit) => res.map(|body| {
            Body::new(PermitBody {
                inner: body,
                _permit: permit,
            })
        }),
        None => res,
    }
}

/// The error a request body gives when it did not arrive in time.
#[derive(Debug)]
pub(crate) struct BodyReadTimeout(Duration);

impl std::fmt::Display for BodyReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body was not received within {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyReadTimeout {}

/// A request body that fails with [`BodyReadTimeout`] when it is not complete by the
/// deadline. Data the client has sent is always delivered: the deadline only matters when
/// the body would wait for more.
struct DeadlineBody {
    inner: Body,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Some(Err(axum::Error::new(BodyReadTimeout(this.timeout)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds a request permit until it has been produced (or dropped).
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The timeout, when reading a body failed because it did not arrive in time.
fn timed_out(rejection: &BytesRejection) -> Option<&BodyReadTimeout> {
    let mut err: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = err {
        if let Some(t) = e.downcast_ref::<BodyReadTimeout>() {
            return Some(t);
        }
        err = e.source();
    }
    None
}

/// The error of a body that could not be read: 413 too large, 408 too slow, 400 otherwise.
pub(crate) fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge {
            message: "request body is too large".into(),
            details: None,
        }
    } else if let Some(t) = timed_out(&rejection) {
        ApiError::RequestTimeout(t.to_string())
    } else {
        ApiError::invalid(format!("cannot read the request body: {rejection}"))
    }
}

// ---------------------------------------------------------------------------
// JSON depth

/// Where a JSON text nests deeper than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooDeep {
    /// Byte offset of the bracket that went over the limit.
    pub offset: usize,
}

/// Checks in one pass, without parsing, that `json` nests arrays and objects at most
/// `max_depth` deep (`[]` and `{}` are depth 1). Brackets inside strings do not count.
/// Malformed JSON passes when it is shallow enough: serde reports it afterwards.
pub(crate) fn check_json_depth(json: &[u8], max_depth: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut i = 0;
    let n = json.len();
    while i < n {
        match json[i] {
            b'"' => {
                // Skip the string: to the next quote that is not escaped.
                i += 1;
                while i < n {
                    match json[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(TooDeep { offset: i });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// [`check_json_depth`] as the API's error (400 INVALID_INPUT).
pub(crate) fn json_depth(json: &[u8], max_depth: usize) -> Result<(), ApiError> {
    check_json_depth(json, max_depth).map_err(|TooDeep { offset }| ApiError::InvalidInput {
        message: format!(
            "the JSON body nests arrays and objects more than {max_depth} levels deep \
             (at byte {offset}); the node's limit is http.max_json_depth"
        ),
        details: Some(json!({"max_json_depth": max_depth, "offset": offset})),
    })
}

// ---------------------------------------------------------------------------
// CORS

/// Methods a browser may use cross-origin.
const CORS_METHODS: &str = "GET, POST, PATCH, DELETE, OPTIONS";
/// Request headers a browser may send cross-origin.
const CORS_HEADERS: &str =
    "authorization, content-type, x-request-id, inference-header-content-length";
/// Response headers a browser's script may read.
const CORS_EXPOSE: &str = "x-request-id, retry-after";
/// How long a browser may cache a preflight's answer, in seconds.
const CORS_MAX_AGE: &str = "600";

/// The allowed origins; empty: CORS is off.
pub(crate) struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    pub(crate) fn new(http: &HttpSection) -> Arc<Cors> {
        Arc::new(Cors {
            any: http.cors_allowed_origins.iter().any(|o| o == "*"),
            origins: http
                .cors_allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        })
    }

    fn is_on(&self) -> bool {
        !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(o))
            .then(|| origin.clone())
    }
}

/// The middleware: when CORS is on, answers preflights from allowed origins (204) and adds
/// `Access-Control-Allow-Origin` to their other requests. A request from an origin that is
/// not allowed gets no CORS header (a preflight then goes on to the routes, like any
/// OPTIONS request); with CORS off, nothing is added at all.
pub(crate) async fn cors(State(cors): State<Arc<Cors>>, req: Request, next: Next) -> Response {
    if !cors.is_on() {
        return next.run(req).await;
    }
    let allowed = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| cors.allow(o));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = match (&allowed, preflight) {
        (Some(_), true) => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let h = res.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(CORS_METHODS),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(CORS_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(CORS_MAX_AGE),
            );
            res
        }
        _ => next.run(req).await,
    };
    let h = res.headers_mut();
    if let Some(origin) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE),
        );
    }
    if !cors.any {
        // The answer depends on the origin: caches must keep them apart.
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    res
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use super::*;

    // Paused time: the clock moves only when every task waits, so a loaded machine cannot
    // make the reader look stalled.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_times_out() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let timeout = Duration::from_millis(100);
        // Nobody reads: the 64-byte pipe fills and the write stalls.
        let (a, _b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, timeout);
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), w.write_all(&[7u8; 4096]))
            .await
            .expect("the write gives up by itself")
            .expect_err("nobody reads");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= timeout);

        // A reader that keeps taking bytes, each well within the timeout, is served in full
        // even though the whole write takes longer than the timeout.
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, timeout);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let started = Instant::now();
        w.write_all(&[9u8; 640])
            .await
            .expect("a slow reader is served");
        assert!(
            started.elapsed() > timeout,
            "the write outlasted the timeout"
        );
        w.shutdown().await.expect("shut down");
        drop(w);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), 640);
    }

    fn depth_ok(s: &str, max: usize) -> bool {
        check_json_depth(s.as_bytes(), max).is_ok()
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert!(depth_ok("1", 1));
        assert!(depth_ok("", 1));
        assert!(depth_ok("[]", 1));
        assert!(!depth_ok("[[]]", 1));
        assert!(depth_ok("[[]]", 2));
        assert!(depth_ok(r#"{"a": [1, 2], "b": {"c": 3}}"#, 2));
        assert!(!depth_ok(r#"{"a": [1, 2], "b": {"c": [3]}}"#, 2));
        // Siblings do not add up.
        assert!(depth_ok("[[1],[2],[3],{},{}]", 2));
        assert_eq!(
            check_json_depth(b"[[[1]]]", 2),
            Err(TooDeep { offset: 2 }),
            "the offset is the bracket that went over"
        );
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        assert!(depth_ok(r#"["[[[[{{{{"]"#, 1));
        assert!(depth_ok(r#"{"k[[[": "v{{{"}"#, 1));
        // An escaped quote does not end the string; an escaped backslash does not escape
        // the quote after it.
        assert!(depth_ok(r#"["a\"[[[[", "b"]"#, 1));
        assert!(!depth_ok(r#"["a\\", [[1]]]"#, 2));
        assert!(depth_ok(r#"["a\\", [[1]]]"#, 3));
        assert!(depth_ok(r#"["\u005b[[["]"#, 1));
    }

    #[test]
    fn malformed_json_is_left_to_the_parser() {
        // Unbalanced or unterminated: no panic, and the depth seen so far decides.
        assert!(depth_ok("]]]]", 1));
        assert!(depth_ok(r#"["never closed"#, 1));
        assert!(depth_ok(r#"["trailing backslash \"#, 1));
        assert!(!depth_ok("[[[", 2));
    }

    #[test]
    fn deep_input_is_scanned_linearly() {
        let n = 1_000_000;
        let deep = format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_json_depth(deep.as_bytes(), 64).is_err());
        assert!(check_json_depth(deep.as_bytes(), n).is_ok());
        let wide = format!("[{}1]", "[1],".repeat(n));
        assert!(check_json_depth(wide.as_bytes(), 2).is_ok());
    }

    #[test]
    fn depth_error_is_invalid_input() {
        let e = json_depth(b"[[[]]]", 2).expect_err("too deep");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), "INVALID_INPUT");
        assert!(e.to_string().contains("max_json_depth"), "{e}");
    }

    /// A body whose client never sends another byte.
    struct Stalled;

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_as_408() {
        let timeout = Duration::from_millis(50);
        let body = Body::new(DeadlineBody {
            inner: Body::new(Stalled),
            deadline: Instant::now() + timeout,
            sleep: None,
            timeout,
        });
        let req = Request::new(body);
        let result = <Bytes as axum::extract::FromRequest<()>>::from_request(req, &()).await;
        let rejection = result.expect_err("times out");
        let e = body_error(rejection);
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(e.code(), "REQUEST_TIMEOUT");
        assert!(e.to_string().contains("50 ms"), "{e}");
    }

    #[tokio::test]
    async fn a_complete_body_is_delivered_after_the_deadline() {
        let timeout = Duration::from_millis(1);
        let body = Body::new(DeadlineBody {
            inner: Body::from("{}"),
            deadline: Instant::now() + timeout,
            sleep: None,
            timeout,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let req = Request::new(body);
        let bytes = <Bytes as axum::extract::FromRequest<()>>::from_request(req, &())
            .await
            .expect("already here");
        assert_eq!(&bytes[..], b"{}");
    }

    /// Sends `request` on a fresh connection and reads the answer until the server closes.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serve_gives_the_client_address_and_drains_on_stop() {
        async fn whoami(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
            addr.ip().to_string()
        }
        let started = Arc::new(tokio::sync::Notify::new());
        let slow = {
            let started = Arc::clone(&started);
            move || async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }
        };
        let app = axum::Router::new()
            .route("/whoami", axum::routing::get(whoami))
            .route("/slow", axum::routing::get(slow));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(async move {
            serve(listener, app, &HttpSection::default(), stopped).await;
        });

        let res = exchange(
            addr,
            "GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert!(res.ends_with("127.0.0.1"), "{res}");

        let in_flight = tokio::spawn(exchange(
            addr,
            "GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ));
        tokio::time::timeout(Duration::from_secs(5), started.notified())
            .await
            .expect("the slow request arrives");
        let _ = stop.send(true);
        let res = in_flight.await.expect("task");
        assert!(
            res.starts_with("HTTP/1.1 200") && res.ends_with("done"),
            "{res}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returns once drained")
            .expect("no panic");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
