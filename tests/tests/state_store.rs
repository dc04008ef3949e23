//! The state store under damage and a full disk. A damaged store (truncated, garbage, empty,
//! or mixed with another store's `-wal`): the real agent refuses to start with one line naming
//! the file and what to do (it never starts from an empty store, which would reset the
//! rollback floor), and `outpost-agent check-state` says whether a store is sound. A full
//! disk: a bundle that does not fit waits in place, the store stays sound.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::agent::{AgentProcess, drop_file};
use outpost_tests::forge::{release, signed, tar, with_image};
use outpost_tests::{binary, python, run};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// An agent that accepted and ran two releases, then stopped: its store is real.
fn used_agent() -> (AgentProcess, tempfile::TempDir) {
    let drop = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        "runtime: none\n",
    );
    for (version, sequence) in [("1.0.0", 1), ("1.1.0", 2)] {
        drop_file(
            drop.path(),
            &format!("acme-{version}.tar"),
            &tar(&signed(release(version, sequence), &BOTH)),
        );
        agent.wait_current(sequence);
    }
    agent.stop();
    (agent, drop)
}

/// `outpost-agent run` on `agent`'s config: it must exit (not start) within 20 s.
fn refused_start(agent: &AgentProcess) -> (i32, String) {
    let mut child = Command::new(binary("outpost-agent"))
        .arg("run")
        .arg("--config")
        .arg(agent.path("agent.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (status.code().unwrap_or(-1), stderr);
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the agent started on a damaged store");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_state(agent: &AgentProcess) -> (i32, String) {
    let done = run(Command::new(binary("outpost-agent"))
        .arg("check-state")
        .arg("--config")
        .arg(agent.path("agent.yaml")));
    (done.code, format!("{}{}", done.stdout, done.stderr))
}

#[track_caller]
fn assert_refused(agent: &AgentProcess, what: &str) {
    let (code, stderr) = refused_start(agent);
    assert_eq!(code, 2, "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line: {stderr}");
    let db = agent.path("state/state.db");
    assert!(
        lines[0].contains(&db.display().to_string())
            && lines[0].contains("refusing to start from an empty store")
            && lines[0].contains("restore it"),
        "{what}: {stderr}"
    );
    let (code, said) = check_state(agent);
    assert_eq!(code, 1, "{what}: check-state: {said}");
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_sound_store_checks_and_a_damaged_one_is_refused_naming_the_file() {
    let (agent, _drop) = used_agent();
    let (code, said) = check_state(&agent);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("sound (schema 3, 2 releases"), "{said}");
    let db = agent.path("state/state.db");
    let good = std::fs::read(&db).unwrap();
    assert!(good.len() > 8192, "{} bytes", good.len());

    truncate(&db, 0);
    assert_refused(&agent, "0 bytes");

    std::fs::write(&db, &good[..good.len() / 2]).unwrap();
    assert_refused(&agent, "cut in half");

    std::fs::write(&db, vec![0x5a; good.len()]).unwrap();
    assert_refused(&agent, "garbage");

    // Another program's SQLite database is not an Outpost store.
    std::fs::remove_file(&db).unwrap();
    let made = run(python()
        .arg("-c")
        .arg("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('create table t(x)'); c.commit()")
        .arg(&db));
    assert_eq!(made.code, 0, "{}", made.stderr);
    assert_refused(&agent, "another program's database");

    // Put back, it starts again where it was.
    std::fs::write(&db, &good).unwrap();
    let (code, said) = check_state(&agent);
    assert_eq!(code, 0, "{said}");
}

/// A `-wal` from another agent's store, laid beside this one's database, would silently make
/// it that store: the store's identity (kept in it and beside it) tells them apart.
#[test]
fn a_wal_from_another_store_is_refused() {
    let (agent, _drop) = used_agent();
    let (other, _other_drop) = used_agent();
    // The other store, written to (one event) and left with its -wal (as a crash would).
    let foreign = other.path("state/state.db");
    let copied = agent.path("state/state.db-wal");
    let script = "import sqlite3, shutil, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  c.execute('pragma wal_autocheckpoint=0')\n\
                  c.execute(\"insert into events(at, kind, message) values ('2026-01-01T00:00:00Z', 'x', 'x')\")\n\
                  c.commit()\n\
                  shutil.copy(sys.argv[1] + '-wal', sys.argv[2])\n\
                  import os; os._exit(0)\n";
    let made = run(python().arg("-c").arg(script).arg(&foreign).arg(&copied));
    assert_eq!(made.code, 0, "{}", made.stderr);
    assert!(std::fs::metadata(&copied).unwrap().len() > 0);
    let (code, stderr) = refused_start(&agent);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("a database or -wal from another store"),
        "{stderr}"
    );
    let (code, said) = check_state(&agent);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("from another store"), "{said}");
}

/// A tmpfs mounted over a directory for a test, unmounted when dropped.
struct Mounted(std::path::PathBuf);

impl Mounted {
    /// Moves what `dir` holds onto a fresh tmpfs of `mib` MiB mounted over it.
    fn tmpfs(dir: &Path, mib: u32) -> Mounted {
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside).unwrap();
        std::fs::create_dir(dir).unwrap();
        let mounted = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir));
        assert_eq!(mounted.code, 0, "mount: {}", mounted.stderr);
        let guard = Mounted(dir.to_path_buf());
        let copied = run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", aside.display()))
            .arg(dir));
        assert_eq!(copied.code, 0, "{}", copied.stderr);
        guard
    }

    fn resize(&self, mib: u32) {
        let done = run(Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0));
        assert_eq!(done.code, 0, "remount: {}", done.stderr);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `state_dir` on a small filesystem and a bundle bigger than the room left: the bundle stays
/// in the drop directory with "no space left" in `status`, the store stays sound and the
/// current release untouched; once there is room the bundle is read again and accepted.
#[test]
fn a_full_disk_leaves_the_bundle_in_place_and_the_store_sound() {
    let (mut agent, drop) = used_agent();
    let state = Mounted::tmpfs(&agent.path("state"), 4);
    agent.restart();
    agent.wait_current(2);
    let big = signed(with_image(release("1.2.0", 3), 16 << 20), &BOTH);
    drop_file(drop.path(), "acme-1.2.0.tar", &tar(&big));
    let status = agent.wait_within(60, "no space left in status", |st| {
        st["source"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no space left on device"))
    });
    let error = status["source"]["last_error"].as_str().unwrap();
    assert!(error.contains("acme-1.2.0.tar"), "{error}");
    assert_eq!(status["current"]["sequence"], 2, "{status:#}");
    assert!(drop.path().join("acme-1.2.0.tar").exists());
    assert!(!drop.path().join("rejected/acme-1.2.0.tar").exists());
    let (code, said) = check_state(&agent);
    assert_eq!(code, 0, "{said}");
    // Room again: read again, accepted, and nothing left behind in the spool.
    state.resize(64);
    agent.wait_within(120, "1.2.0 accepted once there is room", |st| {
        st["current"]["sequence"] == 3
    });
    let spool = agent.path("state/tmp");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?} left in {}", spool.display());
    agent.stop();
}

/// Fills the filesystem `dir` is on, up to the last byte; the filler is removed on drop.
struct Filler(std::path::PathBuf);

impl Filler {
    fn fill(dir: &Path) -> Filler {
        use std::io::Write as _;
        let path = dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        for _ in 0..1024 {
            if file.write_all(&[0]).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        Filler(path)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An agent on `source` runs release 1, then its `state_dir` moves to a tmpfs filled to the
/// last byte and release 2 is published (`publish(version, sequence)`): it waits with "no space
/// left on device" in `status`, the current release and the store untouched and nothing
/// rejected; once there is room it is fetched again and accepted.
fn full_disk_delays(source: &str, publish: impl Fn(&str, u64)) {
    publish("1.0.0", 1);
    let mut agent = AgentProcess::start(source, "");
    agent.wait_current(1);
    agent.stop();
    let state = Mounted::tmpfs(&agent.path("state"), 8);
    agent.restart();
    agent.wait_current(1);
    let filler = Filler::fill(&state.0);
    publish("1.1.0", 2);
    let status = agent.wait_within(60, "no space left in status", |st| {
        st["source"]["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("no space left on device"))
    });
    assert_eq!(status["current"]["sequence"], 1, "{status:#}");
    assert_eq!(
        status["last_rejection"],
        serde_json::Value::Null,
        "{status:#}"
    );
    let (code, said) = check_state(&agent);
    assert_eq!(code, 0, "{said}");
    drop(filler);
    agent.wait_within(60, "accepted once there is room", |st| {
        st["current"]["sequence"] == 2
    });
    assert_eq!(agent.rejected_total(), 0);
    agent.stop();
}

#[test]
fn a_full_disk_delays_registry_and_git_bundles_without_rejecting_them() {
    // The registry source fetches into memory: recording the bundle fails.
    let registry = outpost_tests::TestRegistry::start(None);
    full_disk_delays(
        &format!(
            "source:\n  oci:\n    reference: {}/acme/shop:stable\n    interval: 500ms\n",
            registry.host()
        ),
        |version, sequence| registry.push(&signed(release(version, sequence), &BOTH), "stable"),
    );
    // The git source: the fetch into state_dir/git fails.
    let vendor = outpost_tests::git::VendorRepo::new();
    full_disk_delays(
        &format!(
            "source:\n  git:\n    url: file://{}\n    ref: main\n    path: outpost/bundle.tar\n    interval: 500ms\n",
            vendor.bare().display()
        ),
        |version, sequence| {
            vendor.publish(&tar(&signed(release(version, sequence), &BOTH)), version)
        },
    );
}
