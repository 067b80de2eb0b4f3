//! Tests of the `cohort` binary as a user runs it: `cohort up` in its own process, a
//! config file, SIGTERM with a request in flight, and `cohort bench --json` against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cohort");

/// A `cohort up` process; killed if the test fails before it stops it, and its log
/// printed then.
struct UpProcess {
    child: Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            eprintln!("--- cohort up log ---\n{log}");
        }
    }
}

/// Starts `cohort up` with `args` and waits (with a deadline) for the line with its URL.
fn cohort_up(args: &[&str]) -> UpProcess {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = Command::new(BIN)
        .arg("up")
        .args(["--http-addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("log file"))
        .spawn()
        .expect("cohort starts");
    let stdout = child.stdout.take();
    let mut up = UpProcess {
        child,
        url: String::new(),
        log,
    };
    let stdout = stdout.expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading to the end, so the node never writes into a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("cohort up prints its URL in time");
        if let Some(url) = line.strip_prefix("Cohort is serving on ") {
            up.url = url.trim().to_string();
            return up;
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[[models]]\nname = \"slow\"\nengine = \"sleep\"\n[models.options]\nsleep_ms = 400\n",
    )
    .expect("config written");
    let data = dir.path().join("data");
    let mut up = cohort_up(&[
        "--config",
        config.to_str().expect("utf-8 path"),
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ]);
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("{}/readyz", up.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    assert!(
        data.join("models/mlp.safetensors").exists(),
        "demo model written"
    );

    let url = format!("{}/api/v1/models/slow/infer", up.url);
    let client = http.clone();
    let in_flight = tokio::spawn(async move {
        let res = client
            .post(url)
            .json(&json!({"inputs": {"x": [[4.0, 2.0]]}}))
            .send()
            .await
            .expect("sent");
        (
            res.status().as_u16(),
            res.json::<Value>().await.expect("json"),
        )
    });
    // Wait until the request is running, then send SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m: Value = http
            .get(format!("{}/api/v1/models/slow", up.url))
            .send()
            .await
            .expect("model")
            .json()
            .await
            .expect("json");
        if m["replicas"][0]["in_flight"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = up.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());

    let (status, body) = in_flight.await.expect("task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"]["y"], json!([[4.0, 2.0]]));
    let exit = wait_exit(&mut up.child, Duration::from_secs(20)).expect("exits in time");
    assert!(exit.success(), "exit status {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_json_reports_a_closed_loop_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up = cohort_up(&["--data-dir", dir.path().to_str().expect("utf-8 path")]);
    let out = tokio::task::spawn_blocking({
        let url = up.url.clone();
        move || {
            Command::new(BIN)
                .args([
                    "bench",
                    "--url",
                    &url,
                    "--model",
                    "mlp",
                    "--concurrency",
                    "4",
                ])
                .args(["--duration", "1s", "--warmup", "200ms", "--json"])
                .output()
                .expect("bench runs")
        }
    })
    .await
    .expect("task");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        report["requests_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{report}"
    );
    assert!(report["ok"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(report["errors"], json!({}));
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["latency_us"][p].as_u64().is_some_and(|v| v > 0),
            "{p}"
        );
    }
    // Unknown model: a clear error, non-zero exit.
    let out = Command::new(BIN)
        .args([
            "bench",
            "--url",
            &up.url,
            "--model",
            "nope",
            "--duration",
            "1s",
        ])
        .output()
        .expect("bench runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn bad_config_is_reported_with_every_field_and_no_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "node_name = \"\"\n[[models]]\nname = \"s\"\nengine = \"sleep\"\n[models.batching]\nmax_batch_size = 0\n",
    )
    .expect("config written");
    let out = Command::new(BIN)
        .args([
            "up",
            "--config",
            config.to_str().expect("utf-8"),
            "--check-config",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "node_name",
        "models[0].batching.max_batch_size",
        "models[0].options.sleep_ms",
    ] {
        assert!(err.contains(field), "missing {field} in {err}");
    }
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN)
        .args(["up", "--help"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--http-addr",
        "--data-dir",
        "--config",
        "--log-format",
        "COHORT_HTTP_ADDR",
    ] {
        assert!(text.contains(flag), "missing {flag} in {text}");
    }
    let out = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--url",
        "--model",
        "--concurrency",
        "--duration",
        "--body",
        "--json",
    ] {
        assert!(text.contains(flag), "missing {flag} in {text}");
    }
}

/// Runs `cohort` with `args` and returns (success, stdout, stderr).
fn cohort(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_manages_tokens_and_bench_sends_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_str().expect("utf-8 path").to_string();
    let up = cohort_up(&["--data-dir", &data, "--auth", "on"]);
    let token_file = dir.path().join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token_file.exists() {
        assert!(Instant::now() < deadline, "the admin token file is written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin_file = token_file.to_str().expect("utf-8").to_string();
    let url = up.url.clone();
    tokio::task::spawn_blocking(move || {
        // Without a token: refused, and told what to give.
        let (ok, _, err) = cohort(&["ctl", "--url", &url, "token", "list"]);
        assert!(!ok);
        assert!(err.contains("401") && err.contains("--token"), "{err}");

        let (ok, out, err) = cohort(&[
            "ctl",
            "--url",
            &url,
            "--token-file",
            &admin_file,
            "--json",
            "token",
            "create",
            "--name",
            "app",
            "--role",
            "user",
            "--model",
            "ech*",
            "--rate",
            "1000000",
            "--quota",
            "100000",
            "--expires-in",
            "30d",
        ]);
        assert!(ok, "{err}");
        let created: Value = serde_json::from_str(&out).expect("json");
        let secret = created["secret"].as_str().expect("secret").to_string();
        let id = created["id"].as_str().expect("id").to_string();
        assert_eq!(created["allowed_models"], json!(["ech*"]));
        assert!(created["expires_at_ms"].as_u64().is_some());

        // The user token cannot list tokens, but can run a benchmark on echo.
        let (ok, _, err) = cohort(&["ctl", "--url", &url, "--token", &secret, "token", "list"]);
        assert!(!ok && err.contains("403"), "{err}");
        let (ok, out, err) = cohort(&[
            "bench",
            "--url",
            &url,
            "--model",
            "echo",
            "--token",
            &secret,
            "--concurrency",
            "2",
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--json",
        ]);
        assert!(ok, "{err}");
        let report: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(report["errors"], json!({}), "{report}");

        // Pause it, see it in the table, revoke it.
        let (ok, out, err) = cohort(&[
            "ctl",
            "--url",
            &url,
            "--token-file",
            &admin_file,
            "token",
            "update",
            &id,
            "--pause",
        ]);
        assert!(ok, "{err}");
        assert!(out.contains("paused"), "{out}");
        let (ok, out, err) = cohort(&[
            "ctl",
            "--url",
            &url,
            "--token-file",
            &admin_file,
            "token",
            "list",
        ]);
        assert!(ok, "{err}");
        assert!(
            out.contains("bootstrap-admin") && out.contains("app"),
            "{out}"
        );
        let (ok, _, err) = cohort(&[
            "ctl",
            "--url",
            &url,
            "--token-file",
            &admin_file,
            "token",
            "revoke",
            &id,
        ]);
        assert!(ok, "{err}");
        let (ok, out, err) = cohort(&[
            "ctl",
            "--url",
            &url,
            "--token-file",
            &admin_file,
            "audit",
            "--action",
            "token",
        ]);
        assert!(ok, "{err}");
        for action in ["token.create", "token.pause", "token.revoke"] {
            assert!(out.contains(action), "{action} in {out}");
        }
    })
    .await
    .expect("ctl steps");
}

#[test]
fn auth_off_beyond_loopback_is_refused_without_insecure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, _, err) = cohort(&[
        "up",
        "--http-addr",
        "0.0.0.0:0",
        "--auth",
        "off",
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "--check-config",
    ]);
    assert!(!ok);
    assert!(
        err.contains("auth.mode") && err.contains("--insecure"),
        "{err}"
    );
    let (ok, out, err) = cohort(&[
        "up",
        "--http-addr",
        "0.0.0.0:0",
        "--auth",
        "off",
        "--insecure",
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
        "--check-config",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("insecure = true"), "{out}");
}
