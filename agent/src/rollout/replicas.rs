//! The container-engine backend: a release as replicas on the host's engine (dockerd or
//! Podman), planned by `plan.rs` against what runs, each step journaled, health-checked before
//! the old replica goes, public endpoints forwarded by the agent, autoscaled by measured load.

use super::snapshots::Snapshots;
use super::specs::Specs;
use super::steps::{self, Parallelism};
use super::{Backend, Context, Repair, RolloutError, event, journaled};
use crate::config::{DockerConfig, Permissions, RolloutConfig};
use crate::forward::{Forwarder, Upstream};
use crate::plan::{Action, Desired, ReplicaId, ReplicaState, plan};
use crate::rollout::autoscale::Autoscaler;
use crate::runtime::{Health, Instance, ReplicaSpec, Runtime, Slot, Step};
use crate::state::Release;
use crate::status::{ReplicaStatus, RuntimeView};
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Probe, Stack};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PROBE_EVERY: Duration = Duration::from_millis(500);

/// What this backend takes from the configuration: its `docker` section, the host's pools and
/// the customer's grants.
#[derive(Debug, Clone)]
pub struct Settings {
    pub docker: DockerConfig,
    pub pools: Vec<String>,
    pub permissions: Permissions,
    pub snapshots: Snapshots,
    /// Where linked resources are reached: `None`, by name on the stack's network; on a VM
    /// node, the machine's address on that network, whose link listeners reach the linked
    /// resource's replicas on any machine of the pool.
    pub links_host: Option<std::net::IpAddr>,
}

impl Settings {
    pub fn of(config: &crate::config::Config) -> Settings {
        Settings {
            docker: config.docker.clone(),
            pools: config.pools.clone(),
            permissions: config.permissions.clone(),
            snapshots: Snapshots::of(config),
            links_host: None,
        }
    }
}

/// A replica kept out of the routes while it proves healthy (see [`Replicas::until_proven`]).
struct Proving<'a> {
    set: &'a std::sync::Mutex<std::collections::BTreeSet<(ReplicaId, Slot)>>,
    key: (ReplicaId, Slot),
}

impl Drop for Proving<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

/// Runs releases on a container engine: replicas planned by `plan.rs`, each step journaled,
/// public endpoints forwarded by the agent.
pub struct Replicas<R: Runtime> {
    context: Context,
    settings: Settings,
    runtime: R,
    forwarder: Forwarder,
    /// Held from observing to routing, so that with steps in parallel a later observation is
    /// never overwritten by an earlier one.
    routing: tokio::sync::Mutex<()>,
    /// Replicas created or started and not yet healthy: no traffic reaches them, whatever
    /// other steps observe meanwhile.
    unproven: std::sync::Mutex<std::collections::BTreeSet<(ReplicaId, Slot)>>,
    /// The autoscaler's choice per resource.
    scale: Autoscaler,
}

impl<R: Runtime> Backend for Replicas<R> {
    /// Carries out the plan for `release`; returns the steps taken (drift repairs).
    async fn converge(
        &self,
        release: &Release,
        stack: &Stack,
        fresh: bool,
    ) -> Result<Vec<Repair>, RolloutError> {
        self.run(release.digest, stack, fresh, None).await
    }
}

impl<R: Runtime> Replicas<R> {
    /// Carries out the plan for the release `digest` (its `stack`), for all its replicas or
    /// (a machine of a VM pool, where the agent places and scales) `only` those given.
    pub async fn run(
        &self,
        digest: Digest,
        stack: &Stack,
        fresh: bool,
        only: Option<std::collections::BTreeSet<ReplicaId>>,
    ) -> Result<Vec<Repair>, RolloutError> {
        let specs = Specs::new(&self.settings, stack, digest)?;
        let mut instances = self.runtime.observe(&stack.name).await?;
        if self.settle_surges(&stack.name, &instances).await? {
            instances = self.runtime.observe(&stack.name).await?;
        }
        if !fresh && only.is_none() {
            self.autoscale(stack, &instances).await;
        }
        let scale = self.scale.counts();
        let mut desired = Desired::new(stack, digest, &scale);
        desired.only = only;
        let observed: Vec<_> = instances
            .iter()
            .filter(|i| i.slot == Slot::Primary)
            .map(|i| i.replica.clone())
            .collect();
        let mut plan = plan(&desired, &observed, crate::config::now());
        super::snapshots::plan_restores(
            &self.context.store,
            &desired,
            &observed,
            &mut plan.actions,
        )?;
        self.view().update(|s| {
            s.findings = plan.findings.clone();
            for resource in &desired.resources {
                s.resources
                    .entry(resource.container.name.clone())
                    .or_default()
                    .desired = Some(u64::from(resource.replicas));
            }
        });
        self.prefetch(&plan.actions, &specs).await;
        // Like a Deployment's progressDeadlineSeconds: each step must make progress in time,
        // however many replicas the resource has.
        let deadline = Duration::from_secs(self.rollout().progress_deadline_seconds);
        let parallelism = Parallelism::of(self.rollout());
        let (specs, instances) = (&specs, &instances);
        let outcome = steps::carry_out(
            &plan.actions,
            &desired,
            &parallelism,
            |_, action| async move {
                let resource = &action.replica().resource;
                let until = Instant::now() + deadline;
                let described = describe(action, &stack.name);
                self.view().resource_step(resource, &described);
                let outcome = journaled(
                    &self.context,
                    "replicas",
                    &digest,
                    &described,
                    self.carry_out(action, stack, specs, instances, until),
                )
                .await;
                self.refresh_routes(stack).await;
                let result = match &outcome {
                    Ok(()) => format!("{described}: done"),
                    Err(e) => format!("{described}: failed: {e}"),
                };
                self.view().resource_step(resource, &result);
                outcome
            },
        )
        .await;
        if let Some(e) = outcome.error {
            return Err(e);
        }
        let taken: Vec<Repair> = outcome
            .done
            .iter()
            .map(|&i| Repair {
                resource: plan.actions[i].replica().resource.clone(),
                what: describe(&plan.actions[i], &stack.name),
            })
            .collect();
        if fresh {
            self.settings.snapshots.prune(&self.context);
        }
        // What runs after the steps, or (nothing done) what the pass began with.
        let seen = if plan.actions.is_empty() {
            self.route(stack, instances).await;
            Some(instances.clone())
        } else {
            self.refresh_routes(stack).await
        };
        if let Some(seen) = seen {
            self.show_resources(stack, &seen).await;
        }
        Ok(taken)
    }

    /// Fetches the images the plan's new replicas need, all at once, before the first step
    /// waits for one. Best effort: a step that still lacks its image fetches it and reports.
    async fn prefetch(&self, actions: &[Action], specs: &Specs<'_>) {
        let mut images = Vec::new();
        for action in actions {
            if let Action::Create { replica, .. } | Action::Replace { replica, .. } = action
                && let Ok(container) = specs.container(replica)
                && !images.contains(&container.image)
            {
                images.push(container.image.clone());
            }
        }
        if images.is_empty() {
            return;
        }
        let view = self.view();
        let notes = |note: String| view.update(|s| s.note = Some(note));
        if let Err(e) = self.runtime.prefetch(&images, &notes).await {
            tracing::warn!("fetching images ahead of the rollout: {e}");
        }
    }

    fn unproven(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(ReplicaId, Slot)>> {
        self.unproven
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps traffic away from `replica` in `slot` until the guard drops (it proved healthy,
    /// or failed and is gone).
    fn until_proven(&self, replica: &ReplicaId, slot: Slot) -> Proving<'_> {
        let key = (replica.clone(), slot);
        self.unproven().insert(key.clone());
        Proving {
            set: &self.unproven,
            key,
        }
    }

    pub fn new(context: Context, settings: Settings, runtime: R) -> Replicas<R> {
        Replicas {
            context,
            settings,
            runtime,
            forwarder: Forwarder::default(),
            routing: tokio::sync::Mutex::new(()),
            unproven: Default::default(),
            scale: Default::default(),
        }
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn rollout(&self) -> &RolloutConfig {
        &self.context.rollout
    }

    fn view(&self) -> &RuntimeView {
        &self.context.status
    }

    /// A surge replica left by an interrupted replace: promoted if its primary is gone, else
    /// removed (the plan then replaces the primary again). Returns whether anything changed.
    async fn settle_surges(
        &self,
        stack: &str,
        instances: &[Instance],
    ) -> crate::runtime::RuntimeResult<bool> {
        let mut changed = false;
        for surge in instances.iter().filter(|i| i.slot == Slot::Surge) {
            let id = &surge.replica.id;
            let has_primary = instances
                .iter()
                .any(|i| i.slot == Slot::Primary && i.replica.id == *id);
            if has_primary {
                self.runtime.remove(stack, id, Slot::Surge, false).await?;
            } else {
                self.runtime
                    .apply(Step::Promote { stack, replica: id }, &|_| {})
                    .await?;
            }
            event(
                &self.context.store,
                "recovered",
                Digest::parse(&surge.digest).ok().as_ref(),
                &format!(
                    "{} of an interrupted replace {}",
                    surge.name,
                    if has_primary { "removed" } else { "promoted" }
                ),
            );
            changed = true;
        }
        Ok(changed)
    }

    async fn carry_out(
        &self,
        action: &Action,
        stack: &Stack,
        specs: &Specs<'_>,
        instances: &[Instance],
        until: Instant,
    ) -> Result<(), RolloutError> {
        let name = stack.name.as_str();
        let view = self.view();
        let notes = |note: String| view.update(|s| s.note = Some(note));
        match action {
            Action::Create {
                replica,
                config_hash,
            } => {
                let spec = specs.spec(replica, config_hash)?;
                self.create_primary(&spec, specs, until, &notes).await
            }
            Action::Replace {
                replica,
                config_hash,
                stop_first: false,
                ..
            } => {
                let spec = specs.spec(replica, config_hash)?;
                // The old replica serves until the new one is healthy.
                self.create_healthy(&spec, specs, Slot::Surge, until, &notes)
                    .await?;
                self.refresh_routes(stack).await;
                self.runtime
                    .remove(name, replica, Slot::Primary, false)
                    .await?;
                self.runtime
                    .apply(
                        Step::Promote {
                            stack: name,
                            replica,
                        },
                        &notes,
                    )
                    .await
                    .map_err(RolloutError::from)
            }
            Action::Replace {
                replica,
                config_hash,
                stop_first: true,
                ..
            } => {
                // Stateful: one at a time on the same volume, never two writers. Its data is
                // copied while it is stopped, unless a rollback restores it instead.
                let spec = specs.spec(replica, config_hash)?;
                self.settings
                    .snapshots
                    .take_before(
                        &self.context,
                        &self.runtime,
                        &specs.digest,
                        &spec,
                        instances,
                        specs.container(replica)?,
                    )
                    .await?;
                self.runtime
                    .remove(name, replica, Slot::Primary, false)
                    .await?;
                self.create_primary(&spec, specs, until, &notes).await
            }
            Action::Start { replica } => {
                let _proving = self.until_proven(replica, Slot::Primary);
                self.runtime
                    .apply(
                        Step::Start {
                            stack: name,
                            replica,
                        },
                        &notes,
                    )
                    .await?;
                self.wait_healthy(name, replica, Slot::Primary, specs.probe(replica), until)
                    .await
            }
            Action::Remove { replica, .. } => self
                .runtime
                .remove(
                    name,
                    replica,
                    Slot::Primary,
                    self.settings.docker.delete_volumes,
                )
                .await
                .map_err(RolloutError::from),
        }
    }

    /// Creates a primary replica and waits until it is healthy; a restore a rollback queued
    /// for its volume (an interrupted one included) is done first.
    async fn create_primary(
        &self,
        spec: &ReplicaSpec,
        specs: &Specs<'_>,
        until: Instant,
        notes: crate::runtime::Notes<'_>,
    ) -> Result<(), RolloutError> {
        self.settings
            .snapshots
            .restore_if_queued(&self.context, &self.runtime, spec, notes)
            .await?;
        self.create_healthy(spec, specs, Slot::Primary, until, notes)
            .await
    }

    /// Creates the replica in `slot` and waits until it is healthy. One that never becomes
    /// healthy is removed (its volume stays): left running, the next pass would find it in
    /// place with the right config and take it for converged.
    async fn create_healthy(
        &self,
        spec: &ReplicaSpec,
        specs: &Specs<'_>,
        slot: Slot,
        until: Instant,
        notes: crate::runtime::Notes<'_>,
    ) -> Result<(), RolloutError> {
        let _proving = self.until_proven(&spec.replica, slot);
        self.runtime
            .apply(Step::Create { spec, slot }, notes)
            .await?;
        let healthy = self
            .wait_healthy(
                &spec.stack,
                &spec.replica,
                slot,
                specs.probe(&spec.replica),
                until,
            )
            .await;
        if healthy.is_err() {
            let _ = self
                .runtime
                .remove(&spec.stack, &spec.replica, slot, false)
                .await;
        }
        healthy
    }

    /// Waits until the replica is healthy: its HTTP check passes, or (without one) it has run
    /// for the grace period. A replica still starting (nothing listens yet) is waited for up to
    /// the progress deadline; one that answers wrongly fails after `failureThreshold` answers in
    /// a row past the grace period; one that stops fails at once.
    async fn wait_healthy(
        &self,
        stack: &str,
        replica: &ReplicaId,
        slot: Slot,
        check: Option<&Probe>,
        until: Instant,
    ) -> Result<(), RolloutError> {
        let started = Instant::now();
        let grace = Duration::from_secs(self.rollout().grace_seconds);
        let threshold = check.map_or(1, |c| c.failure_threshold.max(1));
        let mut failures = 0;
        let mut last = String::from("no health observation yet");
        let name = crate::runtime::container_name(stack, replica, slot);
        loop {
            let instances = self.runtime.observe(stack).await?;
            let health = match instances
                .iter()
                .find(|i| i.replica.id == *replica && i.slot == slot)
            {
                Some(instance) => self.runtime.probe(instance, check).await,
                None => Health::Down("removed".into()),
            };
            match health {
                Health::Healthy if check.is_some() || started.elapsed() >= grace => return Ok(()),
                Health::Healthy => {}
                Health::Starting(why) => last = why,
                Health::Down(why) => {
                    return Err(RolloutError::new(format!("{name}: {why}")));
                }
                Health::Unhealthy(why) => {
                    last = why.clone();
                    if started.elapsed() >= grace {
                        failures += 1;
                    }
                    if failures >= threshold {
                        return Err(RolloutError::new(format!(
                            "{name}: health check failed {failures} times in a row: {why}"
                        )));
                    }
                }
            }
            if Instant::now() >= until {
                return Err(RolloutError::new(format!(
                    "{name}: not healthy within the progress deadline ({}s): {last}",
                    self.rollout().progress_deadline_seconds
                )));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Observes the stack and points its endpoints at what runs; returns what it saw.
    async fn refresh_routes(&self, stack: &Stack) -> Option<Vec<Instance>> {
        let _routing = self.routing.lock().await;
        let instances = self.runtime.observe(&stack.name).await.ok()?;
        self.route(stack, &instances).await;
        Some(instances)
    }

    /// Points each public endpoint at the running replicas among `instances`.
    async fn route(&self, stack: &Stack, instances: &[Instance]) {
        let publish = &self.settings.docker.publish;
        let mut routes: BTreeMap<SocketAddr, Vec<Upstream>> = BTreeMap::new();
        for resource in &stack.resources {
            for endpoint in &resource.container.public_endpoints {
                let port = publish.port(&endpoint.name, endpoint.port);
                let unproven = self.unproven();
                let backends = instances
                    .iter()
                    .filter(|i| {
                        i.replica.id.resource == resource.container.name
                            && i.replica.state == ReplicaState::Running
                            && !unproven.contains(&(i.replica.id.clone(), i.slot))
                    })
                    .filter_map(|i| i.addresses.get(&endpoint.port).copied())
                    .map(Upstream::Local)
                    .collect();
                routes.insert(SocketAddr::new(publish.address, port), backends);
            }
        }
        let errors = self
            .forwarder
            .update(routes)
            .await
            .into_iter()
            .map(|e| format!("public endpoint {e}"))
            .collect();
        let endpoints = self
            .forwarder
            .listening()
            .iter()
            .map(|a| a.to_string())
            .collect();
        self.view().update(|s| {
            s.endpoint_errors = errors;
            s.endpoints = endpoints;
        });
    }

    /// Each replica's state and health for `status`.
    async fn show_resources(&self, stack: &Stack, instances: &[Instance]) {
        // Per resource: its replicas, and how many are healthy.
        let mut replicas: BTreeMap<String, (Vec<ReplicaStatus>, u64)> = BTreeMap::new();
        for instance in instances {
            let check = stack
                .resource(&instance.replica.id.resource)
                .and_then(|r| r.container.health_check.as_ref());
            let probed = self.runtime.probe(instance, check).await;
            let entry = replicas
                .entry(instance.replica.id.resource.clone())
                .or_default();
            entry.1 += u64::from(probed == Health::Healthy);
            let health = match probed {
                Health::Healthy => "healthy".to_string(),
                Health::Starting(why) => format!("starting: {why}"),
                Health::Unhealthy(why) => format!("unhealthy: {why}"),
                Health::Down(why) => format!("down: {why}"),
            };
            entry.0.push(ReplicaStatus {
                name: instance.name.clone(),
                health,
                config_hash: instance.replica.config_hash.clone(),
            });
        }
        self.view().update(|s| {
            for (resource, (list, ready)) in replicas {
                let status = s.resources.entry(resource).or_default();
                status.ready = Some(ready);
                status.replicas = Some(list);
            }
        });
    }

    /// Moves autoscaled resources toward their CPU (and memory) targets, one change per
    /// cool-down.
    async fn autoscale(&self, stack: &Stack, instances: &[Instance]) {
        let cooldown = Duration::from_secs(self.rollout().autoscale_cooldown_seconds);
        for resource in &stack.resources {
            let container = &resource.container;
            let running: Vec<&Instance> = instances
                .iter()
                .filter(|i| i.replica.id.resource == container.name && i.slot == Slot::Primary)
                .filter(|i| i.replica.state == ReplicaState::Running)
                .collect();
            // Sampled only once the cool-down allows a change: each sample takes the engine
            // about a second.
            if !self.scale.due(container, running.len() as u32, cooldown) {
                continue;
            }
            let mut samples = Vec::new();
            for instance in &running {
                if let Some(usage) = self.runtime.usage(instance, container.cpu.desired).await {
                    samples.push(usage);
                }
            }
            if let Some(change) = self.scale.decide(container, &samples) {
                event(&self.context.store, "autoscale", None, &change);
            }
        }
    }
}

fn describe(action: &Action, stack: &str) -> String {
    let name = action.replica().name(stack);
    match action {
        Action::Create { .. } => format!("create {name}"),
        Action::Replace {
            stop_first: false, ..
        } => format!("replace {name} (start new, then stop old)"),
        Action::Replace {
            stop_first: true, ..
        } => format!("replace {name} (stop old, then start new on its volume)"),
        Action::Start { .. } => format!("start {name} (found stopped)"),
        Action::Remove { reason, .. } => format!("remove {name} ({reason:?})").to_lowercase(),
    }
}

#[cfg(test)]
#[path = "replicas_tests.rs"]
mod tests;
