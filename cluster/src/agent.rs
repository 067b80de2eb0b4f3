//! Starting a node's part of the cluster: its identity, its ractor_cluster `NodeServer`
//! (membership, authenticated by the shared cookie), and its [`RaftActor`].
//!
//! A node started without `join` bootstraps a new cluster with itself as the only voter.
//! A node started with `join` connects to that address; once the session is up (the
//! cookie matched), its RaftActor asks the cluster to add it. The leader adds it as a
//! learner, and promotes it to voter once its log has caught up. A single node (`cohort
//! up`) is simply a cluster of one: the same code, bootstrapping on loopback.
//!
//! A wrong cookie shows up in ractor_cluster only as a session that closes before it
//! authenticates; both sides log that in those words.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::sync::watch;

use crate::raft_actor::{Published, RaftActor, RaftActorArgs, RaftActorSettings};
use crate::raft_node::{RaftNode, RaftSettings};
use crate::state::{DeviceRecord, NodeRecord, NodeRole, NodeStatus};
use crate::storage::SledStorage;
use crate::tokens::TokenKey;
use crate::{ClusterError, ClusterHandle, RaftMsg};

/// How to start a node's cluster membership.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The node's name (unique in the cluster).
    pub name: String,
    /// Where the NodeServer listens, and the address other nodes reach it on.
    pub cluster_addr: SocketAddr,
    /// The node's HTTP address, as other nodes and clients should use it.
    pub http_addr: String,
    /// A member's cluster address to join; `None` bootstraps a new cluster.
    pub join: Option<String>,
    /// The shared secret.
    pub cookie: String,
    /// The node's data dir: `node_id` and `raft/` live here.
    pub data_dir: PathBuf,
    /// The node's devices, as the cluster should know them.
    pub devices: Vec<DeviceRecord>,
    /// Raft's tick.
    pub tick: Duration,
    /// A member silent this long is marked down.
    pub down_after: Duration,
    /// Applied entries between snapshots.
    pub snapshot_threshold: u64,
    /// How long to keep trying to reach `join`.
    pub join_timeout: Duration,
}

impl ClusterConfig {
    /// Defaults for a node with these addresses.
    pub fn new(name: &str, cluster_addr: SocketAddr, http_addr: &str, data_dir: &Path) -> Self {
        ClusterConfig {
            name: name.to_string(),
            cluster_addr,
            http_addr: http_addr.to_string(),
            join: None,
            cookie: String::new(),
            data_dir: data_dir.to_path_buf(),
            devices: Vec::new(),
            tick: Duration::from_millis(50),
            down_after: Duration::from_secs(5),
            snapshot_threshold: 10_000,
            join_timeout: Duration::from_secs(30),
        }
    }
}

/// The running cluster membership of a node.
pub struct ClusterAgent {
    /// Proposals, reads and views.
    pub handle: ClusterHandle,
    /// The RaftActor.
    pub raft: ActorRef<RaftMsg>,
    /// The NodeServer.
    pub server: ActorRef<NodeServerMessage>,
}

impl ClusterAgent {
    /// Stops the RaftActor and the NodeServer.
    pub async fn stop(&self) {
        let _ = self.raft.stop_and_wait(Some("shutdown".into()), None).await;
        let _ = self
            .server
            .stop_and_wait(Some("shutdown".into()), None)
            .await;
    }
}

/// Reads the node's Raft id from `<data_dir>/node_id`, creating a random one on first
/// start.
pub fn node_id(data_dir: &Path) -> Result<u64, ClusterError> {
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|id| *id != 0)
            .ok_or_else(|| {
                ClusterError::Corrupt(format!("{} does not hold a node id", path.display()))
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                ClusterError::Invalid(format!("cannot create {}: {e}", data_dir.display()))
            })?;
            // Below 2^53, so that JSON readers that hold numbers as doubles keep ids exact.
            let id = fastrand::u64(1..1u64 << 53);
            let tmp = data_dir.join("node_id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    ClusterError::Invalid(format!("cannot write {}: {e}", path.display()))
                })?;
            Ok(id)
        }
        Err(e) => Err(ClusterError::Invalid(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Session events from the NodeServer: logged, and passed on to whoever waits to join.
struct Sessions {
    ready: watch::Sender<u64>,
    refused: watch::Sender<u64>,
    authenticated: Arc<Mutex<std::collections::HashSet<u64>>>,
}

impl NodeEventSubscription for Sessions {
    fn node_session_opened(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        tracing::debug!(peer = %ses.peer_addr, incoming = ses.is_server, "cluster session opened");
    }

    fn node_session_disconnected(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        let was_authenticated = self
            .authenticated
            .lock()
            .map(|mut a| a.remove(&ses.node_id))
            .unwrap_or(false);
        if was_authenticated {
            tracing::warn!(peer = %ses.peer_addr, "cluster session closed");
        } else {
            tracing::error!(
                peer = %ses.peer_addr,
                incoming = ses.is_server,
                "cluster session refused: it closed before authenticating (wrong cookie?)"
            );
            self.refused.send_modify(|n| *n += 1);
        }
    }

    fn node_session_authenticated(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        if let Ok(mut a) = self.authenticated.lock() {
            a.insert(ses.node_id);
        }
        let name = ses
            .peer_name
            .as_ref()
            .map(|n| n.name.clone())
            .unwrap_or_default();
        tracing::info!(peer = %ses.peer_addr, %name, "cluster session authenticated");
    }

    fn node_session_ready(&self, ses: ractor_cluster::node::NodeServerSessionInformation) {
        tracing::debug!(peer = %ses.peer_addr, "cluster session ready");
        self.ready.send_modify(|n| *n += 1);
    }
}

/// Starts the node's NodeServer and RaftActor (linked to `supervisor` when given), and
/// joins `config.join` if set.
pub async fn start(
    config: ClusterConfig,
    supervisor: Option<ActorCell>,
) -> Result<ClusterAgent, ClusterError> {
    let id = node_id(&config.data_dir)?;
    let bootstrap = config.join.is_none().then(|| vec![id]);
    let mut settings = RaftSettings::new(id);
    settings.snapshot_threshold = config.snapshot_threshold;
    // Opening sled reads the log from disk and may wait for the previous owner's lock.
    let node = crate::blocking(|| {
        let storage = SledStorage::open(config.data_dir.join("raft"), id)?;
        RaftNode::open(&settings, storage, bootstrap)
    })?;

    let spawn_err = |what: &str, e: ractor::SpawnErr| {
        ClusterError::Unavailable(format!("cannot start {what}: {e}"))
    };
    let server = NodeServer::new(
        config.cluster_addr.port(),
        config.cookie.clone(),
        config.name.clone(),
        config.cluster_addr.ip().to_string(),
        None,
        Some(NodeConnectionMode::Transitive),
    )
    .with_listen_addr(config.cluster_addr.ip());
    let (server, _) = match &supervisor {
        Some(sup) => Actor::spawn_linked(None, server, (), sup.clone()).await,
        None => Actor::spawn(None, server, ()).await,
    }
    .map_err(|e| spawn_err("the cluster listener", e))?;

    let (ready_tx, mut ready_rx) = watch::channel(0u64);
    let (refused_tx, mut refused_rx) = watch::channel(0u64);
    let _ = server.cast(NodeServerMessage::SubscribeToEvents {
        id: "cohort-sessions".into(),
        subscription: Box::new(Sessions {
            ready: ready_tx,
            refused: refused_tx,
            authenticated: Arc::new(Mutex::new(Default::default())),
        }),
    });

    let record = NodeRecord {
        id,
        name: config.name.clone(),
        cluster_addr: config.cluster_addr.to_string(),
        http_addr: config.http_addr.clone(),
        devices: config.devices.clone(),
        labels: Default::default(),
        status: NodeStatus::Up,
        role: if config.join.is_some() {
            NodeRole::Learner
        } else {
            NodeRole::Voter
        },
    };
    let published = Arc::new(Published::default());
    let args = RaftActorArgs {
        node,
        settings: RaftActorSettings {
            tick: config.tick,
            down_after: config.down_after,
            record,
            joining: config.join.is_some(),
        },
        published: Arc::clone(&published),
    };
    let (raft, _) = match &supervisor {
        Some(sup) => Actor::spawn_linked(None, RaftActor, args, sup.clone()).await,
        None => Actor::spawn(None, RaftActor, args).await,
    }
    .map_err(|e| spawn_err("the raft actor", e))?;
    let agent = ClusterAgent {
        handle: ClusterHandle::new(
            raft.clone(),
            id,
            published,
            TokenKey::from_cookie(&config.cookie),
        ),
        raft,
        server,
    };

    if let Some(seed) = &config.join {
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        loop {
            let refused_before = *refused_rx.borrow_and_update();
            match ractor_cluster::client_connect(&agent.server, seed.as_str()).await {
                Ok(()) => {
                    let outcome = tokio::time::timeout_at(deadline, async {
                        tokio::select! {
                            r = ready_rx.wait_for(|n| *n > 0) => r.is_ok(),
                            _ = refused_rx.wait_for(|n| *n > refused_before) => false,
                        }
                    })
                    .await;
                    match outcome {
                        Ok(true) => {
                            tracing::info!(node = id, %seed, "connected to the cluster; asking to join");
                            break;
                        }
                        Ok(false) => {
                            tracing::error!(%seed, "the cluster refused this node (wrong cookie?)");
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => tracing::warn!(%seed, error = ?e, "cannot reach the cluster yet"),
            }
            if tokio::time::Instant::now() >= deadline {
                agent.stop().await;
                return Err(ClusterError::Unavailable(format!(
                    "could not join the cluster at {seed} within {:?} (unreachable, or the cookie does not match)",
                    config.join_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    spawn_reconnector(
        agent.handle.clone(),
        agent.server.clone(),
        config.name.clone(),
    );
    Ok(agent)
}

/// Keeps this node connected to every member the cluster state lists: a node restarted
/// after a crash (or a member whose session dropped) is reached again, without any
/// `--join`. Stops when the NodeServer stops.
fn spawn_reconnector(handle: ClusterHandle, server: ActorRef<NodeServerMessage>, me: String) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !matches!(server.get_status(), ractor::ActorStatus::Running) {
                return;
            }
            let Ok(view) = handle.view(false, Duration::from_secs(2)).await else {
                continue;
            };
            let sessions = match ractor::call_t!(server, NodeServerMessage::GetSessions, 2000) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let connected: std::collections::HashSet<String> = sessions
                .values()
                .filter_map(|s| s.peer_name.as_ref())
                .map(|n| n.name.split('@').next().unwrap_or_default().to_string())
                .collect();
            for m in &view.nodes {
                let r = &m.record;
                if r.name == me || connected.contains(&r.name) || r.status == NodeStatus::Removed {
                    continue;
                }
                let addr = r.cluster_addr.clone();
                let server = server.clone();
                tokio::spawn(async move {
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(2),
                        ractor_cluster::client_connect(&server, addr.as_str()),
                    )
                    .await;
                    if let Ok(Err(e)) = attempt {
                        tracing::debug!(%addr, error = ?e, "cannot reach a member yet");
                    }
                });
            }
        }
    });
}
