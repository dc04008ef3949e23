//! Managed VM pools under test. moto's server stands in for AWS on 127.0.0.1 (EC2, Auto
//! Scaling, IAM); moto runs no machines, so every instance it reports in service is booted here
//! as a test host: a network namespace with its own address on a bridge the test makes, and a
//! dockerd of its own, that runs the instance's user data as EC2 would (which fetches the node
//! binary from the agent, checks its SHA-256 and starts `outpost-agent node`). An EBS volume
//! moto reports attached is a loop device over a file of its own, linked into the machine's
//! `by-id` directory under the name an NVMe EBS device has, so its data moves with it.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::agent::{AgentProcess, drop_file, http_get};
use crate::engine::{Kind, TestEngine, demo_image, http_body_from};
use crate::forge::{metadata, signed, tar};
use crate::throttle::Throttle;
use crate::{TestRegistry, free_port, poll_within, python, run, venv};
use outpost_bundle_format::bundle;
use outpost_bundle_format::stack::StackFile;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// moto's server on 127.0.0.1 with IAM enforced (after the three calls that make the test's
/// own administrator), stopped on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    /// The administrator's access key and secret: the test's own calls.
    admin: (String, String),
}

impl Moto {
    pub fn start() -> Moto {
        let server = venv().join("bin/moto_server");
        assert!(
            server.exists(),
            "{} missing: run .ci/scripts/setup.sh",
            server.display()
        );
        let port = free_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut moto = Moto {
            child,
            port,
            admin: ("testing".into(), "testing".into()),
        };
        crate::eventually("moto_server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let admin = moto.user(
            "admin",
            &serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }),
        );
        moto.admin = admin;
        moto
    }

    /// Makes an IAM user with `policy` inline; its access key and secret.
    pub fn user(&self, name: &str, policy: &Value) -> (String, String) {
        let made = self.boto(&format!(
            "iam.create_user(UserName='{name}')\n\
             iam.put_user_policy(UserName='{name}', PolicyName='outpost', PolicyDocument={policy:?})\n\
             k = iam.create_access_key(UserName='{name}')['AccessKey']\n\
             print(json.dumps([k['AccessKeyId'], k['SecretAccessKey']]))",
            policy = policy.to_string()
        ));
        (
            made[0].as_str().unwrap().to_string(),
            made[1].as_str().unwrap().to_string(),
        )
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs `script` (Python with boto3 clients `ec2`, `asg`, `iam` bound to moto, and `json`,
    /// `base64`) and returns what it prints, parsed as JSON.
    pub fn boto(&self, script: &str) -> Value {
        let prelude = format!(
            "import boto3, json, base64\nkw = dict(endpoint_url='{}', region_name='us-east-1', aws_access_key_id='{}', aws_secret_access_key='{}')\nec2 = boto3.client('ec2', **kw)\nasg = boto3.client('autoscaling', **kw)\niam = boto3.client('iam', **kw)\nelb = boto3.client('elbv2', **kw)\n",
            self.url(),
            self.admin.0,
            self.admin.1
        );
        let result = run(python().arg("-c").arg(format!("{prelude}{script}")));
        assert_eq!(result.code, 0, "boto3: {}", result.stderr);
        serde_json::from_str(result.stdout.trim()).unwrap_or(Value::Null)
    }

    /// A VPC with a subnet in each of two zones, and an AMI moto knows: `(subnets, ami)`.
    pub fn network(&self) -> (Vec<String>, String) {
        let made = self.boto(
            "vpc = ec2.create_vpc(CidrBlock='10.0.0.0/16')['Vpc']['VpcId']\n\
             subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f'10.0.{i}.0/24', AvailabilityZone=z)['Subnet']['SubnetId'] for i, z in [(1, 'us-east-1a'), (2, 'us-east-1b')]]\n\
             ami = ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']\n\
             print(json.dumps({'subnets': subnets, 'ami': ami}))",
        );
        let subnets = made["subnets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        (subnets, made["ami"].as_str().unwrap().to_string())
    }

    /// The load balancers: `(DNS name, type, the instances their target groups send to)`.
    pub fn balancers(&self) -> Vec<(String, String, Vec<String>)> {
        let listed = self.boto(
            "out = []\n\
             for lb in elb.describe_load_balancers()['LoadBalancers']:\n\
             \x20   tgs = elb.describe_target_groups(LoadBalancerArn=lb['LoadBalancerArn'])['TargetGroups']\n\
             \x20   ids = sorted(d['Target']['Id'] for tg in tgs for d in elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions'])\n\
             \x20   out.append([lb['DNSName'], lb['Type'], ids])\n\
             print(json.dumps(out))",
        );
        serde_json::from_value(listed).unwrap()
    }

    /// The agent's volumes: `(id, size in GiB, instance attached to)`.
    pub fn volumes(&self) -> Vec<(String, u64, Option<String>)> {
        let listed = self.boto(&format!("{VOLUMES}print(json.dumps(volumes))"));
        serde_json::from_value(listed).unwrap()
    }

    /// The instances in service in any Auto Scaling group with their user data, and the
    /// volumes: what the test hosts follow, in one call.
    pub fn machines(&self) -> Machines {
        let listed = self.boto(&format!(
            "{VOLUMES}out = []\n\
             for g in asg.describe_auto_scaling_groups()['AutoScalingGroups']:\n\
             \x20   for i in g['Instances']:\n\
             \x20       if i['LifecycleState'] == 'InService':\n\
             \x20           ud = ec2.describe_instance_attribute(InstanceId=i['InstanceId'], Attribute='userData')['UserData'].get('Value', '')\n\
             \x20           out.append([i['InstanceId'], base64.b64decode(ud).decode()])\n\
             print(json.dumps([out, volumes]))",
        ));
        serde_json::from_value(listed).unwrap()
    }
}

/// Instances `(id, user data)` and volumes `(id, size in GiB, instance attached to)`.
pub type Machines = (Vec<(String, String)>, Vec<(String, u64, Option<String>)>);

/// Python binding `volumes` to the agent's volumes as `[id, size, instance]`.
const VOLUMES: &str = "vs = ec2.describe_volumes(Filters=[{'Name': 'tag-key', 'Values': ['outpost:ordinal']}])['Volumes']\n\
     volumes = [[v['VolumeId'], v['Size'], (v['Attachments'] or [{}])[0].get('InstanceId')] for v in vs]\n";

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One booted instance.
struct Host {
    namespace: String,
    link: String,
    address: String,
    engine: TestEngine,
    node: Child,
    dir: tempfile::TempDir,
}

impl Host {
    /// The machine's `/dev/disk/by-id`.
    fn by_id(&self) -> std::path::PathBuf {
        self.dir.path().join("by-id")
    }
}

/// The test hosts of instances, on a bridge `opvmN` (10.201.N.1/24) this test made.
pub struct Hosts {
    net: u32,
    next: u32,
    hosts: BTreeMap<String, Host>,
    /// Each volume's disk: a file and the loop device over it.
    disks: tempfile::TempDir,
    loops: BTreeMap<String, String>,
}

impl Hosts {
    pub fn new() -> Hosts {
        let links = run(Command::new("ip").args(["-o", "link"])).stdout;
        let net = (0..200)
            .map(|i| (std::process::id() + i) % 200 + 1)
            .find(|n| !links.contains(&format!("opvm{n}:")))
            .unwrap();
        let bridge = format!("opvm{net}");
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("10.201.{net}.1/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let done = run(Command::new("ip").args(&args));
            assert_eq!(done.code, 0, "ip {args:?}: {}", done.stderr);
        }
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
        Hosts {
            net,
            next: 10,
            hosts: BTreeMap::new(),
            disks: tempfile::tempdir().unwrap(),
            loops: BTreeMap::new(),
        }
    }

    /// The agent's address on the bridge: where it listens for nodes.
    pub fn gateway(&self) -> String {
        format!("10.201.{}.1", self.net)
    }

    /// Boots instances that are new, and tears down those that are gone.
    pub fn sync(&mut self, moto: &Moto) {
        let (instances, volumes) = moto.machines();
        let gone: Vec<String> = self
            .hosts
            .keys()
            .filter(|id| !instances.iter().any(|(i, _)| i == *id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(host) = self.hosts.remove(&id) {
                self.tear_down(host);
            }
        }
        for (id, user_data) in instances {
            if !self.hosts.contains_key(&id) {
                let host = self.boot(&id, &user_data);
                self.hosts.insert(id, host);
            }
        }
        self.attach_disks(&volumes);
    }

    /// Links each attached volume's loop device into its machine's `by-id` directory, and
    /// unlinks volumes attached elsewhere or nowhere.
    fn attach_disks(&mut self, volumes: &[(String, u64, Option<String>)]) {
        for (volume, size_gib, attached) in volumes {
            let link = format!(
                "nvme-Amazon_Elastic_Block_Store_{}",
                volume.replace('-', "")
            );
            if attached
                .as_ref()
                .is_some_and(|i| self.hosts.contains_key(i))
                && !self.loops.contains_key(volume)
            {
                let file = self.disks.path().join(volume);
                std::fs::File::create(&file)
                    .unwrap()
                    .set_len(size_gib << 30)
                    .unwrap();
                let made = run(Command::new("losetup")
                    .args(["--find", "--show"])
                    .arg(&file));
                assert_eq!(made.code, 0, "losetup: {}", made.stderr);
                self.loops
                    .insert(volume.clone(), made.stdout.trim().to_string());
            }
            for (id, host) in &self.hosts {
                let path = host.by_id().join(&link);
                let here = attached.as_deref() == Some(id.as_str());
                match (here, self.loops.get(volume)) {
                    (true, Some(device)) if !path.exists() => {
                        std::fs::create_dir_all(host.by_id()).unwrap();
                        std::os::unix::fs::symlink(device, &path).unwrap();
                    }
                    (false, _) if path.exists() => std::fs::remove_file(&path).unwrap(),
                    _ => {}
                }
            }
        }
    }

    fn boot(&mut self, id: &str, user_data: &str) -> Host {
        self.next += 1;
        let k = self.next;
        let namespace = format!("opvm{}-{k}", self.net);
        let link = format!("opv{}-{k}", self.net);
        let address = format!("10.201.{}.{k}", self.net);
        let bridge = format!("opvm{}", self.net);
        let gateway = self.gateway();
        let steps: Vec<Vec<String>> = vec![
            vec!["ip", "netns", "add", &namespace],
            vec![
                "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns",
                &namespace,
            ],
            vec!["ip", "link", "set", &link, "master", &bridge, "up"],
            vec![
                "ip",
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ],
            vec!["ip", "-n", &namespace, "link", "set", "eth0", "up"],
            vec!["ip", "-n", &namespace, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", &namespace, "route", "add", "default", "via", &gateway,
            ],
        ]
        .into_iter()
        .map(|step| step.into_iter().map(String::from).collect())
        .collect();
        for step in steps {
            let done = run(Command::new(&step[0]).args(&step[1..]));
            assert_eq!(done.code, 0, "{step:?}: {}", done.stderr);
        }
        // The machine's own engine, in its namespace: it publishes on the machine's loopback
        // and pulls over the bridge.
        let engine = TestEngine::start_in(Kind::Docker, Some(&namespace));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("user-data.sh");
        std::fs::write(&script, user_data).unwrap();
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let node = Command::new("ip")
            .args(["netns", "exec", &namespace, "sh"])
            .arg(&script)
            .env("OUTPOST_NODE_DIR", dir.path().join("node"))
            .env("OUTPOST_INSTANCE_ID", id)
            .env("OUTPOST_DOCKER_SOCKET", &engine.socket)
            .env("OUTPOST_DISK_BY_ID", dir.path().join("by-id"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Host {
            namespace,
            link,
            address,
            engine,
            node,
            dir,
        }
    }

    fn tear_down(&self, mut host: Host) {
        let _ = host.node.kill();
        let _ = host.node.wait();
        // The engine stops with its containers when it drops.
        drop(host.engine);
        let _ = Command::new("ip")
            .args(["link", "del", &host.link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &host.namespace])
            .output();
        drop(host.dir);
    }

    pub fn machines(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    /// The address a machine answers on, and the containers its engine runs.
    pub fn machine(&self, id: &str) -> Option<(String, Vec<String>)> {
        self.hosts
            .get(id)
            .map(|h| (h.address.clone(), h.engine.containers()))
    }

    /// What `script` prints in machine `id`'s network namespace (stdout and stderr).
    pub fn exec(&self, id: &str, script: &str) -> String {
        let Some(host) = self.hosts.get(id) else {
            return format!("no machine {id}");
        };
        let done = run(Command::new("ip")
            .args(["netns", "exec", &host.namespace, "sh", "-c", script])
            .env("DOCKER_SOCKET", &host.engine.socket));
        format!("{}{}", done.stdout, done.stderr)
    }

    /// What the node agent of a machine logged.
    pub fn node_log(&self, id: &str) -> String {
        self.hosts
            .get(id)
            .and_then(|h| std::fs::read_to_string(h.dir.path().join("node.log")).ok())
            .unwrap_or_default()
    }
}

impl Default for Hosts {
    fn default() -> Self {
        Hosts::new()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, host) in std::mem::take(&mut self.hosts) {
            self.tear_down(host);
        }
        for device in self.loops.values() {
            let _ = Command::new("losetup").args(["-d", device]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("opvm{}", self.net)])
            .output();
    }
}

/// Keeps `hosts` in step with what moto runs, every second, until dropped.
pub struct Booter {
    pub hosts: Arc<Mutex<Hosts>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Booter {
    pub fn start(moto: Arc<Moto>, hosts: Hosts) -> Booter {
        let hosts = Arc::new(Mutex::new(hosts));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (hosts, stop) = (hosts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut hosts) = hosts.lock() {
                        hosts.sync(&moto);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        Booter {
            hosts,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Booter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// Serves who it is; /healthz exists unless HEALTHY=no.
const WEB: &str = r#"trap 'exit 0' TERM; mkdir -p /www; echo "$MESSAGE" > /www/index.html; [ "$HEALTHY" = no ] || echo ok > /www/healthz; httpd -f -p 8080 -h /www & wait"#;

/// `replicas` web replicas of `cpu` cores each (a t3.small machine offers 1.75).
pub fn web_stack(image: &str, message: &str, healthy: bool, replicas: u32, cpu: f64) -> StackFile {
    serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": {
            "name": "web", "code": {"image": image}, "cpu": cpu, "memory": "64Mi",
            "ports": [8080], "replicas": replicas,
            "publicEndpoints": [{"name": "web", "port": 8080, "protocol": "http"}],
            "healthCheck": {"path": "/healthz", "port": 8080, "timeoutSeconds": 1, "failureThreshold": 2},
            "environment": {"MESSAGE": message, "HEALTHY": if healthy { "yes" } else { "no" }},
            "permissions": "execution", "command": ["sh", "-c", WEB]}}],
    }))
    .unwrap()
}

/// Publishes `web_stack` on an image only a registry on the host's loopback has, in a bundle
/// that carries it (`outpost-signer build --with-images`): the machines cannot reach that
/// registry, which is gone before the agent sees the bundle anyway.
pub fn publish_carried(drop: &Path, message: &str, version: &str, sequence: u64) {
    let work = tempfile::tempdir().unwrap();
    let bundle_file = work.path().join("bundle.tar");
    {
        let registry = TestRegistry::start(None);
        let image = demo_image(&registry, "carried");
        let stack_file = work.path().join("stack.json");
        let stack = web_stack(&image, message, true, 2, 1.5);
        std::fs::write(&stack_file, serde_json::to_vec(&stack).unwrap()).unwrap();
        crate::build_bundle(
            &stack_file,
            version,
            sequence,
            &["--with-images"],
            &bundle_file,
        );
        crate::sign_with(&bundle_file, &BOTH);
    }
    drop_file(
        drop,
        &format!("acme-{version}.tar"),
        &std::fs::read(&bundle_file).unwrap(),
    );
}

pub fn publish(drop: &Path, stack: &StackFile, version: &str, sequence: u64) {
    let layout = bundle::build(stack, &metadata(version, sequence), &[]).unwrap();
    drop_file(
        drop,
        &format!("acme-{version}.tar"),
        &tar(&signed(layout, &BOTH)),
    );
}

/// `outpost_cloud_calls_total` by call.
pub fn cloud_calls(agent: &AgentProcess) -> BTreeMap<String, u64> {
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

/// A customer site on moto: the cloud, its machines, a registry on their bridge and an agent
/// in `runtime: vm`. Fields drop in order: the agent stops before the machines and the cloud.
pub struct Site {
    pub agent: AgentProcess,
    /// The proxy the agent's cloud calls go through, when the site throttles.
    pub throttle: Option<Throttle>,
    pub booter: Booter,
    pub moto: Arc<Moto>,
    pub registry: TestRegistry,
    pub drop: tempfile::TempDir,
    pub image: String,
}

impl Site {
    /// The cloud, the machines' bridge and registry, and an agent running as an IAM user whose
    /// policy is what `outpost-agent cloud-policy` prints, less the actions in `without`; its
    /// default pool is t3.small machines, at most `max_machines`.
    pub fn start(without: &[&str], max_machines: u32) -> Site {
        Site::start_throttled(without, max_machines, None)
    }

    /// As `start`, with the agent's cloud calls through a proxy that throttles the first
    /// `times` calls of `action` (`throttle: Some((action, times))`).
    pub fn start_throttled(
        without: &[&str],
        max_machines: u32,
        throttle: Option<(&str, u32)>,
    ) -> Site {
        let moto = Arc::new(Moto::start());
        let throttle = throttle.map(|(action, times)| Throttle::start(moto.port, action, times));
        let endpoint = throttle.as_ref().map_or_else(|| moto.url(), Throttle::url);
        let (subnets, ami) = moto.network();
        let hosts = Hosts::new();
        let gateway = hosts.gateway();
        // Machines pull over the bridge, as from a registry in the customer's network.
        let registry = TestRegistry::start_on(&gateway);
        let image = demo_image(&registry, "one");
        let port = free_port();
        let drop = tempfile::tempdir().unwrap();
        let config = format!(
            "runtime: vm\nrollout: {{progress_deadline_seconds: 90, grace_seconds: 1, drift_interval_seconds: 2}}\nvm:\n  provider: aws\n  aws: {{region: us-east-1, endpoint_url: '{endpoint}'}}\n  nodes: {{listen: '{gateway}:{port}', advertise: 'http://{gateway}:{port}', bootstrap_secret_file: secret, report_timeout_seconds: 30}}\n  pools:\n    default: {{instance_type: t3.small, image: {ami}, subnets: [{}], max_machines: {max_machines}}}\n",
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
        Site {
            agent,
            throttle,
            booter,
            moto,
            registry,
            drop,
            image,
        }
    }

    /// Every machine's endpoint, by machine.
    pub fn answers(&self) -> Vec<(String, Option<String>)> {
        let hosts = self.booter.hosts.lock().unwrap();
        hosts
            .machines()
            .into_iter()
            .map(|id| {
                let (address, _) = hosts.machine(&id).unwrap();
                let answer = http_body_from(&address, 8080, "/");
                (id, answer.map(|body| body.trim().to_string()))
            })
            .collect()
    }

    /// Waits until `machines` machines each serve `message`.
    #[track_caller]
    pub fn wait_serving(&self, machines: usize, message: &str) {
        let done = poll_within(180, || {
            let answers = self.answers();
            (answers.len() == machines
                && answers.iter().all(|(_, a)| a.as_deref() == Some(message)))
            .then_some(())
        });
        if done.is_none() {
            panic!(
                "{machines} machines serving {message:?}: {:?}\nstatus: {:#}\nagent: {}\nnodes: {}",
                self.answers(),
                self.agent.status(),
                self.agent.log(),
                self.node_logs()
            );
        }
    }

    /// What `script` prints on each machine.
    pub fn exec_all(&self, script: &str) -> String {
        let hosts = self.booter.hosts.lock().unwrap();
        hosts
            .machines()
            .iter()
            .map(|id| format!("{id}: {}", hosts.exec(id, script)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Each machine's node log, for a failure's message.
    pub fn node_logs(&self) -> String {
        let hosts = self.booter.hosts.lock().unwrap();
        hosts
            .machines()
            .iter()
            .map(|id| format!("{id}: {}", hosts.node_log(id)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn groups_and_templates(&self) -> Value {
        self.moto.boto(
            "print(json.dumps([len(asg.describe_auto_scaling_groups()['AutoScalingGroups']), len(ec2.describe_launch_templates()['LaunchTemplates'])]))",
        )
    }
}
