//! Membership through `RaftNode`, deterministically: one node bootstraps, others start
//! empty and are added as learners, promoted, and survive the leader's loss. Messages go
//! through an in-memory network that the test drives step by step (no threads, no
//! sleeping), with `isolate` to cut a node off.

use std::collections::{BTreeMap, BTreeSet};

use cohort_cluster::state::{
    Command, CommandEnvelope, ModelRecord, NodeRecord, NodeRole, NodeStatus,
};
use cohort_cluster::{RaftNode, RaftSettings, SledStorage};
use raft::eraftpb::{ConfChangeType, Message};
use tokio::sync::oneshot;

struct Net {
    nodes: BTreeMap<u64, RaftNode>,
    inbox: Vec<Message>,
    isolated: BTreeSet<u64>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Net {
    fn new() -> Net {
        Net {
            nodes: BTreeMap::new(),
            inbox: Vec::new(),
            isolated: BTreeSet::new(),
            _dirs: Vec::new(),
        }
    }

    fn add(&mut self, id: u64, bootstrap: bool) {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path(), id).unwrap();
        let mut settings = RaftSettings::new(id);
        settings.snapshot_threshold = 50;
        let node = RaftNode::open(&settings, storage, bootstrap.then(|| vec![id])).unwrap();
        self.nodes.insert(id, node);
        self._dirs.push(dir);
    }

    /// Delivers messages and processes readies until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            for node in self.nodes.values_mut() {
                let out = node.on_ready().unwrap();
                self.inbox.extend(out);
            }
            if self.inbox.is_empty() {
                return;
            }
            for m in std::mem::take(&mut self.inbox) {
                if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                    continue;
                }
                if let Some(n) = self.nodes.get_mut(&m.to) {
                    // Raft drops what it cannot use (e.g. from a member it no longer knows).
                    let _ = n.step(m);
                }
            }
        }
        panic!("the network never settled");
    }

    fn tick(&mut self, times: usize) {
        for _ in 0..times {
            for (id, node) in self.nodes.iter_mut() {
                if !self.isolated.contains(id) {
                    node.tick();
                }
            }
            self.settle();
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(id, n)| n.is_leader() && !self.isolated.contains(id))
            .map(|(id, _)| *id)
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..100 {
            if let Some(l) = self.leader() {
                return l;
            }
            self.tick(1);
        }
        panic!("no leader elected");
    }

    fn add_member(&mut self, leader: u64, id: u64, kind: ConfChangeType) {
        let record = NodeRecord {
            id,
            name: format!("n{id}"),
            cluster_addr: format!("127.0.0.1:{}", 7100 + id),
            http_addr: format!("127.0.0.1:{}", 8100 + id),
            devices: vec![],
            labels: Default::default(),
            status: NodeStatus::Up,
            role: NodeRole::Learner,
        };
        let (tx, mut rx) = oneshot::channel();
        self.nodes
            .get_mut(&leader)
            .unwrap()
            .propose_conf_change(kind, id, Some(&record), tx);
        for _ in 0..50 {
            self.tick(1);
            if let Ok(r) = rx.try_recv() {
                r.unwrap();
                return;
            }
        }
        panic!("membership change of {id} never committed");
    }

    fn propose(&mut self, leader: u64, name: &str) {
        let env = CommandEnvelope::new(
            Command::RegisterModel(ModelRecord {
                name: name.into(),
                engine: "echo".into(),
                path: None,
                versions: Default::default(),
            }),
            1,
        );
        let (tx, mut rx) = oneshot::channel();
        self.nodes.get_mut(&leader).unwrap().propose(&env, tx);
        for _ in 0..50 {
            self.settle();
            if let Ok(r) = rx.try_recv() {
                r.unwrap();
                return;
            }
            self.tick(1);
        }
        panic!("proposal {name} never committed");
    }
}

#[test]
fn empty_nodes_join_as_learners_get_promoted_and_survive_the_leaders_loss() {
    let mut net = Net::new();
    net.add(1, true);
    let leader = net.elect();
    assert_eq!(leader, 1);
    net.propose(1, "m0");

    // Two empty nodes join: learner first, then voter.
    net.add(2, false);
    net.add(3, false);
    for id in [2, 3] {
        net.add_member(1, id, ConfChangeType::AddLearnerNode);
        assert_eq!(net.nodes[&1].status().learners, vec![id]);
        for _ in 0..20 {
            if net.nodes[&1].caught_up_learners(0).contains(&id) {
                break;
            }
            net.tick(1);
        }
        assert_eq!(
            net.nodes[&id].applied(),
            net.nodes[&1].applied(),
            "learner {id} caught up"
        );
        assert!(net.nodes[&1].caught_up_learners(0).contains(&id));
        net.add_member(1, id, ConfChangeType::AddNode);
    }
    net.tick(3);
    for id in [1, 2, 3] {
        let s = net.nodes[&id].status();
        assert_eq!(s.voters, vec![1, 2, 3], "node {id}'s view of the voters");
        assert_eq!(net.nodes[&id].state().nodes[&2].role, NodeRole::Voter);
        assert_eq!(net.nodes[&id].state().models.len(), 1);
    }

    // Past the snapshot threshold, then the leader is cut off: a new one is elected and
    // writes continue; everything committed is still there everywhere.
    for i in 0..60 {
        net.propose(1, &format!("m{}", i + 1));
    }
    assert!(
        net.nodes[&1].status().snapshot_index > 1,
        "a snapshot was taken"
    );
    net.isolated.insert(1);
    let next = net.elect();
    assert_ne!(next, 1);
    net.propose(next, "after-failover");
    net.isolated.clear();
    net.tick(30);
    let want = net.nodes[&next].state().clone();
    for id in [1, 2, 3] {
        assert_eq!(net.nodes[&id].state(), &want, "node {id} converged");
    }
    assert_eq!(want.models.len(), 62);

    // A fourth node joins after compaction: it is sent a snapshot.
    net.add(4, false);
    let leader = net.elect();
    net.add_member(leader, 4, ConfChangeType::AddLearnerNode);
    net.tick(5);
    assert_eq!(net.nodes[&4].state(), net.nodes[&leader].state());
    assert!(
        net.nodes[&4].status().snapshot_index > 1,
        "caught up from a snapshot"
    );
}
