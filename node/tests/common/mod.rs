//! Helpers shared by the integration tests: start a real node on 127.0.0.1:0, call it
//! over HTTP, and poll with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cohort_actors::{Node, RestartPolicy};
use cohort_config::{EngineKind, FailMode, ModelConfig, NodeConfig};
use serde_json::{json, Value};

/// A node running in this process, with its data dir.
pub struct TestNode {
    pub node: Node,
    pub url: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

/// A restart policy with short backoffs, so tests do not wait.
pub fn fast_policy() -> RestartPolicy {
    RestartPolicy {
        base_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        window: Duration::from_secs(60),
        max_restarts: 5,
    }
}

/// A config for a node on 127.0.0.1:0 in a fresh temp dir, with the built-in models.
pub fn config(dir: &tempfile::TempDir) -> NodeConfig {
    NodeConfig {
        node_name: "test".into(),
        data_dir: dir.path().to_path_buf(),
        http_addr: "127.0.0.1:0".parse().expect("valid address"),
        ..NodeConfig::default()
    }
}

pub fn sleep_model(name: &str, ms: u64) -> ModelConfig {
    let mut m = ModelConfig::new(name, EngineKind::Sleep);
    m.options.sleep_ms = Some(ms);
    m
}

pub fn fail_model(name: &str, every: u64, mode: FailMode) -> ModelConfig {
    let mut m = ModelConfig::new(name, EngineKind::Fail);
    m.options.fail_every = Some(every);
    m.options.fail_mode = mode;
    m
}

/// Starts a node with the built-in models plus `models`, after `tweak` edits the config.
pub async fn start_with(models: Vec<ModelConfig>, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    start_with_policy(models, tweak, fast_policy()).await
}

/// [`start_with`], restarting failed replicas by `policy`.
pub async fn start_with_policy(
    models: Vec<ModelConfig>,
    tweak: impl FnOnce(&mut NodeConfig),
    policy: RestartPolicy,
) -> TestNode {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(&dir);
    cfg.models = models;
    tweak(&mut cfg);
    cfg.validate().expect("test config is valid");
    let node = cohort_actors::start(cfg, Arc::new(cohort_gateway::HttpGateway), policy)
        .await
        .expect("node starts");
    let addr = node.ctx().http_addr().expect("gateway bound");
    assert!(node.wait_ready(Duration::from_secs(20)).await, "node ready");
    // Ready means one replica per model; tests also want the others loaded (or failed).
    let router = node.ctx().router.clone();
    let all_loaded = || {
        let router = router.clone();
        async move {
            router.snapshot().models().iter().all(|(_, m)| {
                m.replicas.iter().all(|r| {
                    !matches!(
                        r.state(),
                        cohort_actors::ReplicaState::Loading
                            | cohort_actors::ReplicaState::Restarting
                    )
                })
            })
        }
    };
    assert!(
        eventually(Duration::from_secs(20), all_loaded).await,
        "replicas loaded"
    );
    TestNode {
        node,
        url: format!("http://{addr}"),
        http: reqwest::Client::new(),
        dir,
    }
}

pub async fn start(models: Vec<ModelConfig>) -> TestNode {
    start_with(models, |_| {}).await
}

impl TestNode {
    /// POSTs JSON to `path`; returns status, headers and the parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("request sent");
        split(res).await
    }

    /// POSTs raw bytes with a content type.
    pub async fn post_raw(
        &self,
        path: &str,
        ct: &str,
        body: Vec<u8>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("request sent");
        split(res).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request sent");
        let (s, _, v) = split(res).await;
        (s, v)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request sent");
        let status = res.status().as_u16();
        (status, res.text().await.expect("body"))
    }

    /// Sends every body to `model` at once (one task each) and returns the JSON answers in
    /// the order of `bodies`.
    pub async fn infer_all(&self, model: &str, bodies: Vec<Value>) -> Vec<Value> {
        let url = format!("{}/api/v1/models/{model}/infer", self.url);
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let http = self.http.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    http.post(url)
                        .json(&body)
                        .send()
                        .await
                        .expect("sent")
                        .json::<Value>()
                        .await
                        .expect("json")
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    }

    pub async fn infer(
        &self,
        model: &str,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.post(&format!("/api/v1/models/{model}/infer"), body)
            .await
    }
}

async fn split(res: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("body");
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

/// A request body for the echo-like engines with one row.
pub fn echo_body(values: &[f32]) -> Value {
    json!({"inputs": {"x": [values]}})
}

/// Polls `check` every 10 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (at most 20 s) for the first admin token a node writes to
/// `<data_dir>/admin-token`, and returns it.
pub async fn wait_admin_token(data_dir: &std::path::Path) -> String {
    let file = data_dir.join("admin-token");
    let f = file.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            let f = f.clone();
            async move { f.exists() }
        })
        .await,
        "the first admin token is written"
    );
    std::fs::read_to_string(&file)
        .expect("read")
        .trim()
        .to_string()
}

/// The workspace's root directory.
pub fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// 64 deterministic floats: one row for the demo `mlp`.
pub fn row(seed: usize) -> Vec<f32> {
    (0..64)
        .map(|i| ((seed * 64 + i) as f32 * 0.173).sin())
        .collect()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Whether two vectors are equal within 1e-4.
pub fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

/// Runs `python3 scripts/<script> <url>` after checking that `imports` import; fails the
/// test with the fix (`pip install -r scripts/requirements-test.txt`) when they do not.
pub async fn run_python_client(script: &str, imports: &str, url: &str) {
    let check = std::process::Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .output();
    match check {
        Err(e) => panic!(
            "python3 is needed for this test ({e}); install it, then run \
             `pip install -r scripts/requirements-test.txt`"
        ),
        Ok(out) if !out.status.success() => panic!(
            "a Python package is missing ({imports}): run `pip install -r scripts/requirements-test.txt`\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
    let path = workspace().join("scripts").join(script);
    let url = url.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(path)
            .arg(url)
            .output()
    })
    .await
    .expect("task")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "scripts/{script} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
