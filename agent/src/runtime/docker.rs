//! The Docker Engine runtime: replicas as containers on the host's engine (dockerd, or Podman's
//! compatible API service). Every container carries our labels; only labelled containers are
//! ever observed, changed or removed.

use super::engine::Engine;
use super::{
    Health, Instance, Notes, ReplicaSpec, Runtime, RuntimeError, RuntimeResult, Slot, Step, Usage,
    container_name,
};
use crate::config::DockerConfig;
use crate::plan::{ObservedReplica, ReplicaId, ReplicaState};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use outpost_bundle_format::image_ref::ImageRef;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub const OWNER_LABEL: &str = "dev.outpost.owner";
pub const OWNER: &str = "outpost-agent";
const STACK_LABEL: &str = "dev.outpost.stack";
const RESOURCE_LABEL: &str = "dev.outpost.resource";
const ORDINAL_LABEL: &str = "dev.outpost.ordinal";
const DIGEST_LABEL: &str = "dev.outpost.bundle-digest";
const HASH_LABEL: &str = "dev.outpost.config-hash";
/// Where `ephemeralStorage` is mounted: a size-limited tmpfs.
pub const SCRATCH_PATH: &str = "/tmp";

pub struct DockerRuntime {
    engine: Engine,
    config: DockerConfig,
    /// Images kept from air-gapped bundles (`carried::keep_bundled_images`).
    bundled_images: PathBuf,
    /// Held while the stack's network is looked up and made: replicas created in parallel
    /// would otherwise race, and an engine may make two networks of one name.
    network: tokio::sync::Mutex<()>,
}

impl DockerRuntime {
    pub fn new(config: &DockerConfig, bundled_images: &Path) -> DockerRuntime {
        DockerRuntime {
            engine: Engine::new(&config.socket),
            config: config.clone(),
            bundled_images: bundled_images.to_path_buf(),
            network: tokio::sync::Mutex::new(()),
        }
    }

    pub fn network_name(stack: &str) -> String {
        format!("outpost-{stack}")
    }

    async fn ensure_network(&self, stack: &str) -> RuntimeResult<()> {
        let name = Self::network_name(stack);
        let _making = self.network.lock().await;
        if self.engine.inspect_network(&name).await?.is_some() {
            return Ok(());
        }
        let mut body = json!({
            "Name": name,
            "Driver": "bridge",
            "CheckDuplicate": true,
            "Labels": {OWNER_LABEL: OWNER, STACK_LABEL: stack},
        });
        if let Some(subnet) = &self.config.network.subnet {
            body["IPAM"] = json!({"Config": [{"Subnet": subnet}]});
        }
        self.engine
            .create_network(&body)
            .await
            .map_err(|e| RuntimeError::during(format!("creating network {name}"), e))
    }

    /// Makes `image` present: loaded from the bundle that carried it, else pulled by digest.
    /// Returns the reference to create containers with.
    async fn ensure_image(&self, image: &ImageRef, notes: Notes<'_>) -> RuntimeResult<String> {
        if let Some(digest) = image.digest()
            && let Ok(id) =
                std::fs::read_to_string(self.bundled_images.join(format!("{}.id", digest.hex())))
        {
            let hex = digest.hex();
            let id = id.trim().to_string();
            if !self.engine.image_exists(&id).await? {
                notes(format!("loading {image} from the bundle"));
                let archive = self.bundled_images.join(format!("{hex}.tar"));
                self.engine.load(&archive).await.map_err(|e| {
                    RuntimeError::during(format!("loading {image} from the bundle"), e)
                })?;
            }
            return Ok(id);
        }
        let reference = image.to_string();
        if self.engine.image_exists(&reference).await? {
            return Ok(reference);
        }
        let registry = image.registry();
        let auth = self
            .config
            .registries
            .get(registry)
            .map(|credentials| -> RuntimeResult<String> {
                let password = crate::config::read_secret(
                    &format!("docker.registries.{registry}.password_file"),
                    &credentials.password_file,
                )
                .map_err(RuntimeError::new)?;
                let document = json!({
                    "username": credentials.username,
                    "password": password,
                    "serveraddress": registry,
                });
                Ok(base64::engine::general_purpose::URL_SAFE.encode(document.to_string()))
            })
            .transpose()?;
        notes(format!("pulling {image}"));
        let mut layers: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut last_note = std::time::Instant::now();
        let mut progress = |line: &Value| {
            let (Some(id), Some(detail)) = (
                line.get("id").and_then(Value::as_str),
                line.get("progressDetail"),
            ) else {
                return;
            };
            if let (Some(current), Some(total)) = (
                detail.get("current").and_then(Value::as_u64),
                detail.get("total").and_then(Value::as_u64),
            ) {
                layers.insert(id.to_string(), (current, total));
            }
            if last_note.elapsed() > std::time::Duration::from_millis(500) {
                last_note = std::time::Instant::now();
                let (done, total) = layers
                    .values()
                    .fold((0, 0), |(d, t), (c, s)| (d + c, t + s));
                notes(format!(
                    "pulling {image}: {} of {} MiB",
                    done >> 20,
                    total >> 20
                ));
            }
        };
        self.engine
            .pull(&reference, auth, &mut progress)
            .await
            .map_err(|e| RuntimeError::during(format!("pulling {image}"), e))?;
        notes(format!("pulled {image}"));
        Ok(reference)
    }

    fn create_body(&self, spec: &ReplicaSpec, image: &str) -> Value {
        let network = Self::network_name(&spec.stack);
        let labels = json!({
            OWNER_LABEL: OWNER,
            STACK_LABEL: spec.stack,
            RESOURCE_LABEL: spec.replica.resource,
            ORDINAL_LABEL: spec.replica.ordinal.to_string(),
            DIGEST_LABEL: spec.digest,
            HASH_LABEL: spec.config_hash,
        });
        let ports: serde_json::Map<String, Value> = spec
            .ports
            .iter()
            .map(|p| (format!("{p}/tcp"), json!({})))
            .collect();
        // Every port is published on loopback only, on a port the engine picks: the agent
        // probes health there and forwards public endpoints to it. Nothing else reaches it.
        let bindings: serde_json::Map<String, Value> = spec
            .ports
            .iter()
            .map(|p| {
                (
                    format!("{p}/tcp"),
                    json!([{"HostIp": "127.0.0.1", "HostPort": ""}]),
                )
            })
            .collect();
        let mut mounts = Vec::new();
        if let Some(volume) = &spec.volume {
            mounts.push(json!({"Type": "volume", "Source": volume, "Target": "/data"}));
        }
        for (target, source) in &spec.files {
            mounts.push(
                json!({"Type": "bind", "Source": source, "Target": target, "ReadOnly": true}),
            );
        }
        let mut host = json!({
            "NanoCpus": (spec.cpu * 1e9) as i64,
            "Memory": spec.memory_bytes,
            "PortBindings": bindings,
            "NetworkMode": network,
            "Mounts": mounts,
            "RestartPolicy": {"Name": "unless-stopped"},
        });
        if let Some(bytes) = spec.ephemeral_storage_bytes {
            host["Tmpfs"] = json!({SCRATCH_PATH: format!("size={bytes}")});
        }
        if !spec.hosts.is_empty() {
            host["ExtraHosts"] = json!(
                spec.hosts
                    .iter()
                    .map(|(name, address)| format!("{name}:{address}"))
                    .collect::<Vec<_>>()
            );
        }
        if let Some((_, count)) = &spec.gpu {
            host["DeviceRequests"] =
                json!([{"Driver": "nvidia", "Count": count, "Capabilities": [["gpu"]]}]);
        }
        let mut body = json!({
            "Image": image,
            "Env": spec.environment.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "Labels": labels,
            "ExposedPorts": ports,
            "HostConfig": host,
            "NetworkingConfig": {"EndpointsConfig": {network: {"Aliases": [spec.replica.resource]}}},
        });
        if !spec.command.is_empty() {
            body["Cmd"] = json!(spec.command);
        }
        body
    }

    /// Details only `inspect` has: when it started, how it exited.
    async fn create_volume(&self, spec: &ReplicaSpec) -> RuntimeResult<()> {
        if let Some(volume) = &spec.volume {
            self.engine
                .create_volume(&json!({
                    "Name": volume,
                    "Labels": {OWNER_LABEL: OWNER, STACK_LABEL: spec.stack, RESOURCE_LABEL: spec.replica.resource},
                }))
                .await?;
        }
        Ok(())
    }

    async fn inspect_stopped(&self, name: &str) -> (Option<DateTime<Utc>>, Option<String>) {
        match self.engine.inspect_container(name).await {
            Ok(Some(details)) => stopped_details(&details),
            _ => (None, None),
        }
    }
}

/// When a stopped container last started, and why it stopped, from the engine's inspect answer.
pub fn stopped_details(details: &Value) -> (Option<DateTime<Utc>>, Option<String>) {
    let state = &details["State"];
    let started = state["StartedAt"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| t.timestamp() > 0);
    let exit = match (state["OOMKilled"].as_bool(), state["ExitCode"].as_i64()) {
        (Some(true), _) => Some("killed: out of memory".to_string()),
        (_, Some(code)) => Some(format!("exited with code {code}")),
        _ => None,
    };
    (started, exit)
}

/// One container of the engine's list answer as an instance of `stack`, or None when it lacks
/// the labels this runtime puts on its containers. A stopped one's start and exit are not in
/// the list: see [`stopped_details`].
pub fn listed_instance(stack: &str, item: &Value) -> Option<Instance> {
    let (Some(resource), Some(ordinal), Some(hash)) = (
        label(item, RESOURCE_LABEL),
        label(item, ORDINAL_LABEL).and_then(|o| o.parse::<u32>().ok()),
        label(item, HASH_LABEL),
    ) else {
        return None;
    };
    // The name tells the slot: a promoted surge replica keeps its labels, not its name.
    let actual = item["Names"][0]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('/');
    let slot = if actual.ends_with("-surge") {
        Slot::Surge
    } else {
        Slot::Primary
    };
    let running = item["State"].as_str() == Some("running");
    let mut addresses = BTreeMap::new();
    for port in item["Ports"].as_array().into_iter().flatten() {
        let (Some(private), Some(public)) =
            (port["PrivatePort"].as_u64(), port["PublicPort"].as_u64())
        else {
            continue;
        };
        let ip = port["IP"]
            .as_str()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if let (Ok(private), Ok(public)) = (u16::try_from(private), u16::try_from(public))
            && ip.is_ipv4()
        {
            addresses.insert(private, SocketAddr::new(ip, public));
        }
    }
    Some(Instance {
        name: container_name(stack, &ReplicaId::new(resource, ordinal), slot),
        replica: ObservedReplica {
            id: ReplicaId::new(resource, ordinal),
            config_hash: hash.to_string(),
            state: if running {
                ReplicaState::Running
            } else {
                ReplicaState::Stopped
            },
            started_at: None,
        },
        slot,
        digest: label(item, DIGEST_LABEL).unwrap_or_default().to_string(),
        addresses,
        exit: None,
    })
}

fn label<'a>(item: &'a Value, key: &str) -> Option<&'a str> {
    item["Labels"][key].as_str()
}

impl Runtime for DockerRuntime {
    async fn prefetch(&self, images: &[ImageRef], notes: Notes<'_>) -> RuntimeResult<()> {
        // Each image on its own: one failing does not stop the others.
        let fetched =
            futures_util::future::join_all(images.iter().map(|i| self.ensure_image(i, notes)))
                .await;
        fetched
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    async fn observe(&self, stack: &str) -> RuntimeResult<Vec<Instance>> {
        let items = self
            .engine
            .list_containers(&[
                format!("{OWNER_LABEL}={OWNER}"),
                format!("{STACK_LABEL}={stack}"),
            ])
            .await
            .map_err(RuntimeError::engine_trouble)?;
        let mut instances = Vec::with_capacity(items.len());
        for mut instance in items.iter().filter_map(|item| listed_instance(stack, item)) {
            if instance.replica.state == ReplicaState::Stopped {
                (instance.replica.started_at, instance.exit) =
                    self.inspect_stopped(&instance.name).await;
            }
            instances.push(instance);
        }
        Ok(instances)
    }

    async fn apply(&self, step: Step<'_>, notes: Notes<'_>) -> RuntimeResult<()> {
        match step {
            Step::Create { spec, slot } => {
                let name = container_name(&spec.stack, &spec.replica, slot);
                self.ensure_network(&spec.stack).await?;
                let image = self.ensure_image(&spec.image, notes).await?;
                self.create_volume(spec).await?;
                self.engine
                    .create_container(&name, &self.create_body(spec, &image))
                    .await
                    .map_err(|e| RuntimeError::during(format!("creating {name}"), e))?;
                self.engine
                    .start_container(&name)
                    .await
                    .map_err(|e| RuntimeError::during(format!("starting {name}"), e))?;
            }
            Step::Start { stack, replica } => {
                let name = container_name(stack, replica, Slot::Primary);
                self.engine
                    .start_container(&name)
                    .await
                    .map_err(|e| RuntimeError::during(format!("starting {name}"), e))?;
            }
            Step::Promote { stack, replica } => {
                let surge = container_name(stack, replica, Slot::Surge);
                let primary = container_name(stack, replica, Slot::Primary);
                self.engine
                    .rename_container(&surge, &primary)
                    .await
                    .map_err(|e| {
                        RuntimeError::during(format!("renaming {surge} to {primary}"), e)
                    })?;
            }
        }
        Ok(())
    }

    async fn probe(
        &self,
        instance: &Instance,
        check: Option<&outpost_bundle_format::stack::Probe>,
    ) -> Health {
        if instance.replica.state != ReplicaState::Running {
            return Health::Down(
                instance
                    .exit
                    .clone()
                    .unwrap_or_else(|| "not running".to_string()),
            );
        }
        let Some(check) = check else {
            return Health::Healthy;
        };
        let Some(address) = instance.addresses.get(&check.port) else {
            return Health::Starting(format!("port {} is not published yet", check.port));
        };
        super::http_check(*address, check).await
    }

    async fn remove(
        &self,
        stack: &str,
        replica: &ReplicaId,
        slot: Slot,
        delete_volume: bool,
    ) -> RuntimeResult<()> {
        let name = container_name(stack, replica, slot);
        let _ = self
            .engine
            .stop_container(&name, self.config.stop_timeout_seconds)
            .await;
        self.engine
            .remove_container(&name)
            .await
            .map_err(|e| RuntimeError::during(format!("removing {name}"), e))?;
        if delete_volume {
            self.engine
                .remove_volume(&super::volume_name(stack, replica))
                .await?;
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        stack: &str,
        replica: &ReplicaId,
        into: &Path,
        max_bytes: u64,
    ) -> RuntimeResult<u64> {
        let name = container_name(stack, replica, Slot::Primary);
        self.engine
            .stop_container(&name, self.config.stop_timeout_seconds)
            .await
            .map_err(|e| RuntimeError::during(format!("stopping {name}"), e))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let into = into.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || {
            super::archive::normalize(
                super::archive::ChannelReader::new(receiver),
                &into,
                max_bytes,
            )
        });
        let fetched = self.engine.get_archive(&name, "/data", sender).await;
        let written = writer
            .await
            .map_err(|e| RuntimeError::new(format!("snapshot of {name}: {e}")))?;
        // The writer's refusal (too large) ends the download too: its reason comes first.
        let size = written.map_err(|e| RuntimeError::new(format!("snapshot of {name}: {e}")))?;
        fetched.map_err(|e| RuntimeError::during(format!("copying /data of {name}"), e))?;
        Ok(size)
    }

    async fn host_address(&self, stack: &str) -> RuntimeResult<std::net::IpAddr> {
        self.ensure_network(stack).await?;
        let name = Self::network_name(stack);
        let network = self.engine.inspect_network(&name).await?;
        let gateways = network
            .as_ref()
            .and_then(|n| n["IPAM"]["Config"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c["Gateway"].as_str()?.parse::<std::net::IpAddr>().ok());
        // Replicas are reached over IPv4 unless the network has nothing else.
        let mut gateways: Vec<_> = gateways.collect();
        gateways.sort_by_key(|a| a.is_ipv6());
        gateways
            .first()
            .copied()
            .ok_or_else(|| RuntimeError::new(format!("network {name} has no gateway address")))
    }

    async fn use_device(
        &self,
        stack: &str,
        replica: &ReplicaId,
        device: &Path,
    ) -> RuntimeResult<()> {
        let volume = super::volume_name(stack, replica);
        let device = device.display().to_string();
        let found = self
            .engine
            .inspect_volume(&volume)
            .await
            .map_err(|e| RuntimeError::during(format!("inspecting volume {volume}"), e))?;
        if let Some(found) = found {
            let options = &found["Options"];
            match options["device"].as_str() {
                Some(on) if on == device && options["type"] == "ext4" => return Ok(()),
                // A mount of another device: nothing lives in the volume itself.
                Some(_) => self
                    .engine
                    .remove_volume(&volume)
                    .await
                    .map_err(|e| RuntimeError::during(format!("removing volume {volume}"), e))?,
                None => {
                    return Err(RuntimeError::new(format!(
                        "volume {volume} exists on this machine without a device and may hold data: move it away for the replica to use {device}"
                    )));
                }
            }
        }
        self.engine
            .create_volume(&json!({
                "Name": volume,
                "Driver": "local",
                "DriverOpts": {"type": "ext4", "device": device},
                "Labels": {OWNER_LABEL: OWNER, STACK_LABEL: stack, RESOURCE_LABEL: replica.resource},
            }))
            .await
            .map_err(|e| RuntimeError::during(format!("creating volume {volume} on {device}"), e))
    }

    async fn restore(
        &self,
        spec: &ReplicaSpec,
        from: &Path,
        notes: Notes<'_>,
    ) -> RuntimeResult<()> {
        let Some(volume) = &spec.volume else {
            return Err(RuntimeError::new(format!(
                "{}: no volume to restore",
                spec.replica.name(&spec.stack)
            )));
        };
        let image = self.ensure_image(&spec.image, notes).await?;
        let helper = format!("{}-restore", spec.replica.name(&spec.stack));
        // Left by an interrupted restore, or not there: either way it goes first.
        self.engine.remove_container(&helper).await?;
        self.engine
            .remove_volume(volume)
            .await
            .map_err(|e| RuntimeError::during(format!("emptying volume {volume}"), e))?;
        self.create_volume(spec).await?;
        let body = json!({
            "Image": image,
            "Cmd": ["true"],
            "NetworkDisabled": true,
            "Labels": {OWNER_LABEL: format!("{OWNER}-restore"), STACK_LABEL: spec.stack},
            "HostConfig": {"Mounts": [{"Type": "volume", "Source": volume, "Target": "/data"}]},
        });
        self.engine
            .create_container(&helper, &body)
            .await
            .map_err(|e| RuntimeError::during(format!("creating {helper}"), e))?;
        let filled = self.engine.put_archive(&helper, "/data", from).await;
        self.engine.remove_container(&helper).await?;
        filled.map_err(|e| RuntimeError::during(format!("restoring volume {volume}"), e))
    }

    async fn usage(&self, instance: &Instance, cpu_limit: f64) -> Option<Usage> {
        let stats = self.engine.stats(&instance.name).await.ok()?;
        let cpu = &stats["cpu_stats"];
        let pre = &stats["precpu_stats"];
        let cpu_delta = cpu["cpu_usage"]["total_usage"].as_f64()?
            - pre["cpu_usage"]["total_usage"].as_f64().unwrap_or(0.0);
        let system_delta =
            cpu["system_cpu_usage"].as_f64()? - pre["system_cpu_usage"].as_f64().unwrap_or(0.0);
        let online = cpu["online_cpus"].as_f64().unwrap_or(1.0).max(1.0);
        let used_cores = if system_delta > 0.0 {
            cpu_delta / system_delta * online
        } else {
            0.0
        };
        // As `docker stats` counts it: page cache the kernel can drop is not use.
        let memory = &stats["memory_stats"];
        let cache = memory["stats"]["inactive_file"]
            .as_f64()
            .or(memory["stats"]["total_inactive_file"].as_f64())
            .unwrap_or(0.0);
        let memory_percent = match (memory["usage"].as_f64(), memory["limit"].as_f64()) {
            (Some(usage), Some(limit)) if limit > 0.0 => (usage - cache).max(0.0) / limit * 100.0,
            _ => 0.0,
        };
        Some(Usage {
            cpu_percent: used_cores / cpu_limit.max(0.001) * 100.0,
            memory_percent,
        })
    }
}
