//! Snapshots before change and restores on rollback, on real engines (dockerd and Podman): a
//! stateful busybox "database" whose release 1 writes its data in format A and refuses any
//! other format, and a release 2 that migrates it to format B, declared irreversible.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::bundle;
use outpost_bundle_format::release::format_version_for;
use outpost_bundle_format::stack::StackFile;
use outpost_tests::agent::{AgentProcess, drop_file};
use outpost_tests::engine::{Kind, TestEngine, demo_image, http_body};
use outpost_tests::forge::{metadata, signed, tar};
use outpost_tests::{TestRegistry, free_port, poll_within};
use serde_json::json;

/// Reads the format of /data; writes its own on an empty volume, migrates with MIGRATE=yes,
/// else refuses data in another format (exits 1, as a database that cannot read its files).
/// Serves the format and, unless HEALTHY=no, /healthz. BULK_KIB of filler makes the copy take
/// a moment.
const DB: &str = r#"trap 'exit 0' TERM
f=$(cat /data/format 2>/dev/null)
if [ -z "$f" ]; then echo "$FORMAT" > /data/format; dd if=/dev/urandom of=/data/bulk bs=1024 count="$BULK_KIB" 2>/dev/null
elif [ "$f" != "$FORMAT" ]; then
  if [ "$MIGRATE" = yes ]; then echo "$FORMAT" > /data/format; else echo "cannot read format $f" >&2; exit 1; fi
fi
mkdir -p /www; cp /data/format /www/format
[ "$HEALTHY" = no ] || echo ok > /www/healthz
httpd -f -p 5432 -h /www & wait"#;

struct Db<'a> {
    format: &'a str,
    migrate: bool,
    healthy: bool,
}

fn stack(image: &str, db: &Db, bulk_kib: u32) -> StackFile {
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": {
            "name": "db", "code": {"image": image}, "cpu": 0.25, "memory": "64Mi",
            "ports": [5432], "replicas": 1, "persistentStorage": "256Mi",
            "publicEndpoints": [{"name": "db", "port": 5432, "protocol": "http"}],
            "healthCheck": {"path": "/healthz", "port": 5432, "timeoutSeconds": 1, "failureThreshold": 2},
            "environment": {
                "FORMAT": db.format,
                "MIGRATE": if db.migrate { "yes" } else { "no" },
                "HEALTHY": if db.healthy { "yes" } else { "no" },
                "BULK_KIB": bulk_kib.to_string(),
            },
            "permissions": "execution", "command": ["sh", "-c", DB]}}],
    }))
    .unwrap()
}

struct Setup {
    agent: AgentProcess,
    engine: TestEngine,
    _registry: TestRegistry,
    drop: tempfile::TempDir,
    port: u16,
    image: String,
    bulk_kib: u32,
}

fn setup(kind: Kind, bulk_kib: u32, snapshots: &str) -> Setup {
    let engine = TestEngine::start(kind);
    let registry = TestRegistry::start(None);
    let image = demo_image(&registry, "one");
    let drop = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &format!(
            "{}snapshots: {snapshots}\n",
            engine.agent_config(&[("db", port)])
        ),
    );
    Setup {
        agent,
        engine,
        _registry: registry,
        drop,
        port,
        image,
        bulk_kib,
    }
}

impl Setup {
    fn publish(&self, db: &Db, version: &str, sequence: u64, irreversible: &[&str]) {
        let mut metadata = metadata(version, sequence);
        metadata.irreversible = irreversible.iter().map(|r| r.to_string()).collect();
        metadata.format_version = format_version_for(&metadata.irreversible);
        let layout = bundle::build(&stack(&self.image, db, self.bulk_kib), &metadata, &[]).unwrap();
        drop_file(
            self.drop.path(),
            &format!("acme-{version}.tar"),
            &tar(&signed(layout, &["vendor-a", "vendor-b"])),
        );
    }

    /// The format the running db serves (30 s at most for it to say `expected`).
    #[track_caller]
    fn expect_format(&self, expected: &str) {
        let mut last = None;
        poll_within(30, || {
            last = http_body(self.port, "/format");
            (last.as_deref().map(str::trim) == Some(expected)).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "db never served format {expected}: {last:?}\nlog: {}",
                self.agent.log()
            )
        });
    }

    /// The snapshot archives on disk.
    fn snapshot_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.agent.path("state/snapshots"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Release 1's database: writes format A, refuses any other.
const A: Db = Db {
    format: "A",
    migrate: false,
    healthy: true,
};

/// The migrating release: moves the data to format B, then passes its health check or not.
const fn to_b(healthy: bool) -> Db<'static> {
    Db {
        format: "B",
        migrate: true,
        healthy,
    }
}

fn failed_migration_restores_and_manual_rollback_asks(kind: Kind) {
    // keep 1: each replica keeps only its newest snapshot, unless a rollback still needs it.
    let s = setup(kind, 64, "{keep: 1}");
    s.publish(&A, "1.0.0", 1, &[]);
    s.agent.wait_converged(1);
    s.expect_format("A");
    assert!(
        s.snapshot_files().is_empty(),
        "a first install copies nothing"
    );

    // 2.0.0 migrates to B and fails its health check: rolled back onto the data as it was.
    s.publish(&to_b(false), "2.0.0", 2, &["db"]);
    // Waited for: 2.0.0 failed and rolled back, and 1.0.0 converged again since.
    s.agent.wait_within(120, "the rollback of 2.0.0", |s| {
        s["runtime"]["last_rollback"]
            .as_str()
            .is_some_and(|r| r.contains("2.0.0 failed"))
            && s["current"]["sequence"] == 1
            && s["runtime"]["converged"] == s["current"]["digest"]
            && s["runtime"]["phase"] == "converged"
    });
    s.expect_format("A");
    let history = s.agent.cli(&["history"]).ok().stdout;
    assert!(history.contains("db-0: data restored"), "{history}");
    let listed = s.agent.cli(&["snapshots"]).ok().stdout;
    assert!(
        listed.contains("2.0.0") && listed.contains("db") && listed.contains("ready"),
        "{listed}"
    );

    // 3.0.0 migrates and runs: its snapshot holds format A; 2.0.0's is beyond retention.
    s.publish(&to_b(true), "3.0.0", 3, &["db"]);
    s.agent.wait_converged(3);
    s.expect_format("B");
    let files = s.snapshot_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        !s.agent.cli(&["snapshots"]).ok().stdout.contains("2.0.0"),
        "retention deleted the older one"
    );

    // Leaving 3.0.0 by hand: refused without --restore-data, restored with it.
    let refused = s.agent.cli(&["rollback"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("--restore-data")
            && refused.stderr.contains("writes made since are lost"),
        "{}",
        refused.stderr
    );
    let status = s.agent.status();
    assert_eq!(status["current"]["sequence"], 3, "nothing changed");
    s.agent.cli(&["rollback", "--restore-data"]).ok();
    s.agent.wait_converged(1);
    s.expect_format("A");
    assert_eq!(s.engine.containers(), ["acme-db-0"]);
    assert_eq!(s.engine.volumes(), ["acme-db-0-data"]);
}

/// kill -9 while the volume is copied and while it is restored: the copy is retaken, the
/// restore redone, and no replica ever starts on a half-restored volume.
fn kill_9_during_snapshot_and_restore(kind: Kind) {
    // 48 MiB of filler: the copy and the restore take long enough to be interrupted.
    let mut s = setup(kind, 48 << 10, "{keep: 2}");
    s.publish(&A, "1.0.0", 1, &[]);
    s.agent.wait_converged_within(180, 1);
    s.publish(&to_b(true), "2.0.0", 2, &["db"]);
    let copying = watch(60, || s.snapshot_files().iter().any(|f| f.starts_with('.')));
    assert!(copying.is_some(), "no copy seen\nlog: {}", s.agent.log());
    s.agent.kill();
    s.agent.restart();
    s.agent.wait_converged_within(180, 2);
    s.expect_format("B");
    let files = s.snapshot_files();
    assert!(
        files.len() == 1 && !files[0].starts_with('.'),
        "one complete snapshot, no partial left: {files:?}"
    );

    s.agent.cli(&["rollback", "--restore-data"]).ok();
    let helper = "/containers/acme-db-0-restore/json";
    let restoring = poll_within(60, || {
        s.engine.api("GET", helper)["Id"].as_str().map(|_| ())
    });
    assert!(
        restoring.is_some(),
        "no restore seen\nlog: {}",
        s.agent.log()
    );
    s.agent.kill();
    // Killed mid-restore: nothing runs on the volume.
    assert!(
        s.engine.containers().is_empty(),
        "{:?}",
        s.engine.containers()
    );
    s.agent.restart();
    s.agent.wait_converged_within(180, 1);
    s.expect_format("A");
    assert_eq!(s.engine.containers(), ["acme-db-0"]);
    assert!(
        s.engine.api("GET", helper)["Id"].is_null(),
        "helper removed"
    );
}

/// Watches closely (every 5 ms) for a moment that lasts only a fraction of a second.
fn watch(seconds: u64, mut seen: impl FnMut() -> bool) -> Option<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if seen() {
            return Some(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

#[test]
fn dockerd_failed_migration_restores_and_manual_rollback_asks() {
    failed_migration_restores_and_manual_rollback_asks(Kind::Docker);
}

#[test]
fn podman_failed_migration_restores_and_manual_rollback_asks() {
    failed_migration_restores_and_manual_rollback_asks(Kind::Podman);
}

#[test]
fn dockerd_kill_9_during_snapshot_and_restore() {
    kill_9_during_snapshot_and_restore(Kind::Docker);
}

#[test]
fn podman_kill_9_during_snapshot_and_restore() {
    kill_9_during_snapshot_and_restore(Kind::Podman);
}
