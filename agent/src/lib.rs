//! `outpost-agent`: the customer's side of Outpost. It pulls signed release bundles from one
//! source, verifies them against the trust the customer pinned, records every decision in a
//! crash-safe store, and holds each release until the customer's approval policy lets it through.
//!
//! The pipeline, one module per stage:
//! [`source`] → verify ([`pipeline`], over `outpost_bundle_format::verify`) → approve
//! ([`approval`]) → plan ([`diff`] for the customer, [`plan`] for the runtime) → (rollout and
//! runtime: later issues), around [`state`].
//! [`daemon`] drives it; [`api`] is the customer's local interface on a unix socket.
//!
//! It is not a vendor tool (that is `outpost-signer`) and it never listens on a TCP port.

pub mod api;
pub mod approval;
pub mod config;
pub mod daemon;
pub mod diff;
pub mod pipeline;
pub mod plan;
pub mod source;
pub mod state;
