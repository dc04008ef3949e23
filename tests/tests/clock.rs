//! The agent's wall clock jumping by hours, forwards and backwards, through its clock seam
//! (`OUTPOST_CLOCK_OFFSET_FILE`, read by debug builds only): a maintenance window opens by the
//! agent's clock, a pending release expires by it and stays dropped when the clock goes back,
//! and nothing else moves (the current release, the rollback floor, the source).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use chrono::{DateTime, Duration, Utc};
use outpost_bundle_format::bundle;
use outpost_tests::agent::{AgentProcess, drop_file};
use outpost_tests::forge::{metadata, quickstart, signed, tar};
use serde_json::Value;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// The agent's clock: the machine's plus an offset the test moves.
struct Clock {
    file: tempfile::NamedTempFile,
    offset: Duration,
}

impl Clock {
    /// A clock showing `at` now.
    fn at(at: DateTime<Utc>) -> Clock {
        let mut clock = Clock {
            file: tempfile::NamedTempFile::new().unwrap(),
            offset: Duration::zero(),
        };
        clock.jump(at - Utc::now());
        clock
    }

    fn jump(&mut self, by: Duration) {
        self.offset += by;
        std::fs::write(self.file.path(), self.offset.num_seconds().to_string()).unwrap();
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }
}

fn publish(drop: &std::path::Path, version: &str, sequence: u64, expires: DateTime<Utc>) {
    let mut release = metadata(version, sequence);
    release.expires = expires;
    let layout = signed(bundle::build(&quickstart(), &release, &[]).unwrap(), &BOTH);
    drop_file(drop, &format!("{version}.tar"), &tar(&layout));
}

#[test]
fn wall_clock_jumps_open_windows_and_expire_releases_and_move_nothing_else() {
    // 01:00 UTC tomorrow by the agent's clock; the window opens at 03:00 for an hour.
    let tomorrow = (Utc::now() + Duration::days(1)).date_naive();
    let mut clock = Clock::at(tomorrow.and_hms_opt(1, 0, 0).unwrap().and_utc());
    let drop = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start_with_env(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        "approval:\n  maintenance_windows:\n    - {cron: '0 3 * * *', duration: 1h, timezone: UTC}\n",
        &[(
            "OUTPOST_CLOCK_OFFSET_FILE",
            clock.file.path().to_str().unwrap(),
        )],
    );
    let forever = "2099-01-01T00:00:00Z".parse().unwrap();
    publish(drop.path(), "1.0.0", 1, forever);
    let window = format!("{tomorrow}T03:00:00Z");
    let status = agent.wait_for("1.0.0 waiting for the window", |s| {
        s["pending"]["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains(&window))
    });
    assert_eq!(status["current"], Value::Null);

    // Forwards two hours, into the window: it opens by the agent's clock.
    clock.jump(Duration::hours(2));
    agent.wait_within(20, "the window opened", |s| s["current"]["sequence"] == 1);

    // Backwards five hours (22:00 the day before): the current release stays; a new one,
    // expiring an hour from then, waits for the window five hours away.
    clock.jump(Duration::hours(-5));
    publish(drop.path(), "1.1.0", 2, clock.now() + Duration::hours(1));
    let status = agent.wait_for("1.1.0 waiting for the window", |s| {
        s["pending"]["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains(&window))
    });
    assert_eq!(status["current"]["sequence"], 1);

    // Forwards three hours (01:00): it expired while waiting and is dropped.
    clock.jump(Duration::hours(3));
    let status = agent.wait_within(20, "1.1.0 dropped as expired", |s| {
        s["pending"] == Value::Null
    });
    assert_eq!(status["current"]["sequence"], 1);
    let history = agent.cli(&["history", "-o", "json"]).stdout;
    assert!(history.contains("expired"), "{history}");

    // Backwards four hours, then forwards into the window: the expired release does not come
    // back, and nothing else moves.
    clock.jump(Duration::hours(-4));
    std::thread::sleep(std::time::Duration::from_secs(6));
    clock.jump(Duration::hours(6));
    std::thread::sleep(std::time::Duration::from_secs(6));
    let status = agent.status();
    assert_eq!(status["pending"], Value::Null, "{status:#}");
    assert_eq!(status["current"]["sequence"], 1, "{status:#}");
    assert_eq!(
        status["highest_sequence"], 2,
        "the floor still counts 1.1.0"
    );
    assert_eq!(agent.rejected_total(), 0);
}
