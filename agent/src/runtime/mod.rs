//! Runtime: container engines, what runs replicas on a host. One small trait (observe, apply one
//! step, probe health, remove, usage) that the Docker Engine API runtime implements (dockerd and
//! Podman) and `fake.rs` imitates in memory. The container-engine rollout backend drives it and
//! never speaks an engine's API itself; nothing here knows the pipeline or the rollout.
//! (Kubernetes runs its own replicas: it is a rollout backend over objects, not a runtime.)

pub mod archive;
pub mod carried;
pub mod docker;
pub mod engine;
pub mod fake;

use crate::plan::{ObservedReplica, ReplicaId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The volume that holds a stateful replica's `/data`, on any engine.
pub fn volume_name(stack: &str, replica: &ReplicaId) -> String {
    format!("{}-data", replica.name(stack))
}

/// Where a replica's container sits. A stateless replace starts the new container in the
/// `Surge` slot beside the old one, and promotes it once the old one is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    Primary,
    Surge,
}

/// A replica as the runtime found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The runtime's name for it.
    pub name: String,
    pub replica: ObservedReplica,
    pub slot: Slot,
    /// The bundle digest it was created from.
    pub digest: String,
    /// Container port → the address it answers on from the agent's host.
    pub addresses: BTreeMap<u16, SocketAddr>,
    /// Why it stopped, if it did ("exited with code 1").
    pub exit: Option<String>,
}

/// Everything a runtime needs to create one replica. Built by the rollout from the release and
/// the customer's config: nothing here comes from the vendor unchecked.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSpec {
    pub stack: String,
    pub replica: ReplicaId,
    pub digest: String,
    pub config_hash: String,
    /// Pinned by digest.
    pub image: outpost_bundle_format::image_ref::ImageRef,
    pub command: Vec<String>,
    /// The vendor's environment, then links, then the customer's credentials (which win).
    pub environment: BTreeMap<String, String>,
    pub cpu: f64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: Option<u64>,
    pub ports: Vec<u16>,
    /// Named volume at /data (stateful resources with persistent storage).
    pub volume: Option<String>,
    pub gpu: Option<(String, u32)>,
    /// Customer credential files: container path → host path, mounted read-only.
    pub files: BTreeMap<String, PathBuf>,
    /// Names resolved to an address of the host (`/etc/hosts`), not on the stack's network.
    pub hosts: BTreeMap<String, std::net::IpAddr>,
}

/// One step a rollout asks of a runtime.
#[derive(Debug)]
pub enum Step<'a> {
    /// Fetch the image if needed, create and start the replica in `slot`.
    Create { spec: &'a ReplicaSpec, slot: Slot },
    /// Start a replica found stopped.
    Start {
        stack: &'a str,
        replica: &'a ReplicaId,
    },
    /// The surge replica takes the primary's place (the primary is already gone).
    Promote {
        stack: &'a str,
        replica: &'a ReplicaId,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Healthy,
    /// Nothing listens yet (still starting): waited for, up to the progress deadline.
    Starting(String),
    /// It answers, wrongly (an error status, a timeout): counts toward the failure threshold.
    Unhealthy(String),
    /// Stopped or gone: no amount of waiting helps.
    Down(String),
}

/// A replica's share of its limits, in percent.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub cpu_percent: f64,
    pub memory_percent: f64,
}

pub type RuntimeResult<T> = Result<T, RuntimeError>;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    pub message: String,
    /// The engine could not be reached or did not answer in time: worth retrying, never a
    /// reason to give up on a release.
    pub unavailable: bool,
}

impl RuntimeError {
    pub fn new(message: impl Into<String>) -> Self {
        RuntimeError {
            message: message.into(),
            unavailable: false,
        }
    }

    /// An engine that cannot list its own containers (unreachable, or answering 500 as Podman
    /// does while it recovers from a restart): the engine's trouble, never the release's.
    pub fn engine_trouble(e: engine::EngineError) -> Self {
        RuntimeError {
            message: e.to_string(),
            unavailable: true,
        }
    }

    /// `e` while doing `what`, still saying whether the engine was unreachable.
    pub fn during(what: impl std::fmt::Display, e: engine::EngineError) -> Self {
        RuntimeError {
            message: format!("{what}: {e}"),
            ..e.into()
        }
    }
}

impl From<engine::EngineError> for RuntimeError {
    fn from(e: engine::EngineError) -> Self {
        RuntimeError {
            unavailable: matches!(e, engine::EngineError::Transport { .. }),
            message: e.to_string(),
        }
    }
}

/// Progress lines (image pulls) for `status`.
pub type Notes<'a> = &'a (dyn Fn(String) + Send + Sync);

#[allow(async_fn_in_trait)]
pub trait Runtime: Send + Sync {
    /// Every replica of `stack` carrying our owner label.
    async fn observe(&self, stack: &str) -> RuntimeResult<Vec<Instance>>;

    async fn apply(&self, step: Step<'_>, notes: Notes<'_>) -> RuntimeResult<()>;

    /// Makes `images` present ahead of the replicas that need them, fetched together.
    async fn prefetch(
        &self,
        images: &[outpost_bundle_format::image_ref::ImageRef],
        notes: Notes<'_>,
    ) -> RuntimeResult<()> {
        let _ = (images, notes);
        Ok(())
    }

    /// One health observation: the HTTP check when the resource has one, else whether it runs.
    async fn probe(
        &self,
        instance: &Instance,
        check: Option<&outpost_bundle_format::stack::Probe>,
    ) -> Health;

    /// Removes a replica. Its volume is deleted only with `delete_volume` (the customer opted in).
    async fn remove(
        &self,
        stack: &str,
        replica: &ReplicaId,
        slot: Slot,
        delete_volume: bool,
    ) -> RuntimeResult<()>;

    /// A sample of the replica's CPU and memory use, for the autoscaler.
    async fn usage(&self, instance: &Instance, cpu_limit: f64) -> Option<Usage>;

    /// Stops the replica (gracefully) and copies its volume's content into `into`: a tar with
    /// entries relative to the volume, written atomically, of at most `max_bytes` content.
    /// Returns the archive's size.
    async fn snapshot(
        &self,
        stack: &str,
        replica: &ReplicaId,
        into: &std::path::Path,
        max_bytes: u64,
    ) -> RuntimeResult<u64>;

    /// Backs `replica`'s volume with the ext4 block device at `device` (a machine's attached
    /// disk): the engine mounts it at `/data`. A volume of that name on another device is made
    /// anew (it holds nothing itself); one without a device holds data and is refused.
    async fn use_device(
        &self,
        stack: &str,
        replica: &ReplicaId,
        device: &std::path::Path,
    ) -> RuntimeResult<()>;

    /// The address replicas of `stack` reach this host at (the gateway of the stack's network,
    /// made if missing): where a VM node's link listeners listen.
    async fn host_address(&self, stack: &str) -> RuntimeResult<std::net::IpAddr>;

    /// Replaces the content of `spec`'s volume with the snapshot at `from`: the volume is made
    /// anew and filled through a container that is never started. The replica must be gone.
    async fn restore(
        &self,
        spec: &ReplicaSpec,
        from: &std::path::Path,
        notes: Notes<'_>,
    ) -> RuntimeResult<()>;
}

/// The container name: `<stack>-<resource>-<ordinal>`, with `-surge` for the surge slot.
pub fn container_name(stack: &str, replica: &ReplicaId, slot: Slot) -> String {
    match slot {
        Slot::Primary => replica.name(stack),
        Slot::Surge => format!("{}-surge", replica.name(stack)),
    }
}

/// An HTTP health check against `address` (HTTP/1.1, no body read beyond the status line).
pub async fn http_check(
    address: SocketAddr,
    check: &outpost_bundle_format::stack::Probe,
) -> Health {
    use tokio::io::AsyncWriteExt;
    let timeout = std::time::Duration::from_secs(u64::from(check.timeout_seconds.max(1)));
    let mut stream =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Health::Starting(format!("{address}: {e}")),
            // Not reachable yet (port forwarding still being set up): waited for, like a refusal.
            Err(_) => return Health::Starting(format!("{address}: connect timed out")),
        };
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: outpost-agent\r\nConnection: close\r\n\r\n",
        check.method.to_uppercase(),
        check.path
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Health::Starting(format!("{address}: {e}"));
    }
    match tokio::time::timeout(timeout, read_status(&mut stream)).await {
        Ok(Ok(Some(status))) if (200..400).contains(&status) => Health::Healthy,
        Ok(Ok(Some(status))) => {
            Health::Unhealthy(format!("{} {} answered {status}", check.method, check.path))
        }
        // Closed without a byte: a port proxy (docker-proxy) with nothing listening behind it.
        Ok(Ok(None)) => Health::Starting(format!("{address}: closed without an answer")),
        Ok(Err(e)) => Health::Unhealthy(e),
        Err(_) => Health::Unhealthy(format!(
            "{} {} timed out after {}s",
            check.method, check.path, check.timeout_seconds
        )),
    }
}

/// The status code of an HTTP answer; None when the peer closed without sending anything.
async fn read_status(stream: &mut tokio::net::TcpStream) -> Result<Option<u16>, String> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = match stream.read(&mut head[read..]).await {
            Ok(n) => n,
            // A proxy resetting the connection: nothing behind it yet, like a close.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && read == 0 => 0,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 {
            break;
        }
        read += n;
    }
    if read == 0 {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| format!("not an HTTP answer: {:?}", line.trim()))
}
