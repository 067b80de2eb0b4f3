//! The errors of the cluster layer: storage, encoding, Raft, and inputs that make no sense.
//!
//! A command that the state machine refuses is not an error here: it is an
//! [`ApplyOutcome::Rejected`](crate::state::ApplyOutcome::Rejected), because refusing a
//! command is a deterministic result every replica agrees on.

/// Why a cluster-layer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// sled failed to read, write or flush.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// A value could not be bincode-encoded.
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// A stored or received value could not be bincode-decoded (truncated or corrupt).
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// A Raft protobuf message could not be encoded or decoded.
    #[error("protobuf: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    /// A value was empty: it lacks even the format byte.
    #[error("value is empty: no format byte")]
    MissingFormat,
    /// A value was written in a format this build does not read (a newer release wrote it,
    /// or it is not Cohort's).
    #[error("value has format version {found}; this build reads version {supported}")]
    UnsupportedFormat {
        /// The version byte found in front of the value.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// Raft itself refused (out-of-date snapshot, compacted log, ...).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// What is on disk contradicts itself (a gap in the log, a key of the wrong length).
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// The storage directory belongs to another node.
    #[error("storage belongs to node {stored}, not to node {requested}")]
    NodeMismatch {
        /// The node id recorded in the directory.
        stored: u64,
        /// The node id asked for.
        requested: u64,
    },
    /// The caller asked for something that cannot be done (an append with a gap, a
    /// compaction past the snapshot, ...).
    #[error("invalid: {0}")]
    Invalid(String),
    /// This member does not lead; `leader` is the one it knows of (0: none yet).
    #[error("this node is not the Raft leader (leader: {leader})")]
    NotLeader {
        /// The leader's id, or 0.
        leader: u64,
    },
    /// The leader refused or lost a forwarded proposal.
    #[error("forwarded to the leader: {0}")]
    Forward(String),
    /// The Raft actor is not running.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    /// No answer in time (no quorum, or no leader yet).
    #[error("no answer from the cluster in time")]
    Timeout,
}

impl ClusterError {
    /// A stable name, used as a metric label and in logs.
    pub fn code(&self) -> &'static str {
        match self {
            ClusterError::Sled(_) => "STORAGE",
            ClusterError::Encode(_) => "ENCODE",
            ClusterError::Decode(_) => "DECODE",
            ClusterError::Protobuf(_) => "PROTOBUF",
            ClusterError::MissingFormat => "MISSING_FORMAT",
            ClusterError::UnsupportedFormat { .. } => "UNSUPPORTED_FORMAT",
            ClusterError::Raft(_) => "RAFT",
            ClusterError::Corrupt(_) => "CORRUPT",
            ClusterError::NodeMismatch { .. } => "NODE_MISMATCH",
            ClusterError::Invalid(_) => "INVALID",
            ClusterError::NotLeader { .. } => "NOT_LEADER",
            ClusterError::Forward(_) => "FORWARD",
            ClusterError::Unavailable(_) => "UNAVAILABLE",
            ClusterError::Timeout => "TIMEOUT",
        }
    }

    /// Whether retrying the same proposal later may succeed (leadership was changing).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::NotLeader { .. } | ClusterError::Forward(_)
        ) || matches!(self, ClusterError::Raft(raft::Error::ProposalDropped))
    }
}

impl From<ClusterError> for raft::Error {
    /// Raft errors pass through unchanged; everything else becomes
    /// `StorageError::Other`, which makes Raft stop using the storage.
    fn from(e: ClusterError) -> raft::Error {
        match e {
            ClusterError::Raft(e) => e,
            other => raft::Error::Store(raft::StorageError::Other(Box::new(other))),
        }
    }
}
