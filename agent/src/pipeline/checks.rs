//! Verify, the agent's part: the format's checks with the trust this agent pinned (rotated
//! through the roots accepted bundles carried), its expected stack and channel, and its rollback
//! floor, in the format's order (`ReleasePolicy`).

use super::{Agent, Rejection};
use crate::config::Config;
use chrono::{DateTime, Utc};
use outpost_bundle_format::crypto::PublicKey;
use outpost_bundle_format::layout::Layout;
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::root::TrustRoot;
use outpost_bundle_format::verify::{ReleasePolicy, VerifyError};
use outpost_bundle_format::{Digest, ReleaseMetadata, Trust, VerifiedBundle, bundle, verify_with};

/// The stateful checks (wrong software, rollback) in the format's order.
pub(super) struct AgentChecks<'a> {
    name: &'a str,
    channel: &'a str,
    highest: Option<u64>,
    /// The current and pending digests: seeing them again is a no-op, not a rollback.
    known: Vec<Digest>,
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
        if self.known.contains(&digest) {
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

pub(super) enum Examined {
    Verified(Box<VerifiedBundle>),
    Unchanged(Digest),
    Rejected(Rejection),
}

impl Agent {
    /// The pinned root advanced through the chain saved from accepted bundles (`roots/`).
    pub(super) fn rotated_trust(pinned: &Trust, state_dir: &std::path::Path) -> Trust {
        let Trust::Root(root) = pinned else {
            return pinned.clone();
        };
        let mut root = root.clone();
        let mut version = root.version() + 1;
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
    pub(super) fn save_rotation(&self, verified: &VerifiedBundle) -> anyhow::Result<()> {
        let old = match &*self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Trust::Root(old) => old.version(),
            Trust::Keys { .. } => return Ok(()),
        };
        let Some(new_root) = verified.root().filter(|r| r.version() > old) else {
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
        self.store.set_root_version(new_root.version())?;
        *self
            .trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Trust::Root(new_root.clone());
        Ok(())
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

    /// The checks, in the format's order, with this agent's trust, expectations and rollback floor.
    pub(super) fn examine(
        &self,
        layout: &Layout,
        origin: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Examined> {
        let positions = self.store.positions()?;
        let digest = bundle::bundle_descriptor(layout).map(|d| d.digest).ok();
        // "Unchanged" is decided after full verification: an index merely naming the current
        // digest proves nothing.
        // The release last rolled back from is known too: a source still offering it is not
        // replaying an old release at us.
        let known: Vec<Digest> = [&positions.current, &positions.pending]
            .into_iter()
            .flatten()
            .map(|r| r.digest)
            .chain(positions.rolled_back)
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
                Ok(verified) if known.contains(&verified.digest()) => {
                    Examined::Unchanged(verified.digest())
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
}
