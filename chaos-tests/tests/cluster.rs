//! Multi-process cluster tests: real `cohort node` processes on loopback.
//!
//! One story: three nodes form a cluster; writes go to every node; the leader is killed
//! with SIGKILL and another is elected while writes continue; the killed node restarts
//! and catches up from its own sled log; a fourth node joins after the log was compacted
//! and is sent a snapshot; a node with the wrong cookie never joins; and at the end every
//! acknowledged write is on every node.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::time::Duration;

use cohort_chaos::{cohort_bin, wait_until, ClusterSandbox};
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(60);
const ELECTION: Duration = Duration::from_secs(20);

fn models_of(status: &Value) -> BTreeSet<String> {
    status["models"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Registers model `name` through node `i`; true when acknowledged (committed).
async fn write(cluster: &ClusterSandbox, i: usize, name: &str) -> bool {
    match cluster
        .post(
            i,
            "/api/v1/models",
            &json!({"name": name, "engine": "echo"}),
        )
        .await
    {
        Ok(r) => r.status == 201 || r.status == 200,
        Err(_) => false,
    }
}

async fn voters(cluster: &ClusterSandbox, i: usize) -> usize {
    match cluster.cluster_status(i).await {
        Ok(s) => s["raft"]["voters"].as_array().map_or(0, Vec::len),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_survives_its_leader_catches_up_and_refuses_strangers() {
    let mut cluster = ClusterSandbox::new(cohort_bin(), 5).expect("sandbox");
    let config = cluster.root().join("cluster.toml");
    std::fs::write(
        &config,
        "[cluster]\nsnapshot_threshold = 25\ndown_after_ms = 2000\njoin_timeout_ms = 4000\n",
    )
    .expect("config written");
    for i in 0..5 {
        cluster.spec_mut(i).extra_args = vec!["--config".into(), config.clone().into()];
    }

    // Three nodes form a cluster: n1 bootstraps, n2 and n3 join it and become voters.
    cluster.start(0).expect("n1 starts");
    cluster.wait_http_ready(0, READY).await.expect("n1 ready");
    cluster.start(1).expect("n2 starts");
    cluster.start(2).expect("n3 starts");
    for i in 1..3 {
        cluster.wait_http_ready(i, READY).await.expect("ready");
    }
    let c = &cluster;
    assert!(
        wait_until(ELECTION, || async move { voters(c, 0).await == 3 }).await,
        "three voters"
    );

    // Writes through every node (followers forward to the leader).
    let mut acknowledged = Vec::new();
    for k in 0..30 {
        let name = format!("w{k}");
        assert!(write(&cluster, k % 3, &name).await, "write {name}");
        acknowledged.push(name);
    }

    // Kill the leader: another is elected, and writes continue.
    let (leader, old_id) = cluster.wait_leader(ELECTION).await.expect("a leader");
    cluster.kill(leader).expect("kill -9");
    let (next, new_id) = cluster.wait_leader(ELECTION).await.expect("a new leader");
    assert_ne!(next, leader);
    assert_ne!(new_id, old_id);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for k in 30..45 {
        let name = format!("w{k}");
        let through = survivors[k % 2];
        let ok = wait_until(Duration::from_secs(10), || {
            let name = name.clone();
            async move { write(c, through, &name).await }
        })
        .await;
        assert!(ok, "write {name} after failover");
        acknowledged.push(name);
    }
    // The dead node is marked down.
    let dead_name = cluster.name(leader).to_string();
    let down = || {
        let dead_name = dead_name.clone();
        async move {
            let s = c.cluster_status(next).await.unwrap_or(Value::Null);
            s["nodes"].as_array().is_some_and(|ns| {
                ns.iter()
                    .any(|n| n["name"] == dead_name.as_str() && n["status"] == "down")
            })
        }
    };
    assert!(
        wait_until(Duration::from_secs(15), down).await,
        "the killed node is marked down"
    );

    // Restart it: it catches up from its own sled log (and the leader).
    cluster.restart(leader).expect("restart");
    cluster
        .wait_http_ready(leader, READY)
        .await
        .expect("ready again");
    let want: BTreeSet<String> = acknowledged.iter().cloned().collect();
    let caught_up = || {
        let want = want.clone();
        async move {
            let s = c.cluster_status(leader).await.unwrap_or(Value::Null);
            want.is_subset(&models_of(&s))
        }
    };
    assert!(
        wait_until(Duration::from_secs(20), caught_up).await,
        "the restarted node caught up"
    );

    // A fourth node joins after the log has been compacted: it is sent a snapshot.
    let s = cluster.cluster_status(next).await.expect("status");
    assert!(
        s["raft"]["first_index"].as_u64() > Some(2),
        "the log was compacted: {s}"
    );
    cluster.start(3).expect("n4 starts");
    cluster.wait_http_ready(3, READY).await.expect("n4 ready");
    let n4_in = || {
        let want = want.clone();
        async move {
            let s = c.cluster_status(3).await.unwrap_or(Value::Null);
            want.is_subset(&models_of(&s))
                && s["raft"]["voters"].as_array().map_or(0, Vec::len) == 4
        }
    };
    assert!(
        wait_until(Duration::from_secs(20), n4_in).await,
        "n4 is a voter with every write"
    );
    let s = cluster.cluster_status(3).await.expect("status");
    assert!(
        s["raft"]["snapshot_index"].as_u64() > Some(1),
        "n4 started from a snapshot: {s}"
    );

    // A node with the wrong cookie is refused, says so, and never joins.
    let wrong = cluster.write_cookie_file("wrong-cookie").expect("cookie");
    let mut args = cluster.node_args(4);
    if let Some(pos) = args.iter().position(|a| a == "--cookie-file") {
        args[pos + 1] = OsString::from(wrong.as_os_str());
    }
    cluster.start_with(4, args).expect("n5 starts");
    let exited = wait_until(Duration::from_secs(30), || async { !c.is_running(4) }).await;
    assert!(exited, "n5 gives up");
    assert!(!cluster.exit_status(4).is_some_and(|s| s.success()));
    assert!(
        cluster.log_contains(4, "wrong cookie"),
        "{}",
        cluster.log_tail(4, 20)
    );
    let s = cluster.cluster_status(0).await.expect("status");
    let names: Vec<&str> = s["nodes"]
        .as_array()
        .map(|ns| ns.iter().filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(!names.contains(&"n5"), "{names:?}");

    // Every acknowledged write is on every node, read through the leader.
    for i in 0..4 {
        let s = cluster
            .get_json(i, "/api/v1/cluster?consistent=true")
            .await
            .expect("consistent status");
        let have = models_of(&s);
        assert!(
            want.is_subset(&have),
            "node {i} lacks {:?}",
            want.difference(&have).collect::<Vec<_>>()
        );
    }
}
