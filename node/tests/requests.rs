//! The request log and the metrics on a real node on 127.0.0.1:0: sampled records with
//! model, status, latency and client address; errors of routed requests kept at sample
//! rate 0, unrouted ones not; filters, limits and pages of `GET /api/v1/requests`;
//! records that survive a restart; and the `/metrics` series for requests by dialect,
//! rejections and Raft.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cohort_config::NodeConfig;
use common::*;
use serde_json::{json, Value};

/// Polls `GET /api/v1/requests?{query}` until it holds at least `n` records (the writer is
/// asynchronous); returns them.
async fn records_at_least(n: &TestNode, query: &str, want: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = n.get(&format!("/api/v1/requests?{query}")).await;
        assert_eq!(s, 200, "{v}");
        let records = v["records"].as_array().cloned().unwrap_or_default();
        if records.len() >= want {
            return records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited for {want} records of {query:?}, have {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kserve_echo() -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
}

/// Stops `n` cleanly and starts a node again on its data dir.
async fn restart(n: TestNode, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    let TestNode {
        node, http, dir, ..
    } = n;
    node.shutdown().await;
    let mut cfg = config(&dir);
    tweak(&mut cfg);
    let node = cohort_actors::start(cfg, Arc::new(cohort_gateway::HttpGateway), fast_policy())
        .await
        .expect("node starts again");
    let addr = node.ctx().http_addr().expect("gateway bound");
    assert!(node.wait_ready(Duration::from_secs(20)).await, "node ready");
    TestNode {
        node,
        url: format!("http://{addr}"),
        http,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_recorded_with_model_status_latency_and_client_ip() {
    let n = start_with(vec![], |cfg| cfg.request_log.sample_rate = 1.0).await;
    let since = cohort_gateway::reqlog::now_ms();

    let (s, headers, v) = n.infer("echo", &echo_body(&[1.0, 2.0])).await;
    assert_eq!(s, 200, "{v}");
    let rest_id = headers["x-request-id"].to_str().expect("ascii").to_string();
    let (s, _, v) = n.post("/v2/models/echo/infer", &kserve_echo()).await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = n.infer("nope", &echo_body(&[1.0])).await;
    assert_eq!(s, 404, "{v}");
    let (s, _, v) = n
        .post("/v1/embeddings", &json!({"model": "echo", "input": "hi"}))
        .await;
    assert_eq!(s, 400, "{v}");

    let all = records_at_least(&n, "model=echo", 3).await;
    // Newest first: the OpenAI request, then KServe, then REST.
    let dialects: Vec<&str> = all.iter().filter_map(|r| r["dialect"].as_str()).collect();
    assert_eq!(dialects, ["openai", "kserve", "rest"], "{all:?}");
    let rest = &all[2];
    assert_eq!(rest["request_id"], rest_id.as_str());
    assert_eq!(rest["method"], "POST");
    assert_eq!(rest["path"], "/api/v1/models/echo/infer");
    assert_eq!(rest["model"], "echo");
    assert_eq!(rest["status"], 200);
    assert!(
        rest["latency_us"].as_u64().is_some_and(|us| us > 0),
        "{rest}"
    );
    assert_eq!(rest["client_ip"], "127.0.0.1");
    assert_eq!(rest["token"], Value::Null);
    assert!(rest["ts_ms"].as_u64().is_some_and(|t| t >= since), "{rest}");
    // The model of an OpenAI request comes from its body.
    assert_eq!(all[0]["model"], "echo");
    assert_eq!(all[0]["status"], 400);
    assert_eq!(all[0]["path"], "/v1/embeddings");

    // Filters.
    let nf = records_at_least(&n, "status=404", 1).await;
    assert_eq!(nf.len(), 1, "{nf:?}");
    assert_eq!(nf[0]["model"], "nope");
    assert_eq!(nf[0]["dialect"], "rest");
    let (_, v) = n.get("/api/v1/requests?status=4xx").await;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(2), "{v}");
    let (_, v) = n.get("/api/v1/requests?status=error&model=echo").await;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1), "{v}");
    let (_, v) = n.get("/api/v1/requests?status=2xx&model=echo").await;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(2), "{v}");
    let (_, v) = n
        .get("/api/v1/requests?model=echo&since=99999999999999")
        .await;
    assert_eq!(v["records"], json!([]), "{v}");

    // Limit and pages: three pages of one, newest first, then none.
    let mut seen = Vec::new();
    let mut query = "model=echo&limit=1".to_string();
    loop {
        let (s, v) = n.get(&format!("/api/v1/requests?{query}")).await;
        assert_eq!(s, 200, "{v}");
        let records = v["records"].as_array().expect("records");
        assert!(records.len() <= 1);
        seen.extend(records.iter().map(|r| r["request_id"].clone()));
        match v["next_before"].as_str() {
            Some(c) => query = format!("model=echo&limit=1&before={c}"),
            None => break,
        }
    }
    let want: Vec<Value> = all.iter().map(|r| r["request_id"].clone()).collect();
    assert_eq!(seen, want);

    // Bad parameters: 400 INVALID_INPUT in the envelope, `details.param` naming it.
    for (bad, param) in [
        ("status=abc", "status"),
        ("status=6xx", "status"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("before=xyz", "before"),
        ("colour=red", "colour"),
        ("model=echo&colour=red", "colour"),
        ("limit=1&limit=2", "limit"),
        ("model=a&status=error&model=b", "model"),
    ] {
        let (s, v) = n.get(&format!("/api/v1/requests?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "INVALID_INPUT", "{bad}: {v}");
        assert_eq!(v["error"]["details"]["param"], param, "{bad}: {v}");
        assert!(v["error"]["request_id"].is_string(), "{v}");
    }
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_sample_rate_zero_only_errors_are_recorded() {
    let n = start_with(vec![], |cfg| cfg.request_log.sample_rate = 0.0).await;
    for i in 0..5 {
        let (s, _, v) = n.infer("echo", &echo_body(&[i as f32])).await;
        assert_eq!(s, 200, "{v}");
    }
    // Requests that match no route, or a route's path with the wrong method (anyone can
    // send them, as fast as they like), take the sample rate like successes: not
    // recorded at 0.
    for (path, status) in [
        ("/nothing", 404),
        ("/api/v1/nothing", 404),
        ("/v1/chat/completions", 404),
        ("/v2/nothing", 404),
        ("/v1/embeddings", 405),
        ("/api/v1/models/echo/infer", 405),
    ] {
        let (s, v) = n.get(path).await;
        assert_eq!(s, status, "{path}: {v}");
    }
    let (s, _, v) = n.infer("missing", &echo_body(&[1.0])).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "MODEL_NOT_FOUND");
    let (s, _, v) = n
        .post_raw(
            "/api/v1/models/echo/infer",
            "application/json",
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    // The writer keeps order: once the two errors (sent last) are there, any success
    // that was going to be written would be there too.
    let records = records_at_least(&n, "", 2).await;
    let statuses: Vec<u64> = records
        .iter()
        .filter_map(|r| r["status"].as_u64())
        .collect();
    assert_eq!(statuses, [400, 404], "{records:?}");
    assert_eq!(records[0]["model"], "echo");
    assert_eq!(records[1]["model"], "missing");
    n.node.shutdown().await;
}

/// 401s need no token, so a client can send them as fast as it likes: they take the
/// sample rate, and at 0 none is recorded, while a routed error still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_take_the_sample_rate() {
    let n = start_with(vec![], |cfg| {
        cfg.request_log.sample_rate = 0.0;
        cfg.auth.mode = cohort_config::AuthMode::On;
    })
    .await;
    let admin = wait_admin_token(n.dir.path()).await;
    for token in [None, Some("not-a-token")] {
        for _ in 0..10 {
            let mut req = n
                .http
                .post(format!("{}/api/v1/models/echo/infer", n.url))
                .json(&echo_body(&[1.0]));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let res = req.send().await.expect("sent");
            assert_eq!(res.status().as_u16(), 401);
        }
    }
    let res = n
        .http
        .post(format!("{}/api/v1/models/nope/infer", n.url))
        .bearer_auth(&admin)
        .json(&echo_body(&[1.0]))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status().as_u16(), 404);
    // The writer keeps order: once the 404 (sent last) is there, any 401 that was going
    // to be written would be there too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let v: Value = n
            .http
            .get(format!("{}/api/v1/requests", n.url))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        let records = v["records"].as_array().cloned().unwrap_or_default();
        if !records.is_empty() {
            break records;
        }
        assert!(tokio::time::Instant::now() < deadline, "no record: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let statuses: Vec<u64> = records
        .iter()
        .filter_map(|r| r["status"].as_u64())
        .collect();
    assert_eq!(statuses, [404], "{records:?}");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_node_restart() {
    let n = start_with(vec![], |cfg| cfg.request_log.sample_rate = 1.0).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (s, headers, _) = n.infer("echo", &echo_body(&[i as f32])).await;
        assert_eq!(s, 200);
        ids.push(headers["x-request-id"].to_str().expect("ascii").to_string());
    }
    // No waiting for the writer: a clean shutdown writes what is queued.
    let n = restart(n, |cfg| cfg.request_log.sample_rate = 1.0).await;
    let (s, v) = n.get("/api/v1/requests?model=echo").await;
    assert_eq!(s, 200, "{v}");
    let got: Vec<&str> = v["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let want: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(got, want, "{v}");

    // And the restarted node goes on recording.
    let (s, _, _) = n.infer("echo", &echo_body(&[9.0])).await;
    assert_eq!(s, 200);
    records_at_least(&n, "model=echo", 4).await;
    n.node.shutdown().await;
}

/// The samples of metric `name` in Prometheus text: labels and value.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include `want`.
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_dialect_and_show_raft() {
    let n = start(vec![]).await;
    let (s, _, _) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(s, 200);
    let (s, _, _) = n.infer("echo", &echo_body(&[2.0])).await;
    assert_eq!(s, 200);
    let (s, _, v) = n.post("/v2/models/echo/infer", &kserve_echo()).await;
    assert_eq!(s, 200, "{v}");
    let (s, _, _) = n
        .post("/v1/embeddings", &json!({"model": "echo", "input": "hi"}))
        .await;
    assert_eq!(s, 400);
    let (s, _) = n.get("/v1/models").await;
    assert_eq!(s, 200);
    let (s, _, _) = n.infer("made-up-name", &echo_body(&[1.0])).await;
    assert_eq!(s, 404);

    let (s, text) = n.get_text("/metrics").await;
    assert_eq!(s, 200);
    let http = "cohort_http_requests_total";
    let get = |labels: &[(&str, &str)]| value(&text, http, labels);
    assert_eq!(
        get(&[("model", "echo"), ("dialect", "rest"), ("status", "200")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        get(&[("model", "echo"), ("dialect", "kserve"), ("status", "200")]),
        Some(1.0)
    );
    assert_eq!(
        get(&[("model", "echo"), ("dialect", "openai"), ("status", "400")]),
        Some(1.0)
    );
    assert_eq!(
        get(&[
            ("model", "_other"),
            ("dialect", "openai"),
            ("status", "200")
        ]),
        Some(1.0)
    );
    // An unknown model name never becomes a label.
    assert_eq!(
        get(&[("model", "_other"), ("dialect", "rest"), ("status", "404")]),
        Some(1.0)
    );
    assert!(!text.contains("made-up-name"), "{text}");

    // Every rejection reason is there from the start.
    for reason in [
        "rate_limited",
        "quota",
        "unauthenticated",
        "forbidden",
        "concurrency",
    ] {
        assert_eq!(
            value(&text, "cohort_http_rejected_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
    n.node
        .ctx()
        .metrics
        .rejected(cohort_actors::RejectReason::RateLimited);

    // Latency, batches, queues and replicas of the served models.
    assert!(
        value(
            &text,
            "cohort_request_duration_seconds_count",
            &[("model", "echo"), ("endpoint", "infer")]
        )
        .is_some_and(|c| c >= 2.0),
        "{text}"
    );
    for name in [
        "cohort_queue_duration_seconds_count",
        "cohort_compute_duration_seconds_count",
        "cohort_batch_size_count",
    ] {
        assert!(
            value(&text, name, &[("model", "echo")]).is_some_and(|c| c >= 1.0),
            "{name}: {text}"
        );
    }
    assert!(value(&text, "cohort_queue_depth", &[("model", "echo")]).is_some());
    assert_eq!(
        value(
            &text,
            "cohort_replicas",
            &[("model", "echo"), ("state", "ready")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "cohort_request_log_dropped_total", &[]),
        Some(0.0)
    );

    // Raft: a started node has its term and the bootstrap entry committed and applied.
    let one =
        |text: &str, name: &str| value(text, name, &[]).unwrap_or_else(|| panic!("{name}: {text}"));
    assert!(one(&text, "cohort_raft_term") >= 1.0);
    assert!(one(&text, "cohort_raft_commit_index") >= 1.0);
    assert!(one(&text, "cohort_raft_applied_index") >= 1.0);
    // A single voter elects itself within its election timeout (10 to 20 ticks); the
    // scrape sees it without asking Raft.
    let leader = || async {
        let (_, text) = n.get_text("/metrics").await;
        value(&text, "cohort_raft_is_leader", &[]) == Some(1.0)
    };
    assert!(eventually(Duration::from_secs(10), leader).await);
    let (_, text) = n.get_text("/metrics").await;
    assert!(
        one(&text, "cohort_raft_leader_changes_total") >= 1.0,
        "{text}"
    );
    assert!(one(&text, "cohort_raft_term") >= 2.0, "{text}");
    let (_, cluster) = n.get("/api/v1/cluster").await;
    assert_eq!(
        cluster["raft"]["term"].as_f64(),
        Some(one(&text, "cohort_raft_term")),
        "{cluster}"
    );

    // What other parts count shows at the next scrape.
    let (_, text) = n.get_text("/metrics").await;
    assert_eq!(
        value(
            &text,
            "cohort_http_rejected_total",
            &[("reason", "rate_limited")]
        ),
        Some(1.0)
    );
    assert!(
        value(
            &text,
            http,
            &[("model", "_other"), ("dialect", "other"), ("status", "200")]
        )
        .is_some_and(|c| c >= 1.0),
        "the first scrape is counted: {text}"
    );
    n.node.shutdown().await;
}
