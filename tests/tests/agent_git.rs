//! The agent following a git ref over file://, git:// (`git daemon`) and smart HTTP with basic
//! auth (`git http-backend` behind tests/scripts/git-http.py), all on 127.0.0.1: the attack suite
//! through each, bundles as a tar file or a layout directory, and bad credentials.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::agent::{AgentProcess, basic_auth};
use outpost_tests::forge::{attacks, release, signed, tar};
use outpost_tests::git::{VendorRepo, git_daemon, git_http};
use serde_json::Value;
use std::time::Duration;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

fn git_agent(url: &str, path: &str, auth: &str) -> AgentProcess {
    AgentProcess::start(
        &format!(
            "source:\n  git:\n    url: {url}\n    ref: main\n    path: {path}\n    interval: 200ms\n{auth}"
        ),
        "",
    )
}

/// v1, v2, then every attack, then v3: each attack rejected by its check, nothing else moved.
fn attack_suite(vendor: &VendorRepo, agent: &AgentProcess) {
    let v1 = signed(release("1.0.0", 1), &BOTH);
    vendor.publish(&tar(&v1), "1.0.0");
    agent.wait_current(1);
    vendor.publish(&tar(&signed(release("1.1.0", 2), &BOTH)), "1.1.0");
    let before = agent.wait_current(2)["current"].clone();
    for attack in attacks(3, &v1) {
        let rejected = agent.rejected_total();
        vendor.publish(&attack.tar, attack.name);
        // The counter moves after the rejection is recorded: read the status after it.
        agent.wait_for(attack.name, |_| agent.rejected_total() > rejected);
        let status = agent.status();
        assert_eq!(
            status["last_rejection"]["check"], attack.check,
            "{}: {status:#}",
            attack.name
        );
        assert!(
            status["last_rejection"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
        assert_eq!(status["current"], before, "{}", attack.name);
        assert_eq!(status["pending"], Value::Null, "{}", attack.name);
    }
    vendor.publish(&tar(&signed(release("1.2.0", 3), &BOTH)), "1.2.0");
    agent.wait_current(3);
    // A commit that does not change the bundle is a no-op.
    vendor.commit("docs only");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.status()["current"]["sequence"], 3);
}

#[test]
fn attack_suite_over_file_url() {
    let vendor = VendorRepo::new();
    let agent = git_agent(
        &format!("file://{}", vendor.bare().display()),
        "outpost/bundle.tar",
        "",
    );
    attack_suite(&vendor, &agent);
    assert!(
        agent.status()["current"]["origin"]
            .as_str()
            .unwrap()
            .starts_with("git file://")
    );
}

#[test]
fn attack_suite_over_git_daemon() {
    let vendor = VendorRepo::new();
    let (_daemon, port) = git_daemon(vendor.root.path());
    let agent = git_agent(
        &format!("git://127.0.0.1:{port}/vendor.git"),
        "outpost/bundle.tar",
        "",
    );
    attack_suite(&vendor, &agent);
}

#[test]
fn attack_suite_over_smart_http_with_basic_auth() {
    let vendor = VendorRepo::new();
    let (_server, port) = git_http(vendor.root.path(), "vendor:s3cret");
    let secrets = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/vendor.git");
    let agent = git_agent(
        &url,
        "outpost/bundle.tar",
        &basic_auth(secrets.path(), "vendor", "s3cret"),
    );
    attack_suite(&vendor, &agent);

    // Wrong credentials: a visible source error, the current release untouched.
    let refused = git_agent(
        &url,
        "outpost/bundle.tar",
        &basic_auth(secrets.path(), "vendor", "wrong"),
    );
    let status = refused.expect_source_error("authentication");
    assert_eq!(status["current"], Value::Null);
    assert_eq!(status["last_rejection"], Value::Null);
}

#[test]
fn a_layout_directory_in_the_repository() {
    let vendor = VendorRepo::new();
    let agent = git_agent(
        &format!("file://{}", vendor.bare().display()),
        "outpost/bundle",
        "",
    );
    let v1 = signed(release("1.0.0", 1), &BOTH);
    vendor.publish_dir(&v1, "1.0.0");
    let status = agent.wait_current(1);
    // The same digest as the tar form and the registry form.
    assert_eq!(
        status["current"]["digest"],
        outpost_tests::forge::digest(&v1).to_string()
    );
    vendor.publish_dir(
        &signed(release("1.1.0", 2), &["vendor-a"]),
        "below threshold",
    );
    agent.wait_for("rejection", |s| {
        s["last_rejection"]["check"] == "threshold-unmet"
    });
    vendor.publish_dir(&signed(release("1.1.0", 2), &BOTH), "1.1.0");
    agent.wait_current(2);
}
