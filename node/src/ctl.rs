//! `cohort ctl`: administer a running cluster over any node's HTTP API.
//!
//! Readable tables by default; `--json` prints the API's JSON for scripts.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::bench::encode_path_segment as encode;

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
    /// API token to send (`Authorization: Bearer`); admin commands need an admin token.
    /// Precedence: --token, then --token-file, then the COHORT_TOKEN and COHORT_TOKEN_FILE
    /// environment variables (in that order); a flag always beats the environment.
    #[arg(
        long,
        value_name = "TOKEN",
        global = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the API token, such as the `admin-token` a new cluster writes into its
    /// data dir. Beats COHORT_TOKEN and COHORT_TOKEN_FILE from the environment.
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
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
    /// API tokens (admin only).
    Token {
        #[command(subcommand)]
        what: TokenCmd,
    },
    /// The audit log of admin actions, newest first (admin only).
    Audit {
        /// Only this action, or a family of them (`token`, `model.scale`).
        #[arg(long)]
        action: Option<String>,
        /// Only actions by this token id.
        #[arg(long)]
        who: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// The settings of a token that `create` and `update` share.
#[derive(clap::Args, Debug, Default)]
struct TokenFields {
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// `user` (inference, reading its models) or `admin` (everything).
    #[arg(long, value_parser = ["user", "admin"])]
    role: Option<String>,
    /// A model the token may use, as a glob (`bert-*`); repeat for more. None: all.
    #[arg(long = "model", value_name = "GLOB")]
    models: Vec<String>,
    /// An address or CIDR the token may come from; repeat for more. None: any.
    #[arg(long = "ip", value_name = "CIDR")]
    ips: Vec<String>,
    /// Requests a minute, on each node.
    #[arg(long, value_name = "N")]
    rate: Option<u32>,
    /// Requests a calendar month (UTC), across the cluster.
    #[arg(long, value_name = "N")]
    quota: Option<u64>,
    /// Expires after this long (`30d`, `12h`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
}

#[derive(clap::Subcommand, Debug)]
enum TokenCmd {
    /// Create a token and print its secret (shown this once).
    Create {
        #[command(flatten)]
        fields: TokenFields,
    },
    /// List the tokens.
    List,
    /// Show one token.
    Show {
        /// The token's id.
        id: String,
    },
    /// Change a token: only the settings given change.
    Update {
        /// The token's id.
        id: String,
        #[command(flatten)]
        fields: TokenFields,
        /// Allow every model again.
        #[arg(long, conflicts_with = "models")]
        all_models: bool,
        /// Allow every address again.
        #[arg(long, conflicts_with = "ips")]
        any_ip: bool,
        /// Remove the rate limit.
        #[arg(long, conflicts_with = "rate")]
        no_rate: bool,
        /// Remove the monthly quota.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
        /// Never expire.
        #[arg(long, conflicts_with = "expires_in")]
        no_expiry: bool,
        /// Refuse the token until it is resumed.
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Accept a paused token again.
        #[arg(long)]
        resume: bool,
    },
    /// Revoke a token for good.
    Revoke {
        /// The token's id.
        id: String,
    },
}

impl TokenFields {
    fn body(&self) -> serde_json::Map<String, Value> {
        let mut b = serde_json::Map::new();
        if let Some(v) = &self.name {
            b.insert("name".into(), json!(v));
        }
        if let Some(v) = &self.role {
            b.insert("role".into(), json!(v));
        }
        if !self.models.is_empty() {
            b.insert("allowed_models".into(), json!(self.models));
        }
        if !self.ips.is_empty() {
            b.insert("ip_allow".into(), json!(self.ips));
        }
        if let Some(v) = self.rate {
            b.insert("rate_per_minute".into(), json!(v));
        }
        if let Some(v) = self.quota {
            b.insert("monthly_quota".into(), json!(v));
        }
        if let Some(v) = self.expires_in {
            b.insert("expires_in_s".into(), json!(v.as_secs().max(1)));
        }
        b
    }
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

/// An HTTP client that sends the token.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = res.status();
        let body = res
            .bytes()
            .await
            .with_context(|| format!("cannot read the answer of {url} ({status})"))?;
        answer(&url, status, &body, self.token.is_some())
    }
}

/// How much of a body that is not JSON an error quotes.
const BODY_PREFIX_CHARS: usize = 200;

/// Decides what a reply means: the status first, then the body. An error status gives an
/// error naming it, with the API's error message when the body is JSON, else the start of
/// the body. A success with an empty body (204) is an empty object.
fn answer(
    url: &str,
    status: reqwest::StatusCode,
    body: &[u8],
    have_token: bool,
) -> anyhow::Result<Value> {
    let empty = body.iter().all(u8::is_ascii_whitespace);
    let parsed = if empty {
        None
    } else {
        serde_json::from_slice::<Value>(body).ok()
    };
    if !status.is_success() {
        let detail = match &parsed {
            Some(v) => error_message(v),
            None if empty => "(empty body)".to_string(),
            None => format!("(not JSON) {}", body_prefix(body)),
        };
        if status == reqwest::StatusCode::UNAUTHORIZED && !have_token {
            bail!("{status}: {detail} (give --token or --token-file)");
        }
        bail!("{status}: {detail}");
    }
    match parsed {
        Some(v) => Ok(v),
        None if empty => Ok(Value::Object(serde_json::Map::new())),
        None => bail!(
            "{url} answered {status} but not JSON: {}",
            body_prefix(body)
        ),
    }
}

/// The start of a body, as text on one line.
fn body_prefix(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(BODY_PREFIX_CHARS)
        .collect();
    if out.chars().count() == BODY_PREFIX_CHARS {
        out.push('…');
    }
    out
}

/// Where the token comes from.
#[derive(Debug, PartialEq, Eq)]
enum TokenSource {
    Literal(String),
    File(std::path::PathBuf),
}

/// The token's source, by precedence: `--token`, `--token-file`, then `COHORT_TOKEN` and
/// `COHORT_TOKEN_FILE` (given here as `env_token` and `env_file`). Flags beat the
/// environment; an empty variable counts as unset.
fn token_source(
    token: Option<&str>,
    token_file: Option<&std::path::Path>,
    env_token: Option<std::ffi::OsString>,
    env_file: Option<std::ffi::OsString>,
) -> anyhow::Result<Option<TokenSource>> {
    if let Some(t) = token {
        return Ok(Some(TokenSource::Literal(t.to_string())));
    }
    if let Some(p) = token_file {
        return Ok(Some(TokenSource::File(p.to_path_buf())));
    }
    if let Some(t) = env_token.filter(|t| !t.is_empty()) {
        let t = t
            .into_string()
            .map_err(|_| anyhow::anyhow!("COHORT_TOKEN is not valid UTF-8"))?;
        return Ok(Some(TokenSource::Literal(t)));
    }
    Ok(env_file
        .filter(|p| !p.is_empty())
        .map(|p| TokenSource::File(p.into())))
}

fn token_of(args: &CtlArgs) -> anyhow::Result<Option<String>> {
    let source = token_source(
        args.token.as_deref(),
        args.token_file.as_deref(),
        std::env::var_os("COHORT_TOKEN"),
        std::env::var_os("COHORT_TOKEN_FILE"),
    )?;
    match source {
        None => Ok(None),
        Some(TokenSource::Literal(t)) => Ok(Some(t.trim().to_string())),
        Some(TokenSource::File(path)) => {
            let t = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            Ok(Some(t.trim().to_string()))
        }
    }
}

/// Runs `cohort ctl`.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let api = Api {
        http,
        base: args.url.trim_end_matches('/').to_string(),
        token: token_of(&args)?,
    };
    use reqwest::Method;
    match args.command {
        CtlCommand::Cluster {
            what: ClusterCmd::Status,
        } => {
            let v = api
                .send(Method::GET, "/api/v1/cluster?consistent=true", None)
                .await?;
            if args.json {
                println!("{v}");
            } else {
                print!("{}", status_table(&v));
            }
        }
        CtlCommand::Node {
            what: NodeCmd::List,
        } => {
            let v = api.send(Method::GET, "/api/v1/cluster", None).await?;
            if args.json {
                println!("{}", v["nodes"]);
            } else {
                print!("{}", nodes_table(&v));
            }
        }
        CtlCommand::Node {
            what: NodeCmd::Remove { id },
        } => {
            let v = api
                .send(Method::DELETE, &format!("/api/v1/cluster/nodes/{id}"), None)
                .await?;
            if args.json {
                println!("{v}");
            } else {
                println!("node {id} removed (log index {})", v["index"]);
            }
        }
        CtlCommand::Token { what } => token(&api, what, args.json).await?,
        CtlCommand::Audit { action, who, limit } => {
            let mut q = format!("/api/v1/audit?limit={limit}");
            if let Some(a) = action {
                q.push_str(&format!("&action={}", encode(&a)));
            }
            if let Some(w) = who {
                q.push_str(&format!("&who={}", encode(&w)));
            }
            let v = api.send(Method::GET, &q, None).await?;
            if args.json {
                println!("{v}");
            } else {
                print!("{}", audit_table(&v));
            }
        }
    }
    Ok(())
}

async fn token(api: &Api, cmd: TokenCmd, json_out: bool) -> anyhow::Result<()> {
    use reqwest::Method;
    let v = match cmd {
        TokenCmd::Create { fields } => {
            if fields.name.is_none() {
                bail!("a token needs a --name");
            }
            let v = api
                .send(
                    Method::POST,
                    "/api/v1/tokens",
                    Some(Value::Object(fields.body())),
                )
                .await?;
            if !json_out {
                println!(
                    "token {} created; its secret (shown only now):",
                    text(&v["id"])
                );
                println!("{}", text(&v["secret"]));
                return Ok(());
            }
            v
        }
        TokenCmd::List => {
            let v = api.send(Method::GET, "/api/v1/tokens", None).await?;
            if !json_out {
                print!("{}", tokens_table(&v["tokens"]));
                return Ok(());
            }
            v
        }
        TokenCmd::Show { id } => {
            api.send(
                Method::GET,
                &format!("/api/v1/tokens/{}", encode(&id)),
                None,
            )
            .await?
        }
        TokenCmd::Update {
            id,
            fields,
            all_models,
            any_ip,
            no_rate,
            no_quota,
            no_expiry,
            pause,
            resume,
        } => {
            let mut b = fields.body();
            if all_models {
                b.insert("allowed_models".into(), json!([]));
            }
            if any_ip {
                b.insert("ip_allow".into(), json!([]));
            }
            if no_rate {
                b.insert("rate_per_minute".into(), Value::Null);
            }
            if no_quota {
                b.insert("monthly_quota".into(), Value::Null);
            }
            if no_expiry {
                b.insert("expires_at_ms".into(), Value::Null);
            }
            if pause {
                b.insert("status".into(), json!("paused"));
            }
            if resume {
                b.insert("status".into(), json!("active"));
            }
            if b.is_empty() {
                bail!("nothing to change: give at least one setting");
            }
            api.send(
                Method::PATCH,
                &format!("/api/v1/tokens/{}", encode(&id)),
                Some(Value::Object(b)),
            )
            .await?
        }
        TokenCmd::Revoke { id } => {
            api.send(
                Method::DELETE,
                &format!("/api/v1/tokens/{}", encode(&id)),
                None,
            )
            .await?
        }
    };
    if json_out {
        println!("{v}");
    } else {
        print!("{}", tokens_table(&json!([v])));
    }
    Ok(())
}

fn tokens_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    let models = t["allowed_models"]
                        .as_array()
                        .filter(|a| !a.is_empty())
                        .map_or("*".to_string(), |a| {
                            a.iter().map(text).collect::<Vec<_>>().join(",")
                        });
                    let quota = match t["monthly_quota"].as_u64() {
                        Some(q) => format!("{}/{q}", text(&t["used_this_month"])),
                        None => format!("{}/-", text(&t["used_this_month"])),
                    };
                    vec![
                        text(&t["id"]),
                        text(&t["name"]),
                        text(&t["role"]),
                        text(&t["status"]),
                        models,
                        text(&t["rate_per_minute"]),
                        quota,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID",
            "NAME",
            "ROLE",
            "STATUS",
            "MODELS",
            "RATE/MIN",
            "USED/QUOTA",
        ],
        &rows,
    )
}

fn audit_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["entries"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    vec![
                        text(&e["seq"]),
                        when(&e["at_ms"]),
                        text(&e["who"]),
                        text(&e["action"]),
                        text(&e["target"]),
                        text(&e["outcome"]),
                        text(&e["request_id"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "SEQ", "WHEN", "WHO", "ACTION", "TARGET", "OUTCOME", "REQUEST",
        ],
        &rows,
    )
}

/// An audit entry's `at_ms` as an RFC 3339 time, or the raw milliseconds when it cannot
/// be one (humantime formats years up to 9999 only).
fn when(at_ms: &Value) -> String {
    use std::fmt::Write as _;
    let Some(ms) = at_ms.as_u64() else {
        return text(at_ms);
    };
    let Some(t) = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)) else {
        return ms.to_string();
    };
    let mut out = String::new();
    match write!(out, "{}", humantime::format_rfc3339_seconds(t)) {
        Ok(()) => out,
        Err(_) => ms.to_string(),
    }
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

    #[test]
    fn token_tables_show_limits_and_usage() {
        let t = tokens_table(&json!([
            {"id": "ab", "name": "app", "role": "user", "status": "active", "allowed_models": ["bert-*", "mlp"], "rate_per_minute": 60, "monthly_quota": 1000, "used_this_month": 7},
            {"id": "cd", "name": "ops", "role": "admin", "status": "paused", "allowed_models": [], "rate_per_minute": null, "monthly_quota": null, "used_this_month": 0}
        ]));
        assert!(t.contains("bert-*,mlp"), "{t}");
        assert!(t.contains("7/1000"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("paused"), "{t}");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    #[test]
    fn a_token_file_flag_beats_a_token_from_the_environment() {
        use std::ffi::OsString;
        use std::path::Path;
        let cli = <Cli as clap::Parser>::try_parse_from([
            "ctl",
            "--token-file",
            "/run/admin-token",
            "cluster",
            "status",
        ])
        .unwrap();
        let got = token_source(
            cli.ctl.token.as_deref(),
            cli.ctl.token_file.as_deref(),
            Some(OsString::from("from-env")),
            Some(OsString::from("/env/file")),
        )
        .unwrap();
        assert_eq!(got, Some(TokenSource::File("/run/admin-token".into())));
        // --token beats everything; the environment only fills in for missing flags.
        let env = || Some(OsString::from("from-env"));
        assert_eq!(
            token_source(Some("flag"), None, env(), None).unwrap(),
            Some(TokenSource::Literal("flag".into()))
        );
        assert_eq!(
            token_source(None, None, env(), Some(OsString::from("/env/file"))).unwrap(),
            Some(TokenSource::Literal("from-env".into()))
        );
        assert_eq!(
            token_source(None, None, Some(OsString::new()), Some("/f".into())).unwrap(),
            Some(TokenSource::File("/f".into()))
        );
        assert_eq!(token_source(None, None, None, None).unwrap(), None);
        let bad = std::os::unix::ffi::OsStringExt::from_vec(vec![0xff]);
        let err = token_source(None, None, Some(bad), None).unwrap_err();
        assert!(err.to_string().contains("COHORT_TOKEN"), "{err}");
        assert!(token_source(None, Some(Path::new("/f")), None, None).is_ok());
        // Both flags on the command line is a mistake.
        let both = <Cli as clap::Parser>::try_parse_from([
            "ctl",
            "--token",
            "t",
            "--token-file",
            "f",
            "token",
            "list",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn the_status_is_checked_before_the_body_is_parsed() {
        use reqwest::StatusCode;
        let url = "http://n1";
        let html = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n";
        let e = answer(url, StatusCode::BAD_GATEWAY, html, true).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("502 Bad Gateway"), "{e}");
        assert!(e.contains("<html><body><h1>502"), "{e}");
        let e = answer(url, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, b"", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("431") && e.contains("empty body"), "{e}");
        let e = answer(
            url,
            StatusCode::NOT_FOUND,
            br#"{"error": {"message": "no token ab"}}"#,
            true,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "404 Not Found: no token ab");
        let e = answer(url, StatusCode::UNAUTHORIZED, b"", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("401") && e.contains("--token-file"), "{e}");
        // Success: an empty body (204) is an empty object; JSON is returned; anything else
        // is an error that names the status.
        assert_eq!(
            answer(url, StatusCode::NO_CONTENT, b"", true).unwrap(),
            json!({})
        );
        assert_eq!(
            answer(url, StatusCode::OK, br#"{"index": 3}"#, true).unwrap(),
            json!({"index": 3})
        );
        let e = answer(url, StatusCode::OK, b"ok", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("200 OK") && e.contains("ok"), "{e}");
        // Long bodies are cut.
        let long = vec![b'x'; 10_000];
        let e = answer(url, StatusCode::BAD_GATEWAY, &long, true)
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{e}");
    }

    #[test]
    fn audit_times_past_year_9999_print_as_milliseconds() {
        assert_eq!(when(&json!(0)), "1970-01-01T00:00:00Z");
        assert_eq!(when(&json!(253_402_300_799_000u64)), "9999-12-31T23:59:59Z");
        assert_eq!(when(&json!(253_402_300_800_000u64)), "253402300800000");
        assert_eq!(when(&json!(u64::MAX)), u64::MAX.to_string());
        assert_eq!(when(&Value::Null), "-");
        let t = audit_table(&json!({"entries": [
            {"seq": 1, "at_ms": 253_402_300_800_000u64, "who": "ab", "action": "token.create"},
            {"seq": 2, "at_ms": u64::MAX, "who": "ab", "action": "token.revoke"},
            {"seq": 3, "at_ms": u64::MAX - 1, "who": "ab", "action": "token.revoke"}
        ]}));
        assert!(t.contains("253402300800000"), "{t}");
        assert!(t.contains(&u64::MAX.to_string()), "{t}");
        assert_eq!(t.lines().count(), 4, "{t}");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("model.scale"), "model.scale");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }

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
