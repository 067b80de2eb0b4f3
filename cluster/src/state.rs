//! [`ClusterState`]: the replicated state machine, and the [`Command`]s that change it.
//!
//! Every node applies the same committed commands in the same order, so every node must
//! reach the same state: [`ClusterState::apply`] reads no clock and no randomness (the
//! time of a command travels in its [`CommandEnvelope`]), iterates only ordered maps, and
//! never panics. A command that makes no sense against the current state is refused with
//! [`ApplyOutcome::Rejected`], which is itself a deterministic result.
//!
//! A proposal may be retried (its first attempt timed out, the leader changed): each
//! envelope carries an id, and an id applied once is answered [`ApplyOutcome::Duplicate`]
//! afterwards. The last [`APPLIED_IDS_CAPACITY`] ids are remembered, as part of the state,
//! so snapshots carry them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{decode, encode};
use crate::error::ClusterError;

/// A Raft node id (never 0).
pub type NodeId = u64;

/// The id of a command envelope; a retried proposal keeps its id.
pub type CommandId = u128;

/// How many applied command ids are remembered for deduplication.
pub const APPLIED_IDS_CAPACITY: usize = 100_000;

/// Whether a node is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Reachable and serving.
    Up,
    /// Unreachable or drained; its replicas are re-placed.
    Down,
    /// Removed from the cluster; its id is not reused.
    Removed,
}

/// A node's part in Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Votes and counts towards the quorum.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// One device of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// `cpu` or `cuda:N`.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The device's name (GPU model, CPU brand).
    pub name: String,
    /// Bytes of memory.
    pub total_memory: u64,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its Raft id.
    pub id: NodeId,
    /// Its name, unique among nodes not removed.
    pub name: String,
    /// `host:port` of its cluster (Raft, actors) listener.
    pub cluster_addr: String,
    /// `host:port` of its HTTP gateway.
    pub http_addr: String,
    /// Its devices.
    pub devices: Vec<DeviceRecord>,
    /// Free-form labels, for placement policies.
    pub labels: BTreeMap<String, String>,
    /// Whether it serves.
    pub status: NodeStatus,
    /// Its part in Raft.
    pub role: NodeRole,
}

/// One version of a model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Whether clients may ask for it.
    pub published: bool,
}

/// A registered model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The name clients use.
    pub name: String,
    /// The engine that runs it (`candle-mlp`, `onnx`, ...).
    pub engine: String,
    /// Its file, as each node resolves it.
    pub path: Option<String>,
    /// Its versions by name.
    pub versions: BTreeMap<String, VersionRecord>,
}

/// How a model is deployed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// The model deployed.
    pub model: String,
    /// The autoscaler never goes below this.
    pub min_replicas: u32,
    /// The autoscaler never goes above this.
    pub max_replicas: u32,
    /// How many replicas placement aims for now.
    pub desired_replicas: u32,
    /// `cpu`, `cuda:N`, `auto`, ...
    pub device_policy: String,
    /// Outstanding requests per replica the autoscaler aims for.
    pub target_load: f64,
    /// Share of requests (by weight) per version.
    pub traffic: BTreeMap<String, u32>,
}

/// One replica placed on one node's device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Unique across the cluster.
    pub replica_id: String,
    /// The model it serves.
    pub model: String,
    /// The version it serves.
    pub version: String,
    /// The node that runs it.
    pub node_id: NodeId,
    /// The device it runs on (`cpu`, `cuda:N`).
    pub device: String,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Everything: inference, models, nodes, tokens, audit.
    Admin,
    /// Inference and reading the models it may use.
    User,
}

/// Whether a token is accepted (expiry is checked apart, against `expires_at_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    /// Accepted (until it expires).
    Active,
    /// Refused until it is made active again.
    Paused,
    /// Refused from now on; revocation is final.
    Revoked,
}

/// An API token. Only a keyed hash of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its id (shown in lists and audit logs; part of the secret the client sends).
    pub id: String,
    /// A human-readable name.
    pub name: String,
    /// Keyed hash (HMAC-SHA256) of the secret.
    pub key_hash: Vec<u8>,
    /// What it may do.
    pub role: TokenRole,
    /// Glob patterns of the models it may use; empty means all.
    pub allowed_models: Vec<String>,
    /// CIDRs (or single addresses) it may come from; empty means any.
    pub ip_allow: Vec<String>,
    /// Requests per minute on each node (a token bucket), if limited.
    pub rate_per_minute: Option<u32>,
    /// Requests per calendar month (UTC), if limited.
    pub monthly_quota: Option<u64>,
    /// Requests counted in `used_month`.
    pub used: u64,
    /// The month `used` counts, as `yyyymm` (UTC); a later month starts again from 0.
    pub used_month: u32,
    /// When it stops being accepted (ms since the Unix epoch).
    pub expires_at_ms: Option<u64>,
    /// Active, paused or revoked.
    pub status: TokenStatus,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// Who created it (a token id, or `local` when auth is off).
    pub created_by: String,
}

/// The calendar month (UTC) of a time in ms since the Unix epoch, as `yyyymm`.
pub fn month_of(ms: u64) -> u32 {
    // Howard Hinnant's civil-from-days.
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year * 100 + month) as u32
}

/// The first instant (ms since the Unix epoch) of the month after the one `ms` falls in.
pub fn next_month_start_ms(ms: u64) -> u64 {
    let m = month_of(ms);
    let (mut y, mut mo) = ((m / 100) as i64, (m % 100) as i64);
    mo += 1;
    if mo > 12 {
        mo = 1;
        y += 1;
    }
    // days-from-civil.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days.max(0) as u64) * 86_400_000
}

impl TokenRecord {
    /// Requests counted in the month of `now_ms`.
    pub fn used_in(&self, now_ms: u64) -> u64 {
        if self.used_month == month_of(now_ms) {
            self.used
        } else {
            0
        }
    }
}

/// Who did an admin action, what, and in which request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditMeta {
    /// The token id that asked (`local` when auth is off).
    pub who: String,
    /// The action, such as `token.create` or `model.scale`.
    pub action: String,
    /// What it acted on (a token id, a model, a node id).
    pub target: String,
    /// The HTTP request's id.
    pub request_id: String,
    /// The client's address.
    pub client_ip: String,
    /// Details (the new replica count, the fields changed), as JSON text.
    pub detail: String,
}

/// One recorded admin action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increases by one per entry, across the cluster.
    pub seq: u64,
    /// When (ms since the Unix epoch, the proposer's clock).
    pub at_ms: u64,
    /// Who, what, which request.
    pub meta: AuditMeta,
    /// `ok`, `unchanged`, or why it was refused.
    pub outcome: String,
}

/// How many audit entries the state keeps (the oldest go first).
pub const AUDIT_CAPACITY: usize = 10_000;

/// Where an async job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Waiting for a runner.
    Queued,
    /// Leased by a runner.
    Running,
    /// Done; its result is published.
    Succeeded,
    /// Done; its error is published.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobStatus {
    /// Whether the job is finished (succeeded, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A runner's claim on a job. Only the holder of the current epoch may complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The node whose runner holds it.
    pub node_id: NodeId,
    /// Grows with each new lease of the job.
    pub epoch: u64,
    /// When another runner may take the job over (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// An async job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: String,
    /// The model it runs on.
    pub model: String,
    /// Where it is.
    pub status: JobStatus,
    /// The request body.
    pub payload: Vec<u8>,
    /// The response body, once succeeded.
    pub result: Option<Vec<u8>>,
    /// Why it failed, once failed.
    pub error: Option<String>,
    /// The current (or last) lease.
    pub lease: Option<Lease>,
    /// How many leases it has had.
    pub attempts: u32,
    /// When it was submitted (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When it last changed (ms since the Unix epoch).
    pub updated_at_ms: u64,
}

/// A change to the cluster's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a node or replaces its record. Refused for a node marked removed.
    UpsertNode(NodeRecord),
    /// Marks a node up, down or removed.
    SetNodeStatus {
        /// The node.
        id: NodeId,
        /// Its new status.
        status: NodeStatus,
    },
    /// Marks a node removed for good (a tombstone) and drops the assignments placed on it.
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// Registers a model if no model of that name exists (a node's configured models are
    /// registered at its start); otherwise changes nothing.
    RegisterModel(ModelRecord),
    /// Publishes or unpublishes a version of a model, adding the version if new.
    SetVersionPublished {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// Published or not.
        published: bool,
    },
    /// Deletes a model with its deployment and assignments.
    RemoveModel {
        /// The model.
        name: String,
    },
    /// Creates or replaces the deployment of a registered model.
    UpsertDeployment(Deployment),
    /// Replaces every assignment of `model` with `assignments`.
    SetAssignments {
        /// The model.
        model: String,
        /// Its replicas from now on.
        assignments: Vec<Assignment>,
    },
    /// Creates or replaces a token (its usage count is kept). Refused for a revoked token.
    UpsertToken(TokenRecord),
    /// Revokes a token for good.
    RevokeToken {
        /// The token.
        id: String,
    },
    /// Counts requests against a token's monthly quota (in the month of the envelope's
    /// time; a new month starts from 0).
    RecordTokenUsage {
        /// The token.
        id: String,
        /// Requests to add.
        amount: u64,
    },
    /// Applies `command` and records an audit entry with its outcome, in one entry.
    Audited {
        /// Who, what, which request.
        meta: AuditMeta,
        /// The change.
        command: Box<Command>,
    },
    /// Records an audit entry for an action that changes nothing replicated (a node's
    /// own replicas scaled, say).
    Audit(AuditMeta),
    /// Queues a new job (status, lease, result and times are set by the state machine).
    SubmitJob(JobRecord),
    /// Leases a job to a node's runner: a queued job, a job whose lease has expired
    /// (`epoch` must then exceed the old one), or a renewal by the current holder.
    LeaseJob {
        /// The job.
        id: String,
        /// The runner's node.
        node_id: NodeId,
        /// The lease's epoch.
        epoch: u64,
        /// When the lease runs out.
        expires_at_ms: u64,
    },
    /// Publishes a job's result. Only the current lease's epoch may; once a job is
    /// finished, later completions change nothing.
    CompleteJob {
        /// The job.
        id: String,
        /// The epoch of the lease the runner holds.
        epoch: u64,
        /// The response body, or why it failed.
        result: Result<Vec<u8>, String>,
    },
    /// Cancels a job that has not finished.
    CancelJob {
        /// The job.
        id: String,
    },
    /// Names the cluster, once: later ones change nothing.
    SetClusterId {
        /// The id.
        cluster_id: String,
    },
    /// Records a node's part in Raft (applied with membership changes).
    SetNodeRole {
        /// The node.
        id: NodeId,
        /// Its part.
        role: NodeRole,
    },
    /// Changes an existing token from `before` to `after` (usage counts kept), only if its
    /// settings are still `before`: a change made in between (on another node, or one this
    /// node had not applied yet when it read the token) is a conflict, not lost. Refused
    /// for a revoked token. (Appended last: entries already in logs keep their variant
    /// numbers.)
    UpdateToken {
        /// The token as it was read.
        before: Box<TokenRecord>,
        /// The token as it should be.
        after: Box<TokenRecord>,
    },
}

/// A command as proposed through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// Unique per proposal; a retry keeps it.
    pub id: CommandId,
    /// When the proposer issued it (ms since the Unix epoch): the only clock `apply` sees.
    pub issued_at_ms: u64,
    /// The change.
    pub command: Command,
}

impl CommandEnvelope {
    /// A proposal of `command` with a fresh random id.
    pub fn new(command: Command, issued_at_ms: u64) -> CommandEnvelope {
        let id = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
        CommandEnvelope {
            id,
            issued_at_ms,
            command,
        }
    }

    /// Encodes the envelope for a Raft entry.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes an envelope from a Raft entry.
    pub fn decode(bytes: &[u8]) -> Result<CommandEnvelope, ClusterError> {
        decode(bytes)
    }
}

/// The kind of thing a command names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entity {
    /// A node.
    Node,
    /// A model.
    Model,
    /// A model's version.
    Version,
    /// A token.
    Token,
    /// A job.
    Job,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// It names something that does not exist.
    #[error("{kind:?} {id:?} not found")]
    NotFound {
        /// What kind of thing.
        kind: Entity,
        /// Its id or name.
        id: String,
    },
    /// It conflicts with the current state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// It is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A job runner's lease is no longer the job's current one.
    #[error("job {job:?}: lease epoch {given} is not the current epoch {current}")]
    StaleEpoch {
        /// The job.
        job: String,
        /// The job's current lease epoch (0: none).
        current: u64,
        /// The epoch the runner holds.
        given: u64,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// The state changed.
    Applied,
    /// The command was valid but there was nothing to change (a model already
    /// registered, a job already finished, a token already revoked).
    Unchanged,
    /// An envelope with this id was applied before; nothing was done this time.
    Duplicate,
    /// The command was refused; nothing changed.
    Rejected(Rejection),
}

/// The ids of the last [`APPLIED_IDS_CAPACITY`] applied envelopes, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AppliedIds {
    order: VecDeque<CommandId>,
    set: BTreeSet<CommandId>,
}

impl AppliedIds {
    /// Records `id`; false if it was already recorded.
    fn insert(&mut self, id: CommandId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > APPLIED_IDS_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Serialize for AppliedIds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.order.iter())
    }
}

impl<'de> Deserialize<'de> for AppliedIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AppliedIds, D::Error> {
        let order = VecDeque::<CommandId>::deserialize(d)?;
        if order.len() > APPLIED_IDS_CAPACITY {
            return Err(serde::de::Error::custom("too many applied command ids"));
        }
        let set: BTreeSet<CommandId> = order.iter().copied().collect();
        if set.len() != order.len() {
            return Err(serde::de::Error::custom("repeated applied command id"));
        }
        Ok(AppliedIds { order, set })
    }
}

/// The cluster's desired state, replicated through Raft.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Registered models by name.
    pub models: BTreeMap<String, ModelRecord>,
    /// Deployments by model name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replica assignments by replica id.
    pub assignments: BTreeMap<String, Assignment>,
    /// Tokens by id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Jobs by id.
    pub jobs: BTreeMap<String, JobRecord>,
    /// The cluster's id, set once by its first leader.
    pub cluster_id: String,
    /// The last [`AUDIT_CAPACITY`] admin actions, oldest first.
    pub audit: VecDeque<AuditEntry>,
    /// The sequence number of the last audit entry.
    pub audit_seq: u64,
    applied_commands: AppliedIds,
}

fn not_found(kind: Entity, id: impl ToString) -> ApplyOutcome {
    ApplyOutcome::Rejected(Rejection::NotFound {
        kind,
        id: id.to_string(),
    })
}

fn conflict(msg: String) -> ApplyOutcome {
    ApplyOutcome::Rejected(Rejection::Conflict(msg))
}

fn invalid(msg: String) -> ApplyOutcome {
    ApplyOutcome::Rejected(Rejection::Invalid(msg))
}

impl ClusterState {
    /// An empty state.
    pub fn new() -> ClusterState {
        ClusterState::default()
    }

    /// Whether an envelope with this id is still remembered as applied.
    pub fn was_applied(&self, id: CommandId) -> bool {
        self.applied_commands.set.contains(&id)
    }

    /// The assignments of one model, by replica id.
    pub fn assignments_of<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Assignment> {
        self.assignments.values().filter(move |a| a.model == model)
    }

    /// Applies a committed command. Deterministic, and applies an id at most once.
    pub fn apply(&mut self, env: &CommandEnvelope) -> ApplyOutcome {
        if !self.applied_commands.insert(env.id) {
            return ApplyOutcome::Duplicate;
        }
        self.apply_command(&env.command, env.issued_at_ms)
    }

    fn apply_command(&mut self, command: &Command, now: u64) -> ApplyOutcome {
        match command {
            Command::UpsertNode(node) => self.upsert_node(node),
            Command::SetNodeStatus { id, status } => self.set_node_status(*id, *status),
            Command::RemoveNode { id } => self.remove_node(*id),
            Command::RegisterModel(model) => self.register_model(model),
            Command::SetVersionPublished {
                model,
                version,
                published,
            } => self.set_version_published(model, version, *published),
            Command::RemoveModel { name } => self.remove_model(name),
            Command::UpsertDeployment(d) => self.upsert_deployment(d),
            Command::SetAssignments { model, assignments } => {
                self.set_assignments(model, assignments)
            }
            Command::UpsertToken(token) => self.upsert_token(token, now),
            Command::UpdateToken { before, after } => self.update_token(before, after, now),
            Command::RevokeToken { id } => self.revoke_token(id, now),
            Command::RecordTokenUsage { id, amount } => self.record_token_usage(id, *amount, now),
            Command::Audited { meta, command } => {
                if matches!(**command, Command::Audited { .. }) {
                    return invalid("an audited command cannot hold another".into());
                }
                let outcome = self.apply_command(command, now);
                self.record_audit(meta, now, &outcome);
                outcome
            }
            Command::Audit(meta) => {
                self.record_audit(meta, now, &ApplyOutcome::Applied);
                ApplyOutcome::Applied
            }
            Command::SubmitJob(job) => self.submit_job(job, now),
            Command::LeaseJob {
                id,
                node_id,
                epoch,
                expires_at_ms,
            } => self.lease_job(
                id,
                Lease {
                    node_id: *node_id,
                    epoch: *epoch,
                    expires_at_ms: *expires_at_ms,
                },
                now,
            ),
            Command::CompleteJob { id, epoch, result } => {
                self.complete_job(id, *epoch, result, now)
            }
            Command::CancelJob { id } => self.cancel_job(id, now),
            Command::SetClusterId { cluster_id } => {
                if !self.cluster_id.is_empty() || cluster_id.is_empty() {
                    ApplyOutcome::Unchanged
                } else {
                    self.cluster_id = cluster_id.clone();
                    ApplyOutcome::Applied
                }
            }
            Command::SetNodeRole { id, role } => match self.nodes.get_mut(id) {
                None => not_found(Entity::Node, id),
                Some(n) if n.role == *role => ApplyOutcome::Unchanged,
                Some(n) => {
                    n.role = *role;
                    ApplyOutcome::Applied
                }
            },
        }
    }

    /// The state as bytes (format byte + bincode), for a Raft snapshot.
    pub fn snapshot(&self) -> Vec<u8> {
        encode(self)
    }

    /// The state that [`ClusterState::snapshot`] wrote.
    pub fn restore(bytes: &[u8]) -> Result<ClusterState, ClusterError> {
        decode(bytes)
    }

    fn upsert_node(&mut self, node: &NodeRecord) -> ApplyOutcome {
        if node.id == 0 {
            return invalid("node id 0 is reserved".into());
        }
        if node.name.is_empty() {
            return invalid("node name is empty".into());
        }
        if let Some(old) = self.nodes.get(&node.id) {
            if old.status == NodeStatus::Removed {
                return conflict(format!("node {} was removed; join with a new id", node.id));
            }
        }
        if let Some(other) = self
            .nodes
            .values()
            .find(|n| n.id != node.id && n.name == node.name && n.status != NodeStatus::Removed)
        {
            return conflict(format!(
                "node name {:?} is taken by node {}",
                node.name, other.id
            ));
        }
        self.nodes.insert(node.id, node.clone());
        ApplyOutcome::Applied
    }

    fn set_node_status(&mut self, id: NodeId, status: NodeStatus) -> ApplyOutcome {
        let Some(node) = self.nodes.get_mut(&id) else {
            return not_found(Entity::Node, id);
        };
        if node.status == status {
            return ApplyOutcome::Unchanged;
        }
        if node.status == NodeStatus::Removed {
            return conflict(format!("node {id} was removed"));
        }
        node.status = status;
        ApplyOutcome::Applied
    }

    /// Marks a node removed (its record stays as a tombstone, so that a removed node that
    /// is still running cannot rejoin under the same id) and drops its assignments.
    fn remove_node(&mut self, id: NodeId) -> ApplyOutcome {
        let Some(node) = self.nodes.get_mut(&id) else {
            return not_found(Entity::Node, id);
        };
        if node.status == NodeStatus::Removed {
            return ApplyOutcome::Unchanged;
        }
        node.status = NodeStatus::Removed;
        self.assignments.retain(|_, a| a.node_id != id);
        ApplyOutcome::Applied
    }

    fn register_model(&mut self, model: &ModelRecord) -> ApplyOutcome {
        if model.name.is_empty() {
            return invalid("model name is empty".into());
        }
        if model.engine.is_empty() {
            return invalid(format!("model {:?} has no engine", model.name));
        }
        if self.models.contains_key(&model.name) {
            return ApplyOutcome::Unchanged;
        }
        self.models.insert(model.name.clone(), model.clone());
        ApplyOutcome::Applied
    }

    fn set_version_published(
        &mut self,
        model: &str,
        version: &str,
        published: bool,
    ) -> ApplyOutcome {
        if version.is_empty() {
            return invalid("version is empty".into());
        }
        let Some(record) = self.models.get_mut(model) else {
            return not_found(Entity::Model, model);
        };
        let v = record.versions.entry(version.to_string()).or_default();
        if v.published == published {
            return ApplyOutcome::Unchanged;
        }
        v.published = published;
        ApplyOutcome::Applied
    }

    fn remove_model(&mut self, name: &str) -> ApplyOutcome {
        if self.models.remove(name).is_none() {
            return not_found(Entity::Model, name);
        }
        self.deployments.remove(name);
        self.assignments.retain(|_, a| a.model != name);
        ApplyOutcome::Applied
    }

    fn upsert_deployment(&mut self, d: &Deployment) -> ApplyOutcome {
        let Some(model) = self.models.get(&d.model) else {
            return not_found(Entity::Model, &d.model);
        };
        if d.min_replicas > d.max_replicas {
            return invalid(format!(
                "min_replicas {} is above max_replicas {}",
                d.min_replicas, d.max_replicas
            ));
        }
        if d.desired_replicas < d.min_replicas || d.desired_replicas > d.max_replicas {
            return invalid(format!(
                "desired_replicas {} is outside [{}, {}]",
                d.desired_replicas, d.min_replicas, d.max_replicas
            ));
        }
        if !d.target_load.is_finite() || d.target_load <= 0.0 {
            return invalid(format!(
                "target_load {} must be a positive number",
                d.target_load
            ));
        }
        if let Some(v) = d.traffic.keys().find(|v| !model.versions.contains_key(*v)) {
            return not_found(Entity::Version, format!("{}:{v}", d.model));
        }
        self.deployments.insert(d.model.clone(), d.clone());
        ApplyOutcome::Applied
    }

    fn set_assignments(&mut self, model: &str, assignments: &[Assignment]) -> ApplyOutcome {
        if !assignments.is_empty() && !self.models.contains_key(model) {
            return not_found(Entity::Model, model);
        }
        let mut ids = BTreeSet::new();
        for a in assignments {
            if a.model != model {
                return invalid(format!(
                    "assignment {:?} is for model {:?}, not {model:?}",
                    a.replica_id, a.model
                ));
            }
            if a.replica_id.is_empty() {
                return invalid("replica id is empty".into());
            }
            if !ids.insert(a.replica_id.as_str()) {
                return invalid(format!("replica id {:?} is repeated", a.replica_id));
            }
            match self.nodes.get(&a.node_id) {
                None => return not_found(Entity::Node, a.node_id),
                Some(n) if n.status == NodeStatus::Removed => {
                    return conflict(format!("node {} was removed", a.node_id))
                }
                Some(_) => {}
            }
            if let Some(other) = self.assignments.get(&a.replica_id) {
                if other.model != model {
                    return conflict(format!(
                        "replica id {:?} belongs to model {:?}",
                        a.replica_id, other.model
                    ));
                }
            }
        }
        self.assignments.retain(|_, a| a.model != model);
        for a in assignments {
            self.assignments.insert(a.replica_id.clone(), a.clone());
        }
        ApplyOutcome::Applied
    }

    /// Whether `t` is an admin token accepted at `now`.
    fn admits(t: &TokenRecord, now: u64) -> bool {
        t.role == TokenRole::Admin
            && t.status == TokenStatus::Active
            && t.expires_at_ms.is_none_or(|e| e > now)
    }

    /// Refuses a change that would leave no admin token accepted: nobody could manage
    /// tokens any more.
    fn keeps_an_admin(
        &self,
        id: &str,
        after: Option<&TokenRecord>,
        now: u64,
    ) -> Result<(), ApplyOutcome> {
        let was = self.tokens.get(id).is_some_and(|t| Self::admits(t, now));
        let stays = after.is_some_and(|t| Self::admits(t, now));
        let others = self
            .tokens
            .values()
            .any(|t| t.id != id && Self::admits(t, now));
        if was && !stays && !others {
            return Err(conflict(format!(
                "token {id:?} is the last active admin token: create another admin token first"
            )));
        }
        Ok(())
    }

    fn upsert_token(&mut self, token: &TokenRecord, now: u64) -> ApplyOutcome {
        if token.id.is_empty() {
            return invalid("token id is empty".into());
        }
        if let Err(refused) = self.keeps_an_admin(&token.id, Some(token), now) {
            return refused;
        }
        let mut token = token.clone();
        if let Some(old) = self.tokens.get(&token.id) {
            if old.status == TokenStatus::Revoked {
                return conflict(format!("token {:?} is revoked", token.id));
            }
            token.used = old.used;
            token.used_month = old.used_month;
            token.created_at_ms = old.created_at_ms;
            token.created_by = old.created_by.clone();
        }
        self.tokens.insert(token.id.clone(), token);
        ApplyOutcome::Applied
    }

    fn update_token(
        &mut self,
        before: &TokenRecord,
        after: &TokenRecord,
        now: u64,
    ) -> ApplyOutcome {
        if before.id != after.id {
            return invalid(format!(
                "a token update cannot change its id ({:?} to {:?})",
                before.id, after.id
            ));
        }
        let Some(current) = self.tokens.get(&before.id) else {
            return not_found(Entity::Token, &before.id);
        };
        // Usage counts change with every request; they are not settings.
        let settings = |t: &TokenRecord| TokenRecord {
            used: 0,
            used_month: 0,
            ..t.clone()
        };
        if settings(current) != settings(before) {
            return conflict(format!("token {:?} changed since it was read", before.id));
        }
        self.upsert_token(after, now)
    }

    fn revoke_token(&mut self, id: &str, now: u64) -> ApplyOutcome {
        if let Err(refused) = self.keeps_an_admin(id, None, now) {
            return refused;
        }
        let Some(token) = self.tokens.get_mut(id) else {
            return not_found(Entity::Token, id);
        };
        if token.status == TokenStatus::Revoked {
            return ApplyOutcome::Unchanged;
        }
        token.status = TokenStatus::Revoked;
        ApplyOutcome::Applied
    }

    fn record_token_usage(&mut self, id: &str, amount: u64, now: u64) -> ApplyOutcome {
        let Some(token) = self.tokens.get_mut(id) else {
            return not_found(Entity::Token, id);
        };
        if amount == 0 {
            return ApplyOutcome::Unchanged;
        }
        let month = month_of(now);
        if month > token.used_month {
            token.used_month = month;
            token.used = 0;
        }
        // Usage counted late, in a month already over, is not moved into this one.
        if month == token.used_month {
            token.used = token.used.saturating_add(amount);
        }
        ApplyOutcome::Applied
    }

    fn record_audit(&mut self, meta: &AuditMeta, now: u64, outcome: &ApplyOutcome) {
        self.audit_seq += 1;
        let outcome = match outcome {
            ApplyOutcome::Applied => "ok".to_string(),
            ApplyOutcome::Unchanged | ApplyOutcome::Duplicate => "unchanged".to_string(),
            ApplyOutcome::Rejected(r) => format!("rejected: {r}"),
        };
        self.audit.push_back(AuditEntry {
            seq: self.audit_seq,
            at_ms: now,
            meta: meta.clone(),
            outcome,
        });
        while self.audit.len() > AUDIT_CAPACITY {
            self.audit.pop_front();
        }
    }

    fn submit_job(&mut self, job: &JobRecord, now: u64) -> ApplyOutcome {
        if job.id.is_empty() {
            return invalid("job id is empty".into());
        }
        if self.jobs.contains_key(&job.id) {
            return conflict(format!("job {:?} exists", job.id));
        }
        if !self.models.contains_key(&job.model) {
            return not_found(Entity::Model, &job.model);
        }
        let record = JobRecord {
            id: job.id.clone(),
            model: job.model.clone(),
            status: JobStatus::Queued,
            payload: job.payload.clone(),
            result: None,
            error: None,
            lease: None,
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.jobs.insert(record.id.clone(), record);
        ApplyOutcome::Applied
    }

    fn lease_job(&mut self, id: &str, lease: Lease, now: u64) -> ApplyOutcome {
        let Some(job) = self.jobs.get_mut(id) else {
            return not_found(Entity::Job, id);
        };
        if job.status.is_terminal() {
            return conflict(format!("job {id:?} is finished"));
        }
        if lease.expires_at_ms <= now {
            return invalid(format!(
                "lease of job {id:?} expires at {} ms, not after now ({now} ms)",
                lease.expires_at_ms
            ));
        }
        let current = job.lease.map_or(0, |l| l.epoch);
        if let Some(old) = job.lease {
            let renewal = job.status == JobStatus::Running
                && old.node_id == lease.node_id
                && old.epoch == lease.epoch;
            if renewal {
                job.lease = Some(lease);
                job.updated_at_ms = now;
                return ApplyOutcome::Applied;
            }
            if job.status == JobStatus::Running && old.expires_at_ms > now {
                return conflict(format!(
                    "job {id:?} is leased to node {} until {} ms",
                    old.node_id, old.expires_at_ms
                ));
            }
        }
        if lease.epoch <= current {
            return ApplyOutcome::Rejected(Rejection::StaleEpoch {
                job: id.to_string(),
                current,
                given: lease.epoch,
            });
        }
        job.status = JobStatus::Running;
        job.lease = Some(lease);
        job.attempts = job.attempts.saturating_add(1);
        job.updated_at_ms = now;
        ApplyOutcome::Applied
    }

    fn complete_job(
        &mut self,
        id: &str,
        epoch: u64,
        result: &Result<Vec<u8>, String>,
        now: u64,
    ) -> ApplyOutcome {
        let Some(job) = self.jobs.get_mut(id) else {
            return not_found(Entity::Job, id);
        };
        if job.status.is_terminal() {
            // Published once: a second run's result is dropped.
            return ApplyOutcome::Unchanged;
        }
        let current = job.lease.map_or(0, |l| l.epoch);
        if job.status != JobStatus::Running || current != epoch {
            return ApplyOutcome::Rejected(Rejection::StaleEpoch {
                job: id.to_string(),
                current,
                given: epoch,
            });
        }
        match result {
            Ok(bytes) => {
                job.status = JobStatus::Succeeded;
                job.result = Some(bytes.clone());
            }
            Err(e) => {
                job.status = JobStatus::Failed;
                job.error = Some(e.clone());
            }
        }
        job.updated_at_ms = now;
        ApplyOutcome::Applied
    }

    fn cancel_job(&mut self, id: &str, now: u64) -> ApplyOutcome {
        let Some(job) = self.jobs.get_mut(id) else {
            return not_found(Entity::Job, id);
        };
        if job.status.is_terminal() {
            return ApplyOutcome::Unchanged;
        }
        job.status = JobStatus::Cancelled;
        job.updated_at_ms = now;
        ApplyOutcome::Applied
    }
}

#[cfg(test)]
mod tests;
