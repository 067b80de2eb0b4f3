//! API tokens across a cluster of real `cohort node` processes with auth on: a token made
//! through one node works on every node; usage counted on every node adds up to one
//! monthly quota; a revocation reaches every node; a restarted node still knows the
//! tokens and the usage (from its own sled log).

use std::ffi::OsString;
use std::time::Duration;

use cohort_chaos::{cohort_bin, wait_until, ClusterSandbox};
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(60);
const SPREAD: Duration = Duration::from_secs(20);

struct Api {
    http: reqwest::Client,
    urls: Vec<String>,
}

impl Api {
    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.urls[i]))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                (status, res.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn infer(&self, i: usize, token: &str) -> u16 {
        self.call(
            i,
            reqwest::Method::POST,
            "/api/v1/models/echo/infer",
            token,
            Some(json!({"inputs": {"x": [[1.0]]}})),
        )
        .await
        .0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reach_every_node_and_quotas_add_up_across_nodes() {
    let mut cluster = ClusterSandbox::new(cohort_bin(), 3).expect("sandbox");
    let config = cluster.root().join("auth.toml");
    std::fs::write(
        &config,
        "[auth]\nmode = \"on\"\nusage_flush_ms = 100\n[cluster]\njoin_timeout_ms = 10000\n",
    )
    .expect("config written");
    for i in 0..3 {
        cluster.spec_mut(i).extra_args = vec![OsString::from("--config"), config.clone().into()];
    }
    cluster.start(0).expect("n1 starts");
    cluster.wait_http_ready(0, READY).await.expect("n1 ready");
    let admin_file = cluster.spec(0).data_dir.join("admin-token");
    let f = admin_file.clone();
    assert!(
        wait_until(SPREAD, || {
            let f = f.clone();
            async move { f.exists() }
        })
        .await,
        "the bootstrap node writes the first admin token"
    );
    let admin = std::fs::read_to_string(&admin_file)
        .expect("admin token")
        .trim()
        .to_string();
    // Joining nodes make no admin token of their own.
    cluster.start(1).expect("n2 starts");
    cluster.start(2).expect("n3 starts");
    for i in 1..3 {
        cluster.wait_http_ready(i, READY).await.expect("ready");
        assert!(!cluster.spec(i).data_dir.join("admin-token").exists());
    }
    let api = Api {
        http: reqwest::Client::new(),
        urls: (0..3).map(|i| cluster.http_url(i)).collect(),
    };
    let a = &api;
    let admin_ref = admin.as_str();
    assert!(
        wait_until(SPREAD, || async move {
            let (s, v) = a
                .call(2, reqwest::Method::GET, "/api/v1/cluster", admin_ref, None)
                .await;
            s == 200 && v["raft"]["voters"].as_array().map_or(0, Vec::len) == 3
        })
        .await,
        "three voters, and the admin token works on a node that joined"
    );

    // A token made through a follower, with a quota of 3 a month.
    let (s, created) = api
        .call(
            1,
            reqwest::Method::POST,
            "/api/v1/tokens",
            &admin,
            Some(json!({"name": "metered", "allowed_models": ["echo"], "monthly_quota": 3})),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let secret = created["secret"].as_str().expect("secret").to_string();
    let id = created["id"].as_str().expect("id").to_string();

    // It works on every node: one request each, which spends the quota.
    for i in 0..3 {
        let secret = secret.as_str();
        assert!(
            wait_until(SPREAD, || async move { a.infer(i, secret).await == 200 }).await,
            "the token works on node {i}"
        );
    }
    // The three nodes' counts add up in the replicated state...
    let path = format!("/api/v1/tokens/{id}");
    let p = path.as_str();
    assert!(
        wait_until(SPREAD, || async move {
            let (_, v) = a.call(2, reqwest::Method::GET, p, admin_ref, None).await;
            v["used_this_month"] == 3
        })
        .await,
        "usage from three nodes adds up"
    );
    // ...and every node now refuses the token: the quota is cluster-wide.
    for i in 0..3 {
        assert_eq!(api.infer(i, &secret).await, 429, "node {i}");
    }

    // A second token, revoked through node 3, is refused everywhere.
    let (_, second) = api
        .call(
            0,
            reqwest::Method::POST,
            "/api/v1/tokens",
            &admin,
            Some(json!({"name": "short-lived"})),
        )
        .await;
    let second_secret = second["secret"].as_str().expect("secret").to_string();
    let second_id = second["id"].as_str().expect("id").to_string();
    let ss = second_secret.as_str();
    assert!(wait_until(SPREAD, || async move { a.infer(1, ss).await == 200 }).await);
    let (s, _) = api
        .call(
            2,
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{second_id}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(s, 200);
    for i in 0..3 {
        assert!(
            wait_until(SPREAD, || async move { a.infer(i, ss).await == 401 }).await,
            "revoked on node {i}"
        );
    }

    // A node killed and restarted still knows both tokens and the usage.
    cluster.kill(2).expect("kill -9");
    cluster.restart(2).expect("restart");
    cluster
        .wait_http_ready(2, READY)
        .await
        .expect("ready again");
    let metered = secret.as_str();
    assert!(
        wait_until(SPREAD, || async move { a.infer(2, metered).await == 429 }).await,
        "the quota is still spent after a restart"
    );
    assert_eq!(api.infer(2, &second_secret).await, 401);
    let (_, v) = api.call(2, reqwest::Method::GET, &path, &admin, None).await;
    assert_eq!(v["used_this_month"], 3, "{v}");
    // The audit log, read on any node, has both token changes with who made them.
    let (_, v) = api
        .call(
            1,
            reqwest::Method::GET,
            "/api/v1/audit?action=token",
            &admin,
            None,
        )
        .await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .map(|e| e.iter().filter_map(|x| x["action"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        actions.contains(&"token.revoke") && actions.contains(&"token.create"),
        "{v}"
    );
}
