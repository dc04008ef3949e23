//! Maintenance windows, parsed: a cron expression in a time zone, open for a duration.

use super::zone::Zone;
use super::{MaintenanceWindow, chrono_duration};
use chrono::{DateTime, Duration, Utc};
use croner::Cron;

/// A maintenance window: opens at each cron match (in its time zone) for `duration`.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    duration: Duration,
    timezone: Zone,
}

impl Window {
    pub fn parse(window: &MaintenanceWindow) -> Result<Window, String> {
        check_fields(&window.cron).map_err(|e| format!("cron {:?}: {e}", window.cron))?;
        let cron: Cron = window
            .cron
            .parse()
            .map_err(|e| format!("cron {:?}: {e}", window.cron))?;
        let duration = chrono_duration(&window.duration).map_err(|e| format!("duration: {e}"))?;
        let timezone = Zone::named(&window.timezone)?;
        let parsed = Window {
            cron,
            duration,
            timezone,
        };
        // A cron that never matches (30 February) would be searched for on every check.
        if parsed.next_open(super::now()).is_none() {
            return Err(format!("cron {:?} matches no date", window.cron));
        }
        Ok(parsed)
    }

    /// Whether a window started within `duration` before `now`. Searched forwards from then,
    /// so the search is bounded by the duration and the cron's period (croner's backwards
    /// search from an instant long before any match runs for minutes).
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let since = (now - self.duration).with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&since, false)
            .is_ok_and(|start| start.with_timezone(&Utc) <= now)
    }

    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Five fields of comma-separated items: `*` or `?`, a number or name (with croner's `L`, `W`
/// and `#`: `5L`, `15W`, `FRI#1`), or a range, each with an optional `/step`. Croner accepts
/// more (empty items, say) that then match nothing, slowly.
fn check_fields(cron: &str) -> Result<(), String> {
    let fields: Vec<&str> = cron.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("{} fields, expected 5", fields.len()));
    }
    let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '#');
    for field in fields {
        for item in field.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (item, None),
            };
            let range_ok = range == "*"
                || range == "?"
                || match range.split_once('-') {
                    Some((from, to)) => word(from) && word(to),
                    None => word(range),
                };
            let step_ok =
                step.is_none_or(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()));
            if !range_ok || !step_ok {
                return Err(format!(
                    "field {field:?}: item {item:?} is not *, ?, N, N-M or one of them /STEP"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn window(cron: &str) -> Result<Window, String> {
        Window::parse(&MaintenanceWindow {
            cron: cron.into(),
            duration: "2h".into(),
            timezone: "Europe/Berlin".into(),
        })
    }

    /// Found by the maintenance_window fuzz target: croner accepted these and then searched
    /// for minutes (an empty list item; a window asked about long before its first match).
    #[test]
    fn crons_that_search_for_minutes_are_refused_or_bounded() {
        for cron in [
            ", * 1 * SAT",
            "0 0 30 2 *",
            "0 0 * * * *",
            "1,,2 * * * *",
            "*/ * * * *",
        ] {
            let started = std::time::Instant::now();
            assert!(window(cron).is_err(), "{cron}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{cron}"
            );
        }
        for cron in [
            "0 2 ? * FRI#1",
            "0 2 L * ?",
            "0 2 15W * *",
            "0 22 * * 1-5/2",
        ] {
            assert!(window(cron).is_ok(), "{cron}");
        }
        let hourly = window("1 * */1   * SAT").unwrap();
        let started = std::time::Instant::now();
        // Croner ORs day of month and day of week: minute 1 of every hour, so open.
        assert!(hourly.is_open(DateTime::<Utc>::UNIX_EPOCH));
        assert!(hourly.next_open(DateTime::<Utc>::UNIX_EPOCH).is_some());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn open_from_each_start_for_the_duration() {
        let window = window("0 2 * * SAT").unwrap();
        // 2026-11-28 is a Saturday; 02:00 in Berlin is 01:00 UTC.
        let at = |h, m| Utc.with_ymd_and_hms(2026, 11, 28, h, m, 0).unwrap();
        assert!(!window.is_open(at(0, 59)));
        assert!(window.is_open(at(1, 0)));
        assert!(window.is_open(at(2, 59)));
        assert!(!window.is_open(at(3, 0)));
    }
}
