//! The sandbox against the real binary as it is today: two single-node `cohort up`
//! processes on the sandbox's ports and data dirs, driven through SIGSTOP/SIGCONT, SIGKILL,
//! restart and SIGTERM.
//!
//! Needs a built binary: `cargo build -p cohort --bin cohort`, then `COHORT_BIN` pointing at
//! it unless it is `<workspace>/target/debug/cohort`.

use std::time::Duration;

use cohort_chaos::{cohort_bin, wait_until, ClusterSandbox};

const READY: Duration = Duration::from_secs(60);
const HEALTHY: u16 = 200;

fn sandbox(n: usize) -> ClusterSandbox {
    ClusterSandbox::new(cohort_bin(), n).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts node `i` as `cohort up --name n{i+1} --http-addr <its port> --data-dir <its dir>`.
fn start_up(cluster: &ClusterSandbox, i: usize) {
    let args = cluster.spec(i).up_args();
    cluster
        .start_with(i, args)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_up_nodes_survive_stop_cont_kill_restart_and_terminate() {
    let cluster = sandbox(2);
    for i in 0..2 {
        start_up(&cluster, i);
    }
    for i in 0..2 {
        cluster
            .wait_http_ready(i, READY)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let line = format!("Cohort is serving on {}", cluster.http_url(i));
        cluster
            .wait_log(i, &line, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let model = cluster.spec(0).data_dir.join("models/mlp.safetensors");
    let weights = std::fs::read(&model).expect("n1 wrote its demo model");

    // SIGSTOP: n1 accepts connections but answers nothing; n2 is unaffected.
    cluster.stop(0).expect("stop n1");
    assert!(cluster.is_running(0) && cluster.is_stopped(0));
    let err = cluster
        .get_status(0, "/healthz", Duration::from_millis(300))
        .await
        .expect_err("a stopped node does not answer");
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    let other = cluster
        .get_status(1, "/healthz", Duration::from_secs(5))
        .await;
    assert_eq!(other.expect("n2 answers"), HEALTHY);

    // SIGCONT: n1 answers again.
    cluster.cont(0).expect("cont n1");
    assert!(!cluster.is_stopped(0));
    let back = wait_until(Duration::from_secs(10), || async {
        matches!(
            cluster
                .get_status(0, "/healthz", Duration::from_millis(500))
                .await,
            Ok(HEALTHY)
        )
    })
    .await;
    assert!(back, "n1 answers /healthz after SIGCONT");

    // SIGKILL: gone at once, and its port is closed.
    let old_pid = cluster.pid(0).expect("n1 runs");
    cluster.kill(0).expect("kill n1");
    assert!(!cluster.is_running(0));
    assert_eq!(cluster.pid(0), None);
    let killed = cluster.exit_status(0).expect("n1 was reaped");
    assert!(!killed.success(), "{killed}");
    let refused = cluster
        .get_status(0, "/healthz", Duration::from_secs(2))
        .await;
    assert!(refused.is_err(), "a killed node does not answer");

    // Restart: same arguments, so same port and data dir; the demo model is still there.
    cluster.restart(0).expect("restart n1");
    assert_ne!(cluster.pid(0), Some(old_pid));
    cluster
        .wait_http_ready(0, READY)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        std::fs::read(&model).expect("the demo model survives a restart"),
        weights
    );
    let models = cluster.get_json(0, "/api/v1/models").await.expect("models");
    assert!(models.to_string().contains("\"mlp\""), "{models}");
    // /readyz may answer before the startup line is printed: wait for the second one.
    let second_start = wait_until(Duration::from_secs(10), || async {
        cluster.logs(0).matches("Cohort is serving on").count() == 2
    })
    .await;
    assert!(
        second_start,
        "one startup line per run:\n{}",
        cluster.logs(0)
    );

    // SIGTERM: a graceful exit with status 0, for both nodes.
    for i in 0..2 {
        let status = cluster
            .terminate(i, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.code(), Some(0), "n{} exited with {status}", i + 1);
        assert!(!cluster.is_running(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_reports_its_exit_and_log() {
    let cluster = sandbox(1);
    cluster
        .start_with(0, ["up", "--no-such-flag"])
        .expect("spawned");
    let err = cluster
        .wait_http_ready(0, READY)
        .await
        .expect_err("it exits instead of becoming ready");
    let message = err.to_string();
    assert!(
        matches!(err, cohort_chaos::SandboxError::Exited { .. }),
        "{message}"
    );
    assert!(message.contains("--no-such-flag"), "{message}");
    assert_eq!(cluster.exit_status(0).and_then(|s| s.code()), Some(2));
}
