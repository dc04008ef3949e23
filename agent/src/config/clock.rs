//! The agent's wall clock: one seam for every reading of the time of day.

use chrono::{DateTime, Utc};

/// The wall clock, in one place: what expiry, approval windows and records read. Timers that
/// measure elapsed time (backoff, polling, deadlines, probes) use the monotonic clock instead.
///
/// In debug builds (the integration tests') the file `OUTPOST_CLOCK_OFFSET_FILE` names may hold
/// a number of seconds added to the machine's clock, so a test moves the agent's wall clock
/// forwards and backwards without touching the machine's. Release builds have no such hook.
pub fn now() -> DateTime<Utc> {
    #[cfg(debug_assertions)]
    if let Some(shifted) = test_clock_offset().and_then(|o| Utc::now().checked_add_signed(o)) {
        return shifted;
    }
    Utc::now()
}

#[cfg(debug_assertions)]
fn test_clock_offset() -> Option<chrono::Duration> {
    let file = std::env::var_os("OUTPOST_CLOCK_OFFSET_FILE")?;
    let seconds: i64 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    chrono::Duration::try_seconds(seconds)
}
