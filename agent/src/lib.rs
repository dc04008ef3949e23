//! `outpost-agent`: the customer's side of Outpost. It pulls signed release bundles from one
//! source, verifies them against the trust the customer pinned, records every decision in a
//! crash-safe store, holds each release until the customer's approval policy lets it through, and
//! converges what runs on the host to it.
//!
//! The pipeline, one module per stage:
//! [`source`] → verify ([`pipeline`], over `outpost_bundle_format::verify`) → approve
//! ([`approval`]) → plan ([`diff`] for the customer, [`plan`] for the runtime) → [`rollout`] →
//! [`runtime`], around [`state`].
//! [`daemon`] drives it; [`api`] is the customer's local interface on a unix socket.
//!
//! It is not a vendor tool (that is `outpost-signer`). It opens TCP ports only for the stack's
//! public endpoints ([`forward`]), on the address the customer configured.

pub mod api;
pub mod approval;
pub mod config;
pub mod daemon;
pub mod diff;
pub mod forward;
pub mod pipeline;
pub mod plan;
pub mod render;
pub mod rollout;
pub mod runtime;
pub mod source;
pub mod state;
#[cfg(test)]
mod testing;
