//! Waiting with deadlines: poll a condition until it holds or time runs out. A chaos test
//! never sleeps and hopes.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{ClusterSandbox, SandboxError};

/// The first pause between two polls; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two polls.
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// How long one probe of a node (one HTTP request) may take inside a wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Polls `condition` until it returns true (→ `true`) or `timeout` has passed (→ `false`).
///
/// The condition is checked at least once, and a check still running at the deadline is
/// abandoned, so the call never takes much longer than `timeout`. Pauses between checks
/// start at 10 ms and double up to 100 ms. Uses tokio's clock, so it works under
/// `tokio::time::pause()`.
///
/// ```no_run
/// # async fn example(sandbox: &cohort_chaos::ClusterSandbox) {
/// use std::time::Duration;
/// let up = cohort_chaos::wait_until(Duration::from_secs(10), || async {
///     sandbox.get_json(0, "/api/v1/models").await.is_ok()
/// })
/// .await;
/// assert!(up, "n1 lists its models within 10 s");
/// # }
/// ```
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut pacer = Pacer::new(timeout);
    loop {
        match tokio::time::timeout(pacer.left(), condition()).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        if !pacer.pause().await {
            return false;
        }
    }
}

/// A deadline and the growing pause between polls.
pub(crate) struct Pacer {
    deadline: Instant,
    pause: Duration,
}

impl Pacer {
    pub(crate) fn new(timeout: Duration) -> Pacer {
        Pacer {
            deadline: Instant::now() + timeout,
            pause: FIRST_PAUSE,
        }
    }

    /// Time left before the deadline.
    pub(crate) fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// How long one probe may take now: [`PROBE_TIMEOUT`], less near the deadline.
    fn probe_timeout(&self) -> Duration {
        PROBE_TIMEOUT
            .min(self.left())
            .max(Duration::from_millis(10))
    }

    /// Sleeps before the next poll; false (without sleeping) once the deadline has passed.
    pub(crate) async fn pause(&mut self) -> bool {
        let left = self.left();
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(self.pause.min(left)).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        true
    }
}

impl ClusterSandbox {
    /// Polls node `i`'s `GET /readyz` until it answers 200. Fails early with
    /// [`SandboxError::Exited`] (and the node's log tail) if the process ends, and with
    /// [`SandboxError::Timeout`] (and the last answer seen) at the deadline.
    pub async fn wait_http_ready(&self, i: usize, timeout: Duration) -> Result<(), SandboxError> {
        let what = format!("{} /readyz to answer 200", self.name(i));
        let mut pacer = Pacer::new(timeout);
        loop {
            if let Some(e) = self.not_running_error(i, &what) {
                return Err(e);
            }
            let last = match self.get_status(i, "/readyz", pacer.probe_timeout()).await {
                Ok(200) => return Ok(()),
                Ok(status) => format!("status {status}"),
                Err(e) => e.to_string(),
            };
            if !pacer.pause().await {
                return Err(SandboxError::Timeout {
                    what,
                    after: timeout,
                    last,
                });
            }
        }
    }

    /// Polls node `i`'s log until a line the node wrote contains `needle` (see
    /// [`ClusterSandbox::log_contains`]), e.g. the startup line
    /// `Cohort is serving on http://…`. Fails early if the process ends without writing it.
    pub async fn wait_log(
        &self,
        i: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), SandboxError> {
        let what = format!("{:?} in {}'s log", needle, self.name(i));
        let mut pacer = Pacer::new(timeout);
        loop {
            if self.log_contains(i, needle) {
                return Ok(());
            }
            if let Some(e) = self.not_running_error(i, &what) {
                // It may have written the line just before it ended.
                return if self.log_contains(i, needle) {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            if !pacer.pause().await {
                return Err(SandboxError::Timeout {
                    what,
                    after: timeout,
                    last: self.log_tail(i, 1),
                });
            }
        }
    }

    /// Polls `GET /api/v1/cluster` on every live node (running and not stopped) until they
    /// all answer and agree on one Raft leader that is itself live; returns that leader's
    /// node index and Raft id, or `None` at the deadline.
    ///
    /// A leader id of 0 or null means "no leader" (raft-rs's convention). The leader's node
    /// index is found by its id in the `nodes` list, whose `name` is the sandbox's `n{i+1}`.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<(usize, u64)> {
        let mut pacer = Pacer::new(timeout);
        loop {
            let probe = self.current_leader_within(pacer.probe_timeout());
            if let Ok(Some(leader)) = tokio::time::timeout(pacer.left(), probe).await {
                return Some(leader);
            }
            if !pacer.pause().await {
                return None;
            }
        }
    }

    /// One round of [`ClusterSandbox::wait_leader`]: the leader every live node names now,
    /// if they agree and it is live.
    pub async fn current_leader(&self) -> Option<(usize, u64)> {
        self.current_leader_within(PROBE_TIMEOUT).await
    }

    async fn current_leader_within(&self, probe_timeout: Duration) -> Option<(usize, u64)> {
        let live: Vec<usize> = (0..self.len()).filter(|&i| self.is_live(i)).collect();
        let mut statuses = Vec::with_capacity(live.len());
        for i in live {
            let status = self
                .get_json_within(i, crate::http::CLUSTER_PATH, probe_timeout)
                .await
                .ok()?;
            statuses.push((i, status));
        }
        let names: Vec<&str> = (0..self.len()).map(|i| self.name(i)).collect();
        agreed_leader(&names, &statuses)
    }
}

/// The leader that every status in `statuses` (node index, `/api/v1/cluster` body) names,
/// as (node index, Raft id), when they all name the same one and it is among them.
pub(crate) fn agreed_leader(
    names: &[&str],
    statuses: &[(usize, serde_json::Value)],
) -> Option<(usize, u64)> {
    let mut leader = None;
    for (_, status) in statuses {
        let id = raft_id(&status["raft"]["leader_id"])?;
        if *leader.get_or_insert(id) != id {
            return None;
        }
    }
    let leader = leader?;
    let index = statuses.iter().find_map(|(_, status)| {
        let node = status["nodes"]
            .as_array()?
            .iter()
            .find(|node| raft_id(&node["id"]) == Some(leader))?;
        let name = node["name"].as_str()?;
        names.iter().position(|n| *n == name)
    })?;
    statuses
        .iter()
        .any(|(i, _)| *i == index)
        .then_some((index, leader))
}

/// A Raft node id from JSON: a number or a string of digits; 0 (raft-rs's "none") is `None`.
fn raft_id(value: &serde_json::Value) -> Option<u64> {
    let id = match value {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    (id != 0).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(leader: serde_json::Value) -> serde_json::Value {
        json!({
            "cluster_id": "c1",
            "nodes": [
                {"id": 11, "name": "n1"},
                {"id": 12, "name": "n2"},
                {"id": "13", "name": "n3"},
            ],
            "raft": {"leader_id": leader, "term": 3},
        })
    }

    const NAMES: [&str; 3] = ["n1", "n2", "n3"];

    #[test]
    fn live_nodes_agreeing_on_a_live_leader() {
        let all = [
            (0, status(json!(12))),
            (1, status(json!(12))),
            (2, status(json!(12))),
        ];
        assert_eq!(agreed_leader(&NAMES, &all), Some((1, 12)));
        // Ids given as strings are read too.
        let two = [(0, status(json!("13"))), (2, status(json!(13)))];
        assert_eq!(agreed_leader(&NAMES, &two), Some((2, 13)));
    }

    #[test]
    fn no_leader_when_nodes_disagree_or_have_none() {
        let split = [(0, status(json!(11))), (1, status(json!(12)))];
        assert_eq!(agreed_leader(&NAMES, &split), None);
        let none = [(0, status(json!(0))), (1, status(json!(0)))];
        assert_eq!(agreed_leader(&NAMES, &none), None);
        let null = [(0, status(json!(null))), (1, status(json!(12)))];
        assert_eq!(agreed_leader(&NAMES, &null), None);
        assert_eq!(agreed_leader(&NAMES, &[]), None);
    }

    #[test]
    fn no_leader_when_the_named_leader_is_not_live() {
        // n2 was killed; n1 and n3 still name it until they time it out.
        let stale = [(0, status(json!(12))), (2, status(json!(12)))];
        assert_eq!(agreed_leader(&NAMES, &stale), None);
        // A leader id that is not in `nodes`.
        let unknown = [(0, status(json!(99)))];
        assert_eq!(agreed_leader(&NAMES, &unknown), None);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_polls_until_true_and_respects_its_deadline() {
        let start = Instant::now();
        let mut calls = 0;
        let done = wait_until(Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { n == 4 }
        })
        .await;
        assert!(done);
        assert_eq!(calls, 4);
        assert!(start.elapsed() < Duration::from_secs(1));

        let start = Instant::now();
        assert!(!wait_until(Duration::from_secs(2), || async { false }).await);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_millis(2200),
            "{took:?}"
        );

        // A check that hangs is abandoned at the deadline.
        let start = Instant::now();
        let hung = wait_until(Duration::from_secs(1), std::future::pending::<bool>).await;
        assert!(!hung);
        assert!(start.elapsed() < Duration::from_millis(1100));
    }
}
