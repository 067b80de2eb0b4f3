//! `cohort ctl`: administer a running cluster over any node's HTTP API.
//!
//! Readable tables by default; `--json` prints the API's JSON for scripts.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// `cohort ctl` arguments.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Base URL of any node of the cluster.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080",
        env = "COHORT_URL"
    )]
    url: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// The cluster: id, Raft leader, term, commit and applied indexes.
    Cluster {
        #[command(subcommand)]
        what: ClusterCmd,
    },
    /// Cluster members.
    Node {
        #[command(subcommand)]
        what: NodeCmd,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCmd {
    /// Show the cluster's status (answered through the leader: linearizable).
    Status,
}

#[derive(clap::Subcommand, Debug)]
enum NodeCmd {
    /// List the members.
    List,
    /// Remove a member from the cluster (by its id).
    Remove {
        /// The member's id, as `node list` shows it.
        id: u64,
    },
}

/// Runs `cohort ctl`.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let base = args.url.trim_end_matches('/');
    match args.command {
        CtlCommand::Cluster {
            what: ClusterCmd::Status,
        } => {
            let v = get(&http, &format!("{base}/api/v1/cluster?consistent=true")).await?;
            if args.json {
                println!("{v}");
            } else {
                print!("{}", status_table(&v));
            }
        }
        CtlCommand::Node {
            what: NodeCmd::List,
        } => {
            let v = get(&http, &format!("{base}/api/v1/cluster")).await?;
            if args.json {
                println!("{}", v["nodes"]);
            } else {
                print!("{}", nodes_table(&v));
            }
        }
        CtlCommand::Node {
            what: NodeCmd::Remove { id },
        } => {
            let res = http
                .delete(format!("{base}/api/v1/cluster/nodes/{id}"))
                .send()
                .await
                .with_context(|| format!("cannot reach {base}"))?;
            let status = res.status();
            let v: Value = res.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("{status}: {}", error_message(&v));
            }
            if args.json {
                println!("{v}");
            } else {
                println!("node {id} removed (log index {})", v["index"]);
            }
        }
    }
    Ok(())
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let res = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = res.status();
    let v: Value = res
        .json()
        .await
        .with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        bail!("{status}: {}", error_message(&v));
    }
    Ok(v)
}

fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn status_table(v: &Value) -> String {
    let r = &v["raft"];
    let leader = r["leader_id"].as_u64().unwrap_or(0);
    let leader_name = v["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["id"].as_u64() == Some(leader)))
        .map(|n| text(&n["name"]))
        .unwrap_or_else(|| "-".into());
    let up = v["nodes"]
        .as_array()
        .map(|ns| ns.iter().filter(|n| n["status"] == "up").count())
        .unwrap_or(0);
    let total = v["nodes"].as_array().map_or(0, Vec::len);
    let rows = vec![
        vec!["cluster".into(), text(&v["cluster_id"])],
        vec!["leader".into(), format!("{leader_name} ({leader})")],
        vec!["term".into(), text(&r["term"])],
        vec!["commit index".into(), text(&r["commit_index"])],
        vec!["applied index".into(), text(&r["applied_index"])],
        vec!["snapshot index".into(), text(&r["snapshot_index"])],
        vec!["nodes up".into(), format!("{up} of {total}")],
    ];
    table(&["FIELD", "VALUE"], &rows)
}

fn nodes_table(v: &Value) -> String {
    let leader = v["raft"]["leader_id"].as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    let mut role = text(&n["role"]);
                    if n["id"].as_u64() == Some(leader) {
                        role.push_str(" (leader)");
                    }
                    vec![
                        text(&n["id"]),
                        text(&n["name"]),
                        text(&n["status"]),
                        role,
                        text(&n["cluster_addr"]),
                        text(&n["http_addr"]),
                        text(&n["last_seen_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "ROLE",
            "CLUSTER",
            "HTTP",
            "SEEN_MS_AGO",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "cluster_id": "c1",
            "nodes": [
                {"id": 7, "name": "n1", "status": "up", "role": "voter", "cluster_addr": "127.0.0.1:7101", "http_addr": "127.0.0.1:8081", "last_seen_ms": 0},
                {"id": 9, "name": "n2", "status": "down", "role": "learner", "cluster_addr": "127.0.0.1:7102", "http_addr": "127.0.0.1:8082", "last_seen_ms": 6000}
            ],
            "raft": {"leader_id": 7, "term": 3, "commit_index": 42, "applied_index": 42, "snapshot_index": 0}
        })
    }

    #[test]
    fn status_names_the_leader_and_counts_nodes_up() {
        let t = status_table(&sample());
        assert!(t.contains("n1 (7)"), "{t}");
        assert!(t.contains("1 of 2"), "{t}");
        assert!(t.contains("42"), "{t}");
    }

    #[test]
    fn node_list_marks_the_leader_and_aligns_columns() {
        let t = nodes_table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("voter (leader)"));
        assert!(lines[2].contains("down"));
        let col = lines[0].find("NAME").unwrap();
        assert_eq!(&lines[1][col..col + 2], "n1");
    }
}
