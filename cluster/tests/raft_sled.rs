//! Three real `raft::RawNode`s on `SledStorage`, wired by an in-memory network (a list of
//! pending messages delivered in a loop: no threads, no sleeping). Each peer applies the
//! committed `CommandEnvelope`s to its own `ClusterState`, the way the RaftActor will.

use cohort_cluster::{
    ApplyOutcome, ClusterState, Command, CommandEnvelope, JobRecord, JobStatus, ModelRecord,
    SledStorage,
};
use raft::eraftpb::{ConfState, Entry, EntryType, Message};
use raft::{Config, RawNode, StateRole, Storage};
use tempfile::TempDir;

const PEERS: [u64; 3] = [1, 2, 3];

/// One member: its Raft node, its state machine, and what it applied, in order.
struct Peer {
    node: RawNode<SledStorage>,
    state: ClusterState,
    applied: Vec<Vec<u8>>,
    applied_index: u64,
}

struct Cluster {
    dirs: Vec<TempDir>,
    peers: Vec<Peer>,
    /// Messages in flight.
    pending: Vec<Message>,
    /// Peers whose messages (both ways) are dropped.
    isolated: Vec<u64>,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn config(id: u64) -> Config {
    Config {
        id,
        election_tick: 10,
        heartbeat_tick: 3,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    }
}

fn voters() -> ConfState {
    ConfState::from((PEERS.to_vec(), vec![]))
}

impl Cluster {
    fn new() -> Cluster {
        let mut dirs = Vec::new();
        let mut peers = Vec::new();
        for id in PEERS {
            let dir = tempfile::tempdir().unwrap();
            let storage = SledStorage::open(dir.path(), id).unwrap();
            storage.initialize_with_conf_state(voters()).unwrap();
            let node = RawNode::new(&config(id), storage, &logger()).unwrap();
            dirs.push(dir);
            peers.push(Peer {
                node,
                state: ClusterState::new(),
                applied: Vec::new(),
                applied_index: 0,
            });
        }
        Cluster {
            dirs,
            peers,
            pending: Vec::new(),
            isolated: Vec::new(),
        }
    }

    fn peer(&mut self, id: u64) -> &mut Peer {
        &mut self.peers[(id - 1) as usize]
    }

    fn leader(&self) -> Option<u64> {
        self.peers
            .iter()
            .find(|p| p.node.raft.state == StateRole::Leader)
            .map(|p| p.node.raft.id)
    }

    /// Handles every peer's `Ready` and delivers messages until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            for i in 0..self.peers.len() {
                let out = on_ready(&mut self.peers[i]);
                self.pending.extend(out);
            }
            if self.pending.is_empty() && self.peers.iter().all(|p| !p.node.has_ready()) {
                return;
            }
            for m in std::mem::take(&mut self.pending) {
                if self.isolated.contains(&m.from) || self.isolated.contains(&m.to) {
                    continue;
                }
                let to = m.to;
                // A peer may refuse a message (e.g. from a stale term); Raft copes.
                let _ = self.peer(to).node.step(m);
            }
        }
        panic!("the network did not settle");
    }

    /// Ticks every peer until one is leader.
    fn elect(&mut self) -> u64 {
        for _ in 0..1000 {
            if let Some(id) = self.leader() {
                return id;
            }
            for p in &mut self.peers {
                p.node.tick();
            }
            self.settle();
        }
        panic!("no leader elected");
    }

    /// Ticks (heartbeats carry the commit index) until `done` holds.
    fn tick_until(&mut self, done: impl Fn(&Cluster) -> bool) {
        for _ in 0..1000 {
            if done(self) {
                return;
            }
            for p in &mut self.peers {
                p.node.tick();
            }
            self.settle();
        }
        panic!("condition not reached");
    }
}

/// One round of the reference loop (raft-rs `examples/single_mem_node`): returns the
/// messages to send.
fn on_ready(peer: &mut Peer) -> Vec<Message> {
    let mut out = Vec::new();
    if !peer.node.has_ready() {
        return out;
    }
    let store = peer.node.store().clone();
    let mut ready = peer.node.ready();

    // A leader's messages may leave before its own entries are persisted (Raft's
    // pipelining); messages that depend on persisted state wait below.
    out.extend(ready.take_messages());

    // A snapshot from the leader replaces the log and the state machine.
    if !ready.snapshot().is_empty() {
        let snap = ready.snapshot().clone();
        peer.state = ClusterState::restore(snap.get_data()).unwrap();
        peer.applied_index = snap.get_metadata().index;
        store.apply_snapshot(snap).unwrap();
    }

    apply(peer, ready.take_committed_entries());

    // Persist new entries and the hard state (each write is flushed) before sending the
    // messages that acknowledge them.
    if !ready.entries().is_empty() {
        store.append(ready.entries()).unwrap();
    }
    if let Some(hs) = ready.hs() {
        store.set_hardstate(hs.clone()).unwrap();
    }
    out.extend(ready.take_persisted_messages());

    let mut light = peer.node.advance(ready);
    if let Some(commit) = light.commit_index() {
        store.set_commit(commit).unwrap();
    }
    out.extend(light.take_messages());
    apply(peer, light.take_committed_entries());
    peer.node.advance_apply();
    out
}

fn apply(peer: &mut Peer, entries: Vec<Entry>) {
    for e in entries {
        peer.applied_index = e.index;
        // A new leader's empty entry carries nothing.
        if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
            continue;
        }
        let env = CommandEnvelope::decode(&e.data).unwrap();
        let outcome = peer.state.apply(&env);
        assert!(
            matches!(outcome, ApplyOutcome::Applied | ApplyOutcome::Unchanged),
            "{outcome:?}"
        );
        peer.applied.push(e.data.to_vec());
    }
}

fn register_model(id: u128) -> Vec<u8> {
    CommandEnvelope {
        id,
        issued_at_ms: 1_000,
        command: Command::RegisterModel(ModelRecord {
            name: "mlp".into(),
            engine: "candle-mlp".into(),
            path: None,
            versions: Default::default(),
        }),
    }
    .encode()
}

fn submit_job(id: u128, n: usize) -> Vec<u8> {
    CommandEnvelope {
        id,
        issued_at_ms: 2_000 + n as u64,
        command: Command::SubmitJob(JobRecord {
            id: format!("job-{n}"),
            model: "mlp".into(),
            status: JobStatus::Queued,
            payload: format!("payload {n}").into_bytes(),
            result: None,
            error: None,
            lease: None,
            attempts: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }),
    }
    .encode()
}

fn proposals(from: usize, to: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if from == 0 {
        out.push(register_model(1));
    }
    out.extend((from..to).map(|n| submit_job(100 + n as u128, n)));
    out
}

fn all_applied(c: &Cluster, want: usize) -> bool {
    c.peers.iter().all(|p| p.applied.len() >= want)
}

#[test]
fn three_peers_apply_the_same_log_and_it_survives_reopen() {
    const N: usize = 20;
    let mut c = Cluster::new();
    let leader = c.elect();

    let want = proposals(0, N);
    for data in &want {
        c.peer(leader).node.propose(vec![], data.clone()).unwrap();
        c.settle();
    }
    c.tick_until(|c| all_applied(c, want.len()));

    let snapshots: Vec<Vec<u8>> = c.peers.iter().map(|p| p.state.snapshot()).collect();
    for p in &c.peers {
        assert_eq!(p.applied, want, "peer {}", p.node.raft.id);
        assert_eq!(p.state.jobs.len(), N);
    }
    assert!(snapshots.iter().all(|s| *s == snapshots[0]));

    // Stop every peer, then reopen a follower's storage from disk.
    let follower = PEERS.iter().copied().find(|&id| id != leader).unwrap();
    let commit = c.peer(follower).node.raft.raft_log.committed;
    let dirs = std::mem::take(&mut c.dirs);
    drop(c);
    let dir = &dirs[(follower - 1) as usize];
    let storage = SledStorage::open(dir.path(), follower).unwrap();
    let state = storage.initial_state().unwrap();
    assert_eq!(state.conf_state, voters());
    assert_eq!(state.hard_state.commit, commit);
    let entries = storage
        .entries(
            storage.first_index().unwrap(),
            storage.last_index().unwrap() + 1,
            None,
            raft::GetEntriesContext::empty(false),
        )
        .unwrap();
    let logged: Vec<Vec<u8>> = entries
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| e.data.to_vec())
        .collect();
    assert_eq!(logged, want);

    // A node restarted on that storage replays its committed log into the same state.
    let mut peer = Peer {
        node: RawNode::new(&config(follower), storage, &logger()).unwrap(),
        state: ClusterState::new(),
        applied: Vec::new(),
        applied_index: 0,
    };
    let _ = on_ready(&mut peer);
    assert_eq!(peer.applied, want);
    assert_eq!(peer.state.snapshot(), snapshots[0]);
}

#[test]
fn a_lagging_peer_catches_up_from_a_snapshot() {
    let mut c = Cluster::new();
    let leader = c.elect();
    let lagging = PEERS.iter().copied().find(|&id| id != leader).unwrap();

    let first = proposals(0, 5);
    for data in &first {
        c.peer(leader).node.propose(vec![], data.clone()).unwrap();
    }
    c.tick_until(|c| all_applied(c, first.len()));

    // Cut one follower off; the other two go on.
    c.isolated.push(lagging);
    let second = proposals(5, 15);
    for data in &second {
        c.peer(leader).node.propose(vec![], data.clone()).unwrap();
        c.settle();
    }
    let total = first.len() + second.len();
    c.tick_until(|c| {
        c.peers
            .iter()
            .filter(|p| p.node.raft.id != lagging)
            .all(|p| p.applied.len() == total)
    });
    assert_eq!(c.peer(lagging).applied.len(), first.len());

    // The leader snapshots its state and compacts its log past what the follower has.
    {
        let p = c.peer(leader);
        let index = p.applied_index;
        let store = p.node.store().clone();
        store
            .create_snapshot(index, store.conf_state(), p.state.snapshot())
            .unwrap();
        store.compact(index + 1).unwrap();
        assert_eq!(store.first_index().unwrap(), index + 1);
    }

    // Reconnected, the follower gets the snapshot, not the entries.
    c.isolated.clear();
    c.tick_until(|c| {
        let want = &c.peers[(leader - 1) as usize].state;
        c.peers.iter().all(|p| p.state == *want)
    });
    let p = c.peer(lagging);
    assert_eq!(p.state.jobs.len(), 15);
    assert_eq!(
        p.applied.len(),
        first.len(),
        "caught up without replaying entries"
    );
    let store = p.node.store().clone();
    assert!(store.snapshot_metadata().index > 0);
    assert_eq!(
        store.snapshot_metadata(),
        c.peer(leader).node.store().snapshot_metadata()
    );

    // And both go on from there together.
    let third = proposals(15, 18);
    for data in &third {
        c.peer(leader).node.propose(vec![], data.clone()).unwrap();
    }
    c.tick_until(|c| c.peers.iter().all(|p| p.state.jobs.len() == 18));
    let snaps: Vec<Vec<u8>> = c.peers.iter().map(|p| p.state.snapshot()).collect();
    assert!(snaps.iter().all(|s| *s == snaps[0]));
}
