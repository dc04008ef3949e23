//! An in-memory runtime for rollout tests: replicas are records, health is scripted per image,
//! and every step is logged so tests can assert the order of what happened.

use super::{
    Health, Instance, Notes, ReplicaSpec, Runtime, RuntimeError, RuntimeResult, Slot, Step, Usage,
};
use crate::plan::{ObservedReplica, ReplicaId, ReplicaState};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Clones share one engine, as a restarted agent finds the containers it left.
#[derive(Default, Clone)]
pub struct FakeRuntime {
    state: Arc<Mutex<FakeState>>,
}

struct FakeState {
    replicas: BTreeMap<(ReplicaId, Slot), (ReplicaSpec, bool)>,
    /// Images whose replicas never become healthy.
    broken_images: BTreeSet<String>,
    /// Volume name → its content.
    volumes: BTreeMap<String, String>,
    log: Vec<String>,
    /// Fail the next N steps with an engine error.
    fail_steps: u32,
    /// What `usage` reports for every running replica.
    usage: Option<Usage>,
    /// What `host_address` answers (loopback by default).
    host_address: std::net::IpAddr,
}

impl Default for FakeState {
    fn default() -> Self {
        FakeState {
            replicas: BTreeMap::new(),
            broken_images: BTreeSet::new(),
            volumes: BTreeMap::new(),
            log: Vec::new(),
            fail_steps: 0,
            usage: None,
            host_address: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
}

impl FakeRuntime {
    pub fn break_image(&self, image: &str) {
        self.lock().broken_images.insert(image.to_string());
    }

    pub fn set_usage(&self, cpu_percent: f64, memory_percent: f64) {
        self.lock().usage = Some(Usage {
            cpu_percent,
            memory_percent,
        });
    }

    /// Where this engine's replicas reach its host (a machine of its own in a VM pool test).
    pub fn set_host_address(&self, address: std::net::IpAddr) {
        self.lock().host_address = address;
    }

    pub fn fail_next_steps(&self, n: u32) {
        self.lock().fail_steps = n;
    }

    /// What happened, one line per step: `create web-0 primary`, `remove web-0 surge`...
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    pub fn volumes(&self) -> BTreeSet<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    /// What the replica's workload wrote to `volume` (a snapshot and a restore carry it).
    pub fn write_volume(&self, volume: &str, content: &str) {
        self.lock()
            .volumes
            .insert(volume.to_string(), content.to_string());
    }

    pub fn volume(&self, volume: &str) -> Option<String> {
        self.lock().volumes.get(volume).cloned()
    }

    /// Drift: stop a replica or remove it behind the agent's back.
    pub fn tamper(&self, replica: &ReplicaId, remove: bool) {
        let mut state = self.lock();
        if remove {
            state.replicas.remove(&(replica.clone(), Slot::Primary));
        } else if let Some(entry) = state.replicas.get_mut(&(replica.clone(), Slot::Primary)) {
            entry.1 = false;
        }
    }

    /// What the primary replica `replica` was created with.
    pub fn spec(&self, replica: &ReplicaId) -> Option<ReplicaSpec> {
        self.lock()
            .replicas
            .get(&(replica.clone(), Slot::Primary))
            .map(|(spec, _)| spec.clone())
    }

    pub fn images(&self) -> BTreeMap<String, String> {
        self.lock()
            .replicas
            .iter()
            .map(|((id, slot), (spec, _))| {
                (
                    format!(
                        "{}-{}{}",
                        id.resource,
                        id.ordinal,
                        if *slot == Slot::Surge { "-surge" } else { "" }
                    ),
                    spec.image.to_string(),
                )
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn slot_name(slot: Slot) -> &'static str {
    match slot {
        Slot::Primary => "primary",
        Slot::Surge => "surge",
    }
}

impl Runtime for FakeRuntime {
    async fn observe(&self, stack: &str) -> RuntimeResult<Vec<Instance>> {
        let state = self.lock();
        Ok(state
            .replicas
            .iter()
            .filter(|(_, (spec, _))| spec.stack == stack)
            .map(|((id, slot), (spec, running))| Instance {
                name: super::container_name(stack, id, *slot),
                replica: ObservedReplica {
                    id: id.clone(),
                    config_hash: spec.config_hash.clone(),
                    state: if *running {
                        ReplicaState::Running
                    } else {
                        ReplicaState::Stopped
                    },
                    started_at: None,
                },
                slot: *slot,
                digest: spec.digest.clone(),
                addresses: BTreeMap::new(),
                exit: None,
            })
            .collect())
    }

    async fn apply(&self, step: Step<'_>, _notes: Notes<'_>) -> RuntimeResult<()> {
        let mut state = self.lock();
        if state.fail_steps > 0 {
            state.fail_steps -= 1;
            return Err(RuntimeError {
                message: "engine unavailable (fake)".into(),
                unavailable: true,
            });
        }
        match step {
            Step::Create { spec, slot } => {
                let key = (spec.replica.clone(), slot);
                if state.replicas.contains_key(&key) {
                    return Err(RuntimeError::new(format!(
                        "{}: already exists",
                        super::container_name(&spec.stack, &spec.replica, slot)
                    )));
                }
                if let Some(volume) = &spec.volume {
                    state.volumes.entry(volume.clone()).or_default();
                }
                let line = format!(
                    "create {}-{} {}",
                    spec.replica.resource,
                    spec.replica.ordinal,
                    slot_name(slot)
                );
                state.log.push(line);
                state.replicas.insert(key, (spec.clone(), true));
            }
            Step::Start { replica, .. } => {
                state
                    .log
                    .push(format!("start {}-{}", replica.resource, replica.ordinal));
                match state.replicas.get_mut(&(replica.clone(), Slot::Primary)) {
                    Some(entry) => entry.1 = true,
                    None => return Err(RuntimeError::new("no such replica")),
                }
            }
            Step::Promote { replica, .. } => {
                state
                    .log
                    .push(format!("promote {}-{}", replica.resource, replica.ordinal));
                let surge = state
                    .replicas
                    .remove(&(replica.clone(), Slot::Surge))
                    .ok_or_else(|| RuntimeError::new("no surge replica"))?;
                state
                    .replicas
                    .insert((replica.clone(), Slot::Primary), surge);
            }
        }
        Ok(())
    }

    async fn probe(
        &self,
        instance: &Instance,
        _check: Option<&outpost_bundle_format::stack::Probe>,
    ) -> Health {
        let state = self.lock();
        match state
            .replicas
            .get(&(instance.replica.id.clone(), instance.slot))
        {
            None => Health::Down("gone".into()),
            Some((_, false)) => Health::Down("stopped".into()),
            Some((spec, true)) if state.broken_images.contains(&spec.image.to_string()) => {
                Health::Unhealthy("GET /healthz answered 500".into())
            }
            Some(_) => Health::Healthy,
        }
    }

    async fn remove(
        &self,
        _stack: &str,
        replica: &ReplicaId,
        slot: Slot,
        delete_volume: bool,
    ) -> RuntimeResult<()> {
        let mut state = self.lock();
        state.log.push(format!(
            "remove {}-{} {}",
            replica.resource,
            replica.ordinal,
            slot_name(slot)
        ));
        if let Some((spec, _)) = state.replicas.remove(&(replica.clone(), slot))
            && delete_volume
            && let Some(volume) = spec.volume
        {
            state.volumes.remove(&volume);
        }
        Ok(())
    }

    async fn usage(&self, _instance: &Instance, _cpu_limit: f64) -> Option<Usage> {
        self.lock().usage
    }

    async fn host_address(&self, _stack: &str) -> RuntimeResult<std::net::IpAddr> {
        Ok(self.lock().host_address)
    }

    async fn use_device(
        &self,
        stack: &str,
        replica: &ReplicaId,
        device: &std::path::Path,
    ) -> RuntimeResult<()> {
        let mut state = self.lock();
        state.log.push(format!(
            "use-device {}-{} {}",
            replica.resource,
            replica.ordinal,
            device.display()
        ));
        state
            .volumes
            .entry(super::volume_name(stack, replica))
            .or_default();
        Ok(())
    }

    async fn snapshot(
        &self,
        stack: &str,
        replica: &ReplicaId,
        into: &std::path::Path,
        max_bytes: u64,
    ) -> RuntimeResult<u64> {
        let mut state = self.lock();
        state
            .log
            .push(format!("snapshot {}-{}", replica.resource, replica.ordinal));
        if let Some(entry) = state.replicas.get_mut(&(replica.clone(), Slot::Primary)) {
            entry.1 = false;
        }
        let volume = super::volume_name(stack, replica);
        let content = state.volumes.get(&volume).cloned().unwrap_or_default();
        if content.len() as u64 > max_bytes {
            return Err(RuntimeError::new(format!(
                "{volume} holds more than {max_bytes} bytes"
            )));
        }
        outpost_bundle_format::layout::write_atomic(into, content.as_bytes())
            .map_err(|e| RuntimeError::new(e.to_string()))?;
        Ok(content.len() as u64)
    }

    async fn restore(
        &self,
        spec: &ReplicaSpec,
        from: &std::path::Path,
        _notes: Notes<'_>,
    ) -> RuntimeResult<()> {
        let content = std::fs::read_to_string(from)
            .map_err(|e| RuntimeError::new(format!("{}: {e}", from.display())))?;
        let mut state = self.lock();
        state.log.push(format!(
            "restore {}-{}",
            spec.replica.resource, spec.replica.ordinal
        ));
        let volume = spec
            .volume
            .clone()
            .ok_or_else(|| RuntimeError::new("no volume to restore"))?;
        state.volumes.insert(volume, content);
        Ok(())
    }
}
