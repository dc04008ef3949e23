//! The VM backend on a fake cloud: every machine the cloud launches boots a real node agent
//! (in this process, on its own fake engine) that joins over the node protocol on 127.0.0.1.

use super::nodes::{JoinRequest, Nodes};
use super::provider::FakeCloud;
use super::*;
use crate::config::Config;
use crate::pipeline::Agent;
use crate::rollout::Converger;
use crate::runtime::Runtime;
use crate::runtime::fake::FakeRuntime;
use crate::testing::{signed_stack, test_config};
use node::{NodeAgent, NodeOptions};
use std::sync::Arc;

const SECRET: &str = "s3cret-for-tests";

const STACK: &str = r#"
name: acme
permissionProfiles: {execution: {}}
resources:
  - lifecycle: live
    container:
      name: api
      code: {image: "r.example/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      replicas: 3
      permissions: execution
"#;

const API: &str =
    "r.example/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

const BROKEN: &str =
    "r.example/api@sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// Machines the fake cloud runs, each with its node agent and engine.
#[derive(Default)]
struct Machines {
    running: BTreeMap<String, (FakeRuntime, tokio::task::JoinHandle<()>)>,
    broken: Vec<String>,
    /// How many of the next machines launched never boot (a bad image).
    duds: usize,
    /// Machine settings whose machines never boot.
    dud_settings: BTreeSet<String>,
    /// Machine settings whose machines cannot run the api image.
    failing_settings: BTreeSet<String>,
    dead: Vec<String>,
    /// Each machine's `/dev/disk/by-id`: links to the disks of the volumes attached to it.
    by_id: BTreeMap<String, std::path::PathBuf>,
    launched: u8,
}

struct Test {
    agent: Arc<Agent>,
    converger: Converger<Pools<FakeCloud>>,
    cloud: FakeCloud,
    nodes: Arc<Nodes>,
    settings: Settings,
    url: String,
    machines: Arc<Mutex<Machines>>,
    _booter: tokio::task::JoinHandle<()>,
}

impl Test {
    fn engines(&self) -> BTreeMap<String, FakeRuntime> {
        self.machines
            .lock()
            .unwrap()
            .running
            .iter()
            .map(|(id, (engine, _))| (id.clone(), engine.clone()))
            .collect()
    }

    /// The agent restarted with other `settings`, on the same cloud and nodes.
    fn restarted(&self, settings: Settings) -> Converger<Pools<FakeCloud>> {
        Converger::new(
            self.agent.rollout_context(),
            Pools::new(
                self.agent.rollout_context(),
                settings,
                self.cloud.clone(),
                self.nodes.clone(),
            ),
        )
    }

    fn break_image(&self, image: &str) {
        let mut machines = self.machines.lock().unwrap();
        machines.broken.push(image.to_string());
        for (engine, _) in machines.running.values() {
            engine.break_image(image);
        }
    }

    /// Replicas running on each machine, by name.
    fn placement(&self) -> BTreeMap<String, Vec<String>> {
        self.engines()
            .into_iter()
            .map(|(id, engine)| {
                let names = engine
                    .log()
                    .iter()
                    .filter_map(|l| l.strip_prefix("create ").map(String::from))
                    .collect();
                (id, names)
            })
            .collect()
    }
}

async fn cloud() -> (tempfile::TempDir, Test) {
    cloud_with("").await
}

/// The fake cloud, with `extra` configuration before the VM settings.
async fn cloud_with(extra: &str) -> (tempfile::TempDir, Test) {
    let (dir, path) = test_config(&format!(
        "{extra}runtime: vm\nrollout: {{grace_seconds: 0, progress_deadline_seconds: 10}}\nvm:\n  provider: aws\n  aws: {{region: test-1}}\n  nodes: {{listen: 127.0.0.1:0, advertise: http://127.0.0.1:1, bootstrap_secret_file: secret, report_timeout_seconds: 2, boot_timeout_seconds: 3}}\n  pools:\n    default: {{instance_type: small, image: ami-1, subnets: [a, b], max_machines: 4}}\n",
    ));
    let config = Config::load(&path).unwrap();
    let agent = Arc::new(Agent::new(config).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let nodes = Nodes::new(
        SECRET.into(),
        std::env::current_exe().unwrap(),
        dir.path().join("images"),
        Duration::from_secs(2),
    );
    tokio::spawn(nodes.clone().serve(listener));
    let cloud = FakeCloud::default();
    let settings = Settings {
        vm: agent.config.vm.clone().unwrap(),
        permissions: agent.config.permissions.clone(),
        bootstrap: Bootstrap {
            advertise: url.clone(),
            binary_sha256: "0".repeat(64),
            secret: SECRET.into(),
        },
    };
    let backend = Pools::new(
        agent.rollout_context(),
        settings.clone(),
        cloud.clone(),
        nodes.clone(),
    );
    let converger = Converger::new(agent.rollout_context(), backend);
    let machines: Arc<Mutex<Machines>> = Arc::default();
    let booter = tokio::spawn(boot(cloud.clone(), url.clone(), machines.clone()));
    (
        dir,
        Test {
            agent,
            converger,
            cloud,
            nodes,
            settings,
            url,
            machines,
            _booter: booter,
        },
    )
}

/// Where the fake cloud keeps its volumes' disks: 16 MiB files, one per volume.
fn disk_store() -> &'static std::path::Path {
    static STORE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    STORE.get_or_init(|| tempfile::tempdir().unwrap().keep())
}

/// Links each volume's disk into the `by-id` directory of the machine it is attached to, as
/// the cloud's NVMe driver names it, and unlinks those detached.
fn attach_disks(cloud: &FakeCloud, by_id: &BTreeMap<String, std::path::PathBuf>) {
    for (_, volume) in cloud.all_volumes() {
        let disk = disk_store().join(&volume.id);
        if !disk.exists() {
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
        }
        let link = format!(
            "nvme-Amazon_Elastic_Block_Store_{}",
            volume.id.replace('-', "")
        );
        for (machine, dir) in by_id {
            let here = volume
                .attachment
                .as_ref()
                .is_some_and(|a| a.machine == *machine);
            let path = dir.join(&link);
            if here && !path.exists() {
                std::os::unix::fs::symlink(&disk, &path).unwrap();
            } else if !here && path.exists() {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
}

/// Boots a node agent on every machine the cloud launches; stops those of machines gone.
async fn boot(cloud: FakeCloud, url: String, machines: Arc<Mutex<Machines>>) {
    loop {
        let launched = cloud.all_machines();
        {
            let mut booted = machines.lock().unwrap();
            booted.running.retain(|id, (_, task)| {
                let alive = launched.iter().any(|(m, _)| m.id == *id);
                if !alive {
                    task.abort();
                }
                alive
            });
            for (machine, settings) in launched {
                if booted.running.contains_key(&machine.id) || booted.dead.contains(&machine.id) {
                    continue;
                }
                if booted.duds > 0 || booted.dud_settings.contains(&settings) {
                    booted.duds = booted.duds.saturating_sub(1);
                    booted.dead.push(machine.id.clone());
                    continue;
                }
                let engine = FakeRuntime::default();
                // Each machine's replicas reach it at an address of its own.
                engine.set_host_address(std::net::Ipv4Addr::new(127, 0, 1, booted.launched).into());
                booted.launched = booted.launched.wrapping_add(1);
                for image in &booted.broken {
                    engine.break_image(image);
                }
                if booted.failing_settings.contains(&settings) {
                    engine.break_image(API);
                }
                let state = tempfile::tempdir().unwrap().keep();
                let disks = state.join("by-id");
                std::fs::create_dir(&disks).unwrap();
                booted.by_id.insert(machine.id.clone(), disks.clone());
                let options = NodeOptions {
                    agent: url.clone(),
                    instance_id: machine.id.clone(),
                    settings,
                    bootstrap_secret: SECRET.into(),
                    state_dir: state.clone(),
                    docker: crate::config::DockerConfig::default(),
                    publish_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
                    disks: super::disk::Disks {
                        by_id: disks.clone(),
                    },
                    links_listen: "127.0.0.1:0".parse().unwrap(),
                };
                let context = Context {
                    store: Arc::new(crate::state::Store::in_memory().unwrap()),
                    status: Arc::default(),
                    changed: Arc::default(),
                    rollout: crate::config::RolloutConfig {
                        grace_seconds: 0,
                        ..Default::default()
                    },
                    metrics: Arc::new(crate::metrics::Metrics::new()),
                };
                let runtime = engine.clone();
                let node = NodeAgent::new(options, context, move || runtime.clone()).unwrap();
                let task = tokio::spawn(async move { node.run().await });
                booted.running.insert(machine.id.clone(), (engine, task));
            }
            attach_disks(&cloud, &booted.by_id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn release(c: &Test, yaml: &str, version: &str, sequence: u64) -> Digest {
    match c
        .agent
        .ingest(
            &signed_stack(yaml, version, sequence),
            "test",
            crate::config::now(),
        )
        .unwrap()
    {
        crate::pipeline::Ingested::Accepted { digest, .. } => digest,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_on_as_many_machines_as_the_replicas_need() {
    let (_dir, c) = cloud().await;
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    // A small machine offers 1.75 cores: one 1-core replica each.
    let placement = c.placement();
    assert_eq!(placement.len(), 3, "{placement:?}");
    let mut all: Vec<String> = placement.values().flatten().cloned().collect();
    all.sort();
    assert_eq!(all, ["api-0 primary", "api-1 primary", "api-2 primary"]);
    let status = c.agent.runtime_view.current();
    assert_eq!(status.pools["default"].desired, 3);
    let api = &status.resources["api"];
    assert_eq!((api.desired, api.ready), (Some(3), Some(3)));
    assert!(
        status.pools["default"]
            .machines
            .iter()
            .all(|m| m.state == "healthy" && m.replicas.len() == 1),
        "{:?}",
        status.pools
    );
    // Converged: a drift pass describes and writes nothing.
    let before = c.cloud.calls();
    c.converger.converge_once().await.unwrap();
    let after = c.cloud.calls();
    for write in ["set_desired", "remove_machine"] {
        assert_eq!(before.get(write), after.get(write), "{write}");
    }
}

const LINKED: &str = r#"
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
      permissions: execution
  - lifecycle: live
    container:
      name: api
      code: {image: "r.example/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      replicas: 2
      links: [db]
      permissions: execution
"#;

/// A linked resource on another machine: the api replicas resolve `db` to their own machine,
/// whose links lead to the db machine's link server; the db machine offers, and needs, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_resources_are_reached_across_machines() {
    let (_dir, c) = cloud().await;
    release(&c, LINKED, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let placement = c.placement();
    assert_eq!(placement.len(), 3, "{placement:?}");
    let nodes = c.nodes.nodes();
    let db_machine = placement
        .iter()
        .find(|(_, replicas)| replicas.contains(&"db-0 primary".to_string()))
        .map(|(machine, _)| machine.clone())
        .unwrap();
    let db_links = nodes[&db_machine]
        .links
        .expect("the db machine's link server");
    let engines = c.engines();
    for (machine, node) in &nodes {
        let links = &node.assignment.links;
        assert_eq!(links.secret.len(), 64, "{links:?}");
        if *machine == db_machine {
            assert_eq!(
                links.peers["db"],
                [] as [std::net::SocketAddr; 0],
                "{links:?}"
            );
            continue;
        }
        assert_eq!(links.peers["db"], [db_links], "{machine}: {links:?}");
        let api = node.assignment.replicas[0].clone();
        let spec = engines[machine].spec(&api).unwrap();
        let host = engines[machine].host_address("acme").await.unwrap();
        assert_eq!(spec.hosts, BTreeMap::from([("db".to_string(), host)]));
        assert_eq!(spec.environment["DB_HOST"], "db");
    }
}

/// An autoscaled resource grows by the load its nodes report, onto more machines, once per
/// cool-down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaled_resource_grows_by_the_load_its_nodes_report() {
    let (_dir, c) = cloud_with("").await;
    let text = STACK.replace(
        "replicas: 3\n",
        "autoScale: {min: 1, desired: 1, max: 3, targetCpuPercent: 50}\n",
    );
    release(&c, &text, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.placement().len(), 1);
    // api-0 at 120% of its CPU against a 50% target: 1 → 3 replicas, on three machines.
    for engine in c.engines().values() {
        engine.set_usage(120.0, 10.0);
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        c.converger.converge_once().await.unwrap();
        let all: usize = c.placement().values().map(Vec::len).sum();
        if all == 3 {
            break;
        }
        assert!(Instant::now() < until, "{:?}", c.placement());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        c.placement().len(),
        3,
        "one 1-core replica per small machine"
    );
    let history = c.agent.store.history(20).unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.kind == "autoscale" && e.message.contains("api: 1 -> 3")),
        "{history:?}"
    );
    assert_eq!(
        c.agent.runtime_view.current().resources["api"].desired,
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_release_is_rolled_back_after_its_first_machine() {
    let (_dir, c) = cloud().await;
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    c.break_image(BROKEN);
    let broken = STACK.replace(
        "r.example/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        BROKEN,
    );
    release(&c, &broken, "2.0.0", 2);
    c.converger.converge_once().await.unwrap();
    let positions = c.agent.store.positions().unwrap();
    assert_eq!(positions.current.unwrap().digest, v1, "rolled back");
    // Only one machine tried 2.0.0: the others never saw it.
    let tried: Vec<String> = c
        .engines()
        .into_iter()
        .filter(|(_, engine)| {
            engine
                .log()
                .iter()
                .filter(|l| l.starts_with("create"))
                .count()
                > 1
        })
        .map(|(id, _)| id)
        .collect();
    assert_eq!(tried.len(), 1, "{:?}", c.placement());
    // The rollback converges on 1.0.0 everywhere.
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_terminated_behind_the_agents_back_is_replaced_and_refilled() {
    let (_dir, c) = cloud().await;
    release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let victim = c.engines().keys().next().unwrap().clone();
    c.cloud.kill(&victim);
    // Drift passes until the replacement machine runs the replica again.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        c.converger.converge_once().await.unwrap();
        let status = c.agent.runtime_view.current();
        let healthy = status.pools["default"]
            .machines
            .iter()
            .filter(|m| m.state == "healthy" && m.replicas.len() == 1)
            .count();
        if healthy == 3
            && !status.pools["default"]
                .machines
                .iter()
                .any(|m| m.id == victim)
        {
            break;
        }
        assert!(Instant::now() < until, "{:?}", status.pools);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_boots_is_replaced_within_the_rollout() {
    let (_dir, c) = cloud().await;
    c.machines.lock().unwrap().duds = 1;
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    let dud = c.machines.lock().unwrap().dead[0].clone();
    assert!(!c.cloud.all_machines().iter().any(|(m, _)| m.id == dud));
    let history = c.agent.store.history(20).unwrap();
    assert!(
        history.iter().any(|e| e.kind == "machine-replaced"
            && e.message.contains(&format!(
                "{dud} of pool default (its node has not joined within 3s of launch)"
            ))),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_machine_settings_replace_machines_one_at_a_time() {
    let (_dir, c) = cloud().await;
    let v1 = release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let old: BTreeSet<String> = c.engines().keys().cloned().collect();
    // The customer changes the machine image: the agent restarts with the new settings.
    let mut settings = c.settings.clone();
    settings.vm.pools.get_mut("default").unwrap().image = "ami-2".into();
    let new_settings = settings_hash(&settings.vm.pools["default"]);
    let restarted = c.restarted(settings);
    let until = Instant::now() + Duration::from_secs(30);
    let mut most_gone = 0;
    loop {
        restarted.converge_once().await.unwrap();
        let machines = c.cloud.all_machines();
        let gone = old
            .iter()
            .filter(|id| !machines.iter().any(|(m, _)| m.id == **id))
            .count();
        // One at a time: never two old machines gone while a replacement is not serving.
        let healthy = c.agent.runtime_view.current().pools["default"]
            .machines
            .iter()
            .filter(|m| m.state == "healthy" && !m.replicas.is_empty())
            .count();
        assert!(healthy >= 2, "{:?}", c.agent.runtime_view.current().pools);
        most_gone = most_gone.max(gone);
        if machines.iter().all(|(_, s)| *s == new_settings) && healthy == 3 {
            break;
        }
        assert!(Instant::now() < until, "{machines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most_gone, 3);
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
}

/// Drift passes until the pool is back on the `good` settings, three machines serving and the
/// rollback said (never fewer than two serving meanwhile); the rollback's message. A pass may
/// fail (a machine that cannot run its share): that is an error, never a release's rollback.
async fn until_rolled_back(
    c: &Test,
    converger: &Converger<Pools<FakeCloud>>,
    good: &str,
) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = converger.converge_once().await;
        let status = c.agent.runtime_view.current();
        let serving = status.pools["default"]
            .machines
            .iter()
            .filter(|m| m.state == "healthy" && !m.replicas.is_empty())
            .count();
        assert!(serving >= 2, "{:?}", status.pools);
        let machines = c.cloud.all_machines();
        if let Some(rollback) = &status.last_rollback
            && serving == 3
            && machines.iter().all(|(_, s)| s == good)
        {
            return rollback.clone();
        }
        assert!(Instant::now() < until, "{machines:?} {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// New machine settings whose machines never join are rolled back after two: the pool
/// launches from its last good settings again, keeps serving throughout, says why, and does
/// not try the failed settings again until they change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_settings_whose_machines_never_join_are_rolled_back() {
    let (_dir, c) = cloud().await;
    release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let good = settings_hash(&c.settings.vm.pools["default"]);
    let mut settings = c.settings.clone();
    settings.vm.pools.get_mut("default").unwrap().image = "ami-broken".into();
    let broken = settings_hash(&settings.vm.pools["default"]);
    c.machines
        .lock()
        .unwrap()
        .dud_settings
        .insert(broken.clone());
    let rollback = until_rolled_back(&c, &c.restarted(settings.clone()), &good).await;
    let status = c.agent.runtime_view.current();
    assert!(
        rollback.contains(&format!(
            "pool default: machine settings {broken} rolled back to the last good ones: 2 machines never joined"
        )),
        "{rollback}"
    );
    assert!(rollback.contains("image ami-broken"), "{rollback}");
    let problem = status.pools["default"].problem.clone().unwrap();
    assert!(
        problem.contains("running the last good settings (small, ami-1)"),
        "{problem}"
    );
    let history = c.agent.store.history(30).unwrap();
    assert!(
        history.iter().any(|e| e.kind == "machine-rollback"),
        "{history:?}"
    );
    // Restarted again with the same settings: they are not tried again.
    let again = c.restarted(settings);
    for _ in 0..5 {
        again.converge_once().await.unwrap();
    }
    assert!(
        c.cloud.all_machines().iter().all(|(_, s)| *s == good),
        "{:?}",
        c.cloud.all_machines()
    );
}

/// New machine settings on which the release, running on the old machines, cannot run: rolled
/// back at the first such machine, which is replaced from the last good settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_settings_that_cannot_run_the_release_are_rolled_back() {
    let (_dir, c) = cloud().await;
    release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let good = settings_hash(&c.settings.vm.pools["default"]);
    let mut settings = c.settings.clone();
    settings.vm.pools.get_mut("default").unwrap().image = "ami-no-driver".into();
    let failing = settings_hash(&settings.vm.pools["default"]);
    c.machines.lock().unwrap().failing_settings.insert(failing);
    let rollback = until_rolled_back(&c, &c.restarted(settings), &good).await;
    assert!(
        rollback.contains("image ami-no-driver could not run the release"),
        "{rollback}"
    );
    assert_eq!(
        c.agent
            .store
            .positions()
            .unwrap()
            .converged
            .map(|d| d.to_string()),
        c.agent
            .store
            .positions()
            .unwrap()
            .current
            .map(|c| c.digest.to_string())
    );
}

const DATABASE: &str = r#"
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
      replicas: 2
      persistentStorage: 1500Mi
      permissions: execution
"#;

/// Volumes of the fake cloud: `(id, replica, zone, attached machine)`.
fn volumes(c: &Test) -> Vec<(String, String, String, Option<String>)> {
    c.cloud
        .all_volumes()
        .into_iter()
        .map(|(_, v)| {
            (
                v.id,
                format!("{}-{}", v.replica.resource, v.replica.ordinal),
                v.zone,
                v.attachment.map(|a| a.machine),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stateful_ordinal_keeps_its_volume_across_machines_and_releases() {
    let (_dir, c) = cloud().await;
    let v1 = release(&c, DATABASE, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v1));
    let made = volumes(&c);
    assert_eq!(made.len(), 2, "{made:?}");
    let machines = c.cloud.all_machines();
    for (id, replica, zone, attached) in &made {
        // Made where its replica first ran (1500 MiB rounds up to 2 GiB), attached there, and
        // the node's engine mounts that device at /data.
        let machine = attached.as_ref().unwrap();
        let (m, _) = machines.iter().find(|(m, _)| m.id == *machine).unwrap();
        assert_eq!(m.zone, *zone);
        let engine = c.engines()[machine].clone();
        let log = engine.log();
        let used = log
            .iter()
            .position(|l| l.starts_with(&format!("use-device {replica} ")))
            .unwrap_or_else(|| panic!("{replica} on {machine}: {log:?}"));
        assert!(log[used].ends_with(&format!("Store_{}", id.replace('-', ""))));
        let created = log
            .iter()
            .position(|l| l == &format!("create {replica} primary"))
            .unwrap();
        assert!(used < created, "{log:?}");
    }
    let status = c.agent.runtime_view.current();
    assert_eq!(status.volumes.len(), 2);
    assert!(status.volumes["db-0"].state.starts_with("attached to i-"));
    assert_eq!(status.volumes["db-0"].size_gib, 2);

    // The machine of db-0 terminated: db-0 comes back on the replacement, in the same zone,
    // with the same volume.
    let (db0, _, zone, Some(victim)) = made.iter().find(|v| v.1 == "db-0").unwrap().clone() else {
        unreachable!()
    };
    c.cloud.kill(&victim);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        c.converger.converge_once().await.unwrap();
        let now = volumes(&c);
        let back = now
            .iter()
            .find(|v| v.0 == db0)
            .and_then(|v| v.3.clone())
            .filter(|m| *m != victim);
        let healthy = c.agent.runtime_view.current().resources["db"].ready == Some(2);
        if let (Some(machine), true) = (back, healthy) {
            assert_eq!(now.len(), 2, "no second volume: {now:?}");
            let (m, _) = c
                .cloud
                .all_machines()
                .into_iter()
                .find(|(m, _)| m.id == machine)
                .unwrap();
            assert_eq!(m.zone, zone);
            break;
        }
        assert!(Instant::now() < until, "{now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A new release and a scale-down keep every volume (delete_volumes is off).
    let v2 = release(
        &c,
        &DATABASE.replace("replicas: 2", "replicas: 1"),
        "2.0.0",
        2,
    );
    c.converger.converge_once().await.unwrap();
    assert_eq!(c.agent.store.positions().unwrap().converged, Some(v2));
    assert_eq!(volumes(&c).len(), 2);
    assert_eq!(c.cloud.calls().get("delete_volume"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_lists_the_cloud_changes_of_a_pending_release() {
    let (_dir, c) = cloud_with("approval: {mode: manual}\n").await;
    release(&c, DATABASE, "1.0.0", 1);
    c.agent
        .approve("1.0.0", None, "test", crate::config::now())
        .unwrap();
    c.converger.converge_once().await.unwrap();
    let grown = DATABASE.replace(
        "replicas: 2",
        "replicas: 3\n      publicEndpoints: [{name: sql, port: 5432, protocol: tcp}]",
    );
    release(&c, &grown, "2.0.0", 2);
    let plan = c.agent.plan().unwrap();
    assert_eq!(
        plan["cloud"],
        serde_json::json!([
            "make volume of db-2 (2 GiB, EBS gp3)",
            "make load balancer of db.sql (network, port 5432)"
        ])
    );
    let text = plan["text"].as_str().unwrap();
    assert!(
        text.contains("cloud: make volume of db-2 (2 GiB, EBS gp3)\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_endpoints_load_balancer_follows_the_machines_of_its_replicas() {
    let (_dir, c) = cloud().await;
    let public = STACK.replace(
        "      ports: [8080]\n",
        "      ports: [8080]\n      publicEndpoints: [{name: api, port: 8080, protocol: http}]\n      healthCheck: {path: /ready, port: 8080}\n",
    );
    release(&c, &public, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let targets = |c: &Test| c.cloud.all_balancers()["api.api"].1.targets.clone();
    let machines: BTreeSet<String> = c.engines().keys().cloned().collect();
    assert_eq!(targets(&c), machines);
    let (spec, balancer) = &c.cloud.all_balancers()["api.api"];
    assert!(spec.http && !spec.internal);
    assert_eq!((spec.port, spec.health_path.as_str()), (8080, "/ready"));
    assert_eq!(spec.subnets, ["a", "b"]);
    let status = c.agent.runtime_view.current();
    assert_eq!(
        status.endpoints,
        [format!("api.api: http://{}", balancer.dns)]
    );
    let shown = &status.load_balancers["api.api"];
    assert_eq!(shown.dns, balancer.dns);
    assert_eq!(shown.targets, Vec::from_iter(machines.iter().cloned()));
    // A machine gone: its replacement takes its place among the targets.
    let victim = machines.iter().next().unwrap().clone();
    c.cloud.kill(&victim);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        c.converger.converge_once().await.unwrap();
        let now = targets(&c);
        if now.len() == 3 && !now.contains(&victim) {
            break;
        }
        assert!(Instant::now() < until, "{now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Converged: the balancer is only read, and gone endpoints looked for once per release.
    let before = c.cloud.calls();
    c.converger.converge_once().await.unwrap();
    let after = c.cloud.calls();
    for call in ["set_targets", "balancers"] {
        assert_eq!(before.get(call), after.get(call), "{call}");
    }
    // A release without the endpoint: its balancer goes once the release converged.
    release(&c, STACK, "2.0.0", 2);
    c.converger.converge_once().await.unwrap();
    assert!(c.cloud.all_balancers().is_empty());
    let history = c.agent.store.history(30).unwrap();
    assert!(
        history.iter().any(|e| e.kind == "load-balancer-deleted"
            && e.message == "delete the load balancer of api.api (its endpoint is gone)"),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_refusal_names_the_pool_and_throttling_is_retried() {
    let (_dir, c) = cloud().await;
    release(&c, STACK, "1.0.0", 1);
    c.cloud
        .fail_next(provider::CloudError::transient("Throttling: Rate exceeded"));
    let error = c.converger.converge_once().await.unwrap_err().to_string();
    assert!(
        error.contains("pool default: Throttling: Rate exceeded"),
        "{error}"
    );
    assert!(error.contains("retrying"), "{error}");
    assert!(c.agent.store.positions().unwrap().last_good.is_none());
    c.converger.converge_once().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_known_machines_with_the_secret_join() {
    let (_dir, c) = cloud().await;
    release(&c, STACK, "1.0.0", 1);
    c.converger.converge_once().await.unwrap();
    let known = c.engines().keys().next().unwrap().clone();
    let join = |instance: &str, secret: &str| {
        let body = serde_json::to_vec(&JoinRequest {
            instance_id: instance.into(),
            bootstrap_secret: secret.into(),
            settings: "x".into(),
            links_port: None,
        })
        .unwrap();
        post(&c.url, "/v1/join", body)
    };
    let (status, body) = join(&known, "wrong").await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"wrong bootstrap secret"}"#)
    );
    // Carried images go only to joined machines, and only by digest.
    let hex = "ab".repeat(32);
    let image = format!("/v1/images/{hex}.tar");
    let get = |path: String, token: Option<String>| {
        let url = c.url.clone();
        async move { request(&url, hyper::Method::GET, &path, token.as_deref(), vec![]).await }
    };
    assert_eq!(get(image.clone(), None).await.0, 401);
    let (status, answer) = join(&known, SECRET).await;
    assert_eq!(status, 200, "{answer}");
    let token = serde_json::from_str::<super::nodes::JoinAnswer>(&answer)
        .unwrap()
        .token;
    assert_eq!(get(image.clone(), Some(token.clone())).await.0, 404);
    std::fs::create_dir_all(c.nodes.archives.dir.clone()).unwrap();
    std::fs::write(c.nodes.archives.dir.join(format!("{hex}.tar")), "archive").unwrap();
    assert_eq!(
        get(image, Some(token.clone())).await,
        (200, "archive".to_string())
    );
    for escape in ["../secret.tar", "%2e%2e%2fsecret.tar", "AB.tar"] {
        let (status, _) = get(format!("/v1/images/{escape}"), Some(token.clone())).await;
        assert_eq!(status, 404, "{escape}");
    }
    let (status, body) = join("i-foreign", SECRET).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("instance i-foreign is not a machine of this agent's pools"),
        "{body}"
    );
    let (status, _) = post(&c.url, "/v1/report", b"{}".to_vec()).await;
    assert_eq!(status, 401);
}

async fn post(url: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    request(url, hyper::Method::POST, path, None, body).await
}

async fn request(
    url: &str,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, String) {
    let authority = url.strip_prefix("http://").unwrap().to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", authority);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}
