//! The errors of this crate: why a request was not answered with outputs, and why a node
//! could not start.

use cohort_engines::InputError;

/// Why a request got no outputs. The gateway maps each variant to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// No model of that name is served here.
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    /// The model exists but no replica of it is ready.
    #[error("model {model:?} has no ready replica ({reason})")]
    NoReplica { model: String, reason: String },
    /// The inputs do not match the model.
    #[error(transparent)]
    InvalidInput(#[from] InputError),
    /// The replica's queue is full.
    #[error("replica {replica} is overloaded: its queue holds {capacity} requests")]
    Overloaded { replica: String, capacity: usize },
    /// The deadline passed before an answer came.
    #[error("deadline of {timeout_ms} ms passed before the request was served")]
    Timeout { timeout_ms: u64 },
    /// The engine failed or panicked.
    #[error("inference failed: {0}")]
    InferenceFailed(String),
    /// The picked replica is draining; another pick may succeed.
    #[error("replica {replica} of model {model:?} is stopping")]
    ReplicaStopping { model: String, replica: String },
}

impl InferError {
    /// A stable name, used as a metric label and in logs.
    pub fn code(&self) -> &'static str {
        match self {
            InferError::ModelNotFound(_) => "MODEL_NOT_FOUND",
            InferError::NoReplica { .. } => "NO_REPLICA",
            InferError::InvalidInput(_) => "INVALID_INPUT",
            InferError::Overloaded { .. } => "OVERLOADED",
            InferError::Timeout { .. } => "TIMEOUT",
            InferError::InferenceFailed(_) => "INFERENCE_FAILED",
            InferError::ReplicaStopping { .. } => "NO_REPLICA",
        }
    }
}

/// Why a change to a model's replicas was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot prepare built-in models: {0}")]
    Builtin(#[from] cohort_engines::EngineError),
    #[error("cannot start actor {actor}: {reason}")]
    Spawn { actor: &'static str, reason: String },
    #[error("{0}")]
    Startup(String),
}
