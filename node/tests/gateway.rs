//! End-to-end tests of one node: a real node on 127.0.0.1:0, called over HTTP.

mod common;

use std::time::Duration;

use cohort_config::{FailMode, BUILTIN_MLP_FILE};
use common::*;
use serde_json::{json, Value};

/// `y = W2 · relu(W1 · x + b1) + b2`, by plain loops over the weights in the file the node
/// wrote.
fn reference_mlp(path: &std::path::Path, x: &[f32]) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("model file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let read = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(name).expect("tensor present");
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.shape().to_vec(), data)
    };
    let mut h = x.to_vec();
    let layers = (0..)
        .take_while(|i| st.tensor(&format!("layers.{i}.weight")).is_ok())
        .count();
    for l in 0..layers {
        let (shape, w) = read(&format!("layers.{l}.weight"));
        let (_, b) = read(&format!("layers.{l}.bias"));
        let (out_d, in_d) = (shape[0], shape[1]);
        h = (0..out_d)
            .map(|o| {
                let acc = b[o] + (0..in_d).map(|i| w[o * in_d + i] * h[i]).sum::<f32>();
                if l + 1 < layers {
                    acc.max(0.0)
                } else {
                    acc
                }
            })
            .collect();
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_outputs_equal_a_plain_matrix_product_single_and_batched() {
    let n = start(vec![]).await;
    let path = n.dir.path().join(BUILTIN_MLP_FILE);

    // One row per request.
    for seed in 0..3 {
        let x = row(seed);
        let (status, headers, body) = n.infer("mlp", &json!({"inputs": {"x": [x]}})).await;
        assert_eq!(status, 200, "{body}");
        assert!(headers.contains_key("x-request-id"));
        assert_eq!(body["model"], "mlp");
        assert_eq!(body["version"], "1");
        assert!(body["timing"]["total_us"].as_u64().is_some());
        assert!(body["replica"]
            .as_str()
            .is_some_and(|r| r.starts_with("mlp-")));
        let y = floats(&body["outputs"]["y"][0]);
        let want = reference_mlp(&path, &x);
        assert_eq!(y.len(), 10);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "got {y:?}, want {want:?}");
        }
    }

    // Several rows in one request, and many concurrent requests (batched by the replica):
    // each answer equals its own reference.
    let rows: Vec<Vec<f32>> = (10..14).map(row).collect();
    let (status, _, body) = n.infer("mlp", &json!({"inputs": {"x": rows}})).await;
    assert_eq!(status, 200, "{body}");
    for (i, x) in rows.iter().enumerate() {
        let y = floats(&body["outputs"]["y"][i]);
        let want = reference_mlp(&path, x);
        assert!(
            y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
            "row {i}"
        );
    }
    let xs: Vec<Vec<f32>> = (100..164).map(row).collect();
    let bodies = xs.iter().map(|x| json!({"inputs": {"x": [x]}})).collect();
    let answers = n.infer_all("mlp", bodies).await;
    let mut max_batch = 0;
    for (x, res) in xs.iter().zip(&answers) {
        let y = floats(&res["outputs"]["y"][0]);
        let want = reference_mlp(&path, x);
        assert!(
            y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
            "{res}"
        );
        max_batch = max_batch.max(res["batch_size"].as_u64().unwrap_or(0));
    }
    assert!(max_batch >= 1);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_endpoint_answers_each_item_on_its_own() {
    let n = start(vec![]).await;
    let body = json!({
        "requests": [
            {"inputs": {"x": [row(1)]}},
            {"inputs": {"x": [[1.0, 2.0]]}},
            {"inputs": {"z": [row(2)]}},
            {"nonsense": true},
            {"inputs": {"x": [row(3)]}, "priority": "high"}
        ],
        "parallel": true
    });
    let (status, _, res) = n.post("/api/v1/models/mlp/batch", &body).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(
        res["summary"],
        json!({"total": 5, "succeeded": 2, "failed": 3})
    );
    let results = res["results"].as_array().expect("results");
    let oks: Vec<bool> = results
        .iter()
        .map(|r| r["ok"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(oks, vec![true, false, false, false, true]);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
    }
    assert_eq!(results[1]["error"]["code"], "INVALID_INPUT");
    assert_eq!(results[1]["error"]["details"]["input"], "x");
    assert_eq!(results[2]["error"]["details"]["input"], "z");
    let path = n.dir.path().join(BUILTIN_MLP_FILE);
    let y = floats(&results[4]["outputs"]["y"][0]);
    let want = reference_mlp(&path, &row(3));
    assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));

    // Sequential mode gives the same answers.
    let seq = json!({"requests": [{"inputs": {"x": [row(1)]}}], "parallel": false});
    let (status, _, res2) = n.post("/api/v1/models/mlp/batch", &seq).await;
    assert_eq!(status, 200);
    assert_eq!(res2["results"][0]["outputs"], results[0]["outputs"]);

    // Too many items, an empty batch, and an unknown model.
    let many: Vec<Value> = (0..101)
        .map(|_| json!({"inputs": {"x": [[1.0]]}}))
        .collect();
    let (status, _, res) = n
        .post("/api/v1/models/echo/batch", &json!({"requests": many}))
        .await;
    assert_eq!(status, 413, "{res}");
    assert_eq!(res["error"]["code"], "PAYLOAD_TOO_LARGE");
    let (status, _, _) = n
        .post("/api/v1/models/echo/batch", &json!({"requests": []}))
        .await;
    assert_eq!(status, 400);
    let (status, _, res) = n
        .post(
            "/api/v1/models/nope/batch",
            &json!({"requests": [{"inputs": {}}]}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(res["error"]["code"], "MODEL_NOT_FOUND");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_get_typed_errors() {
    let n = start_with(vec![], |c| c.limits.max_body_bytes = 4096).await;
    let infer = "/api/v1/models/mlp/infer";

    let check = |status: u16, body: &Value, want_status: u16, code: &str| {
        assert_eq!(status, want_status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    };

    let (s, _, b) = n
        .post_raw(infer, "application/json", b"{not json".to_vec())
        .await;
    check(s, &b, 400, "INVALID_INPUT");
    let (s, _, b) = n.post_raw(infer, "text/plain", b"{}".to_vec()).await;
    check(s, &b, 400, "INVALID_INPUT");
    let big = format!(
        "{{\"inputs\": {{\"x\": [[{}]]}}}}",
        vec!["1.0"; 2000].join(",")
    );
    let (s, h, b) = n
        .post_raw(infer, "application/json", big.into_bytes())
        .await;
    check(s, &b, 413, "PAYLOAD_TOO_LARGE");
    assert!(h.contains_key("x-request-id"));
    let (s, _, b) = n.infer("nope", &echo_body(&[1.0])).await;
    check(s, &b, 404, "MODEL_NOT_FOUND");

    // Wrong name, shape, dtype, ragged rows: 400 with details naming the input.
    let cases = [
        (json!({"inputs": {"q": [row(0)]}}), "q"),
        (json!({"inputs": {"x": [[1.0, 2.0]]}}), "x"),
        (json!({"inputs": {"x": [vec!["a"; 64]]}}), "x"),
        (json!({"inputs": {"x": [row(0), [1.0]]}}), "x"),
        (json!({"inputs": {}}), "x"),
    ];
    for (body, input) in cases {
        let (s, _, b) = n.infer("mlp", &body).await;
        check(s, &b, 400, "INVALID_INPUT");
        assert_eq!(b["error"]["details"]["input"], input, "{b}");
    }
    // Unknown top-level field, bad priority, bad timeout.
    for body in [
        json!({"inputs": {"x": [row(0)]}, "timeout": 5}),
        json!({"inputs": {"x": [row(0)]}, "priority": "urgent"}),
        json!({"inputs": {"x": [row(0)]}, "timeout_ms": 0}),
    ] {
        let (s, _, b) = n.infer("mlp", &body).await;
        check(s, &b, 400, "INVALID_INPUT");
    }
    // Unknown route and wrong method.
    let (s, b) = n.get("/api/v1/nothing").await;
    check(s, &b, 404, "NOT_FOUND");
    let (s, b) = n.get(infer).await;
    check(s, &b, 405, "METHOD_NOT_ALLOWED");

    // The client's request id is echoed.
    let res = n
        .http
        .post(format!("{}{infer}", n.url))
        .header("x-request-id", "my-id-42")
        .json(&json!({"inputs": {"x": [[1.0]]}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.headers()["x-request-id"], "my-id-42");
    let b: Value = res.json().await.expect("json");
    assert_eq!(b["error"]["request_id"], "my-id-42");

    // None of this hurt the node.
    let (s, _, _) = n.infer("mlp", &json!({"inputs": {"x": [row(0)]}})).await;
    assert_eq!(s, 200);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_overloaded_and_late_requests_time_out() {
    let mut slow = sleep_model("slow", 300);
    slow.batching.max_batch_size = 1;
    let n = start_with(vec![slow], |c| c.limits.queue_capacity = 1).await;

    let mut tasks = Vec::new();
    for _ in 0..4 {
        let http = n.http.clone();
        let url = format!("{}/api/v1/models/slow/infer", n.url);
        tasks.push(tokio::spawn(async move {
            let res = http
                .post(url)
                .json(&echo_body(&[7.0]))
                .send()
                .await
                .expect("sent");
            let status = res.status().as_u16();
            let retry = res.headers().get("retry-after").cloned();
            let body: Value = res.json().await.expect("json");
            (status, retry, body)
        }));
    }
    let mut ok = 0;
    let mut overloaded = 0;
    for t in tasks {
        let (status, retry, body) = t.await.expect("task");
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["outputs"]["y"], json!([[7.0]]));
            }
            503 => {
                overloaded += 1;
                assert_eq!(body["error"]["code"], "OVERLOADED");
                assert_eq!(retry.expect("Retry-After"), "1");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );

    // A deadline shorter than the engine's time: 504 TIMEOUT.
    let (s, _, b) = n
        .infer("slow", &json!({"inputs": {"x": [[1.0]]}, "timeout_ms": 50}))
        .await;
    assert_eq!(s, 504, "{b}");
    assert_eq!(b["error"]["code"], "TIMEOUT");
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_never_reach_the_engine() {
    let mut slow = sleep_model("slow", 200);
    slow.batching.max_batch_size = 1;
    let n = start(vec![slow]).await;
    // The first request holds the engine; the second waits in the queue past its deadline.
    let first = {
        let http = n.http.clone();
        let url = format!("{}/api/v1/models/slow/infer", n.url);
        tokio::spawn(async move { http.post(url).json(&echo_body(&[1.0])).send().await })
    };
    let n_ref = &n;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            let (_, m) = n_ref.get("/api/v1/models/slow").await;
            m["replicas"][0]["in_flight"] == 1
        })
        .await
    );
    let (s, _, b) = n
        .infer("slow", &json!({"inputs": {"x": [[2.0]]}, "timeout_ms": 50}))
        .await;
    assert_eq!(s, 504, "{b}");
    assert_eq!(first.await.expect("task").expect("sent").status(), 200);
    // Only the first request was served; the expired one counts as failed, not served.
    let served = || async move {
        let (_, m) = n_ref.get("/api/v1/models/slow").await;
        m["replicas"][0]["served"] == 1 && m["replicas"][0]["queue_depth"] == 0
    };
    assert!(eventually(Duration::from_secs(5), served).await);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_are_500_and_a_panicking_replica_is_restarted() {
    let n = start(vec![
        fail_model("flaky", 2, FailMode::Error),
        fail_model("crashy", 2, FailMode::Panic),
    ])
    .await;

    let (s, _, _) = n.infer("flaky", &echo_body(&[1.0])).await;
    assert_eq!(s, 200);
    let (s, _, b) = n.infer("flaky", &echo_body(&[1.0])).await;
    assert_eq!(s, 500, "{b}");
    assert_eq!(b["error"]["code"], "INFERENCE_FAILED");

    let (s, _, _) = n.infer("crashy", &echo_body(&[1.0])).await;
    assert_eq!(s, 200);
    let (s, _, b) = n.infer("crashy", &echo_body(&[2.0])).await;
    assert_eq!(s, 500, "{b}");
    assert_eq!(b["error"]["code"], "INFERENCE_FAILED");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("panicked"));

    // The replica comes back and serves; the restart shows in the detailed health.
    let n_ref = &n;
    let back = || async move {
        let (s, _, b) = n_ref.infer("crashy", &echo_body(&[3.0])).await;
        s == 200 && b["outputs"]["y"] == json!([[3.0]])
    };
    assert!(eventually(Duration::from_secs(10), back).await);
    let (s, health) = n.get("/api/v1/health/detailed").await;
    assert_eq!(s, 200);
    let crashy = health["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "crashy")
        .expect("crashy listed");
    assert_eq!(crashy["replicas"][0]["restarts"], 1, "{crashy}");
    assert!(health["restarts_total"].as_u64() >= Some(1));
    assert!(health["rss_bytes"].as_u64().is_some_and(|r| r > 0));
    assert_eq!(health["actors"]["kind"], "NodeSupervisor");

    // The other models never noticed.
    let (s, _, _) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(s, 200);
    let (_, metrics) = n.get_text("/metrics").await;
    assert!(
        metrics.contains("cohort_replica_restarts_total{model=\"crashy\"} 1"),
        "{metrics}"
    );
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_failing_is_given_up_and_reported() {
    // Panics on every call: each request restarts it, until the budget is spent.
    let n = start(vec![fail_model("doomed", 1, FailMode::Panic)]).await;
    let n_ref = &n;
    let failed = || async move {
        let _ = n_ref.infer("doomed", &echo_body(&[1.0])).await;
        let (_, m) = n_ref.get("/api/v1/models/doomed").await;
        m["replicas"][0]["state"] == "failed"
    };
    assert!(eventually(Duration::from_secs(20), failed).await);
    let (s, h, b) = n.infer("doomed", &echo_body(&[1.0])).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["error"]["code"], "NO_REPLICA");
    assert!(h.contains_key("retry-after"));
    let (s, _) = n.get("/readyz").await;
    assert_eq!(s, 503);
    let (s, _, _) = n.infer("echo", &echo_body(&[1.0])).await;
    assert_eq!(s, 200);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics_describe_the_node() {
    let n = start(vec![]).await;
    let (s, b) = n.get("/healthz").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ok")));
    let (s, b) = n.get("/readyz").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ready")));

    let (s, list) = n.get("/api/v1/models").await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, vec!["echo", "mlp"]);
    assert_eq!(list["devices"][0]["id"], "cpu");

    let (s, mlp) = n.get("/api/v1/models/mlp").await;
    assert_eq!(s, 200);
    assert_eq!(mlp["engine"], "candle-mlp");
    assert_eq!(mlp["state"], "ready");
    assert_eq!(
        mlp["inputs"],
        json!([{"name": "x", "dtype": "f32", "shape": [-1, 64]}])
    );
    assert_eq!(
        mlp["outputs"],
        json!([{"name": "y", "dtype": "f32", "shape": [-1, 10]}])
    );
    let replicas = mlp["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2);
    for r in replicas {
        assert_eq!(r["state"], "ready");
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["queue_depth"], 0);
    }
    let (s, b) = n.get("/api/v1/models/nope").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("MODEL_NOT_FOUND"))
    );

    let (s, _, _) = n.infer("mlp", &json!({"inputs": {"x": [row(0)]}})).await;
    assert_eq!(s, 200);
    let (_, _, _) = n.infer("mlp", &json!({"inputs": {"x": [[1.0]]}})).await;
    let (s, text) = n.get_text("/metrics").await;
    assert_eq!(s, 200);
    for needle in [
        "cohort_requests_total{endpoint=\"infer\",model=\"mlp\",status=\"200\"} 1",
        "cohort_requests_total{endpoint=\"infer\",model=\"mlp\",status=\"400\"} 1",
        "cohort_request_duration_seconds_bucket",
        "cohort_batch_size_bucket",
        "cohort_queue_depth{model=\"mlp\",replica=\"mlp-0\"} 0",
        "cohort_replicas{model=\"mlp\",state=\"ready\"} 2",
        "cohort_compute_duration_seconds_count{model=\"mlp\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let n = start(vec![sleep_model("slow", 300)]).await;
    let n_ref = &n;
    let url = format!("{}/api/v1/models/slow/infer", n.url);
    let http = n.http.clone();
    let in_flight = tokio::spawn(async move {
        let res = http
            .post(url)
            .json(&echo_body(&[5.0]))
            .send()
            .await
            .expect("sent");
        (
            res.status().as_u16(),
            res.json::<Value>().await.expect("json"),
        )
    });
    assert!(
        eventually(Duration::from_secs(5), || async move {
            let (_, m) = n_ref.get("/api/v1/models/slow").await;
            m["replicas"][0]["in_flight"] == 1
        })
        .await
    );
    let url = n.url.clone();
    n.node.shutdown().await;
    let (status, body) = in_flight.await.expect("task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"]["y"], json!([[5.0]]));
    // And the port no longer accepts.
    assert!(reqwest::get(format!("{url}/healthz")).await.is_err());
}
