//! Outpost's bundle format: the stack model a vendor writes, the signed release bundle (an OCI
//! image layout), its canonical digest, cosign-compatible signatures and the TUF-style trust
//! root, with the verification every consumer goes through.
//!
//! This crate is the format, not a transport: it has no network code and no async runtime of
//! its own (the `sigstore` dependency links tokio's runtime types but nothing here uses them).
//! All cryptography is in [`crypto`]. Untrusted bytes become domain types only through checked
//! constructors ([`stack::Stack::from_file`], [`digest::Digest::parse`],
//! [`verify::verify`] → [`verify::VerifiedBundle`]); every JSON document from outside is read
//! through [`json`], which refuses duplicate members. The format is specified in `SPEC.md`.

pub mod bundle;
pub mod crypto;
pub mod digest;
pub mod image_ref;
pub mod json;
pub mod layout;
pub mod provenance;
pub mod quantity;
pub mod release;
pub mod root;
pub mod signature;
pub mod stack;
pub mod verify;

pub use digest::Digest;
pub use layout::{Layout, Limits};
pub use release::ReleaseMetadata;
pub use verify::{ReleasePolicy, Trust, VerifiedBundle, VerifyError, verify, verify_with};
