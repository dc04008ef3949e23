//! The agent binary with `runtime: kubernetes`, reaching its cluster through a kubeconfig, as a
//! customer runs it. No kube-apiserver can run here: the cluster is `fake-apiserver`
//! (`tests/kube-stand-in`), kube-fake-client's in-memory API served over HTTP with controller
//! stand-ins. What is checked is the agent's side: install, a failed update rolled back, drift
//! repaired, a manual rollback, and status, history and metrics as with the Docker runtime.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_kube_stand_in::{FakeApiserver, NEVER_READY_DIGEST as NEVER_READY};
use outpost_tests::agent::{AgentProcess, Interrupt, Pauses, campaign_rounds, drop_file};
use outpost_tests::engine::http_body;
use outpost_tests::{binary, build_bundle, sign_with};
use serde_json::Value;
use std::path::Path;

fn get(cluster: &FakeApiserver, path: &str) -> Value {
    let body = http_body(cluster.address.port(), path).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn web_image(cluster: &FakeApiserver) -> String {
    get(
        cluster,
        "/apis/apps/v1/namespaces/shop/deployments/acme-web",
    )["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn image(name: &str, digest: &str) -> String {
    format!("r.example/{name}@{digest}")
}

const GOOD: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const GOOD_2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn publish(drop: &Path, web_image: &str, version: &str, sequence: u64) {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            r#"name: acme
permissionProfiles: {{execution: {{}}, storage: {{}}}}
resources:
  - lifecycle: live
    container:
      name: db
      code: {{image: "{db}"}}
      cpu: 1
      memory: 1Gi
      ports: [5432]
      replicas: 1
      persistentStorage: 1Gi
      permissions: storage
  - lifecycle: live
    container:
      name: web
      code: {{image: "{web_image}"}}
      cpu: 0.5
      memory: 256Mi
      ports: [8080]
      replicas: 2
      links: [db]
      publicEndpoints: [{{name: site, port: 8080, protocol: http}}]
      permissions: execution
"#,
            db = image("db", GOOD)
        ),
    )
    .unwrap();
    let bundle = dir.path().join("bundle.tar");
    build_bundle(
        &stack,
        version,
        sequence,
        &["--offline", "--expires", "2099-01-01T00:00:00Z"],
        &bundle,
    );
    sign_with(&bundle, &["vendor-a", "vendor-b"]);
    drop_file(
        drop,
        &format!("v{sequence}.tar"),
        &std::fs::read(&bundle).unwrap(),
    );
}

#[test]
fn the_agent_runs_releases_on_a_cluster_with_the_same_status_history_and_metrics() {
    let cluster = FakeApiserver::start(&binary("fake-apiserver"), "shop").unwrap();
    let drop = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &format!(
            "runtime: kubernetes\npermissions:\n  execution: {{service_account: web-runner}}\n  storage: {{service_account: db-runner}}\nkubernetes:\n  namespace: shop\n  hosts: {{site: shop.example.com}}\n  kubeconfig: {}\nrollout:\n  progress_deadline_seconds: 10\n  drift_interval_seconds: 1\n",
            cluster.kubeconfig().display()
        ),
    );

    // Install.
    publish(drop.path(), &image("web", GOOD), "1.0.0", 1);
    let status = agent.wait_converged(1);
    assert_eq!(status["runtime"]["kind"], "kubernetes", "{status:#}");
    assert_eq!(
        status["runtime"]["resources"]["web"]["workload"]["available"],
        2
    );
    assert_eq!(web_image(&cluster), image("web", GOOD));
    let text = agent.cli(&["status"]).stdout;
    for line in [
        "runtime:   kubernetes (converged)",
        "Deployment/acme-web: 2 replicas, 2 ready, 2 updated, 2 available",
        "StatefulSet/acme-db: 1 replicas, 1 ready, 1 updated, 1 available",
        "endpoint:  http://shop.example.com/ (Ingress/acme-web-site: no address yet)",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let claims = get(&cluster, "/api/v1/namespaces/shop/persistentvolumeclaims");
    assert_eq!(claims["items"][0]["metadata"]["name"], "data-acme-db-0");

    // An update.
    publish(drop.path(), &image("web", GOOD_2), "1.1.0", 2);
    agent.wait_converged(2);
    assert_eq!(web_image(&cluster), image("web", GOOD_2));

    // An update whose pods never become ready is rolled back automatically.
    publish(drop.path(), &image("web", NEVER_READY), "1.2.0", 3);
    let status = agent.wait_within(60, "automatic rollback", |s| {
        s["current"]["sequence"] == 2
            && s["runtime"]["phase"] == "converged"
            && !s["runtime"]["last_rollback"].is_null()
    });
    assert!(
        status["runtime"]["last_rollback"]
            .as_str()
            .unwrap()
            .contains("progress deadline exceeded"),
        "{status:#}"
    );
    assert_eq!(web_image(&cluster), image("web", GOOD_2));
    assert!(agent.cli(&["history"]).stdout.contains("rolled-back"));
    assert_eq!(agent.metric("outpost_rollbacks_total"), 1);
    assert_eq!(
        agent.metric("outpost_rollouts_total"),
        4,
        "1.0.0, 1.1.0, 1.2.0, 1.1.0 again"
    );

    // A good update, then the customer rolls back by hand to the release before it.
    publish(drop.path(), &image("web", GOOD), "1.3.0", 4);
    agent.wait_converged(4);
    assert_eq!(web_image(&cluster), image("web", GOOD));
    agent.cli(&["rollback"]).ok();
    agent.wait_converged(2);
    assert_eq!(web_image(&cluster), image("web", GOOD_2));
    assert_eq!(
        get(&cluster, "/api/v1/namespaces/shop/persistentvolumeclaims")["items"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "the claim is kept throughout"
    );
}

/// Releases in a row on the cluster, each interrupted (kill -9, or SIGTERM as a pod's
/// termination sends) at a random point of its rollout: after each restart the rollout
/// converges on that release with exactly the stack's objects and its one claim, and the store
/// is sound. Four rounds in CI; `OUTPOST_INTERRUPT_ROUNDS` runs a longer campaign
/// (`tests/bench.sh interrupts` runs 30).
fn interrupted_rollouts_on_a_cluster(interrupt: Interrupt) {
    let rounds = campaign_rounds();
    let cluster = FakeApiserver::start(&binary("fake-apiserver"), "shop").unwrap();
    let drop = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &format!(
            "runtime: kubernetes\npermissions:\n  execution: {{service_account: web-runner}}\n  storage: {{service_account: db-runner}}\nkubernetes:\n  namespace: shop\n  hosts: {{site: shop.example.com}}\n  kubeconfig: {}\nrollout:\n  progress_deadline_seconds: 30\n  drift_interval_seconds: 1\n",
            cluster.kubeconfig().display()
        ),
    );
    let names = |kind: &str| -> Vec<String> {
        let list = get(&cluster, &format!("/apis/apps/v1/namespaces/shop/{kind}"));
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    let mut pauses = Pauses::new(0x6a09_e667_f3bc_c909);
    for sequence in 1..=rounds {
        let digest = format!("sha256:{sequence:064x}");
        publish(
            drop.path(),
            &image("web", &digest),
            &format!("1.{sequence}.0"),
            sequence,
        );
        std::thread::sleep(pauses.next(200, 1800));
        agent.interrupt(interrupt);
        agent.restart();
        let status = agent.wait_converged(sequence);
        assert_eq!(
            status["runtime"]["last_rollback"],
            Value::Null,
            "{status:#}"
        );
        assert_eq!(
            web_image(&cluster),
            image("web", &digest),
            "round {sequence}"
        );
        assert_eq!(names("deployments"), ["acme-web"], "round {sequence}");
        assert_eq!(names("statefulsets"), ["acme-db"], "round {sequence}");
        let claims = get(&cluster, "/api/v1/namespaces/shop/persistentvolumeclaims");
        assert_eq!(claims["items"].as_array().map(Vec::len), Some(1));
        let checked = agent.cli(&["check-state"]);
        assert_eq!(checked.code, 0, "{}{}", checked.stdout, checked.stderr);
    }
}

#[test]
fn kill_9_during_rollouts_on_a_cluster() {
    interrupted_rollouts_on_a_cluster(Interrupt::Kill);
}

#[test]
fn sigterm_during_rollouts_on_a_cluster() {
    interrupted_rollouts_on_a_cluster(Interrupt::Term);
}
