//! `NodeSupervisor`: the root of a node's actor tree.
//!
//! ```text
//! NodeSupervisor
//! ├── NodeServer        ractor_cluster membership (crate cohort-cluster)
//! ├── RaftActor         Raft over sled; the replicated ClusterState
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
//!   requests move to the model's other replicas (NO_REPLICA if none takes them), and the
//!   other replicas and models keep serving.
//! - A replica that goes away with requests still queued (removed while restarting, or
//!   its engine died while it drained) hands them to the model's other replicas the same
//!   way, so none waits out its deadline in a queue no engine serves.
//! - A GatewayActor that fails is restarted with the same backoff, on the address it had.
//! - A Router that fails is restarted at once; the table it publishes survives in the
//!   RouterHandle.
//! - If the NodeServer or the RaftActor fails, the supervisor stops the node: Raft state
//!   is rebuilt from the sled log when the process is started again, which is safer than
//!   restarting Raft inside a process in an unknown state.
//! - On [`SupervisorMsg::Shutdown`], children stop in order: the gateway first (it stops
//!   accepting and finishes what is in flight), then the replicas (each drains its queue),
//!   then the router.
//!
//! The set of replicas is a value: [`SupervisorMsg::SetReplicas`] makes the node run that
//! many replicas of a model (scale, preload, unload are all this one message, and a
//! cluster placement decision will be too). Scaling up spawns replicas pinned to the
//! device the model's `device` policy picks; scaling down first takes a replica out of the
//! routing table, then lets it drain its queue, and only then forgets it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_config::{DeviceSpec, EngineKind, ModelConfig, NodeConfig};
use cohort_engines::{Device, DeviceInfo, LoadContext};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::model_instance::{ModelInstance, ModelInstanceArgs, ModelInstanceMsg};
use crate::replica::{ReplicaShared, ReplicaState};
use crate::router::{RouteChange, Router, RouterHandle, RouterMsg};
use crate::{ControlError, InferError};

/// What every part of a node shares: its configuration, metrics and routing table.
pub struct NodeContext {
    pub config: NodeConfig,
    /// The node's cluster membership (set once started).
    pub cluster: std::sync::OnceLock<cohort_cluster::ClusterHandle>,
    /// The devices found at start: the CPU, then each GPU.
    pub devices: Vec<DeviceInfo>,
    pub metrics: Metrics,
    pub router: RouterHandle,
    pub started: Instant,
    http_addr: Mutex<Option<SocketAddr>>,
    startup_error: Mutex<Option<String>>,
    shutting_down: AtomicBool,
}

impl NodeContext {
    /// A context for a node with this configuration.
    pub fn new(config: NodeConfig) -> Arc<Self> {
        Arc::new(NodeContext {
            config,
            cluster: std::sync::OnceLock::new(),
            devices: cohort_engines::device::discover(),
            metrics: Metrics::new(),
            router: RouterHandle::default(),
            started: Instant::now(),
            http_addr: Mutex::new(None),
            startup_error: Mutex::new(None),
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
        if let Some(cluster) = self.cluster.get() {
            cluster.set_http_addr(addr.to_string());
        }
    }

    /// Records why start-up failed, in words for the operator.
    pub fn set_startup_error(&self, reason: String) {
        *self.startup_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// The recorded start-up failure, if any.
    pub fn take_startup_error(&self) -> Option<String> {
        self.startup_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
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
    /// How to start the cluster membership.
    pub cluster: cohort_cluster::ClusterConfig,
    pub gateway: Arc<dyn GatewayFactory>,
    pub policy: RestartPolicy,
}

/// Messages to the NodeSupervisor.
pub enum SupervisorMsg {
    /// Restart a replica after its backoff.
    RestartReplica(String),
    /// Restart the gateway after its backoff.
    RestartGateway,
    /// Run this many replicas of a model on this node (0 unloads it).
    SetReplicas {
        model: String,
        replicas: usize,
        reply: RpcReplyPort<Result<(), ControlError>>,
    },
    /// Load a model that was unloaded, with as many replicas as it had (at least 1).
    Preload {
        model: String,
        reply: RpcReplyPort<Result<(), ControlError>>,
    },
    /// A replica that was scaled away has drained and stopped.
    ReplicaDrained(String),
    /// Stop everything in order, then answer.
    Shutdown(RpcReplyPort<()>),
    /// Describe the actor tree.
    Tree(RpcReplyPort<ActorNode>),
}

// Local only: never sent to another node.
impl ractor::Message for SupervisorMsg {}

#[derive(Debug, Clone)]
enum Child {
    Router,
    Gateway,
    Cluster,
    Replica(String),
}

struct ReplicaSlot {
    shared: Arc<ReplicaShared>,
    model: ModelConfig,
    actor: Option<ActorRef<ModelInstanceMsg>>,
    failures: VecDeque<Instant>,
    /// Device memory this replica is expected to use (its model's files and half again):
    /// what `auto` placement counts as taken on its device while the replica lives.
    reserved_bytes: u64,
}

/// The most replicas of one model on one node.
pub const MAX_REPLICAS: usize = 64;

/// The supervisor's state.
pub struct SupervisorState {
    ctx: Arc<NodeContext>,
    gateway_factory: Arc<dyn GatewayFactory>,
    policy: RestartPolicy,
    router: ActorRef<RouterMsg>,
    gateway: Option<ActorCell>,
    gateway_failures: VecDeque<Instant>,
    /// Desired state of each model (its `replicas` is the desired count).
    models: HashMap<String, ModelConfig>,
    /// The replica count a model had before it was unloaded, for preload.
    last_replicas: HashMap<String, usize>,
    next_index: HashMap<String, usize>,
    replicas: Vec<ReplicaSlot>,
    children: HashMap<ActorId, Child>,
    cluster: Option<cohort_cluster::ClusterAgent>,
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
        let default_threads = self.onnx_threads();
        let ctx = Arc::clone(&self.ctx);
        let Some(slot) = self.slot(id) else {
            return Ok(());
        };
        let load = LoadContext {
            data_dir: ctx.config.data_dir.clone(),
            device: slot.shared.device,
            ort_library: ctx.config.onnxruntime.library.clone(),
            default_threads,
        };
        let args = ModelInstanceArgs {
            shared: Arc::clone(&slot.shared),
            model: slot.model.clone(),
            load,
        };
        let (actor, _) = Actor::spawn_linked(None, ModelInstance, args, myself.get_cell()).await?;
        slot.actor = Some(actor.clone());
        self.children
            .insert(actor.get_id(), Child::Replica(id.to_string()));
        Ok(())
    }

    /// Intra-op threads for an ONNX replica when its model does not say.
    fn onnx_threads(&self) -> usize {
        default_onnx_threads(&self.ctx.devices, self.models.values())
    }

    /// Device memory that this node's live replicas on `device` are expected to use.
    /// Stopped and failed replicas hold none; a restarting one keeps its share, since it
    /// comes back to the same device.
    fn reserved(&self, device: Device) -> u64 {
        self.replicas
            .iter()
            .filter(|r| r.shared.device == device)
            .filter(|r| {
                !matches!(
                    r.shared.state(),
                    ReplicaState::Stopped | ReplicaState::Failed
                )
            })
            .map(|r| r.reserved_bytes)
            .fold(0, u64::saturating_add)
    }

    /// Adds one replica of `model`: a new slot in the routing table, pinned to a device,
    /// and its ModelInstance.
    async fn add_replica(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        model: &ModelConfig,
    ) -> Result<(), ActorProcessingErr> {
        let index = self.next_index.entry(model.name.clone()).or_insert(0);
        let i = *index;
        *index += 1;
        let need = model
            .resolved_path(&self.ctx.config.data_dir)
            .and_then(|p| dir_size(&p))
            .unwrap_or(0);
        let need = need.saturating_add(need / 2);
        let spec = DeviceSpec::parse(&model.device).unwrap_or(DeviceSpec::Cpu);
        let device =
            cohort_engines::device::resolve(spec, &self.ctx.devices, need, |d| self.reserved(d));
        let shared = ReplicaShared::new(
            model,
            i,
            *device.as_ref().unwrap_or(&Device::Cpu),
            self.ctx.config.limits.queue_capacity,
            self.ctx.metrics.for_model(&model.name),
        );
        self.replicas.push(ReplicaSlot {
            shared: Arc::clone(&shared),
            model: model.clone(),
            actor: None,
            failures: VecDeque::new(),
            reserved_bytes: need,
        });
        ractor::call!(self.router, |ack| RouterMsg {
            change: RouteChange::AddReplica(Arc::clone(&shared)),
            ack: Some(ack),
        })?;
        match device {
            Ok(_) => self.spawn_replica(myself, &shared.id).await,
            Err(e) => {
                tracing::error!(replica = %shared.id, error = %e, "no device for replica");
                shared.set_last_error(e.to_string());
                shared.set_state(ReplicaState::Failed);
                Ok(())
            }
        }
    }

    /// Marks a replica draining (the router skips it from now on), lets it finish its
    /// queue in the background, and forgets it once it has stopped
    /// ([`SupervisorMsg::ReplicaDrained`]). Until then it stays listed, as `draining`.
    async fn remove_replica(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: &str,
    ) -> Result<(), ActorProcessingErr> {
        let Some(pos) = self.replicas.iter().position(|s| s.shared.id == id) else {
            return Ok(());
        };
        let slot = &mut self.replicas[pos];
        match slot.actor.take() {
            Some(actor) => {
                self.children.remove(&actor.get_id());
                // Closed now, not when the actor gets to its stop: from here on the
                // replica takes no new request and shows as draining.
                slot.shared.close();
                let me = myself.clone();
                let id = id.to_string();
                tokio::spawn(async move {
                    let _ = actor.stop_and_wait(Some("scaled down".into()), None).await;
                    let _ = me.cast(SupervisorMsg::ReplicaDrained(id));
                });
            }
            None => {
                // Restarting or failed: nothing runs; what waits moves to another replica
                // as it is forgotten.
                self.forget_replica(id).await?;
            }
        }
        Ok(())
    }

    /// Drops a stopped replica from the routing table and from the supervisor's slots.
    /// Requests still in its queue (its engine died while it drained, or it was removed
    /// while waiting to restart) go to the model's other replicas.
    async fn forget_replica(&mut self, id: &str) -> Result<(), ActorProcessingErr> {
        self.rehome(id, "stopped");
        let Some(pos) = self.replicas.iter().position(|s| s.shared.id == id) else {
            return Ok(());
        };
        let slot = self.replicas.remove(pos);
        slot.shared.set_state(ReplicaState::Stopped);
        ractor::call!(self.router, |ack| RouterMsg {
            change: RouteChange::RemoveReplica {
                model: slot.model.name.clone(),
                id: id.to_string(),
            },
            ack: Some(ack),
        })?;
        Ok(())
    }

    /// Closes replica `id`'s queue and moves what waits in it to the model's other
    /// replicas that take work (ready or loading), least loaded first, keeping each
    /// request's deadline, priority and age. A request that none of them takes is
    /// answered NO_REPLICA at once. Without this, requests in the queue of a replica that
    /// goes away would wait out their whole deadline for an engine that never comes.
    fn rehome(&self, id: &str, why: &str) {
        let Some(slot) = self.replicas.iter().find(|s| s.shared.id == id) else {
            return;
        };
        let waiting = slot.shared.close_and_take();
        if waiting.is_empty() {
            return;
        }
        let mut targets: Vec<&Arc<ReplicaShared>> = self
            .replicas
            .iter()
            .filter(|s| s.model.name == slot.model.name && s.shared.id != id)
            .filter(|s| {
                matches!(
                    s.shared.state(),
                    ReplicaState::Ready | ReplicaState::Loading
                )
            })
            .map(|s| &s.shared)
            .collect();
        targets.sort_by_key(|r| (r.state() != ReplicaState::Ready, r.outstanding()));
        let (mut moved, mut refused) = (0usize, 0usize);
        'requests: for mut p in waiting {
            for target in &targets {
                match target.requeue(p) {
                    Ok(()) => {
                        moved += 1;
                        continue 'requests;
                    }
                    Err(back) => p = back.1,
                }
            }
            refused += 1;
            slot.shared.refuse(
                p,
                InferError::NoReplica {
                    model: slot.model.name.clone(),
                    reason: format!("replica {id} {why} with the request queued, and no other replica could take it"),
                },
            );
        }
        tracing::warn!(replica = %id, moved, refused, "requests left in a replica's queue moved to other replicas");
    }

    /// Makes the node run `want` replicas of `model`.
    async fn set_replicas(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        model: &str,
        want: usize,
    ) -> Result<(), ControlError> {
        if self.stopping {
            return Err(ControlError::ShuttingDown);
        }
        if want > MAX_REPLICAS {
            return Err(ControlError::Invalid(format!(
                "replicas must be between 0 and {MAX_REPLICAS}"
            )));
        }
        let mut config = self
            .models
            .get(model)
            .cloned()
            .ok_or_else(|| ControlError::ModelNotFound(model.to_string()))?;
        if config.replicas > 0 {
            self.last_replicas
                .insert(model.to_string(), config.replicas);
        }
        config.replicas = want;
        self.models.insert(model.to_string(), config.clone());
        let internal = |e: ActorProcessingErr| ControlError::Invalid(e.to_string());
        ractor::call!(self.router, |ack| RouterMsg {
            change: RouteChange::UpsertModel(config.clone()),
            ack: Some(ack),
        })
        .map_err(|e| internal(e.into()))?;
        // Replicas that count: not draining, not stopped.
        let live: Vec<(String, ReplicaState)> = self
            .replicas
            .iter()
            .filter(|s| s.model.name == model)
            .filter(|s| {
                !matches!(
                    s.shared.state(),
                    ReplicaState::Draining | ReplicaState::Stopped
                )
            })
            .map(|s| (s.shared.id.clone(), s.shared.state()))
            .collect();
        if live.len() < want {
            for _ in live.len()..want {
                self.add_replica(myself, &config).await.map_err(internal)?;
            }
        } else if live.len() > want {
            // Remove broken replicas first, then the newest.
            let mut victims = live;
            victims.sort_by_key(|(id, state)| {
                let index: usize = id
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                (*state == ReplicaState::Ready, std::cmp::Reverse(index))
            });
            let excess = victims.len() - want;
            for (id, _) in victims.into_iter().take(excess) {
                self.remove_replica(myself, &id).await.map_err(internal)?;
            }
        }
        tracing::info!(model, replicas = want, "replica count set");
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
        let status = |cell: &ActorCell| format!("{:?}", cell.get_status()).to_lowercase();
        let mut children = Vec::new();
        if let Some(agent) = &self.cluster {
            children.push(leaf(
                "cluster-listener".into(),
                "NodeServer",
                status(&agent.server.get_cell()),
            ));
            children.push(leaf(
                format!("raft {}", agent.handle.node_id()),
                "RaftActor",
                status(&agent.raft.get_cell()),
            ));
        }
        children.push(leaf(
            "router".into(),
            "Router",
            format!("{:?}", self.router.get_status()).to_lowercase(),
        ));
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
            models: ctx
                .config
                .all_models()
                .into_iter()
                .map(|m| (m.name.clone(), m))
                .collect(),
            last_replicas: HashMap::new(),
            next_index: HashMap::new(),
            replicas: Vec::new(),
            children: HashMap::new(),
            cluster: None,
            stopping: false,
        };
        state.children.insert(router.get_id(), Child::Router);

        let agent = cohort_cluster::agent::start(args.cluster, Some(myself.get_cell()))
            .await
            .map_err(|e| {
                let reason = format!("cannot start the cluster membership: {e}");
                ctx.set_startup_error(reason.clone());
                reason
            })?;
        state.children.insert(agent.raft.get_id(), Child::Cluster);
        state.children.insert(agent.server.get_id(), Child::Cluster);
        let _ = ctx.cluster.set(agent.handle.clone());
        register_models(agent.handle.clone(), ctx.config.all_models());
        if ctx.config.cluster.join.is_none() {
            tokio::spawn(crate::bootstrap::admin_token(
                agent.handle.clone(),
                ctx.config.admin_token_path(),
            ));
        }
        state.cluster = Some(agent);

        for model in ctx.config.all_models() {
            ractor::call!(router, |ack| RouterMsg {
                change: RouteChange::UpsertModel(model.clone()),
                ack: Some(ack),
            })?;
            for _ in 0..model.replicas {
                state.add_replica(&myself, &model).await?;
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
                match state.slot(&id) {
                    Some(slot) if slot.actor.is_none() => slot.shared.note_restart(),
                    // Scaled away while waiting for its restart, or already running.
                    _ => return Ok(()),
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
            SupervisorMsg::SetReplicas {
                model,
                replicas,
                reply,
            } => {
                let result = state.set_replicas(&myself, &model, replicas).await;
                let _ = reply.send(result);
            }
            SupervisorMsg::Preload { model, reply } => {
                let result = match state.models.get(&model) {
                    None => Err(ControlError::ModelNotFound(model)),
                    Some(m) if m.replicas > 0 => Ok(()),
                    Some(_) => {
                        let want = state.last_replicas.get(&model).copied().unwrap_or(1).max(1);
                        state.set_replicas(&myself, &model, want).await
                    }
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::ReplicaDrained(id) => {
                state.forget_replica(&id).await?;
                tracing::info!(replica = %id, "replica drained and stopped");
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
                if let Some(agent) = state.cluster.take() {
                    agent.stop().await;
                }
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
            Child::Cluster => {
                tracing::error!(%reason, "the cluster membership failed; stopping the node");
                return Err(format!("cluster membership failed: {reason}").into());
            }
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
                        state.rehome(&id, "failed");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Registers the node's configured models in the cluster state, if absent, in the
/// background (it waits for a leader).
fn register_models(cluster: cohort_cluster::ClusterHandle, models: Vec<ModelConfig>) {
    tokio::spawn(async move {
        for m in models {
            let record = cohort_cluster::ModelRecord {
                name: m.name.clone(),
                engine: m.engine.as_str().to_string(),
                path: m.path.as_ref().map(|p| p.display().to_string()),
                versions: [(
                    m.version.clone(),
                    cohort_cluster::VersionRecord { published: true },
                )]
                .into_iter()
                .collect(),
            };
            let cmd = cohort_cluster::Command::RegisterModel(record);
            if let Err(e) = cluster.propose(cmd, Duration::from_secs(60)).await {
                tracing::warn!(model = %m.name, error = %e, "cannot register the model in the cluster state");
            }
        }
    });
}

/// The default intra-op threads of an ONNX replica: the node's cores shared among its ONNX
/// replicas on the CPU, so that they do not oversubscribe it, at least 1. `auto` counts as
/// the CPU on a node without a GPU, where it always lands.
fn default_onnx_threads<'a>(
    devices: &[DeviceInfo],
    models: impl Iterator<Item = &'a ModelConfig>,
) -> usize {
    let cores = devices.first().map_or(1, |d| d.cores.max(1));
    let no_gpu = devices.iter().all(|d| d.kind != "cuda");
    let on_cpu = |m: &ModelConfig| match DeviceSpec::parse(&m.device) {
        Some(DeviceSpec::Cpu) | None => true,
        Some(DeviceSpec::Auto) => no_gpu,
        Some(DeviceSpec::Cuda(_)) => false,
    };
    let replicas = models
        .filter(|m| m.engine == EngineKind::Onnx && on_cpu(m))
        .map(|m| m.replicas)
        .sum::<usize>()
        .max(1);
    (cores / replicas).max(1)
}

/// The bytes of a model file, or of the files under a model directory. Symbolic links are
/// followed (a Hugging Face snapshot links each file to its blob), to at most
/// `DIR_SIZE_DEPTH` levels, so that a link cycle ends instead of overflowing the stack.
fn dir_size(path: &std::path::Path) -> Option<u64> {
    dir_size_within(path, DIR_SIZE_DEPTH)
}

const DIR_SIZE_DEPTH: usize = 8;

fn dir_size_within(path: &std::path::Path, depth: usize) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some(meta.len());
    }
    if depth == 0 {
        return Some(0);
    }
    let mut total: u64 = 0;
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        let size = dir_size_within(&entry.path(), depth - 1).unwrap_or(0);
        total = total.saturating_add(size);
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_size_counts_files_and_ends_on_a_link_cycle() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 5]).unwrap();
        assert_eq!(dir_size(dir.path()), Some(15));
        assert_eq!(dir_size(&dir.path().join("a")), Some(10));
        assert_eq!(dir_size(&dir.path().join("missing")), None);
        // sub/loop -> .. : every level sees `a` and `sub` again, until the depth runs out.
        std::os::unix::fs::symlink("..", dir.path().join("sub/loop")).unwrap();
        let size = dir_size(dir.path()).unwrap();
        assert!(size > 15, "{size}");
    }

    #[test]
    fn onnx_threads_share_the_cores_among_onnx_replicas_on_the_cpu() {
        let cpu = |cores| DeviceInfo {
            id: "cpu".into(),
            kind: "cpu",
            name: "cpu".into(),
            total_memory: 0,
            free_memory: 0,
            cores,
        };
        let gpu = DeviceInfo {
            id: "cuda:0".into(),
            kind: "cuda",
            name: "gpu".into(),
            total_memory: 0,
            free_memory: 0,
            cores: 0,
        };
        let model = |engine, device: &str, replicas| {
            let mut m = ModelConfig::new("m", engine);
            m.device = device.into();
            m.replicas = replicas;
            m
        };
        let models = [
            model(EngineKind::Onnx, "cpu", 2),
            model(EngineKind::Onnx, "auto", 2),
            model(EngineKind::Onnx, "cuda:0", 3),
            model(EngineKind::CandleMlp, "cpu", 4),
        ];
        // No GPU: `auto` runs on the CPU too, 4 ONNX replicas share 16 cores.
        assert_eq!(default_onnx_threads(&[cpu(16)], models.iter()), 4);
        // With a GPU, `auto` may go there: only the `cpu` model's 2 replicas count.
        assert_eq!(
            default_onnx_threads(&[cpu(16), gpu.clone()], models.iter()),
            8
        );
        // Never below one thread, and one model alone gets every core.
        assert_eq!(default_onnx_threads(&[cpu(2)], models.iter()), 1);
        assert_eq!(default_onnx_threads(&[cpu(2)], models[2..].iter()), 2);
        assert_eq!(default_onnx_threads(&[], std::iter::empty()), 1);
    }

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
