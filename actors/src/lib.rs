//! The actors of one Cohort node.
//!
//! ```text
//! NodeSupervisor                 restarts children with backoff and a restart budget
//! ├── Router                     publishes the routing table; handlers pick replicas from it
//! ├── GatewayActor               the HTTP server (crate cohort-gateway)
//! └── ModelInstance × N          one replica: bounded priority queue + engine on its own OS thread
//! ```
//!
//! A request's path on one node: the gateway's handler checks the inputs against the
//! model's metadata, [`RouterHandle::pick`] chooses a ready replica (power of two choices
//! on outstanding requests), [`ReplicaShared::submit`] queues it (or answers OVERLOADED at
//! once when the queue is full), the replica's engine thread takes it in a batch and
//! answers through the request's reply port. No lock is held across an `.await`, and the
//! engine never runs on a tokio worker.
//!
//! [`start`] brings a node up from its configuration; [`Node::shutdown`] stops it in order
//! (the gateway stops accepting and finishes in-flight requests, replicas drain their
//! queues).

pub mod bootstrap;
pub mod error;
pub mod metrics;
pub mod model_instance;
pub mod queue;
pub mod replica;
pub mod router;
pub mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use cohort_config::{EngineKind, NodeConfig};
use ractor::{Actor, ActorRef};

pub use error::{ControlError, InferError, NodeError};
pub use metrics::{Metrics, RejectReason};
pub use queue::Priority;
pub use replica::{InferOutput, Pending, ReplicaShared, ReplicaState, ReplicaStatus};
pub use router::{RouterHandle, RoutingTable};
pub use supervisor::{
    ActorNode, BoxFuture, GatewayFactory, NodeContext, NodeSupervisor, RestartPolicy,
    SupervisorArgs, SupervisorMsg,
};

/// A running node.
pub struct Node {
    ctx: Arc<NodeContext>,
    supervisor: ActorRef<SupervisorMsg>,
    join: tokio::task::JoinHandle<()>,
}

/// Writes the built-in demo MLP into the data dir if the node serves it and it is absent.
pub fn prepare_builtin_models(config: &NodeConfig) -> Result<(), NodeError> {
    if !config.builtin_models {
        return Ok(());
    }
    for m in cohort_config::builtin_models() {
        if m.engine != EngineKind::CandleMlp {
            continue;
        }
        if let Some(path) = m.resolved_path(&config.data_dir) {
            if !path.exists() {
                cohort_engines::mlp::write_demo_mlp(
                    &path,
                    cohort_engines::mlp::DEMO_MLP_DIMS,
                    cohort_engines::mlp::DEMO_MLP_SEED,
                )?;
                tracing::info!(path = %path.display(), "wrote the demo model mlp");
            }
        }
    }
    Ok(())
}

/// The shared secret of the cluster: from `cluster.cookie_file`, else `COHORT_COOKIE`; a
/// node that bootstraps on loopback without either makes up its own (nobody else can
/// join it anyway).
pub fn resolve_cookie(config: &NodeConfig) -> Result<String, NodeError> {
    let c = &config.cluster;
    if let Some(path) = &c.cookie_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            NodeError::Startup(format!(
                "cannot read the cookie file {}: {e}",
                path.display()
            ))
        })?;
        let cookie = text.trim().to_string();
        if cookie.is_empty() {
            return Err(NodeError::Startup(format!(
                "the cookie file {} is empty",
                path.display()
            )));
        }
        return Ok(cookie);
    }
    if let Ok(cookie) = std::env::var("COHORT_COOKIE") {
        if !cookie.trim().is_empty() {
            return Ok(cookie.trim().to_string());
        }
    }
    if c.join.is_none() && c.cluster_addr.ip().is_loopback() {
        // Kept in the data dir: API tokens are hashed with a key made from the cookie, so
        // it must stay the same across restarts.
        let path = config.data_dir.join("cookie");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if !text.trim().is_empty() {
                return Ok(text.trim().to_string());
            }
        }
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes)
            .map_err(|e| NodeError::Startup(format!("no randomness for a cookie: {e}")))?;
        let cookie: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        bootstrap::write_private(&path, &cookie).map_err(|e| {
            NodeError::Startup(format!("cannot write the cookie {}: {e}", path.display()))
        })?;
        return Ok(cookie);
    }
    Err(NodeError::Startup(
        "a cluster cookie is required: give --cookie-file FILE (or cluster.cookie_file) or set COHORT_COOKIE"
            .into(),
    ))
}

fn cluster_config(ctx: &NodeContext) -> Result<cohort_cluster::ClusterConfig, NodeError> {
    let cfg = &ctx.config;
    let http = cfg.http_addr.to_string();
    // Port 0 (a cluster of one): pick a free port now, so that the address the cluster
    // records is one that can be reached.
    let mut cluster_addr = cfg.cluster.cluster_addr;
    if cluster_addr.port() == 0 {
        if let Ok(port) = std::net::TcpListener::bind(cluster_addr)
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        {
            cluster_addr.set_port(port);
        }
    }
    let mut c =
        cohort_cluster::ClusterConfig::new(&cfg.node_name, cluster_addr, &http, &cfg.data_dir);
    c.join = cfg.cluster.join.clone();
    c.cookie = resolve_cookie(cfg)?;
    c.tick = Duration::from_millis(cfg.cluster.tick_ms);
    c.down_after = Duration::from_millis(cfg.cluster.down_after_ms);
    c.snapshot_threshold = cfg.cluster.snapshot_threshold;
    c.join_timeout = Duration::from_millis(cfg.cluster.join_timeout_ms);
    c.devices = ctx
        .devices
        .iter()
        .map(|d| cohort_cluster::DeviceRecord {
            id: d.id.clone(),
            kind: d.kind.to_string(),
            name: d.name.clone(),
            total_memory: d.total_memory,
        })
        .collect();
    Ok(c)
}

/// Starts a node: prepares the built-in models, then spawns the actor tree.
pub async fn start(
    config: NodeConfig,
    gateway: Arc<dyn GatewayFactory>,
    policy: RestartPolicy,
) -> Result<Node, NodeError> {
    prepare_builtin_models(&config)?;
    let ctx = NodeContext::new(config);
    let cluster = cluster_config(&ctx)?;
    let args = SupervisorArgs {
        ctx: Arc::clone(&ctx),
        cluster,
        gateway,
        policy,
    };
    let (supervisor, join) = match Actor::spawn(None, NodeSupervisor, args).await {
        Ok(spawned) => spawned,
        Err(e) => {
            // A clear reason recorded by the part that failed beats ractor's nested text.
            return Err(match ctx.take_startup_error() {
                Some(reason) => NodeError::Startup(reason),
                None => NodeError::Spawn {
                    actor: "NodeSupervisor",
                    reason: e.to_string(),
                },
            });
        }
    };
    Ok(Node {
        ctx,
        supervisor,
        join,
    })
}

impl Node {
    /// What the node's parts share.
    pub fn ctx(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    /// The root of the actor tree.
    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }

    /// Waits until every model that should run has a ready replica (true), or until
    /// start-up has settled with some model failed, `timeout` passes, or the node stops
    /// (false).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let table = self.ctx.router.snapshot();
            if table.all_ready() {
                return true;
            }
            if table.settled() {
                return false;
            }
            if tokio::time::Instant::now() >= deadline || self.is_stopped() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the node in order and waits until every actor has stopped.
    pub async fn shutdown(self) {
        let _ = ractor::call!(self.supervisor, SupervisorMsg::Shutdown);
        let _ = self.join.await;
    }

    /// Whether the node's supervisor has stopped.
    pub fn is_stopped(&self) -> bool {
        self.join.is_finished()
    }

    /// Waits until the node stops by itself (its supervisor gave up).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.join).await;
    }
}
