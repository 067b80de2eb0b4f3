//! `NodeSupervisor`: the root of a node's actor tree.
//!
//! ```text
//! NodeSupervisor
//! ├── Router            the routing table's only writer
//! ├── GatewayActor      the HTTP server (spawned through a GatewayFactory)
//! └── ModelInstance × N one per replica
//! ```
//!
//! Supervision duties:
//! - Every child is spawned linked in `pre_start`, so the node starts whole or not at all.
//! - A ModelInstance that fails (engine panic, load error) is restarted after an
//!   exponential backoff, reusing its queue, as long as its restart budget allows
//!   ([`RestartPolicy`]). Past the budget the replica is marked `failed`, its queued
//!   requests are answered NO_REPLICA, and the other replicas and models keep serving.
//! - A GatewayActor that fails is restarted with the same backoff, on the address it had.
//! - A Router that fails is restarted at once; the table it publishes survives in the
//!   RouterHandle.
//! - On [`SupervisorMsg::Shutdown`], children stop in order: the gateway first (it stops
//!   accepting and finishes what is in flight), then the replicas (each drains its queue),
//!   then the router.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_config::{ModelConfig, NodeConfig};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::model_instance::{ModelInstance, ModelInstanceArgs, ModelInstanceMsg};
use crate::replica::{ReplicaShared, ReplicaState};
use crate::router::{RouteChange, Router, RouterHandle, RouterMsg};
use crate::InferError;

/// What every part of a node shares: its configuration, metrics and routing table.
pub struct NodeContext {
    pub config: NodeConfig,
    pub metrics: Metrics,
    pub router: RouterHandle,
    pub started: Instant,
    http_addr: Mutex<Option<SocketAddr>>,
    shutting_down: AtomicBool,
}

impl NodeContext {
    /// A context for a node with this configuration.
    pub fn new(config: NodeConfig) -> Arc<Self> {
        Arc::new(NodeContext {
            config,
            metrics: Metrics::new(),
            router: RouterHandle::default(),
            started: Instant::now(),
            http_addr: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The address the gateway is bound to, once it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the gateway once bound.
    pub fn set_http_addr(&self, addr: SocketAddr) {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
    }

    /// Whether the node is shutting down.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// A boxed future, for [`GatewayFactory`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Spawns the node's GatewayActor linked to the supervisor. The gateway lives in its own
/// crate; the supervisor only needs to (re)start it.
pub trait GatewayFactory: Send + Sync + 'static {
    fn spawn(
        &self,
        ctx: Arc<NodeContext>,
        supervisor: ActorCell,
    ) -> BoxFuture<Result<ActorCell, String>>;
}

/// When a failed child is restarted, and when it is given up on.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each recent failure.
    pub base_backoff: Duration,
    /// The longest delay.
    pub max_backoff: Duration,
    /// Failures counted within this window...
    pub window: Duration,
    /// ...beyond this many, the child is given up on.
    pub max_restarts: usize,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            window: Duration::from_secs(60),
            max_restarts: 5,
        }
    }
}

impl RestartPolicy {
    /// Records a failure at `now`; returns the delay before restarting, or `None` when
    /// the budget is spent.
    pub fn on_failure(&self, history: &mut VecDeque<Instant>, now: Instant) -> Option<Duration> {
        while history
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            history.pop_front();
        }
        history.push_back(now);
        let recent = history.len();
        if recent > self.max_restarts {
            return None;
        }
        let factor = 1u32 << (recent - 1).min(16);
        Some((self.base_backoff * factor).min(self.max_backoff))
    }
}

/// One node of the actor tree, for the API.
#[derive(Debug, Clone, Serialize)]
pub struct ActorNode {
    pub name: String,
    pub kind: &'static str,
    pub status: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ActorNode>,
}

/// The NodeSupervisor actor.
pub struct NodeSupervisor;

/// What the NodeSupervisor starts with.
pub struct SupervisorArgs {
    pub ctx: Arc<NodeContext>,
    pub gateway: Arc<dyn GatewayFactory>,
    pub policy: RestartPolicy,
}

/// Messages to the NodeSupervisor.
pub enum SupervisorMsg {
    /// Restart a replica after its backoff.
    RestartReplica(String),
    /// Restart the gateway after its backoff.
    RestartGateway,
    /// Stop everything in order, then answer.
    Shutdown(RpcReplyPort<()>),
    /// Describe the actor tree.
    Tree(RpcReplyPort<ActorNode>),
}

#[derive(Debug, Clone)]
enum Child {
    Router,
    Gateway,
    Replica(String),
}

struct ReplicaSlot {
    shared: Arc<ReplicaShared>,
    model: ModelConfig,
    actor: Option<ActorRef<ModelInstanceMsg>>,
    failures: VecDeque<Instant>,
}

/// The supervisor's state.
pub struct SupervisorState {
    ctx: Arc<NodeContext>,
    gateway_factory: Arc<dyn GatewayFactory>,
    policy: RestartPolicy,
    router: ActorRef<RouterMsg>,
    gateway: Option<ActorCell>,
    gateway_failures: VecDeque<Instant>,
    replicas: Vec<ReplicaSlot>,
    children: HashMap<ActorId, Child>,
    stopping: bool,
}

impl SupervisorState {
    fn slot(&mut self, id: &str) -> Option<&mut ReplicaSlot> {
        self.replicas.iter_mut().find(|s| s.shared.id == id)
    }

    async fn spawn_replica(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: &str,
    ) -> Result<(), ActorProcessingErr> {
        let data_dir = self.ctx.config.data_dir.clone();
        let Some(slot) = self.slot(id) else {
            return Ok(());
        };
        let args = ModelInstanceArgs {
            shared: Arc::clone(&slot.shared),
            model: slot.model.clone(),
            data_dir,
        };
        let (actor, _) = Actor::spawn_linked(None, ModelInstance, args, myself.get_cell()).await?;
        slot.actor = Some(actor.clone());
        self.children
            .insert(actor.get_id(), Child::Replica(id.to_string()));
        Ok(())
    }

    async fn spawn_gateway(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let cell = self
            .gateway_factory
            .spawn(Arc::clone(&self.ctx), myself.get_cell())
            .await?;
        self.children.insert(cell.get_id(), Child::Gateway);
        self.gateway = Some(cell);
        Ok(())
    }

    fn tree(&self) -> ActorNode {
        let leaf = |name: String, kind: &'static str, status: String| ActorNode {
            name,
            kind,
            status,
            children: Vec::new(),
        };
        let mut children = vec![leaf(
            "router".into(),
            "Router",
            format!("{:?}", self.router.get_status()).to_lowercase(),
        )];
        children.push(leaf(
            "gateway".into(),
            "GatewayActor",
            self.gateway.as_ref().map_or("stopped".into(), |g| {
                format!("{:?}", g.get_status()).to_lowercase()
            }),
        ));
        for s in &self.replicas {
            children.push(leaf(
                format!("replica {}", s.shared.id),
                "ModelInstance",
                s.shared.state().as_str().to_string(),
            ));
        }
        ActorNode {
            name: self.ctx.config.node_name.clone(),
            kind: "NodeSupervisor",
            status: if self.stopping { "stopping" } else { "running" }.into(),
            children,
        }
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ctx = args.ctx;
        let (router, _) =
            Actor::spawn_linked(None, Router, ctx.router.clone(), myself.get_cell()).await?;
        let mut state = SupervisorState {
            ctx: Arc::clone(&ctx),
            gateway_factory: args.gateway,
            policy: args.policy,
            router: router.clone(),
            gateway: None,
            gateway_failures: VecDeque::new(),
            replicas: Vec::new(),
            children: HashMap::new(),
            stopping: false,
        };
        state.children.insert(router.get_id(), Child::Router);

        for model in ctx.config.all_models() {
            let metrics = ctx.metrics.for_model(&model.name);
            ractor::call!(router, |ack| RouterMsg {
                change: RouteChange::UpsertModel(model.clone()),
                ack: Some(ack),
            })?;
            for i in 0..model.replicas {
                let shared = ReplicaShared::new(
                    &model,
                    i,
                    ctx.config.limits.queue_capacity,
                    metrics.clone(),
                );
                state.replicas.push(ReplicaSlot {
                    shared: Arc::clone(&shared),
                    model: model.clone(),
                    actor: None,
                    failures: VecDeque::new(),
                });
                ractor::call!(router, |ack| RouterMsg {
                    change: RouteChange::AddReplica(Arc::clone(&shared)),
                    ack: Some(ack),
                })?;
                state.spawn_replica(&myself, &shared.id).await?;
            }
        }
        state.spawn_gateway(&myself).await?;
        tracing::info!(node = %ctx.config.node_name, replicas = state.replicas.len(), "node supervisor started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::RestartReplica(id) => {
                if state.stopping {
                    return Ok(());
                }
                if let Some(slot) = state.slot(&id) {
                    slot.shared.note_restart();
                }
                tracing::info!(replica = %id, "restarting replica");
                if let Err(e) = state.spawn_replica(&myself, &id).await {
                    tracing::error!(replica = %id, error = %e, "replica restart failed");
                    let delay = state.policy.max_backoff;
                    myself.send_after(delay, move || SupervisorMsg::RestartReplica(id));
                }
            }
            SupervisorMsg::RestartGateway => {
                if state.stopping {
                    return Ok(());
                }
                tracing::info!("restarting gateway");
                if let Err(e) = state.spawn_gateway(&myself).await {
                    tracing::error!(error = %e, "gateway restart failed");
                    myself.send_after(state.policy.max_backoff, || SupervisorMsg::RestartGateway);
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stopping = true;
                state.ctx.shutting_down.store(true, Ordering::Release);
                if let Some(g) = state.gateway.take() {
                    let _ = g.stop_and_wait(Some("shutdown".into()), None).await;
                }
                for slot in &mut state.replicas {
                    if let Some(a) = slot.actor.take() {
                        let _ = a.stop_and_wait(Some("shutdown".into()), None).await;
                    }
                }
                let _ = state
                    .router
                    .stop_and_wait(Some("shutdown".into()), None)
                    .await;
                tracing::info!("node stopped");
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            SupervisorMsg::Tree(reply) => {
                let _ = reply.send(state.tree());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match &evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                Some(format!(
                    "terminated ({})",
                    reason.as_deref().unwrap_or("no reason")
                )),
            ),
            _ => return Ok(()),
        };
        let Some(child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        let now = Instant::now();
        let reason = failure.unwrap_or_default();
        match child {
            Child::Router => {
                tracing::error!(%reason, "router died; restarting it");
                let (router, _) =
                    Actor::spawn_linked(None, Router, state.ctx.router.clone(), myself.get_cell())
                        .await?;
                state.children.insert(router.get_id(), Child::Router);
                state.router = router;
            }
            Child::Gateway => {
                state.gateway = None;
                match state.policy.on_failure(&mut state.gateway_failures, now) {
                    Some(delay) => {
                        tracing::error!(%reason, ?delay, "gateway died; restarting it");
                        myself.send_after(delay, || SupervisorMsg::RestartGateway);
                    }
                    None => {
                        tracing::error!(%reason, "gateway keeps failing; stopping the node");
                        return Err(format!("gateway failed too often: {reason}").into());
                    }
                }
            }
            Child::Replica(id) => {
                let policy = state.policy.clone();
                let Some(slot) = state.slot(&id) else {
                    return Ok(());
                };
                slot.actor = None;
                match policy.on_failure(&mut slot.failures, now) {
                    Some(delay) => {
                        tracing::warn!(replica = %id, %reason, ?delay, "replica failed; restarting after backoff");
                        slot.shared.set_state(ReplicaState::Restarting);
                        myself.send_after(delay, move || SupervisorMsg::RestartReplica(id));
                    }
                    None => {
                        tracing::error!(replica = %id, %reason, "replica failed too often; giving up on it");
                        slot.shared.set_state(ReplicaState::Failed);
                        slot.shared
                            .set_last_error(format!("gave up after repeated failures: {reason}"));
                        slot.shared.fail_queued(InferError::NoReplica {
                            model: slot.model.name.clone(),
                            reason: format!("replica {id} failed: {reason}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_the_budget_runs_out() {
        let p = RestartPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            window: Duration::from_secs(60),
            max_restarts: 4,
        };
        let mut h = VecDeque::new();
        let t0 = Instant::now();
        let delays: Vec<_> = (0..5)
            .map(|i| p.on_failure(&mut h, t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(350)),
                Some(Duration::from_millis(350)),
                None
            ]
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let p = RestartPolicy::default();
        let mut h = VecDeque::new();
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(p
                .on_failure(&mut h, t0 + Duration::from_millis(i))
                .is_some());
        }
        let later = t0 + p.window + Duration::from_secs(1);
        assert_eq!(p.on_failure(&mut h, later), Some(p.base_backoff));
    }
}
