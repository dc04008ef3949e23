//! What a release asks of the pools: every replica with what it needs and the pool it goes
//! to, autoscaled resources counted by the load their replicas' nodes report.

use super::placement::Want;
use super::provider::Provider;
use super::{Pools, event};
use crate::config::DEFAULT_POOL;
use crate::plan::ReplicaId;
use crate::rollout::RolloutError;
use outpost_bundle_format::stack::{Scaling, Stack};
use std::time::Duration;

impl<P: Provider> Pools<P> {
    /// Every replica of the release, with what it needs and the pool it goes to.
    pub(super) fn wants(&self, stack: &Stack) -> Result<Vec<Want>, RolloutError> {
        let mut wants = Vec::new();
        let counts = self.scale.counts();
        for resource in &stack.resources {
            let c = &resource.container;
            let pool = c.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
            if !self.settings.vm.pools.contains_key(&pool) {
                return Err(RolloutError::new(format!(
                    "resource {}: pool {pool:?} is not configured (config key vm.pools; configured: {})",
                    c.name,
                    self.settings
                        .vm
                        .pools
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            self.settings
                .permissions
                .grant(&c.permissions)
                .map_err(|e| RolloutError::new(format!("resource {}: {e}", c.name)))?;
            let count = counts
                .get(&c.name)
                .copied()
                .unwrap_or_else(|| c.scaling.initial());
            for ordinal in 0..count {
                wants.push(Want {
                    id: ReplicaId::new(&c.name, ordinal),
                    pool: pool.clone(),
                    cpu: c.cpu.desired,
                    memory_bytes: c.memory.bytes(),
                    gpu: c.gpu.as_ref().map(|g| (g.kind.clone(), g.count)),
                    zone: None,
                });
            }
        }
        Ok(wants)
    }

    /// Moves autoscaled resources toward their targets by the usage the nodes last reported
    /// for their healthy replicas (drift passes only, one change per cool-down).
    pub(super) fn autoscale(&self, stack: &Stack) {
        let cooldown = Duration::from_secs(self.context.rollout.autoscale_cooldown_seconds);
        let nodes = self.nodes.nodes();
        for resource in &stack.resources {
            let container = &resource.container;
            if !matches!(container.scaling, Scaling::Auto { .. }) {
                continue;
            }
            let running: Vec<_> = nodes
                .values()
                .filter_map(|n| n.report.as_ref())
                .flat_map(|r| r.replicas.iter())
                .filter(|r| r.replica.resource == container.name && r.healthy)
                .collect();
            if !self.scale.due(container, running.len() as u32, cooldown) {
                continue;
            }
            let samples: Vec<_> = running.iter().filter_map(|r| r.usage).collect();
            if let Some(change) = self.scale.decide(container, &samples) {
                event(&self.context.store, "autoscale", None, &change);
            }
        }
    }
}
