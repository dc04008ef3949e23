//! Machine settings changes, and their automatic rollback. The settings each pool last
//! converged on are kept in the state store. While a pool moves to other settings (a new
//! instance type, image or disk in `vm.pools`), machines of the new settings that never join
//! count against them, and after [`FAILED_BOOTS`] the change is rolled back; so is it at once
//! when a machine of the new settings cannot run the release the others run. The pool then
//! launches from its last good settings again, the new machines are replaced, and it stays
//! there until the customer changes that pool's settings again.

use super::nodes::Node;
use super::provider::{Machine, PoolSpec, Provider};
use super::{Pools, event, settings_hash};
use crate::config::PoolConfig;
use crate::state::Release;
use std::collections::BTreeMap;

/// Machines of new settings that may fail to join before the change is rolled back.
pub const FAILED_BOOTS: u32 = 2;

fn good_key(pool: &str) -> String {
    format!("vm.pool.{pool}.good")
}

fn failed_key(pool: &str) -> String {
    format!("vm.pool.{pool}.failed")
}

/// Settings that were rolled back: their hash, and why, in one line.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Failed {
    settings: String,
    why: String,
}

impl<P: Provider> Pools<P> {
    /// A value kept in the state store, read once per process: every pass asks.
    fn remembered(&self, key: &str) -> Option<String> {
        if let Some(known) = self
            .remembered
            .lock()
            .ok()
            .and_then(|r| r.get(key).cloned())
        {
            return known;
        }
        // A read that fails is not remembered: the next pass asks again.
        let stored = self.context.store.setting(key).ok()?;
        if let Ok(mut remembered) = self.remembered.lock() {
            remembered.insert(key.to_string(), stored.clone());
        }
        stored
    }

    /// Keeps `value` under `key` in the state store (and in memory once it is there).
    fn remember(&self, key: &str, value: &str) -> crate::state::Result<()> {
        self.context.store.set_setting(key, Some(value))?;
        if let Ok(mut remembered) = self.remembered.lock() {
            remembered.insert(key.to_string(), Some(value.to_string()));
        }
        Ok(())
    }

    fn good(&self, pool: &str) -> Option<PoolConfig> {
        serde_json::from_str(&self.remembered(&good_key(pool))?).ok()
    }

    fn failed(&self, pool: &str) -> Option<Failed> {
        serde_json::from_str(&self.remembered(&failed_key(pool))?).ok()
    }

    /// Whether `settings` are the ones `pool` rolled back from: its machines go at once.
    pub(super) fn rolled_back(&self, pool: &str, settings: &str) -> bool {
        self.failed(pool).is_some_and(|f| f.settings == settings)
            && self
                .good(pool)
                .is_some_and(|g| settings_hash(&g) != settings)
    }

    /// The settings `pool` runs on: the customer's, unless those very settings were rolled
    /// back (then the last good ones, and why).
    pub(super) fn effective(
        &self,
        pool: &str,
        configured: &PoolConfig,
    ) -> (PoolConfig, Option<String>) {
        let wanted = settings_hash(configured);
        match (self.failed(pool), self.good(pool)) {
            (Some(failed), Some(good)) if failed.settings == wanted => {
                let problem = format!(
                    "machine settings {wanted} were rolled back ({}); running the last good settings ({}, {}) until vm.pools.{pool} changes",
                    failed.why, good.instance_type, good.image
                );
                (good, Some(problem))
            }
            _ => (configured.clone(), None),
        }
    }

    /// A machine of `spec`'s pool never joined. While the pool changes settings this counts
    /// against the new ones; at [`FAILED_BOOTS`] they are rolled back.
    pub(super) fn boot_failed(&self, release: &Release, spec: &PoolSpec, machine: &str) {
        self.count_against(release, spec, machine, FAILED_BOOTS, &|failures| {
            format!(
                "{failures} machines never joined, the last {machine}, with instance type {} and image {}",
                spec.config.instance_type, spec.config.image
            )
        });
    }

    /// Machines of new settings whose nodes cannot run the release that runs on the others
    /// (a drift pass: the release itself converged before): the settings are rolled back at
    /// once, since waiting would hold the change there for good.
    pub(super) fn judge_new_machines(
        &self,
        release: &Release,
        specs: &BTreeMap<String, PoolSpec>,
        machines: &[Machine],
        nodes: &BTreeMap<String, Node>,
    ) {
        for machine in machines {
            let (Some(spec), Some(node)) = (specs.get(&machine.pool), nodes.get(&machine.id))
            else {
                continue;
            };
            // A node that carried its assignment out and then could not observe its engine
            // reports an error too: only a failure to carry it out counts against the settings.
            let Some(error) = node.report.as_ref().and_then(|r| {
                (r.generation == node.assignment.generation && r.converged.is_none())
                    .then_some(r.error.as_ref())
                    .flatten()
            }) else {
                continue;
            };
            if node.settings == spec.settings {
                self.count_against(release, spec, &machine.id, 1, &|_| {
                    format!(
                        "machine {} with instance type {} and image {} could not run the release: {error}",
                        machine.id, spec.config.instance_type, spec.config.image
                    )
                });
            }
        }
    }

    /// Counts a failed machine against `spec`'s settings while its pool changes to them; at
    /// `threshold` machines the change is rolled back.
    fn count_against(
        &self,
        release: &Release,
        spec: &PoolSpec,
        machine: &str,
        threshold: u32,
        why: &dyn Fn(u32) -> String,
    ) {
        let Some(good) = self.good(&spec.pool) else {
            return;
        };
        if settings_hash(&good) == spec.settings {
            return;
        }
        let failures = match self.boot_failures.lock() {
            Ok(mut failed) => {
                let machines = failed
                    .entry((spec.pool.clone(), spec.settings.clone()))
                    .or_default();
                machines.insert(machine.to_string());
                machines.len() as u32
            }
            Err(_) => return,
        };
        if failures < threshold {
            return;
        }
        let failed = Failed {
            settings: spec.settings.clone(),
            why: why(failures),
        };
        let message = format!(
            "pool {}: machine settings {} rolled back to the last good ones: {}",
            spec.pool, failed.settings, failed.why
        );
        let stored = serde_json::to_string(&failed).unwrap_or_default();
        if let Err(e) = self.remember(&failed_key(&spec.pool), &stored) {
            tracing::warn!("{message}: not recorded: {e}");
            return;
        }
        tracing::warn!("{message}");
        event(
            &self.context.store,
            "machine-rollback",
            Some(&release.digest),
            &message,
        );
        self.context
            .status
            .update(|s| s.last_rollback = Some(message.clone()));
    }

    /// Every pool converged on its settings: they are the good ones from now on.
    pub(super) fn converged_on(&self, specs: &BTreeMap<String, PoolSpec>) {
        for (pool, spec) in specs {
            let Ok(config) = serde_json::to_string(&spec.config) else {
                continue;
            };
            if self.remembered(&good_key(pool)).as_deref() != Some(config.as_str())
                && let Err(e) = self.remember(&good_key(pool), &config)
            {
                tracing::warn!("pool {pool}: last good settings not recorded: {e}");
            }
        }
    }
}
