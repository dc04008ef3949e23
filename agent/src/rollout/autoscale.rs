//! Autoscaling by measured load, shared by the container-engine and VM backends: each
//! autoscaled resource's replica count moves toward its CPU (and memory) targets from samples
//! of its running replicas, at most one change per cool-down, within its min and max.

use crate::runtime::Usage;
use outpost_bundle_format::stack::{Container, Scaling};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Autoscaler {
    /// The count chosen per resource, and when it last changed.
    chosen: Mutex<BTreeMap<String, (u32, Option<Instant>)>>,
}

impl Autoscaler {
    /// The counts chosen so far, by resource.
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.chosen
            .lock()
            .map(|c| c.iter().map(|(r, (n, _))| (r.clone(), *n)).collect())
            .unwrap_or_default()
    }

    /// Whether `container` (autoscaled) is due a decision: its cool-down has passed. With no
    /// count chosen yet (say, after a restart) the count is the `running` one, not `desired`:
    /// a busy service must not shrink because the agent restarted.
    pub fn due(&self, container: &Container, running: u32, cooldown: Duration) -> bool {
        let Scaling::Auto { min, max, .. } = container.scaling else {
            return false;
        };
        let Ok(mut chosen) = self.chosen.lock() else {
            return false;
        };
        let (_, changed) = chosen
            .entry(container.name.clone())
            .or_insert((running.clamp(min, max), None));
        changed.is_none_or(|at| at.elapsed() >= cooldown)
    }

    /// Moves `container`'s count toward its targets by the mean of `samples`. Returns the
    /// change, for the event log, when there is one.
    pub fn decide(&self, container: &Container, samples: &[Usage]) -> Option<String> {
        let Scaling::Auto {
            min,
            max,
            target_cpu_percent,
            target_memory_percent,
            ..
        } = container.scaling
        else {
            return None;
        };
        if samples.is_empty() {
            return None;
        }
        let n = samples.len() as f64;
        let cpu = samples.iter().map(|u| u.cpu_percent).sum::<f64>() / n;
        let memory = samples.iter().map(|u| u.memory_percent).sum::<f64>() / n;
        let mut ratio = cpu / f64::from(target_cpu_percent.max(1));
        if let Some(target) = target_memory_percent {
            ratio = ratio.max(memory / f64::from(target.max(1)));
        }
        let mut chosen = self.chosen.lock().ok()?;
        let count = chosen.get(&container.name).map_or(min, |(n, _)| *n);
        let wanted = ((f64::from(count) * ratio).ceil() as u32).clamp(min, max);
        if wanted == count {
            return None;
        }
        chosen.insert(container.name.clone(), (wanted, Some(Instant::now())));
        Some(format!(
            "{}: {count} -> {wanted} replicas (cpu {cpu:.0}%, memory {memory:.0}%)",
            container.name
        ))
    }
}
