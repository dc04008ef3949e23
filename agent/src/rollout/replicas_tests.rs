use super::*;
use crate::config::Config;
use crate::pipeline::Agent;
use crate::rollout::Converger;
use crate::runtime::fake::FakeRuntime;
use crate::testing::{signed_stack, test_config};
use outpost_bundle_format::Digest;
use std::sync::Arc;

const STACK: &str = r#"
name: acme
permissionProfiles: {execution: {}}
resources:
  - lifecycle: live
    container:
      name: db
      code: {image: "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [5432]
      replicas: 1
      persistentStorage: 1Gi
      permissions: execution
  - lifecycle: live
    container:
      name: web
      code: {image: "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      replicas: 2
      links: [db]
      permissions: execution
"#;

const BROKEN: &str =
    "r.example/web@sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// The rollout loop on a fake engine, with the agent it belongs to (for ingesting releases and
/// reading the store).
struct Test {
    agent: Arc<Agent>,
    converger: Converger<Replicas<FakeRuntime>>,
}

impl std::ops::Deref for Test {
    type Target = Converger<Replicas<FakeRuntime>>;
    fn deref(&self) -> &Self::Target {
        &self.converger
    }
}

/// The container-engine backend of `agent`, on `runtime`.
fn replicas(agent: &Agent, runtime: FakeRuntime) -> Converger<Replicas<FakeRuntime>> {
    let settings = crate::rollout::replicas::Settings::of(&agent.config);
    Converger::new(
        agent.rollout_context(),
        Replicas::new(agent.rollout_context(), settings, runtime),
    )
}

fn converger(extra: &str) -> (tempfile::TempDir, Test) {
    converger_with(extra, "")
}

fn converger_with(extra: &str, rollout: &str) -> (tempfile::TempDir, Test) {
    let (dir, path) = test_config(&format!(
        "runtime: docker\nrollout: {{grace_seconds: 0, progress_deadline_seconds: 5{rollout}}}\n{extra}"
    ));
    let agent = Arc::new(Agent::new(Config::load(&path).unwrap()).unwrap());
    let converger = replicas(&agent, FakeRuntime::default());
    (dir, Test { agent, converger })
}

fn release(c: &Test, yaml: &str, version: &str, sequence: u64) -> Digest {
    accept(c, signed_stack(yaml, version, sequence))
}

/// A release declaring db irreversible.
fn release_irreversible(c: &Test, yaml: &str, version: &str, sequence: u64) -> Digest {
    let layout = crate::testing::signed_stack_irreversible(yaml, version, sequence, &["db"]);
    accept(c, layout)
}

fn accept(c: &Test, layout: outpost_bundle_format::Layout) -> Digest {
    match c
        .agent
        .ingest(&layout, "test", crate::config::now())
        .unwrap()
    {
        crate::pipeline::Ingested::Accepted { digest, .. } => digest,
        other => panic!("{other:?}"),
    }
}

fn current(c: &Test) -> Digest {
    c.agent.store.positions().unwrap().current.unwrap().digest
}

#[tokio::test]
async fn installs_in_links_order_and_journals_each_step() {
    let (_dir, c) = converger("");
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    assert_eq!(
        c.backend().runtime().log(),
        [
            "create db-0 primary",
            "create web-0 primary",
            "create web-1 primary"
        ]
    );
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    assert!(
        c.agent
            .store
            .interrupted_steps(crate::config::now())
            .unwrap()
            .is_empty()
    );
    // Converged: the next pass changes nothing.
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().log().len(), 3);
}

#[tokio::test]
async fn a_failed_update_rolls_back_and_keeps_the_old_replicas_serving() {
    let (_dir, c) = converger("");
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    c.backend().runtime().break_image(BROKEN);
    let broken = STACK.replace(
        "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        BROKEN,
    );
    let v2 = release(&c, &broken, "2.0.0", 2);
    assert_eq!(current(&c), v2);
    c.converge_once().await.unwrap();
    // The new web-0 never became healthy: it went, the old one never stopped.
    assert_eq!(
        c.backend().runtime().log()[3..],
        ["create web-0 surge", "remove web-0 surge"]
    );
    assert_eq!(current(&c), v1);
    assert_eq!(
        crate::testing::metric_total(&c.agent.metrics, "outpost_rollbacks_total"),
        1
    );
    assert!(
        c.backend()
            .runtime()
            .images()
            .values()
            .all(|image| image != BROKEN)
    );
    let history = c.agent.store.history(10).unwrap();
    assert!(
        history.iter().any(|e| e.kind == "rolled-back"),
        "{history:?}"
    );
}

#[tokio::test]
async fn rolls_back_to_the_release_that_last_ran_healthy() {
    let (_dir, c) = converger("");
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    // 1.1.0 becomes current but never runs: 1.2.0 replaces it first, and fails.
    release(
        &c,
        &STACK.replace(
            "memory: 1Gi\n      ports: [8080]",
            "memory: 2Gi\n      ports: [8080]",
        ),
        "1.1.0",
        2,
    );
    c.backend().runtime().break_image(BROKEN);
    let broken = STACK.replace(
        "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        BROKEN,
    );
    release(&c, &broken, "1.2.0", 3);
    assert_eq!(
        c.agent.store.positions().unwrap().last_good.unwrap().digest,
        v1
    );
    c.converge_once().await.unwrap();
    assert_eq!(current(&c), v1);
}

#[tokio::test]
async fn stateful_replicas_stop_first_and_keep_their_volume() {
    let (_dir, c) = converger("");
    release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    release(
        &c,
        &STACK.replace(
            "memory: 1Gi\n      ports: [5432]",
            "memory: 2Gi\n      ports: [5432]",
        ),
        "1.1.0",
        2,
    );
    c.converge_once().await.unwrap();
    assert_eq!(
        c.backend().runtime().log()[3..],
        ["remove db-0 primary", "create db-0 primary"]
    );
    assert!(c.backend().runtime().volumes().contains("acme-db-0-data"));
    // Pruned with the resource, the volume still stays (delete_volumes is off).
    let without_db = STACK.replacen(
        "  - lifecycle: live\n    container:\n      name: db",
        "  - lifecycle: live\n    container:\n      name: cache",
        1,
    );
    release(
        &c,
        &without_db.replace("links: [db]", "links: []"),
        "1.2.0",
        3,
    );
    c.converge_once().await.unwrap();
    assert!(
        c.backend()
            .runtime()
            .log()
            .contains(&"remove db-0 primary".to_string())
    );
    assert!(c.backend().runtime().volumes().contains("acme-db-0-data"));
}

#[tokio::test]
async fn drift_is_repaired_and_counted() {
    let (_dir, c) = converger("");
    release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    c.backend()
        .runtime()
        .tamper(&ReplicaId::new("web", 1), true);
    c.backend()
        .runtime()
        .tamper(&ReplicaId::new("web", 0), false);
    c.converge_once().await.unwrap();
    assert_eq!(
        c.backend().runtime().log()[3..],
        ["start web-0", "create web-1 primary"]
    );
    assert_eq!(
        crate::testing::metric_total(&c.agent.metrics, "outpost_drift_repairs_total"),
        2
    );
}

#[tokio::test]
async fn placement_errors_touch_nothing() {
    let (_dir, c) = converger("pools: [general]\n");
    release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    let gpu = STACK.replace(
        "replicas: 2\n",
        "replicas: 2\n      gpu: {type: a100, count: 1}\n",
    );
    release(&c, &gpu, "1.1.0", 2);
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().log().len(), 3);
    let history = c.agent.store.history(10).unwrap();
    let rolled = history.iter().find(|e| e.kind == "rolled-back").unwrap();
    assert!(
        rolled
            .message
            .contains("needs 1 GPU of type \"a100\"; this host has 0 (config key docker.gpus)"),
        "{}",
        rolled.message
    );
    let pool = STACK.replace("replicas: 2\n", "replicas: 2\n      pool: gpu-large\n");
    release(&c, &pool, "1.2.0", 3);
    c.converge_once().await.unwrap();
    let history = c.agent.store.history(10).unwrap();
    assert!(
        history.iter().any(|e| e
            .message
            .contains("pool \"gpu-large\" is not one of this agent's pools (general)")),
        "{history:?}"
    );
}

#[test]
fn two_endpoints_on_one_host_port_are_refused() {
    let (_dir, path) =
        test_config("runtime: docker\ndocker: {publish: {ports: {admin: 9000, site: 9000}}}\n");
    let config = Config::load(&path).unwrap();
    let text = STACK
        .replace(
            "ports: [5432]\n",
            "ports: [5432]\n      publicEndpoints: [{name: admin, port: 5432, protocol: tcp}]\n",
        )
        .replace(
            "ports: [8080]\n",
            "ports: [8080]\n      publicEndpoints: [{name: site, port: 8080, protocol: http}]\n",
        );
    let stack = Stack::from_yaml(&text).unwrap().1;
    let error = Specs::new(&Settings::of(&config), &stack, Digest::of(b""))
        .err()
        .unwrap();
    assert_eq!(
        error.to_string(),
        "public endpoints db.admin and web.site both listen on port 9000: give one another port (config key docker.publish.ports)"
    );
}

#[test]
fn replicas_get_links_and_the_customers_credentials_never_the_vendors() {
    let (_dir, path) = test_config("runtime: docker\n");
    let text = std::fs::read_to_string(&path).unwrap().replace(
            "permissions: {execution: {}}",
            "permissions: {execution: {environment: {TOKEN: from-customer}, files: {/run/creds: /etc/outpost/creds}}}",
        );
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let vendor = STACK.replace(
        "links: [db]",
        "links: [db]\n      environment: {TOKEN: from-vendor, MODE: fast}",
    );
    let (_, stack) = Stack::from_yaml(&vendor).unwrap();
    let specs = Specs::new(&Settings::of(&config), &stack, Digest::of(b"")).unwrap();
    let spec = specs.spec(&ReplicaId::new("web", 1), "hash").unwrap();
    assert_eq!(spec.environment["TOKEN"], "from-customer");
    assert_eq!(spec.environment["MODE"], "fast");
    assert_eq!(spec.environment["DB_HOST"], "db");
    assert_eq!(spec.environment["DB_PORT"], "5432");
    assert_eq!(
        spec.files.get("/run/creds"),
        Some(&std::path::PathBuf::from("/etc/outpost/creds"))
    );
    assert_eq!(spec.volume, None);
    let db = specs.spec(&ReplicaId::new("db", 0), "hash").unwrap();
    assert_eq!(db.volume.as_deref(), Some("acme-db-0-data"));
}

#[tokio::test]
async fn autoscaling_follows_cpu_within_bounds_and_cool_down() {
    let (_dir, c) = converger_with("", ", autoscale_cooldown_seconds: 3600");
    let text = STACK.replace(
        "replicas: 2\n",
        "autoScale: {min: 1, desired: 1, max: 4, targetCpuPercent: 50}\n",
    );
    release(&c, &text, "1.0.0", 1);
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().images().len(), 2, "db-0 and web-0");
    // web-0 at 120% of its CPU against a 50% target: 1 → 3 replicas.
    c.backend().runtime().set_usage(120.0, 10.0);
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().images().len(), 4);
    let history = c.agent.store.history(10).unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.kind == "autoscale" && e.message.contains("web: 1 -> 3")),
        "{history:?}"
    );
    // Within the cool-down nothing changes, however busy.
    c.backend().runtime().set_usage(400.0, 10.0);
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().images().len(), 4);

    // An agent restarted (its choices lost) starts from what runs, not from `desired`.
    let restarted = replicas(&c.agent, c.backend().runtime().clone());
    c.backend().runtime().set_usage(50.0, 10.0);
    restarted.converge_once().await.unwrap();
    assert_eq!(
        restarted.backend().runtime().images().len(),
        4,
        "3 web and db"
    );
}

#[tokio::test]
async fn a_replica_that_never_becomes_healthy_is_not_left_to_pass_for_converged() {
    let (_dir, c) = converger("");
    c.backend().runtime().break_image(BROKEN);
    let broken = STACK.replace(
        "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        BROKEN,
    );
    release(&c, &broken, "1.0.0", 1);
    // A first install has nothing to roll back to: it fails, and so does every retry,
    // instead of finding the unhealthy replica in place and calling it converged.
    for _ in 0..2 {
        let error = c.converge_once().await.unwrap_err().to_string();
        assert!(
            error.contains("no earlier release to roll back to"),
            "{error}"
        );
        assert!(!c.backend().runtime().images().contains_key("web-0"));
    }
    assert_eq!(c.agent.store.positions().unwrap().converged, None);
}

#[tokio::test]
async fn an_engine_that_cannot_be_reached_is_retried_not_rolled_back() {
    let (_dir, c) = converger("");
    release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    let v2 = release(&c, &STACK.replace("replicas: 2", "replicas: 3"), "1.1.0", 2);
    c.backend().runtime().fail_next_steps(1);
    let error = c.converge_once().await.unwrap_err().to_string();
    assert!(error.contains("engine unavailable"), "{error}");
    assert!(error.contains("retrying"), "{error}");
    assert_eq!(current(&c), v2, "still the release to run");
    assert_eq!(
        crate::testing::metric_total(&c.agent.metrics, "outpost_rollbacks_total"),
        0
    );
    c.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v2));
}

#[tokio::test]
async fn a_rollout_overtaken_by_the_customers_rollback_records_nothing() {
    let (_dir, c) = converger("");
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    let v2 = release(&c, &STACK.replace("replicas: 2", "replicas: 3"), "1.1.0", 2);
    // The customer rolls back while 1.1.0 is still rolling out...
    c.agent
        .rollback("test", false, crate::config::now())
        .unwrap();
    assert_eq!(current(&c), v1);
    // ... so 1.1.0 finishing, or failing, must not touch the positions.
    let store = &c.agent.store;
    assert!(
        !store
            .set_converged(&v2, "late", crate::config::now())
            .unwrap()
    );
    assert!(
        !store
            .roll_back(&v2, &v1, "late", crate::config::now())
            .unwrap()
    );
    assert_eq!(store.positions().unwrap().converged, None);
    assert_eq!(current(&c), v1);
    c.converge_once().await.unwrap();
    assert_eq!(store.positions().unwrap().converged, Some(v1));
}

#[tokio::test]
async fn engine_errors_fail_the_rollout_not_the_agent() {
    let (_dir, c) = converger("");
    release(&c, STACK, "1.0.0", 1);
    c.backend().runtime().fail_next_steps(1);
    // Nothing to roll back to on a first install: the error is reported, and the next
    // pass converges.
    assert!(
        c.converge_once()
            .await
            .unwrap_err()
            .to_string()
            .contains("engine unavailable")
    );
    c.converge_once().await.unwrap();
    assert_eq!(c.backend().runtime().images().len(), 3);
}

const DB_B: &str =
    "r.example/db@sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn migrating_stack() -> String {
    STACK.replacen(
        "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        DB_B,
        1,
    )
}

/// Release 1.0.0 runs and writes format A; then 2.0.0, declaring db irreversible, rolls out
/// (and fails, when its image is broken).
async fn migrate(c: &Test) -> (Digest, Digest) {
    let v1 = release(c, STACK, "1.0.0", 1);
    c.converge_once().await.unwrap();
    c.backend()
        .runtime()
        .write_volume("acme-db-0-data", "format A");
    let v2 = release_irreversible(c, &migrating_stack(), "2.0.0", 2);
    c.converge_once().await.unwrap();
    (v1, v2)
}

#[tokio::test]
async fn a_failed_irreversible_release_is_rolled_back_onto_the_data_snapshotted_before_it() {
    let (_dir, c) = converger("");
    let runtime = c.backend().runtime().clone();
    runtime.break_image(DB_B);
    let (v1, v2) = migrate(&c).await;
    assert_eq!(current(&c), v1, "rolled back");
    // Release 2 migrated the data before it failed.
    runtime.write_volume("acme-db-0-data", "format B");
    let snapshot = c
        .agent
        .store
        .snapshot_before(&v2, "db", 0)
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.bytes, Some(8));
    assert_eq!(
        c.agent.store.pending_restores().unwrap(),
        std::slice::from_ref(&snapshot)
    );
    c.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    assert_eq!(
        runtime.volume("acme-db-0-data").as_deref(),
        Some("format A")
    );
    let log = runtime.log();
    let restore = log.iter().position(|l| l == "restore db-0").unwrap();
    assert_eq!(log[restore + 1], "create db-0 primary", "{log:?}");
    assert_eq!(
        log.iter().filter(|l| *l == "snapshot db-0").count(),
        1,
        "taken before 2.0.0; none of data a restore replaces: {log:?}"
    );
    assert!(c.agent.store.pending_restores().unwrap().is_empty());
    // Kept: the current release's snapshot and the one a rollback from 2.0.0 would need.
    assert!(
        c.agent
            .store
            .snapshot_before(&v2, "db", 0)
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn leaving_an_irreversible_release_by_hand_needs_restore_data() {
    let (_dir, c) = converger("");
    let runtime = c.backend().runtime().clone();
    let (v1, v2) = migrate(&c).await;
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v2));
    runtime.write_volume("acme-db-0-data", "format B");

    let refused = c
        .agent
        .rollback("test", false, crate::config::now())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("declared db irreversible"), "{refused}");
    assert!(refused.contains("writes made since are lost"), "{refused}");
    assert!(refused.contains("--restore-data"), "{refused}");
    assert_eq!(current(&c), v2, "nothing changed");

    let done = c
        .agent
        .rollback("test", true, crate::config::now())
        .unwrap();
    assert!(done.contains("restoring db-0"), "{done}");
    c.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    assert_eq!(
        runtime.volume("acme-db-0-data").as_deref(),
        Some("format A")
    );
}

#[tokio::test]
async fn plan_shows_an_irreversible_release_before_approval() {
    let (_dir, c) = converger("approval: {mode: manual}\n");
    release(&c, STACK, "1.0.0", 1);
    c.agent
        .approve("1.0.0", None, "test", crate::config::now())
        .unwrap();
    release_irreversible(&c, &migrating_stack(), "2.0.0", 2);
    let plan = c.agent.plan().unwrap();
    assert_eq!(plan["irreversible"], serde_json::json!(["db"]));
    let text = plan["text"].as_str().unwrap();
    assert!(
        text.contains("irreversible: rolling back past this release restores db's data to the snapshot taken before it; writes made after are lost"),
        "{text}"
    );
}
