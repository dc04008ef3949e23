//! The agent with a file-drop source on real inotify: the attack suite, the customer's CLI
//! (status, plan, approve, reject, pin, history, verify), and kill -9 at any moment.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::agent::{AgentProcess, drop_file};
use outpost_tests::forge::{EntryKind, attacks, raw_tar, release, signed, tar, with_image};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

fn dir_agent(drop: &Path, extra: &str) -> AgentProcess {
    AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.display()),
        extra,
    )
}

#[track_caller]
fn wait_file(path: &Path) -> String {
    outpost_tests::eventually(&path.display().to_string(), || {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    })
}

#[test]
fn attack_suite_through_a_file_drop() {
    let drop = tempfile::tempdir().unwrap();
    let agent = dir_agent(drop.path(), "");
    let status = agent.status();
    for key in ["current", "pending", "last_rejection"] {
        assert_eq!(status[key], Value::Null, "{key} in {status:#}");
    }

    let v1 = signed(release("1.0.0", 1), &BOTH);
    drop_file(drop.path(), "acme-1.0.0.tar", &tar(&v1));
    agent.wait_current(1);
    assert!(
        wait_file(&drop.path().join("accepted/acme-1.0.0.tar.reason"))
            .starts_with("accepted 1.0.0")
    );
    assert!(drop.path().join("accepted/acme-1.0.0.tar").exists());
    drop_file(
        drop.path(),
        "acme-1.1.0.tar",
        &tar(&signed(release("1.1.0", 2), &BOTH)),
    );
    let before = agent.wait_current(2)["current"].clone();

    let suite = attacks(3, &v1);
    assert!(suite.len() >= 15);
    for attack in &suite {
        let name = format!("{}.tar", attack.name);
        drop_file(drop.path(), &name, &attack.tar);
        let reason = wait_file(&drop.path().join("rejected").join(format!("{name}.reason")));
        assert!(
            reason.starts_with(&format!("rejected: {}: ", attack.check)),
            "{}: {reason}",
            attack.name
        );
        assert!(drop.path().join("rejected").join(&name).exists());
        let status = agent.status();
        assert_eq!(
            status["current"], before,
            "{}: the current release changed",
            attack.name
        );
        assert_eq!(status["pending"], Value::Null, "{}", attack.name);
        let rejection = &status["last_rejection"];
        assert_eq!(
            rejection["check"], attack.check,
            "{}: {status:#}",
            attack.name
        );
        assert!(rejection["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(rejection["at"].as_str().is_some_and(|at| at.ends_with('Z')));
        // The same file checked offline by the customer gives the same named reason.
        let file = agent.path(&name);
        std::fs::write(&file, &attack.tar).unwrap();
        let offline = agent.cli(&["verify", file.to_str().unwrap()]);
        offline.fails(1, &format!("verification failed: {}: ", attack.check));
    }
    assert_eq!(agent.rejected_total(), suite.len() as u64);
    // A second agent on the same state directory is refused before it touches anything.
    let second = agent.cli(&["run"]);
    second.fails(2, "another outpost-agent is running");

    // An index naming the current digest, with nothing behind it, is not "unchanged".
    let current = signed(release("1.1.0", 2), &BOTH);
    let index = serde_json::to_vec(current.index()).unwrap();
    let hollow = raw_tar(&[
        (
            "oci-layout",
            EntryKind::File,
            b"{\"imageLayoutVersion\":\"1.0.0\"}",
            None,
        ),
        ("index.json", EntryKind::File, &index, None),
    ]);
    drop_file(drop.path(), "hollow.tar", &hollow);
    let reason = wait_file(&drop.path().join("rejected/hollow.tar.reason"));
    assert!(reason.starts_with("rejected: missing-blob"), "{reason}");

    // Still accepting the next valid bundle.
    let v3 = signed(release("1.2.0", 3), &BOTH);
    let file = agent.path("v3.tar");
    std::fs::write(&file, tar(&v3)).unwrap();
    let offline = agent.cli(&["verify", file.to_str().unwrap()]).ok();
    assert!(
        offline.stdout.contains("verified acme 1.2.0 sha256:"),
        "{}",
        offline.stdout
    );
    drop_file(drop.path(), "acme-1.2.0.tar", &tar(&v3));
    let status = agent.wait_current(3);
    assert_eq!(status["highest_sequence"], 3);
    assert!(
        status["current"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(status["current"]["version"], "1.2.0");

    // The current release again is a no-op, filed under accepted/.
    drop_file(drop.path(), "again.tar", &tar(&v3));
    assert!(wait_file(&drop.path().join("accepted/again.tar.reason")).starts_with("unchanged"));
}

#[test]
fn partial_and_dot_files_are_never_read() {
    let drop = tempfile::tempdir().unwrap();
    let agent = dir_agent(drop.path(), "");
    let bytes = tar(&signed(release("1.0.0", 1), &BOTH));
    // A half-written file: opened for writing and not closed yet, then its dot- and .partial
    // cousins, closed.
    use std::io::Write;
    let mut writing = std::fs::File::create(drop.path().join("slow.tar")).unwrap();
    writing.write_all(&bytes[..bytes.len() / 2]).unwrap();
    writing.flush().unwrap();
    std::fs::write(drop.path().join(".hidden.tar"), &bytes).unwrap();
    std::fs::write(drop.path().join("upload.tar.partial"), &bytes).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = agent.status();
    assert_eq!(status["current"], Value::Null);
    assert_eq!(
        status["last_rejection"],
        Value::Null,
        "a partial file was read: {status:#}"
    );
    assert!(
        drop.path().join(".hidden.tar").exists() && drop.path().join("upload.tar.partial").exists()
    );
    // A link dropped into the directory is refused, never followed; a FIFO is not read.
    let elsewhere = agent.path("elsewhere.tar");
    std::fs::write(&elsewhere, &bytes).unwrap();
    std::os::unix::fs::symlink(&elsewhere, drop.path().join(".link")).unwrap();
    std::fs::rename(drop.path().join(".link"), drop.path().join("link.tar")).unwrap();
    let reason = wait_file(&drop.path().join("rejected/link.tar.reason"));
    assert!(reason.starts_with("rejected: unsafe-path"), "{reason}");
    outpost_tests::run(std::process::Command::new("mkfifo").arg(drop.path().join("pipe.tar"))).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.status()["current"], Value::Null);
    // Left where it is: neither read (a hang) nor settled as a bundle.
    assert!(drop.path().join("pipe.tar").exists());
    assert!(!drop.path().join("rejected/pipe.tar").exists());
    assert!(!drop.path().join("accepted/pipe.tar").exists());
    // Finishing the write (close) makes it a candidate.
    writing.write_all(&bytes[bytes.len() / 2..]).unwrap();
    std::mem::drop(writing);
    agent.wait_current(1);
    // Filed once verified and recorded (the `.reason` is written before the move).
    wait_file(&drop.path().join("accepted/slow.tar.reason"));
    outpost_tests::eventually("slow.tar filed under accepted/", || {
        drop.path()
            .join("accepted/slow.tar")
            .exists()
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
}

fn post(agent: &AgentProcess, args: &[&str]) -> String {
    agent.cli(args).ok().stdout
}

#[test]
fn manual_approval_plan_reject_pin_and_history() {
    let drop = tempfile::tempdir().unwrap();
    let extra = "approval:\n  mode: manual\n  rules:\n    - {change: patch, mode: auto}\n";
    let agent = dir_agent(drop.path(), extra);

    drop_file(
        drop.path(),
        "v1.tar",
        &tar(&signed(release("1.0.0", 1), &BOTH)),
    );
    let status = agent.wait_for("pending 1.0.0", |s| s["pending"]["version"] == "1.0.0");
    assert!(
        status["pending"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("approval (initial change)"),
        "{status:#}"
    );
    assert_eq!(status["current"], Value::Null);
    assert_eq!(status["pending"]["sequence"], 1);
    let plan = post(&agent, &["plan"]);
    assert!(plan.contains("+ api (new resource"), "{plan}");
    agent
        .cli(&["approve", "2.0.0"])
        .fails(1, "the pending release is 1.0.0, not 2.0.0");
    // Approval can be bound to the digest the customer reviewed.
    let zeros = format!("sha256:{}", "0".repeat(64));
    agent
        .cli(&["approve", "1.0.0", "--digest", &zeros])
        .fails(1, "not the digest given");
    let digest = status["pending"]["digest"].as_str().unwrap().to_string();
    assert!(plan.contains(&digest), "{plan}");
    assert!(post(&agent, &["approve", "1.0.0", "--digest", &digest]).contains("now current"));
    agent.wait_current(1);

    // A patch goes through by rule; a minor waits; its plan shows field changes.
    drop_file(
        drop.path(),
        "v2.tar",
        &tar(&signed(release("1.0.1", 2), &BOTH)),
    );
    agent.wait_current(2);
    let mut stack = serde_json::to_value(outpost_tests::forge::quickstart()).unwrap();
    stack["resources"][0]["container"]["memory"] = "2Gi".into();
    stack["permissionProfiles"]["execution"]["aws"] =
        serde_json::json!(["s3:GetObject", "s3:PutObject"]);
    let minor = signed(
        outpost_tests::forge::with_stack(serde_json::to_vec(&stack).unwrap(), "1.1.0", 3),
        &BOTH,
    );
    drop_file(drop.path(), "v3.tar", &tar(&minor));
    agent.wait_for("pending 1.1.0", |s| s["pending"]["version"] == "1.1.0");
    let plan = post(&agent, &["plan"]);
    assert!(
        plan.contains("memory") && plan.contains("1Gi") && plan.contains("2Gi"),
        "{plan}"
    );
    assert!(plan.contains("permission"), "{plan}");
    let plan_json: Value =
        serde_json::from_str(&post(&agent, &["plan", "--output", "json"])).unwrap();
    assert_eq!(plan_json["pending"], "1.1.0");
    agent
        .cli(&["reject", "1.1.0", "--reason", " "])
        .fails(2, "--reason");
    assert!(
        post(
            &agent,
            &["reject", "1.1.0", "--reason", "needs a security review"]
        )
        .contains("rejected 1.1.0")
    );
    let status = agent.status();
    assert_eq!(status["pending"], Value::Null);
    assert_eq!(status["current"]["sequence"], 2);
    // The rejected release is not offered again.
    drop_file(drop.path(), "v3-again.tar", &tar(&minor));
    wait_file(&drop.path().join("rejected/v3-again.tar.reason"));

    // Pin holds even an auto-approved patch until unpin.
    agent
        .cli(&["pin", "1.0.0"])
        .fails(1, "only the current release (1.0.1) can be pinned");
    assert!(post(&agent, &["pin", "1.0.1"]).contains("pinned to 1.0.1"));
    drop_file(
        drop.path(),
        "v4.tar",
        &tar(&signed(release("1.0.2", 4), &BOTH)),
    );
    let status = agent.wait_for("pending 1.0.2", |s| s["pending"]["version"] == "1.0.2");
    assert!(
        status["pending"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("pinned to 1.0.1")
    );
    assert_eq!(status["pinned"], "1.0.1");
    assert!(post(&agent, &["unpin"]).contains("unpinned 1.0.1"));
    agent.wait_current(4);
    agent.cli(&["unpin"]).fails(1, "nothing is pinned");

    let history = post(&agent, &["history"]);
    for needle in [
        "approve  1.0.0 by tester",
        "reject   1.1.0 by tester",
        "needs a security review",
        "pin      1.0.1",
        "unpin",
    ] {
        assert!(
            history.contains(needle),
            "history lacks {needle:?}:\n{history}"
        );
    }
    let text = post(&agent, &["status"]);
    assert!(text.contains("current:   1.0.2 (sequence 4"), "{text}");
}

#[test]
fn unmapped_permission_profiles_wait() {
    let drop = tempfile::tempdir().unwrap();
    let agent = dir_agent(drop.path(), "permissions: {}\n");
    drop_file(
        drop.path(),
        "v1.tar",
        &tar(&signed(release("1.0.0", 1), &BOTH)),
    );
    let status = agent.wait_for("pending", |s| !s["pending"].is_null());
    assert!(
        status["pending"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("permissions need approval"),
        "{status:#}"
    );
    // Approving does not override the customer's permission policy.
    assert!(
        post(&agent, &["approve", "1.0.0"]).contains("still waiting for permissions need approval")
    );
}

#[test]
fn kill_9_at_any_moment_keeps_state_intact() {
    let drop = tempfile::tempdir().unwrap();
    let mut agent = dir_agent(drop.path(), "");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    // Bundles carrying a 48 MiB image: killed while reading, verifying or recording.
    for sequence in 1..=10u64 {
        let version = format!("1.{sequence}.0");
        let bundle = signed(with_image(release(&version, sequence), 48 << 20), &BOTH);
        drop_file(drop.path(), &format!("v{sequence}.tar"), &tar(&bundle));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 300_000));
        agent.kill();
        agent.restart();
        // Killed while reading or judging the file, the agent files it rather than read it
        // blindly again (an input that killed it would otherwise do so at every start); the
        // customer drops it again.
        let name = format!("v{sequence}.tar");
        let filed = drop.path().join("rejected").join(&name);
        let interrupted =
            outpost_tests::eventually("the release current, or its file filed", || {
                if agent.status()["current"]["sequence"] == sequence {
                    return Ok(false);
                }
                match std::fs::read_to_string(filed.with_file_name(format!("{name}.reason"))) {
                    Ok(reason) if filed.exists() => {
                        Ok(reason.starts_with("rejected: interrupted: "))
                    }
                    _ => Err("neither yet".to_string()),
                }
            });
        if interrupted {
            let reason = wait_file(&filed.with_file_name(format!("{name}.reason")));
            assert!(
                reason.contains("the agent stopped while reading this file"),
                "{reason}"
            );
            std::fs::remove_file(filed.with_file_name(format!("{name}.reason"))).unwrap();
            std::fs::rename(&filed, drop.path().join(&name)).unwrap();
            agent.restart();
        }
        let status = agent.wait_current(sequence);
        assert_eq!(status["highest_sequence"], sequence);
        let rejection = &status["last_rejection"];
        assert!(
            rejection.is_null() || rejection["check"] == "interrupted",
            "{status:#}"
        );
    }
    // Rollback protection survived every restart, and a deleted download cache.
    let _ = std::fs::remove_dir_all(agent.path("state/tmp"));
    agent.restart();
    drop_file(
        drop.path(),
        "old.tar",
        &tar(&signed(release("1.3.0", 3), &BOTH)),
    );
    assert!(
        wait_file(&drop.path().join("rejected/old.tar.reason")).starts_with("rejected: rollback")
    );
    let history = agent.cli(&["history", "--limit", "1000"]).ok().stdout;
    assert!(history.contains("1.10.0"), "{history}");
    // No spooled download survives a restart.
    let leftovers = std::fs::read_dir(agent.path("state/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);
}

/// Restarts the agent and checks that it files nothing again (no file is read twice).
fn restart_files_nothing(agent: &mut AgentProcess) {
    let last = agent.status()["last_rejection"].clone();
    agent.restart();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.rejected_total(), 0);
    assert_eq!(agent.status()["last_rejection"], last);
}

/// The crash marker: a file the agent died reading is filed at the next start, with the
/// reason, and nothing else changes; the marker is gone once the file is settled.
#[test]
fn a_file_the_agent_died_reading_is_filed_not_read_again() {
    let drop = tempfile::tempdir().unwrap();
    let mut agent = dir_agent(drop.path(), "");
    drop_file(
        drop.path(),
        "v1.tar",
        &tar(&signed(release("1.0.0", 1), &BOTH)),
    );
    let before = agent.wait_current(1)["current"].clone();
    // Settled (filed, then the marker removed) just after it became current.
    wait_file(&drop.path().join("accepted/v1.tar.reason"));
    outpost_tests::eventually("the crash marker removed", || {
        (!agent.path("state/dir-source.reading").exists())
            .then_some(())
            .ok_or_else(|| "still there".to_string())
    });
    // As if the agent had died while reading v2.tar (what a crash or a kill -9 leaves).
    agent.kill();
    let v2 = tar(&signed(release("1.1.0", 2), &BOTH));
    drop_file(drop.path(), "v2.tar", &v2);
    std::fs::write(agent.path("state/dir-source.reading"), "v2.tar").unwrap();
    agent.restart();
    let reason = wait_file(&drop.path().join("rejected/v2.tar.reason"));
    assert_eq!(
        reason,
        "rejected: interrupted: v2.tar: the agent stopped while reading this file\n"
    );
    assert!(drop.path().join("rejected/v2.tar").exists());
    let status = agent.status();
    assert_eq!(status["current"], before);
    assert_eq!(status["last_rejection"]["check"], "interrupted");
    assert!(!agent.path("state/dir-source.reading").exists());
    // Dropped again by the customer, it is read and accepted.
    drop_file(drop.path(), "v2-again.tar", &v2);
    agent.wait_current(2);
    // A restart finds no marker and files nothing more.
    restart_files_nothing(&mut agent);
}

/// A file whose name is not UTF-8 is filed under its own bytes, once, not read at every start.
#[test]
fn a_file_with_a_non_utf8_name_is_filed_once() {
    use std::os::unix::ffi::OsStrExt;
    let drop = tempfile::tempdir().unwrap();
    let mut agent = dir_agent(drop.path(), "");
    let name = std::ffi::OsStr::from_bytes(b"bundle-\xff\xfe.tar");
    let partial = drop.path().join(".partial-name.partial");
    std::fs::write(&partial, outpost_tests::forge::garbage()).unwrap();
    std::fs::rename(&partial, drop.path().join(name)).unwrap();
    let mut reason_name = name.to_os_string();
    reason_name.push(".reason");
    let reason = wait_file(&drop.path().join("rejected").join(&reason_name));
    assert!(reason.starts_with("rejected: malformed: "), "{reason}");
    assert!(drop.path().join("rejected").join(name).exists());
    assert!(!drop.path().join(name).exists());
    restart_files_nothing(&mut agent);
}

#[test]
fn root_rotation_survives_restarts_and_fails_closed() {
    use outpost_bundle_format::bundle;
    use outpost_tests::forge::{metadata, quickstart, roots, rotated_root};
    let drop = tempfile::tempdir().unwrap();
    let (v1, v2_unsigned) = roots();
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("root.json"), &v1).unwrap();
    let trust = format!(
        "trust:\n  root: {}\n",
        keys.path().join("root.json").display()
    );
    let mut agent = dir_agent(drop.path(), &trust);
    // Release 1 carries root v2 (vendor-a → vendor-b) and is signed by the new key.
    let v2 = rotated_root(&v2_unsigned);
    let carrying = signed(
        bundle::build(
            &quickstart(),
            &metadata("1.0.0", 1),
            std::slice::from_ref(&v2),
        )
        .unwrap(),
        &["vendor-b"],
    );
    // The verified v2 beside the unsigned draft of v2 (`root rotate`'s output): refused, so
    // the draft can never be saved as the chain's v2 and brick the next start.
    let with_draft = outpost_tests::forge::signed_unchecked(
        bundle::build(
            &quickstart(),
            &metadata("0.9.0", 1),
            &[v2.clone(), v2_unsigned.clone()],
        )
        .unwrap(),
        &["vendor-b"],
    );
    drop_file(drop.path(), "draft.tar", &tar(&with_draft));
    let reason = wait_file(&drop.path().join("rejected/draft.tar.reason"));
    assert!(
        reason.starts_with("rejected: trust-root: two carried roots have version 2"),
        "{reason}"
    );
    agent.restart();
    drop_file(drop.path(), "v1.tar", &tar(&carrying));
    agent.wait_current(1);
    let saved = std::fs::read(agent.path("state/roots/2.root.json")).unwrap();
    assert_eq!(saved, v2);
    // After a restart trust stands at v2: vendor-b alone signs, vendor-a alone no longer does.
    agent.restart();
    drop_file(
        drop.path(),
        "revoked.tar",
        &tar(&signed(release("1.1.0", 2), &["vendor-a"])),
    );
    assert!(
        wait_file(&drop.path().join("rejected/revoked.tar.reason"))
            .starts_with("rejected: untrusted-signature")
    );
    drop_file(
        drop.path(),
        "v2.tar",
        &tar(&signed(release("1.1.0", 2), &["vendor-b"])),
    );
    agent.wait_current(2);
    // Losing the saved chain must not bring the revoked key back.
    agent.stop();
    std::fs::remove_dir_all(agent.path("state/roots")).unwrap();
    agent
        .cli(&["run"])
        .fails(2, "refusing to fall back to older keys");
}

/// An agent serving metrics on a free TCP port, with release 1 current.
fn metrics_agent(drop: &Path) -> (AgentProcess, u16) {
    let port = outpost_tests::free_port();
    // Indented: it continues the `api:` mapping the harness writes.
    let agent = dir_agent(drop, &format!("  metrics_address: 127.0.0.1:{port}\n"));
    drop_file(drop, "v1.tar", &tar(&signed(release("1.0.0", 1), &BOTH)));
    agent.wait_current(1);
    (agent, port)
}

#[test]
fn metrics_are_served_over_tcp_when_asked_and_nothing_else() {
    use outpost_tests::engine::http_body;
    let drop = tempfile::tempdir().unwrap();
    let (_agent, port) = metrics_agent(drop.path());
    let metrics = outpost_tests::eventually("metrics over TCP", || {
        http_body(port, "/metrics")
            .filter(|m| m.contains("outpost_bundles_accepted_total 1"))
            .ok_or_else(|| "no metrics yet".to_string())
    });
    assert!(metrics.contains("outpost_current_sequence 1"), "{metrics}");
    assert_eq!(http_body(port, "/healthz").as_deref(), Some("ok\n"));
    // Decisions and status stay on the unix socket.
    for path in ["/status", "/approve", "/history"] {
        assert_eq!(
            http_body(port, path).as_deref(),
            Some("only /metrics and /healthz here\n"),
            "{path}"
        );
    }
}

/// `log.format: json`: every line one JSON object with level and message, and lines about a
/// release carry its digest.
#[test]
fn json_logs_are_one_object_per_line_with_the_release_digest() {
    let drop = tempfile::tempdir().unwrap();
    let agent = dir_agent(drop.path(), "log: {format: json, level: debug}\n");
    let v1 = signed(release("1.0.0", 1), &BOTH);
    drop_file(drop.path(), "v1.tar", &tar(&v1));
    let digest = agent.wait_current(1)["current"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    drop_file(drop.path(), "junk.tar", b"junk");
    wait_file(&drop.path().join("rejected/junk.tar.reason"));
    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        assert!(line["level"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
    }
    let accepted = lines
        .iter()
        .find(|l| l["message"].as_str().unwrap().starts_with("accepted 1.0.0"))
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(accepted["digest"], digest.as_str(), "{accepted}");
    assert_eq!(accepted["level"], "INFO");
    let rejected = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .starts_with("rejected: malformed")
        })
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(rejected["level"], "WARN");
}

/// The exposition passes `promtool check metrics` with nothing to lint, a real Prometheus server
/// scrapes it and answers PromQL about the agent, and the example alert rules are valid.
#[test]
fn a_real_prometheus_scrapes_the_agent() {
    use outpost_tests::engine::http_body;
    use outpost_tests::prometheus::{TestPrometheus, promtool};
    let drop = tempfile::tempdir().unwrap();
    let (_agent, port) = metrics_agent(drop.path());
    drop_file(drop.path(), "junk.tar", b"junk");
    wait_file(&drop.path().join("rejected/junk.tar.reason"));
    let metrics = http_body(port, "/metrics").unwrap();
    for line in [
        "outpost_bundles_rejected_total{check=\"malformed\"} 1",
        "outpost_current_sequence 1",
        "outpost_source_polls_total{result=\"ok\"} 2",
        "# TYPE outpost_verification_seconds histogram",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    assert!(metrics.contains("outpost_build_info{"), "{metrics}");
    // Every name of the first, hand-written exposition is still there.
    for name in [
        "outpost_source_polls_total",
        "outpost_source_errors_total",
        "outpost_bundles_accepted_total",
        "outpost_bundles_rejected_total",
        "outpost_bundles_unchanged_total",
        "outpost_last_poll_timestamp_seconds",
        "outpost_current_sequence",
        "outpost_highest_accepted_sequence",
        "outpost_pending_release",
        "outpost_rollouts_total",
        "outpost_rollbacks_total",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    let (code, lint) = promtool(&["check", "metrics"], &metrics);
    assert_eq!((code, lint.as_str()), (0, ""), "{metrics}");

    let prometheus = TestPrometheus::start(&[format!("127.0.0.1:{port}")]);
    let sequence =
        outpost_tests::poll_within(30, || prometheus.query_value("outpost_current_sequence"));
    assert_eq!(sequence, Some(1.0), "{}", prometheus.log());
    let rejected =
        prometheus.query_value("sum(outpost_bundles_rejected_total{check=\"malformed\"})");
    assert_eq!(rejected, Some(1.0));
    let up = prometheus.query_value("up{job=\"outpost\"}");
    assert_eq!(up, Some(1.0));

    let rules = outpost_tests::repo().join("deploy/prometheus/outpost-alerts.yaml");
    let (code, output) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("SUCCESS: 5 rules found"), "{output}");
}

/// `support-bundle`: a .tar.gz tar can read, with status, history and the redacted config of a
/// running agent; no secret from a config holding every kind appears anywhere in it.
#[test]
fn a_support_bundle_holds_no_secret() {
    let drop = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    for (file, secret) in [
        ("registry.pw", "SECRET-REGISTRY-PASSWORD"),
        ("creds", "SECRET-GRANTED-FILE"),
    ] {
        std::fs::write(secrets.path().join(file), secret).unwrap();
    }
    let mut agent = dir_agent(
        drop.path(),
        &format!(
            "permissions:\n  execution:\n    environment: {{API_TOKEN: SECRET-GRANT-ENV}}\n    files: {{/run/creds: {}}}\n",
            secrets.path().join("creds").display()
        ),
    );
    drop_file(
        drop.path(),
        "v1.tar",
        &tar(&signed(release("1.0.0", 1), &BOTH)),
    );
    agent.wait_current(1);
    let out = agent.path("support.tar.gz");
    let dry = agent
        .cli(&[
            "support-bundle",
            "--dry-run",
            "--out",
            out.to_str().unwrap(),
        ])
        .ok();
    assert!(dry.stdout.contains("status.json"), "{}", dry.stdout);
    assert!(
        dry.stdout
            .contains("permissions.execution.environment.API_TOKEN: value masked"),
        "{}",
        dry.stdout
    );
    assert!(!out.exists(), "a dry run wrote the bundle");
    let log = agent.path("agent.log");
    agent
        .cli(&[
            "support-bundle",
            "--out",
            out.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ])
        .ok();
    let listing = outpost_tests::run(std::process::Command::new("tar").arg("-tzf").arg(&out)).ok();
    for name in [
        "version.txt",
        "config.json",
        "status.json",
        "history.json",
        "plan.json",
        "runtime.json",
        "current-release.json",
        "logs.txt",
    ] {
        assert!(
            listing.stdout.contains(&format!("outpost-support/{name}")),
            "{}",
            listing.stdout
        );
    }
    let unpacked = tempfile::tempdir().unwrap();
    outpost_tests::run(
        std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&out)
            .arg("-C")
            .arg(unpacked.path()),
    )
    .ok();
    let read = |name: &str| {
        std::fs::read_to_string(unpacked.path().join("outpost-support").join(name)).unwrap()
    };
    let status: Value = serde_json::from_str(&read("status.json")).unwrap();
    assert_eq!(status["current"]["sequence"], 1, "{status}");
    assert!(read("current-release.json").contains("\"kind\": \"accepted\""));
    assert!(read("logs.txt").contains("accepted 1.0.0"));
    // No secret anywhere in the uncompressed archive.
    let unpacked_without_secrets = |archive: &Path| {
        let raw = outpost_tests::run(std::process::Command::new("gzip").arg("-dc").arg(archive))
            .ok()
            .stdout;
        for secret in [
            "SECRET-GRANT-ENV",
            "SECRET-REGISTRY-PASSWORD",
            "SECRET-GRANTED-FILE",
        ] {
            assert!(
                !raw.contains(secret),
                "{secret} leaked into {}",
                archive.display()
            );
        }
        raw
    };
    unpacked_without_secrets(&out);
    agent.stop();
    // Without a running agent, on a config naming every password file there is: the store's
    // records are still there, the agent's answers say why they are missing, no secret is read.
    let config = agent.path("docker.yaml");
    std::fs::write(
        &config,
        format!(
            "source: {{oci: {{reference: 127.0.0.1:1/acme/shop:stable, username: u, password_file: {pw}}}}}\n{}expect: {{name: acme}}\npermissions: {{execution: {{environment: {{API_TOKEN: SECRET-GRANT-ENV}}, files: {{/run/creds: {creds}}}}}}}\nstate_dir: state\napi: {{socket: agent.sock}}\nruntime: docker\ndocker: {{registries: {{ghcr.io: {{username: u, password_file: {pw}}}}}}}\n",
            outpost_tests::agent::trust_two_of_two(),
            pw = secrets.path().join("registry.pw").display(),
            creds = secrets.path().join("creds").display(),
        ),
    )
    .unwrap();
    let offline = agent.path("offline.tar.gz");
    let run = outpost_tests::run(
        std::process::Command::new(outpost_tests::binary("outpost-agent"))
            .args(["support-bundle", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&offline)
            .arg("--log")
            .arg(&log),
    )
    .ok();
    assert!(run.stdout.contains("wrote "), "{}", run.stdout);
    let raw = unpacked_without_secrets(&offline);
    assert!(
        raw.contains("the agent did not answer"),
        "no note of the missing agent"
    );
    assert!(
        raw.contains("\"sequence\": 1"),
        "the store's records are missing"
    );
}

/// A large bundle being read shows in `status` (bytes so far of the file's size), and
/// `status --watch` shows it again every second.
#[test]
fn a_download_in_progress_shows_in_status_and_watch_refreshes() {
    let drop = tempfile::tempdir().unwrap();
    let agent = dir_agent(drop.path(), "");
    let big = tar(&signed(with_image(release("1.0.0", 1), 256 << 20), &BOTH));
    let size = big.len() as u64;
    drop_file(drop.path(), "big.tar", &big);
    let seen = outpost_tests::poll_within(60, || {
        let status = agent.status();
        let download = &status["source"]["download"];
        download["total"]
            .as_u64()
            .map(|total| (download.clone(), total))
    });
    let (download, total) = seen.expect("the download never showed in status");
    assert_eq!(total, size, "{download}");
    assert_eq!(download["what"], "big.tar");
    assert!(download["bytes"].as_u64().unwrap() <= size, "{download}");
    agent.wait_current(1);
    assert_eq!(agent.status()["source"]["download"], Value::Null);
    // --watch: a new status every second until stopped.
    let watched = outpost_tests::run(
        std::process::Command::new("timeout")
            .arg("2.5")
            .arg(outpost_tests::binary("outpost-agent"))
            .args(["status", "--watch", "--config"])
            .arg(&agent.config),
    );
    assert_eq!(watched.code, 124, "{}", watched.stderr);
    assert!(
        watched.stdout.matches("current:   1.0.0").count() >= 2,
        "{}",
        watched.stdout
    );
}
