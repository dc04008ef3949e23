//! Test support shared by the unit tests: signed releases and agent configs on disk.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use outpost_bundle_format::Layout;
use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// The quick-start stack, signed by vendor-a, as release `version` / `sequence`.
pub fn signed_release(version: &str, sequence: u64) -> Layout {
    let text = std::fs::read_to_string(testdata().join("stacks/valid/quickstart.yaml")).unwrap();
    signed_stack(&text, version, sequence)
}

/// The stack `yaml`, signed by vendor-a, as release `version` / `sequence`.
pub fn signed_stack(yaml: &str, version: &str, sequence: u64) -> Layout {
    signed_stack_irreversible(yaml, version, sequence, &[])
}

/// [`signed_stack`] declaring the `irreversible` resources.
pub fn signed_stack_irreversible(
    yaml: &str,
    version: &str,
    sequence: u64,
    irreversible: &[&str],
) -> Layout {
    use outpost_bundle_format::{bundle, crypto::SigningKey, release::*, stack::Stack};
    let irreversible: Vec<String> = irreversible.iter().map(|r| r.to_string()).collect();
    let (stack, _) = Stack::from_yaml(yaml).unwrap();
    let now = chrono::Utc::now();
    let metadata = ReleaseMetadata {
        format_version: format_version_for(&irreversible),
        name: "acme".into(),
        version: semver::Version::parse(version).unwrap(),
        sequence,
        channel: "stable".into(),
        created: now,
        expires: now + chrono::Duration::days(1),
        irreversible,
    };
    let mut layout = bundle::build(&stack, &metadata, &[]).unwrap();
    let pem = std::fs::read(testdata().join("keys/vendor-a.key")).unwrap();
    bundle::add_signature(
        &mut layout,
        &SigningKey::from_encrypted_pem(&pem, b"test").unwrap(),
        "acme",
    )
    .unwrap();
    layout
}

/// A config trusting vendor-a for stack `acme`, with `extra` YAML appended.
pub fn test_config(extra: &str) -> (tempfile::TempDir, PathBuf) {
    test_config_granting("{execution: {}}", extra)
}

/// [`test_config`] with the customer's `permissions` grants spelled out.
pub fn test_config_granting(permissions: &str, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key = testdata().join("keys/vendor-a.pub");
    let path = dir.path().join("agent.yaml");
    let text = format!(
        "source: {{dir: {{path: drop}}}}\ntrust: {{keys: [{}]}}\nexpect: {{name: acme}}\npermissions: {permissions}\nstate_dir: state\napi: {{socket: agent.sock}}\n{extra}",
        key.display()
    );
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// What the test configs trust: vendor-a's key.
pub fn trust() -> outpost_bundle_format::Trust {
    let pem = std::fs::read(testdata().join("keys/vendor-a.pub")).unwrap();
    outpost_bundle_format::Trust::Keys {
        keys: vec![outpost_bundle_format::crypto::PublicKey::from_pem(&pem).unwrap()],
        threshold: 1,
    }
}

/// The sum of every series of the metric `name` (a counter's `_total` included), as scraped.
pub fn metric_total(metrics: &crate::metrics::Metrics, name: &str) -> u64 {
    let text = metrics.encode(&Default::default(), false);
    text.lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
