//! Verify → Approve around the state store: sources hand it layouts, the API the customer's
//! decisions, and the rollout reads where it left the current release. Synchronous; the time is
//! an argument.
//!
//! - `checks.rs`: verification with this agent's trust, expected stack and rollback floor;
//! - `decisions.rs`: the approval gate and the customer's decisions, under one lock;
//! - here: the `Agent` that holds them, acceptance, and the status and plan documents.

mod checks;
mod decisions;

pub use crate::source::Ingested;
pub use checks::load_trust;

use crate::config::{Config, RuntimeKind, Window};
use crate::diff;
use crate::state::{Decision, Rejection, Release, Store};
use crate::status::{RuntimeView, StackStatus, Status};
use checks::Examined;
use chrono::{DateTime, Utc};
use outpost_bundle_format::layout::{Layout, LayoutError};
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::{Limits, Trust, VerifiedBundle};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// A customer command that cannot be carried out (HTTP 409 / exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A step between verification and acceptance that may still refuse a verified bundle (the
/// daemon's: keeping the images a bundle carries, so an accepted air-gapped release always has
/// them). Its error rejects the bundle under [`check`](Admission::check).
pub trait Admission: Sync {
    fn check(&self) -> &'static str;
    fn admit(&self, layout: &Layout, verified: &VerifiedBundle) -> Result<(), String>;
}

pub struct Agent {
    pub config: Config,
    /// The pinned root after the rotations accepted bundles carried.
    trust: Mutex<Trust>,
    limits: Limits,
    windows: Vec<Window>,
    pub store: Arc<Store>,
    /// Serialises every change of position (ingest, reconsider, the customer's decisions): each
    /// reads the pending release and acts on it, and must not interleave with another.
    decisions: Mutex<()>,
    /// Woken whenever the current release changes (the rollout converges to it).
    pub current_changed: Arc<tokio::sync::Notify>,
    /// Whether a pending release waits (for approval, a window, the end of a freeze): the
    /// daemon re-evaluates it periodically only then.
    pub release_waits: tokio::sync::watch::Sender<bool>,
    /// What the runtime shows in `status`.
    pub runtime_view: Arc<RuntimeView>,
    /// What `/metrics` exports.
    pub metrics: Arc<crate::metrics::Metrics>,
    _state_lock: Option<std::fs::File>,
}

impl Agent {
    /// The running agent: owns `state_dir` (one agent per state directory, enforced by a lock
    /// held until the process ends, kill -9 included).
    pub fn new(config: Config) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.state_dir.display()))?;
        let lock_path = config.state_dir.join("agent.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another outpost-agent is running on {} (lock {})",
                config.state_dir.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("{}: {e}", lock_path.display())
            }
        }
        let store = Store::open(&config.state_dir)?;
        let mut agent = Self::with_store(config, store)?;
        agent._state_lock = Some(lock);
        Ok(agent)
    }

    /// An agent that only reads the state (or none yet): for `outpost-agent verify` beside a
    /// running agent.
    pub fn read_only(config: Config) -> anyhow::Result<Agent> {
        let store = match Store::open_read_only(&config.state_dir)? {
            Some(store) => store,
            None => Store::in_memory()?,
        };
        Self::with_store(config, store)
    }

    fn with_store(config: Config, store: Store) -> anyhow::Result<Agent> {
        let pinned_trust = load_trust(&config)?;
        let windows = config
            .approval
            .maintenance_windows
            .iter()
            .map(Window::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let trust = Self::rotated_trust(&pinned_trust, &config.state_dir);
        if let (Trust::Root(root), Some(recorded)) = (&trust, store.root_version()?)
            && root.version() < recorded
        {
            anyhow::bail!(
                "{}: the trust root chain replays only to version {} but version {recorded} was accepted; refusing to fall back to older keys",
                config.state_dir.join("roots").display(),
                root.version()
            );
        }
        let limits = config.limits();
        Ok(Agent {
            config,
            trust: Mutex::new(trust),
            limits,
            windows,
            store: Arc::new(store),
            decisions: Mutex::new(()),
            current_changed: Default::default(),
            release_waits: tokio::sync::watch::Sender::new(false),
            runtime_view: Default::default(),
            metrics: Default::default(),
            _state_lock: None,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the rollout loop and its backend may use of the agent.
    pub fn rollout_context(&self) -> crate::rollout::Context {
        crate::rollout::Context {
            store: self.store.clone(),
            status: self.runtime_view.clone(),
            changed: self.current_changed.clone(),
            rollout: self.config.rollout.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The hex digests of the images any release the agent may still run refers to (current,
    /// last good, pending): what carried images must not be pruned of.
    pub fn images_in_use(&self) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let positions = self.store.positions()?;
        let mut in_use = std::collections::BTreeSet::new();
        for release in [&positions.current, &positions.last_good, &positions.pending]
            .into_iter()
            .flatten()
        {
            in_use.extend(
                release
                    .stack()?
                    .resources
                    .iter()
                    .filter_map(|r| r.container.image.digest())
                    .map(|d| d.hex()),
            );
        }
        Ok(in_use)
    }

    /// Verify → record → approve, for one candidate from a source.
    pub fn ingest(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Ingested> {
        self.ingest_admitting(layout, origin, now, None)
    }

    /// [`ingest`](Self::ingest) with a step between verification and acceptance.
    pub fn ingest_admitting(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
        admission: Option<&dyn Admission>,
    ) -> anyhow::Result<Ingested> {
        let verified = match self.examine(layout, origin, now)? {
            Examined::Verified(verified) => verified,
            Examined::Unchanged(digest) => return Ok(Ingested::Unchanged { digest }),
            Examined::Rejected(rejection) => {
                self.store.record_rejection(&rejection)?;
                return Ok(rejection.into());
            }
        };
        if let Some(admission) = admission
            && let Err(reason) = admission.admit(layout, &verified)
        {
            let rejection = Rejection {
                digest: Some(verified.digest()),
                origin: origin.to_string(),
                check: admission.check().into(),
                reason,
                at: rfc3339::format(&now),
            };
            self.store.record_rejection(&rejection)?;
            return Ok(rejection.into());
        }
        let _decisions = self.lock_decisions();
        self.save_rotation(&verified)?;
        let release = Release::verified(&verified, origin, now)?;
        // Accepted as pending together with what it waits for, so status never shows a pending
        // release waiting for nothing; with nothing to wait for, reconsider applies it at once.
        let waiting_for = self.gate_for(&release, &self.store.positions()?, now)?;
        self.store.accept(&release, waiting_for.as_deref(), now)?;
        self.reconsider_locked(now)?;
        let after = self.store.positions()?;
        let waiting_for = after
            .pending
            .filter(|p| p.digest == release.digest)
            .and(after.waiting_for);
        Ok(Ingested::Accepted {
            digest: release.digest,
            version: release.version,
            waiting_for,
        })
    }

    /// Everything `ingest` would decide, recording nothing (`outpost-agent verify FILE`).
    pub fn dry_run(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Ingested> {
        Ok(match self.examine(layout, origin, now)? {
            Examined::Verified(verified) => {
                let positions = self.store.positions()?;
                let release = Release::verified(&verified, origin, now)?;
                let waiting_for = self.gate_for(&release, &positions, now)?;
                Ingested::Accepted {
                    digest: release.digest,
                    version: release.version,
                    waiting_for,
                }
            }
            Examined::Unchanged(digest) => Ingested::Unchanged { digest },
            Examined::Rejected(rejection) => rejection.into(),
        })
    }

    /// A candidate whose layout could not even be read (truncated, garbage, unsafe paths):
    /// recorded like any rejection; nothing else changes.
    pub fn reject_unreadable(
        &self,
        origin: &str,
        digest: Option<outpost_bundle_format::Digest>,
        error: &LayoutError,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Ingested> {
        let rejection = Rejection {
            digest,
            origin: origin.to_string(),
            check: error.check().to_string(),
            reason: error.to_string(),
            at: rfc3339::format(&now),
        };
        self.store.record_rejection(&rejection)?;
        Ok(rejection.into())
    }

    /// The `status` document (its keys are a contract: see [`crate::status`]).
    pub fn status(&self) -> anyhow::Result<Value> {
        let positions = self.store.positions()?;
        let runtime = match self.config.runtime {
            RuntimeKind::None => json!("none"),
            kind @ (RuntimeKind::Docker | RuntimeKind::Kubernetes | RuntimeKind::Vm) => {
                let mut view = self.runtime_view.snapshot();
                if !view.is_object() {
                    view = json!({});
                }
                view["kind"] = json!(kind);
                view["converged"] = json!(positions.converged);
                view
            }
        };
        let stack = StackStatus {
            name: self.config.expect.name.clone(),
            channel: self.config.expect.channel.clone(),
        };
        Ok(Status::new(stack, &positions, runtime).to_json())
    }

    /// What the pending release changes against the current one.
    pub fn plan(&self) -> anyhow::Result<Value> {
        let p = self.store.positions()?;
        let Some(pending) = p.pending else {
            return Ok(
                json!({"pending": null, "current": p.current.as_ref().map(|c| c.version.clone()), "diff": null, "text": "no release is pending\n"}),
            );
        };
        let new: Value = serde_json::from_str(&pending.stack)?;
        let old: Option<Value> = p
            .current
            .as_ref()
            .map(|c| serde_json::from_str(&c.stack))
            .transpose()?;
        let d = diff::diff(old.as_ref(), &new);
        let from = match &p.current {
            Some(c) => format!("{} (sequence {})", c.version, c.sequence),
            None => "nothing yet".to_string(),
        };
        let header = format!(
            "{}: {from} -> {} (sequence {}, {}); waiting for: {}\n",
            pending.name,
            pending.version,
            pending.sequence,
            pending.digest,
            p.waiting_for.as_deref().unwrap_or("nothing"),
        );
        let mut warnings = String::new();
        for resource in &pending.irreversible {
            warnings.push_str(&format!(
                "irreversible: rolling back past this release restores {resource}'s data to the snapshot taken before it; writes made after are lost\n"
            ));
        }
        if !pending.irreversible.is_empty() {
            if self.config.runtime == crate::config::RuntimeKind::None {
                warnings.push_str(&format!(
                    "irreversible: runtime {} takes no snapshots yet: no rollback past this release can restore the data\n",
                    self.config.runtime.as_str()
                ));
            } else if self.config.snapshots.keep == 0 {
                warnings.push_str("irreversible: snapshots are off (snapshots.keep: 0): no rollback past this release can restore the data\n");
            }
        }
        // VM pools: what the release makes in the customer's cloud account.
        let cloud = match &self.config.vm {
            Some(vm) if self.config.runtime == RuntimeKind::Vm => {
                let file: outpost_bundle_format::stack::StackFile =
                    serde_json::from_value(new.clone())?;
                let stack = outpost_bundle_format::stack::Stack::from_file(&file)?;
                crate::rollout::vm::plan::cloud_changes(&stack, vm, &self.runtime_view.current())
            }
            _ => Vec::new(),
        };
        let cloud_text: String = cloud.iter().map(|c| format!("cloud: {c}\n")).collect();
        let images = Self::image_origins(&pending)?;
        let built_text: String = if pending.built_from.is_empty() {
            String::new()
        } else {
            images.iter().map(|(_, line)| format!("{line}\n")).collect()
        };
        let images: Vec<Value> = images.into_iter().map(|(image, _)| image).collect();
        Ok(json!({
            "current": p.current.as_ref().map(|c| c.version.clone()),
            "pending": pending.version,
            "waiting_for": p.waiting_for,
            "irreversible": pending.irreversible,
            "diff": serde_json::to_value(&d)?,
            "cloud": cloud,
            "images": images,
            "text": format!("{header}{warnings}{built_text}{}{cloud_text}", diff::render(&d)),
        }))
    }
}

impl Agent {
    /// Each image the release pins, and whether it was built from source (verified provenance)
    /// or named by the vendor: as JSON and as a line of the plan.
    fn image_origins(release: &Release) -> anyhow::Result<Vec<(Value, String)>> {
        let stack = release.stack()?;
        Ok(stack
            .resources
            .iter()
            .map(|r| {
                let name = &r.container.name;
                let image = r.container.image.to_string();
                match release.built_from.iter().find(|b| &b.resource == name) {
                    Some(b) => (
                        json!({"resource": name, "image": image, "built_from": b}),
                        format!(
                            "image {name}: {image}, built from source {} ({}) with {} by {}",
                            b.source, b.source_digest, b.dockerfile, b.builder
                        ),
                    ),
                    None => (
                        json!({"resource": name, "image": image, "built_from": null}),
                        format!("image {name}: {image}, named by the vendor (no provenance)"),
                    ),
                }
            })
            .collect())
    }
}

#[derive(Serialize)]
pub struct HistoryView {
    pub events: Vec<crate::state::Event>,
    pub decisions: Vec<Decision>,
}

impl From<Rejection> for Ingested {
    fn from(r: Rejection) -> Self {
        Ingested::Rejected {
            digest: r.digest,
            check: r.check,
            reason: r.reason,
        }
    }
}
