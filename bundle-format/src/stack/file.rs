//! The stack file as a vendor writes it (YAML), exactly as serialized into a bundle (JSON).
//!
//! These types only describe shape; every rule lives in [`super::Stack::from_file`]. The JSON
//! Schema published for vendors is generated from them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A stack: the resources a vendor ships in one release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Outpost stack")]
pub struct StackFile {
    /// Stack name (DNS-1123 label); agents only accept bundles for the stack they expect.
    pub name: String,
    /// Cloud permissions each profile asks for, by cloud (e.g. `aws: ["s3:GetObject"]`).
    /// The customer reviews and maps every profile before a release can run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub permission_profiles: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// The stack's resources, each with its lifecycle.
    pub resources: Vec<ResourceEntry>,
}

/// One resource of the stack with its lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceEntry {
    pub lifecycle: Lifecycle,
    pub container: ContainerSpec,
}

/// `live`: updated by every release. `frozen`: provisioned once at setup, then only checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    Live,
    Frozen,
}

/// A container resource (mirrors the `alien.Container` builder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Resource name: a DNS-1123 label, unique in the stack.
    pub name: String,
    pub code: Code,
    /// CPU cores: a number, or `{min, desired}` with 0 < min <= desired.
    pub cpu: Cpu,
    /// Memory limit as a Kubernetes quantity (`512Mi`, `2Gi`).
    pub memory: String,
    /// Ports the container listens on (1-65535, no duplicates, at least one).
    pub ports: Vec<u32>,
    /// Ports reachable from outside; every other port stays internal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_endpoints: Vec<PublicEndpoint>,
    /// A fixed replica count (exclusive with autoscaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Autoscaling lower bound (with `maxReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    /// Autoscaling upper bound (with `minReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    /// Full autoscaling settings (exclusive with `replicas` and `minReplicas`/`maxReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_scale: Option<AutoScale>,
    /// Stable identity and ordinals; implied by `persistentStorage` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful: Option<bool>,
    /// Size of the persistent volume mounted at `/data`; implies `stateful: true` (an explicit
    /// `stateful: false` with it is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_storage: Option<String>,
    /// Size of scratch space, as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Names of other resources of this stack this container talks to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
    /// The permission profile (declared in `permissionProfiles`) this container runs with.
    pub permissions: String,
    /// The capacity pool to run in; the customer maps pools to machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Command and arguments, replacing the image's default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// Where a container's code comes from: `{image: REF}` (or, as Alien's builder spells it,
/// `{type: image, image: REF}`), or `{type: source, src: DIR, ...}`: a build context that
/// `outpost-signer build` builds into an image. A bundle's stack only ever holds `{image: REF}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Code {
    /// `image` (the default) or `source`. Writers leave it out of a bundle's stack layer, which
    /// readers of format version 1 take without it.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CodeKind>,
    /// Image reference (`type: image`); pinned by digest in a built bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `type: source`: the build context, a directory relative to the stack file's own, inside
    /// its directory tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// `type: source`: the Dockerfile (Containerfile), relative to `src`. Default `Dockerfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// `type: source`: the build stage to stop at (a multi-stage Dockerfile's `FROM … AS name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `type: source`: build arguments (`ARG`), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// `type: source`: platforms to build for (`linux/amd64`, `linux/arm64/v8`); default the
    /// builder's own. More than one gives a multi-platform image (an OCI index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
}

impl Code {
    /// `{image: REF}`: the form a bundle stores.
    pub fn image(reference: impl Into<String>) -> Code {
        Code {
            image: Some(reference.into()),
            ..Code::default()
        }
    }

    pub fn is_source(&self) -> bool {
        self.kind == Some(CodeKind::Source)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeKind {
    /// An existing image, by reference.
    Image,
    /// A build context that `outpost-signer build` builds into an image.
    Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Cpu {
    Cores(f64),
    Range(CpuRange),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuRange {
    pub min: f64,
    pub desired: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublicEndpoint {
    pub name: String,
    pub port: u32,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoScale {
    pub min: u32,
    pub desired: u32,
    pub max: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpu_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_memory_percent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// GPU model, e.g. `nvidia-l4`.
    #[serde(rename = "type")]
    pub kind: String,
    /// 1 to 8.
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// HTTP path, starting with `/`.
    pub path: String,
    /// A declared port.
    pub port: u32,
    /// HTTP method (default GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// 1 to 5 seconds (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    /// Consecutive failures before unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}
