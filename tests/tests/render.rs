//! `outpost-agent render`: a signed bundle and a customer config in, the Kubernetes objects out,
//! compared with a golden file and validated against the real Kubernetes schemas of two minor
//! versions by `kubernetes-validate` (PyPI; no kube-apiserver can run here).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::{Run, binary, build_bundle, repo, run, sign_with, testdata};
use std::path::{Path, PathBuf};
use std::process::Command;

fn signed_bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("shop-1.0.0.tar");
    build_bundle(
        &testdata().join("stacks/valid/everything.yaml"),
        "1.0.0",
        1,
        &[
            "--offline",
            "--created",
            "2026-01-01T00:00:00Z",
            "--expires",
            "2099-01-01T00:00:00Z",
        ],
        &bundle,
    );
    sign_with(&bundle, &["vendor-a", "vendor-b"]);
    bundle
}

fn config(dir: &Path, permissions: &str) -> PathBuf {
    let keys = testdata().join("keys");
    let text = format!(
        "source: {{dir: {{path: drop}}}}\ntrust: {{keys: [{}, {}], threshold: 2}}\nexpect: {{name: shop}}\n{permissions}state_dir: state\napi: {{socket: agent.sock}}\nkubernetes:\n  namespace: shop-prod\n  storage_class: fast-ssd\n  ingress_class: nginx\n  hosts: {{site: shop.example.com}}\n  pools:\n    general: {{node_selector: {{pool: general}}}}\n    gpu: {{node_selector: {{pool: gpu}}}}\n  gpus:\n    nvidia-l4: {{node_selector: {{gpu: l4}}, tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]}}\n",
        keys.join("vendor-a.pub").display(),
        keys.join("vendor-b.pub").display(),
    );
    let path = dir.join("agent.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

const GRANTS: &str = "permissions:\n  execution: {service_account: shop-runner}\n  storage: {service_account: shop-storage}\n";

fn render(bundle: &Path, config: &Path) -> Run {
    run(Command::new(binary("outpost-agent"))
        .arg("render")
        .arg(bundle)
        .arg("--config")
        .arg(config))
}

#[test]
fn render_matches_the_golden_file_and_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = signed_bundle(dir.path());
    let yaml = render(&bundle, &config(dir.path(), GRANTS)).ok().stdout;

    let golden = repo().join("testdata/render/shop.yaml");
    if std::env::var_os("OUTPOST_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &yaml).unwrap();
    }
    assert_eq!(
        yaml,
        std::fs::read_to_string(&golden).unwrap_or_default(),
        "render output differs from {} (rerun with OUTPOST_BLESS=1 if intended)",
        golden.display()
    );

    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, &yaml).unwrap();
    outpost_tests::assert_valid_for_kubernetes(&rendered, "render");
}

#[test]
fn render_refuses_untrusted_bundles_and_unmapped_identities() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = signed_bundle(dir.path());
    // A profile without a ServiceAccount: nothing is printed, the reason is.
    render(
        &bundle,
        &config(dir.path(), "permissions: {execution: {}, storage: {}}\n"),
    )
    .fails(
        1,
        "resource db: permissions.storage.service_account is not set",
    );
    // A bundle signed by one key where two are required.
    let single = dir.path().join("single.tar");
    build_bundle(
        &testdata().join("stacks/valid/everything.yaml"),
        "1.0.0",
        1,
        &["--offline"],
        &single,
    );
    sign_with(&single, &["vendor-a"]);
    render(&single, &config(dir.path(), GRANTS)).fails(1, "verification failed: threshold-unmet");
}
