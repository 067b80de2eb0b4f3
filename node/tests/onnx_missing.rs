//! A node whose ONNX Runtime library is missing still starts and serves its other models;
//! the ONNX model shows `failed` with a reason that names the fix. (Its own test process:
//! ONNX Runtime is loaded once per process.)

mod common;

use std::time::Duration;

use cohort_config::{EngineKind, ModelConfig};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_onnx_runtime_fails_only_the_onnx_model_with_a_clear_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The model file exists; what is missing is the runtime that would read it.
    let model_file = dir.path().join("model.onnx");
    std::fs::write(&model_file, b"not read before the runtime loads").expect("file");
    let mut onnx = ModelConfig::new("needs-ort", EngineKind::Onnx);
    onnx.path = Some(model_file);
    let mut cfg = config(&dir);
    cfg.models = vec![onnx];
    cfg.onnxruntime.library = Some(dir.path().join("no-such-libonnxruntime.so"));
    let node = cohort_actors::start(
        cfg,
        std::sync::Arc::new(cohort_gateway::HttpGateway),
        fast_policy(),
    )
    .await
    .expect("the node starts anyway");
    let url = format!("http://{}", node.ctx().http_addr().expect("bound"));
    let http = reqwest::Client::new();
    let model = || {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.get(format!("{url}/api/v1/models/needs-ort"))
                .send()
                .await
                .expect("sent")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        }
    };
    let failed = || async { model().await["state"] == "failed" };
    assert!(eventually(Duration::from_secs(20), failed).await);
    let m = model().await;
    let reason = m["replicas"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("pip install onnxruntime"), "{reason}");

    let r = http
        .post(format!("{url}/api/v1/models/needs-ort/infer"))
        .json(&json!({"inputs": {"x": [[1.0]]}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 503);
    let r = http
        .post(format!("{url}/api/v1/models/echo/infer"))
        .json(&json!({"inputs": {"x": [[1.0]]}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200, "the other models serve");
    node.shutdown().await;
}
