//! The auth matrix: each endpoint group (Cohort REST, KServe v2, OpenAI, admin, public)
//! against no token, a bad token, a user token, an admin token, a disallowed model, a
//! disallowed address, the rate limit, the monthly quota, an expired, a paused and a
//! revoked token. Plus: the secret is shown once and never stored, admin actions land in
//! the audit log with who and the request id, and usage survives a restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use reqwest::Method;
use serde_json::{json, Value};

struct Authed {
    node: Option<cohort_actors::Node>,
    url: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    admin: String,
}

async fn start_node(dir: &tempfile::TempDir) -> (cohort_actors::Node, String) {
    let mut cfg = common::config(dir);
    cfg.auth.mode = cohort_config::AuthMode::On;
    cfg.auth.usage_flush_ms = 50;
    cfg.validate().expect("valid config");
    let node = cohort_actors::start(
        cfg,
        Arc::new(cohort_gateway::HttpGateway),
        common::fast_policy(),
    )
    .await
    .expect("node starts");
    assert!(node.wait_ready(Duration::from_secs(20)).await, "node ready");
    let addr = node.ctx().http_addr().expect("bound");
    (node, format!("http://{addr}"))
}

async fn start() -> Authed {
    let dir = tempfile::tempdir().expect("temp dir");
    let (node, url) = start_node(&dir).await;
    let admin = common::wait_admin_token(dir.path()).await;
    let file = dir.path().join("admin-token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the admin token file is private");
    }
    Authed {
        node: Some(node),
        url,
        http: reqwest::Client::new(),
        dir,
        admin,
    }
}

impl Authed {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, v)
    }

    async fn create(&self, body: Value) -> (String, String) {
        let (s, _, b) = self
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(&self.admin),
                Some(body),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        (
            b["id"].as_str().expect("id").to_string(),
            b["secret"].as_str().expect("secret").to_string(),
        )
    }
}

/// One request per dialect: Cohort REST infer, KServe infer, OpenAI embeddings.
async fn three(
    a: &Authed,
    token: Option<&str>,
    model: &str,
) -> [(u16, reqwest::header::HeaderMap, Value); 3] {
    let rest = a
        .call(
            Method::POST,
            &format!("/api/v1/models/{model}/infer"),
            token,
            Some(json!({"inputs": {"x": [[1.0, 2.0]]}})),
        )
        .await;
    let kserve = a
        .call(
            Method::POST,
            &format!("/v2/models/{model}/infer"),
            token,
            Some(json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]})),
        )
        .await;
    let openai = a
        .call(
            Method::POST,
            "/v1/embeddings",
            token,
            Some(json!({"model": model, "input": "hello"})),
        )
        .await;
    [rest, kserve, openai]
}

/// Asserts each dialect refused with `status` in its own error shape.
fn refused(results: &[(u16, reqwest::header::HeaderMap, Value); 3], status: u16, code: &str) {
    let [rest, kserve, openai] = results;
    assert_eq!(rest.0, status, "REST: {}", rest.2);
    assert_eq!(rest.2["error"]["code"], code, "REST: {}", rest.2);
    assert!(rest.2["error"]["request_id"].is_string(), "{}", rest.2);
    assert_eq!(kserve.0, status, "KServe: {}", kserve.2);
    assert!(kserve.2["error"].is_string(), "KServe shape: {}", kserve.2);
    assert_eq!(openai.0, status, "OpenAI: {}", openai.2);
    assert!(
        openai.2["error"]["message"].is_string(),
        "OpenAI shape: {}",
        openai.2
    );
    assert!(
        openai.2["error"]["type"].is_string(),
        "OpenAI shape: {}",
        openai.2
    );
    for (s, h, _) in results {
        if *s == 401 {
            assert!(h.contains_key("www-authenticate"));
        }
        if *s == 429 {
            let after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(after >= 1);
        }
    }
}

/// Asserts each dialect got past access control (echo answers REST and KServe; the
/// embeddings endpoint refuses echo as a model that takes no strings: 400, not 401/403).
fn allowed(results: &[(u16, reqwest::header::HeaderMap, Value); 3]) {
    assert_eq!(results[0].0, 200, "REST: {}", results[0].2);
    assert_eq!(results[1].0, 200, "KServe: {}", results[1].2);
    assert_eq!(results[2].0, 400, "OpenAI: {}", results[2].2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_matrix() {
    let a = start().await;

    // Public probes need nothing.
    for path in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"] {
        let (s, _, b) = a.call(Method::GET, path, None, None).await;
        assert_eq!(s, 200, "{path}: {b}");
    }

    // No token, a malformed one, an unknown one: 401 everywhere.
    refused(&three(&a, None, "echo").await, 401, "UNAUTHENTICATED");
    refused(
        &three(&a, Some("nonsense"), "echo").await,
        401,
        "UNAUTHENTICATED",
    );
    let forged = format!("cht_0123456789abcdef_{}", "A".repeat(43));
    refused(
        &three(&a, Some(&forged), "echo").await,
        401,
        "UNAUTHENTICATED",
    );
    for (m, path) in [
        (Method::GET, "/api/v1/models"),
        (Method::GET, "/api/v1/tokens"),
        (Method::GET, "/v1/models"),
        (Method::GET, "/v2/models/echo"),
        (Method::GET, "/metrics"),
    ] {
        let (s, _, b) = a.call(m, path, None, None).await;
        assert_eq!(s, 401, "{path}: {b}");
    }

    // The admin token does everything.
    allowed(&three(&a, Some(&a.admin), "echo").await);
    let (s, _, b) = a
        .call(Method::GET, "/api/v1/tokens", Some(&a.admin), None)
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(!b.to_string().contains("key_hash") && !b.to_string().contains("secret"));

    // A user token limited to echo*.
    let (user_id, user) = a
        .create(json!({"name": "app", "role": "user", "allowed_models": ["ech*"]}))
        .await;
    allowed(&three(&a, Some(&user), "echo").await);
    refused(&three(&a, Some(&user), "mlp").await, 403, "FORBIDDEN");
    let (s, _, b) = a
        .call(Method::GET, "/api/v1/models", Some(&user), None)
        .await;
    assert_eq!(s, 200);
    let names: Vec<&str> = b["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["echo"], "a user sees only its models");
    let (s, _, b) = a.call(Method::GET, "/v1/models", Some(&user), None).await;
    assert_eq!((s, b["data"].as_array().map(Vec::len)), (200, Some(1)));
    let (s, _, _) = a
        .call(Method::GET, "/v2/models/mlp", Some(&user), None)
        .await;
    assert_eq!(s, 403);
    // Changes to different fields sent at once all land: none is overwritten by an
    // update made from an older copy of the token.
    let (pid, _) = a.create(json!({"name": "patched"})).await;
    let path = format!("/api/v1/tokens/{pid}");
    let changes = [
        json!({"rate_per_minute": 77}),
        json!({"monthly_quota": 99}),
        json!({"name": "renamed"}),
        json!({"allowed_models": ["x*"]}),
        json!({"ip_allow": ["10.1.0.0/16"]}),
        json!({"expires_in_s": 86400}),
    ];
    let patch = |i: usize| {
        a.call(
            Method::PATCH,
            &path,
            Some(&a.admin),
            Some(changes[i].clone()),
        )
    };
    let answers = tokio::join!(patch(0), patch(1), patch(2), patch(3), patch(4), patch(5));
    let answers = [
        answers.0, answers.1, answers.2, answers.3, answers.4, answers.5,
    ];
    for (s, _, b) in &answers {
        assert_eq!(*s, 200, "{b}");
    }
    let (s, _, t) = a.call(Method::GET, &path, Some(&a.admin), None).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["rate_per_minute"], 77, "{t}");
    assert_eq!(t["monthly_quota"], 99, "{t}");
    assert_eq!(t["name"], "renamed", "{t}");
    assert_eq!(t["allowed_models"], json!(["x*"]), "{t}");
    assert_eq!(t["ip_allow"], json!(["10.1.0.0/16"]), "{t}");
    assert!(t["expires_at_ms"].is_u64(), "{t}");

    // Model rules see the decoded name, as the handlers do: `ml%70` is `mlp`, which `*0`
    // does not allow, although the raw segment ends in 0.
    let (_, zero) = a
        .create(json!({"name": "zero", "role": "user", "allowed_models": ["*0"]}))
        .await;
    for path in [
        "/api/v1/models/ml%70/infer",
        "/v2/models/ml%70/infer",
        "/v2/models/ml%70/versions/1/infer",
    ] {
        let body = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]});
        let (s, _, b) = a.call(Method::POST, path, Some(&zero), Some(body)).await;
        assert_eq!(s, 403, "{path}: {b}");
    }
    let (s, _, b) = a
        .call(Method::GET, "/v2/models/ml%70", Some(&zero), None)
        .await;
    assert_eq!(s, 403, "{b}");
    // Admin endpoints refuse a user token.
    for (m, path, body) in [
        (Method::GET, "/api/v1/tokens", None),
        (Method::POST, "/api/v1/tokens", Some(json!({"name": "x"}))),
        (Method::GET, "/api/v1/audit", None),
        (
            Method::POST,
            "/api/v1/models/echo/scale",
            Some(json!({"replicas": 2})),
        ),
        (Method::POST, "/v2/repository/models/echo/unload", None),
        (Method::GET, "/api/v1/cluster", None),
        (Method::GET, "/api/v1/health/detailed", None),
        (Method::GET, "/api/v1/requests", None),
        (Method::DELETE, "/api/v1/models/echo", None),
    ] {
        let (s, _, b) = a.call(m, path, Some(&user), body).await;
        assert_eq!(s, 403, "{path}: {b}");
    }

    // Client addresses: 127.0.0.1 is not in 10.0.0.0/8.
    let (_, far) = a
        .create(json!({"name": "far", "ip_allow": ["10.0.0.0/8"]}))
        .await;
    refused(&three(&a, Some(&far), "echo").await, 403, "FORBIDDEN");
    let (_, near) = a
        .create(json!({"name": "near", "ip_allow": ["127.0.0.0/8", "::1"]}))
        .await;
    allowed(&three(&a, Some(&near), "echo").await);

    // Rate limit: 3 a minute; the three dialects share the bucket.
    let (_, limited) = a
        .create(json!({"name": "slow", "rate_per_minute": 3}))
        .await;
    allowed(&three(&a, Some(&limited), "echo").await);
    refused(
        &three(&a, Some(&limited), "echo").await,
        429,
        "RATE_LIMITED",
    );

    // Quota: 4 a month.
    let (quota_id, quota) = a
        .create(json!({"name": "metered", "monthly_quota": 4}))
        .await;
    allowed(&three(&a, Some(&quota), "echo").await);
    let (s, _, _) = a
        .call(
            Method::POST,
            "/api/v1/models/echo/infer",
            Some(&quota),
            Some(json!({"inputs": {"x": [[1.0]]}})),
        )
        .await;
    assert_eq!(s, 200);
    refused(&three(&a, Some(&quota), "echo").await, 429, "RATE_LIMITED");
    // The count reaches the replicated state.
    let used = || async {
        let (_, _, b) = a
            .call(
                Method::GET,
                &format!("/api/v1/tokens/{quota_id}"),
                Some(&a.admin),
                None,
            )
            .await;
        b["used_this_month"] == json!(4)
    };
    assert!(
        eventually(Duration::from_secs(10), used).await,
        "usage recorded"
    );

    // Expired.
    let (exp_id, expired) = a.create(json!({"name": "old", "expires_at_ms": 1})).await;
    refused(&three(&a, Some(&expired), "echo").await, 403, "FORBIDDEN");
    let (_, _, b) = a
        .call(
            Method::GET,
            &format!("/api/v1/tokens/{exp_id}"),
            Some(&a.admin),
            None,
        )
        .await;
    assert_eq!(b["status"], "expired");

    // Paused, then active again.
    let path = format!("/api/v1/tokens/{user_id}");
    let (s, _, b) = a
        .call(
            Method::PATCH,
            &path,
            Some(&a.admin),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("paused")), "{b}");
    refused(&three(&a, Some(&user), "echo").await, 403, "FORBIDDEN");
    let (s, _, _) = a
        .call(
            Method::PATCH,
            &path,
            Some(&a.admin),
            Some(json!({"status": "active", "allowed_models": ["*"]})),
        )
        .await;
    assert_eq!(s, 200);
    // mlp takes 64 floats: past access control, each request itself is wrong (400).
    for (s, _, b) in three(&a, Some(&user), "mlp").await {
        assert_eq!(s, 400, "{b}");
    }

    // Revoked: 401 for good; a revoked token cannot be changed back.
    let (s, headers, _) = a.call(Method::DELETE, &path, Some(&a.admin), None).await;
    assert_eq!(s, 200);
    let revoke_request = headers["x-request-id"].to_str().unwrap().to_string();
    refused(
        &three(&a, Some(&user), "echo").await,
        401,
        "UNAUTHENTICATED",
    );
    let (s, _, _) = a
        .call(
            Method::PATCH,
            &path,
            Some(&a.admin),
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(s, 400);

    // Bad token bodies are typed 400s.
    for body in [
        json!({}),
        json!({"name": "x", "role": "root"}),
        json!({"name": "x", "ip_allow": ["300.0.0.0/8"]}),
        json!({"name": "x", "allowed_models": ["a/b"]}),
        json!({"name": "x", "rate_per_minute": 0}),
        json!({"name": "x", "unknown": 1}),
    ] {
        let (s, _, b) = a
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(&a.admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, 400, "{body}: {b}");
        assert_eq!(b["error"]["code"], "INVALID_INPUT");
    }

    // The audit log: who, what, which request.
    let (s, _, b) = a
        .call(
            Method::POST,
            "/api/v1/models/echo/scale",
            Some(&a.admin),
            Some(json!({"replicas": 2})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = a
        .call(
            Method::GET,
            "/api/v1/audit?limit=1000",
            Some(&a.admin),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let entries = b["entries"].as_array().expect("entries");
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "token.create",
        "token.pause",
        "token.resume",
        "token.revoke",
        "model.scale",
    ] {
        assert!(actions.contains(&want), "{want} in {actions:?}");
    }
    let admin_id = &a.admin[4..20];
    let revoke = entries
        .iter()
        .find(|e| e["action"] == "token.revoke")
        .expect("revoke entry");
    assert_eq!(revoke["who"], admin_id);
    assert_eq!(revoke["target"], user_id.as_str());
    assert_eq!(revoke["request_id"], revoke_request.as_str());
    assert_eq!(revoke["client_ip"], "127.0.0.1");
    let (_, _, b) = a
        .call(
            Method::GET,
            "/api/v1/audit?action=model",
            Some(&a.admin),
            None,
        )
        .await;
    assert!(b["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["action"].as_str().unwrap().starts_with("model.")));

    // Usage survives a restart: the quota is still spent.
    let Authed {
        node,
        dir,
        admin,
        http,
        ..
    } = a;
    node.expect("running").shutdown().await;
    let (node, url) = start_node(&dir).await;
    let a = Authed {
        node: Some(node),
        url,
        http,
        dir,
        admin,
    };
    let (_, _, b) = a
        .call(
            Method::GET,
            &format!("/api/v1/tokens/{quota_id}"),
            Some(&a.admin),
            None,
        )
        .await;
    assert_eq!(b["used_this_month"], 4, "{b}");
    refused(&three(&a, Some(&quota), "echo").await, 429, "RATE_LIMITED");
    // No second admin token was made.
    let (_, _, b) = a
        .call(Method::GET, "/api/v1/tokens", Some(&a.admin), None)
        .await;
    let admins = b["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "admin")
        .count();
    assert_eq!(admins, 1);
    if let Some(n) = a.node {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_off_on_loopback_lets_everyone_in_as_local() {
    let n = common::start(vec![]).await;
    let (s, b) = n.get("/api/v1/tokens").await;
    assert_eq!(s, 200, "{b}");
    // The bootstrap admin token is made anyway, so auth can be turned on later.
    let file = n.dir.path().join("admin-token");
    assert!(
        eventually(Duration::from_secs(20), || {
            let f = file.clone();
            async move { f.exists() }
        })
        .await
    );
    let (s, _, b) = n
        .post("/api/v1/models/echo/scale", &json!({"replicas": 2}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, b) = n.get("/api/v1/audit?action=model.scale").await;
    assert_eq!(b["entries"][0]["who"], "local", "{b}");
}

/// `/v1/embeddings` names its model in the body: a token that may not use that model gets
/// 403 every time, and the refusal costs it nothing (no rate-limit or quota charge), as
/// for the routes with the model in the path. A wrong method is not charged either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_the_token_may_not_use_costs_nothing_on_the_embeddings_route() {
    let a = start().await;
    let (id, token) = a
        .create(
            json!({"name": "narrow", "role": "user", "allowed_models": ["ech*"],
                       "monthly_quota": 1, "rate_per_minute": 1}),
        )
        .await;
    for _ in 0..3 {
        let (s, _, b) = a
            .call(
                Method::POST,
                "/v1/embeddings",
                Some(&token),
                Some(json!({"model": "tinybert", "input": "hello"})),
            )
            .await;
        assert_eq!(s, 403, "{b}");
        assert_eq!(b["error"]["param"], "model", "{b}");
        let (s, _, b) = a
            .call(Method::GET, "/v1/embeddings", Some(&token), None)
            .await;
        assert_eq!(s, 405, "{b}");
    }
    // The one request of its quota and rate is still there, for a model it may use.
    let (s, _, b) = a
        .call(
            Method::POST,
            "/api/v1/models/echo/infer",
            Some(&token),
            Some(json!({"inputs": {"x": [[1.0]]}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // And that one is spent: the next embeddings request for an allowed model is 429.
    let (s, _, b) = a
        .call(
            Method::POST,
            "/v1/embeddings",
            Some(&token),
            Some(json!({"model": "echo", "input": "hello"})),
        )
        .await;
    assert_eq!(s, 429, "{b}");
    let used = || async {
        let (_, _, b) = a
            .call(
                Method::GET,
                &format!("/api/v1/tokens/{id}"),
                Some(&a.admin),
                None,
            )
            .await;
        b["used_this_month"] == json!(1)
    };
    assert!(
        eventually(Duration::from_secs(10), used).await,
        "only the allowed request was counted"
    );
    if let Some(n) = a.node {
        n.shutdown().await;
    }
}
