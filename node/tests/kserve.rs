//! The Open Inference Protocol (KServe v2) on a real node on 127.0.0.1:0: metadata,
//! health, config and stats, JSON and binary infer against the native endpoint, errors,
//! the model repository, and Triton's own Python client (`scripts/test_kserve.py`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const HCL: &str = "inference-header-content-length";

/// The native endpoint's `y` for one row of `mlp`.
async fn native_y(n: &TestNode, x: &[f32]) -> Vec<f32> {
    let (status, _, body) = n.infer("mlp", &json!({"inputs": {"x": [x]}})).await;
    assert_eq!(status, 200, "{body}");
    floats(&body["outputs"]["y"][0])
}

/// POSTs a raw body with optional `Inference-Header-Content-Length`; returns the status,
/// the response's header length (if any) and the body bytes.
async fn post_bytes(
    n: &TestNode,
    path: &str,
    header_len: Option<&str>,
    body: Vec<u8>,
) -> (u16, Option<usize>, Vec<u8>) {
    let mut req = n
        .http
        .post(format!("{}{path}", n.url))
        .header("content-type", "application/octet-stream")
        .body(body);
    if let Some(h) = header_len {
        req = req.header(HCL, h);
    }
    let res = req.send().await.expect("sent");
    let status = res.status().as_u16();
    let hl = res
        .headers()
        .get(HCL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, hl, res.bytes().await.expect("body").to_vec())
}

/// A binary request: JSON header with `binary_data_size`, then the floats.
fn binary_request(x: &[f32], extra: Value) -> (Vec<u8>, usize) {
    let mut header = json!({
        "id": "bin-1",
        "inputs": [{"name": "x", "shape": [1, x.len()], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.len() * 4}}],
    });
    if let (Some(h), Some(e)) = (header.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            h.insert(k.clone(), v.clone());
        }
    }
    let mut body = serde_json::to_vec(&header).expect("json");
    let n = body.len();
    for v in x {
        body.extend_from_slice(&v.to_le_bytes());
    }
    (body, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_model_metadata_config_and_stats() {
    let n = start(vec![]).await;
    let (s, v) = n.get("/v2").await;
    assert_eq!(s, 200);
    assert_eq!(v["name"], "cohort");
    assert!(v["version"].is_string());
    assert_eq!(
        v["extensions"],
        json!(["binary_tensor_data", "model_repository"])
    );
    let (s, text) = n.get_text("/v2/health/live").await;
    assert_eq!((s, text.as_str()), (200, ""));
    let (s, text) = n.get_text("/v2/health/ready").await;
    assert_eq!((s, text.as_str()), (200, ""));

    for path in ["/v2/models/mlp", "/v2/models/mlp/versions/1"] {
        let (s, m) = n.get(path).await;
        assert_eq!(s, 200, "{m}");
        assert_eq!(m["name"], "mlp");
        assert_eq!(m["versions"], json!(["1"]));
        assert_eq!(m["platform"], "cohort-candle-mlp");
        assert_eq!(
            m["inputs"],
            json!([{"name": "x", "datatype": "FP32", "shape": [-1, 64]}])
        );
        assert_eq!(
            m["outputs"],
            json!([{"name": "y", "datatype": "FP32", "shape": [-1, 10]}])
        );
    }
    let (s, m) = n.get("/v2/models/mlp/versions/7").await;
    assert_eq!(s, 404, "{m}");
    assert!(m["error"].is_string(), "{m}");

    let (s, _) = n.get_text("/v2/models/mlp/ready").await;
    assert_eq!(s, 200);
    let (s, _) = n.get_text("/v2/models/mlp/versions/1/ready").await;
    assert_eq!(s, 200);
    let (s, v) = n.get("/v2/models/nope/ready").await;
    assert_eq!(s, 404, "{v}");

    let (s, c) = n.get("/v2/models/mlp/config").await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["name"], "mlp");
    assert!(c["max_batch_size"].as_u64().is_some_and(|b| b >= 1));
    assert_eq!(
        c["input"],
        json!([{"name": "x", "data_type": "TYPE_FP32", "dims": [64]}])
    );
    assert_eq!(
        c["output"],
        json!([{"name": "y", "data_type": "TYPE_FP32", "dims": [10]}])
    );
    assert!(
        c["instance_group"][0]["count"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{c}"
    );

    // Stats count what the replicas answered.
    for seed in 0..3 {
        native_y(&n, &row(seed)).await;
    }
    let (s, st) = n.get("/v2/models/mlp/stats").await;
    assert_eq!(s, 200, "{st}");
    let m = &st["model_stats"][0];
    assert_eq!(m["name"], "mlp");
    assert_eq!(m["version"], "1");
    assert!(m["inference_count"].as_u64().is_some_and(|c| c >= 3), "{m}");
    assert!(m["execution_count"].as_u64().is_some_and(|c| c >= 1), "{m}");
    assert!(
        m["inference_stats"]["success"]["count"]
            .as_u64()
            .is_some_and(|c| c >= 3),
        "{m}"
    );
    assert_eq!(m["inference_stats"]["fail"]["count"], 0);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_binary_infer_equal_the_native_endpoint() {
    let n = start(vec![]).await;
    let x = row(5);
    let want = native_y(&n, &x).await;
    assert_eq!(want.len(), 10);

    // JSON, flat data, id echoed.
    let req = json!({"id": "abc", "inputs": [
        {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model_name"], "mlp");
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["id"], "abc");
    let out = &v["outputs"][0];
    assert_eq!(out["name"], "y");
    assert_eq!(out["datatype"], "FP32");
    assert_eq!(out["shape"], json!([1, 10]));
    assert!(close(&floats(&out["data"]), &want), "{v}");

    // JSON, nested data, through the versioned route; no id, none echoed.
    let req = json!({"inputs": [
        {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [x]}]});
    let (s, _, v) = n.post("/v2/models/mlp/versions/1/infer", &req).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("id").is_none(), "{v}");
    assert!(close(&floats(&v["outputs"][0]["data"]), &want));

    // Binary input, JSON output.
    let (body, hl) = binary_request(&x, json!({}));
    let (s, resp_hl, bytes) =
        post_bytes(&n, "/v2/models/mlp/infer", Some(&hl.to_string()), body).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&bytes));
    assert!(resp_hl.is_none());
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(v["id"], "bin-1");
    assert!(close(&floats(&v["outputs"][0]["data"]), &want), "{v}");

    // Binary input, binary output (request-wide and per output), parsed back.
    for extra in [
        json!({"parameters": {"binary_data_output": true}}),
        json!({"outputs": [{"name": "y", "parameters": {"binary_data": true}}]}),
    ] {
        let (body, hl) = binary_request(&x, extra);
        let (s, resp_hl, bytes) =
            post_bytes(&n, "/v2/models/mlp/infer", Some(&hl.to_string()), body).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&bytes));
        let json_len = resp_hl.expect("Inference-Header-Content-Length in the response");
        let header: Value = serde_json::from_slice(&bytes[..json_len]).expect("json header");
        assert_eq!(header["id"], "bin-1");
        let out = &header["outputs"][0];
        assert_eq!(out["name"], "y");
        assert_eq!(out["shape"], json!([1, 10]));
        assert!(out.get("data").is_none());
        assert_eq!(out["parameters"]["binary_data_size"], 40);
        let y: Vec<f32> = bytes[json_len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(close(&y, &want), "{y:?} vs {want:?}");
    }

    // `outputs` selects: a known output is returned, an unknown one is a 400.
    let req = json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}],
                     "outputs": [{"name": "y"}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["outputs"].as_array().map(Vec::len), Some(1));
    let served = |m: Value| -> u64 {
        m["replicas"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["served"].as_u64()).sum())
            .unwrap_or(0)
    };
    let before = served(n.get("/api/v1/models/mlp").await.1);
    let req = json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}],
                     "outputs": [{"name": "nope"}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{v}"
    );
    // Refused before it was queued: the engine never ran it.
    assert_eq!(served(n.get("/api/v1/models/mlp").await.1), before);

    // echo: a 2-D input comes back as it went.
    let req = json!({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                 "data": [1, 2, 3, 4, 5, 6]}]});
    let (s, _, v) = n.post("/v2/models/echo/infer", &req).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([2, 3]));
    assert_eq!(
        floats(&v["outputs"][0]["data"]),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );

    // The metrics count the KServe endpoint.
    let (_, metrics) = n.get_text("/metrics").await;
    assert!(
        metrics.contains("endpoint=\"kserve\""),
        "no kserve series in the metrics"
    );
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_right_status_and_shape() {
    let n = start(vec![]).await;
    let x = row(1);
    let is_err = |v: &Value| v["error"].is_string();

    let req = json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}]});
    let (s, _, v) = n.post("/v2/models/nope/infer", &req).await;
    assert_eq!(s, 404, "{v}");
    assert!(is_err(&v), "{v}");
    let (s, v) = n.get("/v2/models/nope").await;
    assert_eq!(s, 404, "{v}");
    assert!(is_err(&v), "{v}");

    // Data length does not match the shape.
    let req = json!({"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": x}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 400, "{v}");
    assert!(is_err(&v), "{v}");
    // Shape fits the data but not the model.
    let req = json!({"inputs": [{"name": "x", "shape": [2, 32], "datatype": "FP32", "data": x}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("shape")),
        "{v}"
    );
    // Wrong datatype for the model, and an unknown datatype.
    let ints: Vec<i64> = (0..64).collect();
    let req =
        json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": ints}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("dtype")),
        "{v}"
    );
    let req =
        json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "COMPLEX", "data": x}]});
    let (s, _, v) = n.post("/v2/models/mlp/infer", &req).await;
    assert_eq!(s, 400, "{v}");
    // Malformed JSON.
    let (s, _, bytes) = post_bytes(&n, "/v2/models/mlp/infer", None, b"{".to_vec()).await;
    assert_eq!(s, 400);
    assert!(is_err(&serde_json::from_slice(&bytes).expect("json")));

    // Bad Inference-Header-Content-Length: not a number, longer than the body, or a split
    // that leaves the wrong number of binary bytes.
    let (body, hl) = binary_request(&x, json!({}));
    for bad in [
        "abc".to_string(),
        "-1".to_string(),
        (body.len() + 1).to_string(),
    ] {
        let (s, _, bytes) = post_bytes(&n, "/v2/models/mlp/infer", Some(&bad), body.clone()).await;
        assert_eq!(s, 400, "{bad}: {}", String::from_utf8_lossy(&bytes));
        assert!(is_err(&serde_json::from_slice(&bytes).expect("json")));
    }
    let mut short = body.clone();
    short.truncate(body.len() - 4);
    let (s, _, _) = post_bytes(&n, "/v2/models/mlp/infer", Some(&hl.to_string()), short).await;
    assert_eq!(s, 400);
    let mut long = body.clone();
    long.extend_from_slice(&[0; 4]);
    let (s, _, _) = post_bytes(&n, "/v2/models/mlp/infer", Some(&hl.to_string()), long).await;
    assert_eq!(s, 400);
    // binary_data_size without the header.
    let (s, _, _) = post_bytes(&n, "/v2/models/mlp/infer", None, body[..hl].to_vec()).await;
    assert_eq!(s, 400);
    n.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_index_unload_and_load() {
    let n = start(vec![]).await;
    let index = |v: &Value, name: &str| -> Value {
        v.as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    // Empty body.
    let (s, _, bytes) = post_bytes(&n, "/v2/repository/index", None, vec![]).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(index(&v, "echo")["state"], "READY", "{v}");
    assert_eq!(index(&v, "mlp")["version"], "1", "{v}");

    let (s, _, bytes) = post_bytes(&n, "/v2/repository/models/echo/unload", None, vec![]).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&bytes));
    assert!(
        eventually(Duration::from_secs(10), || async {
            n.get_text("/v2/models/echo/ready").await.0 == 400
        })
        .await,
        "echo still ready after unload"
    );
    let (s, _, v) = n.post("/v2/repository/index", &json!({})).await;
    assert_eq!(s, 200);
    assert_eq!(index(&v, "echo")["state"], "UNAVAILABLE", "{v}");
    assert_eq!(index(&v, "echo")["reason"], "unloaded", "{v}");
    let (_, _, v) = n
        .post("/v2/repository/index", &json!({"ready": true}))
        .await;
    assert!(index(&v, "echo").is_null(), "{v}");
    assert_eq!(index(&v, "mlp")["state"], "READY");

    let (s, _, v) = n.post("/v2/repository/models/echo/load", &json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = n.get_text("/v2/models/echo/ready").await;
    assert_eq!(s, 200);
    let req =
        json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    let (s, _, v) = n.post("/v2/models/echo/infer", &req).await;
    assert_eq!(s, 200, "{v}");

    let (s, _, v) = n.post("/v2/repository/models/nope/load", &json!({})).await;
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].is_string());
    n.node.shutdown().await;
}

/// Triton's own HTTP client (`tritonclient[http]`) against a real node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_python_script_passes() {
    let n = start(vec![]).await;
    run_python_client("test_kserve.py", "numpy, tritonclient.http", &n.url).await;
    n.node.shutdown().await;
}
