//! Cohort's cluster layer: the Raft log kept in sled, and the replicated [`ClusterState`]
//! applied from it.
//!
//! - [`storage::SledStorage`] is raft-rs's `Storage` on disk (the node's `raft/`
//!   directory): the log, the hard state, the conf state and the latest snapshot. Each
//!   write is flushed before it returns, so what Raft asked to persist is durable before
//!   the messages that depend on it leave the node or a client is told "accepted".
//! - [`state::ClusterState`] is the state machine: nodes, models, deployments, replica
//!   assignments, tokens and async jobs. Every node applies the same committed
//!   [`state::CommandEnvelope`]s in log order and reaches the same state; `apply` is
//!   deterministic, idempotent per command id, and never panics.
//! - Snapshots compact the log: the application serialises its `ClusterState`
//!   ([`ClusterState::snapshot`]) at an applied index, stores it with
//!   [`SledStorage::create_snapshot`], then drops the entries it covers with
//!   [`SledStorage::compact`]. A follower too far behind receives that snapshot, stores it
//!   with [`SledStorage::apply_snapshot`] and rebuilds its state with
//!   [`ClusterState::restore`].
//! - [`codec`] puts a format byte in front of everything stored, so a later release can
//!   read what an earlier one wrote.
//!
//! ```
//! use cohort_cluster::{ApplyOutcome, ClusterState, Command, CommandEnvelope, ModelRecord};
//!
//! let mut state = ClusterState::new();
//! let env = CommandEnvelope {
//!     id: 1,
//!     issued_at_ms: 1_700_000_000_000,
//!     command: Command::RegisterModel(ModelRecord {
//!         name: "mlp".into(),
//!         engine: "candle-mlp".into(),
//!         path: None,
//!         versions: Default::default(),
//!     }),
//! };
//! assert_eq!(state.apply(&env), ApplyOutcome::Applied);
//! // The same proposal, retried, is not applied twice.
//! assert_eq!(state.apply(&env), ApplyOutcome::Duplicate);
//! let copy = ClusterState::restore(&state.snapshot()).unwrap();
//! assert_eq!(copy, state);
//! ```

pub mod agent;
pub mod codec;
pub mod error;
pub mod gauges;
pub mod raft_actor;
pub mod raft_node;
pub mod state;
pub mod storage;
pub mod tokens;

pub use agent::{ClusterAgent, ClusterConfig};
pub use error::ClusterError;
pub use gauges::RaftGauges;
pub use raft_actor::{
    AuditQuery, ClusterHandle, ClusterView, MemberView, Published, RaftActor, RaftMsg,
};
pub use raft_node::{Committed, RaftNode, RaftSettings, RaftStatus};
pub use state::{
    month_of, next_month_start_ms, ApplyOutcome, Assignment, AuditEntry, AuditMeta, ClusterState,
    Command, CommandEnvelope, CommandId, Deployment, DeviceRecord, Entity, JobRecord, JobStatus,
    Lease, ModelRecord, NodeId, NodeRecord, NodeRole, NodeStatus, Rejection, TokenRecord,
    TokenRole, TokenStatus, VersionRecord, AUDIT_CAPACITY,
};
pub use storage::SledStorage;
pub use tokens::{MintedSecret, TokenKey};

/// Runs blocking work (disk writes with fsync, opening the store, tokenizing a long text)
/// from async code: under
/// `block_in_place` on a multi-threaded tokio runtime, so that the worker's other tasks
/// move to another worker instead of waiting; inline elsewhere (a current-thread runtime,
/// or no runtime), where there is no other worker to hand them to.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
