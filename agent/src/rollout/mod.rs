//! Rollout: Plan → Rollout → Runtime. [`Converger`] is the rollout loop for every backend: it
//! converges the runtime to the current release (at once when it changes, else every drift
//! interval), rolls a new release that fails back to the last good one, and on a converged
//! release lets the backend repair drift.
//!
//! A [`Backend`] says how a release runs; each lives beside this file and imports only
//! downward (the store, the plan, the runtimes): [`replicas`] on a container engine,
//! [`kubernetes`] on a cluster, [`vm`] on machine pools in the customer's cloud. A backend gets a [`Context`] (the store for its journal, the
//! status sink, the rollout settings) and its own config section, never the whole agent.

pub mod autoscale;
pub mod kubernetes;
pub mod replicas;
pub mod snapshots;
pub mod specs;
pub mod steps;
pub mod vm;

pub use replicas::Replicas;

use crate::config::RolloutConfig;
use crate::metrics::Metrics;
use crate::state::{Release, Store};
use crate::status::{RuntimeView, Target};
use outpost_bundle_format::Digest;
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::stack::Stack;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// What a backend and the rollout loop may use of the agent.
#[derive(Clone)]
pub struct Context {
    /// The journal, positions and events.
    pub store: Arc<Store>,
    /// What `status` and `/metrics` show of the runtime.
    pub status: Arc<RuntimeView>,
    /// Notified when the current release changes.
    pub changed: Arc<Notify>,
    pub rollout: RolloutConfig,
    pub metrics: Arc<Metrics>,
}

/// One thing a drift pass put right, and the resource it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Repair {
    pub resource: String,
    pub what: String,
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

/// The agent's own store failed: retried like an unreachable runtime, never rolled back for.
impl From<crate::state::StateError> for RolloutError {
    fn from(e: crate::state::StateError) -> Self {
        RolloutError::unavailable(format!("journal: {e}"))
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
    ) -> Result<Vec<Repair>, RolloutError>;
}

/// The rollout loop, whatever the runtime: rolls out a new current release (rolling back to
/// the last good one if it fails), else repairs drift.
pub struct Converger<B: Backend> {
    context: Context,
    backend: B,
    /// The current release's stack, read back and checked once per release, not every pass.
    stack: std::sync::Mutex<Option<(Digest, Arc<Stack>)>>,
}

/// Runs `work` as a journaled step: begun in the store before it runs, finished with its
/// outcome after, so that a crash mid-step is found at the next start.
/// `backend` names it in the `outpost_rollout_steps_total` it counts.
pub(crate) async fn journaled<T>(
    context: &Context,
    backend: &str,
    digest: &Digest,
    step: &str,
    work: impl Future<Output = Result<T, RolloutError>>,
) -> Result<T, RolloutError> {
    let store = &context.store;
    let id = store.begin_step(digest, step, crate::config::now())?;
    let span = tracing::info_span!("step", step = %step);
    let outcome = tracing::Instrument::instrument(work, span).await;
    let finished = if outcome.is_ok() { "done" } else { "failed" };
    context.metrics.step(backend, outcome.is_ok());
    if let Err(e) = store.finish_step(id, finished, crate::config::now()) {
        // The step happened; the next start will call it interrupted and look again.
        tracing::warn!("journal: finishing {step:?}: {e}");
    }
    outcome
}

/// Records an event in the store and the log.
pub(crate) fn event(store: &Store, kind: &str, digest: Option<&Digest>, message: &str) {
    match digest {
        Some(digest) => tracing::info!(event = kind, %digest, "{message}"),
        None => tracing::info!(event = kind, "{message}"),
    }
    if let Err(e) = store.event(crate::config::now(), kind, digest, message) {
        tracing::warn!("recording {kind}: {e}");
    }
}

impl<B: Backend> Converger<B> {
    pub fn new(context: Context, backend: B) -> Converger<B> {
        Converger {
            context,
            backend,
            stack: Default::default(),
        }
    }

    fn stack_of(&self, release: &Release) -> Result<Arc<Stack>, crate::state::StoredStackError> {
        let mut cached = self
            .stack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((digest, stack)) = cached.as_ref()
            && *digest == release.digest
        {
            return Ok(stack.clone());
        }
        let stack = Arc::new(release.stack()?);
        *cached = Some((release.digest, stack.clone()));
        Ok(stack)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn view(&self) -> &RuntimeView {
        &self.context.status
    }

    /// Converges forever: at once when the current release changes, else every drift interval.
    pub async fn run(&self) {
        match self.context.store.interrupted_steps(crate::config::now()) {
            Ok(steps) => {
                for (digest, step) in steps {
                    event(
                        &self.context.store,
                        "interrupted",
                        Some(&digest),
                        &format!("the agent stopped during {step:?}; resuming from what runs"),
                    );
                }
            }
            Err(e) => tracing::warn!("reading the rollout journal: {e}"),
        }
        let interval = Duration::from_secs(self.context.rollout.drift_interval_seconds);
        let mut failures = 0u32;
        loop {
            let wait = match self.converge_once().await {
                Ok(()) => {
                    failures = 0;
                    interval
                }
                Err(e) => {
                    failures += 1;
                    self.view().update(|s| s.last_error = Some(e.to_string()));
                    tracing::warn!("runtime: {e:#}");
                    crate::backoff::delay(failures).min(interval)
                }
            };
            tokio::select! {
                _ = self.context.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: roll out a new current release (rolling back if it fails), or repair drift.
    pub async fn converge_once(&self) -> anyhow::Result<()> {
        let store = &*self.context.store;
        let positions = store.positions()?;
        let Some(current) = positions.current else {
            self.view()
                .update(|s| s.phase = Some("nothing to run yet".into()));
            return Ok(());
        };
        let fresh = positions.converged != Some(current.digest);
        // A rollout runs code a drift pass does not: handed back once it is over.
        let _busy = fresh.then(crate::memory::Busy::start);
        self.view().update(|s| {
            s.target = Some(Target {
                version: current.version.clone(),
                digest: current.digest,
            })
        });
        if fresh {
            self.view().update(|s| {
                s.phase = Some("rolling out".into());
                s.resources.clear();
            });
            self.context.metrics.rollouts.inc();
            event(
                store,
                "rollout",
                Some(&current.digest),
                &format!("rolling out {} {}", current.name, current.version),
            );
        }
        // Every line the backend logs for this pass says which release it belongs to.
        let span =
            tracing::info_span!("release", digest = %current.digest, version = %current.version);
        let outcome = match self.stack_of(&current) {
            Ok(stack) => {
                let pass = self.backend.converge(&current, &stack, fresh);
                tracing::Instrument::instrument(pass, span).await
            }
            Err(e) => Err(RolloutError::new(e.to_string())),
        };
        match outcome {
            Ok(repairs) => {
                self.view().update(|s| {
                    s.phase = Some("converged".into());
                    s.note = None;
                    s.last_error = None;
                });
                if fresh {
                    let recorded = store.set_converged(
                        &current.digest,
                        &format!("{} {} runs, healthy", current.name, current.version),
                        crate::config::now(),
                    )?;
                    if !recorded {
                        // Superseded by the customer's decision: the next pass runs it.
                        self.view().update(|s| s.phase = Some("superseded".into()));
                    } else if let Ok(accepted) = rfc3339::parse(&current.received_at) {
                        let took = crate::config::now() - accepted;
                        self.context
                            .metrics
                            .accepted_to_converged_seconds
                            .observe(took.num_milliseconds().max(0) as f64 / 1000.0);
                    }
                } else if !repairs.is_empty() {
                    for repair in &repairs {
                        self.context.metrics.drift_repair(&repair.resource);
                    }
                    let mut summary = repairs
                        .iter()
                        .take(10)
                        .map(|r| r.what.clone())
                        .collect::<Vec<_>>();
                    if repairs.len() > 10 {
                        summary.push(format!("and {} more", repairs.len() - 10));
                    }
                    self.view().update(|s| s.last_drift = summary.clone());
                    event(
                        store,
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
                self.view().update(|s| s.phase = Some("failed".into()));
                let good = positions.last_good.filter(|g| g.digest != current.digest);
                match good {
                    Some(good) => {
                        self.context.metrics.rollback("failed");
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
                        tracing::warn!(digest = %current.digest, "{message}");
                        self.view()
                            .update(|s| s.last_rollback = Some(message.clone()));
                        self.context.changed.notify_one();
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
