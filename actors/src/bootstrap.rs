//! The first admin token of a new cluster.
//!
//! The node that bootstraps a cluster (no `--join`) makes one admin token when the
//! replicated state holds no token at all, and writes its secret to
//! `auth.admin_token_file` (default `<data-dir>/admin-token`, mode 0600). The file is
//! written before the token is proposed and moved into place once it is committed, so a
//! secret is never committed without a copy on disk. A proposal that fails is checked with
//! a linearizable read before its secret is deleted (a timed-out proposal can still
//! commit); if even that read fails, the file stays as `<file>.tmp` and the next start
//! moves it into place or deletes it. Later starts find a token in the state and only say
//! where the file is.

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
    let tmp = path.with_extension("tmp");
    if !cluster.tokens().is_empty() {
        // An earlier start may have left a secret whose proposal's outcome it never
        // learned; after the read above that outcome is final.
        let tokens = cluster.tokens();
        return Ok(settle_leftover(&tmp, path, |id| tokens.contains_key(id)));
    }
    let minted = cluster
        .token_key()
        .mint()
        .map_err(|e| format!("no randomness: {e}"))?;
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
    let id = minted.id.clone();
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
        // A proposal that timed out may still commit: deleting the only copy of its
        // secret then would leave an admin token no one holds. A linearizable read
        // settles it; if the cluster cannot answer, the file stays for the next start.
        if let Err(read) = cluster.view(true, WAIT).await {
            return Err(format!(
                "the token's proposal failed ({e}) and the cluster did not answer ({read}); \
                 its secret stays in {} and the next start keeps or removes it",
                tmp.display()
            ));
        }
        if !cluster.tokens().contains_key(&id) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("the token was not committed: {e}"));
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {}: {e}", tmp.display()))?;
    Ok(true)
}

/// Settles a secret file `tmp` left by a start that never learned whether its token was
/// committed: moved to `path` if the token exists (`committed(id)`) and `path` does not,
/// removed if the token does not exist. Returns whether it was moved.
fn settle_leftover(tmp: &Path, path: &Path, committed: impl Fn(&str) -> bool) -> bool {
    let Ok(text) = std::fs::read_to_string(tmp) else {
        return false;
    };
    let Some((id, _)) = cohort_cluster::tokens::parse_secret(text.trim()) else {
        tracing::warn!(file = %tmp.display(), "not a token secret; left as it is");
        return false;
    };
    if !committed(id) {
        let _ = std::fs::remove_file(tmp);
        return false;
    }
    if path.exists() {
        tracing::warn!(file = %tmp.display(), existing = %path.display(),
            "a committed admin token's secret is in this file; the token file already exists");
        return false;
    }
    std::fs::rename(tmp, path).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "cht_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn a_leftover_secret_is_kept_only_if_its_token_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (
            dir.path().join("admin-token.tmp"),
            dir.path().join("admin-token"),
        );
        // Committed: moved into place.
        write_private(&tmp, &format!("{SECRET}\n")).unwrap();
        assert!(settle_leftover(&tmp, &path, |id| id == "0123456789abcdef"));
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), SECRET);
        assert!(!tmp.exists());
        // Committed, but a token file is already there: nothing is overwritten.
        write_private(&tmp, SECRET).unwrap();
        assert!(!settle_leftover(&tmp, &path, |_| true));
        assert!(tmp.exists() && path.exists());
        // Never committed: the secret of a token that does not exist goes.
        assert!(!settle_leftover(&tmp, &path, |_| false));
        assert!(!tmp.exists());
        // Not a secret at all, or no file: left alone.
        std::fs::write(&tmp, "hello").unwrap();
        assert!(!settle_leftover(&tmp, &path, |_| false));
        assert!(tmp.exists());
        std::fs::remove_file(&tmp).unwrap();
        assert!(!settle_leftover(&tmp, &path, |_| true));
    }
}
