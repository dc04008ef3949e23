//! VM pools on AWS, end to end with real parts where this machine has them: the real agent
//! binary with the AWS SDK against moto's server (EC2, Auto Scaling), and each instance moto
//! launches booted as a test host (its own network namespace and dockerd) that runs the
//! instance's user data: the node binary fetched from the agent and checked by SHA-256, real
//! containers from a real registry, health checks, reports over the node protocol.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::stack::StackFile;
use outpost_tests::cloud::{Site, cloud_calls, publish, publish_carried, web_stack};
use serde_json::json;
use std::collections::BTreeMap;

/// Two web replicas of 1.5 cores: one per t3.small machine (1.75 cores after its reserve).
fn stack(image: &str, message: &str, healthy: bool) -> StackFile {
    web_stack(image, message, healthy, 2, 1.5)
}

/// Under IAM enforcement, as the user `cloud-policy` describes.
#[test]
fn a_release_runs_on_machines_the_agent_launches_updates_rolls_back_and_is_adopted() {
    let s = Site::start(&[], 3);
    publish(s.drop.path(), &stack(&s.image, "v1", true), "1.0.0", 1);
    s.wait_serving(2, "v1");
    s.agent.wait_converged_within(60, 1);
    let status = s.agent.status();
    let pool = &status["runtime"]["pools"]["default"];
    assert_eq!(pool["desired"], 2, "{status:#}");
    assert_eq!(s.agent.metric("outpost_vm_machines_desired"), 2);
    assert_eq!(s.agent.metric("outpost_replicas_ready"), 2);
    assert_eq!(s.groups_and_templates(), json!([1, 1]));
    // The public endpoint's application load balancer sends to both machines.
    let balancers = s.moto.balancers();
    let mut machines = s.booter.hosts.lock().unwrap().machines();
    machines.sort();
    assert_eq!(balancers.len(), 1, "{balancers:?}");
    assert_eq!(
        (balancers[0].1.as_str(), &balancers[0].2),
        ("application", &machines)
    );
    assert_eq!(
        status["runtime"]["endpoints"],
        json!([format!("web.web: http://{}", balancers[0].0)])
    );
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
    let s = Site { agent, ..s };
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
    let s = Site { agent, ..s };
    s.wait_serving(2, "v4");
    s.agent.wait_converged_within(90, 4);
    assert_eq!(s.groups_and_templates(), json!([1, 1]));
}

/// The policy without one action it names is not enough, and the refusal names that action.
#[test]
fn the_policy_less_one_action_fails_naming_it() {
    let s = Site::start(&["autoscaling:SetDesiredCapacity"], 3);
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

/// Serves the first message it was ever started with: its volume remembers it.
const REMEMBERS: &str = r#"trap 'exit 0' TERM; mkdir -p /www; [ -f /data/first ] || echo "$MESSAGE" > /data/first; cp /data/first /www/index.html; [ "$HEALTHY" = no ] || echo ok > /www/healthz; httpd -f -p 8080 -h /www & wait"#;

fn stateful_stack(image: &str, message: &str, healthy: bool) -> StackFile {
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": {
            "name": "db", "code": {"image": image}, "cpu": 1.5, "memory": "64Mi",
            "ports": [8080], "replicas": 1, "persistentStorage": "1Gi",
            "publicEndpoints": [{"name": "db", "port": 8080, "protocol": "http"}],
            "healthCheck": {"path": "/healthz", "port": 8080, "timeoutSeconds": 1, "failureThreshold": 2},
            "environment": {"MESSAGE": message, "HEALTHY": if healthy { "yes" } else { "no" }},
            "permissions": "execution", "command": ["sh", "-c", REMEMBERS]}}],
    }))
    .unwrap()
}

/// A stateful replica's EBS volume (a loop device here, formatted by the node) keeps its data
/// across an update, a rollback and the replacement of its machine behind the agent's back.
#[test]
fn a_stateful_replica_keeps_its_volume_across_updates_rollbacks_and_machines() {
    let s = Site::start(&[], 2);
    publish(
        s.drop.path(),
        &stateful_stack(&s.image, "first", true),
        "1.0.0",
        1,
    );
    s.wait_serving(1, "first");
    s.agent.wait_converged_within(60, 1);
    let volumes = s.moto.volumes();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let (volume, size_gib, Some(first_machine)) = volumes[0].clone() else {
        panic!("{volumes:?}")
    };
    assert_eq!(size_gib, 1);
    let status = s.agent.status();
    assert_eq!(
        status["runtime"]["volumes"]["db-0"]["state"],
        format!("attached to {first_machine}"),
        "{status:#}"
    );

    // An update, then a failing release rolled back: the data stays.
    publish(
        s.drop.path(),
        &stateful_stack(&s.image, "second", true),
        "2.0.0",
        2,
    );
    s.agent.wait_converged_within(90, 2);
    s.wait_serving(1, "first");
    publish(
        s.drop.path(),
        &stateful_stack(&s.image, "third", false),
        "3.0.0",
        3,
    );
    s.agent.wait_within(150, "3.0.0 rolled back", |st| {
        st["runtime"]["last_rollback"]
            .as_str()
            .is_some_and(|m| m.contains("3.0.0 failed"))
    });
    s.wait_serving(1, "first");

    // Its machine terminated behind the agent's back: the volume follows db-0 to the
    // replacement, with its data.
    s.moto.boto(&format!(
        "asg.terminate_instance_in_auto_scaling_group(InstanceId='{first_machine}', ShouldDecrementDesiredCapacity=False)"
    ));
    let moved = outpost_tests::poll_within(180, || {
        let now = s.moto.volumes();
        let on = now.first().and_then(|v| v.2.clone())?;
        (on != first_machine
            && s.answers()
                .iter()
                .any(|(m, a)| *m == on && a.as_deref() == Some("first")))
        .then_some(now)
    });
    let Some(now) = moved else {
        panic!(
            "db-0 on a new machine with its data: {:?} {:?}\nstatus: {:#}",
            s.moto.volumes(),
            s.answers(),
            s.agent.status()
        );
    };
    assert_eq!(now.len(), 1, "no second volume: {now:?}");
    assert_eq!(now[0].0, volume);
    // The endpoint's load balancer follows db-0 to its new machine.
    let on = now[0].2.clone().unwrap();
    let followed = outpost_tests::poll_within(30, || {
        let balancers = s.moto.balancers();
        (balancers.len() == 1 && balancers[0].2 == [on.clone()]).then_some(())
    });
    assert!(followed.is_some(), "{:?}", s.moto.balancers());
}

/// Throttling answers (through a proxy in front of moto) are retried: `status` names them, no
/// rollback, and the release converges once the cloud answers again.
#[test]
fn throttling_is_retried_and_never_rolls_back() {
    let s = Site::start_throttled(&[], 3, Some(("SetDesiredCapacity", 8)));
    publish(s.drop.path(), &stack(&s.image, "v1", true), "1.0.0", 1);
    let status = s.agent.wait_within(90, "the throttling in status", |st| {
        st["runtime"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("SetDesiredCapacity: Throttling: Rate exceeded"))
    });
    let error = status["runtime"]["last_error"].as_str().unwrap();
    assert!(error.contains("pool default:"), "{error}");
    s.wait_serving(2, "v1");
    s.agent.wait_converged_within(60, 1);
    let status = s.agent.status();
    assert!(status["runtime"]["last_rollback"].is_null(), "{status:#}");
    assert_eq!(s.throttle.as_ref().unwrap().throttled(), 8);
}

/// Serves what its linked `back` serves, fetched again every second by `BACK_HOST`/`BACK_PORT`.
/// The name is looked up in `/etc/hosts` by hand and the page fetched with `nc`: the test
/// image's static busybox crashes in glibc's resolver (its `wget` even for an address).
const FRONT: &str = r#"trap 'exit 0' TERM; mkdir -p /www; echo ok > /www/healthz; (while true; do ip=$(awk -v h="$BACK_HOST" '$2 == h {print $1}' /etc/hosts); printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$ip" "$BACK_PORT" | sed '1,/^\r*$/d' > /tmp/page; [ -s /tmp/page ] && mv /tmp/page /www/index.html; sleep 1; done) & httpd -f -p 8080 -h /www & wait"#;
const BACK: &str = r#"trap 'exit 0' TERM; mkdir -p /www; echo "$MESSAGE" > /www/index.html; echo ok > /www/healthz; httpd -f -p 9090 -h /www & wait"#;

/// A public `front` linking a `back` that runs on the other machine (1.5 cores each).
fn linked_stack(image: &str, message: &str) -> StackFile {
    let container = |name: &str, port: u16, script: &str| {
        json!({
            "name": name, "code": {"image": image}, "cpu": 1.5, "memory": "64Mi",
            "ports": [port], "replicas": 1,
            "healthCheck": {"path": "/healthz", "port": port, "timeoutSeconds": 1, "failureThreshold": 2},
            "environment": {"MESSAGE": message},
            "permissions": "execution", "command": ["sh", "-c", script]})
    };
    let mut front = container("front", 8080, FRONT);
    front["links"] = json!(["back"]);
    front["publicEndpoints"] = json!([{"name": "front", "port": 8080, "protocol": "http"}]);
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [
            {"lifecycle": "live", "container": container("back", 9090, BACK)},
            {"lifecycle": "live", "container": front},
        ],
    }))
    .unwrap()
}

/// Service discovery across machines: `front` reaches `back` by name on another machine
/// (through its machine's link listener and the other machine's link server), and again after
/// an update moves nothing but the message.
#[test]
fn a_linked_resource_on_another_machine_is_reached_by_name() {
    let s = Site::start(&[], 2);
    publish(
        s.drop.path(),
        &linked_stack(&s.image, "from back"),
        "1.0.0",
        1,
    );
    s.agent.wait_converged_within(180, 1);
    let served = |message: &str| {
        outpost_tests::poll_within(60, || {
            let answers = s.answers();
            (answers.len() == 2 && answers.iter().any(|(_, a)| a.as_deref() == Some(message)))
                .then_some(answers)
        })
    };
    let Some(answers) = served("from back") else {
        panic!(
            "front serving back's page: {:?}\nnodes: {}\nlisteners: {}",
            s.answers(),
            s.node_logs(),
            s.exec_all("ss -ltnp")
        );
    };
    // The two replicas are on two machines: only front's answers on 8080.
    assert_eq!(
        answers.iter().filter(|(_, a)| a.is_some()).count(),
        1,
        "{answers:?}"
    );
    publish(
        s.drop.path(),
        &linked_stack(&s.image, "from back, v2"),
        "2.0.0",
        2,
    );
    s.agent.wait_converged_within(180, 2);
    assert!(
        served("from back, v2").is_some(),
        "{:?}\nnodes: {}",
        s.answers(),
        s.node_logs()
    );
    assert_eq!(s.moto.balancers().len(), 1);

    // A release without front's public endpoint: its load balancer goes once it converged.
    let mut file = serde_json::to_value(linked_stack(&s.image, "from back, v3")).unwrap();
    file["resources"][1]["container"]
        .as_object_mut()
        .unwrap()
        .remove("publicEndpoints");
    let inward: StackFile = serde_json::from_value(file).unwrap();
    publish(s.drop.path(), &inward, "3.0.0", 3);
    s.agent.wait_converged_within(180, 3);
    let gone = outpost_tests::poll_within(60, || s.moto.balancers().is_empty().then_some(()));
    assert!(gone.is_some(), "{:?}", s.moto.balancers());
}

/// An air-gapped VPC: the bundle carries its image, and no machine can reach the registry it
/// came from. Each machine fetches the image's archive from the agent (checked against its
/// SHA-256) and runs it.
#[test]
fn carried_images_reach_the_machines_from_the_agent() {
    let s = Site::start(&[], 2);
    publish_carried(s.drop.path(), "offline", "1.0.0", 1);
    s.wait_serving(2, "offline");
    s.agent.wait_converged_within(60, 1);
    let logs = s.node_logs();
    assert_eq!(
        logs.matches("fetched from the agent").count(),
        2,
        "one fetch per machine: {logs}"
    );
}

/// The customer changes the machine type: the agent, restarted with the new settings, replaces
/// the machines one at a time from a new launch template, each replacement serving before the
/// next machine goes, and the release keeps serving throughout.
#[test]
fn a_new_machine_type_replaces_the_machines_one_at_a_time() {
    let s = Site::start(&[], 3);
    publish(s.drop.path(), &stack(&s.image, "v1", true), "1.0.0", 1);
    s.wait_serving(2, "v1");
    s.agent.wait_converged_within(60, 1);
    let moto = s.moto.clone();
    let types = || -> BTreeMap<String, String> {
        serde_json::from_value(moto.boto(
            "out = {}\n\
             for r in ec2.describe_instances(Filters=[{'Name': 'instance-state-name', 'Values': ['running']}])['Reservations']:\n\
             \x20   for i in r['Instances']:\n\
             \x20       out[i['InstanceId']] = i['InstanceType']\n\
             print(json.dumps(out))",
        ))
        .unwrap()
    };
    let old = types();
    assert!(old.values().all(|t| t == "t3.small"), "{old:?}");
    let config = s.agent.path("agent.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("t3.small", "t3.medium")).unwrap();
    let mut agent = s.agent;
    agent.restart();
    let s = Site { agent, ..s };
    let replaced = outpost_tests::poll_within(300, || {
        let serving = s
            .answers()
            .iter()
            .filter(|(_, a)| a.as_deref() == Some("v1"))
            .count();
        assert!(serving >= 1, "the release went dark: {:?}", s.answers());
        let now = types();
        (serving == 2
            && now.len() == 2
            && now
                .iter()
                .all(|(id, t)| t == "t3.medium" && !old.contains_key(id)))
        .then_some(now)
    });
    assert!(
        replaced.is_some(),
        "{:?}\nstatus: {:#}",
        types(),
        s.agent.status()
    );
    // A template of its own for the new settings; still one group.
    assert_eq!(s.groups_and_templates(), json!([1, 2]));
    let status = s.agent.status();
    assert!(status["runtime"]["last_rollback"].is_null(), "{status:#}");
}
