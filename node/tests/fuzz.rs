//! A bounded fuzz run of schemathesis against `/openapi.json` on a real node with auth
//! on: no 5xx for a client's mistake, no crash, no hang.
//!
//! Two passes, each deterministic and bounded (examples per operation, a timeout per
//! request, a deadline for the whole run): with an admin token over every operation
//! except those that change this node's replicas or membership (scaling `echo` to zero
//! would make later inference answer 503 NO_REPLICA, a correct answer that the check
//! counts as a server error); then with a user token over every operation, replica
//! changes included (refused with 403). The check is `not_a_server_error` but for a 504
//! TIMEOUT answering a sub-second `timeout_ms` (node/tests/fuzz_checks.py).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const RUN_DEADLINE: Duration = Duration::from_secs(300);

fn schemathesis(url: &str, token: &str, extra: &[&str]) {
    let check = Command::new("schemathesis").arg("--version").output();
    if !check.is_ok_and(|o| o.status.success()) {
        panic!("schemathesis is needed: run `pip install -r scripts/requirements-test.txt`");
    }
    let mut child = Command::new("schemathesis")
        .args(["run", &format!("{url}/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        // not_a_server_error, but a 504 TIMEOUT for a sub-second `timeout_ms` is the
        // promised answer, not a failure: see fuzz_checks.py.
        .args(["--checks", "no_server_error_but_short_deadlines"])
        .args(["--max-examples", "25"])
        .args(["--request-timeout", "10"])
        .arg("--generation-deterministic")
        .args(["--workers", "1"])
        .args(extra)
        .env(
            "SCHEMATHESIS_HOOKS",
            common::workspace().join("node/tests/fuzz_checks.py"),
        )
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("schemathesis runs");
    let started = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            panic!("schemathesis did not finish within {RUN_DEADLINE:?}: a hang?");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let n = common::start_with(vec![], |cfg| {
        cfg.auth.mode = cohort_config::AuthMode::On;
    })
    .await;
    let file = n.dir.path().join("admin-token");
    let f = file.clone();
    assert!(
        common::eventually(Duration::from_secs(20), || {
            let f = f.clone();
            async move { f.exists() }
        })
        .await
    );
    let admin = std::fs::read_to_string(&file)
        .expect("admin token")
        .trim()
        .to_string();
    let res = n
        .http
        .post(format!("{}/api/v1/tokens", n.url))
        .bearer_auth(&admin)
        .json(&json!({"name": "fuzz-user", "allowed_models": ["echo"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 201);
    let user: Value = res.json().await.expect("json");
    let user = user["secret"].as_str().expect("secret").to_string();

    let url = n.url.clone();
    tokio::task::spawn_blocking(move || {
        schemathesis(
            &url,
            &admin,
            &[
                "--exclude-path-regex",
                "/(scale|unload|preload)$|^/api/v1/cluster/nodes",
                "--exclude-name",
                "DELETE /api/v1/models/{model}",
            ],
        );
        schemathesis(&url, &user, &[]);
    })
    .await
    .expect("fuzz runs");

    // The node is still healthy and serving.
    let (s, _) = n.get("/healthz").await;
    assert_eq!(s, 200);
}
