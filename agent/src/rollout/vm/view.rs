//! What `status` and `/metrics` show of VM pools: each pool's machines with their state and
//! replicas, and per resource the replicas wanted and reported healthy.

use super::Pools;
use super::nodes::Node;
use super::placement::{Placement, Want};
use super::provider::{Machine, MachineState, Provider};
use crate::status::{MachineStatus, PoolStatus};
use outpost_bundle_format::Digest;
use std::collections::BTreeMap;

impl<P: Provider> Pools<P> {
    /// Pools, machines and what runs where, for `status`.
    pub(super) fn show(
        &self,
        machines: &[Machine],
        nodes: &BTreeMap<String, Node>,
        placement: &Placement,
    ) {
        let mut pools: BTreeMap<String, PoolStatus> = BTreeMap::new();
        for (pool, desired) in &placement.desired {
            pools.entry(pool.clone()).or_default().desired = *desired;
        }
        for (name, configured) in &self.settings.vm.pools {
            if let (_, Some(problem)) = self.effective(name, configured) {
                pools.entry(name.clone()).or_default().problem = Some(problem);
            }
        }
        for machine in machines {
            let node = nodes.get(&machine.id);
            let state = match (machine.state, node) {
                (MachineState::Leaving, _) => "leaving".to_string(),
                (MachineState::Pending, _) | (_, None) => "booting".to_string(),
                (_, Some(node)) if self.silent(node) => "silent".to_string(),
                (_, Some(node)) => match &node.report {
                    Some(report) if report.error.is_some() => {
                        format!("unhealthy: {}", report.error.clone().unwrap_or_default())
                    }
                    Some(_) => "healthy".to_string(),
                    None => "joined".to_string(),
                },
            };
            let replicas = placement
                .assigned
                .iter()
                .filter(|(_, m)| **m == machine.id)
                .map(|(r, _)| format!("{}-{}", r.resource, r.ordinal))
                .collect();
            pools
                .entry(machine.pool.clone())
                .or_default()
                .machines
                .push(MachineStatus {
                    id: machine.id.clone(),
                    zone: machine.zone.clone(),
                    state,
                    replicas,
                });
        }
        self.context.status.update(|s| s.pools = pools);
    }

    /// Per resource, the replicas the release wants and those ready (healthy on a machine
    /// converged on it), for `status` and `/metrics`.
    pub(super) fn show_resources(
        &self,
        digest: &Digest,
        wants: &[Want],
        placement: &Placement,
        nodes: &BTreeMap<String, Node>,
    ) {
        let mut counts: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for want in wants {
            let healthy = super::ready(&want.id, digest, placement, nodes);
            let entry = counts.entry(want.id.resource.as_str()).or_default();
            entry.0 += 1;
            entry.1 += u64::from(healthy);
        }
        self.context.status.update(|s| {
            for (resource, (desired, ready)) in counts {
                let status = s.resources.entry(resource.to_string()).or_default();
                status.desired = Some(desired);
                status.ready = Some(ready);
            }
        });
    }
}
