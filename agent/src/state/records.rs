//! The records the store keeps and hands out: releases (only ever made from a verified bundle),
//! rejections, events, the customer's decisions and what they change, and the positions.

use chrono::{DateTime, Utc};
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::{Digest, VerifiedBundle};
use serde::{Deserialize, Serialize};

/// A release the agent accepted (verified and recorded). Made only from a [`VerifiedBundle`]
/// ([`Release::verified`]) or read back from the store that recorded one: the private
/// `sealed` field keeps any other module from building one.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Release {
    pub digest: Digest,
    pub name: String,
    pub channel: String,
    pub version: String,
    pub sequence: u64,
    pub created: String,
    pub expires: String,
    /// The stack as stored in the bundle (JSON).
    #[serde(skip)]
    pub stack: String,
    pub origin: String,
    pub received_at: String,
    /// Stateful resources this release migrates irreversibly (its signed metadata says so).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub irreversible: Vec<String>,
    /// The images built from source, with how (from the verified provenance statements).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub built_from: Vec<BuiltFrom>,
    #[serde(skip)]
    pub(super) sealed: Sealed,
}

/// How one image of a release was built from source: a verified provenance statement, in short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltFrom {
    pub resource: String,
    /// The image, pinned by digest: the statement's subject.
    pub image: String,
    /// The build context, relative to the vendor's stack file.
    pub source: String,
    /// The digest of the source tree (SPEC.md section 5.1), which the vendor can reproduce.
    pub source_digest: String,
    pub dockerfile: String,
    /// Tools and their versions, e.g. `buildah 1.28.2`.
    pub builder: String,
}

impl BuiltFrom {
    fn of(p: &outpost_bundle_format::provenance::Provenance) -> BuiltFrom {
        BuiltFrom {
            resource: p.resource.clone(),
            image: format!("{}@{}", p.image_name, p.image_digest),
            source: p.source_path.clone(),
            source_digest: p.source_digest.to_string(),
            dockerfile: p.dockerfile.clone(),
            builder: p
                .builder_version
                .iter()
                .map(|(tool, version)| format!("{tool} {version}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Only the store can make one (so only it, and [`Release::verified`], make a [`Release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Sealed;

impl Release {
    /// The release a verified bundle is, received from `origin` at `now`.
    pub fn verified(
        bundle: &VerifiedBundle,
        origin: &str,
        now: DateTime<Utc>,
    ) -> std::result::Result<Release, serde_json::Error> {
        let metadata = bundle.metadata();
        Ok(Release {
            digest: bundle.digest(),
            name: metadata.name.clone(),
            channel: metadata.channel.clone(),
            version: metadata.version.to_string(),
            sequence: metadata.sequence,
            created: rfc3339::format(&metadata.created),
            expires: rfc3339::format(&metadata.expires),
            stack: serde_json::to_string(bundle.stack_file())?,
            origin: origin.to_string(),
            received_at: rfc3339::format(&now),
            irreversible: metadata.irreversible.clone(),
            built_from: bundle.provenance().iter().map(BuiltFrom::of).collect(),
            sealed: Sealed,
        })
    }

    /// The stored stack, checked again on the way out of the store.
    pub fn stack(
        &self,
    ) -> std::result::Result<outpost_bundle_format::stack::Stack, StoredStackError> {
        let file: outpost_bundle_format::stack::StackFile =
            serde_json::from_str(&self.stack).map_err(|e| StoredStackError(e.to_string()))?;
        outpost_bundle_format::stack::Stack::from_file(&file)
            .map_err(|e| StoredStackError(e.to_string()))
    }
}

/// A stored stack that no longer reads back (a damaged state store).
#[derive(Debug, thiserror::Error)]
#[error("stored stack: {0}")]
pub struct StoredStackError(String);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    pub digest: Option<Digest>,
    pub origin: String,
    pub check: String,
    pub reason: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at: String,
    pub kind: String,
    pub digest: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub at: String,
    /// The release decided about (none for an unpin with nothing current).
    pub digest: Option<Digest>,
    pub version: String,
    pub decision: String,
    pub who: String,
    pub reason: Option<String>,
}

/// Where the releases stand.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    pub current: Option<Release>,
    pub pending: Option<Release>,
    pub last_good: Option<Release>,
    pub waiting_for: Option<String>,
    pub pinned: Option<String>,
    pub highest_sequence: Option<u64>,
    pub last_rejection: Option<Rejection>,
    /// The release the runtime last converged to and found healthy.
    pub converged: Option<Digest>,
    /// The release last rolled back away from.
    pub rolled_back: Option<Digest>,
}

impl Decision {
    /// `decision` (approve, reject, pin, unpin) about `digest`, made `at` by `who`.
    pub fn new(
        at: DateTime<Utc>,
        digest: Option<&Digest>,
        version: &str,
        decision: &str,
        who: &str,
    ) -> Decision {
        Decision {
            at: outpost_bundle_format::release::rfc3339::format(&at),
            digest: digest.copied(),
            version: version.into(),
            decision: decision.into(),
            who: who.into(),
            reason: None,
        }
    }

    pub fn because(mut self, reason: &str) -> Decision {
        self.reason = Some(reason.into());
        self
    }
}

/// What a decision changes besides being recorded.
pub enum Effect<'a> {
    None,
    /// Set (`Some`) or clear the pin.
    Pin(Option<&'a str>),
    /// Drop the pending release the decision names.
    DropPending {
        message: &'a str,
    },
    /// Make `to` current again in place of the release the decision names; with
    /// `restore_data`, restore what it declared irreversible to the snapshots taken before it.
    RollBack {
        to: &'a Digest,
        message: &'a str,
        restore_data: bool,
    },
}
