//! Replicas and queueing on one node: scaling with requests in flight, unload and
//! preload, priorities, dynamic batching, callers that go away, and device pinning.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cohort_config::{EngineKind, FailMode, ModelConfig};
use common::*;
use serde_json::{json, Value};

async fn replicas_of(n: &TestNode, model: &str) -> Vec<Value> {
    let (_, m) = n.get(&format!("/api/v1/models/{model}")).await;
    m["replicas"].as_array().cloned().unwrap_or_default()
}

/// Requests served by all of `model`'s replicas.
async fn served(n: &TestNode, model: &str) -> u64 {
    replicas_of(n, model)
        .await
        .iter()
        .map(|r| r["served"].as_u64().unwrap_or(0))
        .sum()
}

/// Sends requests to `model` in a loop until `stop` is set; returns (ok, failures).
fn load_loop(
    n: &TestNode,
    model: &str,
    stop: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let http = n.http.clone();
    let url = format!("{}/api/v1/models/{model}/infer", n.url);
    tokio::spawn(async move {
        let mut ok = 0;
        let mut failures = Vec::new();
        let mut i = 0u32;
        while stop.load(Ordering::Relaxed) == 0 && i < 5000 {
            i += 1;
            let v = i as f32;
            let res = http.post(&url).json(&echo_body(&[v])).send().await;
            match res {
                Ok(r) if r.status() == 200 => {
                    let b: Value = r.json().await.unwrap_or(Value::Null);
                    if b["outputs"]["y"] == json!([[v]]) {
                        ok += 1;
                    } else {
                        failures.push(format!("wrong answer {b}"));
                    }
                }
                Ok(r) => failures.push(format!(
                    "{} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(e) => failures.push(e.to_string()),
            }
        }
        (ok, failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_and_down_under_load_loses_no_request() {
    let mut slow = sleep_model("slow", 5);
    slow.batching.max_batch_size = 4;
    let n = start(vec![slow]).await;
    let stop = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..6)
        .map(|_| load_loop(&n, "slow", Arc::clone(&stop)))
        .collect();

    let (s, _, b) = n
        .post("/api/v1/models/slow/scale", &json!({"replicas": 4}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["replicas_desired"], 4);
    let n_ref = &n;
    let four_ready = || async move {
        let r = replicas_of(n_ref, "slow").await;
        r.len() == 4 && r.iter().all(|x| x["state"] == "ready")
    };
    assert!(eventually(Duration::from_secs(10), four_ready).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (s, _, b) = n
        .post("/api/v1/models/slow/scale", &json!({"replicas": 1}))
        .await;
    assert_eq!(s, 200, "{b}");
    let one_left = || async move {
        let r = replicas_of(n_ref, "slow").await;
        r.len() == 1 && r[0]["state"] == "ready"
    };
    assert!(eventually(Duration::from_secs(10), one_left).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(1, Ordering::Relaxed);

    let mut total = 0;
    for l in loops {
        let (ok, failures) = l.await.expect("task");
        assert!(failures.is_empty(), "lost or failed requests: {failures:?}");
        total += ok;
    }
    assert!(total > 0);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_queued_requests() {
    let mut slow = sleep_model("slow", 100);
    slow.batching.max_batch_size = 1;
    slow.replicas = 2;
    let n = start(vec![slow]).await;
    // Six requests spread over two replicas: each holds about three, 100 ms apiece.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let http = n.http.clone();
        let url = format!("{}/api/v1/models/slow/infer", n.url);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&echo_body(&[i as f32]))
                .send()
                .await
                .expect("sent");
            (
                r.status().as_u16(),
                r.json::<Value>().await.expect("json"),
                i,
            )
        }));
    }
    let n_ref = &n;
    let queued = || async move {
        let r = replicas_of(n_ref, "slow").await;
        r.iter().all(|x| {
            x["queue_depth"].as_u64().unwrap_or(0) + x["in_flight"].as_u64().unwrap_or(0) >= 1
        })
    };
    assert!(eventually(Duration::from_secs(5), queued).await);
    let (s, _, b) = n
        .post("/api/v1/models/slow/scale", &json!({"replicas": 1}))
        .await;
    assert_eq!(s, 200, "{b}");
    let states: Vec<Value> = b["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["state"].clone())
        .collect();
    assert!(states.contains(&json!("draining")), "{states:?}");
    for t in tasks {
        let (status, body, i) = t.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outputs"]["y"], json!([[i as f32]]));
    }
    let one = || async move { replicas_of(n_ref, "slow").await.len() == 1 };
    assert!(eventually(Duration::from_secs(5), one).await);
    n.node.shutdown().await;
}

/// Sends one request of width `width` (so that requests of different widths never share a
/// batch) to `model`; returns its status and error code (or "" on success).
fn send_width(
    n: &TestNode,
    model: &str,
    width: usize,
) -> tokio::task::JoinHandle<(u16, String, std::time::Duration)> {
    let http = n.http.clone();
    let url = format!("{}/api/v1/models/{model}/infer", n.url);
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let body = json!({"inputs": {"x": [vec![width as f32; width]]}, "timeout_ms": 20000});
        let r = http
            .post(url)
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
            .await
            .expect("sent");
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let code = v["error"]["code"].as_str().unwrap_or("").to_string();
        (status, code, started.elapsed())
    })
}

/// Waits until the replicas of `model` hold `depth` queued requests in all.
async fn wait_queued(n: &TestNode, model: &str, depth: u64) {
    let queued = || async move {
        replicas_of(n, model)
            .await
            .iter()
            .map(|r| r["queue_depth"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == depth
    };
    assert!(
        eventually(Duration::from_secs(10), queued).await,
        "{depth} requests queued on {model}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_dies_while_draining_leaves_no_request_waiting() {
    // Every engine call panics; batches wait a second to fill, so requests sit queued.
    let mut boom = fail_model("boom", 1, FailMode::Panic);
    boom.batching.max_batch_size = 8;
    boom.batching.max_queue_delay_us = 1_000_000;
    let n = start(vec![boom]).await;
    let tasks: Vec<_> = (1..=3).map(|w| send_width(&n, "boom", w)).collect();
    wait_queued(&n, "boom", 3).await;
    // Unloading drains: the engine takes the first request, panics, and its thread ends
    // with two requests still queued, which no engine will serve.
    let (s, _, b) = n.post("/api/v1/models/boom/unload", &json!({})).await;
    assert_eq!(s, 200, "{b}");
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    answers.sort_by_key(|a| a.0);
    let codes: Vec<(u16, &str)> = answers.iter().map(|a| (a.0, a.1.as_str())).collect();
    // Before the fix the two left in the queue waited out their 20 s deadline: 504.
    assert_eq!(
        codes,
        vec![
            (500, "INFERENCE_FAILED"),
            (503, "NO_REPLICA"),
            (503, "NO_REPLICA")
        ]
    );
    for a in &answers {
        assert!(a.2 < Duration::from_secs(10), "answered after {:?}", a.2);
    }
    let n_ref = &n;
    let gone = || async move { replicas_of(n_ref, "boom").await.is_empty() };
    assert!(eventually(Duration::from_secs(5), gone).await);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_replica_that_waits_to_restart_moves_its_queue_to_a_ready_one() {
    // Every third engine call panics. Batches wait 300 ms to fill, so the router gathers
    // the five requests on one replica; widths differ, so they run one per call there.
    let mut flaky = fail_model("flaky", 3, FailMode::Panic);
    flaky.replicas = 2;
    flaky.batching.max_batch_size = 8;
    flaky.batching.max_queue_delay_us = 300_000;
    // A long backoff keeps the crashed replica `restarting` while the test scales down.
    let policy = cohort_actors::RestartPolicy {
        base_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(5),
        window: Duration::from_secs(60),
        max_restarts: 5,
    };
    let n = start_with_policy(vec![flaky], |_| {}, policy).await;
    let mut tasks = Vec::new();
    for w in 1..=5 {
        tasks.push(send_width(&n, "flaky", w));
        // In order, so that each finds the others' queue on the same replica.
        wait_queued(&n, "flaky", w as u64).await;
    }
    // Calls 1 and 2 answer widths 1 and 2; call 3 panics on width 3, and widths 4 and 5
    // wait in the queue of a replica that restarts in 5 s.
    let n_ref = &n;
    let restarting = || async move {
        replicas_of(n_ref, "flaky")
            .await
            .iter()
            .any(|r| r["state"] == "restarting" && r["queue_depth"] == 2)
    };
    assert!(eventually(Duration::from_secs(10), restarting).await);
    let (s, _, b) = n
        .post("/api/v1/models/flaky/scale", &json!({"replicas": 1}))
        .await;
    assert_eq!(s, 200, "{b}");
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let codes: Vec<(u16, &str)> = answers.iter().map(|a| (a.0, a.1.as_str())).collect();
    // Before the fix widths 4 and 5 were answered 503 "replica was removed" although the
    // other replica was ready.
    assert_eq!(
        codes,
        vec![
            (200, ""),
            (200, ""),
            (500, "INFERENCE_FAILED"),
            (200, ""),
            (200, "")
        ]
    );
    for a in &answers {
        assert!(a.2 < Duration::from_secs(4), "answered after {:?}", a.2);
    }
    let r = replicas_of(&n, "flaky").await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["state"], "ready");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_then_preload() {
    let n = start(vec![]).await;
    let (s, _, b) = n.post("/api/v1/models/mlp/unload", &json!({})).await;
    assert_eq!(s, 200, "{b}");
    let n_ref = &n;
    let gone = || async move {
        let (_, m) = n_ref.get("/api/v1/models/mlp").await;
        m["state"] == "unloaded" && m["replicas"].as_array().is_some_and(|r| r.is_empty())
    };
    assert!(eventually(Duration::from_secs(5), gone).await);
    let x: Vec<f32> = vec![0.5; 64];
    let (s, _, b) = n.infer("mlp", &json!({"inputs": {"x": [x]}})).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["error"]["code"], "NO_REPLICA");
    let (s, _) = n.get("/readyz").await;
    assert_eq!(s, 200, "an unloaded model does not make the node unready");

    let (s, _, b) = n.post("/api/v1/models/mlp/preload", &json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["state"], "ready");
    assert_eq!(
        b["replicas_desired"], 2,
        "preload restores the replica count"
    );
    let (s, _, _) = n.infer("mlp", &json!({"inputs": {"x": [x]}})).await;
    assert_eq!(s, 200);

    // Bad requests to the controls.
    let (s, _, b) = n
        .post("/api/v1/models/mlp/scale", &json!({"replicas": 1000}))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("INVALID_INPUT"))
    );
    let (s, _, _) = n
        .post("/api/v1/models/mlp/scale", &json!({"replica": 1}))
        .await;
    assert_eq!(s, 400);
    let (s, _, b) = n
        .post("/api/v1/models/nope/scale", &json!({"replicas": 1}))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("MODEL_NOT_FOUND"))
    );
    let (s, _, _) = n.post("/api/v1/models/nope/preload", &json!({})).await;
    assert_eq!(s, 404);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_goes_first_through_the_engine() {
    let mut slow = sleep_model("slow", 150);
    slow.batching.max_batch_size = 1;
    slow.batching.priority_aging_ms = 60_000;
    let n = start(vec![slow]).await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |priority: &'static str| {
        let http = n.http.clone();
        let url = format!("{}/api/v1/models/slow/infer", n.url);
        let order = Arc::clone(&order);
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"inputs": {"x": [[1.0]]}, "priority": priority}))
                .send()
                .await
                .expect("sent");
            assert_eq!(r.status(), 200);
            order.lock().expect("lock").push(priority);
        })
    };
    let n_ref = &n;
    let depth_is = |d: u64| async move {
        let r = replicas_of(n_ref, "slow").await;
        r[0]["queue_depth"].as_u64() == Some(d)
    };
    // The first request occupies the engine; the others queue in the order low, normal, high.
    let first = send("normal");
    assert!(
        eventually(Duration::from_secs(5), || async {
            replicas_of(n_ref, "slow").await[0]["in_flight"] == 1
        })
        .await
    );
    let mut tasks = vec![first];
    for (i, p) in ["low", "normal", "high"].into_iter().enumerate() {
        tasks.push(send(p));
        assert!(eventually(Duration::from_secs(5), || depth_is(i as u64 + 1)).await);
    }
    for t in tasks {
        t.await.expect("task");
    }
    let order = order.lock().expect("lock").clone();
    assert_eq!(order, vec!["normal", "high", "normal", "low"]);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_batching_joins_concurrent_requests() {
    let mut e = ModelConfig::new("batched", EngineKind::Echo);
    e.batching.max_batch_size = 8;
    e.batching.max_queue_delay_us = 200_000;
    let n = start(vec![e]).await;
    let bodies = (0..8)
        .map(|i| echo_body(&[i as f32, -(i as f32)]))
        .collect();
    let answers = n.infer_all("batched", bodies).await;
    let mut sizes = Vec::new();
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(
            r["outputs"]["y"],
            json!([[i as f32, -(i as f32)]]),
            "order kept: {r}"
        );
        sizes.push(r["batch_size"].as_u64().unwrap_or(0));
    }
    // Sent together within the 200 ms window: most share one engine call.
    assert!(sizes.iter().max() >= Some(&4), "batch sizes {sizes:?}");
    let (_, text) = n.get_text("/metrics").await;
    assert!(text.contains("cohort_batch_size_bucket{model=\"batched\""));
    assert!(text.contains("cohort_queue_duration_seconds_bucket{model=\"batched\""));
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_caller_left_are_dropped_before_compute() {
    let mut slow = sleep_model("slow", 300);
    slow.batching.max_batch_size = 1;
    let n = start(vec![slow]).await;
    let http = n.http.clone();
    let url = format!("{}/api/v1/models/slow/infer", n.url);
    let first = tokio::spawn(async move { http.post(url).json(&echo_body(&[1.0])).send().await });
    let n_ref = &n;
    assert!(
        eventually(Duration::from_secs(5), || async {
            replicas_of(n_ref, "slow").await[0]["in_flight"] == 1
        })
        .await
    );
    // This caller gives up after 50 ms, while its request is still queued.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .expect("client");
    let r = impatient
        .post(format!("{}/api/v1/models/slow/infer", n.url))
        .json(&echo_body(&[2.0]))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    assert_eq!(first.await.expect("task").expect("sent").status(), 200);
    // The engine served only the first; the abandoned one never reached it.
    let done = || async {
        let r = replicas_of(n_ref, "slow").await;
        r[0]["queue_depth"] == 0 && r[0]["in_flight"] == 0
    };
    assert!(eventually(Duration::from_secs(5), done).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = replicas_of(&n, "slow").await;
    assert_eq!(r[0]["served"], 1, "{r:?}");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_pinned_to_devices_and_a_missing_gpu_is_a_clear_failure() {
    let mut gpu = ModelConfig::new("on-gpu", EngineKind::Echo);
    gpu.device = "cuda:7".into();
    let mut auto = ModelConfig::new("anywhere", EngineKind::Echo);
    auto.device = "auto".into();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(&dir);
    cfg.models = vec![gpu, auto];
    let node = cohort_actors::start(cfg, Arc::new(cohort_gateway::HttpGateway), fast_policy())
        .await
        .expect("node starts");
    let url = format!("http://{}", node.ctx().http_addr().expect("bound"));
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let http = http.clone();
        let u = format!("{url}{path}");
        async move {
            http.get(u)
                .send()
                .await
                .expect("sent")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let m = get("/api/v1/models/on-gpu").await;
    assert_eq!(m["replicas"][0]["state"], "failed");
    assert!(
        m["replicas"][0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("cuda:7"),
        "{m}"
    );
    // `auto` falls back to the CPU on a machine without GPUs and serves.
    let ready = || async {
        let m = get("/api/v1/models/anywhere").await;
        m["replicas"][0]["state"] == "ready"
    };
    assert!(eventually(Duration::from_secs(5), ready).await);
    let m = get("/api/v1/models/anywhere").await;
    assert_eq!(m["replicas"][0]["device"], "cpu");
    let h = get("/api/v1/health/detailed").await;
    assert_eq!(h["devices"][0]["id"], "cpu");
    assert!(h["devices"][0]["cores"].as_u64() >= Some(1));
    let r = http
        .post(format!("{url}/api/v1/models/mlp/infer"))
        .json(&json!({"inputs": {"x": [vec![0.0f32; 64]]}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200, "the rest of the node serves");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_in_the_queue_counts_in_the_queue_delay() {
    let mut slow = sleep_model("slow", 300);
    slow.batching.max_batch_size = 1;
    let n = start(vec![slow]).await;
    let url = format!("{}/api/v1/models/slow/infer", n.url);
    let first = {
        let (http, url) = (n.http.clone(), url.clone());
        tokio::spawn(async move { http.post(url).json(&echo_body(&[1.0])).send().await })
    };
    // The second waits behind the first's 300 ms and gives up after 50.
    let n_ref = &n;
    let running =
        || async move { replicas_of(n_ref, "slow").await[0]["in_flight"].as_u64() == Some(1) };
    assert!(eventually(Duration::from_secs(5), running).await);
    let body = json!({"inputs": {"x": [[2.0]]}, "timeout_ms": 50});
    let (s, _, b) = n.infer("slow", &body).await;
    assert_eq!((s, b["error"]["code"].as_str()), (504, Some("TIMEOUT")));
    assert_eq!(first.await.expect("task").expect("sent").status(), 200);
    // Both waited in the queue: the one that ran, and the one dropped at its deadline.
    let count = || async move {
        let (_, text) = n_ref.get_text("/metrics").await;
        text.lines()
            .any(|l| l == "cohort_queue_duration_seconds_count{model=\"slow\"} 2")
    };
    assert!(eventually(Duration::from_secs(5), count).await);
    n.node.shutdown().await;
}

/// A request with more rows than `max_batch_size` is queued as parts of at most that many
/// rows (no engine call takes more), placed on the replicas one by one, and answered as
/// one response in row order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_a_batch_is_served_in_parts() {
    let mut e = ModelConfig::new("small-batches", EngineKind::Echo);
    e.batching.max_batch_size = 4;
    e.replicas = 2;
    let n = start(vec![e]).await;
    let rows: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32, -(i as f32)]).collect();
    let (status, _, body) = n
        .post(
            "/api/v1/models/small-batches/infer",
            &json!({"inputs": {"x": rows}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"]["y"], json!(rows), "every row, in order");
    assert!(
        body["batch_size"].as_u64().is_some_and(|b| b >= 1),
        "{body}"
    );
    // 10 rows at most 4 per engine call: 3 parts (4 + 4 + 2), served as 3 requests.
    assert_eq!(served(&n, "small-batches").await, 3);
    // A request that fits is one part.
    let (status, _, body) = n
        .post(
            "/api/v1/models/small-batches/infer",
            &json!({"inputs": {"x": [[1.0, 2.0], [3.0, 4.0]]}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["replica"].as_str().unwrap_or(",").contains(','),
        "{body}"
    );
    n.node.shutdown().await;
}

/// A request in more parts than a replica's queue holds could never be queued whole: 413,
/// and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_more_parts_than_a_queue_holds_is_413() {
    let mut e = ModelConfig::new("one-row", EngineKind::Echo);
    e.batching.max_batch_size = 1;
    let n = start_with(vec![e], |cfg| cfg.limits.queue_capacity = 4).await;
    let rows: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32]).collect();
    let (status, _, body) = n
        .post(
            "/api/v1/models/one-row/infer",
            &json!({"inputs": {"x": rows}}),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE", "{body}");
    assert_eq!(body["error"]["details"]["parts"], 10, "{body}");
    assert_eq!(body["error"]["details"]["queue_capacity"], 4, "{body}");
    // Four rows fit (four parts of one row).
    let (status, _, body) = n
        .post(
            "/api/v1/models/one-row/infer",
            &json!({"inputs": {"x": [[1.0], [2.0], [3.0], [4.0]]}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"]["y"], json!([[1.0], [2.0], [3.0], [4.0]]));
    assert_eq!(
        served(&n, "one-row").await,
        4,
        "the refused request queued nothing"
    );
    n.node.shutdown().await;
}
