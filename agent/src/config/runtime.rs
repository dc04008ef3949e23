//! The runtime sections of the configuration (`docker:`, `kubernetes:`) and what the customer
//! grants permission profiles (`permissions:`). Each section is accepted only with its runtime.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine's API socket (default /var/run/docker.sock; Podman: its service socket).
    #[serde(default = "default_docker_socket")]
    pub socket: PathBuf,
    /// The per-stack network `outpost-<stack>` (resources find each other by name on it).
    #[serde(default)]
    pub network: NetworkConfig,
    /// Where public endpoints are served on the host.
    #[serde(default)]
    pub publish: PublishConfig,
    /// Credentials for pulling images, by registry host (`ghcr.io`, `127.0.0.1:5000`).
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryCredentials>,
    /// Delete a stateful replica's volume when the replica is pruned or scaled away. Off by
    /// default: data outlives updates, rollbacks and prunes unless the customer opts in here.
    #[serde(default)]
    pub delete_volumes: bool,
    /// The GPUs this host has, by type, as the stack's `gpu.type` names them (`{a100: 2}`).
    #[serde(default)]
    pub gpus: BTreeMap<String, u32>,
    /// Seconds between SIGTERM and SIGKILL when a replica stops (default 10).
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_seconds: u32,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: default_docker_socket(),
            network: NetworkConfig::default(),
            publish: PublishConfig::default(),
            registries: BTreeMap::new(),
            delete_volumes: false,
            gpus: BTreeMap::new(),
            stop_timeout_seconds: default_stop_timeout(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The network's subnet (`10.213.0.0/24`); the engine picks one when absent.
    pub subnet: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// The host address public endpoints listen on (default 127.0.0.1; 0.0.0.0 for all).
    #[serde(default = "default_publish_address")]
    pub address: std::net::IpAddr,
    /// Host port per endpoint name; an endpoint not listed listens on its container port.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

impl PublishConfig {
    /// The host port the endpoint `name` (on `container_port`) listens on.
    pub fn port(&self, name: &str, container_port: u16) -> u16 {
        self.ports.get(name).copied().unwrap_or(container_port)
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            address: default_publish_address(),
            ports: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    /// A file holding the password or token.
    pub password_file: PathBuf,
}

/// What the customer grants a permission profile: credentials handed to the containers that
/// ask for it, never anything the vendor supplied. Docker uses `environment` and `files`;
/// Kubernetes runs the pods as `service_account`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Environment variables set in the container (they override the vendor's).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Host files mounted read-only: container path → host path.
    #[serde(default)]
    pub files: BTreeMap<String, PathBuf>,
    /// The ServiceAccount (the customer's, with its workload-identity annotations) pods of
    /// this profile run as on Kubernetes.
    #[serde(default)]
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The one namespace everything is applied to (default `outpost`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// StorageClass of the volume claims for `persistentStorage` (the cluster's default when
    /// absent).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// IngressClass of the Ingresses for http public endpoints.
    #[serde(default)]
    pub ingress_class: Option<String>,
    /// Host name per http endpoint name (`{web: shop.example.com}`).
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Node placement per capacity pool name.
    #[serde(default)]
    pub pools: BTreeMap<String, Placement>,
    /// Node placement per GPU type.
    #[serde(default)]
    pub gpus: BTreeMap<String, Placement>,
    /// A kubeconfig file to reach the cluster with; absent: the pod's ServiceAccount
    /// (in-cluster), else `$KUBECONFIG` or `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Delete the PersistentVolumeClaims of a pruned stateful resource. Off: data is kept.
    #[serde(default)]
    pub delete_volumes: bool,
    /// VolumeSnapshotClass of the snapshots taken of claims before a release changes their
    /// resource (the cluster's default class when absent).
    #[serde(default)]
    pub volume_snapshot_class: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            delete_volumes: false,
            volume_snapshot_class: None,
            namespace: default_namespace(),
            storage_class: None,
            ingress_class: None,
            hosts: BTreeMap::new(),
            pools: BTreeMap::new(),
            gpus: BTreeMap::new(),
        }
    }
}

/// Where pods may run: node labels to match and taints to tolerate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    pub key: String,
    /// `Equal` (default) or `Exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

fn default_namespace() -> String {
    "outpost".into()
}
fn default_docker_socket() -> PathBuf {
    PathBuf::from("/var/run/docker.sock")
}
fn default_stop_timeout() -> u32 {
    10
}
fn default_publish_address() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

/// The customer's grant for each permission profile a bundle may request, by profile name.
/// Kept as written and checked at load for the configured runtime (unknown keys refused; `files`
/// only with docker, `service_account` only with kubernetes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(transparent)]
pub struct Permissions(pub BTreeMap<String, serde_json::Value>);

impl Permissions {
    /// The customer's grant for `profile`.
    pub fn grant(&self, profile: &str) -> Result<Grant, String> {
        let Some(grant) = self.0.get(profile) else {
            return Err(format!("permission profile {profile:?} is not granted"));
        };
        let grant: Grant = serde_json::from_value(grant.clone()).map_err(|e| {
            format!("permissions.{profile}: {e} (a grant is {{environment: {{}}, files: {{}}, service_account: NAME}})")
        })?;
        for source in grant.files.values() {
            if source.is_relative() {
                return Err(format!(
                    "permissions.{profile}.files: host path {} must be absolute",
                    source.display()
                ));
            }
        }
        Ok(grant)
    }

    pub fn profiles(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub fn contains(&self, profile: &str) -> bool {
        self.0.contains_key(profile)
    }
}

/// Snapshots of stateful replicas' data, taken before a release changes them (`snapshots:`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// The most snapshots kept of each replica's data (default 3); the oldest beyond go first,
    /// never one that rolling back from the current release needs. 0: take none.
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// The most space all snapshots may take together, in GiB (default 20): the oldest go first
    /// (never one a rollback needs), and a volume larger than this is not snapshotted but
    /// refused, its release rolled back.
    #[serde(default = "default_max_gib")]
    pub max_gib: f64,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        SnapshotsConfig {
            keep: default_keep(),
            max_gib: default_max_gib(),
        }
    }
}

impl SnapshotsConfig {
    pub fn max_bytes(&self) -> u64 {
        (self.max_gib * f64::from(1u32 << 30)) as u64
    }

    pub(super) fn check(&self) -> Result<(), String> {
        if !(self.max_gib.is_finite() && self.max_gib > 0.0) {
            return Err(format!(
                "snapshots.max_gib must be a positive number of GiB, not {}",
                self.max_gib
            ));
        }
        Ok(())
    }
}

fn default_keep() -> u32 {
    3
}

fn default_max_gib() -> f64 {
    20.0
}
