//! `Router`: picks the replica that serves each request.
//!
//! The Router actor owns the node's routing table: which models exist and which replicas
//! serve them. It is the only writer; each change builds a new table and publishes it
//! through the [`RouterHandle`]. Request handlers only read: they take the published
//! snapshot (one atomic reference count) and pick a replica with the power of two random
//! choices on outstanding requests (queued + running), a choice that needs no lock and no
//! message on the request's path. Models that wait to fill batches
//! (`max_queue_delay_us > 0`) are routed to fill batches instead: to the replica whose
//! queue is fullest without holding a full batch yet. Replica state is read live from each replica, so a
//! replica that is loading, restarting or draining is skipped at once.
//!
//! Supervision: the Router has no children. If it dies, the NodeSupervisor restarts it;
//! the table lives in the handle, so nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cohort_config::ModelConfig;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::replica::{Pending, ReplicaShared};
use crate::InferError;

/// One model as the router sees it.
#[derive(Clone)]
pub struct ModelRoute {
    pub config: ModelConfig,
    pub replicas: Vec<Arc<ReplicaShared>>,
}

/// The routing table: models and their replicas.
#[derive(Clone, Default)]
pub struct RoutingTable {
    models: HashMap<String, ModelRoute>,
}

impl RoutingTable {
    /// A model's route.
    pub fn get(&self, model: &str) -> Option<&ModelRoute> {
        self.models.get(model)
    }

    /// Every model, sorted by name.
    pub fn models(&self) -> Vec<(&String, &ModelRoute)> {
        let mut v: Vec<_> = self.models.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Whether every model that should run has a ready replica.
    pub fn all_ready(&self) -> bool {
        self.models
            .values()
            .all(|m| m.config.replicas == 0 || m.replicas.iter().any(|r| r.is_ready()))
    }

    /// Whether start-up has settled: every model that should run has a ready replica or
    /// has only failed ones (which will not become ready by waiting).
    pub fn settled(&self) -> bool {
        self.models.values().all(|m| {
            m.config.replicas == 0
                || m.replicas.iter().any(|r| r.is_ready())
                || (!m.replicas.is_empty()
                    && m.replicas
                        .iter()
                        .all(|r| r.state() == crate::ReplicaState::Failed))
        })
    }

    /// Picks a ready replica of `model`: two at random, the less loaded one wins.
    pub fn pick(&self, model: &str) -> Result<Arc<ReplicaShared>, InferError> {
        let route = self
            .models
            .get(model)
            .ok_or_else(|| InferError::ModelNotFound(model.to_string()))?;
        let ready: Vec<&Arc<ReplicaShared>> =
            route.replicas.iter().filter(|r| r.is_ready()).collect();
        let chosen = match ready.len() {
            0 => {
                let reason = match route.replicas.first() {
                    None => "no replicas are configured".to_string(),
                    Some(r) => match r.last_error() {
                        Some(e) => format!("replica state {}: {e}", r.state().as_str()),
                        None => format!("replica state {}", r.state().as_str()),
                    },
                };
                return Err(InferError::NoReplica {
                    model: model.to_string(),
                    reason,
                });
            }
            1 => ready[0],
            _ if route.config.batching.max_queue_delay_us > 0 && ready[0].max_rows() > 1 => {
                fill_batches(&ready, ready[0].max_rows())
            }
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                if ready[b].outstanding() < ready[a].outstanding() {
                    ready[b]
                } else {
                    ready[a]
                }
            }
        };
        Ok(Arc::clone(chosen))
    }
}

/// Batch-filling choice, for models that wait to fill batches (`max_queue_delay_us > 0`):
/// the replica whose queue is fullest but not yet a full batch, so that waiting requests
/// gather on one replica and leave as one full batch instead of being split into two
/// half batches; ties go to the replica with fewer outstanding requests.
fn fill_batches<'a>(ready: &[&'a Arc<ReplicaShared>], max_batch: usize) -> &'a Arc<ReplicaShared> {
    let key = |r: &Arc<ReplicaShared>| {
        let queued = r.queued();
        let fits = queued < max_batch;
        (
            fits,
            if fits { queued } else { 0 },
            std::cmp::Reverse(r.outstanding()),
        )
    };
    ready
        .iter()
        .copied()
        .max_by_key(|r| key(r))
        .unwrap_or(ready[0])
}

/// Read access to the published routing table. Cheap to clone.
#[derive(Clone, Default)]
pub struct RouterHandle {
    table: Arc<RwLock<Arc<RoutingTable>>>,
}

impl RouterHandle {
    /// The table as it is now.
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        let guard = self.table.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&guard)
    }

    /// Picks a replica of `model` (see [`RoutingTable::pick`]).
    pub fn pick(&self, model: &str) -> Result<Arc<ReplicaShared>, InferError> {
        self.snapshot().pick(model)
    }

    /// Queues `pending` on `replica` (picked from this table). A replica that started
    /// draining after it was picked refuses new work; then the request goes to a fresh
    /// pick (the draining one is no longer offered), a few times at most. Returns the
    /// replica that took it.
    pub fn submit(
        &self,
        model: &str,
        replica: Arc<ReplicaShared>,
        pending: Pending,
    ) -> Result<Arc<ReplicaShared>, InferError> {
        let mut replica = replica;
        let mut pending = pending;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match replica.submit(pending) {
                Ok(()) => return Ok(replica),
                Err(rejected) => {
                    let (err, back) = *rejected;
                    if !matches!(err, InferError::ReplicaStopping { .. }) || attempt >= 3 {
                        return Err(err);
                    }
                    pending = back;
                    replica = self.pick(model)?;
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut RoutingTable)) {
        let mut guard = self.table.write().unwrap_or_else(|p| p.into_inner());
        let mut next = RoutingTable::clone(&guard);
        f(&mut next);
        *guard = Arc::new(next);
    }
}

/// The Router actor.
pub struct Router;

/// A change to the routing table, acknowledged once applied when `ack` is given.
pub struct RouterMsg {
    pub change: RouteChange,
    pub ack: Option<RpcReplyPort<()>>,
}

// Local only: never sent to another node.
impl ractor::Message for RouterMsg {}

/// Changes to the routing table.
pub enum RouteChange {
    /// A model is served here (replaces its config, keeps its replicas).
    UpsertModel(ModelConfig),
    /// A replica of a model joins the table.
    AddReplica(Arc<ReplicaShared>),
    /// A replica leaves the table.
    RemoveReplica { model: String, id: String },
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterHandle;
    type Arguments = RouterHandle;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        handle: RouterHandle,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(handle)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        handle: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg.change {
            RouteChange::UpsertModel(config) => handle.update(|t| {
                let name = config.name.clone();
                let replicas = t
                    .models
                    .remove(&name)
                    .map(|m| m.replicas)
                    .unwrap_or_default();
                t.models.insert(name, ModelRoute { config, replicas });
            }),
            RouteChange::AddReplica(r) => handle.update(|t| {
                if let Some(m) = t.models.get_mut(&r.model) {
                    m.replicas.retain(|x| x.id != r.id);
                    m.replicas.push(r);
                }
            }),
            RouteChange::RemoveReplica { model, id } => handle.update(|t| {
                if let Some(m) = t.models.get_mut(&model) {
                    m.replicas.retain(|x| x.id != id);
                }
            }),
        }
        if let Some(ack) = msg.ack {
            let _ = ack.send(());
        }
        Ok(())
    }
}
