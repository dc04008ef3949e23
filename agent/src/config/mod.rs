//! The agent's configuration file (YAML, strict: unknown keys are errors). Its doc comments are
//! the user documentation; `outpost-agent config-schema` prints the JSON Schema generated from it.

mod clock;
mod rollout;
mod runtime;
mod vm;
mod window;
mod zone;

pub use clock::now;
pub use rollout::{Budget, RolloutConfig};
pub use runtime::*;
pub use vm::*;
pub use window::Window;

use chrono::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "outpost-agent configuration")]
pub struct Config {
    /// Where bundles come from.
    pub source: SourceConfig,
    /// What the agent trusts: a pinned root.json, or keys with a threshold.
    pub trust: TrustConfig,
    /// The only stack and channel this agent accepts (anything else is wrong software).
    pub expect: Expect,
    #[serde(default)]
    pub approval: ApprovalConfig,
    /// The customer's grant for each permission profile a bundle may request, by profile name.
    /// With `runtime: none`, an empty grant `{}` approves the profile.
    #[serde(default)]
    pub permissions: Permissions,
    /// Directory for the state database, downloads and processed bundles.
    pub state_dir: PathBuf,
    pub api: ApiConfig,
    /// What runs approved releases. `none`: accept and record only (a dry run to review);
    /// `docker`: containers on the host's Docker Engine API (dockerd or `podman system service`);
    /// `kubernetes`: objects in a namespace; `vm`: machine pools in the customer's cloud.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// The Docker runtime's settings (with `runtime: docker`).
    #[serde(default)]
    pub docker: DockerConfig,
    /// Where and how releases map onto Kubernetes (`outpost-agent render`).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Managed VM pools in the customer's cloud account (with `runtime: vm`).
    #[serde(default)]
    pub vm: Option<VmConfig>,
    /// How releases roll out and how drift is repaired.
    #[serde(default)]
    pub rollout: RolloutConfig,
    /// Snapshots of stateful data before a release changes it, and how many are kept.
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
    /// The capacity pools this host offers; a resource naming a `pool` must name one of them.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Size limits for downloads and extraction.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What the agent logs, and how.
    #[serde(default)]
    pub log: LogConfig,
}

/// Logging: `RUST_LOG`, when set, overrides `level` with its own filter directives.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// The least severe level written (default `info`).
    #[serde(default)]
    pub level: LogLevel,
    /// `text` (one line per event, without the time under systemd, whose journal stamps it) or
    /// `json` (one object per line with `timestamp`, `level`, `message` and the release's
    /// `digest` on lines about a release).
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory watched for bundle files (file drop, USB sticks). Files must be complete when
    /// they appear: written elsewhere (or under a dot-name) and renamed into place.
    Dir { path: PathBuf },
    /// An OCI registry tag, polled with one conditional request per interval.
    Oci(OciSource),
    /// A git repository: one ref, the bundle (layout tar or directory) at a path.
    Git(GitSource),
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OciSource {
    /// `HOST[:PORT]/REPOSITORY:TAG` (an `oci://` prefix is allowed).
    pub reference: String,
    /// Poll interval, e.g. `30s`, `5m` (default 60s).
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Docker config file with credentials (default ~/.docker/config.json).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Basic-auth user (with `password_file`); takes precedence over the docker config.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Use plain HTTP (always so for loopback registries).
    #[serde(default)]
    pub plain_http: bool,
    /// A download that brings less than 1 KiB in this long, or an answer that does not start,
    /// is cut off and retried (default 30s).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// `https://`, `http://`, `git://` or `file://` URL.
    pub url: String,
    /// Branch, tag or full ref to follow (default `main`).
    #[serde(default = "default_ref", rename = "ref")]
    pub reference: String,
    /// Path of the bundle in the repository: a layout tar file or a layout directory.
    pub path: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    /// HTTPS basic auth user (with `password_file`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A fetch heard nothing of for this long (no pack data line, which holds up to 64 KiB) is
    /// reported as stalled and waited for, never run twice at once (default 30s).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: String,
}

/// Either `root: PATH` (a pinned TUF-style root.json; bundles may carry its successors) or
/// `keys: [PATH...]` with `threshold: K` (no rotation).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    #[serde(default)]
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// Signatures required from distinct keys (default 1).
    #[serde(default)]
    pub threshold: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Stack name.
    pub name: String,
    #[serde(default = "default_channel")]
    pub channel: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    #[default]
    Auto,
    Manual,
}

/// Semver change between the current and the pending release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// No current release yet.
    Initial,
    Major,
    Minor,
    Patch,
    /// Same version number, other pre-release or build.
    Other,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Initial => "initial",
            Change::Major => "major",
            Change::Minor => "minor",
            Change::Patch => "patch",
            Change::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Default for changes no rule names.
    #[serde(default)]
    pub mode: ApprovalMode,
    /// Per semver change, e.g. `[{change: patch, mode: auto}, {change: major, mode: manual}]`.
    #[serde(default)]
    pub rules: Vec<ApprovalRule>,
    /// When approved releases may be applied. Empty: any time.
    #[serde(default)]
    pub maintenance_windows: Vec<MaintenanceWindow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    pub change: Change,
    pub mode: ApprovalMode,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// Five-field cron expression for the window's start, e.g. `0 2 * * SAT`.
    pub cron: String,
    /// How long the window stays open, e.g. `2h`.
    pub duration: String,
    /// IANA time zone of the cron expression (default UTC).
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The unix socket the customer's CLI talks to.
    pub socket: PathBuf,
    /// Where to serve `GET /metrics` and `GET /healthz` over plain TCP (`0.0.0.0:9090`), for
    /// Prometheus and kubelet probes. Nothing else is served there. Off by default.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    #[default]
    None,
    Docker,
    Kubernetes,
    Vm,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::None => "none",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Kubernetes => "kubernetes",
            RuntimeKind::Vm => "vm",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest bundle accepted, in MiB (default 16384).
    #[serde(default = "default_max_bundle_mib")]
    pub max_bundle_mib: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bundle_mib: default_max_bundle_mib(),
        }
    }
}

fn default_interval() -> String {
    "60s".into()
}

fn default_stall_timeout() -> String {
    "30s".into()
}
fn default_ref() -> String {
    "main".into()
}
fn default_channel() -> String {
    "stable".into()
}
fn default_timezone() -> String {
    "UTC".into()
}
fn default_max_bundle_mib() -> u64 {
    16 * 1024
}

/// A config problem, naming the file and key.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        Config::parse(&text, path)
    }

    /// The config in `text`, checked; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        if text.len() > 1 << 20 {
            return Err(fail("larger than 1 MiB".into()));
        }
        let mut options = serde_saphyr::Options::default();
        options.with_snippet = false;
        let mut config: Config = serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| fail(e.to_string().replace('\n', " ")))?;
        // A runtime's section is accepted only with that runtime: a `docker:` block under
        // `runtime: kubernetes` would be silently ignored otherwise.
        let sections: BTreeMap<String, serde::de::IgnoredAny> =
            serde_saphyr::from_str(text).map_err(|e| fail(e.to_string().replace('\n', " ")))?;
        // (`kubernetes:` also configures `outpost-agent render`, so runtime none takes it.)
        for (section, runtime, also) in [
            ("docker", RuntimeKind::Docker, RuntimeKind::Docker),
            ("kubernetes", RuntimeKind::Kubernetes, RuntimeKind::None),
            ("vm", RuntimeKind::Vm, RuntimeKind::Vm),
        ] {
            if sections.contains_key(section) && config.runtime != runtime && config.runtime != also
            {
                return Err(fail(format!(
                    "{section}: this section configures runtime {section}, but runtime is {}; remove it or set runtime: {section}",
                    config.runtime.as_str()
                )));
            }
        }
        // Relative paths are relative to the config file (made absolute, so messages and the
        // socket path do not depend on the working directory).
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = absolute.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.state_dir);
        resolve(&mut config.docker.socket);
        config
            .docker
            .registries
            .values_mut()
            .for_each(|c| resolve(&mut c.password_file));
        resolve(&mut config.api.socket);
        if let Some(vm) = &mut config.vm {
            resolve(&mut vm.nodes.bootstrap_secret_file);
        }
        config.trust.root.as_mut().map(resolve);
        config.trust.keys.iter_mut().for_each(resolve);
        match &mut config.source {
            SourceConfig::Dir { path } => resolve(path),
            SourceConfig::Oci(oci) => {
                oci.credentials_file.as_mut().map(resolve);
                oci.password_file.as_mut().map(resolve);
            }
            SourceConfig::Git(git) => {
                git.password_file.as_mut().map(resolve);
            }
        }
        config.check().map_err(fail)?;
        Ok(config)
    }

    /// Rules serde cannot express.
    fn check(&self) -> Result<(), String> {
        self.snapshots.check()?;
        if !outpost_bundle_format::stack::is_dns_label(&self.expect.name) {
            return Err(format!(
                "expect.name {:?} must be a DNS-1123 label",
                self.expect.name
            ));
        }
        if !outpost_bundle_format::stack::is_dns_label(&self.expect.channel) {
            return Err(format!(
                "expect.channel {:?} must be a DNS-1123 label",
                self.expect.channel
            ));
        }
        match &self.source {
            SourceConfig::Oci(oci) => {
                parse_duration(&oci.interval).map_err(|e| format!("source.oci.interval: {e}"))?;
                parse_duration(&oci.stall_timeout)
                    .map_err(|e| format!("source.oci.stall_timeout: {e}"))?;
                outpost_registry_client::Reference::parse(&oci.reference)
                    .map_err(|e| format!("source.oci.reference: {e}"))?;
                if oci.username.is_some() != oci.password_file.is_some() {
                    return Err("source.oci: username and password_file go together".into());
                }
            }
            SourceConfig::Git(git) => {
                parse_duration(&git.interval).map_err(|e| format!("source.git.interval: {e}"))?;
                parse_duration(&git.stall_timeout)
                    .map_err(|e| format!("source.git.stall_timeout: {e}"))?;
                if git.path.is_empty()
                    || Path::new(&git.path)
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!(
                        "source.git.path {:?} must be a relative path inside the repository",
                        git.path
                    ));
                }
            }
            SourceConfig::Dir { .. } => {}
        }
        match (
            &self.trust.root,
            self.trust.keys.len(),
            self.trust.threshold,
        ) {
            (Some(_), 0, None) => {}
            (Some(_), _, _) => {
                return Err("trust: give either root or keys (with threshold), not both".into());
            }
            (None, 0, _) => return Err("trust: give root: PATH or keys: [PATH...]".into()),
            (None, n, threshold) => {
                let threshold = threshold.unwrap_or(1);
                if threshold == 0 || threshold > n {
                    return Err(format!(
                        "trust.threshold {threshold} needs between 1 and {n} keys"
                    ));
                }
            }
        }
        for (i, window) in self.approval.maintenance_windows.iter().enumerate() {
            Window::parse(window).map_err(|e| format!("approval.maintenance_windows[{i}]: {e}"))?;
        }
        if !outpost_bundle_format::stack::is_dns_label(&self.kubernetes.namespace) {
            return Err(format!(
                "kubernetes.namespace {:?} must be a DNS-1123 label",
                self.kubernetes.namespace
            ));
        }
        // Every grant is typed (unknown keys refused) whatever the runtime.
        for (profile, grant) in &self.permissions.0 {
            if !grant.is_object() {
                return Err(format!(
                    "permissions.{profile}: a grant is a map (use {{}} to grant nothing)"
                ));
            }
            self.permissions.grant(profile)?;
        }
        match self.runtime {
            RuntimeKind::None => {}
            RuntimeKind::Docker => {
                for profile in self.permissions.profiles() {
                    let grant = self.permissions.grant(profile)?;
                    for path in grant.files.keys() {
                        if !path.starts_with('/') {
                            return Err(format!(
                                "permissions.{profile}.files: {path:?} must be an absolute path in the container"
                            ));
                        }
                    }
                    if grant.service_account.is_some() {
                        return Err(format!(
                            "permissions.{profile}.service_account: a ServiceAccount is for runtime kubernetes; on docker a grant is environment and files"
                        ));
                    }
                }
                if let Some(subnet) = &self.docker.network.subnet
                    && !is_cidr(subnet)
                {
                    return Err(format!(
                        "docker.network.subnet {subnet:?} must be a CIDR like 10.213.0.0/24"
                    ));
                }
            }
            RuntimeKind::Kubernetes => {
                for profile in self.permissions.profiles() {
                    let grant = self.permissions.grant(profile)?;
                    if !grant.files.is_empty() {
                        return Err(format!(
                            "permissions.{profile}.files: files are for runtime docker; on Kubernetes the profile's ServiceAccount carries the identity"
                        ));
                    }
                    if grant.service_account.is_none() {
                        return Err(format!(
                            "permissions.{profile}.service_account is not set: on Kubernetes each permission profile maps to a ServiceAccount"
                        ));
                    }
                }
            }
            RuntimeKind::Vm => {
                let Some(vm) = &self.vm else {
                    return Err(
                        "vm is not set: runtime vm needs the vm section (provider, nodes, pools)"
                            .into(),
                    );
                };
                vm.check()?;
                for profile in self.permissions.profiles() {
                    let grant = self.permissions.grant(profile)?;
                    if !grant.files.is_empty() || grant.service_account.is_some() {
                        return Err(format!(
                            "permissions.{profile}: on runtime vm a grant is environment only (the machines' instance profile carries the identity)"
                        ));
                    }
                }
            }
        }
        self.rollout.check()
    }

    /// Where images carried in bundles are kept for the container engine.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn limits(&self) -> outpost_bundle_format::Limits {
        let max = self.limits.max_bundle_mib.saturating_mul(1 << 20);
        outpost_bundle_format::Limits {
            max_total_bytes: max,
            max_blob_bytes: max,
            ..Default::default()
        }
    }
}

fn is_cidr(text: &str) -> bool {
    let Some((ip, bits)) = text.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(bits)) => bits <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(bits)) => bits <= 128,
        _ => false,
    }
}

/// `500ms`, `30s`, `5m`, `2h`, `1d`.
/// A secret kept in a file (config key `key`), without its trailing newline.
pub fn read_secret(key: &str, path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end().to_string())
        .map_err(|e| format!("{key} {}: {e}", path.display()))
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 5m or 2h"))?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        "d" => value.checked_mul(86_400_000),
        _ => return Err(format!("{text:?} is not a duration like 30s, 5m or 2h")),
    }
    .filter(|ms| *ms <= 365 * 86_400_000)
    .ok_or_else(|| format!("{text:?} is longer than a year"))?;
    if millis == 0 {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(std::time::Duration::from_millis(millis))
}

pub fn chrono_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    Duration::from_std(d).map_err(|e| e.to_string())
}

pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Config);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    /// A valid `vm:` section.
    const VM: &str = "vm: {provider: aws, aws: {region: r}, nodes: {listen: '0.0.0.0:7480', advertise: 'http://10.0.0.5:7480', bootstrap_secret_file: s}, pools: {default: {instance_type: m6i.large, image: ami-1, subnets: [a], max_machines: 2}}}";

    const MINIMAL: &str = "source: {dir: {path: drop}}\ntrust: {keys: [a.pub]}\nexpect: {name: acme}\nstate_dir: state\napi: {socket: agent.sock}\n";

    #[test]
    fn a_vm_section_loads_with_its_defaults() {
        let config = load_text(&format!("{MINIMAL}runtime: vm\n{VM}\n")).unwrap();
        let vm = config.vm.unwrap();
        assert_eq!(vm.nodes.report_timeout_seconds, 60);
        let pool = &vm.pools["default"];
        assert_eq!((pool.min_machines, pool.disk_gib), (0, 30));
        assert_eq!(pool.reserved, Reserved::default());
        assert!(vm.nodes.bootstrap_secret_file.is_absolute());
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.expect.channel, "stable");
        assert_eq!(config.approval.maintenance_windows.len(), 1);
        assert!(matches!(config.source, SourceConfig::Oci(_)));
        assert_eq!(config.runtime, RuntimeKind::Docker);
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.kubernetes.example.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.runtime, RuntimeKind::Kubernetes);
        assert_eq!(config.kubernetes.namespace, "outpost");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.vm.example.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.runtime, RuntimeKind::Vm);
        assert_eq!(config.vm.unwrap().pools["gpu"].gpus["nvidia-l4"], 1);
    }

    #[test]
    fn a_section_is_accepted_only_with_its_runtime() {
        for (text, needle) in [
            (
                "runtime: kubernetes\npermissions: {execution: {service_account: sa}}\ndocker: {socket: /d.sock}\n",
                "docker: this section configures runtime docker, but runtime is kubernetes",
            ),
            (
                "docker: {socket: /d.sock}\n",
                "docker: this section configures runtime docker, but runtime is none",
            ),
            (
                "runtime: docker\nkubernetes: {namespace: x}\n",
                "kubernetes: this section configures runtime kubernetes, but runtime is docker",
            ),
            (
                "runtime: docker\npermissions: {execution: {service_account: sa}}\n",
                "permissions.execution.service_account: a ServiceAccount is for runtime kubernetes",
            ),
            (
                "permissions: {execution: {surprise: 1}}\n",
                "permissions.execution: unknown field `surprise`",
            ),
        ] {
            let error = load_text(&format!("{MINIMAL}{text}"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
        // With runtime none the kubernetes section configures `outpost-agent render`.
        load_text(&format!("{MINIMAL}kubernetes: {{namespace: x}}\n")).unwrap();
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = load_text(MINIMAL).unwrap();
        assert_eq!(config.expect.channel, "stable");
        assert_eq!(config.approval.mode, ApprovalMode::Auto);
        assert_eq!(config.runtime, RuntimeKind::None);
        assert!(config.state_dir.is_absolute());
        assert!(config.trust.keys[0].is_absolute());
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            (MINIMAL.replace("state_dir", "stat_dir"), "stat_dir"),
            (MINIMAL.replace("name: acme", "name: Acme_1"), "expect.name"),
            (
                MINIMAL.replace("{keys: [a.pub]}", "{keys: [a.pub], threshold: 2}"),
                "trust.threshold 2",
            ),
            (MINIMAL.replace("{keys: [a.pub]}", "{}"), "trust: give root"),
            (
                MINIMAL.replace(
                    "{dir: {path: drop}}",
                    "{oci: {reference: \"r:5000/a:b\", interval: 10x}}",
                ),
                "source.oci.interval",
            ),
            (
                MINIMAL.replace(
                    "{dir: {path: drop}}",
                    "{git: {url: \"file:///r\", path: ../x}}",
                ),
                "source.git.path",
            ),
            (
                format!(
                    "{MINIMAL}approval: {{maintenance_windows: [{{cron: nope, duration: 1h}}]}}\n"
                ),
                "approval.maintenance_windows[0]",
            ),
            (
                format!("{MINIMAL}permissions: {{execution: yes}}\n"),
                "permissions.execution",
            ),
            (
                format!("{MINIMAL}runtime: podman\n"),
                "unknown variant `podman`",
            ),
            (
                format!(
                    "{MINIMAL}runtime: kubernetes\npermissions: {{execution: {{environment: {{}}}}}}\n"
                ),
                "permissions.execution.service_account is not set",
            ),
            (
                format!(
                    "{MINIMAL}runtime: kubernetes\npermissions: {{execution: {{service_account: a, files: {{/x: /y}}}}}}\n"
                ),
                "permissions.execution.files: files are for runtime docker",
            ),
            (
                format!(
                    "{MINIMAL}runtime: docker\npermissions: {{execution: {{files: {{etc/x: /y}}}}}}\n"
                ),
                "permissions.execution.files",
            ),
            (
                format!("{MINIMAL}runtime: docker\npermissions: {{execution: {{env: {{}}}}}}\n"),
                "permissions.execution: unknown field `env`",
            ),
            (
                format!("{MINIMAL}runtime: docker\ndocker: {{network: {{subnet: 10.0.0.0}}}}\n"),
                "docker.network.subnet",
            ),
            (
                format!("{MINIMAL}rollout: {{drift_interval_seconds: 0}}\n"),
                "rollout.drift_interval_seconds",
            ),
            (
                format!("{MINIMAL}runtime: vm\n"),
                "vm is not set: runtime vm needs the vm section",
            ),
            (
                format!("{MINIMAL}{VM}\n"),
                "vm: this section configures runtime vm, but runtime is none",
            ),
            (
                format!(
                    "{MINIMAL}runtime: vm\n{}\n",
                    VM.replace("max_machines: 2", "min_machines: 3, max_machines: 2")
                ),
                "vm.pools.default: min_machines 3 and max_machines 2",
            ),
            (
                format!(
                    "{MINIMAL}runtime: vm\n{}\n",
                    VM.replace("http://10.0.0.5:7480", "http://x;reboot")
                ),
                "vm.nodes.advertise",
            ),
            (
                format!(
                    "{MINIMAL}runtime: vm\n{}\n",
                    VM.replace("subnets: [a]", "subnets: []")
                ),
                "vm.pools.default.subnets: name at least one subnet",
            ),
            (
                format!(
                    "{MINIMAL}runtime: vm\npermissions: {{execution: {{files: {{/x: /y}}}}}}\n{VM}\n"
                ),
                "permissions.execution: on runtime vm a grant is environment only",
            ),
            (
                MINIMAL.replace(
                    "{dir: {path: drop}}",
                    "{oci: {reference: \"r:5000/a:b\", interval: 18446744073709551s}}",
                ),
                "source.oci.interval",
            ),
        ];
        for (text, needle) in cases {
            let error = load_text(&text).unwrap_err().to_string();
            assert!(error.contains(needle), "{needle}: {error}");
            assert!(!error.contains('\n'), "not one line: {error}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("200ms").unwrap(),
            std::time::Duration::from_millis(200)
        );
        assert_eq!(
            parse_duration("5m").unwrap(),
            std::time::Duration::from_secs(300)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1 h").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn published_schema_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.schema.json");
        let published = std::fs::read_to_string(&path).unwrap_or_default();
        if published != json_schema() {
            if std::env::var_os("OUTPOST_BLESS").is_some() {
                std::fs::write(&path, json_schema()).unwrap();
            } else {
                panic!("agent/config.schema.json is stale: rerun with OUTPOST_BLESS=1");
            }
        }
    }
}
