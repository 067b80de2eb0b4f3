//! The first admin token of a new cluster.
//!
//! The node that bootstraps a cluster (no `--join`) makes one admin token when the
//! replicated state holds no token at all, and writes its secret to
//! `auth.admin_token_file` (default `<data-dir>/admin-token`, mode 0600). The file is
//! written before the token is proposed and moved into place once it is committed, so a
//! secret is never committed without a copy on disk. Later starts find a token in the
//! state and only say where the file is.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_cluster::{AuditMeta, ClusterHandle, Command, TokenRecord, TokenRole};

const WAIT: Duration = Duration::from_secs(60);

/// Makes the first admin token if the cluster has none; logs where it is.
pub async fn admin_token(cluster: ClusterHandle, path: PathBuf) {
    match make_admin_token(&cluster, &path).await {
        Ok(true) => tracing::info!(
            file = %path.display(),
            "wrote the cluster's first admin token (mode 0600): send it as `Authorization: Bearer <token>`"
        ),
        Ok(false) if path.exists() => {
            tracing::info!(file = %path.display(), "the first admin token is in this file")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot make the first admin token")
        }
    }
}

async fn make_admin_token(cluster: &ClusterHandle, path: &Path) -> Result<bool, String> {
    // A linearizable read first: the state this node has applied is then the cluster's.
    cluster
        .view(true, WAIT)
        .await
        .map_err(|e| format!("the cluster did not answer: {e}"))?;
    if !cluster.tokens().is_empty() {
        return Ok(false);
    }
    let minted = cluster
        .token_key()
        .mint()
        .map_err(|e| format!("no randomness: {e}"))?;
    let tmp = path.with_extension("tmp");
    write_private(&tmp, &format!("{}\n", minted.secret))
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let now = cohort_cluster::raft_actor::now_ms();
    let record = TokenRecord::new(
        &minted,
        "bootstrap-admin",
        TokenRole::Admin,
        now,
        "bootstrap",
    );
    let meta = AuditMeta {
        who: "bootstrap".into(),
        action: "token.create".into(),
        target: minted.id,
        request_id: String::new(),
        client_ip: String::new(),
        detail: r#"{"name":"bootstrap-admin","role":"admin"}"#.into(),
    };
    let committed = cluster
        .propose_audited(Command::UpsertToken(record), meta, WAIT)
        .await;
    if let Err(e) = committed {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("the token was not committed: {e}"));
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {}: {e}", tmp.display()))?;
    Ok(true)
}

/// Writes `text` to a new file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        // The mode above applies only to a file created now.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
