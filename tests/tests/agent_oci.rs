//! The agent polling a real registry (CNCF distribution from Debian's docker-registry on
//! 127.0.0.1): the attack suite through the registry, a registry serving tampered blobs, basic
//! auth from a password file and from a docker config, and a registry that goes away.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use base64::Engine as _;
use outpost_bundle_format::Digest;
use outpost_tests::TestRegistry;
use outpost_tests::agent::{AgentProcess, basic_auth};
use outpost_tests::forge::{attacks, digest, release, signed};
use serde_json::Value;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

fn oci_agent(registry: &TestRegistry, auth: &str) -> AgentProcess {
    let source = format!(
        "source:\n  oci:\n    reference: {}/acme/shop:stable\n    interval: 200ms\n{auth}",
        registry.host()
    );
    AgentProcess::start(&source, "")
}

#[test]
fn attack_suite_through_a_registry() {
    let registry = TestRegistry::start(None);
    let v1 = signed(release("1.0.0", 1), &BOTH);
    let agent = oci_agent(&registry, "");
    // Nothing published yet: the agent waits without errors piling up.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(agent.status()["current"], Value::Null);
    registry.push(&v1, "stable");
    let status = agent.wait_current(1);
    assert!(status["current"]["digest"] == digest(&v1).to_string());
    registry.push(&signed(release("1.1.0", 2), &BOTH), "stable");
    let before = agent.wait_current(2)["current"].clone();

    // Tar-level attacks cannot travel through a registry (it addresses content by digest).
    for attack in attacks(3, &v1).into_iter().filter(|a| a.layout.is_some()) {
        let layout = attack.layout.unwrap();
        let attack_digest = digest(&layout).to_string();
        registry.push(&layout, "stable");
        let status = agent.wait_for(
            &format!("{} rejected by {}", attack.name, attack.check),
            |s| {
                s["last_rejection"]["digest"] == attack_digest.as_str()
                    && s["last_rejection"]["check"] == attack.check
            },
        );
        assert_eq!(status["current"], before, "{}", attack.name);
        assert_eq!(status["pending"], Value::Null, "{}", attack.name);
        assert!(
            status["last_rejection"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
    }

    // A registry (or a man in the middle) serving different bytes under a digest.
    let v3 = signed(release("1.2.0", 3), &BOTH);
    registry.push(&v3, "staging");
    let stack = outpost_bundle_format::bundle::read_parts(&v3, &Default::default())
        .unwrap()
        .stack_bytes;
    let hex = Digest::of(&stack).hex();
    let data = registry.dir.path().join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let original = std::fs::read(&data).unwrap();
    let mut bytes = original.clone();
    let at = bytes.windows(4).position(|w| w == b"1Gi\"").unwrap();
    bytes[at] = b'9';
    std::fs::write(&data, bytes).unwrap();
    registry.push(&v3, "stable");
    let status = agent.wait_for("tampered blob rejected", |s| {
        s["last_rejection"]["check"] == "digest-mismatch"
    });
    assert_eq!(status["current"], before);
    assert_eq!(status["last_rejection"]["digest"], digest(&v3).to_string());
    std::fs::write(&data, original).unwrap();

    // Still accepting the next valid release.
    registry.push(&signed(release("1.3.0", 4), &BOTH), "stable");
    agent.wait_current(4);
    // Unchanged polls are HEAD requests and change nothing.
    let polls = agent.metric("outpost_bundles_accepted_total");
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(agent.metric("outpost_bundles_accepted_total"), polls);
}

#[test]
fn signatures_arriving_after_the_manifest_are_picked_up() {
    let registry = TestRegistry::start(None);
    let agent = oci_agent(&registry, "");
    // Push unsigned first (what a slow CI pipeline does), then the same release signed.
    let unsigned = release("1.0.0", 1);
    registry.push(&unsigned, "stable");
    agent.wait_for("unsigned rejected", |s| {
        s["last_rejection"]["check"] == "unsigned"
    });
    registry.push(&signed(unsigned.clone(), &["vendor-a"]), "stable");
    agent.wait_for("one signature is below the threshold", |s| {
        s["last_rejection"]["check"] == "threshold-unmet"
    });
    registry.push(&signed(unsigned, &BOTH), "stable");
    agent.wait_current(1);
}

#[test]
fn basic_auth_from_a_password_file_and_a_docker_config() {
    let registry = TestRegistry::start(Some(("vendor", "s3cret")));
    registry.push(&signed(release("1.0.0", 1), &BOTH), "stable");
    let secrets = tempfile::tempdir().unwrap();
    let agent = oci_agent(&registry, &basic_auth(secrets.path(), "vendor", "s3cret"));
    agent.wait_current(1);

    let config = secrets.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("vendor:s3cret");
    let docker_config = format!(
        r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
        registry.host()
    );
    std::fs::write(&config, docker_config).unwrap();
    let agent = oci_agent(
        &registry,
        &format!("    credentials_file: {}\n", config.display()),
    );
    agent.wait_current(1);

    // Wrong credentials: an error the customer can see; nothing accepted, nothing rejected.
    let agent = oci_agent(&registry, &basic_auth(secrets.path(), "vendor", "wrong"));
    let status = agent.expect_source_error("authentication failed");
    assert_eq!(status["current"], Value::Null);
}

#[test]
fn bearer_token_auth() {
    let registry = TestRegistry::start_with_token_auth("vendor", "s3cret");
    registry.push(&signed(release("1.0.0", 1), &BOTH), "stable");
    let secrets = tempfile::tempdir().unwrap();
    let agent = oci_agent(&registry, &basic_auth(secrets.path(), "vendor", "s3cret"));
    agent.wait_current(1);
    registry.push(&signed(release("1.1.0", 2), &BOTH), "stable");
    agent.wait_current(2);
}

#[test]
fn a_registry_going_away_leaves_the_current_release_alone() {
    let registry = TestRegistry::start(None);
    registry.push(&signed(release("1.0.0", 1), &BOTH), "stable");
    let agent = oci_agent(&registry, "");
    let before = agent.wait_current(1)["current"].clone();
    drop(registry);
    let status = agent.expect_source_error("127.0.0.1");
    assert_eq!(status["current"], before);
    let metrics = outpost_tests::agent::http_get(&agent.socket(), "/metrics");
    assert!(metrics.contains("outpost_source_errors_total"), "{metrics}");
    assert_eq!(
        outpost_tests::agent::http_get(&agent.socket(), "/healthz"),
        "ok\n"
    );
}
