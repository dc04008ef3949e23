//! VM pools on AWS, end to end with real parts where this machine has them: the real agent
//! binary with the AWS SDK against moto's server (EC2, Auto Scaling), and each instance moto
//! launches booted as a test host (its own network namespace and dockerd) that runs the
//! instance's user data: the node binary fetched from the agent and checked by SHA-256, real
//! containers from a real registry, health checks, reports over the node protocol.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::bundle;
use outpost_bundle_format::stack::StackFile;
use outpost_tests::agent::{AgentProcess, drop_file, http_get};
use outpost_tests::cloud::{Booter, Hosts, Moto};
use outpost_tests::engine::demo_image;
use outpost_tests::forge::{metadata, signed, tar};
use outpost_tests::{TestRegistry, free_port, poll_within};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// Serves who it is; /healthz exists unless HEALTHY=no.
const WEB: &str = r#"trap 'exit 0' TERM; mkdir -p /www; echo "$MESSAGE" > /www/index.html; [ "$HEALTHY" = no ] || echo ok > /www/healthz; httpd -f -p 8080 -h /www & wait"#;

/// Two web replicas of 1.5 cores: one per t3.small machine (2 vCPUs, 0.25 reserved).
fn stack(image: &str, message: &str, healthy: bool) -> StackFile {
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": {
            "name": "web", "code": {"image": image}, "cpu": 1.5, "memory": "64Mi",
            "ports": [8080], "replicas": 2,
            "publicEndpoints": [{"name": "web", "port": 8080, "protocol": "http"}],
            "healthCheck": {"path": "/healthz", "port": 8080, "timeoutSeconds": 1, "failureThreshold": 2},
            "environment": {"MESSAGE": message, "HEALTHY": if healthy { "yes" } else { "no" }},
            "permissions": "execution", "command": ["sh", "-c", WEB]}}],
    }))
    .unwrap()
}

fn publish(drop: &Path, stack: &StackFile, version: &str, sequence: u64) {
    let layout = bundle::build(stack, &metadata(version, sequence), &[]).unwrap();
    drop_file(
        drop,
        &format!("acme-{version}.tar"),
        &tar(&signed(layout, &BOTH)),
    );
}

/// What a machine's public endpoint serves, if anything.
fn get(address: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((address, 8080)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.trim().to_string())
}

/// `outpost_cloud_calls_total` by call.
fn cloud_calls(agent: &AgentProcess) -> BTreeMap<String, u64> {
    let text = http_get(&agent.socket(), "/metrics");
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("outpost_cloud_calls_total{call=\"") else {
            continue;
        };
        let (call, rest) = rest.split_once('"').unwrap();
        let count: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
        *calls.entry(call.to_string()).or_default() += count as u64;
    }
    calls
}

/// Fields drop in order: the agent stops before the machines and the cloud go.
struct Setup {
    agent: AgentProcess,
    booter: Booter,
    moto: Arc<Moto>,
    _registry: TestRegistry,
    drop: tempfile::TempDir,
    image: String,
}

/// The cloud, the machines' bridge and registry, and an agent running as an IAM user whose
/// policy is what `outpost-agent cloud-policy` prints, less the actions in `without`.
fn setup(without: &[&str]) -> Setup {
    let moto = Arc::new(Moto::start());
    let (subnets, ami) = moto.network();
    let hosts = Hosts::new();
    let gateway = hosts.gateway();
    // Machines pull over the bridge, as from a registry in the customer's network.
    let registry = TestRegistry::start_on(&gateway);
    let image = demo_image(&registry, "one");
    let port = free_port();
    let drop = tempfile::tempdir().unwrap();
    let config = format!(
        "runtime: vm\nrollout: {{progress_deadline_seconds: 90, grace_seconds: 1, drift_interval_seconds: 2}}\nvm:\n  provider: aws\n  aws: {{region: us-east-1, endpoint_url: '{}'}}\n  nodes: {{listen: '{gateway}:{port}', advertise: 'http://{gateway}:{port}', bootstrap_secret_file: secret, report_timeout_seconds: 30}}\n  pools:\n    default: {{instance_type: t3.small, image: {ami}, subnets: [{}], max_machines: 3}}\n",
        moto.url(),
        subnets.join(", ")
    );
    let mut agent = AgentProcess::start_with_env(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &config,
        &[("AWS_EC2_METADATA_DISABLED", "true")],
    );
    let mut policy: Value =
        serde_json::from_str(&agent.cli(&["cloud-policy"]).ok().stdout).unwrap();
    for statement in policy["Statement"].as_array_mut().unwrap() {
        if let Some(actions) = statement["Action"].as_array_mut() {
            actions.retain(|a| !without.contains(&a.as_str().unwrap_or_default()));
        }
    }
    let (key, secret) = moto.user("outpost-agent", &policy);
    agent.env.push(("AWS_ACCESS_KEY_ID".into(), key));
    agent.env.push(("AWS_SECRET_ACCESS_KEY".into(), secret));
    agent.restart();
    let booter = Booter::start(moto.clone(), hosts);
    Setup {
        agent,
        booter,
        moto,
        _registry: registry,
        drop,
        image,
    }
}

impl Setup {
    /// Every machine's endpoint, by machine.
    fn answers(&self) -> Vec<(String, Option<String>)> {
        let hosts = self.booter.hosts.lock().unwrap();
        hosts
            .machines()
            .into_iter()
            .map(|id| {
                let (address, _) = hosts.machine(&id).unwrap();
                (id, get(&address, "/"))
            })
            .collect()
    }

    /// Waits until `machines` machines each serve `message`.
    #[track_caller]
    fn wait_serving(&self, machines: usize, message: &str) {
        let done = poll_within(180, || {
            let answers = self.answers();
            (answers.len() == machines
                && answers.iter().all(|(_, a)| a.as_deref() == Some(message)))
            .then_some(())
        });
        if done.is_none() {
            let hosts = self.booter.hosts.lock().unwrap();
            let logs: Vec<String> = hosts
                .machines()
                .iter()
                .map(|id| format!("{id}: {}", hosts.node_log(id)))
                .collect();
            panic!(
                "{machines} machines serving {message:?}: {:?}\nstatus: {:#}\nagent: {}\nnodes: {}",
                self.answers(),
                self.agent.status(),
                self.agent.log(),
                logs.join("\n")
            );
        }
    }

    fn groups_and_templates(&self) -> Value {
        self.moto.boto(
            "print(json.dumps([len(asg.describe_auto_scaling_groups()['AutoScalingGroups']), len(ec2.describe_launch_templates()['LaunchTemplates'])]))",
        )
    }
}

/// Under IAM enforcement, as the user `cloud-policy` describes.
#[test]
fn a_release_runs_on_machines_the_agent_launches_updates_rolls_back_and_is_adopted() {
    let s = setup(&[]);
    publish(s.drop.path(), &stack(&s.image, "v1", true), "1.0.0", 1);
    s.wait_serving(2, "v1");
    s.agent.wait_converged_within(60, 1);
    let status = s.agent.status();
    let pool = &status["runtime"]["pools"]["default"];
    assert_eq!(pool["desired"], 2, "{status:#}");
    assert_eq!(s.agent.metric("outpost_vm_machines_desired"), 2);
    assert_eq!(s.agent.metric("outpost_replicas_ready"), 2);
    assert_eq!(s.groups_and_templates(), json!([1, 1]));
    // Converged, drift passes (every 2 s) only describe: one group call per pass, no write.
    let before = cloud_calls(&s.agent);
    std::thread::sleep(std::time::Duration::from_secs(7));
    let after = cloud_calls(&s.agent);
    let writes = |calls: &BTreeMap<String, u64>| -> u64 {
        calls
            .iter()
            .filter(|(call, _)| !call.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(writes(&before), writes(&after), "{before:?} {after:?}");
    let passes = after["DescribeAutoScalingGroups"] - before["DescribeAutoScalingGroups"];
    assert!((2..=5).contains(&passes), "{before:?} {after:?}");
    assert_eq!(
        after.get("DescribeLaunchTemplates"),
        before.get("DescribeLaunchTemplates")
    );
    // Each machine runs its replica on its own engine.
    {
        let hosts = s.booter.hosts.lock().unwrap();
        let mut containers: Vec<String> = hosts
            .machines()
            .iter()
            .flat_map(|id| hosts.machine(id).unwrap().1)
            .collect();
        containers.sort();
        assert_eq!(containers, ["acme-web-0", "acme-web-1"]);
    }

    // An update rolls through the machines.
    publish(s.drop.path(), &stack(&s.image, "v2", true), "2.0.0", 2);
    s.wait_serving(2, "v2");
    s.agent.wait_converged_within(60, 2);

    // A release that never gets healthy is rolled back after its first machine.
    publish(s.drop.path(), &stack(&s.image, "v3", false), "3.0.0", 3);
    s.agent.wait_within(150, "3.0.0 rolled back", |st| {
        st["runtime"]["last_rollback"]
            .as_str()
            .is_some_and(|m| m.contains("3.0.0 failed"))
    });
    s.wait_serving(2, "v2");

    // kill -9 and a restart: the agent adopts its group and template by their tags.
    let mut agent = s.agent;
    agent.kill();
    agent.restart();
    agent.wait_within(90, "converged after the restart", |st| {
        st["runtime"]["phase"] == "converged"
    });
    let s = Setup { agent, ..s };
    assert_eq!(s.groups_and_templates(), json!([1, 1]));
    s.wait_serving(2, "v2");

    // kill -9 at random points of a rollout: every restart adopts, nothing is made twice.
    publish(s.drop.path(), &stack(&s.image, "v4", true), "4.0.0", 4);
    let mut agent = s.agent;
    for round in 0..3u64 {
        std::thread::sleep(std::time::Duration::from_millis(
            300 + (std::process::id() as u64 * 7919 + round * 104_729) % 2500,
        ));
        agent.kill();
        agent.restart();
    }
    let s = Setup { agent, ..s };
    s.wait_serving(2, "v4");
    s.agent.wait_converged_within(90, 4);
    assert_eq!(s.groups_and_templates(), json!([1, 1]));
}

/// The policy without one action it names is not enough, and the refusal names that action.
#[test]
fn the_policy_less_one_action_fails_naming_it() {
    let s = setup(&["autoscaling:SetDesiredCapacity"]);
    publish(s.drop.path(), &stack(&s.image, "v1", true), "1.0.0", 1);
    let status = s.agent.wait_within(60, "the refusal", |st| {
        st["runtime"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("SetDesiredCapacity"))
    });
    let error = status["runtime"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("pool default: SetDesiredCapacity: AccessDenied")
            && error.contains("autoscaling:SetDesiredCapacity"),
        "{error}"
    );
}
