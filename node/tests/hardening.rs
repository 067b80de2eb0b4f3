//! The HTTP server's protections on a real node on 127.0.0.1:0: slow clients (header and
//! body timeouts), oversized headers, deep JSON, the concurrency limit and CORS.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(n: &TestNode) -> SocketAddr {
    n.node.ctx().http_addr().expect("gateway bound")
}

/// What a raw connection received before the server closed it (or `limit` passed).
struct Received {
    bytes: Vec<u8>,
    closed: bool,
    after: Duration,
}

impl Received {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status line's code.
    fn status(&self) -> u16 {
        let t = self.text();
        t.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {t:?}"))
    }

    /// A header's value (names compared without case).
    fn header(&self, name: &str) -> Option<String> {
        let t = self.text();
        let head = t.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        let t = self.text();
        let body = t.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {t:?}"))
    }
}

/// Reads until the server closes the connection (EOF or reset), for at most `limit`.
async fn read_until_closed(s: &mut TcpStream, started: Instant, limit: Duration) -> Received {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::from_std(started + limit);
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_elapsed) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    Received {
        bytes,
        closed,
        after: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_mid_header_is_disconnected() {
    let n = start_with(vec![], |cfg| cfg.http.header_read_timeout_ms = 300).await;
    let mut s = TcpStream::connect(addr(&n)).await.expect("connect");
    let started = Instant::now();
    s.write_all(b"POST /api/v1/models/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-ty")
        .await
        .expect("write");
    let r = read_until_closed(&mut s, started, Duration::from_secs(5)).await;
    assert!(r.closed, "still open after {:?}", r.after);
    assert!(
        r.after >= Duration::from_millis(250) && r.after < Duration::from_secs(3),
        "closed after {:?}, the timeout is 300 ms",
        r.after
    );
    assert!(r.bytes.is_empty(), "nothing is answered: {:?}", r.text());

    // A client that connects and sends nothing is cut off the same way.
    let mut s = TcpStream::connect(addr(&n)).await.expect("connect");
    let r = read_until_closed(&mut s, Instant::now(), Duration::from_secs(5)).await;
    assert!(
        r.closed && r.after < Duration::from_secs(3),
        "{:?}",
        r.after
    );

    // The server still serves complete requests.
    let (status, _) = n.get("/healthz").await;
    assert_eq!(status, 200);
    n.node.shutdown().await;
}

/// Sends a request whose body stops after `sent` of its announced bytes.
async fn stall_body(n: &TestNode, path: &str, sent: &str) -> Received {
    let mut s = TcpStream::connect(addr(n)).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 1000\r\nx-request-id: slow-body\r\n\r\n{sent}"
    );
    let started = Instant::now();
    s.write_all(head.as_bytes()).await.expect("write");
    read_until_closed(&mut s, started, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_gets_408_and_the_connection_is_closed() {
    let n = start_with(vec![], |cfg| cfg.http.body_read_timeout_ms = 300).await;

    let r = stall_body(&n, "/api/v1/models/echo/infer", r#"{"inputs": {"x": [[1"#).await;
    assert_eq!(r.status(), 408, "{}", r.text());
    assert!(
        r.after >= Duration::from_millis(250) && r.after < Duration::from_secs(3),
        "answered after {:?}, the timeout is 300 ms",
        r.after
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], "REQUEST_TIMEOUT", "{v}");
    assert_eq!(v["error"]["request_id"], "slow-body");
    assert_eq!(r.header("x-request-id").as_deref(), Some("slow-body"));
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(r.closed, "the connection is closed after the 408");

    // KServe answers in its own shape.
    let r = stall_body(&n, "/v2/models/echo/infer", r#"{"inputs": ["#).await;
    assert_eq!(r.status(), 408, "{}", r.text());
    assert!(r.json()["error"].is_string(), "{}", r.text());
    assert!(r.closed);

    // OpenAI too.
    let r = stall_body(&n, "/v1/embeddings", r#"{"model": "#).await;
    assert_eq!(r.status(), 408, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_timeout", "{}", r.text());

    // A body that arrives in time is served.
    let (status, _, v) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(status, 200, "{v}");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_block_gets_431() {
    let n = start_with(vec![], |cfg| cfg.http.max_header_bytes = 8192).await;
    let mut s = TcpStream::connect(addr(&n)).await.expect("connect");
    let big = "a".repeat(9000);
    let req = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let started = Instant::now();
    // The server may close before it has read everything: a failed write is fine.
    let _ = s.write_all(req.as_bytes()).await;
    let r = read_until_closed(&mut s, started, Duration::from_secs(5)).await;
    assert_eq!(r.status(), 431, "{}", r.text());
    assert!(r.closed, "the connection is closed after the 431");

    // Headers under the limit are fine.
    let res = n
        .http
        .get(format!("{}/healthz", n.url))
        .header("x-big", "a".repeat(6000))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status().as_u16(), 200);
    n.node.shutdown().await;
}

/// `depth` nested arrays around `1`.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_is_refused_in_every_api_shape() {
    let n = start_with(vec![], |cfg| cfg.http.max_json_depth = 4).await;
    let post = |path: &'static str, body: String| {
        let n = &n;
        async move {
            n.post_raw(path, "application/json", body.into_bytes())
                .await
        }
    };

    // Cohort's API: the envelope. {"inputs": {"x": [[1]]}} is 4 deep.
    let (s, h, v) = post(
        "/api/v1/models/echo/infer",
        format!(r#"{{"inputs": {{"x": {}}}}}"#, nested(2)),
    )
    .await;
    assert_eq!(s, 200, "4 levels are allowed: {v}");
    assert!(h.contains_key("x-request-id"));
    let (s, h, v) = post(
        "/api/v1/models/echo/infer",
        format!(r#"{{"inputs": {{"x": {}}}}}"#, nested(3)),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_INPUT");
    assert_eq!(v["error"]["details"]["max_json_depth"], 4);
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("max_json_depth"), "{msg}");
    assert!(h.contains_key("x-request-id"));
    // Far beyond serde's own recursion limit: still the same clear 400.
    let (s, _, v) = post("/api/v1/models/echo/infer", nested(100_000)).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["details"]["max_json_depth"], 4);
    // Brackets inside strings are not nesting.
    let (s, _, v) = post(
        "/api/v1/models/echo/infer",
        r#"{"inputs": {"x": [[1]]}, "[[[[": "{{{{"}"#.to_string(),
    )
    .await;
    assert_ne!(
        v["error"]["details"]["max_json_depth"], 4,
        "strings do not count: {s} {v}"
    );

    // KServe: {"error": "<message>"}.
    let kserve = |data: String| {
        format!(
            r#"{{"inputs": [{{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": {data}}}]}}"#
        )
    };
    let (s, _, v) = post("/v2/models/echo/infer", kserve("[1]".into())).await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = post("/v2/models/echo/infer", kserve(nested(2))).await;
    assert_eq!(s, 400, "{v}");
    let msg = v["error"].as_str().expect("KServe error is a string");
    assert!(msg.contains("max_json_depth"), "{msg}");

    // OpenAI: {"error": {"message", "type", "param", "code"}}.
    let (s, _, v) = post(
        "/v1/embeddings",
        json!({"model": "nope", "input": ["a"]}).to_string(),
    )
    .await;
    assert_eq!(s, 404, "shallow JSON is parsed: {v}");
    let (s, _, v) = post(
        "/v1/embeddings",
        r#"{"model": "nope", "input": [[[["a"]]]]}"#.to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("max_json_depth"), "{msg}");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_answers_503_but_not_to_probes() {
    let n = start_with(vec![sleep_model("slow", 3000)], |cfg| {
        cfg.http.max_concurrent_requests = 1
    })
    .await;
    let url = format!("{}/api/v1/models/slow/infer", n.url);
    let http = n.http.clone();
    let in_flight = tokio::spawn(async move {
        let res = http
            .post(url)
            .json(&echo_body(&[5.0]))
            .send()
            .await
            .expect("sent");
        res.status().as_u16()
    });
    // Once the slow request holds the only permit, any other request is refused.
    let refused = || async {
        let res = n
            .http
            .get(format!("{}/api/v1/models", n.url))
            .send()
            .await
            .expect("sent");
        res.status().as_u16() == 503
    };
    assert!(eventually(Duration::from_secs(5), refused).await);
    let (s, h, v) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "OVERLOADED");
    assert!(v["error"]["request_id"].is_string());
    assert_eq!(h.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    // KServe's shape on its routes.
    let (s, h, v) = n.post("/v2/models/echo/infer", &json!({})).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"].is_string(), "{v}");
    assert!(h.contains_key("retry-after"));
    // Probes and metrics are not counted.
    for probe in [
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
    ] {
        let (s, _) = n.get_text(probe).await;
        assert_eq!(s, 200, "{probe}");
    }
    let (_, metrics) = n.get_text("/metrics").await;
    let rejected: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"cohort_http_rejected_total{reason="concurrency"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rejection counter in\n{metrics}"));
    assert!(rejected >= 2.0, "{rejected}");

    assert_eq!(in_flight.await.expect("task"), 200);
    // The permit is back.
    let (s, _, v) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(s, 200, "{v}");
    n.node.shutdown().await;
}

/// Sends a CORS preflight for a POST from `origin`.
async fn preflight(n: &TestNode, origin: &str) -> reqwest::Response {
    n.http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/models/echo/infer", n.url),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .expect("sent")
}

fn has_cors_headers(h: &reqwest::header::HeaderMap) -> bool {
    h.keys().any(|k| k.as_str().starts_with("access-control-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default() {
    let n = start(vec![]).await;
    let res = n
        .http
        .get(format!("{}/api/v1/models", n.url))
        .header("origin", "https://console.example.com")
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status().as_u16(), 200);
    assert!(!has_cors_headers(res.headers()), "{:?}", res.headers());
    // A preflight is an OPTIONS like any other: 405 with the envelope.
    let res = preflight(&n, "https://console.example.com").await;
    assert_eq!(res.status().as_u16(), 405);
    assert!(!has_cors_headers(res.headers()), "{:?}", res.headers());
    let v: Value = res.json().await.expect("json");
    assert_eq!(v["error"]["code"], "METHOD_NOT_ALLOWED");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let n = start_with(vec![], |cfg| {
        cfg.http.cors_allowed_origins = vec!["https://console.example.com".into()]
    })
    .await;
    let allowed = "https://console.example.com";

    let res = preflight(&n, allowed).await;
    assert_eq!(res.status().as_u16(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], allowed);
    let methods = h["access-control-allow-methods"].to_str().expect("ascii");
    for m in ["GET", "POST", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = h["access-control-allow-headers"].to_str().expect("ascii");
    for name in [
        "authorization",
        "content-type",
        "x-request-id",
        "inference-header-content-length",
    ] {
        assert!(headers.contains(name), "{headers}");
    }
    assert!(h.contains_key("access-control-max-age"));
    assert!(h.contains_key("x-request-id"));

    // A real request from the allowed origin: the answer may be read, x-request-id too.
    let res = n
        .http
        .post(format!("{}/api/v1/models/echo/infer", n.url))
        .header("origin", allowed)
        .json(&echo_body(&[2.0]))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status().as_u16(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], allowed);
    let exposed = h["access-control-expose-headers"].to_str().expect("ascii");
    assert!(exposed.contains("x-request-id"), "{exposed}");
    assert!(h.get_all("vary").iter().any(|v| v == "origin"));

    // Another origin gets no CORS header: its preflight goes on to the routes (405).
    let res = preflight(&n, "https://evil.example.com").await;
    assert_eq!(res.status().as_u16(), 405);
    assert!(
        !res.headers().contains_key("access-control-allow-origin"),
        "{:?}",
        res.headers()
    );
    assert!(!res.headers().contains_key("access-control-allow-methods"));
    let res = n
        .http
        .get(format!("{}/api/v1/models", n.url))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status().as_u16(), 200);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_star_allows_any_origin() {
    let n = start_with(vec![], |cfg| {
        cfg.http.cors_allowed_origins = vec!["*".into()]
    })
    .await;
    let res = preflight(&n, "https://anything.example").await;
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    n.node.shutdown().await;
}

/// A client that never reads its answer: once the write has made no progress for
/// `write_timeout_ms`, the connection is closed and the rest of the answer dropped,
/// instead of being held for as long as the client keeps the connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answer_is_disconnected() {
    // An answer far larger than what the kernel may buffer between the two sockets: the
    // server's send buffer grows up to tcp_wmem's maximum (4 MiB by default); the client's
    // receive buffer is made small.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let answer_bytes = (2 * wmem_max).clamp(8 << 20, 64 << 20);
    let n = start_with(vec![], |cfg| {
        cfg.http.write_timeout_ms = 300;
        cfg.limits.max_body_bytes = answer_bytes + (1 << 20);
    })
    .await;
    let row = vec!["0.5"; answer_bytes / 4].join(",");
    let body = format!(r#"{{"inputs": {{"x": [[{row}]]}}}}"#);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut s = socket.connect(addr(&n)).await.expect("connect");
    let head = format!(
        "POST /api/v1/models/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body.as_bytes()).await.expect("body");

    // Wait until the answer has been produced (the handler counted it)...
    let done = || async {
        let (_, text) = n.get_text("/metrics").await;
        text.lines().any(|l| {
            l.starts_with("cohort_requests_total{")
                && l.contains(r#"model="echo""#)
                && l.contains(r#"status="200""#)
        })
    };
    assert!(
        eventually(Duration::from_secs(60), done).await,
        "the echo answer was never produced"
    );
    // ...then read nothing for several times the write timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // What the kernel had buffered arrives, then the end: the answer was cut short.
    let r = read_until_closed(&mut s, Instant::now(), Duration::from_secs(20)).await;
    assert!(r.closed, "the connection is still open after {:?}", r.after);
    assert_eq!(r.status(), 200);
    let announced: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let got = r.text().split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    assert!(
        got < announced,
        "the whole answer arrived: {got} of {announced}"
    );

    // Other clients are served.
    let (status, _) = n.get("/healthz").await;
    assert_eq!(status, 200);
    n.node.shutdown().await;
}
