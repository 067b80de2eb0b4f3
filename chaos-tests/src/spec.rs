//! What one node of a sandbox is: its name, addresses, files, and the command lines built
//! from them.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// One node of a [`ClusterSandbox`](crate::ClusterSandbox): fixed when the sandbox is made,
/// so a restarted node comes back with the same name, ports and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// `n1`, `n2`, … (index + 1).
    pub name: String,
    /// The address it listens on for cluster traffic (`--cluster-addr`).
    pub cluster_addr: SocketAddr,
    /// The address of its HTTP gateway (`--http-addr`).
    pub http_addr: SocketAddr,
    /// Its data dir (`--data-dir`), kept across restarts.
    pub data_dir: PathBuf,
    /// The file its stdout and stderr are appended to.
    pub log_path: PathBuf,
    /// Appended to the arguments built by [`NodeSpec::node_args`] and [`NodeSpec::up_args`]
    /// (set them through [`ClusterSandbox::spec_mut`](crate::ClusterSandbox::spec_mut)).
    pub extra_args: Vec<OsString>,
}

impl NodeSpec {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The arguments of `cohort node` for this node: it joins `join` when given, otherwise
    /// it bootstraps a new cluster. The cookie is passed as a file, never as a value, so it
    /// does not show up in `ps` or in the logs.
    pub fn node_args(&self, join: Option<SocketAddr>, cookie_file: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "node".into(),
            "--name".into(),
            self.name.clone().into(),
            "--cluster-addr".into(),
            self.cluster_addr.to_string().into(),
            "--http-addr".into(),
            self.http_addr.to_string().into(),
        ];
        if let Some(join) = join {
            args.push("--join".into());
            args.push(join.to_string().into());
        }
        args.push("--data-dir".into());
        args.push(self.data_dir.clone().into());
        args.push("--cookie-file".into());
        args.push(cookie_file.into());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The arguments of the single-node `cohort up` on this node's HTTP address and data dir.
    pub fn up_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "up".into(),
            "--name".into(),
            self.name.clone().into(),
            "--http-addr".into(),
            self.http_addr.to_string().into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// Writes a new cookie file at `path`: 64 random hex digits, created with mode 0600 (never
/// readable by others, not even for a moment). Fails if the file exists.
pub(crate) fn write_cookie(path: &Path) -> io::Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let cookie: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(cookie.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(i: u16) -> NodeSpec {
        NodeSpec {
            name: format!("n{}", i + 1),
            cluster_addr: SocketAddr::from(([127, 0, 0, 1], 7100 + i)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080 + i)),
            data_dir: PathBuf::from(format!("/tmp/sandbox/n{}", i + 1)),
            log_path: PathBuf::from(format!("/tmp/sandbox/n{}.log", i + 1)),
            extra_args: Vec::new(),
        }
    }

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter()
            .map(|a| a.to_str().expect("utf-8 arg"))
            .collect()
    }

    #[test]
    fn node_args_bootstrap_and_join() {
        let cookie = Path::new("/tmp/sandbox/cookie");
        let first = spec(0);
        assert_eq!(
            strings(&first.node_args(None, cookie)),
            [
                "node",
                "--name",
                "n1",
                "--cluster-addr",
                "127.0.0.1:7100",
                "--http-addr",
                "127.0.0.1:8080",
                "--data-dir",
                "/tmp/sandbox/n1",
                "--cookie-file",
                "/tmp/sandbox/cookie",
            ]
        );
        let mut second = spec(1);
        second.extra_args = vec!["--log-format".into(), "json".into()];
        let args = second.node_args(Some(first.cluster_addr), cookie);
        let args = strings(&args);
        let join = args.iter().position(|a| *a == "--join").expect("--join");
        assert_eq!(args[join + 1], "127.0.0.1:7100");
        assert_eq!(&args[args.len() - 2..], ["--log-format", "json"]);
    }

    #[test]
    fn up_args_use_the_specs_address_and_data_dir() {
        assert_eq!(
            strings(&spec(1).up_args()),
            [
                "up",
                "--name",
                "n2",
                "--http-addr",
                "127.0.0.1:8081",
                "--data-dir",
                "/tmp/sandbox/n2"
            ]
        );
    }

    #[test]
    fn cookie_is_random_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_cookie(&a).expect("cookie a");
        write_cookie(&b).expect("cookie b");
        let (ca, cb) = (
            std::fs::read_to_string(&a).expect("read a"),
            std::fs::read_to_string(&b).expect("read b"),
        );
        assert_eq!(ca.len(), 64);
        assert!(ca.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(ca, cb);
        let mode = std::fs::metadata(&a)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_cookie(&a).is_err(), "an existing cookie is kept");
        assert_eq!(std::fs::read_to_string(&a).expect("read a"), ca);
    }
}
