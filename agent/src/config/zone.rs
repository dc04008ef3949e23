//! IANA time zones for maintenance windows, as a chrono [`TimeZone`] for croner. The rules come
//! from the host's tzdata (`/usr/share/zoneinfo`, kept current by the OS), else from the copy of
//! the database built into the agent (jiff's, for images without tzdata). jiff rather than
//! chrono-tz: chrono-tz compiles every zone into tables of pointers, which a position-independent
//! binary must relocate at start-up: a megabyte of memory held for the agent's lifetime.

use chrono::{FixedOffset, MappedLocalTime, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike};
use jiff::tz::AmbiguousOffset;
use std::io::Read;

const SYSTEM_TZDATA: &str = "/usr/share/zoneinfo";
/// TZif files are a few KiB (the largest on this project's CI machine: 3940 bytes).
const MAX_TZIF_BYTES: u64 = 256 * 1024;

/// A named time zone.
#[derive(Debug, Clone)]
pub struct Zone(jiff::tz::TimeZone);

/// An offset in a [`Zone`] (chrono keeps the zone with each date-time).
#[derive(Debug, Clone)]
pub struct ZoneOffset {
    zone: Zone,
    fixed: FixedOffset,
}

impl Zone {
    /// The zone of an IANA name such as `Europe/Berlin` (exact spelling).
    pub fn named(name: &str) -> Result<Zone, String> {
        let unknown = || format!("unknown time zone {name:?}");
        let well_formed = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
            });
        if !well_formed {
            return Err(unknown());
        }
        if let Some(tzif) = read_system_tzif(name) {
            return jiff::tz::TimeZone::tzif(name, &tzif)
                .map(Zone)
                .map_err(|e| format!("time zone {name:?}: {SYSTEM_TZDATA}/{name}: {e}"));
        }
        // The built-in copy matches names in any case: only the exact one is a zone here too.
        match jiff::tz::TimeZoneDatabase::bundled().get(name) {
            Ok(zone) if zone.iana_name() == Some(name) => Ok(Zone(zone)),
            _ => Err(unknown()),
        }
    }

    fn offset_at(&self, seconds: i32) -> ZoneOffset {
        ZoneOffset {
            zone: self.clone(),
            // jiff's offsets lie within ±25:59:59, chrono's within ±23:59:59; none in tzdata is
            // beyond ±15 hours.
            fixed: FixedOffset::east_opt(seconds).unwrap_or_else(|| chrono::Utc.fix()),
        }
    }
}

/// The host's TZif file for `name` (a well-formed name: no `.` or `..` part), if it has one.
fn read_system_tzif(name: &str) -> Option<Vec<u8>> {
    let file = std::fs::File::open(std::path::Path::new(SYSTEM_TZDATA).join(name)).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut tzif = Vec::new();
    file.take(MAX_TZIF_BYTES).read_to_end(&mut tzif).ok()?;
    Some(tzif)
}

impl Offset for ZoneOffset {
    fn fix(&self) -> FixedOffset {
        self.fixed
    }
}

impl TimeZone for Zone {
    type Offset = ZoneOffset;

    fn from_offset(offset: &ZoneOffset) -> Zone {
        offset.zone.clone()
    }

    fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<ZoneOffset> {
        self.offset_from_local_datetime(&local.and_time(chrono::NaiveTime::MIN))
    }

    fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> MappedLocalTime<ZoneOffset> {
        let Some(civil) = civil(local) else {
            return MappedLocalTime::None;
        };
        match self.0.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => {
                MappedLocalTime::Single(self.offset_at(offset.seconds()))
            }
            // Clocks jumped over this time: it never happened here.
            AmbiguousOffset::Gap { .. } => MappedLocalTime::None,
            // Clocks went back over it: it happened twice, first with the earlier offset.
            AmbiguousOffset::Fold { before, after } => MappedLocalTime::Ambiguous(
                self.offset_at(before.seconds()),
                self.offset_at(after.seconds()),
            ),
        }
    }

    fn offset_from_utc_date(&self, utc: &NaiveDate) -> ZoneOffset {
        self.offset_from_utc_datetime(&utc.and_time(chrono::NaiveTime::MIN))
    }

    fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> ZoneOffset {
        // Beyond jiff's range (years ±9999) the offset of its nearest end holds.
        let seconds = utc.and_utc().timestamp().clamp(
            jiff::Timestamp::MIN.as_second(),
            jiff::Timestamp::MAX.as_second(),
        );
        let instant = jiff::Timestamp::from_second(seconds).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        self.offset_at(self.0.to_offset(instant).seconds())
    }
}

/// A chrono local date-time as jiff's, if within jiff's range (years -9999 to 9999).
fn civil(local: &NaiveDateTime) -> Option<jiff::civil::DateTime> {
    use chrono::Datelike;
    let narrow = |n: u32| i8::try_from(n).ok();
    jiff::civil::DateTime::new(
        i16::try_from(local.year()).ok()?,
        narrow(local.month())?,
        narrow(local.day())?,
        narrow(local.hour())?,
        narrow(local.minute())?,
        // chrono writes a leap second as second 59 with nanoseconds over a billion.
        narrow(local.second())?,
        i32::try_from(local.nanosecond() % 1_000_000_000).ok()?,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(zone: &Zone, y: i32, m: u32, d: u32, h: u32, min: u32) -> MappedLocalTime<i32> {
        let local = NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap();
        zone.offset_from_local_datetime(&local)
            .map(|o| o.fix().local_minus_utc())
    }

    #[test]
    fn berlin_has_its_summer_time_gap_and_fold() {
        let berlin = Zone::named("Europe/Berlin").unwrap();
        assert_eq!(
            at(&berlin, 2026, 1, 15, 12, 0),
            MappedLocalTime::Single(3600)
        );
        assert_eq!(
            at(&berlin, 2026, 7, 15, 12, 0),
            MappedLocalTime::Single(7200)
        );
        // 29 March 2026, 02:30 did not happen; 25 October 2026, 02:30 happened twice.
        assert_eq!(at(&berlin, 2026, 3, 29, 2, 30), MappedLocalTime::None);
        assert_eq!(
            at(&berlin, 2026, 10, 25, 2, 30),
            MappedLocalTime::Ambiguous(7200, 3600)
        );
        let utc = NaiveDate::from_ymd_opt(2026, 7, 15)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        assert_eq!(
            berlin
                .offset_from_utc_datetime(&utc)
                .fix()
                .local_minus_utc(),
            7200
        );
    }

    #[test]
    fn the_built_in_database_knows_the_zones_too() {
        let bundled = jiff::tz::TimeZoneDatabase::bundled();
        for name in ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"] {
            assert!(bundled.get(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn names_that_are_not_exact_zone_names_are_refused() {
        for name in [
            "",
            "Europe/berlin",
            "europe/Berlin",
            "Mars/Olympus_Mons",
            "../../etc/passwd",
            "Europe/../Europe/Berlin",
            "/etc/localtime",
            "Europe//Berlin",
            "Europe",
        ] {
            assert_eq!(
                Zone::named(name).unwrap_err(),
                format!("unknown time zone {name:?}"),
                "{name}"
            );
        }
    }
}
