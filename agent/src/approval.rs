//! Approve: whether a verified release may be applied now. Pure functions of the policy, the
//! releases, the customer's decisions and the time (passed in).

use crate::config::{ApprovalConfig, ApprovalMode, Change, Window};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// The semver change from `current` to `next`.
pub fn change(current: Option<&semver::Version>, next: &semver::Version) -> Change {
    match current {
        None => Change::Initial,
        Some(c) if c.major != next.major => Change::Major,
        Some(c) if c.minor != next.minor => Change::Minor,
        Some(c) if c.patch != next.patch => Change::Patch,
        Some(_) => Change::Other,
    }
}

pub fn mode_for(policy: &ApprovalConfig, change: Change) -> ApprovalMode {
    policy
        .rules
        .iter()
        .find(|r| r.change == change)
        .map(|r| r.mode)
        .unwrap_or(policy.mode)
}

/// What a pending release still waits for, in the order the customer must resolve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Ready,
    Waiting(String),
}

pub struct GateInput<'a> {
    pub policy: &'a ApprovalConfig,
    pub windows: &'a [Window],
    pub grants: &'a BTreeMap<String, serde_json::Value>,
    pub requested_profiles: Vec<String>,
    pub current_version: Option<&'a semver::Version>,
    pub pending_version: &'a semver::Version,
    pub approved_by_customer: bool,
    pub pinned: Option<&'a str>,
    pub now: DateTime<Utc>,
}

pub fn gate(input: &GateInput) -> Gate {
    let unmapped: Vec<&str> = input
        .requested_profiles
        .iter()
        .filter(|p| !input.grants.contains_key(*p))
        .map(String::as_str)
        .collect();
    if !unmapped.is_empty() {
        return Gate::Waiting(format!(
            "permissions need approval: map profile(s) {} in the config's `permissions`",
            unmapped.join(", ")
        ));
    }
    if let Some(pinned) = input.pinned {
        return Gate::Waiting(format!("pinned to {pinned} (outpost-agent unpin)"));
    }
    let change = change(input.current_version, input.pending_version);
    if mode_for(input.policy, change) == ApprovalMode::Manual && !input.approved_by_customer {
        return Gate::Waiting(format!(
            "approval ({} change): outpost-agent approve {}",
            change.as_str(),
            input.pending_version
        ));
    }
    if !input.windows.is_empty() && !input.windows.iter().any(|w| w.is_open(input.now)) {
        let next = input
            .windows
            .iter()
            .filter_map(|w| w.next_open(input.now))
            .min();
        return Gate::Waiting(match next {
            Some(at) => format!(
                "maintenance window (next opens {})",
                outpost_bundle_format::release::rfc3339::format(&at)
            ),
            None => "maintenance window".to_string(),
        });
    }
    Gate::Ready
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApprovalRule;
    use crate::config::MaintenanceWindow;
    use chrono::TimeZone;

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    fn input<'a>(
        policy: &'a ApprovalConfig,
        windows: &'a [Window],
        grants: &'a BTreeMap<String, serde_json::Value>,
        current: Option<&'a semver::Version>,
        pending: &'a semver::Version,
    ) -> GateInput<'a> {
        GateInput {
            policy,
            windows,
            grants,
            requested_profiles: vec!["execution".into()],
            current_version: current,
            pending_version: pending,
            approved_by_customer: false,
            pinned: None,
            now: Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap(),
        }
    }

    #[test]
    fn rules_by_semver_change() {
        let policy = ApprovalConfig {
            mode: ApprovalMode::Manual,
            rules: vec![ApprovalRule {
                change: Change::Patch,
                mode: ApprovalMode::Auto,
            }],
            maintenance_windows: vec![],
        };
        let grants = BTreeMap::from([("execution".to_string(), serde_json::json!({}))]);
        let (one, patch, major) = (v("1.0.0"), v("1.0.1"), v("2.0.0"));
        assert_eq!(
            gate(&input(&policy, &[], &grants, Some(&one), &patch)),
            Gate::Ready
        );
        assert!(
            matches!(gate(&input(&policy, &[], &grants, Some(&one), &major)), Gate::Waiting(w) if w.starts_with("approval (major change"))
        );
        let mut approved = input(&policy, &[], &grants, Some(&one), &major);
        approved.approved_by_customer = true;
        assert_eq!(gate(&approved), Gate::Ready);
        let mut pinned = input(&policy, &[], &grants, Some(&one), &patch);
        pinned.pinned = Some("1.0.0");
        assert!(matches!(gate(&pinned), Gate::Waiting(w) if w.starts_with("pinned to 1.0.0")));
    }

    #[test]
    fn unmapped_permissions_wait_first() {
        let policy = ApprovalConfig::default();
        let grants = BTreeMap::new();
        let one = v("1.0.0");
        assert!(
            matches!(gate(&input(&policy, &[], &grants, None, &one)), Gate::Waiting(w) if w.starts_with("permissions need approval"))
        );
    }

    #[test]
    fn maintenance_windows_in_their_time_zone() {
        let window = Window::parse(&MaintenanceWindow {
            cron: "0 2 * * *".into(),
            duration: "2h".into(),
            timezone: "Europe/Berlin".into(),
        })
        .unwrap();
        // 02:00-04:00 Berlin (UTC+1 in November) is 01:00-03:00 UTC.
        assert!(window.is_open(Utc.with_ymd_and_hms(2026, 11, 28, 1, 30, 0).unwrap()));
        assert!(!window.is_open(Utc.with_ymd_and_hms(2026, 11, 28, 3, 30, 0).unwrap()));
        assert_eq!(
            window.next_open(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()),
            Some(Utc.with_ymd_and_hms(2026, 11, 29, 1, 0, 0).unwrap())
        );
        let policy = ApprovalConfig::default();
        let grants = BTreeMap::from([("execution".to_string(), serde_json::json!({}))]);
        let one = v("1.0.0");
        let windows = [window];
        assert!(
            matches!(gate(&input(&policy, &windows, &grants, None, &one)), Gate::Waiting(w) if w == "maintenance window (next opens 2026-11-29T01:00:00Z)")
        );
        assert!(
            Window::parse(&MaintenanceWindow {
                cron: "nope".into(),
                duration: "2h".into(),
                timezone: "UTC".into()
            })
            .is_err()
        );
        assert!(
            Window::parse(&MaintenanceWindow {
                cron: "0 2 * * *".into(),
                duration: "2h".into(),
                timezone: "Mars/Olympus".into()
            })
            .is_err()
        );
    }
}
