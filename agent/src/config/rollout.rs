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
        skip_serializing_if = "is_default_max_surge",
        deserialize_with = "max_surge"
    )]
    pub max_surge: Budget,
    /// Replicas of a stateful resource down at once while they are replaced (each is stopped
    /// before its successor starts on the same volume: never two copies of one ordinal): a
    /// count, or a percentage of its replicas rounded down (default 1); at least 1.
    #[serde(
        default = "default_max_unavailable",
        skip_serializing_if = "is_default_max_unavailable",
        deserialize_with = "max_unavailable"
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
        Ok(())
    }
}

/// A number of replicas: a count, or a percentage of a resource's replicas (`"25%"`). Only
/// valid budgets parse: a count of 1 or more, a percentage from 1% to 100%.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Count(u32),
    Percent(u32),
}

/// What a budget may be, for error messages.
const BUDGET_EXPECTED: &str = "a count of 1 or more, or a percentage from 1% to 100% like \"25%\"";

impl Budget {
    /// The budget for a resource of `replicas`: a percentage rounded up (`round_up`) or down,
    /// at least 1.
    pub fn of(&self, replicas: u32, round_up: bool) -> usize {
        let n = match *self {
            Budget::Count(n) => u64::from(n),
            Budget::Percent(percent) => {
                let share = u64::from(replicas) * u64::from(percent);
                if round_up {
                    share.div_ceil(100)
                } else {
                    share / 100
                }
            }
        };
        usize::try_from(n.max(1)).unwrap_or(usize::MAX)
    }
}

/// Text is a percentage (`"25%"`); a count is a number.
impl std::str::FromStr for Budget {
    type Err = String;

    fn from_str(text: &str) -> Result<Budget, String> {
        text.trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u32>().ok())
            .filter(|n| (1..=100).contains(n))
            .map(Budget::Percent)
            .ok_or_else(|| format!("{text:?} is not {BUDGET_EXPECTED}"))
    }
}

impl Serialize for Budget {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Budget::Count(n) => serializer.serialize_u32(n),
            Budget::Percent(n) => serializer.collect_str(&format_args!("{n}%")),
        }
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Budget, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Budget;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(BUDGET_EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Budget, E> {
                match u32::try_from(n) {
                    Ok(n @ 1..) => Ok(Budget::Count(n)),
                    _ => Err(E::custom(format!("{n} is not {BUDGET_EXPECTED}"))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Budget, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("{n} is not {BUDGET_EXPECTED}"))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Budget, E> {
                Err(E::custom(format!("{n} is not {BUDGET_EXPECTED}")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Budget, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A budget read for `key`, which its error names (serde gives the line, not the key).
fn budget_at<'de, D: serde::Deserializer<'de>>(
    key: &str,
    deserializer: D,
) -> Result<Budget, D::Error> {
    Budget::deserialize(deserializer).map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))
}
fn max_surge<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Budget, D::Error> {
    budget_at("rollout.max_surge", deserializer)
}
fn max_unavailable<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Budget, D::Error> {
    budget_at("rollout.max_unavailable", deserializer)
}

impl JsonSchema for Budget {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Budget".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A number of replicas: a count of 1 or more, or a percentage from 1% to 100% of a resource's replicas (\"25%\").",
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": u32::MAX},
                {"type": "string", "pattern": "^([1-9][0-9]?|100)%$"}
            ]
        })
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
    Budget::Percent(25)
}
fn default_max_unavailable() -> Budget {
    Budget::Count(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_counts_or_percentages_of_the_replicas() {
        let quarter = Budget::Percent(25);
        assert_eq!(quarter.of(50, true), 13);
        assert_eq!(quarter.of(50, false), 12);
        assert_eq!(quarter.of(1, true), 1);
        assert_eq!(quarter.of(3, false), 1, "at least one");
        assert_eq!(Budget::Count(4).of(2, true), 4);
        assert_eq!(Budget::Percent(100).of(7, false), 7);
    }

    #[test]
    fn a_budget_parses_only_when_valid_and_says_what_it_may_be() {
        let parse = |yaml: &str| serde_saphyr::from_str::<Budget>(yaml);
        assert_eq!(parse("3").unwrap(), Budget::Count(3));
        assert_eq!(parse("\"25%\"").unwrap(), Budget::Percent(25));
        assert_eq!(parse("100%").unwrap(), Budget::Percent(100));
        for bad in [
            "0",
            "-1",
            "1.5",
            "\"0%\"",
            "\"101%\"",
            "\"25\"",
            "quarter",
            "4294967296",
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(
                error.contains("a count of 1 or more, or a percentage from 1% to 100%"),
                "{bad}: {error}"
            );
        }
        for budget in [Budget::Count(3), Budget::Percent(25)] {
            let yaml = serde_json::to_string(&budget).unwrap();
            assert_eq!(parse(&yaml).unwrap(), budget, "{yaml}");
        }
        // In a config, the error names the key.
        let error = serde_saphyr::from_str::<RolloutConfig>("max_unavailable: 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("rollout.max_unavailable: 1.5 is not a count of 1 or more"),
            "{error}"
        );
    }
}
