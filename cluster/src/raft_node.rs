//! `RaftNode`: one member's Raft state machine, driven the way raft-rs's examples drive
//! `RawNode` (tick, step, and the ready/advance loop), with [`SledStorage`] underneath
//! and [`ClusterState`] applied on top.
//!
//! It is plain code with no threads, timers or sockets: the `RaftActor` calls [`tick`]
//! on a timer, [`step`] for each message that arrives, and [`on_ready`] after either;
//! `on_ready` hands back the messages to send. Tests drive several `RaftNode`s over an
//! in-memory network and so decide every delivery, drop and partition themselves.
//!
//! Durability: entries, hard state and conf state are written (and flushed by the
//! storage) before the messages that depend on them are handed back, and a proposal is
//! answered only once its entry is committed (on a quorum's disks) and applied here.
//!
//! [`tick`]: RaftNode::tick
//! [`step`]: RaftNode::step
//! [`on_ready`]: RaftNode::on_ready

use std::collections::HashMap;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{Config, RawNode, StateRole, Storage};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::raft_actor::Published;
use crate::state::{
    ApplyOutcome, ClusterState, Command, CommandEnvelope, CommandId, NodeRecord, NodeRole,
};
use crate::storage::SledStorage;
use crate::{codec, ClusterError};

/// Settings of one Raft member.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// This member's id (never 0).
    pub id: u64,
    /// Ticks without a leader's heartbeat before an election.
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Applied entries after which the state is snapshotted and the log compacted.
    pub snapshot_threshold: u64,
}

impl RaftSettings {
    /// Defaults for a member with this id.
    pub fn new(id: u64) -> Self {
        RaftSettings {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_threshold: 10_000,
        }
    }
}

/// What a committed proposal reports back.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The log index the entry was committed at.
    pub index: u64,
    /// What applying it did.
    pub outcome: ApplyOutcome,
}

/// Where a proposal's answer goes.
pub type ProposeReply = oneshot::Sender<Result<Committed, ClusterError>>;
/// Where a linearizable read's permission goes: `Ok(index)` once this member has applied
/// everything committed when the read was asked.
pub type ReadReply = oneshot::Sender<Result<u64, ClusterError>>;

/// A snapshot of this member's Raft status, for the API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The leader's view of how far each member's log matches its own.
    pub matched: Vec<(u64, u64)>,
}

/// One Raft member.
pub struct RaftNode {
    raw: RawNode<SledStorage>,
    state: ClusterState,
    applied: u64,
    snapshot_index: u64,
    threshold: u64,
    pending: HashMap<CommandId, Vec<ProposeReply>>,
    pending_conf: Vec<(u64, ProposeReply)>,
    reads: HashMap<Vec<u8>, ReadReply>,
    reads_waiting: Vec<(u64, ReadReply)>,
    read_seq: u64,
    /// A membership change was applied: snapshot at the end of this ready, so that a
    /// node just added is sent a snapshot whose configuration includes it (raft-rs
    /// refuses one that does not).
    snapshot_now: bool,
    /// The token table changed since it was last published.
    tokens_changed: bool,
    /// Where the token table is published (the RaftActor's [`Published`]).
    published: Option<Arc<Published>>,
}

fn touches_tokens(command: &Command) -> bool {
    match command {
        Command::UpsertToken(_)
        | Command::UpdateToken { .. }
        | Command::RevokeToken { .. }
        | Command::RecordTokenUsage { .. } => true,
        Command::Audited { command, .. } => touches_tokens(command),
        _ => false,
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl RaftNode {
    /// Opens a member on `storage`. `bootstrap`: the voters of a brand-new cluster, given
    /// only by the node that creates it and only when its storage is empty; a node that
    /// joins an existing cluster passes `None` and waits to be added by the leader.
    pub fn open(
        settings: &RaftSettings,
        storage: SledStorage,
        bootstrap: Option<Vec<u64>>,
    ) -> Result<RaftNode, ClusterError> {
        let initial = storage.initial_state()?;
        let fresh = initial.conf_state.voters.is_empty()
            && initial.conf_state.learners.is_empty()
            && storage.last_index()? == 0;
        if fresh {
            if let Some(voters) = bootstrap {
                // The first configuration goes in a snapshot at index 1, not only in the
                // conf state: a node that joins later starts with an empty log, so the
                // leader has to send it this snapshot, and with it the voters it must
                // know before it can apply any later membership change.
                let cs = ConfState {
                    voters,
                    ..ConfState::default()
                };
                let mut snap = Snapshot::default();
                snap.mut_metadata().index = 1;
                snap.mut_metadata().term = 1;
                snap.mut_metadata().set_conf_state(cs);
                snap.data = ClusterState::default().snapshot().into();
                storage.apply_snapshot(snap)?;
            }
        }
        let snap = storage.snapshot(0, settings.id)?;
        let snapshot_index = snap.get_metadata().index;
        let mut state = ClusterState::default();
        if snapshot_index > 0 && !snap.data.is_empty() {
            state = ClusterState::restore(&snap.data)?;
        }
        let cfg = Config {
            id: settings.id,
            election_tick: settings.election_tick,
            heartbeat_tick: settings.heartbeat_tick,
            applied: snapshot_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Config::default()
        };
        cfg.validate()?;
        let raw = RawNode::new(&cfg, storage, &logger())?;
        Ok(RaftNode {
            raw,
            state,
            applied: snapshot_index,
            snapshot_index,
            threshold: settings.snapshot_threshold.max(1),
            pending: HashMap::new(),
            pending_conf: Vec::new(),
            reads: HashMap::new(),
            reads_waiting: Vec::new(),
            read_seq: 0,
            snapshot_now: false,
            tokens_changed: true,
            published: None,
        })
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// The leader this member knows of (0: none).
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The applied state.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Hands a message from another member to Raft.
    pub fn step(&mut self, msg: Message) -> Result<(), ClusterError> {
        // raft-rs asserts on local message types; never let a peer send one.
        if raft::raw_node::is_local_msg(msg.get_msg_type()) {
            return Err(ClusterError::Invalid(format!(
                "a peer sent a local message type {:?}",
                msg.get_msg_type()
            )));
        }
        self.raw.step(msg).or_else(|e| match e {
            raft::Error::StepPeerNotFound | raft::Error::StepLocalMsg => Ok(()),
            e => Err(e.into()),
        })
    }

    /// Proposes a command. Only the leader accepts; elsewhere the answer is
    /// [`ClusterError::NotLeader`] naming the leader to forward to.
    pub fn propose(&mut self, env: &CommandEnvelope, reply: ProposeReply) {
        if !self.is_leader() {
            let _ = reply.send(Err(ClusterError::NotLeader {
                leader: self.leader_id(),
            }));
            return;
        }
        let data = codec::encode(env);
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => self.pending.entry(env.id).or_default().push(reply),
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Proposes a membership change. `context` carries the node's record for additions.
    pub fn propose_conf_change(
        &mut self,
        change_type: ConfChangeType,
        node_id: u64,
        record: Option<&NodeRecord>,
        reply: ProposeReply,
    ) {
        if !self.is_leader() {
            let _ = reply.send(Err(ClusterError::NotLeader {
                leader: self.leader_id(),
            }));
            return;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        if let Some(r) = record {
            cc.context = codec::encode(r).into();
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index > before {
                    self.pending_conf.push((index, reply));
                } else {
                    let _ = reply.send(Err(ClusterError::Invalid(
                        "the leader dropped the membership change".into(),
                    )));
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Asks for a linearizable read: the reply comes once this member has applied
    /// everything the leader had committed when the read was asked.
    pub fn read_index(&mut self, reply: ReadReply) {
        self.read_seq += 1;
        let ctx = self.read_seq.to_be_bytes().to_vec();
        self.reads.insert(ctx.clone(), reply);
        self.raw.read_index(ctx);
    }

    /// Fails every read still waiting for its read index (leadership changed hands and
    /// its fate is unknown); callers retry.
    fn fail_reads(&mut self) {
        for (_, r) in self.reads.drain() {
            let _ = r.send(Err(ClusterError::NotLeader { leader: 0 }));
        }
    }

    /// Tells Raft that a message to `id` could not be sent.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Members that are learners and have caught up with the leader's commit index,
    /// within `slack` entries: ready to become voters.
    pub fn caught_up_learners(&self, slack: u64) -> Vec<u64> {
        if !self.is_leader() {
            return Vec::new();
        }
        let commit = self.raw.raft.raft_log.committed;
        let learners = self.raw.raft.prs().conf().learners().clone();
        learners
            .into_iter()
            .filter(|id| {
                self.raw.raft.prs().get(*id).is_some_and(|p| {
                    p.state != raft::ProgressState::Snapshot
                        && p.matched > 0
                        && p.matched + slack >= commit
                })
            })
            .collect()
    }

    /// The member's Raft status.
    /// Stores the scrape figures in `gauges` (cheap: no allocation).
    pub fn publish(&self, gauges: &crate::gauges::RaftGauges) {
        let r = &self.raw.raft;
        gauges.store(
            r.term,
            r.raft_log.committed,
            self.applied,
            r.leader_id,
            self.is_leader(),
        );
    }

    pub fn status(&self) -> RaftStatus {
        let r = &self.raw.raft;
        let conf = r.prs().conf();
        let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
        voters.sort_unstable();
        let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
        learners.sort_unstable();
        let mut matched: Vec<(u64, u64)> = if self.is_leader() {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            Vec::new()
        };
        matched.sort_unstable();
        RaftStatus {
            id: r.id,
            leader_id: r.leader_id,
            term: r.term,
            role: format!("{:?}", r.state).to_lowercase(),
            commit_index: r.raft_log.committed,
            applied_index: self.applied,
            snapshot_index: self.snapshot_index,
            first_index: r.raft_log.first_index(),
            last_index: r.raft_log.last_index(),
            voters,
            learners,
            matched,
        }
    }

    /// Whether raft-rs has something to persist, send or apply.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Processes whatever Raft has ready: persists, applies, and returns the messages
    /// to send to other members.
    pub fn on_ready(&mut self) -> Result<Vec<Message>, ClusterError> {
        let mut out = Vec::new();
        if !self.raw.has_ready() {
            self.answer_reads();
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        // 0. Leadership changed: raft-rs drops the read requests it had not answered, so
        //    their callers are told to retry instead of waiting for their timeout.
        if rd.ss().is_some() {
            self.fail_reads();
        }
        // 1. A leader may send before persisting (Raft thesis 10.2.1).
        out.extend(rd.take_messages());
        // 2. A snapshot from the leader replaces the state wholesale.
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        // 3. Apply what is committed.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        // 4. Persist new entries and the hard state (the storage flushes).
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hardstate(hs.clone())?;
        }
        // 5. Messages that must wait for persistence.
        out.extend(rd.take_persisted_messages());
        for rs in rd.take_read_states() {
            if let Some(reply) = self.reads.remove(&rs.request_ctx) {
                self.reads_waiting.push((rs.index, reply));
            }
        }
        // 6. Advance.
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        out.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        self.answer_reads();
        self.maybe_snapshot()?;
        if !self.is_leader() && !self.pending.is_empty() {
            // Proposals made as leader may never commit now; their callers retry.
            for (_, replies) in self.pending.drain() {
                for r in replies {
                    let _ = r.send(Err(ClusterError::NotLeader {
                        leader: self.raw.raft.leader_id,
                    }));
                }
            }
        }
        Ok(out)
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_waiting = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), ClusterError> {
        let index = snap.get_metadata().index;
        let state = ClusterState::restore(&snap.data)?;
        self.raw.mut_store().apply_snapshot(snap)?;
        self.state = state;
        self.tokens_changed = true;
        self.publish_tokens();
        self.applied = index;
        self.snapshot_index = index;
        tracing::info!(index, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), ClusterError> {
        let mut answers = Vec::new();
        let mut result = Ok(());
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {}
                EntryType::EntryNormal => {
                    if let Some(answer) = self.apply_command(&entry) {
                        answers.push(answer);
                    }
                }
                EntryType::EntryConfChange => {
                    if let Err(e) = self.apply_conf_change(&entry) {
                        result = Err(e);
                        break;
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(index = entry.index, "ignoring a ConfChangeV2 entry");
                }
            }
            self.applied = entry.index;
        }
        // Publish before answering: a proposer that hears "applied" and acts on it (a
        // client using the token it just created) must find the change.
        self.publish_tokens();
        for (replies, committed) in answers {
            for r in replies {
                let _ = r.send(Ok(committed.clone()));
            }
        }
        result
    }

    /// Publishes the token table if it changed and a publisher is set.
    fn publish_tokens(&mut self) {
        if let Some(p) = &self.published {
            if std::mem::take(&mut self.tokens_changed) {
                p.set_tokens(self.state.tokens.clone());
            }
        }
    }

    /// From now on, the token table is published into `published` whenever it changes,
    /// before the proposals that changed it are answered. Publishes it now.
    pub fn publish_into(&mut self, published: Arc<Published>) {
        self.published = Some(published);
        self.tokens_changed = true;
        self.publish_tokens();
    }

    /// Applies one command; the replies waiting for it, with their answer.
    fn apply_command(&mut self, entry: &Entry) -> Option<(Vec<ProposeReply>, Committed)> {
        let env: CommandEnvelope = match codec::decode(&entry.data) {
            Ok(env) => env,
            Err(e) => {
                // Every member skips the same undecodable entry: the state stays the same
                // everywhere.
                tracing::error!(index = entry.index, error = %e, "skipping an entry that does not decode");
                return None;
            }
        };
        let outcome = self.state.apply(&env);
        if touches_tokens(&env.command) {
            self.tokens_changed = true;
        }
        self.pending.remove(&env.id).map(|replies| {
            (
                replies,
                Committed {
                    index: entry.index,
                    outcome,
                },
            )
        })
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), ClusterError> {
        let cc = ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| ClusterError::Invalid(format!("conf change: {e}")))?;
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(index = entry.index, error = %e, "membership change rejected");
                self.answer_conf(entry.index, Err(e.into()));
                return Ok(());
            }
        };
        self.raw.mut_store().set_conf_state(cs)?;
        self.snapshot_now = true;
        // The membership change shows in the replicated state too, deterministically.
        // A deterministic id for the membership record: a marker in the high bits, the
        // entry's index in the low ones (random proposal ids never look like this in
        // practice, and the dedupe window only spans recent ids).
        let id: CommandId = (0xC0F_C4A6E_u128 << 64) | u128::from(entry.index);
        let command = match cc.get_change_type() {
            ConfChangeType::AddLearnerNode | ConfChangeType::AddNode => {
                let role = if cc.get_change_type() == ConfChangeType::AddNode {
                    NodeRole::Voter
                } else {
                    NodeRole::Learner
                };
                match codec::decode::<NodeRecord>(&cc.context) {
                    Ok(mut rec) => {
                        rec.id = cc.node_id;
                        rec.role = role;
                        Some(Command::UpsertNode(rec))
                    }
                    Err(_) => Some(Command::SetNodeRole {
                        id: cc.node_id,
                        role,
                    }),
                }
            }
            ConfChangeType::RemoveNode => Some(Command::RemoveNode { id: cc.node_id }),
        };
        let outcome = match command {
            Some(command) => self.state.apply(&CommandEnvelope {
                id,
                issued_at_ms: 0,
                command,
            }),
            None => ApplyOutcome::Applied,
        };
        self.answer_conf(
            entry.index,
            Ok(Committed {
                index: entry.index,
                outcome,
            }),
        );
        Ok(())
    }

    fn answer_conf(&mut self, index: u64, result: Result<Committed, ClusterError>) {
        if let Some(pos) = self.pending_conf.iter().position(|(i, _)| *i == index) {
            let (_, reply) = self.pending_conf.remove(pos);
            let _ = reply.send(result);
        }
    }

    /// Snapshots the state past the threshold (and compacts the log), or right after a
    /// membership change (without compacting).
    fn maybe_snapshot(&mut self) -> Result<(), ClusterError> {
        let compact = self.applied >= self.snapshot_index + self.threshold;
        if !(compact || self.snapshot_now) || self.applied <= self.snapshot_index {
            return Ok(());
        }
        self.snapshot_now = false;
        let index = self.applied;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let data = self.state.snapshot();
        let store = self.raw.mut_store();
        store.create_snapshot(index, cs, data)?;
        self.snapshot_index = index;
        if compact {
            store.compact(index)?;
            tracing::info!(index, "snapshot taken and log compacted");
        }
        Ok(())
    }
}
