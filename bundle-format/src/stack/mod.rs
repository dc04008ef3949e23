//! The stack model: parse a vendor's YAML stack file and check every rule, producing a [`Stack`]
//! whose fields are domain types. A `Stack` can only be built through [`Stack::from_file`].

mod file;
mod source;

pub use file::{
    AutoScale, Code, CodeKind, ContainerSpec, Cpu, CpuRange, Gpu, HealthCheck, Lifecycle, Protocol,
    PublicEndpoint, ResourceEntry, StackFile,
};
pub use source::{SourceBuild, check_before_build};
pub(crate) use source::{is_platform, is_stage_name, relative_path};

use crate::image_ref::ImageRef;
use crate::quantity::ByteQuantity;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Largest stack file accepted, in bytes.
pub const MAX_STACK_FILE_BYTES: usize = 1024 * 1024;

/// A rule of the stack model that the file breaks, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct StackError {
    /// e.g. `resources[1] (api).memory`, or `line 3 column 5` for syntax errors.
    pub location: String,
    pub message: String,
}

/// A validated stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Stack {
    pub name: String,
    pub permission_profiles: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    pub resources: Vec<Resource>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub lifecycle: Lifecycle,
    pub container: Container,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: ImageRef,
    pub cpu: CpuRange,
    pub memory: ByteQuantity,
    pub ports: Vec<u16>,
    pub public_endpoints: Vec<Endpoint>,
    pub scaling: Scaling,
    pub stateful: bool,
    pub persistent_storage: Option<ByteQuantity>,
    pub ephemeral_storage: Option<ByteQuantity>,
    pub gpu: Option<Gpu>,
    pub health_check: Option<Probe>,
    pub environment: BTreeMap<String, String>,
    pub links: Vec<String>,
    pub permissions: String,
    pub pool: Option<String>,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scaling {
    Fixed(u32),
    Auto {
        min: u32,
        desired: u32,
        max: u32,
        target_cpu_percent: u32,
        target_memory_percent: Option<u32>,
    },
}

impl Scaling {
    /// The replicas a resource starts with: its fixed count, or its autoscaled `desired`.
    pub fn initial(&self) -> u32 {
        match self {
            Scaling::Fixed(n) => *n,
            Scaling::Auto { desired, .. } => *desired,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub path: String,
    pub port: u16,
    pub method: String,
    pub timeout_seconds: u32,
    pub failure_threshold: u32,
}

/// Default CPU target when only `minReplicas`/`maxReplicas` are given.
pub const DEFAULT_TARGET_CPU_PERCENT: u32 = 80;

impl Stack {
    /// Parses YAML (or JSON, a subset) and validates it. Aliases, size and nesting are bounded;
    /// duplicate keys are refused.
    pub fn from_yaml(text: &str) -> Result<(StackFile, Stack), StackError> {
        let file = parse_stack_yaml(text)?;
        let stack = Stack::from_file(&file)?;
        Ok((file, stack))
    }

    /// Checks every rule of the stack model.
    pub fn from_file(file: &StackFile) -> Result<Stack, StackError> {
        check_label("name", &file.name)?;
        for (profile, clouds) in &file.permission_profiles {
            let at = format!("permissionProfiles.{profile}");
            check_label(&at, profile)?;
            for (cloud, permissions) in clouds {
                if cloud.is_empty() || !cloud.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(err(
                        &at,
                        format!("cloud {cloud:?} must be a word like aws, gcp or azure"),
                    ));
                }
                if permissions.iter().any(|p| p.trim().is_empty()) {
                    return Err(err(
                        format!("{at}.{cloud}"),
                        "permissions must not be empty strings",
                    ));
                }
            }
        }
        if file.resources.is_empty() {
            return Err(err("resources", "a stack needs at least one resource"));
        }
        let mut names = BTreeSet::new();
        for (index, entry) in file.resources.iter().enumerate() {
            let name = &entry.container.name;
            if !names.insert(name.as_str()) {
                return Err(err(
                    format!("resources[{index}] ({name}).name"),
                    format!("resource name {name:?} is used twice"),
                ));
            }
        }
        let resources = file
            .resources
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let at = Location {
                    prefix: format!("resources[{index}] ({})", entry.container.name),
                };
                let container = check_container(&at, &entry.container, file, &names)?;
                Ok(Resource {
                    lifecycle: entry.lifecycle,
                    container,
                })
            })
            .collect::<Result<Vec<_>, StackError>>()?;
        Ok(Stack {
            name: file.name.clone(),
            permission_profiles: file.permission_profiles.clone(),
            resources,
        })
    }

    /// Images not pinned by digest.
    pub fn unpinned_images(&self) -> Vec<(&str, &ImageRef)> {
        self.resources
            .iter()
            .filter(|r| r.container.image.digest().is_none())
            .map(|r| (r.container.name.as_str(), &r.container.image))
            .collect()
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.container.name == name)
    }
}

/// The YAML reader for everything untrusted: bounded size, aliases and depth; duplicate keys refused.
pub fn parse_stack_yaml(text: &str) -> Result<StackFile, StackError> {
    if text.len() > MAX_STACK_FILE_BYTES {
        return Err(err(
            "stack file",
            format!(
                "{} bytes is over the {MAX_STACK_FILE_BYTES}-byte limit",
                text.len()
            ),
        ));
    }
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_aliases = 64;
    budget.max_anchors = 64;
    budget.max_events = 200_000;
    budget.max_depth = 32;
    budget.max_recorded_anchor_events = 10_000;
    budget.max_recorded_anchor_bytes = 256 * 1024;
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options::<StackFile>(text, options).map_err(|e| {
        let message = e.to_string().replace('\n', " ");
        err("stack file", message.trim().to_string())
    })
}

struct Location {
    prefix: String,
}

impl Location {
    fn field(&self, field: impl fmt::Display) -> String {
        format!("{}.{field}", self.prefix)
    }
}

fn err(location: impl Into<String>, message: impl Into<String>) -> StackError {
    StackError {
        location: location.into(),
        message: message.into(),
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: an environment variable's (or build argument's) name.
pub(crate) fn is_environment_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// DNS-1123 label: 1-63 of [a-z0-9-], starting and ending alphanumeric.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

fn check_label(at: &str, name: &str) -> Result<(), StackError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(err(
            at,
            format!(
                "{name:?} must be a DNS-1123 label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

fn check_port(at: &str, port: u32) -> Result<u16, StackError> {
    match u16::try_from(port) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(err(at, format!("port {port} is outside 1-65535"))),
    }
}

fn check_quantity(at: &str, text: &str) -> Result<ByteQuantity, StackError> {
    let quantity = ByteQuantity::parse(text).map_err(|e| err(at, e.to_string()))?;
    if quantity.bytes() == 0 {
        return Err(err(at, "must be greater than zero"));
    }
    Ok(quantity)
}

/// `code` as a bundle holds it: an image reference. Source code is built before a bundle exists.
fn check_image_code(at: &Location, code: &Code) -> Result<ImageRef, StackError> {
    if code.is_source() {
        return Err(err(
            at.field("code"),
            "type source is built into an image by `outpost-signer build`; a bundle's stack names the image",
        ));
    }
    if let Some(field) = source::source_only_field(code) {
        return Err(err(
            at.field(format_args!("code.{field}")),
            "belongs to `type: source`",
        ));
    }
    let text = code.image.as_deref().ok_or_else(|| {
        err(
            at.field("code.image"),
            "is required (or `type: source` with `src`)",
        )
    })?;
    ImageRef::parse(text).map_err(|e| err(at.field("code.image"), e.to_string()))
}

fn check_container(
    at: &Location,
    spec: &ContainerSpec,
    file: &StackFile,
    names: &BTreeSet<&str>,
) -> Result<Container, StackError> {
    check_label(&at.field("name"), &spec.name)?;
    let image = check_image_code(at, &spec.code)?;

    let cpu = match spec.cpu {
        Cpu::Cores(cores) => CpuRange {
            min: cores,
            desired: cores,
        },
        Cpu::Range(range) => range,
    };
    let finite = cpu.min.is_finite() && cpu.desired.is_finite();
    if !finite || cpu.min <= 0.0 || cpu.min > cpu.desired || cpu.desired > 1024.0 {
        return Err(err(
            at.field("cpu"),
            "must be a number of cores > 0, or {min, desired} with 0 < min <= desired (at most 1024)",
        ));
    }
    let memory = check_quantity(&at.field("memory"), &spec.memory)?;

    if spec.ports.is_empty() {
        return Err(err(at.field("ports"), "at least one port is required"));
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    for (i, &port) in spec.ports.iter().enumerate() {
        let port = check_port(&at.field(format_args!("ports[{i}]")), port)?;
        if ports.contains(&port) {
            return Err(err(
                at.field(format_args!("ports[{i}]")),
                format!("port {port} is declared twice"),
            ));
        }
        ports.push(port);
    }

    let mut public_endpoints: Vec<Endpoint> = Vec::new();
    for (i, endpoint) in spec.public_endpoints.iter().enumerate() {
        let here = at.field(format_args!("publicEndpoints[{i}]"));
        check_label(&format!("{here}.name"), &endpoint.name)?;
        if public_endpoints.iter().any(|e| e.name == endpoint.name) {
            return Err(err(
                format!("{here}.name"),
                format!("endpoint name {:?} is used twice", endpoint.name),
            ));
        }
        let port = check_port(&format!("{here}.port"), endpoint.port)?;
        if !ports.contains(&port) {
            return Err(err(
                format!("{here}.port"),
                format!("port {port} is not declared in ports"),
            ));
        }
        public_endpoints.push(Endpoint {
            name: endpoint.name.clone(),
            port,
            protocol: endpoint.protocol,
        });
    }

    let scaling = check_scaling(at, spec)?;

    if spec.persistent_storage.is_some() && spec.stateful == Some(false) {
        return Err(err(
            at.field("persistentStorage"),
            "persistent storage needs a stateful container, but `stateful: false` is set",
        ));
    }
    let persistent_storage = spec
        .persistent_storage
        .as_deref()
        .map(|q| check_quantity(&at.field("persistentStorage"), q))
        .transpose()?;
    let ephemeral_storage = spec
        .ephemeral_storage
        .as_deref()
        .map(|q| check_quantity(&at.field("ephemeralStorage"), q))
        .transpose()?;

    if let Some(gpu) = &spec.gpu {
        if gpu.kind.trim().is_empty() {
            return Err(err(at.field("gpu.type"), "must name the GPU type"));
        }
        if !(1..=8).contains(&gpu.count) {
            return Err(err(
                at.field("gpu.count"),
                format!("{} is outside 1-8", gpu.count),
            ));
        }
    }

    let health_check = spec
        .health_check
        .as_ref()
        .map(|check| check_probe(at, check, &ports))
        .transpose()?;

    for key in spec.environment.keys() {
        if !is_environment_name(key) {
            return Err(err(
                at.field(format_args!("environment.{key}")),
                "variable names must match [A-Za-z_][A-Za-z0-9_]*",
            ));
        }
    }

    for (i, link) in spec.links.iter().enumerate() {
        let here = at.field(format_args!("links[{i}]"));
        if link == &spec.name {
            return Err(err(here, "a resource cannot link to itself"));
        }
        if !names.contains(link.as_str()) {
            return Err(err(
                here,
                format!("no resource named {link:?} in this stack"),
            ));
        }
        if spec.links[..i].contains(link) {
            return Err(err(here, format!("{link:?} is linked twice")));
        }
    }

    if !file.permission_profiles.contains_key(&spec.permissions) {
        let declared: Vec<&str> = file
            .permission_profiles
            .keys()
            .map(String::as_str)
            .collect();
        return Err(err(
            at.field("permissions"),
            format!(
                "profile {:?} is not declared in permissionProfiles (declared: {declared:?})",
                spec.permissions
            ),
        ));
    }
    if let Some(pool) = &spec.pool {
        check_label(&at.field("pool"), pool)?;
    }

    Ok(Container {
        name: spec.name.clone(),
        image,
        cpu,
        memory,
        ports,
        public_endpoints,
        scaling,
        stateful: spec.stateful.unwrap_or(false) || persistent_storage.is_some(),
        persistent_storage,
        ephemeral_storage,
        gpu: spec.gpu.clone(),
        health_check,
        environment: spec.environment.clone(),
        links: spec.links.clone(),
        permissions: spec.permissions.clone(),
        pool: spec.pool.clone(),
        command: spec.command.clone(),
    })
}

fn check_scaling(at: &Location, spec: &ContainerSpec) -> Result<Scaling, StackError> {
    let min_max = spec.min_replicas.is_some() || spec.max_replicas.is_some();
    match (spec.replicas, min_max, &spec.auto_scale) {
        (Some(_), true, _) | (Some(_), _, Some(_)) => Err(err(
            at.field("replicas"),
            "fixed `replicas` cannot be combined with autoscaling (minReplicas/maxReplicas or autoScale)",
        )),
        (None, true, Some(_)) => Err(err(
            at.field("autoScale"),
            "use either minReplicas/maxReplicas or autoScale, not both",
        )),
        (Some(replicas), false, None) if (1..=1000).contains(&replicas) => {
            Ok(Scaling::Fixed(replicas))
        }
        (Some(replicas), false, None) => Err(err(
            at.field("replicas"),
            format!("{replicas} is outside 1-1000"),
        )),
        (None, false, None) => Ok(Scaling::Fixed(1)),
        (None, true, None) => {
            let (Some(min), Some(max)) = (spec.min_replicas, spec.max_replicas) else {
                return Err(err(
                    at.field("minReplicas"),
                    "minReplicas and maxReplicas must be given together",
                ));
            };
            check_bounds(at, "minReplicas", min, min, max)?;
            Ok(Scaling::Auto {
                min,
                desired: min,
                max,
                target_cpu_percent: DEFAULT_TARGET_CPU_PERCENT,
                target_memory_percent: None,
            })
        }
        (None, false, Some(auto)) => {
            check_bounds(at, "autoScale", auto.min, auto.desired, auto.max)?;
            for (field, target) in [
                ("targetCpuPercent", auto.target_cpu_percent),
                ("targetMemoryPercent", auto.target_memory_percent),
            ] {
                if let Some(t) = target
                    && !(1..=100).contains(&t)
                {
                    return Err(err(
                        at.field(format_args!("autoScale.{field}")),
                        format!("{t} is outside 1-100"),
                    ));
                }
            }
            Ok(Scaling::Auto {
                min: auto.min,
                desired: auto.desired,
                max: auto.max,
                target_cpu_percent: auto
                    .target_cpu_percent
                    .unwrap_or(DEFAULT_TARGET_CPU_PERCENT),
                target_memory_percent: auto.target_memory_percent,
            })
        }
    }
}

fn check_bounds(
    at: &Location,
    field: &str,
    min: u32,
    desired: u32,
    max: u32,
) -> Result<(), StackError> {
    if min == 0 || min > desired || desired > max || max > 1000 {
        return Err(err(
            at.field(field),
            format!(
                "need 1 <= min <= desired <= max <= 1000 (got min {min}, desired {desired}, max {max})"
            ),
        ));
    }
    Ok(())
}

fn check_probe(at: &Location, check: &HealthCheck, ports: &[u16]) -> Result<Probe, StackError> {
    if !check.path.starts_with('/') || check.path.chars().any(char::is_whitespace) {
        return Err(err(
            at.field("healthCheck.path"),
            "must be an HTTP path starting with '/'",
        ));
    }
    let port = check_port(&at.field("healthCheck.port"), check.port)?;
    if !ports.contains(&port) {
        return Err(err(
            at.field("healthCheck.port"),
            format!("port {port} is not declared in ports"),
        ));
    }
    let method = check
        .method
        .clone()
        .unwrap_or_else(|| "GET".into())
        .to_ascii_uppercase();
    if !["GET", "HEAD", "POST", "PUT", "OPTIONS"].contains(&method.as_str()) {
        return Err(err(
            at.field("healthCheck.method"),
            format!("{method:?} is not one of GET, HEAD, POST, PUT, OPTIONS"),
        ));
    }
    let timeout_seconds = check.timeout_seconds.unwrap_or(1);
    if !(1..=5).contains(&timeout_seconds) {
        return Err(err(
            at.field("healthCheck.timeoutSeconds"),
            format!("{timeout_seconds} is outside 1-5"),
        ));
    }
    let failure_threshold = check.failure_threshold.unwrap_or(3);
    if !(1..=100).contains(&failure_threshold) {
        return Err(err(
            at.field("healthCheck.failureThreshold"),
            format!("{failure_threshold} is outside 1-100"),
        ));
    }
    Ok(Probe {
        path: check.path.clone(),
        port,
        method,
        timeout_seconds,
        failure_threshold,
    })
}

/// The JSON Schema of the stack file, generated from [`StackFile`].
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(StackFile);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests;
