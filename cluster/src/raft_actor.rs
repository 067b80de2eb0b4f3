//! `RaftActor`: drives one [`RaftNode`] and carries its messages over ractor_cluster.
//!
//! Each node runs one RaftActor. It joins the process groups `cohort.raft` (every member)
//! and `cohort.raft.{id}` (itself), which ractor_cluster shares with every connected node,
//! so a message for member X goes to whatever actor is in `cohort.raft.{X}`. Messages
//! between members are [`Wire`] values: bincode with a version byte in front (Raft's own
//! messages inside are protobuf). There is no second network stack.
//!
//! The actor ticks on a timer, steps what peers send, and runs the ready loop after a
//! burst of messages rather than after each one, so that many proposals share one flush
//! to disk. Proposals made on a follower are forwarded to the leader and answered once
//! this node has applied them too (read-your-writes).
//!
//! Leader housekeeping, once a second: a node that asked to join is added as a learner,
//! promoted to voter once its log has caught up, and marked `down` when nothing has been
//! heard from it for `down_after` (`up` again when it speaks).
//!
//! Supervision: the RaftActor has no children. If it fails, its supervisor stops the
//! node: the process exits and, restarted, rebuilds its state from the sled log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use ractor::concurrency::JoinHandle;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use raft::eraftpb::{ConfChangeType, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::raft_node::{Committed, ProposeReply, RaftNode, RaftStatus, ReadReply};
use crate::state::{
    ApplyOutcome, AuditEntry, AuditMeta, Command, CommandEnvelope, NodeRecord, NodeStatus,
    TokenRecord,
};
use crate::tokens::TokenKey;
use crate::RaftGauges;
use crate::{codec, ClusterError};

/// The process group of every RaftActor.
pub const RAFT_GROUP: &str = "cohort.raft";

/// The process group of member `id`'s RaftActor.
pub fn member_group(id: u64) -> String {
    format!("{RAFT_GROUP}.{id}")
}

/// What members say to each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Wire {
    /// A Raft message (protobuf bytes) from member `from`.
    Raft { from: u64, msg: Vec<u8> },
    /// A node asks to join; sent to any member, forwarded to the leader.
    Join { record: NodeRecord },
    /// A follower forwards a proposal to the leader.
    Forward {
        from: u64,
        req: u64,
        env: CommandEnvelope,
    },
    /// A follower forwards a removal of a member to the leader.
    ForwardRemove { from: u64, req: u64, id: u64 },
    /// The leader's answer to a forwarded proposal.
    ForwardDone {
        req: u64,
        result: Result<(u64, ApplyOutcome), String>,
    },
}

/// Messages to the RaftActor.
pub enum RaftMsg {
    /// From another member (the only variant that crosses nodes).
    Wire(Vec<u8>),
    /// The timer.
    Tick,
    /// Run the ready loop (coalesced).
    Ready,
    /// Propose a command from this node.
    Propose {
        env: CommandEnvelope,
        reply: ProposeReply,
    },
    /// Remove a member (admin).
    RemoveMember { id: u64, reply: ProposeReply },
    /// A linearizable read barrier.
    Read { reply: ReadReply },
    /// The member's view of the cluster.
    View { reply: oneshot::Sender<ClusterView> },
    /// The node's HTTP address is now known (it binds after the cluster starts).
    SetHttpAddr(String),
    /// Audit entries from this member's state, newest first.
    Audit {
        query: AuditQuery,
        reply: oneshot::Sender<Vec<AuditEntry>>,
    },
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only entries at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only entries with a sequence number below this (paging back).
    pub before_seq: Option<u64>,
    /// Only this action, or actions starting with it followed by a dot (`token` matches
    /// `token.create`).
    pub action: Option<String>,
    /// Only this token's actions.
    pub who: Option<String>,
    /// At most this many.
    pub limit: usize,
}

impl AuditQuery {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.since_ms.is_none_or(|t| e.at_ms >= t)
            && self.before_seq.is_none_or(|s| e.seq < s)
            && self.who.as_ref().is_none_or(|w| &e.meta.who == w)
            && self.action.as_ref().is_none_or(|a| {
                e.meta.action == *a
                    || e.meta
                        .action
                        .strip_prefix(a.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            })
    }
}

/// What the RaftActor publishes for lock-free reads on the request path: the token table,
/// replaced whole whenever a committed command changes it, and the Raft figures for
/// scrapes, updated after each ready loop.
#[derive(Debug, Default)]
pub struct Published {
    tokens: RwLock<Arc<BTreeMap<String, TokenRecord>>>,
    /// Term, indexes, leadership, leader changes.
    pub gauges: RaftGauges,
}

impl Published {
    /// The token table as last applied on this member.
    pub fn tokens(&self) -> Arc<BTreeMap<String, TokenRecord>> {
        Arc::clone(&self.tokens.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn set_tokens(&self, tokens: BTreeMap<String, TokenRecord>) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
    }
}

const WIRE_VARIANT: &str = "wire";

impl ractor::Message for RaftMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            RaftMsg::Wire(args) => Ok(SerializedMessage::Cast {
                variant: WIRE_VARIANT.to_string(),
                args,
                metadata: None,
            }),
            _ => Err(BoxedDowncastErr),
        }
    }

    fn deserialize(m: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match m {
            SerializedMessage::Cast { variant, args, .. } if variant == WIRE_VARIANT => {
                Ok(RaftMsg::Wire(args))
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

/// One member as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Milliseconds since this node last heard from it (0 for itself; absent if never).
    pub last_seen_ms: Option<u64>,
}

/// A member's view of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub cluster_id: String,
    pub node_id: u64,
    pub nodes: Vec<MemberView>,
    pub raft: RaftStatus,
    /// Names of the models registered in the cluster state.
    pub models: Vec<String>,
}

/// Settings of the RaftActor.
#[derive(Debug, Clone)]
pub struct RaftActorSettings {
    /// How often Raft ticks.
    pub tick: Duration,
    /// A member silent this long is marked down.
    pub down_after: Duration,
    /// This node's record, as it should appear in the cluster.
    pub record: NodeRecord,
    /// Whether this node joins an existing cluster (asks to be added until it is).
    pub joining: bool,
}

/// The RaftActor.
pub struct RaftActor;

/// What the RaftActor starts with.
pub struct RaftActorArgs {
    pub node: RaftNode,
    pub settings: RaftActorSettings,
    /// Where the token table is published.
    pub published: Arc<Published>,
}

/// The RaftActor's state.
pub struct RaftActorState {
    node: RaftNode,
    settings: RaftActorSettings,
    ready_scheduled: bool,
    ticks: u64,
    next_req: u64,
    forwards: HashMap<u64, (ProposeReply, Instant)>,
    /// Forwarded proposals answered by the leader, waiting for this node to apply them.
    applied_waits: Vec<(u64, ProposeReply, ApplyOutcome)>,
    last_seen: HashMap<u64, Instant>,
    conf_change_pending: bool,
    timer: Option<JoinHandle<()>>,
    published: Arc<Published>,
}

impl RaftActorState {
    fn id(&self) -> u64 {
        self.node.id()
    }

    fn schedule_ready(&mut self, myself: &ActorRef<RaftMsg>) {
        if !self.ready_scheduled {
            self.ready_scheduled = true;
            let _ = myself.cast(RaftMsg::Ready);
        }
    }

    fn send_wire(&self, to: u64, wire: &Wire) -> bool {
        let members = ractor::pg::get_members(&member_group(to));
        let Some(cell) = members.into_iter().next() else {
            return false;
        };
        let actor: ActorRef<RaftMsg> = cell.into();
        actor.cast(RaftMsg::Wire(codec::encode(wire))).is_ok()
    }

    fn send_raft(&mut self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            let bytes = match m.write_to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a raft message");
                    continue;
                }
            };
            let wire = Wire::Raft {
                from: self.id(),
                msg: bytes,
            };
            if !self.send_wire(to, &wire) {
                // Not connected (yet, or any more): Raft retries on its own.
                self.node.report_unreachable(to);
            }
        }
    }

    fn run_ready(&mut self) -> Result<(), ClusterError> {
        let messages = self.node.on_ready()?;
        self.node.publish(&self.published.gauges);
        self.send_raft(messages);
        // Forwarded proposals: answer once applied here too.
        let applied = self.node.applied();
        let waits = std::mem::take(&mut self.applied_waits);
        for (index, reply, outcome) in waits {
            if index <= applied {
                let _ = reply.send(Ok(Committed { index, outcome }));
            } else {
                self.applied_waits.push((index, reply, outcome));
            }
        }
        Ok(())
    }

    fn propose_local(&mut self, env: CommandEnvelope, reply: ProposeReply) {
        if self.node.is_leader() {
            self.node.propose(&env, reply);
            return;
        }
        let from = self.id();
        self.forward_to_leader(|req| Wire::Forward { from, req, env }, reply);
    }

    /// Sends a request to the leader, remembering `reply` until the leader's
    /// [`Wire::ForwardDone`] comes back; answers NotLeader at once when no leader is known
    /// or it cannot be reached.
    fn forward_to_leader(&mut self, wire: impl FnOnce(u64) -> Wire, reply: ProposeReply) {
        let leader = self.node.leader_id();
        if leader == 0 {
            let _ = reply.send(Err(ClusterError::NotLeader { leader }));
            return;
        }
        self.next_req += 1;
        let req = self.next_req;
        if self.send_wire(leader, &wire(req)) {
            self.forwards.insert(req, (reply, Instant::now()));
        } else {
            let _ = reply.send(Err(ClusterError::NotLeader { leader }));
        }
    }

    /// A forwarded proposal: propose here and send the answer back when it commits.
    fn propose_for(
        &mut self,
        from: u64,
        req: u64,
        env: Option<CommandEnvelope>,
        remove: Option<u64>,
    ) {
        let (tx, rx) = oneshot::channel();
        match (env, remove) {
            (Some(env), _) => self.node.propose(&env, tx),
            (None, Some(id)) => {
                self.conf_change_pending = true;
                self.node
                    .propose_conf_change(ConfChangeType::RemoveNode, id, None, tx)
            }
            (None, None) => return,
        }
        tokio::spawn(async move {
            let result = match rx.await {
                Ok(Ok(c)) => Ok((c.index, c.outcome)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the leader dropped the proposal".to_string()),
            };
            let wire = Wire::ForwardDone { req, result };
            let members = ractor::pg::get_members(&member_group(from));
            if let Some(cell) = members.into_iter().next() {
                let actor: ActorRef<RaftMsg> = cell.into();
                let _ = actor.cast(RaftMsg::Wire(codec::encode(&wire)));
            }
        });
    }

    fn handle_wire(&mut self, bytes: &[u8]) -> Result<(), ClusterError> {
        let wire: Wire = codec::decode(bytes)?;
        match wire {
            Wire::Raft { from, msg } => {
                self.last_seen.insert(from, Instant::now());
                let msg = Message::parse_from_bytes(&msg)?;
                self.node.step(msg)?;
            }
            Wire::Join { record } => self.handle_join(record),
            Wire::Forward { from, req, env } => {
                self.last_seen.insert(from, Instant::now());
                if self.node.is_leader() {
                    self.propose_for(from, req, Some(env), None);
                } else {
                    let result = Err(format!(
                        "not the leader (leader: {})",
                        self.node.leader_id()
                    ));
                    self.send_wire(from, &Wire::ForwardDone { req, result });
                }
            }
            Wire::ForwardRemove { from, req, id } => {
                if self.node.is_leader() {
                    self.propose_for(from, req, None, Some(id));
                } else {
                    let result = Err(format!(
                        "not the leader (leader: {})",
                        self.node.leader_id()
                    ));
                    self.send_wire(from, &Wire::ForwardDone { req, result });
                }
            }
            Wire::ForwardDone { req, result } => {
                if let Some((reply, _)) = self.forwards.remove(&req) {
                    match result {
                        Ok((index, outcome)) => self.applied_waits.push((index, reply, outcome)),
                        Err(e) => {
                            let _ = reply.send(Err(ClusterError::Forward(e)));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn handle_join(&mut self, record: NodeRecord) {
        if !self.node.is_leader() {
            let leader = self.node.leader_id();
            if leader != 0 && leader != self.id() {
                self.send_wire(leader, &Wire::Join { record });
            }
            return;
        }
        let status = self.node.status();
        let id = record.id;
        if status.voters.contains(&id) || status.learners.contains(&id) || self.conf_change_pending
        {
            return;
        }
        tracing::info!(node = id, name = %record.name, addr = %record.cluster_addr, "adding a node as a learner");
        self.conf_change_pending = true;
        let (tx, rx) = oneshot::channel();
        self.node
            .propose_conf_change(ConfChangeType::AddLearnerNode, id, Some(&record), tx);
        drop(rx);
    }

    /// Once a second on the leader: membership and liveness.
    fn housekeeping(&mut self, myself: &ActorRef<RaftMsg>) {
        // A pending membership change is done once the log has no uncommitted conf change.
        let status = self.node.status();
        if self.conf_change_pending && status.applied_index >= status.last_index {
            self.conf_change_pending = false;
        }
        if !self.node.is_leader() {
            if self.settings.joining
                && !status.voters.contains(&self.id())
                && !status.learners.contains(&self.id())
            {
                self.ask_to_join();
            }
            return;
        }
        let me = self.id();
        // This node's own record, once per term or when it changed.
        let mine = self.node.state().nodes.get(&me).cloned();
        let want = &self.settings.record;
        let differs = mine.as_ref().is_none_or(|m| {
            m.name != want.name
                || m.cluster_addr != want.cluster_addr
                || m.http_addr != want.http_addr
                || m.status != NodeStatus::Up
        });
        if differs {
            let mut rec = want.clone();
            rec.role = mine.map_or(rec.role, |m| m.role);
            self.propose_internal(Command::UpsertNode(rec), myself);
        }
        if self.node.state().cluster_id.is_empty() {
            let id = format!("{:016x}", me ^ 0x00C0_4027_0000_0000);
            self.propose_internal(Command::SetClusterId { cluster_id: id }, myself);
        }
        if !self.conf_change_pending {
            if let Some(id) = self.node.caught_up_learners(10).into_iter().next() {
                tracing::info!(node = id, "promoting a caught-up learner to voter");
                self.conf_change_pending = true;
                let (tx, _rx) = oneshot::channel();
                self.node
                    .propose_conf_change(ConfChangeType::AddNode, id, None, tx);
            }
        }
        let now = Instant::now();
        let members: Vec<(u64, NodeStatus)> = self
            .node
            .state()
            .nodes
            .values()
            .filter(|n| n.id != me && n.status != NodeStatus::Removed)
            .map(|n| (n.id, n.status))
            .collect();
        for (id, status) in members {
            let silent = self
                .last_seen
                .get(&id)
                .is_none_or(|t| now.duration_since(*t) > self.settings.down_after);
            let want = if silent {
                NodeStatus::Down
            } else {
                NodeStatus::Up
            };
            if want != status {
                tracing::warn!(node = id, status = ?want, "member status changed");
                self.propose_internal(Command::SetNodeStatus { id, status: want }, myself);
            }
        }
    }

    fn propose_internal(&mut self, command: Command, myself: &ActorRef<RaftMsg>) {
        let env = CommandEnvelope::new(command, now_ms());
        let (tx, _rx) = oneshot::channel();
        self.node.propose(&env, tx);
        self.schedule_ready(myself);
    }

    fn ask_to_join(&self) {
        let me = self.id();
        let wire = codec::encode(&Wire::Join {
            record: self.settings.record.clone(),
        });
        for cell in ractor::pg::get_members(&RAFT_GROUP.to_string()) {
            if cell.get_id().is_local() {
                continue;
            }
            let actor: ActorRef<RaftMsg> = cell.into();
            let _ = actor.cast(RaftMsg::Wire(wire.clone()));
        }
        tracing::debug!(node = me, "asked the cluster to join");
    }

    fn view(&self) -> ClusterView {
        let now = Instant::now();
        let state = self.node.state();
        let nodes = state
            .nodes
            .values()
            .map(|r| MemberView {
                record: r.clone(),
                last_seen_ms: if r.id == self.id() {
                    Some(0)
                } else {
                    self.last_seen
                        .get(&r.id)
                        .map(|t| now.duration_since(*t).as_millis() as u64)
                },
            })
            .collect();
        ClusterView {
            cluster_id: state.cluster_id.clone(),
            node_id: self.id(),
            nodes,
            raft: self.node.status(),
            models: state.models.keys().cloned().collect(),
        }
    }

    fn expire_forwards(&mut self, timeout: Duration) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > timeout)
            .map(|(req, _)| *req)
            .collect();
        for req in expired {
            if let Some((reply, _)) = self.forwards.remove(&req) {
                let _ = reply.send(Err(ClusterError::Forward(
                    "the leader did not answer in time".into(),
                )));
            }
        }
    }
}

/// Milliseconds since the Unix epoch (command timestamps; never used inside `apply`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Actor for RaftActor {
    type Msg = RaftMsg;
    type State = RaftActorState;
    type Arguments = RaftActorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RaftActorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let id = args.node.id();
        ractor::pg::join(RAFT_GROUP.to_string(), vec![myself.get_cell()]);
        ractor::pg::join(member_group(id), vec![myself.get_cell()]);
        let timer = myself.send_interval(args.settings.tick, || RaftMsg::Tick);
        args.node.publish(&args.published.gauges);
        let mut node = args.node;
        node.publish_into(Arc::clone(&args.published));
        Ok(RaftActorState {
            node,
            settings: args.settings,
            ready_scheduled: false,
            ticks: 0,
            next_req: 0,
            forwards: HashMap::new(),
            applied_waits: Vec::new(),
            last_seen: HashMap::new(),
            conf_change_pending: false,
            timer: Some(timer),
            published: args.published,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RaftMsg::Wire(bytes) => {
                if let Err(e) = state.handle_wire(&bytes) {
                    tracing::warn!(error = %e, "dropping a message from a peer");
                }
                state.schedule_ready(&myself);
            }
            RaftMsg::Tick => {
                state.node.tick();
                state.ticks += 1;
                let per_second = (1000 / state.settings.tick.as_millis().max(1)) as u64;
                if state.ticks.is_multiple_of(per_second.max(1)) {
                    state.housekeeping(&myself);
                    state.expire_forwards(Duration::from_secs(10));
                }
                state.schedule_ready(&myself);
            }
            RaftMsg::Ready => {
                state.ready_scheduled = false;
                // Persists entries and hard state with an fsync each, and applies committed
                // entries: blocking work, kept off the async scheduler.
                if state.node.has_ready() {
                    crate::blocking(|| state.run_ready())?;
                } else {
                    state.run_ready()?;
                }
            }
            RaftMsg::Propose { env, reply } => {
                state.propose_local(env, reply);
                state.schedule_ready(&myself);
            }
            RaftMsg::RemoveMember { id, reply } => {
                if state.node.is_leader() {
                    state.conf_change_pending = true;
                    state
                        .node
                        .propose_conf_change(ConfChangeType::RemoveNode, id, None, reply);
                } else {
                    let from = state.id();
                    state.forward_to_leader(|req| Wire::ForwardRemove { from, req, id }, reply);
                }
                state.schedule_ready(&myself);
            }
            RaftMsg::Read { reply } => {
                state.node.read_index(reply);
                state.schedule_ready(&myself);
            }
            RaftMsg::View { reply } => {
                let _ = reply.send(state.view());
            }
            RaftMsg::SetHttpAddr(addr) => {
                state.settings.record.http_addr = addr;
            }
            RaftMsg::Audit { query, reply } => {
                let entries = state
                    .node
                    .state()
                    .audit
                    .iter()
                    .rev()
                    .filter(|e| query.matches(e))
                    .take(query.limit)
                    .cloned()
                    .collect();
                let _ = reply.send(entries);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        let id = state.id();
        ractor::pg::leave(RAFT_GROUP.to_string(), vec![myself.get_cell()]);
        ractor::pg::leave(member_group(id), vec![myself.get_cell()]);
        Ok(())
    }
}

/// How the rest of the node talks to the cluster: proposals, reads, views.
#[derive(Clone)]
pub struct ClusterHandle {
    actor: ActorRef<RaftMsg>,
    node_id: u64,
    published: Arc<Published>,
    token_key: TokenKey,
}

impl ClusterHandle {
    /// A handle on a running RaftActor that publishes into `published`.
    pub fn new(
        actor: ActorRef<RaftMsg>,
        node_id: u64,
        published: Arc<Published>,
        token_key: TokenKey,
    ) -> Self {
        ClusterHandle {
            actor,
            node_id,
            published,
            token_key,
        }
    }

    /// The token table as last applied on this member (no message, no wait).
    pub fn tokens(&self) -> Arc<BTreeMap<String, TokenRecord>> {
        self.published.tokens()
    }

    /// The key token secrets are hashed with.
    pub fn token_key(&self) -> &TokenKey {
        &self.token_key
    }

    /// The Raft figures for scrapes: term, indexes, leadership, leader changes. Lock-free
    /// and current to within one ready loop of the RaftActor.
    pub fn gauges(&self) -> &RaftGauges {
        &self.published.gauges
    }

    /// Proposes `command` with an audit record of who asked; the outcome is the command's.
    pub async fn propose_audited(
        &self,
        command: Command,
        meta: AuditMeta,
        timeout: Duration,
    ) -> Result<Committed, ClusterError> {
        self.propose(
            Command::Audited {
                meta,
                command: Box::new(command),
            },
            timeout,
        )
        .await
    }

    /// Audit entries from this member's state, newest first.
    pub async fn audit(
        &self,
        query: AuditQuery,
        timeout: Duration,
    ) -> Result<Vec<AuditEntry>, ClusterError> {
        let (tx, rx) = oneshot::channel();
        self.actor
            .cast(RaftMsg::Audit { query, reply: tx })
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ClusterError::Unavailable("the raft actor stopped".into())),
            Err(_) => Err(ClusterError::Timeout),
        }
    }

    /// This node's Raft id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The RaftActor.
    pub fn actor(&self) -> &ActorRef<RaftMsg> {
        &self.actor
    }

    /// Proposes a command and waits until it is committed and applied on this node.
    /// Retried (with the same command id, so it applies once) while there is no leader,
    /// until `timeout`.
    pub async fn propose(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<Committed, ClusterError> {
        let env = CommandEnvelope::new(command, now_ms());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let (tx, rx) = oneshot::channel();
            self.actor
                .cast(RaftMsg::Propose {
                    env: env.clone(),
                    reply: tx,
                })
                .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
            let err = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Ok(c))) => return Ok(c),
                Ok(Ok(Err(e))) => e,
                Ok(Err(_)) => ClusterError::Unavailable("the raft actor stopped".into()),
                Err(_) => return Err(ClusterError::Timeout),
            };
            if !err.retryable() || tokio::time::Instant::now() + backoff >= deadline {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Tells the cluster this node's HTTP address (once the gateway has bound it).
    pub fn set_http_addr(&self, addr: String) {
        let _ = self.actor.cast(RaftMsg::SetHttpAddr(addr));
    }

    /// Removes a member from the cluster.
    pub async fn remove_member(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<Committed, ClusterError> {
        let (tx, rx) = oneshot::channel();
        self.actor
            .cast(RaftMsg::RemoveMember { id, reply: tx })
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClusterError::Unavailable("the raft actor stopped".into())),
            Err(_) => Err(ClusterError::Timeout),
        }
    }

    /// This member's view. With `consistent`, first waits until this member has applied
    /// everything the leader had committed (ReadIndex), so the view is linearizable.
    pub async fn view(
        &self,
        consistent: bool,
        timeout: Duration,
    ) -> Result<ClusterView, ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        if consistent {
            loop {
                let (tx, rx) = oneshot::channel();
                self.actor
                    .cast(RaftMsg::Read { reply: tx })
                    .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
                let err = match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(_))) => break,
                    Ok(Ok(Err(e))) => e,
                    Ok(Err(_)) => {
                        return Err(ClusterError::Unavailable("the raft actor stopped".into()))
                    }
                    Err(_) => return Err(ClusterError::Timeout),
                };
                // A read lost to a leadership change is asked again.
                if !err.retryable() || tokio::time::Instant::now() + backoff >= deadline {
                    return Err(err);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.actor
            .cast(RaftMsg::View { reply: tx })
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ClusterError::Unavailable("the raft actor stopped".into())),
            Err(_) => Err(ClusterError::Timeout),
        }
    }
}
