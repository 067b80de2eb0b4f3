//! The sandbox's own mechanics, with `/bin/sh` standing in for `cohort`: argument building,
//! the cookie, logs, signals, restart, and cleanup on drop. No Cohort binary needed.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_chaos::{ClusterSandbox, SandboxError};

const SH: &str = "/bin/sh";
const QUICK: Duration = Duration::from_secs(10);
const SIGTERM: i32 = 15;

fn sh_sandbox(n: usize) -> ClusterSandbox {
    ClusterSandbox::new(PathBuf::from(SH), n).expect("sandbox")
}

/// A shell that says hello on both streams, then sleeps (as the same pid) until killed.
fn start_sleeper(cluster: &ClusterSandbox, i: usize) {
    cluster
        .start_with(
            i,
            ["-c", "echo hello out; echo hello err >&2; exec sleep 1000"],
        )
        .expect("started");
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn args_of(cluster: &ClusterSandbox, i: usize) -> Vec<String> {
    cluster
        .node_args(i)
        .into_iter()
        .map(|a| a.into_string().expect("utf-8 arg"))
        .collect()
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

#[test]
fn a_missing_binary_is_reported_with_how_to_build_it() {
    let err =
        ClusterSandbox::new(PathBuf::from("/nonexistent/cohort"), 1).expect_err("no binary there");
    assert!(matches!(err, SandboxError::BinaryNotFound { .. }));
    let message = err.to_string();
    assert!(
        message.contains("cargo build -p cohort --bin cohort") && message.contains("COHORT_BIN"),
        "{message}"
    );
}

#[test]
fn nodes_get_names_distinct_ports_dirs_and_a_private_cookie() {
    let cluster = sh_sandbox(3);
    let mut ports = Vec::new();
    for i in 0..3 {
        let spec = cluster.spec(i);
        assert_eq!(spec.name, format!("n{}", i + 1));
        assert!(spec.cluster_addr.ip().is_loopback() && spec.http_addr.ip().is_loopback());
        ports.extend([spec.cluster_addr.port(), spec.http_addr.port()]);
        assert!(spec.data_dir.is_dir() && spec.data_dir.starts_with(cluster.root()));
        assert!(spec.log_path.starts_with(cluster.root()));
        assert!(!spec.log_path.starts_with(&spec.data_dir));
        assert_eq!(cluster.http_url(i), format!("http://{}", spec.http_addr));
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 6, "six distinct ports");
    let meta = std::fs::metadata(cluster.cookie_file()).expect("cookie file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.len() >= 32);
}

#[test]
fn node_0_bootstraps_and_the_others_join_it_with_the_cookie_in_a_file() {
    let cluster = sh_sandbox(3);
    let cookie = std::fs::read_to_string(cluster.cookie_file()).expect("cookie");
    let cookie_path = cluster.cookie_file().to_str().expect("utf-8 path");
    let seed = cluster.spec(0).cluster_addr.to_string();
    for i in 0..3 {
        let args = args_of(&cluster, i);
        let spec = cluster.spec(i);
        assert_eq!(args[0], "node");
        assert_eq!(value_of(&args, "--name"), Some(spec.name.as_str()));
        assert_eq!(
            value_of(&args, "--cluster-addr"),
            Some(spec.cluster_addr.to_string().as_str())
        );
        assert_eq!(
            value_of(&args, "--http-addr"),
            Some(spec.http_addr.to_string().as_str())
        );
        assert_eq!(
            value_of(&args, "--data-dir").map(Path::new),
            Some(spec.data_dir.as_path())
        );
        assert_eq!(value_of(&args, "--cookie-file"), Some(cookie_path));
        assert!(
            args.iter().all(|a| !a.contains(cookie.trim())),
            "the cookie itself is never on the command line: {args:?}"
        );
        let join = value_of(&args, "--join");
        if i == 0 {
            assert_eq!(join, None, "n1 bootstraps: {args:?}");
        } else {
            assert_eq!(join, Some(seed.as_str()), "n{} joins n1", i + 1);
        }
    }
    // A second cookie for a node that must be refused differs from the cluster's.
    let wrong = cluster.write_cookie_file("wrong-cookie").expect("cookie");
    assert_ne!(std::fs::read_to_string(wrong).expect("read"), cookie);
}

#[test]
fn extra_args_go_last() {
    let mut cluster = sh_sandbox(2);
    cluster.spec_mut(1).extra_args = vec!["--log-format".into(), "json".into()];
    let args = args_of(&cluster, 1);
    assert_eq!(&args[args.len() - 2..], ["--log-format", "json"]);
}

#[tokio::test]
async fn logs_capture_both_streams_and_the_harness_markers() {
    let cluster = sh_sandbox(1);
    assert_eq!(cluster.logs(0), "", "no log before the first start");
    start_sleeper(&cluster, 0);
    cluster
        .wait_log(0, "hello err", QUICK)
        .await
        .expect("stderr");
    cluster
        .wait_log(0, "hello out", QUICK)
        .await
        .expect("stdout");
    assert!(cluster.logs(0).contains("cohort-chaos"), "marker line");
    let tail = cluster.log_tail(0, 2);
    assert!(tail.lines().all(|l| l.starts_with("hello ")), "{tail}");
    // The marker repeats the arguments; only the node's own lines count.
    assert!(!cluster.log_contains(0, "exec sleep"));
}

#[tokio::test]
async fn stop_cont_kill_restart_terminate() {
    let cluster = sh_sandbox(2);
    start_sleeper(&cluster, 0);
    let pid = cluster.pid(0).expect("running");
    assert!(matches!(
        cluster.start_with(0, ["-c", "true"]),
        Err(SandboxError::AlreadyRunning { .. })
    ));

    cluster.stop(0).expect("stop");
    assert!(cluster.is_running(0) && cluster.is_stopped(0) && !cluster.is_live(0));
    assert_eq!(proc_state(pid), Some('T'));
    cluster.cont(0).expect("cont");
    assert!(cluster.is_live(0));
    assert_ne!(proc_state(pid), Some('T'));

    cluster.kill(0).expect("kill");
    assert!(!cluster.is_running(0));
    assert_eq!(cluster.exit_status(0).and_then(|s| s.signal()), Some(9));
    assert_eq!(proc_state(pid), None, "reaped, not a zombie");
    assert!(matches!(
        cluster.kill(0),
        Err(SandboxError::NotRunning { .. })
    ));
    assert!(matches!(
        cluster.stop(0),
        Err(SandboxError::NotRunning { .. })
    ));

    cluster.restart(0).expect("restart");
    let second = cluster.pid(0).expect("running again");
    assert_ne!(second, pid);
    assert!(cluster.logs(0).contains("start #2"));
    assert_eq!(cluster.exit_status(0), None, "running");

    // Restarting a running node kills it first.
    cluster.restart(0).expect("crash restart");
    assert_ne!(cluster.pid(0), Some(second));
    assert_eq!(proc_state(second), None);

    // SIGTERM reaches a stopped process too (it is continued).
    cluster.stop(0).expect("stop");
    let status = cluster.terminate(0, QUICK).await.expect("exits");
    assert_eq!(status.signal(), Some(SIGTERM));

    assert!(matches!(
        cluster.restart(1),
        Err(SandboxError::NeverStarted { .. })
    ));
}

#[tokio::test]
async fn terminate_reports_a_process_that_ignores_sigterm() {
    let cluster = sh_sandbox(1);
    cluster
        .start_with(
            0,
            // An ignored signal stays ignored across exec.
            ["-c", "trap '' TERM; echo trapped; exec sleep 1000"],
        )
        .expect("started");
    cluster
        .wait_log(0, "trapped", QUICK)
        .await
        .expect("trap set");
    let err = cluster
        .terminate(0, Duration::from_millis(300))
        .await
        .expect_err("it ignores SIGTERM");
    assert!(err.is_timeout(), "{err}");
    assert!(
        cluster.is_running(0),
        "left running for the sandbox to kill"
    );
}

#[tokio::test]
async fn waiting_for_a_node_that_exits_reports_its_status_and_log() {
    let cluster = sh_sandbox(1);
    cluster
        .start_with(0, ["-c", "echo 'error: cannot bind'; exit 3"])
        .expect("started");
    let err = cluster
        .wait_http_ready(0, QUICK)
        .await
        .expect_err("never ready");
    match &err {
        SandboxError::Exited {
            status, log_tail, ..
        } => {
            assert_eq!(status.code(), Some(3));
            assert!(log_tail.contains("cannot bind"), "{log_tail}");
        }
        other => panic!("expected Exited, got {other}"),
    }
    // And a node that never started is reported as such.
    let never = sh_sandbox(1);
    assert!(matches!(
        never.wait_http_ready(0, QUICK).await,
        Err(SandboxError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn no_leader_without_live_nodes() {
    let cluster = sh_sandbox(2);
    assert_eq!(cluster.wait_leader(Duration::from_millis(200)).await, None);
}

#[test]
fn dropping_the_sandbox_kills_and_reaps_everything() {
    let cluster = sh_sandbox(3);
    start_sleeper(&cluster, 0);
    start_sleeper(&cluster, 1);
    cluster.stop(1).expect("stop");
    let pids: Vec<u32> = [0, 1].map(|i| cluster.pid(i).expect("running")).to_vec();
    let root = cluster.root().to_path_buf();
    drop(cluster);
    for pid in pids {
        assert_eq!(proc_state(pid), None, "pid {pid} is gone");
    }
    assert!(!root.exists(), "the sandbox directory is removed");
}

#[test]
fn a_sandbox_can_be_shared_between_tasks() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<ClusterSandbox>();
}
