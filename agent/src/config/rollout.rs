//! `rollout`: how fast and how carefully releases roll, and how often drift is repaired.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// How long one rollout step (a replica becoming healthy) may take before the rollout
    /// fails and rolls back (default 300).
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_seconds: u64,
    /// Without a healthCheck, a replica counts as healthy once it has run this long (default 5).
    #[serde(default = "default_grace")]
    pub grace_seconds: u64,
    /// How often the runtime is observed and drift repaired (default 30).
    #[serde(default = "default_drift_interval")]
    pub drift_interval_seconds: u64,
    /// The least time between two autoscaling changes of a resource (default 60).
    #[serde(default = "default_cooldown")]
    pub autoscale_cooldown_seconds: u64,
    /// Steps in flight at once over the whole stack: replicas being created, replaced,
    /// started or removed, each with its health wait (default 16). It bounds the calls on the
    /// engine, so a small host is not flooded; 1 rolls one replica at a time.
    // Left out at their defaults, so VM nodes of an older release still read assignments.
    #[serde(
        default = "default_max_parallel",
        skip_serializing_if = "is_default_max_parallel"
    )]
    pub max_parallel: u32,
    /// Replicas of a stateless resource replaced at once, each by a new replica that must be
    /// healthy before the old one goes (so the resource keeps serving): a count, or a
    /// percentage of its replicas rounded up (default `25%`); at least 1.
    #[serde(
        default = "default_max_surge",
        skip_serializing_if = "is_default_max_surge"
    )]
    pub max_surge: Budget,
    /// Replicas of a stateful resource down at once while they are replaced (each is stopped
    /// before its successor starts on the same volume: never two copies of one ordinal): a
    /// count, or a percentage of its replicas rounded down (default 1); at least 1.
    #[serde(
        default = "default_max_unavailable",
        skip_serializing_if = "is_default_max_unavailable"
    )]
    pub max_unavailable: Budget,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            progress_deadline_seconds: default_progress_deadline(),
            grace_seconds: default_grace(),
            drift_interval_seconds: default_drift_interval(),
            autoscale_cooldown_seconds: default_cooldown(),
            max_parallel: default_max_parallel(),
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl RolloutConfig {
    pub(super) fn check(&self) -> Result<(), String> {
        for (what, value) in [
            (
                "rollout.progress_deadline_seconds",
                self.progress_deadline_seconds,
            ),
            (
                "rollout.drift_interval_seconds",
                self.drift_interval_seconds,
            ),
            ("rollout.max_parallel", u64::from(self.max_parallel)),
        ] {
            if value == 0 {
                return Err(format!("{what} must be at least 1"));
            }
        }
        self.max_surge.check("rollout.max_surge")?;
        self.max_unavailable.check("rollout.max_unavailable")
    }
}

/// A number of replicas: a count, or a percentage of a resource's replicas (`"25%"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Budget {
    Count(u32),
    /// `N%`, N from 1 to 100.
    Percent(String),
}

impl Budget {
    fn percent(&self) -> Option<Result<u32, ()>> {
        match self {
            Budget::Count(_) => None,
            Budget::Percent(text) => Some(
                text.strip_suffix('%')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| (1..=100).contains(n))
                    .ok_or(()),
            ),
        }
    }

    fn check(&self, at: &str) -> Result<(), String> {
        match (self, self.percent()) {
            (Budget::Count(0), _) => Err(format!("{at} must be at least 1")),
            (Budget::Percent(text), Some(Err(()))) => Err(format!(
                "{at}: {text:?} is neither a count nor a percentage from 1% to 100%"
            )),
            _ => Ok(()),
        }
    }

    /// The budget for a resource of `replicas`: a percentage rounded up (`round_up`) or down,
    /// at least 1.
    pub fn of(&self, replicas: u32, round_up: bool) -> usize {
        let n = match (self, self.percent()) {
            (Budget::Count(n), _) => u64::from(*n),
            (_, Some(Ok(percent))) => {
                let share = u64::from(replicas) * u64::from(percent);
                if round_up {
                    share.div_ceil(100)
                } else {
                    share / 100
                }
            }
            // Refused when the configuration is loaded.
            _ => 1,
        };
        usize::try_from(n.max(1)).unwrap_or(usize::MAX)
    }
}

fn default_progress_deadline() -> u64 {
    300
}
fn default_grace() -> u64 {
    5
}
fn default_drift_interval() -> u64 {
    30
}
fn default_cooldown() -> u64 {
    60
}
fn default_max_parallel() -> u32 {
    16
}
fn is_default_max_parallel(value: &u32) -> bool {
    *value == default_max_parallel()
}
fn is_default_max_surge(value: &Budget) -> bool {
    *value == default_max_surge()
}
fn is_default_max_unavailable(value: &Budget) -> bool {
    *value == default_max_unavailable()
}
fn default_max_surge() -> Budget {
    Budget::Percent("25%".into())
}
fn default_max_unavailable() -> Budget {
    Budget::Count(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_counts_or_percentages_of_the_replicas() {
        let quarter = Budget::Percent("25%".into());
        assert_eq!(quarter.of(50, true), 13);
        assert_eq!(quarter.of(50, false), 12);
        assert_eq!(quarter.of(1, true), 1);
        assert_eq!(quarter.of(3, false), 1, "at least one");
        assert_eq!(Budget::Count(4).of(2, true), 4);
        assert_eq!(Budget::Percent("100%".into()).of(7, false), 7);
        for (bad, expected) in [
            (Budget::Count(0), "must be at least 1"),
            (
                Budget::Percent("0%".into()),
                "neither a count nor a percentage",
            ),
            (
                Budget::Percent("25".into()),
                "neither a count nor a percentage",
            ),
            (
                Budget::Percent("101%".into()),
                "neither a count nor a percentage",
            ),
        ] {
            let error = bad.check("rollout.max_surge").unwrap_err();
            assert!(
                error.starts_with("rollout.max_surge") && error.contains(expected),
                "{error}"
            );
        }
    }
}
