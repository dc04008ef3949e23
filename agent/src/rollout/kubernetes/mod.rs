//! The Kubernetes backend: a release as objects in the customer's one namespace.
//!
//! - `render.rs`: the pure mapping of a release onto objects (also `outpost-agent render`,
//!   available without the cluster client);
//! - `cluster.rs`: applying them with kube-rs (cargo feature `kubernetes`), rollout status,
//!   prune and drift.

pub mod render;

#[cfg(feature = "kubernetes")]
mod cluster;

#[cfg(feature = "kubernetes")]
pub use cluster::{Cluster, FIELD_MANAGER};
