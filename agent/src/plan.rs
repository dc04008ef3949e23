//! Plan: a pure function from the desired release, the replicas a runtime observed and the time
//! to the ordered actions that converge them. No I/O: the rollout carries actions out through a
//! runtime, one at a time, and the same function repairs drift on every observation.
//!
//! Replicas are named `<stack>-<resource>-<ordinal>`; each carries the hash of everything in its
//! resource that makes a replica differ (`config_hash`), so a changed option means a replace.

use chrono::{DateTime, Duration, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Container, Lifecycle, Protocol, Scaling, Stack};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A replica that exited sooner than this after its start is not restarted before this much
/// time has passed (crash-loop guard).
pub const RESTART_BACKOFF: Duration = Duration::seconds(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct ReplicaId {
    pub resource: String,
    pub ordinal: u32,
}

impl ReplicaId {
    pub fn new(resource: &str, ordinal: u32) -> ReplicaId {
        ReplicaId {
            resource: resource.to_string(),
            ordinal,
        }
    }

    /// The runtime's name for it: `<stack>-<resource>-<ordinal>`.
    pub fn name(&self, stack: &str) -> String {
        format!("{stack}-{}-{}", self.resource, self.ordinal)
    }
}

/// A resource of the release as it should run.
#[derive(Debug)]
pub struct DesiredResource<'a> {
    pub container: &'a Container,
    pub lifecycle: Lifecycle,
    pub replicas: u32,
    pub config_hash: String,
}

/// The release to converge to, resources in dependency order (a resource after those it links).
#[derive(Debug)]
pub struct Desired<'a> {
    pub stack: &'a str,
    pub digest: Digest,
    pub resources: Vec<DesiredResource<'a>>,
    /// Only these replicas run here (a machine of a VM pool); `None`: all of them.
    pub only: Option<std::collections::BTreeSet<ReplicaId>>,
}

impl<'a> Desired<'a> {
    /// `scale` holds the autoscaler's current choice per resource; it is clamped to the stack's
    /// bounds, and resources without a choice start at their desired (or minimum) count.
    pub fn new(stack: &'a Stack, digest: Digest, scale: &BTreeMap<String, u32>) -> Desired<'a> {
        let order = dependency_order(stack);
        let resources = order
            .into_iter()
            .map(|index| {
                let resource = &stack.resources[index];
                let container = &resource.container;
                let replicas = match &container.scaling {
                    Scaling::Fixed(n) => *n,
                    Scaling::Auto {
                        min, desired, max, ..
                    } => scale
                        .get(&container.name)
                        .copied()
                        .unwrap_or(*desired)
                        .clamp(*min, *max),
                };
                DesiredResource {
                    container,
                    lifecycle: resource.lifecycle,
                    replicas,
                    config_hash: config_hash(&stack.name, container),
                }
            })
            .collect();
        Desired {
            stack: &stack.name,
            digest,
            resources,
            only: None,
        }
    }
}

/// Indices of the stack's resources, each after the resources it links; members of a link cycle
/// keep their file order.
pub fn dependency_order(stack: &Stack) -> Vec<usize> {
    let index: HashMap<&str, usize> = stack
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.container.name.as_str(), i))
        .collect();
    let mut waiting_on: Vec<usize> = vec![0; stack.resources.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); stack.resources.len()];
    for (i, resource) in stack.resources.iter().enumerate() {
        let links: BTreeSet<usize> = resource
            .container
            .links
            .iter()
            .filter_map(|l| index.get(l.as_str()).copied())
            .filter(|&j| j != i)
            .collect();
        waiting_on[i] = links.len();
        for j in links {
            dependents[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..stack.resources.len())
        .filter(|&i| waiting_on[i] == 0)
        .collect();
    let mut order = Vec::with_capacity(stack.resources.len());
    let mut placed = vec![false; stack.resources.len()];
    while let Some(i) = ready.pop_first() {
        order.push(i);
        placed[i] = true;
        for &d in &dependents[i] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.insert(d);
            }
        }
    }
    order.extend((0..stack.resources.len()).filter(|&i| !placed[i]));
    order
}

/// The environment a replica of `container` starts with: the vendor's, plus for each link
/// `<LINK>_HOST` (`host` of the linked resource's name), `<LINK>_PORT` (its first port) and
/// `<LINK>_PORTS` (all, comma-separated). Every runtime hands links over this way.
pub fn link_environment(
    stack: &Stack,
    container: &Container,
    host: impl Fn(&str) -> String,
) -> BTreeMap<String, String> {
    let mut environment = container.environment.clone();
    for link in &container.links {
        let Some(linked) = stack.resource(link) else {
            continue;
        };
        let prefix = link.to_uppercase().replace('-', "_");
        let ports: Vec<String> = linked.container.ports.iter().map(u16::to_string).collect();
        environment.insert(format!("{prefix}_HOST"), host(link));
        environment.insert(
            format!("{prefix}_PORT"),
            ports.first().cloned().unwrap_or_default(),
        );
        environment.insert(format!("{prefix}_PORTS"), ports.join(","));
    }
    environment
}

/// Hash of what makes a replica of `container` differ. The fields are spelled out (in this
/// order) rather than derived, so an agent upgrade never changes hashes and rolls every replica.
pub fn config_hash(stack: &str, container: &Container) -> String {
    #[derive(Serialize)]
    struct Fingerprint<'a> {
        stack: &'a str,
        image: String,
        cpu: [f64; 2],
        memory: u64,
        ports: &'a [u16],
        public_endpoints: Vec<(&'a str, u16, &'static str)>,
        stateful: bool,
        persistent_storage: Option<u64>,
        ephemeral_storage: Option<u64>,
        gpu: Option<(&'a str, u32)>,
        health_check: Option<(&'a str, u16, &'a str, u32, u32)>,
        environment: &'a BTreeMap<String, String>,
        links: &'a [String],
        permissions: &'a str,
        pool: Option<&'a str>,
        command: &'a [String],
    }
    let fingerprint = Fingerprint {
        stack,
        image: container.image.to_string(),
        cpu: [container.cpu.min, container.cpu.desired],
        memory: container.memory.bytes(),
        ports: &container.ports,
        public_endpoints: container
            .public_endpoints
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    e.port,
                    if e.protocol == Protocol::Http {
                        "http"
                    } else {
                        "tcp"
                    },
                )
            })
            .collect(),
        stateful: container.stateful,
        persistent_storage: container.persistent_storage.as_ref().map(|q| q.bytes()),
        ephemeral_storage: container.ephemeral_storage.as_ref().map(|q| q.bytes()),
        gpu: container.gpu.as_ref().map(|g| (g.kind.as_str(), g.count)),
        health_check: container.health_check.as_ref().map(|p| {
            (
                p.path.as_str(),
                p.port,
                p.method.as_str(),
                p.timeout_seconds,
                p.failure_threshold,
            )
        }),
        environment: &container.environment,
        links: &container.links,
        permissions: &container.permissions,
        pool: container.pool.as_deref(),
        command: &container.command,
    };
    let digest = Digest::of(&serde_json::to_vec(&fingerprint).unwrap_or_default());
    digest.hex()[..16].to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    Running,
    /// Created but not running (exited, stopped, never started).
    Stopped,
}

/// A replica carrying our owner label, as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObservedReplica {
    pub id: ReplicaId,
    pub config_hash: String,
    pub state: ReplicaState,
    /// When it last started (for the crash-loop guard).
    pub started_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveReason {
    /// Above the desired replica count.
    ScaleDown,
    /// Its resource is no longer in the release.
    Pruned,
    /// It runs on another machine now.
    Elsewhere,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create and start the replica, then wait until it is healthy.
    Create {
        replica: ReplicaId,
        config_hash: String,
    },
    /// Roll the replica to the new configuration. Stateless: start the new one, wait until
    /// healthy, remove the old. Stateful (`stop_first`): stop the old, start the new on the same
    /// volume.
    Replace {
        replica: ReplicaId,
        from_hash: String,
        config_hash: String,
        stop_first: bool,
    },
    /// Start a replica found stopped (drift).
    Start { replica: ReplicaId },
    /// Remove the replica; its volume stays unless the customer opted in to deleting volumes.
    Remove {
        replica: ReplicaId,
        reason: RemoveReason,
    },
}

impl Action {
    pub fn replica(&self) -> &ReplicaId {
        match self {
            Action::Create { replica, .. }
            | Action::Replace { replica, .. }
            | Action::Start { replica }
            | Action::Remove { replica, .. } => replica,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// In order: resources by dependency, replicas by ordinal; removals after the updates of
    /// their resource; pruning last.
    pub actions: Vec<Action>,
    /// What is not converged but must not be touched now: frozen resources that differ from
    /// the release, replicas in crash-loop backoff.
    pub findings: Vec<String>,
}

impl Plan {
    pub fn is_converged(&self) -> bool {
        self.actions.is_empty() && self.findings.is_empty()
    }
}

/// The actions that take `observed` to `desired` at `now`.
pub fn plan(desired: &Desired, observed: &[ObservedReplica], now: DateTime<Utc>) -> Plan {
    let mut by_resource: HashMap<&str, Vec<&ObservedReplica>> = HashMap::new();
    for replica in observed {
        by_resource
            .entry(replica.id.resource.as_str())
            .or_default()
            .push(replica);
    }
    let mut result = Plan::default();
    for resource in &desired.resources {
        let name = resource.container.name.as_str();
        let mut present: Vec<&ObservedReplica> = by_resource.remove(name).unwrap_or_default();
        present.sort_by_key(|r| r.id.ordinal);
        let frozen = resource.lifecycle == Lifecycle::Frozen;
        // The ordinals that run here: all of the resource's, or (a machine of a VM pool) those
        // placed on this machine.
        let ordinals: Vec<u32> = match &desired.only {
            None => (0..resource.replicas).collect(),
            Some(only) => only
                .iter()
                .filter(|r| r.resource == name)
                .map(|r| r.ordinal)
                .collect(),
        };
        let mut next = present.iter().peekable();
        for &ordinal in &ordinals {
            while next.peek().is_some_and(|r| r.id.ordinal < ordinal) {
                next.next();
            }
            let replica = ReplicaId::new(name, ordinal);
            let Some(found) = next.next_if(|r| r.id.ordinal == ordinal) else {
                result.actions.push(Action::Create {
                    replica,
                    config_hash: resource.config_hash.clone(),
                });
                continue;
            };
            if found.config_hash != resource.config_hash {
                if frozen {
                    result.findings.push(format!(
                        "{}: frozen, differs from the release (kept as provisioned)",
                        replica.name(desired.stack)
                    ));
                } else {
                    result.actions.push(Action::Replace {
                        replica,
                        from_hash: found.config_hash.clone(),
                        config_hash: resource.config_hash.clone(),
                        stop_first: resource.container.stateful,
                    });
                }
                continue;
            }
            if found.state == ReplicaState::Stopped {
                match found
                    .started_at
                    .map(|at| at + RESTART_BACKOFF)
                    .filter(|retry| *retry > now)
                {
                    Some(retry) => result.findings.push(format!(
                        "{}: exited right after starting; next start at {}",
                        replica.name(desired.stack),
                        outpost_bundle_format::release::rfc3339::format(&retry)
                    )),
                    None => result.actions.push(Action::Start { replica }),
                }
            }
        }
        let surplus = present
            .iter()
            .rev()
            .filter(|r| ordinals.binary_search(&r.id.ordinal).is_err());
        for replica in surplus {
            if desired.only.is_some() {
                result.actions.push(Action::Remove {
                    replica: replica.id.clone(),
                    reason: RemoveReason::Elsewhere,
                });
            } else if frozen {
                result.findings.push(format!(
                    "{}: frozen, above the release's replica count (kept)",
                    replica.id.name(desired.stack)
                ));
            } else {
                result.actions.push(Action::Remove {
                    replica: replica.id.clone(),
                    reason: RemoveReason::ScaleDown,
                });
            }
        }
    }
    let mut orphans: Vec<&ObservedReplica> = by_resource.into_values().flatten().collect();
    orphans.sort_by(|a, b| a.id.cmp(&b.id));
    for replica in orphans {
        result.actions.push(Action::Remove {
            replica: replica.id.clone(),
            reason: RemoveReason::Pruned,
        });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn stack(text: &str) -> Stack {
        Stack::from_yaml(text).unwrap().1
    }

    const SHOP: &str = r#"
name: shop
permissionProfiles: {execution: {}}
resources:
  - lifecycle: live
    container:
      name: web
      code: {image: "ghcr.io/shop/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      replicas: 2
      links: [api]
      permissions: execution
  - lifecycle: live
    container:
      name: api
      code: {image: "ghcr.io/shop/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [9090]
      minReplicas: 1
      maxReplicas: 4
      links: [db]
      permissions: execution
  - lifecycle: frozen
    container:
      name: db
      code: {image: "ghcr.io/shop/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 2
      memory: 4Gi
      ports: [5432]
      replicas: 1
      persistentStorage: 10Gi
      permissions: execution
"#;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap()
    }

    fn digest() -> Digest {
        Digest::of(b"release")
    }

    /// What a runtime would observe after carrying the plan out.
    fn apply(observed: &[ObservedReplica], plan: &Plan, at: DateTime<Utc>) -> Vec<ObservedReplica> {
        let mut state: BTreeMap<ReplicaId, ObservedReplica> =
            observed.iter().map(|r| (r.id.clone(), r.clone())).collect();
        for action in &plan.actions {
            let running = |id: &ReplicaId, hash: &str| ObservedReplica {
                id: id.clone(),
                config_hash: hash.to_string(),
                state: ReplicaState::Running,
                started_at: Some(at),
            };
            match action {
                Action::Create {
                    replica,
                    config_hash,
                }
                | Action::Replace {
                    replica,
                    config_hash,
                    ..
                } => {
                    state.insert(replica.clone(), running(replica, config_hash));
                }
                Action::Start { replica } => {
                    if let Some(r) = state.get_mut(replica) {
                        r.state = ReplicaState::Running;
                        r.started_at = Some(at);
                    }
                }
                Action::Remove { replica, .. } => {
                    state.remove(replica);
                }
            }
        }
        state.into_values().collect()
    }

    fn resource_order<'a>(desired: &'a Desired) -> Vec<&'a str> {
        desired
            .resources
            .iter()
            .map(|r| r.container.name.as_str())
            .collect()
    }

    #[test]
    fn first_install_creates_in_dependency_order() {
        let stack = stack(SHOP);
        let desired = Desired::new(&stack, digest(), &BTreeMap::new());
        let order = resource_order(&desired);
        assert_eq!(order, ["db", "api", "web"]);
        let plan = plan(&desired, &[], now());
        let names: Vec<String> = plan
            .actions
            .iter()
            .map(|a| a.replica().name("shop"))
            .collect();
        assert_eq!(
            names,
            ["shop-db-0", "shop-api-0", "shop-web-0", "shop-web-1"]
        );
        assert!(
            plan.actions
                .iter()
                .all(|a| matches!(a, Action::Create { .. }))
        );
        let converged = apply(&[], &plan, now());
        assert!(super::plan(&desired, &converged, now()).is_converged());
    }

    #[test]
    fn a_changed_option_replaces_live_replicas_and_only_reports_frozen_ones() {
        let v1 = stack(SHOP);
        let observed = apply(
            &[],
            &plan(&Desired::new(&v1, digest(), &BTreeMap::new()), &[], now()),
            now(),
        );
        let v2 = stack(
            &SHOP
                .replace("memory: 1Gi", "memory: 2Gi")
                .replace("memory: 4Gi", "memory: 8Gi"),
        );
        let desired = Desired::new(&v2, digest(), &BTreeMap::new());
        let plan = plan(&desired, &observed, now());
        let replaced: Vec<String> = plan
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Replace {
                        stop_first: false,
                        ..
                    }
                )
            })
            .map(|a| a.replica().name("shop"))
            .collect();
        assert_eq!(replaced, ["shop-api-0", "shop-web-0", "shop-web-1"]);
        assert_eq!(plan.actions.len(), 3);
        assert_eq!(
            plan.findings,
            ["shop-db-0: frozen, differs from the release (kept as provisioned)"]
        );
    }

    #[test]
    fn stateful_live_resources_stop_first() {
        let text = SHOP.replace("lifecycle: frozen", "lifecycle: live");
        let v1 = stack(&text);
        let observed = apply(
            &[],
            &plan(&Desired::new(&v1, digest(), &BTreeMap::new()), &[], now()),
            now(),
        );
        let v2 = stack(&text.replace("cpu: 2", "cpu: 3"));
        let plan = plan(
            &Desired::new(&v2, digest(), &BTreeMap::new()),
            &observed,
            now(),
        );
        assert!(
            matches!(&plan.actions[..], [Action::Replace { replica, stop_first: true, .. }] if replica.name("shop") == "shop-db-0")
        );
    }

    #[test]
    fn scaling_prune_and_drift() {
        let v1 = stack(SHOP);
        let scale = BTreeMap::from([("api".to_string(), 3)]);
        let desired = Desired::new(&v1, digest(), &scale);
        let mut observed = apply(&[], &plan(&desired, &[], now()), now());
        assert_eq!(
            observed.iter().filter(|r| r.id.resource == "api").count(),
            3
        );
        // The autoscaler's choice is clamped to maxReplicas; scaling down removes the highest first.
        assert_eq!(
            Desired::new(&v1, digest(), &BTreeMap::from([("api".to_string(), 99)])).resources[1]
                .replicas,
            4
        );
        let down = plan(
            &Desired::new(&v1, digest(), &BTreeMap::from([("api".to_string(), 1)])),
            &observed,
            now(),
        );
        let removed: Vec<u32> = down.actions.iter().map(|a| a.replica().ordinal).collect();
        assert_eq!(removed, [2, 1]);
        assert!(down.actions.iter().all(|a| matches!(
            a,
            Action::Remove {
                reason: RemoveReason::ScaleDown,
                ..
            }
        )));
        // A stranger with our label, a stopped replica, a missing one.
        observed.push(ObservedReplica {
            id: ReplicaId::new("old-worker", 0),
            config_hash: "x".into(),
            state: ReplicaState::Running,
            started_at: None,
        });
        observed.retain(|r| r.id != ReplicaId::new("web", 1));
        for r in observed
            .iter_mut()
            .filter(|r| r.id == ReplicaId::new("web", 0))
        {
            r.state = ReplicaState::Stopped;
            r.started_at = Some(now() - Duration::minutes(5));
        }
        let repair = plan(&desired, &observed, now());
        assert_eq!(
            repair.actions,
            [
                Action::Start {
                    replica: ReplicaId::new("web", 0)
                },
                Action::Create {
                    replica: ReplicaId::new("web", 1),
                    config_hash: desired.resources[2].config_hash.clone()
                },
                Action::Remove {
                    replica: ReplicaId::new("old-worker", 0),
                    reason: RemoveReason::Pruned
                },
            ]
        );
    }

    #[test]
    fn crash_loops_wait_for_the_backoff() {
        let v1 = stack(SHOP);
        let desired = Desired::new(&v1, digest(), &BTreeMap::new());
        let mut observed = apply(&[], &plan(&desired, &[], now()), now());
        for r in observed.iter_mut().filter(|r| r.id.resource == "web") {
            r.state = ReplicaState::Stopped;
            r.started_at = Some(now() - Duration::seconds(3));
        }
        let waiting = plan(&desired, &observed, now());
        assert!(waiting.actions.is_empty());
        assert_eq!(waiting.findings.len(), 2);
        assert!(
            waiting.findings[0].contains("next start at 2026-11-29T12:00:07Z"),
            "{:?}",
            waiting.findings
        );
        let later = plan(&desired, &observed, now() + Duration::seconds(8));
        assert_eq!(later.actions.len(), 2);
    }

    #[test]
    fn link_cycles_keep_file_order() {
        let text = SHOP.replace("links: [db]", "links: [db, web]");
        let stack = stack(&text);
        let desired = Desired::new(&stack, digest(), &BTreeMap::new());
        let order = resource_order(&desired);
        assert_eq!(order, ["db", "web", "api"]);
    }

    fn arbitrary_observed() -> impl Strategy<Value = Vec<ObservedReplica>> {
        let resource = prop_oneof![Just("web"), Just("api"), Just("db"), Just("gone")];
        let replica = (
            resource,
            0u32..6,
            prop_oneof![Just("stale"), Just("current")],
            any::<bool>(),
            0i64..60,
        )
            .prop_map(|(resource, ordinal, hash, running, age)| ObservedReplica {
                id: ReplicaId::new(resource, ordinal),
                config_hash: hash.to_string(),
                state: if running {
                    ReplicaState::Running
                } else {
                    ReplicaState::Stopped
                },
                started_at: Some(
                    Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap() - Duration::seconds(age),
                ),
            });
        proptest::collection::btree_map((0u8..4, 0u32..6), replica, 0..16).prop_map(|m| {
            let mut seen = BTreeSet::new();
            m.into_values()
                .filter(|r| seen.insert(r.id.clone()))
                .collect()
        })
    }

    proptest! {
        /// From any observed state, carrying the plan out converges (for live resources, once
        /// crash-loop backoffs have passed), and planning again is a no-op.
        #[test]
        fn plans_converge(observed in arbitrary_observed(), api in 0u32..6) {
            let text = SHOP.replace("lifecycle: frozen", "lifecycle: live");
            let stack = stack(&text);
            let desired = Desired::new(&stack, digest(), &BTreeMap::from([("api".to_string(), api)]));
            let observed: Vec<ObservedReplica> = observed.into_iter().map(|mut r| {
                if r.config_hash == "current" {
                    r.config_hash = desired.resources.iter().find(|d| d.container.name == r.id.resource).map(|d| d.config_hash.clone()).unwrap_or_default();
                }
                r
            }).collect();
            let later = now() + RESTART_BACKOFF + Duration::minutes(1);
            let first = plan(&desired, &observed, later);
            let after = apply(&observed, &first, later);
            prop_assert!(plan(&desired, &after, later).is_converged());
            let total: u32 = desired.resources.iter().map(|r| r.replicas).sum();
            prop_assert_eq!(after.len() as u32, total);
            // No replica is touched twice in one plan.
            let touched: BTreeSet<&ReplicaId> = first.actions.iter().map(Action::replica).collect();
            prop_assert_eq!(touched.len(), first.actions.len());
        }
    }
}
