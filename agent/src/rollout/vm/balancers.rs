//! Public endpoints on VM pools: each gets a load balancer of its own (an application load
//! balancer for http, a network one for tcp) whose targets are the machines handed replicas
//! of its resource; the node on each machine forwards the endpoint's port to its replicas.
//! Internal ports stay on the machines.

use super::provider::{BalancerSpec, Machine, MachineState, Provider};
use super::volumes::Share;
use super::{Pools, event, in_pool, journaled};
use crate::config::{BalancerScheme, DEFAULT_POOL};
use crate::rollout::{Repair, RolloutError};
use crate::state::Release;
use crate::status::LoadBalancerStatus;
use outpost_bundle_format::stack::{Protocol, Stack};
use std::collections::{BTreeMap, BTreeSet};

impl<P: Provider> Pools<P> {
    /// The load balancers the release's public endpoints need.
    fn balancer_specs(&self, stack: &Stack) -> Vec<BalancerSpec> {
        let chosen = &self.settings.vm.load_balancers;
        let mut specs = Vec::new();
        for resource in &stack.resources {
            let c = &resource.container;
            let pool = self
                .settings
                .vm
                .pools
                .get(c.pool.as_deref().unwrap_or(DEFAULT_POOL));
            let or_pool =
                |own: &Vec<String>, of_pool: fn(&crate::config::PoolConfig) -> &Vec<String>| {
                    if own.is_empty() {
                        pool.map(of_pool).cloned().unwrap_or_default()
                    } else {
                        own.clone()
                    }
                };
            for endpoint in &c.public_endpoints {
                specs.push(BalancerSpec {
                    stack: stack.name.clone(),
                    resource: c.name.clone(),
                    endpoint: endpoint.name.clone(),
                    port: endpoint.port,
                    http: endpoint.protocol == Protocol::Http,
                    health_path: c
                        .health_check
                        .as_ref()
                        .map_or_else(|| "/".into(), |h| h.path.clone()),
                    internal: chosen.scheme == BalancerScheme::Internal,
                    subnets: or_pool(&chosen.subnets, |p| &p.subnets),
                    security_groups: or_pool(&chosen.security_groups, |p| &p.security_groups),
                    certificate_arn: chosen.certificate_arn.clone(),
                });
            }
        }
        specs
    }

    /// Makes each endpoint's load balancer when missing and points it at the machines handed
    /// a replica of its resource (a journaled step when that changes); `status` shows where
    /// each is reached.
    pub(super) async fn balance(
        &self,
        release: &Release,
        stack: &Stack,
        machines: &[Machine],
        shares: &BTreeMap<String, Share>,
        repairs: &mut Vec<Repair>,
    ) -> Result<(), RolloutError> {
        let mut reached = Vec::new();
        let mut shown = BTreeMap::new();
        for spec in self.balancer_specs(stack) {
            let label = spec.label();
            let at = |e| in_pool(&format!("load balancer of {label}"), e);
            let balancer = self.provider.ensure_balancer(&spec).await.map_err(at)?;
            let wanted: BTreeSet<String> = shares
                .iter()
                .filter(|(machine, share)| {
                    share.replicas.iter().any(|r| r.resource == spec.resource)
                        && machines
                            .iter()
                            .any(|m| m.id == **machine && m.state != MachineState::Leaving)
                })
                .map(|(machine, _)| machine.clone())
                .collect();
            let add: Vec<String> = wanted.difference(&balancer.targets).cloned().collect();
            let remove: Vec<String> = balancer.targets.difference(&wanted).cloned().collect();
            if !add.is_empty() || !remove.is_empty() {
                let step = format!(
                    "point the load balancer of {label} at {} (adding {}, removing {})",
                    list(&wanted),
                    list(&add),
                    list(&remove)
                );
                journaled(&self.context, "vm", &release.digest, &step, async {
                    self.provider
                        .set_targets(&spec, &add, &remove)
                        .await
                        .map_err(at)
                })
                .await?;
                repairs.push(Repair {
                    resource: spec.resource.clone(),
                    what: step,
                });
            }
            reached.push(format!("{label}: {}", spec.url(&balancer.dns)));
            shown.insert(
                label,
                LoadBalancerStatus {
                    dns: balancer.dns,
                    targets: wanted.into_iter().collect(),
                },
            );
        }
        self.context.status.update(|s| {
            s.endpoints = reached;
            s.load_balancers = shown;
        });
        Ok(())
    }
}

impl<P: Provider> Pools<P> {
    /// Deletes the load balancers of endpoints the release no longer has, once it converged
    /// (so a rollout that fails and rolls back finds its endpoints' balancers, and their DNS
    /// names, unchanged). Looked for once per release; a failure is shown and tried again on
    /// the next pass, never a reason to fail the release.
    pub(super) async fn prune_balancers(&self, release: &Release, stack: &Stack) {
        if self
            .balancers_pruned
            .lock()
            .is_ok_and(|done| *done == Some(release.digest))
        {
            return;
        }
        let wanted: BTreeSet<(String, String)> = self
            .balancer_specs(stack)
            .into_iter()
            .map(|spec| (spec.resource, spec.endpoint))
            .collect();
        let pruned = async {
            let found = self.provider.balancers(&stack.name).await?;
            for (resource, endpoint) in found.difference(&wanted) {
                let step = format!(
                    "delete the load balancer of {resource}.{endpoint} (its endpoint is gone)"
                );
                journaled(&self.context, "vm", &release.digest, &step, async {
                    self.provider
                        .delete_balancer(&stack.name, resource, endpoint)
                        .await
                        .map_err(RolloutError::from)
                })
                .await?;
                event(
                    &self.context.store,
                    "load-balancer-deleted",
                    Some(&release.digest),
                    &step,
                );
            }
            Ok::<_, RolloutError>(())
        };
        match pruned.await {
            Ok(()) => {
                if let Ok(mut done) = self.balancers_pruned.lock() {
                    *done = Some(release.digest);
                }
            }
            Err(e) => {
                tracing::warn!("load balancers of gone endpoints: {e}");
                self.context.status.update(|s| {
                    s.note = Some(format!("load balancers of gone endpoints: {e}"));
                });
            }
        }
    }
}

fn list<'a>(machines: impl IntoIterator<Item = &'a String>) -> String {
    let names: Vec<&str> = machines.into_iter().map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
