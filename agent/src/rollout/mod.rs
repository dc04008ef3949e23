//! Rollout: Plan → Rollout → Runtime. Converges a runtime to the current release, one journaled
//! step at a time in the plan's order, waiting for each new replica to be healthy before the
//! old one goes. A new release that fails rolls back to the last good one; the same loop,
//! on an interval, repairs drift and autoscales.

use crate::config::{Config, Grant};
use crate::forward::Forwarder;
use crate::pipeline::Agent;
use crate::plan::{Action, Desired, ReplicaId, ReplicaState, plan};
use crate::runtime::{Health, Instance, ReplicaSpec, Runtime, Slot, Step};
use crate::state::Release;
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Container, Probe, Scaling, Stack};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PROBE_EVERY: Duration = Duration::from_millis(500);

/// What `status` shows of the runtime, and the counters `/metrics` exports.
#[derive(Default)]
pub struct RuntimeView {
    state: std::sync::Mutex<Value>,
    pub rollouts: AtomicU64,
    pub rollbacks: AtomicU64,
    pub drift_repairs: AtomicU64,
}

impl RuntimeView {
    pub fn snapshot(&self) -> Value {
        self.state.lock().map(|s| s.clone()).unwrap_or(Value::Null)
    }

    pub(crate) fn edit(&self, change: impl FnOnce(&mut Value)) {
        if let Ok(mut state) = self.state.lock() {
            if !state.is_object() {
                *state = json!({});
            }
            change(&mut state);
        }
    }

    pub(crate) fn set(&self, key: &str, value: Value) {
        self.edit(|s| s[key] = value);
    }

    pub(crate) fn resource_step(&self, resource: &str, step: &str) {
        self.edit(|s| s["resources"][resource]["step"] = json!(step));
    }
}

/// Why a rollout stopped, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RolloutError {
    pub message: String,
    /// The runtime (or the agent's own store) could not be reached: the pass is retried and
    /// the release is not rolled back for it. Rolled back, it would never be taken again.
    pub unavailable: bool,
}

impl RolloutError {
    /// The release cannot run: unhealthy, refused, unplaceable.
    pub fn new(message: impl Into<String>) -> Self {
        RolloutError {
            message: message.into(),
            unavailable: false,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        RolloutError {
            message: message.into(),
            unavailable: true,
        }
    }
}

impl From<crate::runtime::RuntimeError> for RolloutError {
    fn from(e: crate::runtime::RuntimeError) -> Self {
        RolloutError {
            message: e.message,
            unavailable: e.unavailable,
        }
    }
}

/// How a release is made to run on one kind of runtime: replica by replica on a container
/// engine ([`Replicas`]), or object by object on a cluster that runs its own replicas
/// (`runtime::kubernetes::Cluster`).
#[allow(async_fn_in_trait)]
pub trait Backend: Send + Sync {
    /// Makes `release` (its `stack`) run. `fresh`: it has not converged yet, so this is a
    /// rollout that must end healthy; otherwise a drift pass, which returns what it repaired.
    async fn converge(
        &self,
        release: &Release,
        stack: &Stack,
        fresh: bool,
    ) -> Result<Vec<String>, RolloutError>;
}

/// The rollout loop, whatever the runtime: rolls out a new current release (rolling back to
/// the last good one if it fails), else repairs drift.
pub struct Converger<B: Backend> {
    agent: Arc<Agent>,
    backend: B,
}

/// Runs `work` as a journaled step: begun in the store before it runs, finished with its
/// outcome after, so that a crash mid-step is found at the next start.
pub(crate) async fn journaled<T>(
    agent: &Agent,
    digest: &str,
    step: &str,
    work: impl Future<Output = Result<T, RolloutError>>,
) -> Result<T, RolloutError> {
    let id = agent
        .store
        .begin_step(digest, step, crate::config::now())
        .map_err(|e| RolloutError::unavailable(format!("journal: {e}")))?;
    let outcome = work.await;
    let finished = if outcome.is_ok() { "done" } else { "failed" };
    if let Err(e) = agent.store.finish_step(id, finished, crate::config::now()) {
        // The step happened; the next start will call it interrupted and look again.
        crate::daemon::log(format!("journal: finishing {step:?}: {e}"));
    }
    outcome
}

/// Records an event in the store and the log.
pub(crate) fn event(agent: &Agent, kind: &str, digest: Option<&str>, message: &str) {
    crate::daemon::log(format!("{kind}: {message}"));
    if let Err(e) = agent
        .store
        .event(crate::config::now(), kind, digest, message)
    {
        crate::daemon::log(format!("recording {kind}: {e}"));
    }
}

impl<B: Backend> Converger<B> {
    pub fn new(agent: Arc<Agent>, backend: B) -> Converger<B> {
        Converger { agent, backend }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn view(&self) -> &RuntimeView {
        &self.agent.runtime_view
    }

    /// Converges forever: at once when the current release changes, else every drift interval.
    pub async fn run(&self) {
        match self.agent.store.interrupted_steps(crate::config::now()) {
            Ok(steps) => {
                for (digest, step) in steps {
                    event(
                        &self.agent,
                        "interrupted",
                        Some(&digest),
                        &format!("the agent stopped during {step:?}; resuming from what runs"),
                    );
                }
            }
            Err(e) => crate::daemon::log(format!("reading the rollout journal: {e}")),
        }
        let interval = Duration::from_secs(self.agent.config.rollout.drift_interval_seconds);
        let mut failures = 0u32;
        loop {
            let wait = match self.converge_once().await {
                Ok(()) => {
                    failures = 0;
                    interval
                }
                Err(e) => {
                    failures += 1;
                    self.view().set("last_error", json!(e.to_string()));
                    crate::daemon::log(format!("runtime: {e:#}"));
                    crate::daemon::backoff(failures).min(interval)
                }
            };
            tokio::select! {
                _ = self.agent.current_changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: roll out a new current release (rolling back if it fails), or repair drift.
    pub async fn converge_once(&self) -> anyhow::Result<()> {
        let store = &self.agent.store;
        let positions = store.positions()?;
        let Some(current) = positions.current else {
            self.view().set("phase", json!("nothing to run yet"));
            return Ok(());
        };
        let fresh = positions.converged.as_deref() != Some(current.digest.as_str());
        self.view().set(
            "target",
            json!({"version": current.version, "digest": current.digest}),
        );
        if fresh {
            self.view().set("phase", json!("rolling out"));
            self.view().set("resources", json!({}));
            self.view().rollouts.fetch_add(1, Ordering::Relaxed);
            event(
                &self.agent,
                "rollout",
                Some(&current.digest),
                &format!("rolling out {} {}", current.name, current.version),
            );
        }
        let outcome = match current.stack() {
            Ok(stack) => self.backend.converge(&current, &stack, fresh).await,
            Err(e) => Err(RolloutError::new(e.to_string())),
        };
        match outcome {
            Ok(repairs) => {
                self.view().set("phase", json!("converged"));
                self.view().set("note", Value::Null);
                self.view().set("last_error", Value::Null);
                if fresh {
                    let recorded = store.set_converged(
                        &current.digest,
                        &format!("{} {} runs, healthy", current.name, current.version),
                        crate::config::now(),
                    )?;
                    if !recorded {
                        // Superseded by the customer's decision: the next pass runs it.
                        self.view().set("phase", json!("superseded"));
                    }
                } else if !repairs.is_empty() {
                    self.view()
                        .drift_repairs
                        .fetch_add(repairs.len() as u64, Ordering::Relaxed);
                    let mut summary = repairs.iter().take(10).cloned().collect::<Vec<_>>();
                    if repairs.len() > 10 {
                        summary.push(format!("and {} more", repairs.len() - 10));
                    }
                    self.view().set("last_drift", json!(summary));
                    event(
                        &self.agent,
                        "drift",
                        Some(&current.digest),
                        &format!("repaired: {}", summary.join("; ")),
                    );
                }
                Ok(())
            }
            Err(failure) if failure.unavailable => Err(anyhow::anyhow!(
                "{} {}: {failure} (retrying; a runtime that cannot be reached is no reason to roll back)",
                current.name,
                current.version
            )),
            Err(failure) if fresh => {
                let reason = failure.to_string();
                self.view().set("phase", json!("failed"));
                let good = positions.last_good.filter(|g| g.digest != current.digest);
                match good {
                    Some(good) => {
                        self.view().rollbacks.fetch_add(1, Ordering::Relaxed);
                        let message = format!(
                            "{} {} failed: {reason}; rolling back to {}",
                            current.name, current.version, good.version
                        );
                        let rolled_back = store.roll_back(
                            &current.digest,
                            &good.digest,
                            &message,
                            crate::config::now(),
                        )?;
                        if !rolled_back {
                            // Superseded by the customer's decision: the next pass runs it.
                            return Ok(());
                        }
                        crate::daemon::log(&message);
                        self.view().set("last_rollback", json!(message));
                        self.agent.current_changed.notify_one();
                        Ok(())
                    }
                    None => Err(anyhow::anyhow!(
                        "{} {} failed: {reason} (no earlier release to roll back to)",
                        current.name,
                        current.version
                    )),
                }
            }
            Err(failure) => Err(anyhow::anyhow!("repairing drift: {failure}")),
        }
    }
}

/// Runs releases on a container engine: replicas planned by `plan.rs`, each step journaled,
/// public endpoints forwarded by the agent.
pub struct Replicas<R: Runtime> {
    agent: Arc<Agent>,
    runtime: R,
    forwarder: Forwarder,
    /// The autoscaler's choice per resource and when it last changed it.
    scale: std::sync::Mutex<BTreeMap<String, (u32, Option<Instant>)>>,
}

impl<R: Runtime> Backend for Replicas<R> {
    /// Carries out the plan for `release`; returns the steps taken (drift repairs).
    async fn converge(
        &self,
        release: &Release,
        stack: &Stack,
        fresh: bool,
    ) -> Result<Vec<String>, RolloutError> {
        let specs = Specs::new(self.config(), stack, &release.digest)?;
        let mut instances = self.runtime.observe(&stack.name).await?;
        if self.settle_surges(&stack.name, &instances).await? {
            instances = self.runtime.observe(&stack.name).await?;
        }
        if !fresh {
            self.autoscale(stack, &instances).await;
        }
        let scale: BTreeMap<String, u32> = self
            .scale
            .lock()
            .map(|s| s.iter().map(|(k, (n, _))| (k.clone(), *n)).collect())
            .unwrap_or_default();
        let digest = Digest::parse(&release.digest)
            .map_err(|e| RolloutError::new(format!("stored digest: {e}")))?;
        let desired = Desired::new(stack, digest, &scale);
        let observed: Vec<_> = instances
            .iter()
            .filter(|i| i.slot == Slot::Primary)
            .map(|i| i.replica.clone())
            .collect();
        let plan = plan(&desired, &observed, crate::config::now());
        self.view().set("findings", json!(plan.findings));
        let mut taken = Vec::new();
        // Like a Deployment's progressDeadlineSeconds: each step must make progress in time,
        // however many replicas the resource has.
        let deadline = Duration::from_secs(self.config().rollout.progress_deadline_seconds);
        let mut latest = None;
        for action in &plan.actions {
            let resource = action.replica().resource.clone();
            let until = Instant::now() + deadline;
            let described = describe(action, &stack.name);
            self.view().resource_step(&resource, &described);
            let outcome = journaled(
                &self.agent,
                &release.digest,
                &described,
                self.carry_out(action, stack, &specs, until),
            )
            .await;
            latest = self.refresh_routes(stack).await;
            match outcome {
                Ok(()) => {
                    self.view()
                        .resource_step(&resource, &format!("{described}: done"));
                    taken.push(described);
                }
                Err(e) => {
                    self.view()
                        .resource_step(&resource, &format!("{described}: failed: {e}"));
                    return Err(e);
                }
            }
        }
        // What the last step saw, or (nothing done) what the pass began with.
        let seen = if plan.actions.is_empty() {
            self.route(stack, &instances).await;
            Some(instances)
        } else {
            latest
        };
        if let Some(seen) = seen {
            self.show_resources(stack, &seen).await;
        }
        Ok(taken)
    }
}

impl<R: Runtime> Replicas<R> {
    pub fn new(agent: Arc<Agent>, runtime: R) -> Replicas<R> {
        Replicas {
            agent,
            runtime,
            forwarder: Forwarder::default(),
            scale: Default::default(),
        }
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    fn config(&self) -> &Config {
        &self.agent.config
    }

    fn view(&self) -> &RuntimeView {
        &self.agent.runtime_view
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
                &self.agent,
                "recovered",
                Some(&surge.digest),
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
        until: Instant,
    ) -> Result<(), RolloutError> {
        let name = stack.name.as_str();
        let view = self.view();
        let notes = |note: String| view.set("note", json!(note));
        match action {
            Action::Create {
                replica,
                config_hash,
            } => {
                let spec = specs.spec(replica, config_hash)?;
                self.create_healthy(&spec, specs, Slot::Primary, until, &notes)
                    .await
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
                // Stateful: one at a time on the same volume, never two writers.
                let spec = specs.spec(replica, config_hash)?;
                self.runtime
                    .remove(name, replica, Slot::Primary, false)
                    .await?;
                self.create_healthy(&spec, specs, Slot::Primary, until, &notes)
                    .await
            }
            Action::Start { replica } => {
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
                    self.config().docker.delete_volumes,
                )
                .await
                .map_err(RolloutError::from),
        }
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
        let grace = Duration::from_secs(self.config().rollout.grace_seconds);
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
                    self.config().rollout.progress_deadline_seconds
                )));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Observes the stack and points its endpoints at what runs; returns what it saw.
    async fn refresh_routes(&self, stack: &Stack) -> Option<Vec<Instance>> {
        let instances = self.runtime.observe(&stack.name).await.ok()?;
        self.route(stack, &instances).await;
        Some(instances)
    }

    /// Points each public endpoint at the running replicas among `instances`.
    async fn route(&self, stack: &Stack, instances: &[Instance]) {
        let publish = &self.config().docker.publish;
        let mut routes: BTreeMap<SocketAddr, Vec<SocketAddr>> = BTreeMap::new();
        for resource in &stack.resources {
            for endpoint in &resource.container.public_endpoints {
                let port = publish.port(&endpoint.name, endpoint.port);
                let backends = instances
                    .iter()
                    .filter(|i| {
                        i.replica.id.resource == resource.container.name
                            && i.replica.state == ReplicaState::Running
                    })
                    .filter_map(|i| i.addresses.get(&endpoint.port).copied())
                    .collect();
                routes.insert(SocketAddr::new(publish.address, port), backends);
            }
        }
        let errors = self.forwarder.update(routes).await;
        self.view().set("endpoint_errors", json!(errors));
        self.view().set(
            "endpoints",
            json!(
                self.forwarder
                    .listening()
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
            ),
        );
    }

    /// Each replica's state and health for `status`.
    async fn show_resources(&self, stack: &Stack, instances: &[Instance]) {
        let mut replicas: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for instance in instances {
            let check = stack
                .resource(&instance.replica.id.resource)
                .and_then(|r| r.container.health_check.as_ref());
            let health = match self.runtime.probe(instance, check).await {
                Health::Healthy => "healthy".to_string(),
                Health::Starting(why) => format!("starting: {why}"),
                Health::Unhealthy(why) => format!("unhealthy: {why}"),
                Health::Down(why) => format!("down: {why}"),
            };
            replicas
                .entry(instance.replica.id.resource.clone())
                .or_default()
                .push(json!({"name": instance.name, "health": health, "config_hash": instance.replica.config_hash}));
        }
        self.view().edit(|s| {
            for (resource, list) in replicas {
                s["resources"][&resource]["replicas"] = json!(list);
            }
        });
    }

    /// Moves autoscaled resources toward their CPU (and memory) targets, one change per
    /// cool-down.
    async fn autoscale(&self, stack: &Stack, instances: &[Instance]) {
        let cooldown = Duration::from_secs(self.config().rollout.autoscale_cooldown_seconds);
        for resource in &stack.resources {
            let container = &resource.container;
            let Scaling::Auto {
                min,
                max,
                target_cpu_percent,
                target_memory_percent,
                ..
            } = container.scaling
            else {
                continue;
            };
            let running: Vec<&Instance> = instances
                .iter()
                .filter(|i| i.replica.id.resource == container.name && i.slot == Slot::Primary)
                .filter(|i| i.replica.state == ReplicaState::Running)
                .collect();
            // With no choice made yet (say, after a restart) the count is what runs, not
            // `desired`: a busy service must not shrink because the agent restarted.
            let (count, changed) = match self.scale.lock() {
                Ok(mut scale) => *scale
                    .entry(container.name.clone())
                    .or_insert(((running.len() as u32).clamp(min, max), None)),
                Err(_) => return,
            };
            // Sampled only once the cool-down allows a change: each sample takes the engine
            // about a second.
            if changed.is_some_and(|at| at.elapsed() < cooldown) {
                continue;
            }
            let mut samples = Vec::new();
            for instance in &running {
                if let Some(usage) = self.runtime.usage(instance, container.cpu.desired).await {
                    samples.push(usage);
                }
            }
            if samples.is_empty() {
                continue;
            }
            let n = samples.len() as f64;
            let cpu = samples.iter().map(|u| u.cpu_percent).sum::<f64>() / n;
            let memory = samples.iter().map(|u| u.memory_percent).sum::<f64>() / n;
            let mut ratio = cpu / f64::from(target_cpu_percent.max(1));
            if let Some(target) = target_memory_percent {
                ratio = ratio.max(memory / f64::from(target.max(1)));
            }
            let wanted = ((f64::from(count) * ratio).ceil() as u32).clamp(min, max);
            if wanted != count {
                if let Ok(mut scale) = self.scale.lock() {
                    scale.insert(container.name.clone(), (wanted, Some(Instant::now())));
                }
                event(
                    &self.agent,
                    "autoscale",
                    None,
                    &format!(
                        "{}: {count} -> {wanted} replicas (cpu {cpu:.0}%, memory {memory:.0}%)",
                        container.name
                    ),
                );
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

/// The customer-side mapping of a release onto this host: what each replica gets. Everything
/// that cannot run here is refused before any replica is touched.
struct Specs<'a> {
    stack: &'a Stack,
    digest: &'a str,
    grants: BTreeMap<String, Grant>,
}

impl<'a> Specs<'a> {
    fn new(config: &Config, stack: &'a Stack, digest: &'a str) -> Result<Specs<'a>, RolloutError> {
        let mut grants = BTreeMap::new();
        for resource in &stack.resources {
            let c = &resource.container;
            let at = format!("resource {}", c.name);
            if let Some(pool) = &c.pool
                && !config.pools.contains(pool)
            {
                return Err(RolloutError::new(format!(
                    "{at}: pool {pool:?} is not one of this agent's pools ({}) (config key pools)",
                    if config.pools.is_empty() {
                        "none".to_string()
                    } else {
                        config.pools.join(", ")
                    }
                )));
            }
            if let Some(gpu) = &c.gpu {
                let have = config.docker.gpus.get(&gpu.kind).copied().unwrap_or(0);
                if have < gpu.count {
                    return Err(RolloutError::new(format!(
                        "{at}: needs {} GPU of type {:?}; this host has {have} (config key docker.gpus)",
                        gpu.count, gpu.kind
                    )));
                }
            }
            let grant = config
                .grant(&c.permissions)
                .map_err(|e| RolloutError::new(format!("{at}: {e}")))?;
            grants.insert(c.permissions.clone(), grant);
        }
        // One listener per host port: two endpoints on one port would silently share it.
        let publish = &config.docker.publish;
        let mut ports: BTreeMap<u16, String> = BTreeMap::new();
        for resource in &stack.resources {
            for endpoint in &resource.container.public_endpoints {
                let port = publish.port(&endpoint.name, endpoint.port);
                let this = format!("{}.{}", resource.container.name, endpoint.name);
                if let Some(other) = ports.insert(port, this.clone()) {
                    return Err(RolloutError::new(format!(
                        "public endpoints {other} and {this} both listen on port {port}: give one another port (config key docker.publish.ports)"
                    )));
                }
            }
        }
        Ok(Specs {
            stack,
            digest,
            grants,
        })
    }

    fn container(&self, replica: &ReplicaId) -> Result<&'a Container, RolloutError> {
        self.stack
            .resource(&replica.resource)
            .map(|r| &r.container)
            .ok_or_else(|| RolloutError::new(format!("no resource {}", replica.resource)))
    }

    fn probe(&self, replica: &ReplicaId) -> Option<&'a Probe> {
        self.container(replica)
            .ok()
            .and_then(|c| c.health_check.as_ref())
    }

    /// What `replica` gets at `config_hash` (the plan's hash of its resource).
    fn spec(&self, replica: &ReplicaId, config_hash: &str) -> Result<ReplicaSpec, RolloutError> {
        let c = self.container(replica)?;
        // Resources find each other by name on the stack's network.
        let mut environment = crate::plan::link_environment(self.stack, c, |link| link.to_string());
        let grant = self.grants.get(&c.permissions).cloned().unwrap_or_default();
        environment.extend(grant.environment);
        Ok(ReplicaSpec {
            stack: self.stack.name.clone(),
            replica: replica.clone(),
            digest: self.digest.to_string(),
            config_hash: config_hash.to_string(),
            image: c.image.clone(),
            command: c.command.clone(),
            environment,
            cpu: c.cpu.desired,
            memory_bytes: c.memory.bytes(),
            ephemeral_storage_bytes: c.ephemeral_storage.as_ref().map(|q| q.bytes()),
            ports: c.ports.clone(),
            volume: c
                .persistent_storage
                .as_ref()
                .map(|_| crate::runtime::docker::volume_name(&self.stack.name, replica)),
            gpu: c.gpu.as_ref().map(|g| (g.kind.clone(), g.count)),
            files: grant.files.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::fake::FakeRuntime;
    use crate::testing::{signed_stack, test_config};

    const STACK: &str = r#"
name: acme
permissionProfiles: {execution: {}}
resources:
  - lifecycle: live
    container:
      name: db
      code: {image: "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [5432]
      replicas: 1
      persistentStorage: 1Gi
      permissions: execution
  - lifecycle: live
    container:
      name: web
      code: {image: "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      replicas: 2
      links: [db]
      permissions: execution
"#;

    const BROKEN: &str =
        "r.example/web@sha256:1111111111111111111111111111111111111111111111111111111111111111";

    type Test = Converger<Replicas<FakeRuntime>>;

    fn converger(extra: &str) -> (tempfile::TempDir, Test) {
        converger_with(extra, "")
    }

    fn converger_with(extra: &str, rollout: &str) -> (tempfile::TempDir, Test) {
        let (dir, path) = test_config(&format!(
            "runtime: docker\nrollout: {{grace_seconds: 0, progress_deadline_seconds: 5{rollout}}}\n{extra}"
        ));
        let agent = Arc::new(Agent::new(Config::load(&path).unwrap()).unwrap());
        (
            dir,
            Converger::new(agent.clone(), Replicas::new(agent, FakeRuntime::default())),
        )
    }

    fn release(c: &Test, yaml: &str, version: &str, sequence: u64) -> String {
        let layout = signed_stack(yaml, version, sequence);
        let outcome = c
            .agent
            .ingest(&layout, "test", crate::config::now())
            .unwrap();
        match outcome {
            crate::pipeline::Ingested::Accepted { digest, .. } => digest,
            other => panic!("{other:?}"),
        }
    }

    fn current(c: &Test) -> String {
        c.agent.store.positions().unwrap().current.unwrap().digest
    }

    #[tokio::test]
    async fn installs_in_links_order_and_journals_each_step() {
        let (_dir, c) = converger("");
        let v1 = release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        assert_eq!(
            c.backend().runtime().log(),
            [
                "create db-0 primary",
                "create web-0 primary",
                "create web-1 primary"
            ]
        );
        assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
        assert!(
            c.agent
                .store
                .interrupted_steps(crate::config::now())
                .unwrap()
                .is_empty()
        );
        // Converged: the next pass changes nothing.
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().log().len(), 3);
    }

    #[tokio::test]
    async fn a_failed_update_rolls_back_and_keeps_the_old_replicas_serving() {
        let (_dir, c) = converger("");
        let v1 = release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        c.backend().runtime().break_image(BROKEN);
        let broken = STACK.replace(
            "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            BROKEN,
        );
        let v2 = release(&c, &broken, "2.0.0", 2);
        assert_eq!(current(&c), v2);
        c.converge_once().await.unwrap();
        // The new web-0 never became healthy: it went, the old one never stopped.
        assert_eq!(
            c.backend().runtime().log()[3..],
            ["create web-0 surge", "remove web-0 surge"]
        );
        assert_eq!(current(&c), v1);
        assert_eq!(c.agent.runtime_view.rollbacks.load(Ordering::Relaxed), 1);
        assert!(
            c.backend()
                .runtime()
                .images()
                .values()
                .all(|image| image != BROKEN)
        );
        let history = c.agent.store.history(10).unwrap();
        assert!(
            history.iter().any(|e| e.kind == "rolled-back"),
            "{history:?}"
        );
    }

    #[tokio::test]
    async fn rolls_back_to_the_release_that_last_ran_healthy() {
        let (_dir, c) = converger("");
        let v1 = release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        // 1.1.0 becomes current but never runs: 1.2.0 replaces it first, and fails.
        release(
            &c,
            &STACK.replace(
                "memory: 1Gi\n      ports: [8080]",
                "memory: 2Gi\n      ports: [8080]",
            ),
            "1.1.0",
            2,
        );
        c.backend().runtime().break_image(BROKEN);
        let broken = STACK.replace(
            "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            BROKEN,
        );
        release(&c, &broken, "1.2.0", 3);
        assert_eq!(
            c.agent.store.positions().unwrap().last_good.unwrap().digest,
            v1
        );
        c.converge_once().await.unwrap();
        assert_eq!(current(&c), v1);
    }

    #[tokio::test]
    async fn stateful_replicas_stop_first_and_keep_their_volume() {
        let (_dir, c) = converger("");
        release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        release(
            &c,
            &STACK.replace(
                "memory: 1Gi\n      ports: [5432]",
                "memory: 2Gi\n      ports: [5432]",
            ),
            "1.1.0",
            2,
        );
        c.converge_once().await.unwrap();
        assert_eq!(
            c.backend().runtime().log()[3..],
            ["remove db-0 primary", "create db-0 primary"]
        );
        assert!(c.backend().runtime().volumes().contains("acme-db-0-data"));
        // Pruned with the resource, the volume still stays (delete_volumes is off).
        let without_db = STACK.replacen(
            "  - lifecycle: live\n    container:\n      name: db",
            "  - lifecycle: live\n    container:\n      name: cache",
            1,
        );
        release(
            &c,
            &without_db.replace("links: [db]", "links: []"),
            "1.2.0",
            3,
        );
        c.converge_once().await.unwrap();
        assert!(
            c.backend()
                .runtime()
                .log()
                .contains(&"remove db-0 primary".to_string())
        );
        assert!(c.backend().runtime().volumes().contains("acme-db-0-data"));
    }

    #[tokio::test]
    async fn drift_is_repaired_and_counted() {
        let (_dir, c) = converger("");
        release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        c.backend()
            .runtime()
            .tamper(&ReplicaId::new("web", 1), true);
        c.backend()
            .runtime()
            .tamper(&ReplicaId::new("web", 0), false);
        c.converge_once().await.unwrap();
        assert_eq!(
            c.backend().runtime().log()[3..],
            ["start web-0", "create web-1 primary"]
        );
        assert_eq!(
            c.agent.runtime_view.drift_repairs.load(Ordering::Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn placement_errors_touch_nothing() {
        let (_dir, c) = converger("pools: [general]\n");
        release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        let gpu = STACK.replace(
            "replicas: 2\n",
            "replicas: 2\n      gpu: {type: a100, count: 1}\n",
        );
        release(&c, &gpu, "1.1.0", 2);
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().log().len(), 3);
        let history = c.agent.store.history(10).unwrap();
        let rolled = history.iter().find(|e| e.kind == "rolled-back").unwrap();
        assert!(
            rolled
                .message
                .contains("needs 1 GPU of type \"a100\"; this host has 0 (config key docker.gpus)"),
            "{}",
            rolled.message
        );
        let pool = STACK.replace("replicas: 2\n", "replicas: 2\n      pool: gpu-large\n");
        release(&c, &pool, "1.2.0", 3);
        c.converge_once().await.unwrap();
        let history = c.agent.store.history(10).unwrap();
        assert!(
            history.iter().any(|e| e
                .message
                .contains("pool \"gpu-large\" is not one of this agent's pools (general)")),
            "{history:?}"
        );
    }

    #[test]
    fn two_endpoints_on_one_host_port_are_refused() {
        let (_dir, path) =
            test_config("runtime: docker\ndocker: {publish: {ports: {admin: 9000, site: 9000}}}\n");
        let config = Config::load(&path).unwrap();
        let text = STACK
            .replace(
                "ports: [5432]\n",
                "ports: [5432]\n      publicEndpoints: [{name: admin, port: 5432, protocol: tcp}]\n",
            )
            .replace(
                "ports: [8080]\n",
                "ports: [8080]\n      publicEndpoints: [{name: site, port: 8080, protocol: http}]\n",
            );
        let stack = Stack::from_yaml(&text).unwrap().1;
        let error = Specs::new(&config, &stack, "sha256:00").err().unwrap();
        assert_eq!(
            error.to_string(),
            "public endpoints db.admin and web.site both listen on port 9000: give one another port (config key docker.publish.ports)"
        );
    }

    #[test]
    fn replicas_get_links_and_the_customers_credentials_never_the_vendors() {
        let (_dir, path) = test_config("runtime: docker\n");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "permissions: {execution: {}}",
            "permissions: {execution: {environment: {TOKEN: from-customer}, files: {/run/creds: /etc/outpost/creds}}}",
        );
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let vendor = STACK.replace(
            "links: [db]",
            "links: [db]\n      environment: {TOKEN: from-vendor, MODE: fast}",
        );
        let (_, stack) = Stack::from_yaml(&vendor).unwrap();
        let specs = Specs::new(&config, &stack, "sha256:00").unwrap();
        let spec = specs.spec(&ReplicaId::new("web", 1), "hash").unwrap();
        assert_eq!(spec.environment["TOKEN"], "from-customer");
        assert_eq!(spec.environment["MODE"], "fast");
        assert_eq!(spec.environment["DB_HOST"], "db");
        assert_eq!(spec.environment["DB_PORT"], "5432");
        assert_eq!(
            spec.files.get("/run/creds"),
            Some(&std::path::PathBuf::from("/etc/outpost/creds"))
        );
        assert_eq!(spec.volume, None);
        let db = specs.spec(&ReplicaId::new("db", 0), "hash").unwrap();
        assert_eq!(db.volume.as_deref(), Some("acme-db-0-data"));
    }

    #[tokio::test]
    async fn autoscaling_follows_cpu_within_bounds_and_cool_down() {
        let (_dir, c) = converger_with("", ", autoscale_cooldown_seconds: 3600");
        let text = STACK.replace(
            "replicas: 2\n",
            "autoScale: {min: 1, desired: 1, max: 4, targetCpuPercent: 50}\n",
        );
        release(&c, &text, "1.0.0", 1);
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().images().len(), 2, "db-0 and web-0");
        // web-0 at 120% of its CPU against a 50% target: 1 → 3 replicas.
        c.backend().runtime().set_usage(120.0, 10.0);
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().images().len(), 4);
        let history = c.agent.store.history(10).unwrap();
        assert!(
            history
                .iter()
                .any(|e| e.kind == "autoscale" && e.message.contains("web: 1 -> 3")),
            "{history:?}"
        );
        // Within the cool-down nothing changes, however busy.
        c.backend().runtime().set_usage(400.0, 10.0);
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().images().len(), 4);

        // An agent restarted (its choices lost) starts from what runs, not from `desired`.
        let restarted = Converger::new(
            c.agent.clone(),
            Replicas::new(c.agent.clone(), c.backend().runtime().clone()),
        );
        c.backend().runtime().set_usage(50.0, 10.0);
        restarted.converge_once().await.unwrap();
        assert_eq!(
            restarted.backend().runtime().images().len(),
            4,
            "3 web and db"
        );
    }

    #[tokio::test]
    async fn a_replica_that_never_becomes_healthy_is_not_left_to_pass_for_converged() {
        let (_dir, c) = converger("");
        c.backend().runtime().break_image(BROKEN);
        let broken = STACK.replace(
            "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            BROKEN,
        );
        release(&c, &broken, "1.0.0", 1);
        // A first install has nothing to roll back to: it fails, and so does every retry,
        // instead of finding the unhealthy replica in place and calling it converged.
        for _ in 0..2 {
            let error = c.converge_once().await.unwrap_err().to_string();
            assert!(
                error.contains("no earlier release to roll back to"),
                "{error}"
            );
            assert!(!c.backend().runtime().images().contains_key("web-0"));
        }
        assert_eq!(c.agent.store.positions().unwrap().converged, None);
    }

    #[tokio::test]
    async fn an_engine_that_cannot_be_reached_is_retried_not_rolled_back() {
        let (_dir, c) = converger("");
        release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        let v2 = release(&c, &STACK.replace("replicas: 2", "replicas: 3"), "1.1.0", 2);
        c.backend().runtime().fail_next_steps(1);
        let error = c.converge_once().await.unwrap_err().to_string();
        assert!(error.contains("engine unavailable"), "{error}");
        assert!(error.contains("retrying"), "{error}");
        assert_eq!(current(&c), v2, "still the release to run");
        assert_eq!(c.agent.runtime_view.rollbacks.load(Ordering::Relaxed), 0);
        c.converge_once().await.unwrap();
        assert_eq!(c.agent.store.positions().unwrap().converged, Some(v2));
    }

    #[tokio::test]
    async fn a_rollout_overtaken_by_the_customers_rollback_records_nothing() {
        let (_dir, c) = converger("");
        let v1 = release(&c, STACK, "1.0.0", 1);
        c.converge_once().await.unwrap();
        let v2 = release(&c, &STACK.replace("replicas: 2", "replicas: 3"), "1.1.0", 2);
        // The customer rolls back while 1.1.0 is still rolling out...
        c.agent.rollback("test", crate::config::now()).unwrap();
        assert_eq!(current(&c), v1);
        // ... so 1.1.0 finishing, or failing, must not touch the positions.
        let store = &c.agent.store;
        assert!(
            !store
                .set_converged(&v2, "late", crate::config::now())
                .unwrap()
        );
        assert!(
            !store
                .roll_back(&v2, &v1, "late", crate::config::now())
                .unwrap()
        );
        assert_eq!(store.positions().unwrap().converged, None);
        assert_eq!(current(&c), v1);
        c.converge_once().await.unwrap();
        assert_eq!(store.positions().unwrap().converged, Some(v1));
    }

    #[tokio::test]
    async fn engine_errors_fail_the_rollout_not_the_agent() {
        let (_dir, c) = converger("");
        release(&c, STACK, "1.0.0", 1);
        c.backend().runtime().fail_next_steps(1);
        // Nothing to roll back to on a first install: the error is reported, and the next
        // pass converges.
        assert!(
            c.converge_once()
                .await
                .unwrap_err()
                .to_string()
                .contains("engine unavailable")
        );
        c.converge_once().await.unwrap();
        assert_eq!(c.backend().runtime().images().len(), 3);
    }
}
