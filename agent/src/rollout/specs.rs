//! The customer-side mapping of a release onto this host for the container-engine backend:
//! pools, GPUs, the customer's grants and links turned into each replica's [`ReplicaSpec`].

use super::RolloutError;
use super::replicas::Settings;
use crate::config::Grant;
use crate::plan::ReplicaId;
use crate::runtime::ReplicaSpec;
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Container, Probe, Stack};
use std::collections::BTreeMap;

/// The customer-side mapping of a release onto this host: what each replica gets. Everything
/// that cannot run here is refused before any replica is touched.
pub struct Specs<'a> {
    stack: &'a Stack,
    pub digest: Digest,
    grants: BTreeMap<String, Grant>,
    links_host: Option<std::net::IpAddr>,
}

impl<'a> Specs<'a> {
    pub fn new(
        config: &Settings,
        stack: &'a Stack,
        digest: Digest,
    ) -> Result<Specs<'a>, RolloutError> {
        let mut grants = BTreeMap::new();
        for resource in &stack.resources {
            let c = &resource.container;
            let at = format!("resource {}", c.name);
            if let Some(pool) = &c.pool
                && !config.pools.contains(pool)
            {
                return Err(RolloutError::new(format!(
                    "{at}: pool {pool:?} is not one of this agent's pools ({}) (config key pools)",
                    if config.pools.is_empty() {
                        "none".to_string()
                    } else {
                        config.pools.join(", ")
                    }
                )));
            }
            if let Some(gpu) = &c.gpu {
                let have = config.docker.gpus.get(&gpu.kind).copied().unwrap_or(0);
                if have < gpu.count {
                    return Err(RolloutError::new(format!(
                        "{at}: needs {} GPU of type {:?}; this host has {have} (config key docker.gpus)",
                        gpu.count, gpu.kind
                    )));
                }
            }
            let grant = config
                .permissions
                .grant(&c.permissions)
                .map_err(|e| RolloutError::new(format!("{at}: {e}")))?;
            grants.insert(c.permissions.clone(), grant);
        }
        // One listener per host port: two endpoints on one port would silently share it.
        let publish = &config.docker.publish;
        let mut ports: BTreeMap<u16, String> = BTreeMap::new();
        for resource in &stack.resources {
            for endpoint in &resource.container.public_endpoints {
                let port = publish.port(&endpoint.name, endpoint.port);
                let this = format!("{}.{}", resource.container.name, endpoint.name);
                if let Some(other) = ports.insert(port, this.clone()) {
                    return Err(RolloutError::new(format!(
                        "public endpoints {other} and {this} both listen on port {port}: give one another port (config key docker.publish.ports)"
                    )));
                }
            }
        }
        Ok(Specs {
            stack,
            digest,
            grants,
            links_host: config.links_host,
        })
    }

    pub fn container(&self, replica: &ReplicaId) -> Result<&'a Container, RolloutError> {
        self.stack
            .resource(&replica.resource)
            .map(|r| &r.container)
            .ok_or_else(|| RolloutError::new(format!("no resource {}", replica.resource)))
    }

    pub fn probe(&self, replica: &ReplicaId) -> Option<&'a Probe> {
        self.container(replica)
            .ok()
            .and_then(|c| c.health_check.as_ref())
    }

    /// What `replica` gets at `config_hash` (the plan's hash of its resource).
    pub fn spec(
        &self,
        replica: &ReplicaId,
        config_hash: &str,
    ) -> Result<ReplicaSpec, RolloutError> {
        let c = self.container(replica)?;
        // Resources find each other by name: on the stack's network, or (VM nodes) at the
        // machine's link listeners.
        let mut environment = crate::plan::link_environment(self.stack, c, |link| link.to_string());
        let hosts = self
            .links_host
            .map(|host| c.links.iter().map(|link| (link.clone(), host)).collect())
            .unwrap_or_default();
        let grant = self.grants.get(&c.permissions).cloned().unwrap_or_default();
        environment.extend(grant.environment);
        Ok(ReplicaSpec {
            stack: self.stack.name.clone(),
            replica: replica.clone(),
            digest: self.digest.to_string(),
            config_hash: config_hash.to_string(),
            image: c.image.clone(),
            command: c.command.clone(),
            environment,
            cpu: c.cpu.desired,
            memory_bytes: c.memory.bytes(),
            ephemeral_storage_bytes: c.ephemeral_storage.as_ref().map(|q| q.bytes()),
            ports: c.ports.clone(),
            volume: c
                .persistent_storage
                .as_ref()
                .map(|_| crate::runtime::volume_name(&self.stack.name, replica)),
            gpu: c.gpu.as_ref().map(|g| (g.kind.clone(), g.count)),
            files: grant.files.into_iter().collect(),
            hosts,
        })
    }
}
