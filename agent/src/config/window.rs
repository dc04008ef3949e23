//! Maintenance windows, parsed: a cron expression in a time zone, open for a duration.

use super::{MaintenanceWindow, chrono_duration};
use chrono::{DateTime, Duration, Utc};
use croner::Cron;

/// A maintenance window: opens at each cron match (in its time zone) for `duration`.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    duration: Duration,
    timezone: chrono_tz::Tz,
}

impl Window {
    pub fn parse(window: &MaintenanceWindow) -> Result<Window, String> {
        let cron: Cron = window
            .cron
            .parse()
            .map_err(|e| format!("cron {:?}: {e}", window.cron))?;
        let duration = chrono_duration(&window.duration).map_err(|e| format!("duration: {e}"))?;
        let timezone: chrono_tz::Tz = window
            .timezone
            .parse()
            .map_err(|_| format!("unknown time zone {:?}", window.timezone))?;
        Ok(Window {
            cron,
            duration,
            timezone,
        })
    }

    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.timezone);
        self.cron
            .find_previous_occurrence(&local, true)
            .is_ok_and(|start| now < start.with_timezone(&Utc) + self.duration)
    }

    pub fn next_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}
