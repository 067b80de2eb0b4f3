//! Cohort's cluster layer: Raft log storage in sled and the replicated ClusterState.
//!
//! Modules arrive with the cluster issue; see `storage` and `state`.
