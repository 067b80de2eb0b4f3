//! Raft figures the RaftActor publishes for scrapes, without a message round trip.
//!
//! The RaftActor owns the Raft node and is the only writer: after each ready loop it
//! stores the term, commit and applied indexes and leadership here, and counts leader
//! changes. Readers (`/metrics`) load the atomics at any time; each figure is current to
//! within one ready loop, and figures read together may come from two consecutive loops,
//! which is what a scrape needs. A [`ClusterHandle::view`](crate::ClusterHandle::view)
//! remains the way to get a consistent picture.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The Raft gauges of one node.
#[derive(Debug, Default)]
pub struct RaftGauges {
    /// The node's current term.
    pub term: AtomicU64,
    /// The highest index known to be committed.
    pub commit_index: AtomicU64,
    /// The highest index applied to the cluster state.
    pub applied_index: AtomicU64,
    /// The leader this node knows of (0: none).
    pub leader_id: AtomicU64,
    /// Whether this node is the leader.
    pub is_leader: AtomicBool,
    /// Times a new leader was seen: each change of the known leader to a node (the first
    /// election included; a leaderless interval between two terms of the same leader
    /// counts once more, when it is known again).
    pub leader_changes: AtomicU64,
}

impl RaftGauges {
    /// Stores the figures; counts a leader change when the known leader became a node
    /// other than the previous one (or the same one again after a time with none).
    pub fn store(&self, term: u64, commit: u64, applied: u64, leader_id: u64, is_leader: bool) {
        self.term.store(term, Ordering::Relaxed);
        self.commit_index.store(commit, Ordering::Relaxed);
        self.applied_index.store(applied, Ordering::Relaxed);
        self.is_leader.store(is_leader, Ordering::Relaxed);
        let before = self.leader_id.swap(leader_id, Ordering::Relaxed);
        if leader_id != 0 && leader_id != before {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_changes_count_each_new_leader() {
        let g = RaftGauges::default();
        g.store(1, 0, 0, 0, false);
        assert_eq!(g.leader_changes.load(Ordering::Relaxed), 0);
        g.store(1, 1, 1, 2, false);
        g.store(1, 2, 2, 2, false);
        assert_eq!(g.leader_changes.load(Ordering::Relaxed), 1);
        g.store(2, 2, 2, 0, false);
        g.store(2, 3, 3, 1, true);
        assert_eq!(g.leader_changes.load(Ordering::Relaxed), 2);
        assert!(g.is_leader.load(Ordering::Relaxed));
        assert_eq!(g.term.load(Ordering::Relaxed), 2);
        assert_eq!(g.commit_index.load(Ordering::Relaxed), 3);
        assert_eq!(g.applied_index.load(Ordering::Relaxed), 3);
    }
}
