//! Cohort's fault-injection harness: real `cohort` node processes in a throw-away directory,
//! the faults a test injects into them, and polling helpers with deadlines.
//!
//! A [`ClusterSandbox`] owns `n` nodes named `n1`, `n2`, …; each has its own data dir, log
//! file and free loopback ports, and all share one cookie file. A test starts them, injects
//! faults — [`kill`](ClusterSandbox::kill) (SIGKILL), [`stop`](ClusterSandbox::stop) /
//! [`cont`](ClusterSandbox::cont) (SIGSTOP/SIGCONT), [`terminate`](ClusterSandbox::terminate)
//! (SIGTERM), [`restart`](ClusterSandbox::restart) — and waits for the cluster to react with
//! [`wait_until`], [`wait_http_ready`](ClusterSandbox::wait_http_ready) and
//! [`wait_leader`](ClusterSandbox::wait_leader), never with a bare sleep.
//!
//! Nothing outlives the test: dropping the sandbox kills and reaps every process, and when
//! the test is failing it first prints the end of every node's log and keeps the directory.
//!
//! The harness runs a `cohort` binary built beforehand ([`cohort_bin`] says which):
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/t cargo build -p cohort --bin cohort
//! CARGO_TARGET_DIR=/tmp/t COHORT_BIN=/tmp/t/debug/cohort cargo test -p cohort-chaos
//! ```
//!
//! # Example: the leader dies, another takes over, the old one comes back
//!
//! ```no_run
//! use std::time::Duration;
//! use cohort_chaos::{cohort_bin, ClusterSandbox, SandboxError};
//!
//! # async fn scenario() -> Result<(), SandboxError> {
//! let cluster = ClusterSandbox::new(cohort_bin(), 3)?;
//! cluster.start_all()?; // n1 bootstraps, n2 and n3 join n1
//! for i in 0..cluster.len() {
//!     cluster.wait_http_ready(i, Duration::from_secs(60)).await?;
//! }
//! let (leader, _) = cluster.wait_leader(Duration::from_secs(30)).await.expect("a leader");
//!
//! cluster.kill(leader)?;
//! let (next, _) = cluster.wait_leader(Duration::from_secs(30)).await.expect("a new leader");
//! assert_ne!(next, leader);
//!
//! cluster.restart(leader)?; // same data dir, ports and cookie
//! cluster.wait_http_ready(leader, Duration::from_secs(60)).await?;
//! let status = cluster.cluster_status(leader).await?;
//! assert_eq!(status["nodes"].as_array().map(Vec::len), Some(3));
//! # Ok(()) }
//! ```

mod error;
mod http;
mod ports;
mod sandbox;
mod spec;
mod wait;

use std::path::PathBuf;

pub use error::SandboxError;
pub use http::JsonReply;
pub use ports::free_loopback_ports;
pub use sandbox::{ClusterSandbox, DEFAULT_HTTP_TIMEOUT};
pub use spec::NodeSpec;
pub use wait::wait_until;

/// The `cohort` binary the tests run: `$COHORT_BIN` when set, otherwise
/// `<workspace>/target/debug/cohort`. [`ClusterSandbox::new`] fails with a message saying how
/// to build it when it is missing.
pub fn cohort_bin() -> PathBuf {
    match std::env::var_os("COHORT_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("debug")
            .join("cohort"),
    }
}
