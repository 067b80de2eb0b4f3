//! `ModelInstance`: one replica of one model.
//!
//! The actor owns a dedicated OS thread that loads the engine and runs it (inference never
//! runs on a tokio worker), and the replica's bounded queue ([`ReplicaShared`]). Requests
//! from this node's gateway are queued straight into that queue by the router's pick;
//! [`ModelInstanceMsg::Infer`] queues one through the actor's mailbox, the path a request
//! from another node takes.
//!
//! Supervision: the actor has no child actors; its engine thread is its only charge. When
//! the engine fails to load or panics, the thread says so ([`ModelInstanceMsg::EngineExited`])
//! and the actor fails, leaving its queue intact; the NodeSupervisor restarts the replica
//! with backoff and the new engine serves what was waiting. When the actor is stopped on
//! purpose it closes the queue, lets the engine thread finish every queued request
//! (draining), and only then stops.

use std::sync::Arc;
use std::thread::JoinHandle;

use cohort_config::ModelConfig;
use cohort_engines::LoadContext;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::replica::ReplicaStatus;
use crate::replica::{spawn_engine_thread, EngineExit, Pending, ReplicaShared, ReplicaState};

/// The ModelInstance actor.
pub struct ModelInstance;

/// What a ModelInstance starts with.
pub struct ModelInstanceArgs {
    /// The replica's queue and counters (kept across restarts).
    pub shared: Arc<ReplicaShared>,
    /// The model it runs.
    pub model: ModelConfig,
    /// Where the engine loads from and runs (data dir, device, threads).
    pub load: LoadContext,
}

/// Messages to a ModelInstance.
pub enum ModelInstanceMsg {
    /// Queue a request (the path of requests that come through the mailbox).
    Infer(Box<Pending>),
    /// The engine thread loaded its engine and serves.
    EngineReady,
    /// The engine thread stopped.
    EngineExited(EngineExit),
    /// Report the replica's status.
    Status(RpcReplyPort<ReplicaStatus>),
}

// Local only: never sent to another node.
impl ractor::Message for ModelInstanceMsg {}

/// The actor's state.
pub struct InstanceState {
    shared: Arc<ReplicaShared>,
    thread: Option<JoinHandle<()>>,
    /// The engine crashed: leave the queue for the restarted replica.
    crashed: bool,
}

impl Actor for ModelInstance {
    type Msg = ModelInstanceMsg;
    type State = InstanceState;
    type Arguments = ModelInstanceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ModelInstanceArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.shared.reopen();
        args.shared.set_state(ReplicaState::Loading);
        let thread = spawn_engine_thread(Arc::clone(&args.shared), args.model, args.load, myself)?;
        Ok(InstanceState {
            shared: args.shared,
            thread: Some(thread),
            crashed: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModelInstanceMsg::Infer(p) => {
                if let Err(rejected) = state.shared.submit(*p) {
                    let (err, p) = *rejected;
                    let _ = p.reply.send(Err(err));
                }
            }
            ModelInstanceMsg::EngineReady => {
                tracing::debug!(replica = %state.shared.id, "replica ready");
            }
            ModelInstanceMsg::EngineExited(exit) => match exit {
                EngineExit::Drained => myself.stop(Some("drained".into())),
                EngineExit::LoadFailed(reason) | EngineExit::Panicked(reason) => {
                    state.crashed = true;
                    state.shared.set_last_error(reason.clone());
                    state.shared.set_state(ReplicaState::Restarting);
                    return Err(format!("replica {}: {reason}", state.shared.id).into());
                }
            },
            ModelInstanceMsg::Status(reply) => {
                let _ = reply.send(state.shared.status());
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.crashed {
            return Ok(());
        }
        // Stopped on purpose: drain the queue, then wait for the engine thread to finish.
        // If the engine dies while draining, what is left in the queue is moved to another
        // replica by the supervisor when it forgets this one.
        state.shared.close();
        if let Some(thread) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        state.shared.set_state(ReplicaState::Stopped);
        Ok(())
    }
}
