//! Verification of a bundle against the customer's trust: the only way to get a
//! [`VerifiedBundle`]. Checks run in a fixed order, each failing with its own named error:
//!
//! 1. size limits and every blob's digest (while reading the layout)
//! 2. bundle structure and the descriptor sizes
//! 3. trust root: a pinned root must meet its own threshold; roots carried in the bundle
//!    rotate it one version at a time (threshold of old and new keys); the result must not
//!    be expired
//! 4. signatures: distinct trusted keys whose signature is valid over a payload that names this
//!    bundle's digest, at least the threshold
//! 5. release metadata and stack are well-formed, names agree
//! 6. the release has not expired
//! 7. every image is pinned by digest
//!
//! Checks that need the agent's state plug in through [`ReleasePolicy`], at the places the
//! agent's order requires: expected name and channel after the signatures (wrong software),
//! the rollback counter after the expiry check (rollback).

use crate::bundle::{self, BundleParts};
use crate::crypto::PublicKey;
use crate::digest::Digest;
use crate::layout::{Layout, LayoutError, Limits};
use crate::provenance::{self, Provenance};
use crate::release::{ReleaseMetadata, rfc3339};
use crate::root::TrustRoot;
use crate::signature;
use crate::stack::{Stack, StackFile};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;

/// What the customer trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Raw keys with a threshold (no rotation).
    Keys {
        keys: Vec<PublicKey>,
        threshold: usize,
    },
    /// A pinned TUF-style root; bundles may carry its successors.
    Root(TrustRoot),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Root(String),
    #[error("no signatures for {0}")]
    Unsigned(Digest),
    #[error(
        "the signature was made for {claimed}, not for this bundle {actual} (moved from another bundle?)"
    )]
    SignatureMismatch { claimed: Digest, actual: Digest },
    #[error("no valid signature from a trusted key ({found} signature(s) present)")]
    UntrustedSignature { found: usize },
    #[error("{valid} valid signature(s) from trusted keys, {threshold} required")]
    ThresholdUnmet { valid: usize, threshold: usize },
    #[error("{0}")]
    Metadata(String),
    #[error("stack {0}")]
    Stack(String),
    #[error("the release expired at {expires} (freeze protection)")]
    Expired { expires: String },
    #[error("{0}")]
    Provenance(String),
    #[error("resource {resource}: image {image} is not pinned by digest")]
    UnpinnedImage { resource: String, image: String },
    /// A check of the caller's [`ReleasePolicy`].
    #[error("{message}")]
    Policy {
        check: &'static str,
        message: String,
    },
}

/// Stateful checks supplied by the caller (the agent), run in the format's order.
pub trait ReleasePolicy {
    /// After the signatures: is this the software we expect? (wrong software)
    fn check_identity(&self, metadata: &ReleaseMetadata) -> Result<(), VerifyError>;
    /// After the expiry check: is the sequence acceptable? (rollback)
    fn check_sequence(&self, metadata: &ReleaseMetadata, digest: Digest)
    -> Result<(), VerifyError>;
}

/// No stateful checks (the vendor's `verify`).
pub struct NoPolicy;

impl ReleasePolicy for NoPolicy {
    fn check_identity(&self, _: &ReleaseMetadata) -> Result<(), VerifyError> {
        Ok(())
    }
    fn check_sequence(&self, _: &ReleaseMetadata, _: Digest) -> Result<(), VerifyError> {
        Ok(())
    }
}

impl VerifyError {
    /// The short, stable name of the failed check (used in CLI output, rejections and metrics).
    pub fn check(&self) -> &'static str {
        match self {
            VerifyError::Layout(e) => e.check(),
            VerifyError::Root(_) => "trust-root",
            VerifyError::Unsigned(_) => "unsigned",
            VerifyError::SignatureMismatch { .. } => "signature-mismatch",
            VerifyError::UntrustedSignature { .. } => "untrusted-signature",
            VerifyError::ThresholdUnmet { .. } => "threshold-unmet",
            VerifyError::Metadata(_) => "metadata",
            VerifyError::Stack(_) => "invalid-stack",
            VerifyError::Expired { .. } => "expired",
            VerifyError::UnpinnedImage { .. } => "unpinned-image",
            VerifyError::Provenance(_) => "provenance",
            VerifyError::Policy { check, .. } => check,
        }
    }
}

/// A bundle that passed every check. Fields are read-only; it is only built by [`verify`].
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    digest: Digest,
    metadata: ReleaseMetadata,
    stack_file: StackFile,
    stack: Stack,
    signers: Vec<String>,
    root: Option<TrustRoot>,
    carried_roots: Vec<Vec<u8>>,
    provenance: Vec<Provenance>,
}

impl VerifiedBundle {
    pub fn digest(&self) -> Digest {
        self.digest
    }
    pub fn metadata(&self) -> &ReleaseMetadata {
        &self.metadata
    }
    pub fn stack(&self) -> &Stack {
        &self.stack
    }
    pub fn stack_file(&self) -> &StackFile {
        &self.stack_file
    }
    /// Key ids whose signatures counted.
    pub fn signers(&self) -> &[String] {
        &self.signers
    }
    /// The trust root after applying the rotations the bundle carried (None with raw keys).
    pub fn root(&self) -> Option<&TrustRoot> {
        self.root.as_ref()
    }
    /// The raw `root.json` documents this verification rotated through, in version order: the
    /// verified links of the chain, for an agent to persist so it can replay the rotation.
    /// Carried roots not newer than the trust it started from are not among them (they were
    /// not verified), and with raw keys there are none.
    pub fn carried_roots(&self) -> &[Vec<u8>] {
        &self.carried_roots
    }
    /// How each image built from source was built, each statement checked against the stack.
    pub fn provenance(&self) -> &[Provenance] {
        &self.provenance
    }
}

pub fn verify(
    layout: &Layout,
    trust: &Trust,
    now: DateTime<Utc>,
    limits: &Limits,
) -> Result<VerifiedBundle, VerifyError> {
    verify_with(layout, trust, now, limits, &NoPolicy)
}

/// [`verify`] with the caller's stateful checks.
pub fn verify_with(
    layout: &Layout,
    trust: &Trust,
    now: DateTime<Utc>,
    limits: &Limits,
    policy: &dyn ReleasePolicy,
) -> Result<VerifiedBundle, VerifyError> {
    layout.reachable(limits)?;
    let parts = bundle::read_parts(layout, limits)?;
    verify_parts(&parts, trust, now, policy)
}

/// The checks after reading, on parts whose blob digests are already verified.
pub fn verify_parts(
    parts: &BundleParts,
    trust: &Trust,
    now: DateTime<Utc>,
    policy: &dyn ReleasePolicy,
) -> Result<VerifiedBundle, VerifyError> {
    let (keys, threshold, root, carried_roots) = match trust {
        Trust::Keys { keys, threshold } => {
            let distinct: BTreeSet<String> = keys.iter().map(PublicKey::key_id).collect();
            if distinct.len() != keys.len() {
                return Err(VerifyError::Root(
                    "the same key is trusted twice (a key counts once, in any encoding)".into(),
                ));
            }
            (keys.clone(), *threshold, None, Vec::new())
        }
        Trust::Root(pinned) => {
            let (root, applied) = pinned
                .rotate_through(&parts.roots)
                .map_err(|e| VerifyError::Root(e.0))?;
            if root.is_expired(now) {
                return Err(VerifyError::Root(format!(
                    "root v{} expired at {}",
                    root.version(),
                    rfc3339::format(&root.expires())
                )));
            }
            (
                root.keys().cloned().collect(),
                root.threshold(),
                Some(root),
                applied,
            )
        }
    };
    if threshold == 0 || threshold > keys.len() {
        return Err(VerifyError::Root(format!(
            "threshold {threshold} cannot be met by {} key(s)",
            keys.len()
        )));
    }
    let signers = check_signatures(parts, &keys, threshold)?;

    let metadata = bundle::parse_metadata(&parts.metadata_bytes).map_err(VerifyError::Metadata)?;
    let (stack_file, stack) =
        bundle::parse_stack(&parts.stack_bytes).map_err(VerifyError::Stack)?;
    metadata
        .check_against(&stack)
        .map_err(VerifyError::Metadata)?;
    policy.check_identity(&metadata)?;
    if now >= metadata.expires {
        return Err(VerifyError::Expired {
            expires: rfc3339::format(&metadata.expires),
        });
    }
    policy.check_sequence(&metadata, parts.digest)?;
    if let Some((resource, image)) = stack.unpinned_images().first() {
        return Err(VerifyError::UnpinnedImage {
            resource: resource.to_string(),
            image: image.to_string(),
        });
    }
    let provenance =
        provenance::check_statements(&parts.statements, &stack).map_err(VerifyError::Provenance)?;
    Ok(VerifiedBundle {
        provenance,
        digest: parts.digest,
        metadata,
        stack_file,
        stack,
        signers,
        carried_roots,
        root,
    })
}

fn check_signatures(
    parts: &BundleParts,
    keys: &[PublicKey],
    threshold: usize,
) -> Result<Vec<String>, VerifyError> {
    if parts.signatures.is_empty() {
        return Err(VerifyError::Unsigned(parts.digest));
    }
    let mut signers = BTreeSet::new();
    let mut mismatch = None;
    for (payload, layer) in &parts.signatures {
        let Some(sig) = signature::layer_signature(layer) else {
            continue;
        };
        let Some(key) = signature::signing_key(keys, payload, &sig) else {
            continue;
        };
        match signature::payload_digest(payload) {
            Ok(claimed) if claimed == parts.digest => {
                signers.insert(key.key_id());
            }
            Ok(claimed) => mismatch = Some(claimed),
            Err(_) => {}
        }
    }
    if signers.len() >= threshold {
        return Ok(signers.into_iter().collect());
    }
    if signers.is_empty() {
        if let Some(claimed) = mismatch {
            return Err(VerifyError::SignatureMismatch {
                claimed,
                actual: parts.digest,
            });
        }
        return Err(VerifyError::UntrustedSignature {
            found: parts.signatures.len(),
        });
    }
    Err(VerifyError::ThresholdUnmet {
        valid: signers.len(),
        threshold,
    })
}
