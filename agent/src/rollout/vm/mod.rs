//! The VM backend: a release on machine pools in the customer's cloud account. The agent keeps
//! one machine group per capacity pool (through a [`Provider`]: AWS today), places replicas on
//! machines by cpu, memory and GPU ([`placement`]), and hands each machine its share through
//! the node protocol ([`nodes`]); the node agent on the machine runs it with the
//! container-engine backend and reports health back. A new release rolls through the machines
//! one at a time, each healthy before the next.

#[cfg(feature = "aws")]
pub mod aws;
mod balancers;
pub mod bootstrap;
pub mod disk;
pub mod images;
mod links;
pub mod node;
pub mod nodes;
pub mod placement;
pub mod plan;
pub mod policy;
pub mod provider;
mod settings;
mod view;
mod volumes;
mod wants;

use super::autoscale::Autoscaler;
use super::{Backend, Context, Repair, RolloutError, event, journaled};
use crate::config::{Permissions, VmConfig};
use crate::plan::ReplicaId;
use crate::state::Release;
pub use bootstrap::{Bootstrap, bootstrap_secret, file_sha256, settings_hash};
use nodes::{AssignedRelease, Assignment, Node, Nodes};
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::Stack;
use placement::{Host, Placement, Pool, Shape, Want};
use provider::{CloudError, Group, Machine, MachineState, PoolSpec, Provider, Volume};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volumes::Share;

/// How often a rollout looks again while it waits for machines and nodes.
const WAIT_STEP: Duration = Duration::from_secs(2);

/// What this backend takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub vm: VmConfig,
    pub permissions: Permissions,
    pub bootstrap: Bootstrap,
}

/// Runs releases on VM pools through a cloud [`Provider`].
pub struct Pools<P: Provider> {
    context: Context,
    settings: Settings,
    provider: P,
    nodes: Arc<Nodes>,
    /// Where each replica was placed last (placement keeps replicas where they run).
    placed: Mutex<BTreeMap<ReplicaId, String>>,
    /// Machine sizes by instance type, asked once.
    sizes: Mutex<BTreeMap<String, (f64, u64)>>,
    /// When each machine was first seen: one whose node has not joined within the boot
    /// timeout is replaced.
    first_seen: Mutex<BTreeMap<String, Instant>>,
    /// Volumes this agent made that a describe may not show yet.
    made: Mutex<Vec<Volume>>,
    /// Autoscaled resources' counts, from the load the nodes report.
    scale: Autoscaler,
    /// The release whose gone endpoints' load balancers were looked for.
    balancers_pruned: Mutex<Option<Digest>>,
    /// Values kept in the state store (the pools' good and failed settings), once read.
    remembered: Mutex<BTreeMap<String, Option<String>>>,
    /// Machines that never joined, by pool and the settings they were launched with.
    boot_failures: Mutex<BTreeMap<(String, String), BTreeSet<String>>>,
}

impl From<CloudError> for RolloutError {
    fn from(e: CloudError) -> Self {
        RolloutError {
            message: e.message,
            unavailable: e.transient,
        }
    }
}

impl<P: Provider> Backend for Pools<P> {
    async fn converge(
        &self,
        release: &Release,
        stack: &Stack,
        fresh: bool,
    ) -> Result<Vec<Repair>, RolloutError> {
        if !fresh {
            self.autoscale(stack);
        }
        let wants = self.wants(stack)?;
        let specs = self.specs(stack, &wants);
        for spec in specs.values() {
            self.provider
                .ensure_pool(spec)
                .await
                .map_err(|e| in_pool(&spec.pool, e))?;
        }
        let pools = self.shapes(&specs).await?;
        let assigned = AssignedRelease {
            name: release.name.clone(),
            version: release.version.clone(),
            digest: release.digest,
            stack: serde_json::from_str(&release.stack)
                .map_err(|e| RolloutError::new(format!("stored stack: {e}")))?,
            images: self
                .nodes
                .archives
                .of(stack)
                .await
                .map_err(RolloutError::new)?,
        };
        // Like a Deployment's progress deadline: each machine that comes to run the release
        // healthy gives the rollout the whole deadline again.
        let allowed = Duration::from_secs(self.context.rollout.progress_deadline_seconds);
        let mut deadline = Instant::now() + allowed;
        let mut converged_machines = 0;
        let mut repairs = Vec::new();
        loop {
            let groups = self.groups(stack, &specs).await?;
            let machines: Vec<Machine> = groups.values().flat_map(|g| g.machines.clone()).collect();
            let nodes = self.nodes.nodes();
            let now_converged = nodes
                .values()
                .filter(|n| node_converged(n, &release.digest))
                .count();
            if now_converged > converged_machines {
                converged_machines = now_converged;
                deadline = Instant::now() + allowed;
            }
            let hosts = self.hosts(&machines, &nodes);
            let volumes = self.volumes(stack).await?;
            let mut previous = self.placed.lock().map(|p| p.clone()).unwrap_or_default();
            let mut wants = wants.clone();
            Self::pin(&mut wants, &mut previous, &volumes);
            let placement = placement::place(&pools, &wants, &hosts, &previous);
            if let Ok(mut placed) = self.placed.lock() {
                placed.clone_from(&placement.assigned);
            }
            self.show(&machines, &nodes, &placement);
            if !placement.problems.is_empty() {
                return Err(RolloutError::new(placement.problems.join("; ")));
            }
            self.size_pools(release, stack, &groups, &placement, &mut repairs)
                .await?;
            self.replace_lost(release, stack, &machines, &nodes, &specs, &mut repairs)
                .await?;
            let (shares, volume_waits) = self
                .attach_volumes(
                    release,
                    stack,
                    &machines,
                    &placement,
                    &volumes,
                    &mut repairs,
                )
                .await?;
            self.prune_volumes(release, &wants, &volumes, &nodes, &mut repairs)
                .await?;
            self.show_volumes(&volumes);
            self.balance(release, stack, &machines, &shares, &mut repairs)
                .await?;
            self.assign(&assigned, &machines, &nodes, shares, fresh);
            for (machine, peers) in links::peers(stack, &self.nodes.nodes()) {
                self.nodes.link(&machine, peers);
            }
            // Judged on the assignments just made: a node given a new one is not done yet.
            let assigned_now = self.nodes.nodes();
            if !fresh {
                self.judge_new_machines(release, &specs, &machines, &assigned_now);
            }
            self.show_resources(&release.digest, &wants, &placement, &assigned_now);
            let progress = match self.progress(&release.digest, &wants, &placement, &assigned_now) {
                Ok(()) => {
                    let replacing = self
                        .replace_retired(release, stack, &machines, &nodes, &specs, &mut repairs)
                        .await?;
                    replacing.map_or(Ok(()), |step| Err(Progress::Waiting(step)))
                }
                // Why a stateful replica is not on its machine yet: the volume says.
                Err(Progress::Waiting(why)) if !volume_waits.is_empty() => Err(Progress::Waiting(
                    format!("{why}; {}", volume_waits.join("; ")),
                )),
                Err(e) => Err(e),
            };
            match progress {
                Ok(()) => {
                    self.converged_on(&specs);
                    self.prune_balancers(release, stack).await;
                    return Ok(repairs);
                }
                Err(Progress::Failed(why)) => return Err(RolloutError::new(why)),
                Err(Progress::Waiting(_)) if !fresh => return Ok(repairs),
                Err(Progress::Waiting(why)) if Instant::now() >= deadline => {
                    return Err(RolloutError::new(format!(
                        "not healthy within the progress deadline ({}s): {why}",
                        self.context.rollout.progress_deadline_seconds
                    )));
                }
                Err(Progress::Waiting(why)) => {
                    self.context.status.update(|s| s.note = Some(why));
                    self.nodes.wait_report(WAIT_STEP).await;
                }
            }
        }
    }
}

enum Progress {
    Waiting(String),
    Failed(String),
}

fn in_pool(pool: &str, e: CloudError) -> RolloutError {
    RolloutError::from(CloudError {
        message: format!("pool {pool}: {}", e.message),
        transient: e.transient,
    })
}

impl<P: Provider> Pools<P> {
    pub fn new(context: Context, settings: Settings, provider: P, nodes: Arc<Nodes>) -> Self {
        Pools {
            context,
            settings,
            provider,
            nodes,
            placed: Mutex::default(),
            sizes: Mutex::default(),
            first_seen: Mutex::default(),
            made: Mutex::default(),
            scale: Autoscaler::default(),
            boot_failures: Mutex::default(),
            remembered: Mutex::default(),
            balancers_pruned: Mutex::default(),
        }
    }

    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// The pools the release uses (and those the customer keeps machines in regardless).
    fn specs(&self, stack: &Stack, wants: &[Want]) -> BTreeMap<String, PoolSpec> {
        let used: BTreeSet<&str> = wants.iter().map(|w| w.pool.as_str()).collect();
        self.settings
            .vm
            .pools
            .iter()
            .filter(|(name, pool)| used.contains(name.as_str()) || pool.min_machines > 0)
            .map(|(name, configured)| {
                let (pool, _) = self.effective(name, configured);
                let settings = settings_hash(&pool);
                let spec = PoolSpec {
                    stack: stack.name.clone(),
                    pool: name.clone(),
                    config: pool,
                    user_data: self.settings.bootstrap.user_data(&settings),
                    settings,
                };
                (name.clone(), spec)
            })
            .collect()
    }

    async fn shapes(
        &self,
        specs: &BTreeMap<String, PoolSpec>,
    ) -> Result<BTreeMap<String, Pool>, RolloutError> {
        let mut pools = BTreeMap::new();
        for (name, spec) in specs {
            let config = &spec.config;
            let known = self
                .sizes
                .lock()
                .ok()
                .and_then(|s| s.get(&config.instance_type).copied());
            let (cpu, memory) = match known {
                Some(size) => size,
                None => {
                    let size = self
                        .provider
                        .machine_size(&config.instance_type)
                        .await
                        .map_err(|e| in_pool(name, e))?;
                    if let Ok(mut sizes) = self.sizes.lock() {
                        sizes.insert(config.instance_type.clone(), size);
                    }
                    size
                }
            };
            pools.insert(
                name.clone(),
                Pool {
                    label: format!("{name} ({})", config.instance_type),
                    shape: Shape {
                        cpu: (cpu - config.reserved.cpu).max(0.0),
                        memory_bytes: memory.saturating_sub(config.reserved.memory_mib << 20),
                        gpus: config.gpus.clone(),
                    },
                    min: config.min_machines,
                    max: config.max_machines,
                },
            );
        }
        Ok(pools)
    }

    /// The groups of every pool (their machines are the only ones that may join as nodes).
    async fn groups(
        &self,
        stack: &Stack,
        specs: &BTreeMap<String, PoolSpec>,
    ) -> Result<BTreeMap<String, Group>, RolloutError> {
        let mut groups = BTreeMap::new();
        for name in specs.keys() {
            let group = self
                .provider
                .group(&stack.name, name)
                .await
                .map_err(|e| in_pool(name, e))?;
            groups.insert(name.clone(), group);
        }
        self.nodes.allow(
            groups
                .values()
                .flat_map(|g| &g.machines)
                .filter(|m| m.state != MachineState::Leaving)
                .map(|m| m.id.clone())
                .collect(),
        );
        Ok(groups)
    }

    /// Whether a node has gone quiet for longer than the customer allows.
    /// (A node that joined and never reported counts from its join.)
    fn silent(&self, node: &Node) -> bool {
        let timeout = Duration::from_secs(self.settings.vm.nodes.report_timeout_seconds);
        node.reported_at.unwrap_or(node.joined_at).elapsed() > timeout
    }

    /// Machines as placement sees them: usable once running, joined and reporting. (One on
    /// older settings stays usable until the rollout replaces it.)
    fn hosts(&self, machines: &[Machine], nodes: &BTreeMap<String, Node>) -> Vec<Host> {
        machines
            .iter()
            .filter(|m| m.state != MachineState::Leaving)
            .map(|m| {
                let usable = m.state == MachineState::Running
                    && nodes.get(&m.id).is_some_and(|n| !self.silent(n));
                Host {
                    id: m.id.clone(),
                    pool: m.pool.clone(),
                    zone: m.zone.clone(),
                    usable,
                }
            })
            .collect()
    }

    /// Asks each pool's group for the machines placement wants, and lets idle ones go.
    async fn size_pools(
        &self,
        release: &Release,
        stack: &Stack,
        groups: &BTreeMap<String, Group>,
        placement: &Placement,
        repairs: &mut Vec<Repair>,
    ) -> Result<(), RolloutError> {
        for (pool, group) in groups {
            let idle: Vec<&Machine> = group
                .machines
                .iter()
                .filter(|m| placement.surplus.contains(&m.id))
                .collect();
            for machine in &idle {
                self.remove_machine(release, stack, machine, true, "idle", repairs)
                    .await?;
            }
            // Each idle machine let go took one off its group's size.
            let now = group.desired.saturating_sub(idle.len() as u32);
            let Some(&desired) = placement.desired.get(pool) else {
                continue;
            };
            if now != desired {
                let step = format!("size pool {pool}: {now} -> {desired} machines");
                journaled(&self.context, "vm", &release.digest, &step, async {
                    self.provider
                        .set_desired(&stack.name, pool, desired)
                        .await
                        .map_err(|e| in_pool(pool, e))
                })
                .await?;
                repairs.push(Repair {
                    resource: pool.clone(),
                    what: step,
                });
            }
        }
        Ok(())
    }

    /// Terminates `machine` (a journaled step, recorded as a repair) saying `why`; `shrink`:
    /// its group's size goes down by one, else the group launches a replacement. Returns the
    /// step's description.
    async fn remove_machine(
        &self,
        release: &Release,
        stack: &Stack,
        machine: &Machine,
        shrink: bool,
        why: &str,
        repairs: &mut Vec<Repair>,
    ) -> Result<String, RolloutError> {
        let step = if shrink {
            format!(
                "let machine {} of pool {} go ({why})",
                machine.id, machine.pool
            )
        } else {
            format!(
                "replace machine {} of pool {} ({why})",
                machine.id, machine.pool
            )
        };
        journaled(&self.context, "vm", &release.digest, &step, async {
            self.provider
                .remove_machine(&stack.name, &machine.pool, &machine.id, shrink)
                .await
                .map_err(|e| in_pool(&machine.pool, e))
        })
        .await?;
        repairs.push(Repair {
            resource: machine.pool.clone(),
            what: step.clone(),
        });
        Ok(step)
    }

    /// A machine whose node stopped reporting, or never joined within the boot timeout, is
    /// terminated; its group launches another and its replicas are placed again meanwhile.
    async fn replace_lost(
        &self,
        release: &Release,
        stack: &Stack,
        machines: &[Machine],
        nodes: &BTreeMap<String, Node>,
        specs: &BTreeMap<String, PoolSpec>,
        repairs: &mut Vec<Repair>,
    ) -> Result<(), RolloutError> {
        let boot = Duration::from_secs(self.settings.vm.nodes.boot_timeout_seconds);
        let first_seen: BTreeMap<String, Instant> = match self.first_seen.lock() {
            Ok(mut seen) => {
                seen.retain(|id, _| machines.iter().any(|m| m.id == *id));
                for machine in machines {
                    seen.entry(machine.id.clone()).or_insert_with(Instant::now);
                }
                seen.clone()
            }
            Err(_) => BTreeMap::new(),
        };
        for machine in machines.iter().filter(|m| m.state != MachineState::Leaving) {
            let why = match nodes.get(&machine.id) {
                Some(node) if self.rolled_back(&machine.pool, &node.settings) => {
                    "it was launched with machine settings that were rolled back".to_string()
                }
                Some(node) if machine.state == MachineState::Running && self.silent(node) => {
                    format!(
                        "its node has not reported for {}s",
                        self.settings.vm.nodes.report_timeout_seconds
                    )
                }
                None if first_seen
                    .get(&machine.id)
                    .is_some_and(|at| at.elapsed() > boot) =>
                {
                    if let Some(spec) = specs.get(&machine.pool) {
                        self.boot_failed(release, spec, &machine.id);
                    }
                    format!(
                        "its node has not joined within {}s of launch",
                        self.settings.vm.nodes.boot_timeout_seconds
                    )
                }
                _ => continue,
            };
            let step = self
                .remove_machine(release, stack, machine, false, &why, repairs)
                .await?;
            event(
                &self.context.store,
                "machine-replaced",
                Some(&release.digest),
                &step,
            );
        }
        Ok(())
    }

    /// Machines launched with older settings (instance type, image, disk…) are replaced one at
    /// a time, only while everything runs healthy: the group launches the replacement from the
    /// new template and placement moves the replicas there. Returns the step if it replaced
    /// one.
    async fn replace_retired(
        &self,
        release: &Release,
        stack: &Stack,
        machines: &[Machine],
        nodes: &BTreeMap<String, Node>,
        specs: &BTreeMap<String, PoolSpec>,
        repairs: &mut Vec<Repair>,
    ) -> Result<Option<String>, RolloutError> {
        let retired = machines.iter().find(|m| {
            m.state == MachineState::Running
                && nodes.get(&m.id).is_some_and(|n| {
                    specs
                        .get(&m.pool)
                        .is_some_and(|spec| spec.settings != n.settings)
                })
        });
        let Some(machine) = retired else {
            return Ok(None);
        };
        let why = "launched with older machine settings";
        self.remove_machine(release, stack, machine, false, why, repairs)
            .await
            .map(Some)
    }

    /// Hands each joined machine its share. A fresh release reaches machines that run another
    /// one a machine at a time: the next only once every machine that has it is healthy on it.
    /// Machines new to the pool get it at once.
    fn assign(
        &self,
        release: &AssignedRelease,
        machines: &[Machine],
        nodes: &BTreeMap<String, Node>,
        mut shares: BTreeMap<String, Share>,
        fresh: bool,
    ) {
        let digest = release.digest;
        let (grants, pools) = (
            self.grants(),
            self.settings.vm.pools.keys().cloned().collect(),
        );
        let assignment = |machine: &Machine, share: Share| Assignment {
            generation: 0,
            release: Some(release.clone()),
            replicas: share.replicas,
            volumes: share.volumes,
            grants: grants.clone(),
            pools: Vec::clone(&pools),
            gpus: self
                .settings
                .vm
                .pools
                .get(&machine.pool)
                .map(|p| p.gpus.clone())
                .unwrap_or_default(),
            rollout: self.context.rollout.clone(),
            links: Default::default(),
        };
        let mut rolling = false;
        let mut waiting_for_turn = Vec::new();
        for machine in machines {
            let Some(node) = nodes.get(&machine.id) else {
                continue;
            };
            let share = shares.remove(&machine.id).unwrap_or_default();
            let has = node.assignment.release.as_ref().map(|r| r.digest);
            if has == Some(digest) {
                rolling |= !node_converged(node, &digest);
                self.nodes.assign(&machine.id, assignment(machine, share));
            } else if has.is_none() || node.assignment.replicas.is_empty() || !fresh {
                self.nodes.assign(&machine.id, assignment(machine, share));
            } else {
                waiting_for_turn.push((machine, share));
            }
        }
        // One machine at a time takes the new release.
        if !rolling && let Some((machine, share)) = waiting_for_turn.into_iter().next() {
            self.nodes.assign(&machine.id, assignment(machine, share));
        }
    }

    fn grants(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.settings
            .permissions
            .profiles()
            .filter_map(|p| {
                let grant = self.settings.permissions.grant(p).ok()?;
                Some((p.clone(), grant.environment))
            })
            .collect()
    }

    /// Done when every replica is placed on a machine that runs the release healthy.
    fn progress(
        &self,
        digest: &Digest,
        wants: &[Want],
        placement: &Placement,
        nodes: &BTreeMap<String, Node>,
    ) -> Result<(), Progress> {
        for (machine, node) in nodes {
            let Some(report) = &node.report else { continue };
            if report.generation == node.assignment.generation
                && node.assignment.release.as_ref().map(|r| r.digest) == Some(*digest)
                && let Some(error) = &report.error
            {
                return Err(Progress::Failed(format!("machine {machine}: {error}")));
            }
        }
        if !placement.waiting.is_empty() {
            return Err(Progress::Waiting(format!(
                "{} replicas wait for machines ({})",
                placement.waiting.len(),
                names(&placement.waiting)
            )));
        }
        let unready: Vec<ReplicaId> = wants
            .iter()
            .filter(|want| !ready(&want.id, digest, placement, nodes))
            .map(|want| want.id.clone())
            .collect();
        if unready.is_empty() {
            Ok(())
        } else {
            Err(Progress::Waiting(format!(
                "{} replicas not yet healthy on their machines ({})",
                unready.len(),
                names(&unready)
            )))
        }
    }
}

/// Whether `replica` runs healthy on its machine, whose node has converged on release
/// `digest`: what a rollout waits for, and what `status` counts as ready.
fn ready(
    replica: &ReplicaId,
    digest: &Digest,
    placement: &Placement,
    nodes: &BTreeMap<String, Node>,
) -> bool {
    placement
        .assigned
        .get(replica)
        .and_then(|machine| nodes.get(machine))
        .is_some_and(|node| {
            node_converged(node, digest)
                && node.report.as_ref().is_some_and(|report| {
                    report
                        .replicas
                        .iter()
                        .any(|seen| seen.replica == *replica && seen.healthy)
                })
        })
}

/// Whether the node runs its current assignment, of release `digest`, converged.
fn node_converged(node: &Node, digest: &Digest) -> bool {
    node.assignment.release.as_ref().map(|r| r.digest) == Some(*digest)
        && node.report.as_ref().is_some_and(|r| {
            r.generation == node.assignment.generation && r.converged == Some(*digest)
        })
}

fn names(replicas: &[ReplicaId]) -> String {
    let mut names: Vec<String> = replicas
        .iter()
        .take(5)
        .map(|r| format!("{}-{}", r.resource, r.ordinal))
        .collect();
    if replicas.len() > 5 {
        names.push(format!("and {} more", replicas.len() - 5));
    }
    names.join(", ")
}

#[cfg(test)]
mod tests;
