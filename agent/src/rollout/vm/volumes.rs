//! Stateful replicas' volumes on VM pools. Each ordinal with persistent storage has one volume,
//! made in the zone of the first machine that runs it and tagged with stack, resource and
//! ordinal; the replica is then placed only in that zone, and its volume is attached to
//! whichever machine runs it. A volume is detached only from a machine that has left its group
//! (the cloud detaches on termination), so two machines never hold it, and it is deleted only
//! when its ordinal is gone from the release and the customer set `vm.delete_volumes`.

use super::nodes::{AttachedVolume, Node};
use super::placement::{Placement, Want};
use super::provider::{Machine, Provider, Volume, VolumeState};
use super::{Pools, in_pool, journaled};
use crate::plan::ReplicaId;
use crate::rollout::{Repair, RolloutError, event};
use crate::state::Release;
use crate::status::VolumeStatus;
use outpost_bundle_format::stack::Stack;
use std::collections::BTreeMap;

/// Device names volumes are attached under (the root disk is `/dev/xvda`).
const DEVICES: &[&str] = &[
    "/dev/sdf", "/dev/sdg", "/dev/sdh", "/dev/sdi", "/dev/sdj", "/dev/sdk", "/dev/sdl", "/dev/sdm",
    "/dev/sdn", "/dev/sdo", "/dev/sdp",
];

/// What one machine is handed: the replicas placed on it (a stateful one only once its volume
/// is attached there) and those replicas' volumes.
#[derive(Debug, Default)]
pub(super) struct Share {
    pub replicas: Vec<ReplicaId>,
    pub volumes: Vec<AttachedVolume>,
}

/// The volume size, in GiB, each replica of the stack with persistent storage needs.
pub(super) fn stateful(stack: &Stack) -> BTreeMap<&str, u32> {
    stack
        .resources
        .iter()
        .filter_map(|r| {
            let bytes = r.container.persistent_storage.as_ref()?.bytes();
            let gib = bytes.div_ceil(1 << 30).clamp(1, u64::from(u32::MAX)) as u32;
            Some((r.container.name.as_str(), gib))
        })
        .collect()
}

impl<P: Provider> Pools<P> {
    /// Whether volumes need looking at: the stack has persistent storage, or volumes of
    /// ordinals gone may be deleted.
    pub(super) fn uses_volumes(&self, stack: &Stack) -> bool {
        !stateful(stack).is_empty() || self.settings.vm.delete_volumes
    }

    /// The stack's volumes, one per replica, with those this agent made that a describe does
    /// not show yet. Were there ever two, the attached one counts, else the lowest id.
    pub(super) async fn volumes(
        &self,
        stack: &Stack,
    ) -> Result<BTreeMap<ReplicaId, Volume>, RolloutError> {
        if !self.uses_volumes(stack) {
            return Ok(BTreeMap::new());
        }
        let mut described = self
            .provider
            .volumes(&stack.name)
            .await
            .map_err(|e| in_pool("volumes", e))?;
        if let Ok(mut made) = self.made.lock() {
            made.retain(|m| !described.iter().any(|v| v.id == m.id));
            described.extend(made.iter().cloned());
        }
        described.sort_by(|a, b| {
            (a.attachment.is_none(), a.id.len(), &a.id).cmp(&(
                b.attachment.is_none(),
                b.id.len(),
                &b.id,
            ))
        });
        let mut volumes = BTreeMap::new();
        for volume in described {
            volumes.entry(volume.replica.clone()).or_insert(volume);
        }
        Ok(volumes)
    }

    /// A replica whose volume exists is placed only in its volume's zone, and stays on the
    /// machine that holds it.
    pub(super) fn pin(
        wants: &mut [Want],
        previous: &mut BTreeMap<ReplicaId, String>,
        volumes: &BTreeMap<ReplicaId, Volume>,
    ) {
        for want in wants.iter_mut() {
            if let Some(volume) = volumes.get(&want.id) {
                want.zone = Some(volume.zone.clone());
                if let Some(attachment) = &volume.attachment {
                    previous.insert(want.id.clone(), attachment.machine.clone());
                }
            }
        }
    }

    /// Gets each placed stateful replica its volume on its machine: made in the machine's
    /// zone when it has none, detached from a machine that left the group, attached once
    /// available (each a journaled step). Returns each machine's share, and why the replicas
    /// left out of them wait.
    pub(super) async fn attach_volumes(
        &self,
        release: &Release,
        stack: &Stack,
        machines: &[Machine],
        placement: &Placement,
        volumes: &BTreeMap<ReplicaId, Volume>,
        repairs: &mut Vec<Repair>,
    ) -> Result<(BTreeMap<String, Share>, Vec<String>), RolloutError> {
        let sizes = stateful(stack);
        let mut ready = BTreeMap::new();
        let mut waiting = Vec::new();
        for (replica, machine_id) in &placement.assigned {
            let Some(&size_gib) = sizes.get(replica.resource.as_str()) else {
                continue;
            };
            let Some(machine) = machines.iter().find(|m| m.id == *machine_id) else {
                continue;
            };
            let name = format!("{}-{}", replica.resource, replica.ordinal);
            let Some(volume) = volumes.get(replica) else {
                let step = format!(
                    "make volume of {name} in zone {} ({size_gib} GiB)",
                    machine.zone
                );
                let made = journaled(&self.context, "vm", &release.digest, &step, async {
                    self.provider
                        .create_volume(&stack.name, replica, &machine.zone, size_gib)
                        .await
                        .map_err(|e| in_pool(&machine.pool, e))
                })
                .await?;
                if let Ok(mut mine) = self.made.lock() {
                    mine.push(made);
                }
                repairs.push(Repair {
                    resource: replica.resource.clone(),
                    what: step,
                });
                waiting.push(format!("{name}: volume being made"));
                continue;
            };
            match &volume.attachment {
                Some(at) if at.machine == machine.id => {
                    if at.attached {
                        ready.insert(
                            replica.clone(),
                            AttachedVolume {
                                replica: replica.clone(),
                                volume: volume.id.clone(),
                                device: at.device.clone(),
                            },
                        );
                    } else {
                        waiting.push(format!("{name}: volume {} attaching", volume.id));
                    }
                }
                Some(at) if machines.iter().any(|m| m.id == at.machine) => {
                    // Still on a machine of the pool (leaving, or about to): the cloud detaches
                    // it once that machine is gone; never pulled from under a running one.
                    waiting.push(format!(
                        "{name}: volume {} still attached to machine {}",
                        volume.id, at.machine
                    ));
                }
                Some(at) => {
                    let step = format!(
                        "detach volume {} of {name} from machine {} (gone from its pool)",
                        volume.id, at.machine
                    );
                    self.volume_step(release, replica, &step, repairs, async {
                        self.provider.detach_volume(&volume.id, &at.machine).await
                    })
                    .await?;
                    waiting.push(format!("{name}: volume {} detaching", volume.id));
                }
                None if volume.state == VolumeState::Available => {
                    let device = free_device(volumes, &machine.id).ok_or_else(|| {
                        RolloutError::new(format!(
                            "machine {}: no free device name for volume {} of {name}",
                            machine.id, volume.id
                        ))
                    })?;
                    let step = format!(
                        "attach volume {} of {name} to machine {} as {device}",
                        volume.id, machine.id
                    );
                    self.volume_step(release, replica, &step, repairs, async {
                        self.provider
                            .attach_volume(&volume.id, &machine.id, device)
                            .await
                    })
                    .await?;
                    waiting.push(format!("{name}: volume {} attaching", volume.id));
                }
                None if volume.state == VolumeState::Unusable => {
                    waiting.push(format!(
                        "{name}: volume {} is unusable (deleting or failed in the cloud)",
                        volume.id
                    ));
                }
                None => waiting.push(format!("{name}: volume {} being made", volume.id)),
            }
        }
        let mut shares: BTreeMap<String, Share> = BTreeMap::new();
        for (replica, machine) in &placement.assigned {
            let volume = ready.remove(replica);
            if sizes.contains_key(replica.resource.as_str()) && volume.is_none() {
                continue;
            }
            let share = shares.entry(machine.clone()).or_default();
            share.replicas.push(replica.clone());
            share.volumes.extend(volume);
        }
        Ok((shares, waiting))
    }

    /// Volumes of ordinals the release no longer has are kept, unless the customer set
    /// `vm.delete_volumes`: then each is detached once its node no longer runs the replica,
    /// and deleted once available.
    pub(super) async fn prune_volumes(
        &self,
        release: &Release,
        wanted: &[Want],
        volumes: &BTreeMap<ReplicaId, Volume>,
        nodes: &BTreeMap<String, Node>,
        repairs: &mut Vec<Repair>,
    ) -> Result<(), RolloutError> {
        if !self.settings.vm.delete_volumes {
            return Ok(());
        }
        for (replica, volume) in volumes {
            if wanted.iter().any(|w| w.id == *replica) {
                continue;
            }
            let name = format!("{}-{}", replica.resource, replica.ordinal);
            match &volume.attachment {
                Some(at) => {
                    let still_runs = nodes.get(&at.machine).is_some_and(|node| {
                        node.assignment.replicas.contains(replica)
                            || node.report.as_ref().is_none_or(|report| {
                                report.replicas.iter().any(|r| r.replica == *replica)
                            })
                    });
                    if still_runs || !at.attached {
                        continue;
                    }
                    let step = format!(
                        "detach volume {} of {name} from machine {} (gone from the release)",
                        volume.id, at.machine
                    );
                    self.volume_step(release, replica, &step, repairs, async {
                        self.provider.detach_volume(&volume.id, &at.machine).await
                    })
                    .await?;
                }
                None if volume.state == VolumeState::Available => {
                    let step = format!(
                        "delete volume {} of {name} (gone from the release; vm.delete_volumes is set)",
                        volume.id
                    );
                    self.volume_step(release, replica, &step, repairs, async {
                        self.provider.delete_volume(&volume.id).await
                    })
                    .await?;
                    event(
                        &self.context.store,
                        "volume-deleted",
                        Some(&release.digest),
                        &step,
                    );
                }
                None => {}
            }
        }
        Ok(())
    }

    async fn volume_step(
        &self,
        release: &Release,
        replica: &ReplicaId,
        step: &str,
        repairs: &mut Vec<Repair>,
        call: impl Future<Output = super::provider::CloudResult<()>>,
    ) -> Result<(), RolloutError> {
        journaled(&self.context, "vm", &release.digest, step, async {
            call.await.map_err(|e| in_pool("volumes", e))
        })
        .await?;
        repairs.push(Repair {
            resource: replica.resource.clone(),
            what: step.to_string(),
        });
        Ok(())
    }

    /// Volumes for `status`: where each is and in what state.
    pub(super) fn show_volumes(&self, volumes: &BTreeMap<ReplicaId, Volume>) {
        let shown = volumes
            .iter()
            .map(|(replica, volume)| {
                let state = match (&volume.attachment, volume.state) {
                    (Some(at), _) if at.attached => format!("attached to {}", at.machine),
                    (Some(at), _) => format!("moving to or from {}", at.machine),
                    (None, VolumeState::Available) => "available".to_string(),
                    (None, VolumeState::Creating) => "being made".to_string(),
                    (None, _) => "unusable".to_string(),
                };
                (
                    format!("{}-{}", replica.resource, replica.ordinal),
                    VolumeStatus {
                        id: volume.id.clone(),
                        zone: volume.zone.clone(),
                        size_gib: volume.size_gib,
                        state,
                    },
                )
            })
            .collect();
        self.context.status.update(|s| s.volumes = shown);
    }
}

/// The first device name no volume on `machine` uses.
fn free_device(volumes: &BTreeMap<ReplicaId, Volume>, machine: &str) -> Option<&'static str> {
    DEVICES.iter().copied().find(|device| {
        !volumes.values().any(|v| {
            v.attachment
                .as_ref()
                .is_some_and(|at| at.machine == machine && at.device == *device)
        })
    })
}
