//! Real container engines for the runtime tests: dockerd or Podman's API service started by
//! tests/scripts/engine.sh in a temporary directory (stopped, containers and networks removed,
//! on drop), demo images built from busybox-static and pushed to a test registry, and a few
//! raw Engine API calls (curl on the socket) to look behind the agent's back.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::{TestRegistry, repo, run};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Docker => "docker",
            Kind::Podman => "podman",
        }
    }
}

pub struct TestEngine {
    /// Held while a Podman engine lives: netavark programs the host's iptables (NAT chains
    /// for published ports) as if it were the only Podman, so two must not overlap.
    _exclusive: Option<Exclusive>,
    pub dir: tempfile::TempDir,
    pub kind: Kind,
    pub socket: PathBuf,
    /// A subnet no other test engine of this process uses.
    pub subnet: String,
}

/// Each engine gets its own /24 under 10.213/16 (engines on one host must not overlap).
static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);
static PODMAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Held while a Podman test engine runs (a lock any thread may hold and release).
struct Exclusive;

impl Exclusive {
    fn take() -> Exclusive {
        while PODMAN
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Exclusive
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        PODMAN.store(false, Ordering::Release);
    }
}

impl TestEngine {
    pub fn start(kind: Kind) -> TestEngine {
        Self::start_in(kind, None)
    }

    /// An engine inside the network namespace `netns` (dockerd only): a test machine's own.
    pub fn start_in(kind: Kind, netns: Option<&str>) -> TestEngine {
        let exclusive = (kind == Kind::Podman).then(Exclusive::take);
        let dir = tempfile::Builder::new()
            .prefix("outpost-engine-")
            .tempdir()
            .unwrap();
        let result = run(Command::new("bash")
            .env("ENGINE_NETNS", netns.unwrap_or_default())
            .arg(repo().join("tests/scripts/engine.sh"))
            .arg("start")
            .arg(kind.name())
            .arg(dir.path()));
        assert_eq!(
            result.code,
            0,
            "starting {}: {}{}",
            kind.name(),
            result.stdout,
            result.stderr
        );
        let socket = PathBuf::from(result.stdout.lines().last().unwrap_or_default().trim());
        TestEngine {
            _exclusive: exclusive,
            dir,
            kind,
            socket,
            subnet: free_subnet(),
        }
    }

    /// Stops the engine's process only, as a crash or a service restart does: dockerd stops
    /// its containers, Podman's keep running. [`TestEngine::resume`] starts it again.
    pub fn halt(&self) {
        run(Command::new("bash")
            .arg(repo().join("tests/scripts/engine.sh"))
            .arg("halt")
            .arg(self.dir.path()))
        .ok();
    }

    /// Starts a halted engine again on the same data and socket.
    pub fn resume(&self) {
        run(Command::new("bash")
            .arg(repo().join("tests/scripts/engine.sh"))
            .arg("start")
            .arg(self.kind.name())
            .arg(self.dir.path()))
        .ok();
    }

    /// `curl` against the Engine API; the parsed JSON answer (Null when empty).
    pub fn api(&self, method: &str, path: &str) -> Value {
        let result = run(Command::new("curl")
            .args(["-s", "-X", method, "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://engine/v1.41{path}")));
        serde_json::from_str(&result.stdout).unwrap_or(Value::Null)
    }

    /// Names of the containers the agent owns, sorted.
    pub fn containers(&self) -> Vec<String> {
        let filters = "%7B%22label%22%3A%5B%22dev.outpost.owner%3Doutpost-agent%22%5D%7D";
        let list = self.api(
            "GET",
            &format!("/containers/json?all=true&filters={filters}"),
        );
        let mut names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["Names"][0].as_str())
            .map(|n| n.trim_start_matches('/').to_string())
            .collect();
        names.sort();
        names
    }

    pub fn volumes(&self) -> Vec<String> {
        let list = self.api("GET", "/volumes");
        let mut names: Vec<String> = list["Volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["Name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// The `runtime:`/`docker:`/`rollout:` config block for an agent on this engine.
    pub fn agent_config(&self, publish: &[(&str, u16)]) -> String {
        let ports: Vec<String> = publish.iter().map(|(n, p)| format!("{n}: {p}")).collect();
        format!(
            "runtime: docker\ndocker:\n  socket: {}\n  network: {{subnet: {}}}\n  publish: {{address: 127.0.0.1, ports: {{{}}}}}\n  stop_timeout_seconds: 2\nrollout:\n  progress_deadline_seconds: 40\n  grace_seconds: 1\n  drift_interval_seconds: 2\n  max_surge: 100%\n",
            self.socket.display(),
            self.subnet,
            ports.join(", ")
        )
    }
}

/// A /24 under 10.213/16 that no route on this host uses yet (another engine's network, or a
/// bridge a crashed run left behind) and no other engine of this process was given.
fn free_subnet() -> String {
    let routes = run(Command::new("ip").args(["-o", "route"])).stdout;
    for _ in 0..250 {
        let block = (std::process::id() + NEXT_SUBNET.fetch_add(7, Ordering::Relaxed)) % 250;
        let subnet = format!("10.213.{block}.0/24");
        if !routes.contains(&subnet) {
            return subnet;
        }
    }
    panic!("every 10.213.N.0/24 is routed on this host: remove stale bridges (ip link)");
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tests/scripts/engine.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// Builds the busybox demo image `variant` and pushes it to `registry` as `demo:<variant>`;
/// returns its reference pinned by digest.
pub fn demo_image(registry: &TestRegistry, variant: &str) -> String {
    demo_image_with_payload(registry, variant, 0)
}

/// [`demo_image`] with a second, uncompressed layer holding `/payload` of `payload_mib` MiB
/// (none when 0): a big image for benchmarks.
pub fn demo_image_with_payload(registry: &TestRegistry, variant: &str, payload_mib: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("image");
    let built = run(Command::new("python3")
        .arg(repo().join("tests/scripts/demo-image.py"))
        .arg(&layout)
        .args(["--variant", variant])
        .args(["--payload-mib", &payload_mib.to_string()]));
    assert_eq!(built.code, 0, "demo-image.py: {}", built.stderr);
    let digest = built.stdout.trim().to_string();
    let target = format!("docker://{}/demo:{variant}", registry.host());
    let mut copy = Command::new("skopeo");
    // Unchanged: skopeo would otherwise compress the payload layer (a new digest).
    copy.args([
        "copy",
        "-q",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if let Some((user, pass)) = &registry.auth {
        copy.arg(format!("--dest-creds={user}:{pass}"));
    }
    let pushed = run(copy.arg(format!("oci:{}", layout.display())).arg(&target));
    assert_eq!(pushed.code, 0, "skopeo copy: {}", pushed.stderr);
    format!("{}/demo@{digest}", registry.host())
}

/// A plain HTTP GET to 127.0.0.1:`port`; the body, or None when nothing answers.
pub fn http_body(port: u16, path: &str) -> Option<String> {
    http_body_from("127.0.0.1", port, path)
}

/// A plain HTTP GET to `address`:`port` (a test machine's); the body, or None when nothing
/// answers.
pub fn http_body_from(address: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((address, port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}
