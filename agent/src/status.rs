//! The `status` document, typed, in one place: what the agent holds (`Status`) and what its
//! runtime shows (`RuntimeView`, the sink a rollout backend writes to). Serialised to the JSON
//! contract the README lists; `tests::the_keys_are_the_contract` pins the keys.

use crate::state::{Positions, Rejection, Release};
use outpost_bundle_format::Digest;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// `GET /status` (and `outpost-agent status --output json`), less `source`, which the API adds.
#[derive(Debug, Serialize)]
pub struct Status {
    pub stack: StackStatus,
    /// `"none"`, or the runtime's view with `kind` and `converged`.
    pub runtime: Value,
    pub current: Option<ReleaseStatus>,
    pub pending: Option<PendingStatus>,
    pub last_good: Option<ReleaseStatus>,
    pub pinned: Option<String>,
    pub highest_sequence: Option<u64>,
    /// As recorded (its keys are the contract's: digest, origin, check, reason, at).
    pub last_rejection: Option<Rejection>,
}

#[derive(Debug, Serialize)]
pub struct StackStatus {
    pub name: String,
    pub channel: String,
}

#[derive(Debug, Serialize)]
pub struct ReleaseStatus {
    pub version: String,
    pub sequence: u64,
    pub digest: outpost_bundle_format::Digest,
    pub created: String,
    pub expires: String,
    pub origin: String,
    pub received_at: String,
}

#[derive(Debug, Serialize)]
pub struct PendingStatus {
    #[serde(flatten)]
    pub release: ReleaseStatus,
    pub waiting_for: Option<String>,
}

impl From<&Release> for ReleaseStatus {
    fn from(r: &Release) -> Self {
        ReleaseStatus {
            version: r.version.clone(),
            sequence: r.sequence,
            digest: r.digest,
            created: r.created.clone(),
            expires: r.expires.clone(),
            origin: r.origin.clone(),
            received_at: r.received_at.clone(),
        }
    }
}

impl Status {
    /// The document for `positions`; `runtime` is the runtime's part (see [`RuntimeView`]).
    pub fn new(stack: StackStatus, positions: &Positions, runtime: Value) -> Status {
        Status {
            stack,
            runtime,
            current: positions.current.as_ref().map(ReleaseStatus::from),
            pending: positions.pending.as_ref().map(|r| PendingStatus {
                release: r.into(),
                waiting_for: positions.waiting_for.clone(),
            }),
            last_good: positions.last_good.as_ref().map(ReleaseStatus::from),
            pinned: positions.pinned.clone(),
            highest_sequence: positions.highest_sequence,
            last_rejection: positions.last_rejection.clone(),
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// `runtime.*` in `status`: where the rollout stands, written by the rollout loop and its
/// backend. `kind` and `converged` are added from the agent's positions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RuntimeStatus {
    /// `nothing to run yet`, `rolling out`, `converged`, `superseded`, `failed`.
    pub phase: Option<String>,
    /// The release being run.
    pub target: Option<Target>,
    pub resources: BTreeMap<String, ResourceStatus>,
    /// What the plan could not do (frozen resources, crash-loop waits).
    pub findings: Vec<String>,
    /// The last thing worth knowing about a step (a stop-first replace, a forced pod delete).
    pub note: Option<String>,
    pub last_error: Option<String>,
    pub last_rollback: Option<String>,
    /// The drift the last pass repaired (at most ten, then a count).
    pub last_drift: Vec<String>,
    /// Where public endpoints are reachable.
    pub endpoints: Vec<String>,
    pub endpoint_errors: Vec<String>,
    /// VM pools: their machines and what runs on each (runtime vm).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, PoolStatus>,
    /// VM pools: each stateful replica's volume, by replica (`db-0`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, VolumeStatus>,
    /// VM pools: each public endpoint's load balancer, by `resource.endpoint`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub load_balancers: BTreeMap<String, LoadBalancerStatus>,
}

/// A public endpoint's load balancer in the cloud.
#[derive(Debug, Clone, Serialize)]
pub struct LoadBalancerStatus {
    pub dns: String,
    /// The machines it sends to.
    pub targets: Vec<String>,
}

/// A stateful replica's volume in the cloud.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub id: String,
    pub zone: String,
    pub size_gib: u32,
    /// `attached to i-…`, `moving to or from i-…`, `available`, `being made`, `unusable`.
    pub state: String,
}

/// One VM pool: the machines its group is asked for and those it runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStatus {
    pub desired: u32,
    pub machines: Vec<MachineStatus>,
    /// Why the pool cannot hold its replicas, or the cloud's refusal, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    pub id: String,
    pub zone: String,
    /// `booting`, `joined`, `healthy`, `unhealthy: …`, `silent`, `retiring`, `leaving`.
    pub state: String,
    pub replicas: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub version: String,
    pub digest: Digest,
}

/// One resource: its current step, and what runs (replicas on an engine, or the workload's
/// counts on a cluster).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResourceStatus {
    pub step: Option<String>,
    /// Replicas the release wants (the autoscaler's choice included), and those running
    /// healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub health: String,
    pub config_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub object: String,
    pub replicas: i64,
    pub ready: i64,
    pub updated: i64,
    pub available: i64,
}

/// The sink a rollout writes [`RuntimeStatus`] to.
#[derive(Default)]
pub struct RuntimeView {
    state: std::sync::Mutex<RuntimeStatus>,
}

impl RuntimeView {
    pub fn snapshot(&self) -> Value {
        self.state
            .lock()
            .ok()
            .and_then(|s| serde_json::to_value(&*s).ok())
            .unwrap_or_else(|| json!({}))
    }

    /// A copy of the typed status (for `/metrics`).
    pub fn current(&self) -> RuntimeStatus {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut RuntimeStatus)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
        }
    }

    pub(crate) fn resource_step(&self, resource: &str, step: &str) {
        self.update(|s| {
            s.resources.entry(resource.to_string()).or_default().step = Some(step.to_string())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's status keys: renaming one breaks every script that reads them.
    #[test]
    fn the_keys_are_the_contract() {
        let bundle = outpost_bundle_format::verify(
            &crate::testing::signed_release("1.0.0", 1),
            &crate::testing::trust(),
            chrono::Utc::now(),
            &Default::default(),
        )
        .unwrap();
        let release = Release::verified(&bundle, "test", chrono::Utc::now()).unwrap();
        let positions = Positions {
            current: Some(release.clone()),
            pending: Some(release.clone()),
            last_good: Some(release),
            waiting_for: Some("approval".into()),
            pinned: None,
            highest_sequence: Some(1),
            last_rejection: Some(Rejection {
                digest: None,
                origin: "o".into(),
                check: "rollback".into(),
                reason: "r".into(),
                at: "t".into(),
            }),
            converged: None,
            rolled_back: None,
        };
        let stack = StackStatus {
            name: "acme".into(),
            channel: "stable".into(),
        };
        let status = Status::new(stack, &positions, json!("none")).to_json();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(&status),
            [
                "current",
                "highest_sequence",
                "last_good",
                "last_rejection",
                "pending",
                "pinned",
                "runtime",
                "stack"
            ]
        );
        let release_keys = [
            "created",
            "digest",
            "expires",
            "origin",
            "received_at",
            "sequence",
            "version",
        ];
        assert_eq!(keys(&status["current"]), release_keys);
        assert_eq!(keys(&status["last_good"]), release_keys);
        let mut pending_keys = release_keys.to_vec();
        pending_keys.push("waiting_for");
        pending_keys.sort();
        assert_eq!(keys(&status["pending"]), pending_keys);
        assert_eq!(
            keys(&status["last_rejection"]),
            ["at", "check", "digest", "origin", "reason"]
        );
        assert_eq!(keys(&status["stack"]), ["channel", "name"]);
    }
}
