//! A maintenance window (cron, duration, time zone: lines 1 to 3) never panics or hangs when
//! parsed or asked whether it is open at an instant (line 4, Unix seconds).
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use outpost_agent::config::{MaintenanceWindow, Window};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let (Some(cron), Some(duration), Some(timezone)) = (lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    let window = MaintenanceWindow {
        cron: cron.to_string(),
        duration: duration.to_string(),
        timezone: timezone.to_string(),
    };
    let Ok(window) = Window::parse(&window) else { return };
    let now = lines
        .next()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let open = window.is_open(now);
    if let Some(next) = window.next_open(now) {
        assert!(next > now || open);
    }
});
