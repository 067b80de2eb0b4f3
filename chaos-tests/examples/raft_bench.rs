//! Raft benchmarks on real `cohort node` processes on loopback (use a release build):
//!
//! ```text
//! cargo build --release -p cohort
//! COHORT_BIN=target/release/cohort cargo run --release -p cohort-chaos --example raft_bench -- failover 10
//! COHORT_BIN=target/release/cohort cargo run --release -p cohort-chaos --example raft_bench -- throughput 10s 64
//! COHORT_BIN=target/release/cohort cargo run --release -p cohort-chaos --example raft_bench -- restart 100000
//! ```
//!
//! - `failover RUNS`: a fresh 3-node cluster per run; SIGKILL the leader; time until the two
//!   survivors agree on a new leader (polled every 5 ms); then check that every write
//!   acknowledged before the kill is still there. Prints each sample and the median.
//! - `throughput DURATION CONCURRENCY`: `cohort bench` posting model registrations (each a
//!   Raft entry, flushed to sled on a quorum before the 200/201) to the leader: commits/s
//!   with p50/p99 latency.
//! - `restart ENTRIES`: write ENTRIES entries (with snapshots every 10,000), SIGKILL a
//!   follower, restart it, and time until its applied index reaches the leader's commit
//!   index.

use std::time::{Duration, Instant};

use cohort_chaos::{cohort_bin, wait_until, ClusterSandbox};
use serde_json::{json, Value};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

async fn three_nodes() -> Result<ClusterSandbox> {
    let cluster = ClusterSandbox::new(cohort_bin(), 3)?;
    cluster.start(0)?;
    cluster.wait_http_ready(0, Duration::from_secs(60)).await?;
    cluster.start(1)?;
    cluster.start(2)?;
    for i in 1..3 {
        cluster.wait_http_ready(i, Duration::from_secs(60)).await?;
    }
    let c = &cluster;
    let formed = wait_until(Duration::from_secs(30), || async move {
        c.cluster_status(0)
            .await
            .map(|s| s["raft"]["voters"].as_array().map_or(0, Vec::len) == 3)
            .unwrap_or(false)
    })
    .await;
    if !formed {
        return Err("the cluster did not form".into());
    }
    Ok(cluster)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

async fn failover(runs: usize) -> Result<()> {
    let mut samples = Vec::new();
    for run in 0..runs {
        let cluster = three_nodes().await?;
        let (leader, old) = cluster
            .wait_leader(Duration::from_secs(30))
            .await
            .ok_or("no leader")?;
        let mut written = Vec::new();
        for k in 0..20 {
            let name = format!("r{run}w{k}");
            let r = cluster
                .post(
                    k % 3,
                    "/api/v1/models",
                    &json!({"name": name, "engine": "echo"}),
                )
                .await?;
            if r.status == 201 || r.status == 200 {
                written.push(name);
            }
        }
        cluster.kill(leader)?;
        let killed = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let mut elected = None;
        while killed.elapsed() < Duration::from_secs(30) {
            let mut ids = Vec::new();
            for &i in &survivors {
                let s = cluster.get(i, "/api/v1/cluster").await;
                if let Ok(r) = s {
                    ids.push(r.body["raft"]["leader_id"].as_u64().unwrap_or(0));
                }
            }
            if ids.len() == 2 && ids[0] == ids[1] && ids[0] != 0 && ids[0] != old {
                elected = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = elected.ok_or("no new leader within 30 s")?;
        let status = cluster
            .get_json(survivors[0], "/api/v1/cluster?consistent=true")
            .await?;
        let models: Vec<&str> = status["models"]
            .as_array()
            .map(|m| m.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let lost: Vec<&String> = written
            .iter()
            .filter(|w| !models.contains(&w.as_str()))
            .collect();
        println!(
            "{}",
            json!({"run": run, "new_leader_ms": took.as_secs_f64() * 1000.0, "acknowledged": written.len(), "lost": lost.len()})
        );
        if !lost.is_empty() {
            return Err(format!("acknowledged writes lost: {lost:?}").into());
        }
        samples.push(took.as_secs_f64() * 1000.0);
    }
    println!(
        "{}",
        json!({"failover_runs": samples.len(), "median_new_leader_ms": median(samples.clone()), "samples_ms": samples})
    );
    Ok(())
}

async fn leader_of(cluster: &ClusterSandbox) -> Result<usize> {
    Ok(cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .ok_or("no leader")?
        .0)
}

fn bench(cluster: &ClusterSandbox, i: usize, duration: &str, concurrency: &str) -> Result<Value> {
    let body = cluster.root().join("register.json");
    std::fs::write(&body, r#"{"name": "bench-model", "engine": "echo"}"#)?;
    let out = std::process::Command::new(cluster.binary())
        .args(["bench", "--url", &cluster.http_url(i), "--model", "unused"])
        .args(["--path", "/api/v1/models", "--body"])
        .arg(&body)
        .args([
            "--duration",
            duration,
            "--concurrency",
            concurrency,
            "--warmup",
            "1s",
            "--json",
        ])
        .output()?;
    if !out.status.success() {
        return Err(format!("bench failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn throughput(duration: &str, concurrency: &str) -> Result<()> {
    let cluster = three_nodes().await?;
    let leader = leader_of(&cluster).await?;
    let report = bench(&cluster, leader, duration, concurrency)?;
    let follower = (leader + 1) % 3;
    let via_follower = bench(&cluster, follower, "5s", concurrency)?;
    let s = cluster.cluster_status(leader).await?;
    println!(
        "{}",
        json!({
            "commits_per_second": report["requests_per_second"],
            "latency_us": report["latency_us"],
            "errors": report["errors"],
            "through_a_follower": {
                "commits_per_second": via_follower["requests_per_second"],
                "latency_us": via_follower["latency_us"],
            },
            "commit_index": s["raft"]["commit_index"],
        })
    );
    Ok(())
}

async fn restart(entries: u64) -> Result<()> {
    let cluster = three_nodes().await?;
    let leader = leader_of(&cluster).await?;
    // Write until the log holds `entries` applied entries.
    loop {
        let s = cluster.cluster_status(leader).await?;
        let applied = s["raft"]["applied_index"].as_u64().unwrap_or(0);
        if applied >= entries {
            break;
        }
        let left = entries - applied;
        let secs = (left / 3000).clamp(2, 60);
        bench(&cluster, leader, &format!("{secs}s"), "64")?;
    }
    let follower = (leader + 1) % 3;
    cluster.kill(follower)?;
    let s = cluster.cluster_status(leader).await?;
    let target = s["raft"]["commit_index"].as_u64().unwrap_or(0);
    let snapshot = s["raft"]["snapshot_index"].as_u64().unwrap_or(0);
    let started = Instant::now();
    cluster.restart(follower)?;
    let mut ready_ms = None;
    let mut synced = None;
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = cluster.get(follower, "/api/v1/cluster").await {
            if ready_ms.is_none() && r.status == 200 {
                ready_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            }
            if r.body["raft"]["applied_index"].as_u64().unwrap_or(0) >= target {
                synced = Some(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{}",
        json!({"applied_entries": target, "leader_snapshot_index": snapshot, "answering_after_ms": ready_ms, "in_sync_after_ms": synced})
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("failover") => failover(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10)).await,
        Some("throughput") => {
            let d = args.get(1).map_or("10s", String::as_str);
            let c = args.get(2).map_or("64", String::as_str);
            throughput(d, c).await
        }
        Some("restart") => {
            restart(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000)).await
        }
        _ => Err(
            "usage: raft_bench failover RUNS | throughput DURATION CONCURRENCY | restart ENTRIES"
                .into(),
        ),
    }
}
