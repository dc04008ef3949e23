//! Approve, the customer's side: every change of position (a release accepted, a maintenance
//! window opening, approve, reject, pin, unpin, rollback) re-runs the gate under one lock, so
//! no two decisions interleave.

use super::{Agent, Refused};
use crate::approval::{Gate, GateInput, gate};
use crate::config::RuntimeKind;
use crate::state::{Decision, Effect, Positions, Release};
use chrono::{DateTime, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::release::rfc3339;
use serde_json::Value;

impl Agent {
    /// What `pending` waits for against the current positions (None: nothing, apply it).
    pub(super) fn gate_for(
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
            grants: &self.config.permissions.0,
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
    pub fn reconsider(&self, now: DateTime<Utc>) -> anyhow::Result<Option<Digest>> {
        let _decisions = self.lock_decisions();
        self.reconsider_locked(now)
    }

    pub(super) fn lock_decisions(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is (); a panic elsewhere leaves nothing inconsistent behind it.
        self.decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn reconsider_locked(&self, now: DateTime<Utc>) -> anyhow::Result<Option<Digest>> {
        let mut waits = false;
        let applied = self.reconsider_pending(now, &mut waits);
        // The daemon re-evaluates while a release waits, or after failing to.
        self.release_waits.send_replace(waits || applied.is_err());
        applied
    }

    /// Sets `waits` when the pending release stays pending, waiting for something.
    fn reconsider_pending(
        &self,
        now: DateTime<Utc>,
        waits: &mut bool,
    ) -> anyhow::Result<Option<Digest>> {
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
                *waits = true;
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
                    RuntimeKind::Docker | RuntimeKind::Kubernetes | RuntimeKind::Vm => format!(
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
            Some(p) if digest.is_some_and(|d| d != p.digest.to_string()) => Err(Refused(format!("the pending {version} is now {}, not the digest given: review `outpost-agent plan` again", p.digest)).into()),
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
            &Decision::new(now, Some(&pending.digest), version, "approve", who),
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
            &Decision::new(now, Some(&pending.digest), version, "reject", who).because(reason),
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
            &Decision::new(now, Some(&current.digest), version, "pin", who),
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
        let digest = positions.current.map(|c| c.digest);
        self.store.record_decision(
            &Decision::new(now, digest.as_ref(), &pinned, "unpin", who),
            Effect::Pin(None),
        )?;
        self.reconsider_locked(now)?;
        Ok(format!("unpinned {pinned}"))
    }

    /// The customer's `rollback`: the last good release becomes current again; the rollout
    /// converges to it. The release rolled back from is not offered again by rollback
    /// protection; the vendor's next sequence moves on.
    /// Leaving a release that declared resources irreversible restores their data to the
    /// snapshots taken before it, which the customer must ask for (`restore_data`): refused
    /// without, saying what would be lost.
    pub fn rollback(
        &self,
        who: &str,
        restore_data: bool,
        now: DateTime<Utc>,
    ) -> anyhow::Result<String> {
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
        let restores = self.store.irreversible_snapshots(&current.digest)?;
        let taken = describe_snapshots(&restores);
        let restoring = if taken.is_empty() {
            String::new()
        } else {
            format!(", restoring {taken}")
        };
        if !restores.is_empty() && !restore_data {
            return Err(Refused(format!(
                "{} {} declared {} irreversible: rolling back restores the data of {taken} from the snapshots taken before it; writes made since are lost. Run `outpost-agent rollback --restore-data` to roll back and restore",
                current.name,
                current.version,
                current.irreversible.join(", "),
            ))
            .into());
        }
        let message = format!(
            "{} rolled back by {who} from {} to {}{restoring}",
            current.name, current.version, good.version,
        );
        self.store.record_decision(
            &Decision::new(
                now,
                Some(&current.digest),
                &current.version,
                "rollback",
                who,
            ),
            Effect::RollBack {
                to: &good.digest,
                message: &message,
                restore_data,
            },
        )?;
        self.metrics.rollback("manual");
        self.current_changed.notify_one();
        Ok(format!(
            "rolled back to {} (from {}){restoring}; the runtime converges to it now",
            good.version, current.version,
        ))
    }
}

/// `db-0 (taken 2026-12-01T10:00:00Z)`, for each snapshot.
fn describe_snapshots(snapshots: &[crate::state::Snapshot]) -> String {
    snapshots
        .iter()
        .map(|s| format!("{}-{} (taken {})", s.resource, s.ordinal, s.taken_at))
        .collect::<Vec<_>>()
        .join(", ")
}
