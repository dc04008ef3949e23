//! The provider seam: everything cloud-specific about VM pools, in one small trait. A pool is
//! a machine group (an Auto Scaling group; a managed instance group; a scale set) launched from
//! a machine template the agent owns; machines are what the group runs. Everything a provider
//! makes carries the agent's tags (`outpost:stack`, `outpost:pool`, `outpost:settings`), so a
//! restarted agent adopts what exists instead of making it again, and nothing untagged is ever
//! changed. A stateful replica's volume is a disk of its own in one zone, tagged with the stack,
//! resource and ordinal, attached to whichever machine runs that ordinal. `FakeCloud` imitates
//! a cloud in memory for tests.

use crate::config::PoolConfig;
use crate::plan::ReplicaId;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What a pool's group is asked to run: the customer's machine settings, the user data that
/// starts the node agent, and the hash of both (a new hash is a new machine template).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub stack: String,
    pub pool: String,
    pub config: PoolConfig,
    pub user_data: String,
    /// The settings' identity (`outpost:settings` tag): machines made from other settings are
    /// replaced.
    pub settings: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Asked for, booting.
    Pending,
    Running,
    /// Being terminated or stopped: gone soon.
    Leaving,
}

/// A machine a pool's group runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub id: String,
    pub pool: String,
    pub zone: String,
    pub address: Option<IpAddr>,
    pub state: MachineState,
}

/// A pool's group as the cloud describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub desired: u32,
    pub machines: Vec<Machine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Creating,
    Available,
    InUse,
    /// Being deleted, or failed: never attached.
    Unusable,
}

/// A stateful replica's volume (an EBS volume; a persistent disk; a managed disk).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub id: String,
    /// The ordinal it holds the data of (its tags).
    pub replica: ReplicaId,
    pub zone: String,
    pub size_gib: u32,
    pub state: VolumeState,
    pub attachment: Option<Attachment>,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub machine: String,
    /// The device name it was attached under (`/dev/sdf`).
    pub device: String,
    /// Attached for good (not attaching or detaching).
    pub attached: bool,
}

/// A public endpoint's load balancer as the release wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct BalancerSpec {
    pub stack: String,
    pub resource: String,
    pub endpoint: String,
    /// The port the endpoint has on every machine (the node forwards it to its replicas).
    pub port: u16,
    /// http: an application load balancer; tcp: a network one.
    pub http: bool,
    /// Where an http balancer checks machines (the resource's health check path, else `/`).
    pub health_path: String,
    pub internal: bool,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    /// For http: listen for HTTPS on 443 with this certificate instead of HTTP on 80.
    pub certificate_arn: Option<String>,
}

impl BalancerSpec {
    /// `web.api`: the resource and endpoint it serves.
    pub fn label(&self) -> String {
        format!("{}.{}", self.resource, self.endpoint)
    }

    /// Where clients reach it, given its DNS name.
    pub fn url(&self, dns: &str) -> String {
        match (self.http, &self.certificate_arn) {
            (true, Some(_)) => format!("https://{dns}"),
            (true, None) => format!("http://{dns}"),
            (false, _) => format!("{dns}:{}", self.port),
        }
    }
}

/// A load balancer as the cloud has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Balancer {
    /// Its DNS name.
    pub dns: String,
    /// The machines it sends to.
    pub targets: BTreeSet<String>,
}

/// A cloud call that failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct CloudError {
    pub message: String,
    /// Throttling, 5xx, the network: retried with backoff and never a reason to roll back.
    pub transient: bool,
}

impl CloudError {
    pub fn refused(message: impl Into<String>) -> Self {
        CloudError {
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        CloudError {
            message: message.into(),
            transient: true,
        }
    }
}

pub type CloudResult<T> = Result<T, CloudError>;

/// What a cloud must do for VM pools. Each call is idempotent by tags: calling it again after
/// a crash finds what the first call made.
#[allow(async_fn_in_trait)]
pub trait Provider: Send + Sync {
    /// `aws`, `fake`.
    fn name(&self) -> &'static str;

    /// The cores and bytes of memory a machine of `instance_type` has.
    async fn machine_size(&self, instance_type: &str) -> CloudResult<(f64, u64)>;

    /// Makes sure the pool's group exists and launches new machines from `spec` (a machine
    /// template for its settings is made once). Machines already running keep their settings
    /// until the rollout replaces them. Never changes the desired size of a group it finds.
    async fn ensure_pool(&self, spec: &PoolSpec) -> CloudResult<()>;

    /// The pool's group as it is: its desired size and its machines (one describe call). A
    /// group that does not exist is empty.
    async fn group(&self, stack: &str, pool: &str) -> CloudResult<Group>;

    /// Asks the pool's group for `machines` machines.
    async fn set_desired(&self, stack: &str, pool: &str, machines: u32) -> CloudResult<()>;

    /// Terminates one machine of the pool's group; `shrink`: the group's desired size goes down
    /// by one, else the group launches a replacement.
    async fn remove_machine(
        &self,
        stack: &str,
        pool: &str,
        machine: &str,
        shrink: bool,
    ) -> CloudResult<()>;

    /// Every volume tagged for `stack` (one describe call).
    async fn volumes(&self, stack: &str) -> CloudResult<Vec<Volume>>;

    /// Makes the volume of `replica` in `zone`, encrypted and tagged (stack, resource,
    /// ordinal) as it is made, so a crash right after leaves nothing untagged.
    async fn create_volume(
        &self,
        stack: &str,
        replica: &ReplicaId,
        zone: &str,
        size_gib: u32,
    ) -> CloudResult<Volume>;

    /// Attaches an available volume to a machine in its zone under `device`.
    async fn attach_volume(&self, volume: &str, machine: &str, device: &str) -> CloudResult<()>;

    /// Detaches a volume from `machine`.
    async fn detach_volume(&self, volume: &str, machine: &str) -> CloudResult<()>;

    /// Deletes an available volume: only ever called when the customer opted in.
    async fn delete_volume(&self, volume: &str) -> CloudResult<()>;

    /// Makes sure the endpoint's load balancer, its listener and its target group exist (made
    /// once, tagged), and returns it with the machines it sends to.
    async fn ensure_balancer(&self, spec: &BalancerSpec) -> CloudResult<Balancer>;

    /// Adds machines to and removes machines from the balancer's targets.
    async fn set_targets(
        &self,
        spec: &BalancerSpec,
        add: &[String],
        remove: &[String],
    ) -> CloudResult<()>;

    /// The endpoints (`(resource, endpoint)`) of `stack` that have a load balancer or a target
    /// group this agent made, found by their tags.
    async fn balancers(&self, stack: &str) -> CloudResult<BTreeSet<(String, String)>>;

    /// Deletes an endpoint's load balancer and its target group (each only with the stack's
    /// tag); what is already gone is skipped.
    async fn delete_balancer(&self, stack: &str, resource: &str, endpoint: &str)
    -> CloudResult<()>;
}

/// A cloud in memory: groups launch machines the moment their size goes up, each in the zone
/// of their subnets with the fewest machines. Tests take machines away behind the agent's back with `kill`, and
/// make calls fail with `fail_next`.
/// Clones share one cloud.
#[derive(Default, Clone)]
pub struct FakeCloud {
    state: Arc<Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    groups: BTreeMap<(String, String), FakeGroup>,
    next_id: u64,
    /// Calls made, by name (`set_desired`, …).
    calls: BTreeMap<&'static str, u64>,
    failures: Vec<CloudError>,
    volumes: Vec<(String, Volume)>,
    balancers: BTreeMap<String, (BalancerSpec, Balancer)>,
}

struct FakeGroup {
    spec: PoolSpec,
    desired: u32,
    machines: Vec<(Machine, String)>,
}

impl FakeCloud {
    /// The next cloud call fails with `error`.
    pub fn fail_next(&self, error: CloudError) {
        if let Ok(mut state) = self.state.lock() {
            state.failures.push(error);
        }
    }

    /// Terminates a machine behind the agent's back (the group replaces it).
    pub fn kill(&self, machine: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.terminate(machine);
            state.launch();
        }
    }

    /// Every load balancer, by `resource.endpoint`.
    pub fn all_balancers(&self) -> BTreeMap<String, (BalancerSpec, Balancer)> {
        self.state
            .lock()
            .map(|s| s.balancers.clone())
            .unwrap_or_default()
    }

    /// Every volume, by stack.
    pub fn all_volumes(&self) -> Vec<(String, Volume)> {
        self.state
            .lock()
            .map(|s| s.volumes.clone())
            .unwrap_or_default()
    }

    /// How many times each call was made.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.state
            .lock()
            .map(|s| s.calls.clone())
            .unwrap_or_default()
    }

    /// Every machine of every group, with the settings it was launched with.
    pub fn all_machines(&self) -> Vec<(Machine, String)> {
        self.state
            .lock()
            .map(|s| {
                s.groups
                    .values()
                    .flat_map(|g| g.machines.iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn call(&self, name: &'static str) -> CloudResult<std::sync::MutexGuard<'_, FakeState>> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| CloudError::transient("fake cloud poisoned"))?;
        *state.calls.entry(name).or_default() += 1;
        if !state.failures.is_empty() {
            return Err(state.failures.remove(0));
        }
        Ok(state)
    }
}

impl FakeState {
    /// Takes a machine out of its group; its volumes come off it, as on termination.
    fn terminate(&mut self, machine: &str) {
        for group in self.groups.values_mut() {
            group.machines.retain(|(m, _)| m.id != machine);
        }
        for (_, volume) in &mut self.volumes {
            if volume
                .attachment
                .as_ref()
                .is_some_and(|a| a.machine == machine)
            {
                volume.attachment = None;
                volume.state = VolumeState::Available;
            }
        }
    }

    fn volume(&mut self, id: &str) -> CloudResult<&mut Volume> {
        self.volumes
            .iter_mut()
            .map(|(_, v)| v)
            .find(|v| v.id == id)
            .ok_or_else(|| CloudError::refused(format!("InvalidVolume.NotFound: {id}")))
    }

    fn machine(&self, id: &str) -> Option<&Machine> {
        self.groups
            .values()
            .flat_map(|g| &g.machines)
            .map(|(m, _)| m)
            .find(|m| m.id == id)
    }

    /// Launches machines until every group has its desired count.
    fn launch(&mut self) {
        for group in self.groups.values_mut() {
            while (group.machines.len() as u32) < group.desired {
                self.next_id += 1;
                // As Auto Scaling balances zones: the one with the fewest machines.
                let zones = group.spec.config.subnets.len().max(1);
                let zone = (0..zones)
                    .map(|i| format!("zone-{i}"))
                    .min_by_key(|z| group.machines.iter().filter(|(m, _)| m.zone == *z).count())
                    .unwrap_or_default();
                let machine = Machine {
                    id: format!("i-{:08x}", self.next_id),
                    pool: group.spec.pool.clone(),
                    zone,
                    address: Some(IpAddr::from([10, 0, 0, (self.next_id % 250) as u8 + 2])),
                    state: MachineState::Running,
                };
                group.machines.push((machine, group.spec.settings.clone()));
            }
        }
    }
}

impl Provider for FakeCloud {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn machine_size(&self, instance_type: &str) -> CloudResult<(f64, u64)> {
        let _state = self.call("machine_size")?;
        match instance_type {
            "small" => Ok((2.0, 4 << 30)),
            "large" => Ok((8.0, 32 << 30)),
            other => Err(CloudError::refused(format!(
                "InvalidInstanceType: {other} does not exist"
            ))),
        }
    }

    async fn ensure_pool(&self, spec: &PoolSpec) -> CloudResult<()> {
        let mut state = self.call("ensure_pool")?;
        let key = (spec.stack.clone(), spec.pool.clone());
        match state.groups.get_mut(&key) {
            Some(group) => group.spec = spec.clone(),
            None => {
                state.groups.insert(
                    key,
                    FakeGroup {
                        spec: spec.clone(),
                        desired: spec.config.min_machines,
                        machines: Vec::new(),
                    },
                );
            }
        }
        state.launch();
        Ok(())
    }

    async fn group(&self, stack: &str, pool: &str) -> CloudResult<Group> {
        let state = self.call("group")?;
        Ok(state
            .groups
            .get(&(stack.into(), pool.into()))
            .map(|g| Group {
                desired: g.desired,
                machines: g.machines.iter().map(|(m, _)| m.clone()).collect(),
            })
            .unwrap_or_default())
    }

    async fn set_desired(&self, stack: &str, pool: &str, machines: u32) -> CloudResult<()> {
        let mut state = self.call("set_desired")?;
        let group = state
            .groups
            .get_mut(&(stack.into(), pool.into()))
            .ok_or_else(|| CloudError::refused(format!("no group for pool {pool}")))?;
        group.desired = machines;
        // A group shrunk by count picks its own victims: the newest here.
        group.machines.truncate(machines as usize);
        state.launch();
        Ok(())
    }

    async fn remove_machine(
        &self,
        stack: &str,
        pool: &str,
        machine: &str,
        shrink: bool,
    ) -> CloudResult<()> {
        let mut state = self.call("remove_machine")?;
        let key = (stack.to_string(), pool.to_string());
        let in_group = state
            .groups
            .get(&key)
            .ok_or_else(|| CloudError::refused(format!("no group for pool {pool}")))?
            .machines
            .iter()
            .any(|(m, _)| m.id == machine);
        if !in_group {
            return Err(CloudError::refused(format!(
                "{machine} is not a machine of pool {pool}"
            )));
        }
        state.terminate(machine);
        if shrink && let Some(group) = state.groups.get_mut(&key) {
            group.desired = group.desired.saturating_sub(1);
        }
        state.launch();
        Ok(())
    }

    async fn volumes(&self, stack: &str) -> CloudResult<Vec<Volume>> {
        let state = self.call("volumes")?;
        Ok(state
            .volumes
            .iter()
            .filter(|(s, _)| s == stack)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn create_volume(
        &self,
        stack: &str,
        replica: &ReplicaId,
        zone: &str,
        size_gib: u32,
    ) -> CloudResult<Volume> {
        let mut state = self.call("create_volume")?;
        state.next_id += 1;
        let volume = Volume {
            id: format!("vol-{:08x}", state.next_id),
            replica: replica.clone(),
            zone: zone.to_string(),
            size_gib,
            state: VolumeState::Available,
            attachment: None,
        };
        state.volumes.push((stack.to_string(), volume.clone()));
        Ok(volume)
    }

    async fn attach_volume(&self, volume: &str, machine: &str, device: &str) -> CloudResult<()> {
        let mut state = self.call("attach_volume")?;
        let zone = state
            .machine(machine)
            .map(|m| m.zone.clone())
            .ok_or_else(|| CloudError::refused(format!("InvalidInstanceID: {machine}")))?;
        let v = state.volume(volume)?;
        if v.state != VolumeState::Available || v.zone != zone {
            return Err(CloudError::refused(format!(
                "IncorrectState: {volume} is {:?} in {}, the machine in {zone}",
                v.state, v.zone
            )));
        }
        v.state = VolumeState::InUse;
        v.attachment = Some(Attachment {
            machine: machine.to_string(),
            device: device.to_string(),
            attached: true,
        });
        Ok(())
    }

    async fn detach_volume(&self, volume: &str, machine: &str) -> CloudResult<()> {
        let mut state = self.call("detach_volume")?;
        let v = state.volume(volume)?;
        if v.attachment.as_ref().is_none_or(|a| a.machine != machine) {
            return Err(CloudError::refused(format!(
                "IncorrectState: {volume} is not attached to {machine}"
            )));
        }
        v.attachment = None;
        v.state = VolumeState::Available;
        Ok(())
    }

    async fn delete_volume(&self, volume: &str) -> CloudResult<()> {
        let mut state = self.call("delete_volume")?;
        if state.volume(volume)?.state != VolumeState::Available {
            return Err(CloudError::refused(format!(
                "VolumeInUse: {volume} is attached"
            )));
        }
        state.volumes.retain(|(_, v)| v.id != volume);
        Ok(())
    }

    async fn ensure_balancer(&self, spec: &BalancerSpec) -> CloudResult<Balancer> {
        let mut state = self.call("ensure_balancer")?;
        let (_, balancer) = state.balancers.entry(spec.label()).or_insert_with(|| {
            let balancer = Balancer {
                dns: format!("{}-{}.lb.fake", spec.endpoint, spec.resource),
                targets: BTreeSet::new(),
            };
            (spec.clone(), balancer)
        });
        Ok(balancer.clone())
    }

    async fn set_targets(
        &self,
        spec: &BalancerSpec,
        add: &[String],
        remove: &[String],
    ) -> CloudResult<()> {
        let mut state = self.call("set_targets")?;
        let (_, balancer) = state
            .balancers
            .get_mut(&spec.label())
            .ok_or_else(|| CloudError::refused(format!("no balancer for {}", spec.label())))?;
        balancer.targets.extend(add.iter().cloned());
        balancer.targets.retain(|t| !remove.contains(t));
        Ok(())
    }

    async fn balancers(&self, stack: &str) -> CloudResult<BTreeSet<(String, String)>> {
        let state = self.call("balancers")?;
        Ok(state
            .balancers
            .values()
            .filter(|(spec, _)| spec.stack == stack)
            .map(|(spec, _)| (spec.resource.clone(), spec.endpoint.clone()))
            .collect())
    }

    async fn delete_balancer(
        &self,
        stack: &str,
        resource: &str,
        endpoint: &str,
    ) -> CloudResult<()> {
        let mut state = self.call("delete_balancer")?;
        state.balancers.retain(|_, (spec, _)| {
            (
                spec.stack.as_str(),
                spec.resource.as_str(),
                spec.endpoint.as_str(),
            ) != (stack, resource, endpoint)
        });
        Ok(())
    }
}
