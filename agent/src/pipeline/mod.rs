//! The pipeline's decisions around the state store: Verify (with the agent's stateful checks)
//! → Approve → apply. Sources feed it layouts; the API calls the customer's decisions.
//! Everything here is synchronous and takes the time as an argument.

use crate::approval::{Gate, GateInput, Window, gate};
use crate::config::{Config, RuntimeKind};
use crate::diff;
use crate::state::{Decision, Effect, Positions, Rejection, Release, Store};
use chrono::{DateTime, Utc};
use outpost_bundle_format::crypto::PublicKey;
use outpost_bundle_format::layout::{Layout, LayoutError};
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::root::TrustRoot;
use outpost_bundle_format::verify::{ReleasePolicy, VerifyError};
use outpost_bundle_format::{
    Digest, Limits, ReleaseMetadata, Trust, VerifiedBundle, bundle, verify_with,
};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Mutex;

/// The hex digests of the images `stack` runs.
fn image_digests(
    stack: &outpost_bundle_format::stack::Stack,
) -> std::collections::BTreeSet<String> {
    stack
        .resources
        .iter()
        .filter_map(|r| r.container.image.digest())
        .map(|d| d.hex())
        .collect()
}

/// What became of a candidate bundle.
#[derive(Debug, Clone, PartialEq)]
pub enum Ingested {
    Accepted {
        digest: String,
        version: String,
        waiting_for: Option<String>,
    },
    /// The current or pending release again: nothing to do.
    Unchanged { digest: String },
    Rejected {
        digest: Option<String>,
        check: String,
        reason: String,
    },
}

impl Ingested {
    /// One line for logs and `.reason` files.
    pub fn describe(&self) -> String {
        match self {
            Ingested::Accepted {
                digest,
                version,
                waiting_for: None,
            } => format!("accepted {version} {digest}"),
            Ingested::Accepted {
                digest,
                version,
                waiting_for: Some(w),
            } => format!("accepted {version} {digest}, waiting for {w}"),
            Ingested::Unchanged { digest } => {
                format!("unchanged: {digest} is already current, pending or rolled back")
            }
            Ingested::Rejected { check, reason, .. } => format!("rejected: {check}: {reason}"),
        }
    }

    /// Signature-related rejections may be cured by more signatures under the same digest.
    pub fn wants_more_signatures(&self) -> bool {
        matches!(self, Ingested::Rejected { check, .. } if ["unsigned", "untrusted-signature", "threshold-unmet", "signature-mismatch"].contains(&check.as_str()))
    }
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

enum Examined {
    Verified(Box<VerifiedBundle>),
    Unchanged(String),
    Rejected(Rejection),
}

/// A customer command that cannot be carried out (HTTP 409 / exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub struct Agent {
    pub config: Config,
    /// The pinned root after the rotations accepted bundles carried.
    trust: Mutex<Trust>,
    limits: Limits,
    windows: Vec<Window>,
    pub store: Store,
    /// Serialises every change of position (ingest, reconsider, the customer's decisions): each
    /// reads the pending release and acts on it, and must not interleave with another.
    decisions: Mutex<()>,
    /// Woken whenever the current release changes (the rollout converges to it).
    pub current_changed: tokio::sync::Notify,
    /// What the runtime shows in `status` and `/metrics`.
    pub runtime_view: crate::rollout::RuntimeView,
    _state_lock: Option<std::fs::File>,
}

/// The stateful checks (wrong software, rollback) in the format's order.
struct AgentChecks<'a> {
    name: &'a str,
    channel: &'a str,
    highest: Option<u64>,
    /// The current and pending digests: seeing them again is a no-op, not a rollback.
    known: Vec<String>,
}

impl ReleasePolicy for AgentChecks<'_> {
    fn check_identity(&self, metadata: &ReleaseMetadata) -> Result<(), VerifyError> {
        if metadata.name != self.name {
            return Err(VerifyError::Policy {
                check: "wrong-stack",
                message: format!(
                    "the bundle is for stack {:?}; this agent accepts {:?}",
                    metadata.name, self.name
                ),
            });
        }
        if metadata.channel != self.channel {
            return Err(VerifyError::Policy {
                check: "wrong-channel",
                message: format!(
                    "the bundle is for channel {:?}; this agent accepts {:?}",
                    metadata.channel, self.channel
                ),
            });
        }
        Ok(())
    }

    fn check_sequence(
        &self,
        metadata: &ReleaseMetadata,
        digest: Digest,
    ) -> Result<(), VerifyError> {
        if self.known.contains(&digest.to_string()) {
            return Ok(());
        }
        match self.highest {
            Some(highest) if metadata.sequence <= highest => Err(VerifyError::Policy {
                check: "rollback",
                message: format!(
                    "sequence {} is not above the highest accepted sequence {highest}",
                    metadata.sequence
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Loads the trust the config pins.
pub fn load_trust(config: &Config) -> anyhow::Result<Trust> {
    if let Some(root) = &config.trust.root {
        let fail =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("trust.root {}: {e}", root.display());
        let raw = std::fs::read(root).map_err(|e| fail(&e))?;
        let root = TrustRoot::from_pinned(&raw).map_err(|e| fail(&e))?;
        return Ok(Trust::Root(root));
    }
    let mut keys = Vec::new();
    for path in &config.trust.keys {
        let fail =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("trust.keys {}: {e}", path.display());
        let pem = std::fs::read(path).map_err(|e| fail(&e))?;
        let key = PublicKey::from_pem(&pem).map_err(|e| fail(&e))?;
        // Identity is canonical: the same key in another encoding is the same key.
        if keys.contains(&key) {
            return Err(fail(
                &"the same key as another trust.keys entry (a key counts once)",
            ));
        }
        keys.push(key);
    }
    Ok(Trust::Keys {
        keys,
        threshold: config.trust.threshold.unwrap_or(1),
    })
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
            && root.version < recorded
        {
            anyhow::bail!(
                "{}: the trust root chain replays only to version {} but version {recorded} was accepted; refusing to fall back to older keys",
                config.state_dir.join("roots").display(),
                root.version
            );
        }
        let limits = config.limits();
        Ok(Agent {
            config,
            trust: Mutex::new(trust),
            limits,
            windows,
            store,
            decisions: Mutex::new(()),
            current_changed: tokio::sync::Notify::new(),
            runtime_view: Default::default(),
            _state_lock: None,
        })
    }

    /// The pinned root advanced through the chain saved from accepted bundles (`roots/`).
    fn rotated_trust(pinned: &Trust, state_dir: &std::path::Path) -> Trust {
        let Trust::Root(root) = pinned else {
            return pinned.clone();
        };
        let mut root = root.clone();
        let mut version = root.version + 1;
        while let Ok(raw) =
            std::fs::read(state_dir.join("roots").join(format!("{version}.root.json")))
        {
            match root.rotate(&raw) {
                Ok(next) => root = next,
                Err(_) => break,
            }
            version += 1;
        }
        Trust::Root(root)
    }

    /// Persists a rotation the verified bundle carried, before the bundle is accepted: every
    /// carried root version (fsynced), then the version trust now stands at, so a restart that
    /// cannot replay the chain refuses to start instead of trusting revoked keys.
    fn save_rotation(&self, verified: &VerifiedBundle) -> anyhow::Result<()> {
        let old = match &*self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Trust::Root(old) => old.version,
            Trust::Keys { .. } => return Ok(()),
        };
        let Some(new_root) = verified.root().filter(|r| r.version > old) else {
            return Ok(());
        };
        let dir = self.config.state_dir.join("roots");
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        for raw in verified.carried_roots() {
            let version = outpost_bundle_format::root::peek_version(raw)?;
            outpost_bundle_format::layout::write_atomic(
                &dir.join(format!("{version}.root.json")),
                raw,
            )?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        self.store.set_root_version(new_root.version)?;
        *self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Trust::Root(new_root.clone());
        Ok(())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Verify → record → approve, for one candidate from a source.
    pub fn ingest(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Ingested> {
        let verified = match self.examine(layout, origin, now)? {
            Examined::Verified(verified) => verified,
            Examined::Unchanged(digest) => return Ok(Ingested::Unchanged { digest }),
            Examined::Rejected(rejection) => {
                self.store.record_rejection(&rejection)?;
                return Ok(rejection.into());
            }
        };
        if self.config.runtime == RuntimeKind::Docker {
            // Kept before acceptance: an accepted air-gapped release always has its images.
            // Archives no release the agent may still run refers to go.
            let images = self.config.images_dir();
            if let Err(e) = crate::runtime::docker::keep_bundled_images(layout, &images) {
                let rejection = Rejection {
                    digest: Some(verified.digest().to_string()),
                    origin: origin.to_string(),
                    check: "bundled-image".into(),
                    reason: format!("{e:#}"),
                    at: rfc3339::format(&now),
                };
                self.store.record_rejection(&rejection)?;
                return Ok(rejection.into());
            }
            let positions = self.store.positions()?;
            let mut in_use = image_digests(verified.stack());
            for release in [&positions.current, &positions.last_good, &positions.pending]
                .into_iter()
                .flatten()
            {
                in_use.extend(image_digests(&release.stack()?));
            }
            crate::runtime::docker::prune_bundled_images(&images, &in_use);
        }
        let _decisions = self.lock_decisions();
        self.save_rotation(&verified)?;
        let release = self.release_of(&verified, origin, now)?;
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

    /// The format's checks with this agent's trust and expectations, without the rollback
    /// floor: any genuine release of our stack can be reviewed (`outpost-agent render`).
    pub fn verify_for_review(
        &self,
        layout: &Layout,
        now: DateTime<Utc>,
    ) -> Result<VerifiedBundle, VerifyError> {
        let checks = AgentChecks {
            name: &self.config.expect.name,
            channel: &self.config.expect.channel,
            highest: None,
            known: Vec::new(),
        };
        let trust = self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        verify_with(layout, &trust, now, &self.limits, &checks)
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
                let release = self.release_of(&verified, origin, now)?;
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

    /// The checks, in the format's order, with this agent's trust, expectations and rollback floor.
    fn examine(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Examined> {
        let positions = self.store.positions()?;
        let digest = bundle::bundle_descriptor(layout)
            .map(|d| d.digest.to_string())
            .ok();
        // "Unchanged" is decided after full verification: an index merely naming the current
        // digest proves nothing.
        // The release last rolled back from is known too: a source still offering it is not
        // replaying an old release at us.
        let known: Vec<String> = [&positions.current, &positions.pending]
            .into_iter()
            .flatten()
            .map(|r| r.digest.clone())
            .chain(positions.rolled_back.clone())
            .collect();
        let checks = AgentChecks {
            name: &self.config.expect.name,
            channel: &self.config.expect.channel,
            highest: positions.highest_sequence,
            known: known.clone(),
        };
        let trust = self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(
            match verify_with(layout, &trust, now, &self.limits, &checks) {
                Ok(verified) if known.contains(&verified.digest().to_string()) => {
                    Examined::Unchanged(verified.digest().to_string())
                }
                Ok(verified) => Examined::Verified(Box::new(verified)),
                Err(e) => Examined::Rejected(Rejection {
                    digest,
                    origin: origin.to_string(),
                    check: e.check().to_string(),
                    reason: e.to_string(),
                    at: rfc3339::format(&now),
                }),
            },
        )
    }

    fn release_of(
        &self,
        verified: &VerifiedBundle,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Release> {
        let stack = serde_json::to_string(verified.stack_file())?;
        Ok(Release::new(
            verified.digest(),
            verified.metadata(),
            stack,
            origin,
            now,
        ))
    }

    /// A candidate whose layout could not even be read (truncated, garbage, unsafe paths):
    /// recorded like any rejection; nothing else changes.
    pub fn reject_unreadable(
        &self,
        origin: &str,
        digest: Option<String>,
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

    /// What `pending` waits for against the current positions (None: nothing, apply it).
    fn gate_for(
        &self,
        pending: &Release,
        positions: &Positions,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Option<String>> {
        let (current, pinned) = (&positions.current, positions.pinned.as_deref());
        let stack: Value = serde_json::from_str(&pending.stack)?;
        let requested_profiles = stack
            .get("permissionProfiles")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let pending_version = semver::Version::parse(&pending.version)?;
        let current_version = current
            .as_ref()
            .and_then(|c| semver::Version::parse(&c.version).ok());
        let input = GateInput {
            policy: &self.config.approval,
            windows: &self.windows,
            grants: &self.config.permissions,
            requested_profiles,
            current_version: current_version.as_ref(),
            pending_version: &pending_version,
            approved_by_customer: self.store.approved(&pending.digest)?,
            pinned,
            now,
        };
        Ok(match gate(&input) {
            Gate::Ready => None,
            Gate::Waiting(reason) => Some(reason),
        })
    }

    /// Re-evaluates the pending release (approval, windows, pins); applies it when nothing is
    /// left to wait for. Returns the applied digest.
    pub fn reconsider(&self, now: DateTime<Utc>) -> anyhow::Result<Option<String>> {
        let _decisions = self.lock_decisions();
        self.reconsider_locked(now)
    }

    fn lock_decisions(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is (); a panic elsewhere leaves nothing inconsistent behind it.
        self.decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reconsider_locked(&self, now: DateTime<Utc>) -> anyhow::Result<Option<String>> {
        let positions = self.store.positions()?;
        let Some(pending) = positions.pending.clone() else {
            return Ok(None);
        };
        // Freeze protection holds while a release waits, too.
        if rfc3339::parse(&pending.expires).map_or(true, |expires| now >= expires) {
            self.store.drop_pending(
                &pending.digest,
                now,
                &format!(
                    "{} {} expired at {} while waiting",
                    pending.name, pending.version, pending.expires
                ),
            )?;
            return Ok(None);
        }
        match self.gate_for(&pending, &positions, now)? {
            Some(reason) => {
                if positions.waiting_for.as_deref() != Some(reason.as_str()) {
                    self.store.set_waiting(&reason)?;
                }
                Ok(None)
            }
            None => {
                let message = match self.config.runtime {
                    RuntimeKind::None => format!(
                        "{} {} is now current (runtime none: recorded, nothing runs)",
                        pending.name, pending.version
                    ),
                    RuntimeKind::Docker | RuntimeKind::Kubernetes => format!(
                        "{} {} is now current; rolling out",
                        pending.name, pending.version
                    ),
                };
                self.store.promote(&pending.digest, &message, now)?;
                self.current_changed.notify_one();
                Ok(Some(pending.digest))
            }
        }
    }

    fn pending_named(&self, version: &str, digest: Option<&str>) -> anyhow::Result<Release> {
        match self.store.positions()?.pending {
            Some(p) if p.version != version => Err(Refused(format!("the pending release is {}, not {version}", p.version)).into()),
            Some(p) if digest.is_some_and(|d| d != p.digest) => Err(Refused(format!("the pending {version} is now {}, not the digest given: review `outpost-agent plan` again", p.digest)).into()),
            Some(p) => Ok(p),
            None => Err(Refused(format!("no release is pending (asked for {version})")).into()),
        }
    }

    /// Approves the pending `version`; with `digest`, only if that is still what is pending
    /// (the customer approves what they reviewed in `plan`, not a re-issued version).
    pub fn approve(
        &self,
        version: &str,
        digest: Option<&str>,
        who: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<String> {
        let _decisions = self.lock_decisions();
        let pending = self.pending_named(version, digest)?;
        self.store.record_decision(
            &Decision::new(now, &pending.digest, version, "approve", who),
            Effect::None,
        )?;
        Ok(match self.reconsider_locked(now)? {
            Some(_) => format!("approved {version}: now current"),
            None => format!(
                "approved {version}; still waiting for {}",
                self.store.positions()?.waiting_for.unwrap_or_default()
            ),
        })
    }

    pub fn reject(
        &self,
        version: &str,
        digest: Option<&str>,
        reason: &str,
        who: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<String> {
        let _decisions = self.lock_decisions();
        let pending = self.pending_named(version, digest)?;
        let message = format!("rejected by {who}: {reason}");
        self.store.record_decision(
            &Decision::new(now, &pending.digest, version, "reject", who).because(reason),
            Effect::DropPending { message: &message },
        )?;
        Ok(format!(
            "rejected {version}; a later sequence from the vendor is needed to move on"
        ))
    }

    pub fn pin(&self, version: &str, who: &str, now: DateTime<Utc>) -> anyhow::Result<String> {
        let _decisions = self.lock_decisions();
        let positions = self.store.positions()?;
        let current = positions.current.ok_or_else(|| {
            Refused("nothing is current yet: only the current release can be pinned".into())
        })?;
        if current.version != version {
            return Err(Refused(format!("only the current release ({}) can be pinned; older releases are refused by rollback protection", current.version)).into());
        }
        self.store.record_decision(
            &Decision::new(now, &current.digest, version, "pin", who),
            Effect::Pin(Some(version)),
        )?;
        self.reconsider_locked(now)?;
        Ok(format!(
            "pinned to {version}: new releases wait until unpin"
        ))
    }

    pub fn unpin(&self, who: &str, now: DateTime<Utc>) -> anyhow::Result<String> {
        let _decisions = self.lock_decisions();
        let positions = self.store.positions()?;
        let Some(pinned) = positions.pinned else {
            return Err(Refused("nothing is pinned".into()).into());
        };
        let digest = positions.current.map(|c| c.digest).unwrap_or_default();
        self.store.record_decision(
            &Decision::new(now, &digest, &pinned, "unpin", who),
            Effect::Pin(None),
        )?;
        self.reconsider_locked(now)?;
        Ok(format!("unpinned {pinned}"))
    }

    /// The customer's `rollback`: the last good release becomes current again; the rollout
    /// converges to it. The release rolled back from is not offered again by rollback
    /// protection; the vendor's next sequence moves on.
    pub fn rollback(&self, who: &str, now: DateTime<Utc>) -> anyhow::Result<String> {
        let _decisions = self.lock_decisions();
        let positions = self.store.positions()?;
        let current = positions
            .current
            .ok_or_else(|| Refused("nothing is current: there is nothing to roll back".into()))?;
        let good = positions
            .last_good
            .filter(|g| g.digest != current.digest)
            .ok_or_else(|| {
                Refused(format!(
                    "there is no earlier good release to roll back to from {}",
                    current.version
                ))
            })?;
        let message = format!(
            "{} rolled back by {who} from {} to {}",
            current.name, current.version, good.version
        );
        self.store.record_decision(
            &Decision::new(now, &current.digest, &current.version, "rollback", who),
            Effect::RollBack {
                to: &good.digest,
                message: &message,
            },
        )?;
        self.current_changed.notify_one();
        Ok(format!(
            "rolled back to {} (from {}); the runtime converges to it now",
            good.version, current.version
        ))
    }

    /// The `status` document (its keys are a contract: current, pending, last_rejection).
    pub fn status(&self) -> anyhow::Result<Value> {
        let p = self.store.positions()?;
        let release = |r: &Release| json!({"version": r.version, "sequence": r.sequence, "digest": r.digest, "created": r.created, "expires": r.expires, "origin": r.origin, "received_at": r.received_at});
        let pending = p.pending.as_ref().map(|r| {
            let mut v = release(r);
            v["waiting_for"] = json!(p.waiting_for);
            v
        });
        Ok(json!({
            "stack": {"name": self.config.expect.name, "channel": self.config.expect.channel},
            "runtime": match self.config.runtime {
                RuntimeKind::None => json!("none"),
                kind @ (RuntimeKind::Docker | RuntimeKind::Kubernetes) => {
                    let mut view = self.runtime_view.snapshot();
                    if !view.is_object() {
                        view = json!({});
                    }
                    view["kind"] = json!(kind);
                    view["converged"] = json!(p.converged);
                    view
                }
            },
            "current": p.current.as_ref().map(release),
            "pending": pending,
            "last_good": p.last_good.as_ref().map(release),
            "pinned": p.pinned,
            "highest_sequence": p.highest_sequence,
            "last_rejection": p.last_rejection.as_ref().map(|r| json!({"digest": r.digest, "reason": r.reason, "check": r.check, "at": r.at, "origin": r.origin})),
        }))
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
        Ok(json!({
            "current": p.current.as_ref().map(|c| c.version.clone()),
            "pending": pending.version,
            "waiting_for": p.waiting_for,
            "diff": serde_json::to_value(&d)?,
            "text": format!("{header}{}", diff::render(&d)),
        }))
    }
}

#[derive(Serialize)]
pub struct HistoryView {
    pub events: Vec<crate::state::Event>,
    pub decisions: Vec<Decision>,
}
