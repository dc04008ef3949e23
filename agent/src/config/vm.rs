//! The `vm:` section: Managed VM pools in the customer's cloud account (`runtime: vm`). The
//! agent keeps one machine group per capacity pool and runs the replicas on the machines
//! through a node agent on each; what is cloud-specific is under `aws:`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The pool of resources that name no `pool:`.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The cloud the machines run in: `aws`.
    pub provider: CloudProvider,
    /// Amazon Web Services: the region and, for tests or VPC endpoints, the API endpoint.
    /// Credentials come from the SDK's default chain (instance profile, IRSA, environment).
    #[serde(default)]
    pub aws: Option<AwsConfig>,
    /// How the machines' node agents reach this agent.
    pub nodes: NodesConfig,
    /// Machine settings per capacity pool of the stack; resources without a `pool` go to
    /// `default`.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Delete a stateful replica's volume when its resource is pruned or scaled away. Off by
    /// default: volumes outlive updates, rollbacks, prunes and machine replacements.
    #[serde(default)]
    pub delete_volumes: bool,
    /// The load balancers of public endpoints (an application load balancer per http
    /// endpoint, a network load balancer per tcp one).
    #[serde(default)]
    pub load_balancers: LoadBalancersConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancersConfig {
    /// `internet-facing` (default) or `internal`.
    #[serde(default)]
    pub scheme: BalancerScheme,
    /// Subnets the load balancers sit in (public ones for `internet-facing`); absent: the
    /// subnets of the endpoint's pool.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Security groups of the load balancers; absent: those of the endpoint's pool.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// A certificate (ACM ARN) for http endpoints: they then listen for HTTPS on 443 instead
    /// of HTTP on 80.
    #[serde(default)]
    pub certificate_arn: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerScheme {
    #[default]
    InternetFacing,
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudProvider {
    Aws,
}

impl CloudProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            CloudProvider::Aws => "aws",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub region: String,
    /// The endpoint of every AWS API the agent calls (moto in tests, a VPC endpoint); absent:
    /// the SDK's default endpoints.
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    /// Where this agent listens for its node agents (`0.0.0.0:7480`).
    pub listen: SocketAddr,
    /// The URL machines reach that listener at (`http://10.0.1.5:7480`): written into their
    /// user data.
    pub advertise: String,
    /// A file holding the bootstrap secret machines present once to join (created, 32 random
    /// bytes as hex, when absent).
    pub bootstrap_secret_file: PathBuf,
    /// Seconds a node may go without reporting before its machine counts as unhealthy
    /// (default 60).
    #[serde(default = "default_node_timeout")]
    pub report_timeout_seconds: u64,
    /// Seconds a machine may take from launch to its node joining before it is replaced
    /// (default 600: a bad image, no container engine, no route to the agent).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_seconds: u64,
}

/// The machines of one capacity pool.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The cloud's machine type (`m6i.large`).
    pub instance_type: String,
    /// The machine image: an AMI id, or `resolve:ssm:PARAMETER` for a public parameter.
    pub image: String,
    /// Subnets machines are placed in (their zones are the pool's zones).
    pub subnets: Vec<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The instance profile machines run as (name or ARN); absent: none.
    #[serde(default)]
    pub instance_profile: Option<String>,
    #[serde(default)]
    pub min_machines: u32,
    pub max_machines: u32,
    /// Root disk size in GiB (default 30).
    #[serde(default = "default_disk_gib")]
    pub disk_gib: u32,
    /// Tags put on everything made for this pool, beside the agent's own `outpost:*` tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The GPUs each machine of this instance type has, by the stack's `gpu.type`.
    #[serde(default)]
    pub gpus: BTreeMap<String, u32>,
    /// What a machine keeps for itself (its engine and node agent) before replicas: cpu
    /// (default 0.25) and memory in MiB (default 256).
    #[serde(default)]
    pub reserved: Reserved,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reserved {
    #[serde(default = "default_reserved_cpu")]
    pub cpu: f64,
    #[serde(default = "default_reserved_memory")]
    pub memory_mib: u64,
}

impl Default for Reserved {
    fn default() -> Self {
        Reserved {
            cpu: default_reserved_cpu(),
            memory_mib: default_reserved_memory(),
        }
    }
}

fn default_node_timeout() -> u64 {
    60
}
fn default_boot_timeout() -> u64 {
    600
}
fn default_disk_gib() -> u32 {
    30
}
fn default_reserved_cpu() -> f64 {
    0.25
}
fn default_reserved_memory() -> u64 {
    256
}

impl VmConfig {
    /// The settings' own rules; `pools` of the stack are checked against them at rollout.
    pub(super) fn check(&self) -> Result<(), String> {
        match self.provider {
            CloudProvider::Aws => {
                let Some(aws) = &self.aws else {
                    return Err("vm.aws is not set: provider aws needs at least {region: …}".into());
                };
                if aws.region.is_empty() {
                    return Err("vm.aws.region must not be empty".into());
                }
            }
        }
        // Written into the machines' user data (a shell script): a plain http URL only.
        let advertise = &self.nodes.advertise;
        let plain = advertise
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:/[]".contains(c));
        if !advertise.starts_with("http://") || !plain {
            return Err(format!(
                "vm.nodes.advertise {advertise:?} must be a URL machines can reach (http://ADDRESS:PORT)"
            ));
        }
        if self.nodes.report_timeout_seconds == 0 || self.nodes.boot_timeout_seconds == 0 {
            return Err(
                "vm.nodes.report_timeout_seconds and boot_timeout_seconds must be at least 1"
                    .into(),
            );
        }
        if self.pools.is_empty() {
            return Err(format!(
                "vm.pools is empty: name at least the {DEFAULT_POOL:?} pool's machines"
            ));
        }
        for (name, pool) in &self.pools {
            let at = format!("vm.pools.{name}");
            if !outpost_bundle_format::stack::is_dns_label(name) {
                return Err(format!("{at}: a pool name is a DNS-1123 label"));
            }
            for (what, value) in [
                ("instance_type", &pool.instance_type),
                ("image", &pool.image),
            ] {
                if value.is_empty() {
                    return Err(format!("{at}.{what} must not be empty"));
                }
            }
            if pool.subnets.is_empty() {
                return Err(format!("{at}.subnets: name at least one subnet"));
            }
            if pool.max_machines == 0 || pool.min_machines > pool.max_machines {
                return Err(format!(
                    "{at}: min_machines {} and max_machines {} must satisfy 0 <= min <= max, max >= 1",
                    pool.min_machines, pool.max_machines
                ));
            }
            if pool.disk_gib < 8 {
                return Err(format!("{at}.disk_gib must be at least 8"));
            }
            if !(pool.reserved.cpu.is_finite() && pool.reserved.cpu >= 0.0) {
                return Err(format!("{at}.reserved.cpu must be a number of cores >= 0"));
            }
            for key in pool.tags.keys() {
                if key.starts_with("outpost:") {
                    return Err(format!(
                        "{at}.tags.{key}: tags starting with outpost: are the agent's own"
                    ));
                }
            }
        }
        Ok(())
    }
}
