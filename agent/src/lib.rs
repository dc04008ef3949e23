//! `outpost-agent`: the customer's side of Outpost. It pulls signed release bundles from one
//! source, verifies them against the trust the customer pinned, records every decision in a
//! crash-safe store, holds each release until the customer's approval policy lets it through, and
//! converges what runs (a container engine on the host, a Kubernetes namespace, or VM pools in
//! the customer's cloud with a node agent on each machine) to it.
//!
//! The pipeline, one module per stage, each importing only the stages below it:
//! [`source`] → verify and approve ([`pipeline`], over `outpost_bundle_format::verify`, with
//! [`approval`]) → plan ([`diff`] for the customer, [`plan`] for the runtime) → [`rollout`]
//! (one backend per kind of runtime) → [`runtime`] (container engines), around [`state`].
//! [`daemon`] drives it ([`memory`] keeps it small between jobs); [`api`] is the customer's local interface on a unix socket, [`status`]
//! what it shows. `ARCHITECTURE.md` has the tree and how to check the import order.
//!
//! It is not a vendor tool (that is `outpost-signer`). It opens TCP ports only for the stack's
//! public endpoints ([`forward`]) and, if asked, `/metrics`, on addresses the customer configured.

pub mod api;
pub mod approval;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod diff;
pub mod forward;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod rollout;
pub mod runtime;
pub mod source;
pub mod state;
pub mod status;
#[cfg(test)]
mod testing;
