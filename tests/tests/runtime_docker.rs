//! The Docker runtime against real engines: dockerd (Debian docker.io) and Podman's API service,
//! each started for the test with its own storage and network subnet. Images are busybox demo
//! images in a real registry on 127.0.0.1; replicas are reached through the agent's public
//! endpoints on 127.0.0.1.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::bundle;
use outpost_bundle_format::stack::StackFile;
use outpost_tests::agent::{AgentProcess, Interrupt, Pauses, campaign_rounds, drop_file};
use outpost_tests::engine::{Kind, TestEngine, demo_image, http_body};
use outpost_tests::forge::{metadata, signed, tar};
use outpost_tests::{
    TestRegistry, build_bundle, eventually_within, free_port, poll_within, sign_with,
};
use serde_json::{Value, json};
use std::path::Path;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// The web server every demo replica runs: index.html says who it is and what it read from db
/// by its DNS name, /healthz exists unless HEALTHY=no. It exits on SIGTERM (busybox httpd as PID 1 would ignore it).
const WEB: &str = r#"trap 'exit 0' TERM; mkdir -p /www; echo "$MESSAGE $(cat /etc/demo-variant) links=$DB_HOST:$DB_PORT db-says=$(wget -qO- http://$DB_HOST:$DB_PORT/log | head -1)" > /www/index.html; [ "$HEALTHY" = no ] || echo ok > /www/healthz; httpd -f -p 8080 -h /www & wait"#;
/// The stateful resource appends a line to /data/log at every start and serves /data.
const DB: &str =
    r#"trap 'exit 0' TERM; echo "started $MESSAGE" >> /data/log; httpd -f -p 5432 -h /data & wait"#;

struct Release<'a> {
    image: &'a str,
    message: &'a str,
    web_replicas: u32,
    web_cpu: f64,
    healthy: bool,
    with_db: bool,
}

fn stack(r: &Release) -> StackFile {
    let mut resources = Vec::new();
    if r.with_db {
        resources.push(json!({"lifecycle": "live", "container": {
            "name": "db", "code": {"image": r.image}, "cpu": 0.25, "memory": "64Mi",
            "ports": [5432], "replicas": 1, "persistentStorage": "16Mi",
            "publicEndpoints": [{"name": "db", "port": 5432, "protocol": "tcp"}],
            "environment": {"MESSAGE": r.message},
            "permissions": "execution", "command": ["sh", "-c", DB]}}));
    }
    resources.push(json!({"lifecycle": "live", "container": {
        "name": "web", "code": {"image": r.image}, "cpu": r.web_cpu, "memory": "64Mi",
        "ports": [8080], "replicas": r.web_replicas, "ephemeralStorage": "8Mi",
        "publicEndpoints": [{"name": "web", "port": 8080, "protocol": "http"}],
        "healthCheck": {"path": "/healthz", "port": 8080, "timeoutSeconds": 1, "failureThreshold": 2},
        "links": if r.with_db { json!(["db"]) } else { json!([]) },
        "environment": {"MESSAGE": r.message, "HEALTHY": if r.healthy { "yes" } else { "no" }},
        "permissions": "execution", "command": ["sh", "-c", WEB]}}));
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": resources,
    }))
    .unwrap()
}

fn publish(drop: &Path, r: &Release, version: &str, sequence: u64) {
    let layout = bundle::build(&stack(r), &metadata(version, sequence), &[]).unwrap();
    drop_file(
        drop,
        &format!("acme-{version}.tar"),
        &tar(&signed(layout, &BOTH)),
    );
}

/// Fields drop in order: the agent stops before the engine is torn down under it.
struct Setup {
    agent: AgentProcess,
    engine: TestEngine,
    _registry: TestRegistry,
    drop: tempfile::TempDir,
    web: u16,
    db: u16,
    images: [String; 2],
}

fn setup(kind: Kind) -> Setup {
    let engine = TestEngine::start(kind);
    let registry = TestRegistry::start(None);
    let images = [demo_image(&registry, "one"), demo_image(&registry, "two")];
    let drop = tempfile::tempdir().unwrap();
    let (web, db) = (free_port(), free_port());
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &engine.agent_config(&[("web", web), ("db", db)]),
    );
    Setup {
        agent,
        engine,
        _registry: registry,
        drop,
        web,
        db,
        images,
    }
}

impl Setup {
    #[track_caller]
    fn web_says(&self, needle: &str) -> String {
        web_answer(&self.agent, self.web, needle)
    }

    /// The mapped options as the engine has them: CPU quota, memory limit, the scratch
    /// tmpfs, environment (with links), our labels.
    #[track_caller]
    fn expect_options(&self, container: &str, nano_cpus: u64, env: &str) {
        let c = self
            .engine
            .api("GET", &format!("/containers/{container}/json"));
        assert_eq!(c["HostConfig"]["NanoCpus"], nano_cpus, "{c:#}");
        assert_eq!(c["HostConfig"]["Memory"], 64 << 20, "{c:#}");
        let tmpfs = c["HostConfig"]["Tmpfs"]["/tmp"]
            .as_str()
            .unwrap_or_default();
        assert!(
            tmpfs.contains("size=8388608") || tmpfs.contains("size=8192k"),
            "{c:#}"
        );
        let environment = c["Config"]["Env"].to_string();
        assert!(
            environment.contains(env) && environment.contains("DB_HOST=db"),
            "{c:#}"
        );
        assert_eq!(c["Config"]["Labels"]["dev.outpost.owner"], "outpost-agent");
        assert_eq!(c["Config"]["Labels"]["dev.outpost.resource"], "web");
    }

    /// Publishes release 1.`sequence`.0 of the demo stack: two web replicas and the stateful
    /// db, the web answering `v<sequence>`.
    fn publish_version(&self, sequence: u64) {
        let message = format!("v{sequence}");
        let release = Release {
            image: &self.images[0],
            message: &message,
            web_replicas: 2,
            web_cpu: 0.25,
            healthy: true,
            with_db: true,
        };
        publish(
            self.drop.path(),
            &release,
            &format!("1.{sequence}.0"),
            sequence,
        );
    }

    fn db_log(&self) -> String {
        http_body(self.db, "/log").unwrap_or_default()
    }
}

/// The body the public endpoint on `port` serves once it contains `needle` (30 s at most).
#[track_caller]
fn web_answer(agent: &AgentProcess, port: u16, needle: &str) -> String {
    let mut last = None;
    poll_within(30, || match http_body(port, "/") {
        Some(body) if body.contains(needle) => Some(body),
        other => {
            last = other;
            None
        }
    })
    .unwrap_or_else(|| {
        panic!(
            "timed out waiting for web answering {needle:?}: {last:?}\nlog: {}",
            agent.log()
        )
    })
}

fn install_update_rollback_drift_prune(kind: Kind) {
    let s = setup(kind);
    let [one, two] = [s.images[0].as_str(), s.images[1].as_str()];
    let v1 = Release {
        image: one,
        message: "v1",
        web_replicas: 2,
        web_cpu: 0.25,
        healthy: true,
        with_db: true,
    };

    // First install, in links order: db, then web; web finds db by name.
    publish(s.drop.path(), &v1, "1.0.0", 1);
    s.agent.wait_converged(1);
    let body = s.web_says("v1 one");
    assert!(
        body.contains("links=db:5432 db-says=started v1"),
        "web reached db by its name: {body}"
    );
    assert_eq!(
        s.engine.containers(),
        ["acme-db-0", "acme-web-0", "acme-web-1"]
    );
    assert!(s.db_log().contains("started v1"));
    s.expect_options("acme-web-0", 250_000_000, "MESSAGE=v1");

    // Update of the image and the environment: web rolls (start new, then stop old), db
    // restarts on its volume.
    let v2 = Release {
        image: two,
        message: "v2",
        web_cpu: 0.5,
        ..v1
    };
    publish(s.drop.path(), &v2, "1.1.0", 2);
    s.agent.wait_converged(2);
    s.web_says("v2 two");
    assert_eq!(
        s.engine.containers(),
        ["acme-db-0", "acme-web-0", "acme-web-1"]
    );
    let log = s.db_log();
    assert!(
        log.contains("started v1") && log.contains("started v2"),
        "{log}"
    );
    s.expect_options("acme-web-1", 500_000_000, "MESSAGE=v2");

    // A release whose health check fails rolls back to the last good one by itself.
    let broken = Release {
        message: "v3",
        healthy: false,
        ..v2
    };
    publish(s.drop.path(), &broken, "1.2.0", 3);
    let status = s.agent.wait_within(120, "automatic rollback", |st| {
        st["current"]["sequence"] == 2
            && st["runtime"]["phase"] == "converged"
            && st["runtime"]["last_rollback"]
                .as_str()
                .is_some_and(|e| e.contains("rolling back"))
    });
    assert!(
        status["runtime"]["last_rollback"]
            .as_str()
            .unwrap()
            .contains("health check failed"),
        "{status:#}"
    );
    s.web_says("v2 two");
    assert!(s.agent.cli(&["history"]).stdout.contains("rolled-back"));
    assert_eq!(s.agent.metric("outpost_rollbacks_total"), 1);

    // Drift: a replica removed and one stopped behind the agent's back are repaired.
    s.engine.api("DELETE", "/containers/acme-web-1?force=true");
    s.engine.api("POST", "/containers/acme-web-0/stop?t=1");
    eventually_within(60, "drift repaired", || {
        let containers = s.engine.containers();
        let running =
            s.engine.api("GET", "/containers/acme-web-0/json")["State"]["Running"] == true;
        if containers == ["acme-db-0", "acme-web-0", "acme-web-1"]
            && running
            && s.agent.metric("outpost_drift_repairs_total") >= 2
        {
            Ok(())
        } else {
            Err(format!(
                "{containers:?} running={running}\n{}",
                s.agent.log()
            ))
        }
    });
    assert!(s.agent.cli(&["history"]).stdout.contains("drift"));
    s.web_says("v2 two");

    // Scale up, and prune: the db resource leaves the release; its volume stays.
    let v4 = Release {
        web_replicas: 3,
        with_db: false,
        message: "v4",
        ..v2
    };
    publish(s.drop.path(), &v4, "1.3.0", 4);
    s.agent.wait_converged(4);
    assert_eq!(
        s.engine.containers(),
        ["acme-web-0", "acme-web-1", "acme-web-2"]
    );
    assert!(s.engine.volumes().contains(&"acme-db-0-data".to_string()));

    // The customer rolls back by hand; the db comes back on its old volume with its data.
    s.agent.cli(&["rollback"]).ok();
    s.agent.wait_converged(2);
    assert_eq!(
        s.engine.containers(),
        ["acme-db-0", "acme-web-0", "acme-web-1"]
    );
    let log = eventually_within(30, "db back", || {
        let log = s.db_log();
        if log.matches("started").count() >= 3 {
            Ok(log)
        } else {
            Err(log)
        }
    });
    assert!(log.contains("started v1"), "{log}");
    s.web_says("v2 two");
}

/// Releases in a row, each interrupted at a random point of its rollout: after the restart each
/// converges with no orphan or duplicate container and a sound store, and the stateful
/// replica saw every release start. Four rounds in CI; `OUTPOST_INTERRUPT_ROUNDS` runs a
/// longer campaign (`tests/bench.sh interrupts` runs 30).
fn interrupted_rollouts(kind: Kind, interrupt: Interrupt) {
    let rounds = campaign_rounds();
    let mut s = setup(kind);
    let mut pauses = Pauses::new(0x9e37_79b9_7f4a_7c15);
    for sequence in 1..=rounds {
        s.publish_version(sequence);
        // Interrupted somewhere in the rollout: pulling, creating, waiting for health, swapping.
        std::thread::sleep(pauses.next(300, 2500));
        s.agent.interrupt(interrupt);
        s.agent.restart();
        s.agent.wait_converged(sequence);
        assert_eq!(
            s.engine.containers(),
            ["acme-db-0", "acme-web-0", "acme-web-1"],
            "no orphans, no duplicates after an interruption during rollout {sequence}"
        );
        let checked = s.agent.cli(&["check-state"]);
        assert_eq!(checked.code, 0, "{}{}", checked.stdout, checked.stderr);
        s.web_says(&format!("v{sequence}"));
    }
    let log = s.db_log();
    for sequence in 1..=rounds {
        let started = format!("started v{sequence}");
        assert!(
            log.lines().any(|l| l.trim_end().ends_with(&started)),
            "{log}"
        );
    }
}

/// The engine goes away during rollouts and comes back: restarted at a random point of two
/// rollouts, then gone for longer than the progress deadline (50 s against 40 s) during a
/// third. Each rollout resumes and converges: no rollback, no orphan or duplicate replica;
/// while the engine is gone `status` says why the rollout waits.
fn engine_restarts_during_rollouts(kind: Kind) {
    let s = setup(kind);
    s.publish_version(1);
    s.agent.wait_converged(1);
    let mut pauses = Pauses::new(0x2545_f491_4f6c_dd1d);
    let converged_without_rollback = |sequence: u64| {
        let status = s.agent.wait_converged(sequence);
        assert_eq!(
            status["runtime"]["last_rollback"],
            Value::Null,
            "{status:#}"
        );
        assert_eq!(
            s.engine.containers(),
            ["acme-db-0", "acme-web-0", "acme-web-1"],
            "no orphans, no duplicates after the engine came back during rollout {sequence}"
        );
        s.web_says(&format!("v{sequence}"));
    };
    for sequence in 2..=3u64 {
        s.publish_version(sequence);
        std::thread::sleep(pauses.next(300, 2500));
        s.engine.halt();
        std::thread::sleep(std::time::Duration::from_secs(2));
        s.engine.resume();
        converged_without_rollback(sequence);
    }
    s.publish_version(4);
    std::thread::sleep(std::time::Duration::from_millis(800));
    s.engine.halt();
    let gone = std::time::Instant::now();
    let status = s
        .agent
        .wait_within(30, "the engine's absence in status", |st| {
            st["runtime"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("retrying"))
        });
    assert_eq!(status["current"]["sequence"], 4, "{status:#}");
    std::thread::sleep(std::time::Duration::from_secs(50).saturating_sub(gone.elapsed()));
    let status = s.agent.status();
    assert_eq!(
        status["runtime"]["last_rollback"],
        Value::Null,
        "{status:#}"
    );
    assert_eq!(status["current"]["sequence"], 4, "{status:#}");
    s.engine.resume();
    converged_without_rollback(4);
}

/// An air-gapped site: the bundle carries its images (`build --with-images`), the registry is
/// gone before the agent sees the bundle, and the replicas run from the loaded images.
fn air_gapped_images_load_from_the_bundle(kind: Kind) {
    let engine = TestEngine::start(kind);
    let work = tempfile::tempdir().unwrap();
    let bundle_file = work.path().join("acme-1.0.0.tar");
    {
        let registry = TestRegistry::start(None);
        let image = demo_image(&registry, "carried");
        let release = Release {
            image: &image,
            message: "offline",
            web_replicas: 1,
            web_cpu: 0.25,
            healthy: true,
            with_db: false,
        };
        let stack_file = work.path().join("stack.yaml");
        std::fs::write(
            &stack_file,
            serde_json::to_string(&stack(&release)).unwrap(),
        )
        .unwrap();
        build_bundle(&stack_file, "1.0.0", 1, &["--with-images"], &bundle_file);
        sign_with(&bundle_file, &BOTH);
    }
    let drop = tempfile::tempdir().unwrap();
    let web = free_port();
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &engine.agent_config(&[("web", web)]),
    );
    drop_file(
        drop.path(),
        "acme-1.0.0.tar",
        &std::fs::read(&bundle_file).unwrap(),
    );
    agent.wait_converged(1);
    web_answer(&agent, web, "offline carried");
}

/// Images from a registry that wants credentials: the customer's `docker.registries` entry
/// is what the engine pulls with.
fn pulls_with_the_customers_registry_credentials(kind: Kind) {
    let engine = TestEngine::start(kind);
    let registry = TestRegistry::start(Some(("puller", "s3cret")));
    let image = demo_image(&registry, "private");
    let (drop, secrets) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let password = secrets.path().join("registry.password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let web = free_port();
    let config = engine.agent_config(&[("web", web)]).replace(
        "docker:\n",
        &format!(
            "docker:\n  registries: {{\"{}\": {{username: puller, password_file: {}}}}}\n",
            registry.host(),
            password.display()
        ),
    );
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &config,
    );
    let release = Release {
        image: &image,
        message: "authenticated",
        web_replicas: 1,
        web_cpu: 0.25,
        healthy: true,
        with_db: false,
    };
    publish(drop.path(), &release, "1.0.0", 1);
    agent.wait_converged(1);
    web_answer(&agent, web, "authenticated private");
}

#[test]
fn dockerd_pulls_with_the_customers_registry_credentials() {
    pulls_with_the_customers_registry_credentials(Kind::Docker);
}

#[test]
fn podman_pulls_with_the_customers_registry_credentials() {
    pulls_with_the_customers_registry_credentials(Kind::Podman);
}

#[test]
fn dockerd_air_gapped_images_load_from_the_bundle() {
    air_gapped_images_load_from_the_bundle(Kind::Docker);
}

#[test]
fn podman_air_gapped_images_load_from_the_bundle() {
    air_gapped_images_load_from_the_bundle(Kind::Podman);
}

#[test]
fn dockerd_install_update_rollback_drift_prune() {
    install_update_rollback_drift_prune(Kind::Docker);
}

#[test]
fn podman_install_update_rollback_drift_prune() {
    install_update_rollback_drift_prune(Kind::Podman);
}

#[test]
fn dockerd_kill_9_during_rollouts() {
    interrupted_rollouts(Kind::Docker, Interrupt::Kill);
}

#[test]
fn dockerd_sigterm_during_rollouts() {
    interrupted_rollouts(Kind::Docker, Interrupt::Term);
}

#[test]
fn dockerd_restarts_during_rollouts() {
    engine_restarts_during_rollouts(Kind::Docker);
}

#[test]
fn podman_restarts_during_rollouts() {
    engine_restarts_during_rollouts(Kind::Podman);
}

#[test]
fn podman_kill_9_during_rollouts() {
    interrupted_rollouts(Kind::Podman, Interrupt::Kill);
}

#[test]
fn podman_sigterm_during_rollouts() {
    interrupted_rollouts(Kind::Podman, Interrupt::Term);
}
