//! The harness's one error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What can go wrong while a test drives a [`ClusterSandbox`](crate::ClusterSandbox).
///
/// Every variant names the node (`n1`, `n2`, …) it is about, so a failed test's message
/// says which process misbehaved; [`Exited`](SandboxError::Exited) carries the end of that
/// node's log.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The `cohort` binary is missing: the harness runs a binary built beforehand.
    #[error(
        "the cohort binary is not at {}: build it first with \
         `cargo build -p cohort --bin cohort` (with the same CARGO_TARGET_DIR you build with) \
         and set COHORT_BIN to it, e.g. COHORT_BIN=$CARGO_TARGET_DIR/debug/cohort",
        path.display()
    )]
    BinaryNotFound {
        /// Where the binary was looked for.
        path: PathBuf,
    },

    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),

    /// `start` on a node whose process is still running (stopped counts as running).
    #[error("{node} is already running (pid {pid})")]
    AlreadyRunning {
        /// The node's name.
        node: String,
        /// Its process id.
        pid: u32,
    },

    /// A signal or a wait for a node that has no running process.
    #[error("{node} is not running")]
    NotRunning {
        /// The node's name.
        node: String,
    },

    /// `restart` on a node that was never started: there is no argument list to reuse.
    #[error("{node} was never started, so there is nothing to restart")]
    NeverStarted {
        /// The node's name.
        node: String,
    },

    /// The node's process ended while the harness waited for something else.
    #[error("{node} exited ({status}) while waiting for {what}; the end of its log:\n{log_tail}")]
    Exited {
        /// The node's name.
        node: String,
        /// What the harness was waiting for.
        what: String,
        /// How the process ended.
        status: ExitStatus,
        /// The last lines of the node's log.
        log_tail: String,
    },

    /// A deadline passed.
    #[error("timed out after {after:?} waiting for {what} (last seen: {last})")]
    Timeout {
        /// What the harness was waiting for.
        what: String,
        /// The deadline it was given.
        after: Duration,
        /// The last answer or error seen before the deadline.
        last: String,
    },

    /// The request did not get an HTTP answer (refused, reset, timed out …).
    #[error("{node}: {method} {url}: {}", chain(source))]
    Http {
        /// The node's name.
        node: String,
        /// The request's method.
        method: String,
        /// The request's URL.
        url: String,
        /// The client's error; [`SandboxError::is_timeout`] looks into it.
        source: reqwest::Error,
    },

    /// The node answered with a status other than 2xx where 2xx was expected.
    #[error("{node}: {url} answered {status}: {body}")]
    Status {
        /// The node's name.
        node: String,
        /// The request's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The response body (Cohort's error envelope, as text).
        body: String,
    },

    /// The body was not JSON.
    #[error("{node}: {url} did not answer JSON ({source}): {body}")]
    Json {
        /// The node's name.
        node: String,
        /// The request's URL.
        url: String,
        /// The body as received.
        body: String,
        /// The parser's error.
        source: serde_json::Error,
    },
}

impl SandboxError {
    /// True for a deadline that passed: the harness's own ([`SandboxError::Timeout`]) or an
    /// HTTP request's (a node that accepts the connection but never answers, e.g. one held
    /// with SIGSTOP).
    pub fn is_timeout(&self) -> bool {
        match self {
            SandboxError::Timeout { .. } => true,
            SandboxError::Http { source, .. } => source.is_timeout(),
            _ => false,
        }
    }

    /// The HTTP status, for [`SandboxError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            SandboxError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
        let context = context.into();
        move |source| SandboxError::Io { context, source }
    }
}

/// An error and its causes on one line: reqwest's own message ("error sending request") says
/// little without them ("operation timed out", "connection refused").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
