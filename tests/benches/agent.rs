//! Agent benchmarks against real parts on 127.0.0.1 (run with `tests/bench.sh`, which builds
//! the release binaries first):
//! - publish → detected latency: OCI source with a 1 s interval, and a file drop;
//! - bytes on the wire per unchanged OCI poll (through a counting TCP proxy);
//! - idle RSS of the agent for each source (1 s polls) and container engine, and what it is
//!   made of (`OUTPOST_BENCH_IDLE_SECS`, default 120);
//! - a 50-container rollout on a real dockerd: first install and a rolling update, wall time
//!   and the agent's peak RSS (`OUTPOST_BENCH_REPLICAS`, default 50);
//! - the downtime a snapshot adds to a stateful replica's stop-first replace on a real dockerd,
//!   for 100 MiB and 1 GiB volumes (`OUTPOST_BENCH_SNAPSHOT_MIB`, default "100 1024");
//! - the agent's peak RSS accepting a bundle that carries a 1 GiB and a 4 GiB image (`bundle`,
//!   `OUTPOST_BENCH_BUNDLE_MIB`);
//! - VM pools on moto (`vm`): time from a release's arrival to all replicas healthy for 20
//!   replicas on 5 machines (each a test host with its own dockerd), cloud calls per idle drift
//!   pass once converged, and the agent's peak RSS.

#![allow(clippy::unwrap_used)] // bench code: a panic is a failed run

use outpost_tests::agent::{AgentProcess, drop_file, http_get};
use outpost_tests::forge::{release, signed, tar};
use outpost_tests::{TestRegistry, run, signer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

fn current_sequence(agent: &AgentProcess) -> u64 {
    let body = http_get(&agent.socket(), "/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|s| s["current"]["sequence"].as_u64())
        .unwrap_or(0)
}

fn wait_sequence(agent: &AgentProcess, sequence: u64) -> Duration {
    let start = Instant::now();
    while current_sequence(agent) != sequence {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sequence {sequence} never arrived"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    start.elapsed()
}

fn summary(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name}: n={} mean={:.1}ms p50={:.1}ms max={:.1}ms",
        samples.len(),
        mean.as_secs_f64() * 1e3,
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
}

fn push_tar(bytes: &[u8], destination: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    run(signer().arg("push").arg(file.path()).arg(destination)).ok();
}

/// Forwards 127.0.0.1:PORT to `upstream`, counting bytes each way and HEAD requests.
struct CountingProxy {
    port: u16,
    bytes: Arc<AtomicU64>,
    heads: Arc<AtomicU64>,
}

impl CountingProxy {
    fn start(upstream: String) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (bytes, heads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (b, h) = (bytes.clone(), heads.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let pipe = |mut from: TcpStream,
                            mut to: TcpStream,
                            bytes: Arc<AtomicU64>,
                            heads: Option<Arc<AtomicU64>>| {
                    std::thread::spawn(move || {
                        let mut buffer = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buffer) {
                            if n == 0 || to.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if let Some(heads) = &heads {
                                let text = String::from_utf8_lossy(&buffer[..n]);
                                heads.fetch_add(
                                    text.matches("HEAD /v2/").count() as u64,
                                    Ordering::Relaxed,
                                );
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    b.clone(),
                    Some(h.clone()),
                );
                pipe(server, client, b.clone(), None);
            }
        });
        CountingProxy { port, bytes, heads }
    }
}

fn oci_latency_and_bytes() {
    let registry = TestRegistry::start(None);
    let proxy = CountingProxy::start(registry.host());
    let reference = format!("127.0.0.1:{}/acme/shop:stable", proxy.port);
    push_tar(
        &tar(&signed(release("1.0.0", 1), &BOTH)),
        &format!("oci://{}/acme/shop:stable", registry.host()),
    );
    let agent = AgentProcess::start(
        &format!("source:\n  oci:\n    reference: {reference}\n    interval: 1s\n"),
        "",
    );
    wait_sequence(&agent, 1);

    // Unchanged polls.
    std::thread::sleep(Duration::from_millis(1500));
    let (bytes0, heads0) = (
        proxy.bytes.load(Ordering::Relaxed),
        proxy.heads.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs(20));
    let (bytes, heads) = (
        proxy.bytes.load(Ordering::Relaxed) - bytes0,
        proxy.heads.load(Ordering::Relaxed) - heads0,
    );
    println!(
        "oci unchanged poll: {heads} polls in 20 s, {} bytes per poll (HTTP request + response, keep-alive connection)",
        bytes / heads.max(1)
    );

    // Publish → detected, published at random phases of the poll interval.
    let mut samples = Vec::new();
    for sequence in 2..=11u64 {
        let bundle = tar(&signed(
            release(&format!("1.{sequence}.0"), sequence),
            &BOTH,
        ));
        std::thread::sleep(Duration::from_millis(fastrand_ms(sequence)));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bundle).unwrap();
        // Time from the end of the push (the moment the tag moves) to the agent's record.
        run(signer()
            .arg("push")
            .arg(file.path())
            .arg(format!("oci://{}/acme/shop:stable", registry.host())))
        .ok();
        samples.push(wait_sequence(&agent, sequence));
    }
    summary("oci publish->detected (1 s interval)", &mut samples);
}

fn fastrand_ms(seed: u64) -> u64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 1000
}

fn dir_latency() {
    let drop = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&dir_source(drop.path()), "");
    let mut samples = Vec::new();
    for sequence in 1..=20u64 {
        let bundle = tar(&signed(
            release(&format!("1.{sequence}.0"), sequence),
            &BOTH,
        ));
        std::fs::write(drop.path().join(".incoming"), &bundle).unwrap();
        let start = Instant::now();
        std::fs::rename(
            drop.path().join(".incoming"),
            drop.path().join(format!("v{sequence}.tar")),
        )
        .unwrap();
        wait_sequence(&agent, sequence);
        samples.push(start.elapsed());
    }
    summary("file drop rename->current", &mut samples);
    let _ = drop_file;
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `VmHWM:` the peak).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What `pid`'s resident set is made of, from `/proc/PID/smaps`: pages of the agent's own
/// binary (code and read-only data, then its relocated and written data), of shared libraries,
/// and anonymous memory (heap, stacks, allocator arenas).
fn rss_breakdown(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut binary_file, mut binary_anon, mut libraries, mut anonymous) = (0u64, 0u64, 0u64, 0u64);
    let mut mapping = String::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if !first.ends_with(':') {
            // A mapping's header: range, perms, offset, device, inode, path.
            mapping = fields.nth(4).unwrap_or("").to_string();
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let agent = mapping.ends_with("outpost-agent");
        match first {
            "Rss:" if agent => binary_file += kib,
            "Anonymous:" if agent => binary_anon += kib,
            "Rss:" if mapping.contains(".so") => libraries += kib,
            "Rss:" if !mapping.starts_with('/') => anonymous += kib,
            _ => {}
        }
    }
    format!(
        "binary {binary_file} KiB (of which {binary_anon} KiB relocated or written), shared libraries {libraries} KiB, heap and stacks {anonymous} KiB"
    )
}

/// `OUTPOST_BENCH_<name>` as a number, else `default`.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(format!("OUTPOST_BENCH_{name}"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `OUTPOST_BENCH_<name>` as a list of sizes, else `default` (both space-separated).
fn env_sizes(name: &str, default: &str) -> Vec<u64> {
    std::env::var(format!("OUTPOST_BENCH_{name}"))
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The agent's source block for a file drop into `dir`.
fn dir_source(dir: &std::path::Path) -> String {
    format!("source:\n  dir:\n    path: {}\n", dir.display())
}

/// Stack `acme` with one live resource, `container`.
fn acme_stack(container: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": container}],
    })
}

/// The benches' web resource: `replicas` busybox web servers of `image`, health-checked on
/// /healthz and published on port 8080.
fn bench_web(image: &str, replicas: u32) -> serde_json::Value {
    serde_json::json!({
        "name": "web", "code": {"image": image}, "cpu": 0.05, "memory": "16Mi",
        "ports": [8080], "replicas": replicas,
        "publicEndpoints": [{"name": "web", "port": 8080, "protocol": "http"}],
        "healthCheck": {"path": "/healthz", "port": 8080},
        "permissions": "execution", "command": ["sh", "-c", BENCH_WEB]})
}

/// Drops release `1.<sequence>.0` of stack `acme`, one live resource of `container`, signed
/// by both vendors, into `drop`.
fn drop_release(drop: &std::path::Path, container: serde_json::Value, sequence: u64) {
    let stack: outpost_bundle_format::stack::StackFile =
        serde_json::from_value(acme_stack(container)).unwrap();
    let layout = outpost_bundle_format::bundle::build(
        &stack,
        &outpost_tests::forge::metadata(&format!("1.{sequence}.0"), sequence),
        &[],
    )
    .unwrap();
    drop_file(
        drop,
        &format!("v{sequence}.tar"),
        &tar(&signed(layout, &BOTH)),
    );
}

/// The busybox web server of the rollout bench: /healthz answers once it runs.
const BENCH_WEB: &str =
    r#"trap 'exit 0' TERM; mkdir -p /www; echo ok > /www/healthz; httpd -f -p 8080 -h /www & wait"#;

/// The agent's first install and rolling update of `replicas` containers, then the same
/// containers under `docker-compose` on the same engine, and the ratios.
fn rollout() {
    use outpost_tests::engine::{Kind, TestEngine, demo_image};
    let replicas: u32 = env_number("REPLICAS", 50);
    let engine = TestEngine::start(Kind::Docker);
    let registry = TestRegistry::start(None);
    let images = [demo_image(&registry, "one"), demo_image(&registry, "two")];
    let compose = compose_rollout(&engine, &images, replicas);
    let drop = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(
        &dir_source(drop.path()),
        &engine.agent_config(&[("web", outpost_tests::free_port())]),
    );
    let pid = agent.pid().unwrap();
    let mut figures = Vec::new();
    for (sequence, image) in [(1u64, &images[0]), (2, &images[1])] {
        let start = Instant::now();
        drop_release(drop.path(), bench_web(image, replicas), sequence);
        agent.wait_converged_within(900, sequence);
        let took = start.elapsed().as_secs_f64();
        println!(
            "agent: {} {replicas} containers: {took:.1} s, agent peak RSS {} KiB",
            if sequence == 1 {
                "first install of"
            } else {
                "rolling update of"
            },
            status_kib(pid, "VmHWM:")
        );
        figures.push(took);
    }
    assert_eq!(engine.containers().len(), replicas as usize);
    if let Some((install, update)) = compose {
        println!(
            "ratios: install {:.2}x compose (goal <= 1.2), update {:.2}x compose (goal <= 1.5)",
            figures[0] / install,
            figures[1] / update
        );
    }
}

/// `docker-compose up -d` (Debian's 1.29) of the same containers with the same health check
/// every 500 ms (the agent's probe interval), timed until every container is healthy; then the
/// image changed and timed again. None when docker-compose is not installed.
fn compose_rollout(
    engine: &outpost_tests::engine::TestEngine,
    images: &[String; 2],
    replicas: u32,
) -> Option<(f64, f64)> {
    if std::process::Command::new("docker-compose")
        .arg("version")
        .output()
        .is_err()
    {
        println!("compose: docker-compose is not installed (apt install docker-compose)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker-compose.yml");
    let compose = |arguments: &[&str]| {
        let output = std::process::Command::new("docker-compose")
            .env("DOCKER_HOST", format!("unix://{}", engine.socket.display()))
            .arg("-f")
            .arg(&file)
            .args(["-p", "outpostbench"])
            .args(arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker-compose {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let mut figures = Vec::new();
    for (step, image) in images.iter().enumerate() {
        std::fs::write(&file, compose_file(image, replicas, &engine.subnet)).unwrap();
        let start = Instant::now();
        compose(&["up", "-d"]);
        let mut lowest = replicas;
        loop {
            let (healthy, on_image) = compose_healthy(engine, image);
            lowest = lowest.min(healthy);
            if on_image == replicas {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(900),
                "compose never got healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = start.elapsed().as_secs_f64();
        println!(
            "compose: {} {replicas} containers: {took:.1} s{}",
            if step == 0 { "up -d of" } else { "update of" },
            if step == 0 {
                String::new()
            } else {
                format!(", fewest healthy containers during it: {lowest}")
            }
        );
        figures.push(took);
    }
    compose(&["down", "--timeout", "2"]);
    // The images go too, so the agent pulls them as compose did.
    for image in images {
        engine.api("DELETE", &format!("/images/{image}?force=true"));
    }
    Some((figures[0], figures[1]))
}

/// How many of the bench project's containers are healthy, and how many of those run `image`.
fn compose_healthy(engine: &outpost_tests::engine::TestEngine, image: &str) -> (u32, u32) {
    let filters = "%7B%22label%22%3A%5B%22com.docker.compose.project%3Doutpostbench%22%5D%2C%22health%22%3A%5B%22healthy%22%5D%7D";
    let list = engine.api("GET", &format!("/containers/json?filters={filters}"));
    let healthy: Vec<&serde_json::Value> = list.as_array().into_iter().flatten().collect();
    let on_image = healthy
        .iter()
        .filter(|c| c["Image"].as_str() == Some(image))
        .count();
    (healthy.len() as u32, on_image as u32)
}

/// The compose file for `replicas` services like the agent's replicas: same image, command,
/// limits and an equivalent health check (busybox nc; its wget cannot resolve in this image)
/// every 500 ms. Its timeout is 10 s, not the agent's 1 s: compose checks by running a process
/// in each container (CPU-limited like the agent's), and 50 of those every 500 ms on 2 cores
/// take longer than 1 s, so at 1 s most containers never count as healthy.
fn compose_file(image: &str, replicas: u32, subnet: &str) -> String {
    let mut text = format!(
        "version: \"2.4\"\nnetworks:\n  default:\n    ipam:\n      config: [{{subnet: \"{subnet}\"}}]\nservices:\n"
    );
    let check = "printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 | grep -q ' 200 '";
    for n in 0..replicas {
        text.push_str(&format!(
            "  web-{n}:\n    image: \"{image}\"\n    command: [\"sh\", \"-c\", {command:?}]\n    cpus: 0.05\n    mem_limit: 16m\n    stop_grace_period: 2s\n    healthcheck:\n      test: [\"CMD-SHELL\", {check:?}]\n      interval: 500ms\n      timeout: 10s\n      retries: 3\n",
            command = BENCH_WEB,
        ));
    }
    text
}

/// The longest time the stateful replica answered nothing during its update, with snapshots
/// on and off, per volume size.
fn snapshot_downtime() {
    use outpost_tests::engine::{Kind, TestEngine, demo_image, http_body};
    let sizes: Vec<u64> = env_sizes("SNAPSHOT_MIB", "100 1024");
    let engine = TestEngine::start(Kind::Docker);
    let registry = TestRegistry::start(None);
    let image = demo_image(&registry, "one");
    let db = r#"trap 'exit 0' TERM; [ -f /data/bulk ] || dd if=/dev/zero of=/data/bulk bs=1M count="$MIB" 2>/dev/null; mkdir -p /www; echo ok > /www/healthz; httpd -f -p 5432 -h /www & wait"#;
    for mib in sizes {
        let mut downtime = Vec::new();
        for keep in [0, 3] {
            let drop = tempfile::tempdir().unwrap();
            let port = outpost_tests::free_port();
            let mut agent = AgentProcess::start(
                &dir_source(drop.path()),
                &format!(
                    "{}snapshots: {{keep: {keep}, max_gib: 4}}\n",
                    engine.agent_config(&[("db", port)])
                ),
            );
            for sequence in [1u64, 2] {
                drop_release(
                    drop.path(),
                    serde_json::json!({
                        "name": "db", "code": {"image": image}, "cpu": 1, "memory": "64Mi",
                        "ports": [5432], "replicas": 1, "persistentStorage": "2Gi",
                        "publicEndpoints": [{"name": "db", "port": 5432, "protocol": "http"}],
                        "healthCheck": {"path": "/healthz", "port": 5432},
                        "environment": {"MIB": mib.to_string(), "RELEASE": sequence.to_string()},
                        "permissions": "execution", "command": ["sh", "-c", db]}),
                    sequence,
                );
                if sequence == 1 {
                    agent.wait_converged_within(900, 1);
                    continue;
                }
                // The longest gap between two answers while the update runs.
                let (mut last_answer, mut longest) = (Instant::now(), Duration::ZERO);
                let converged = |s: &serde_json::Value| {
                    s["current"]["sequence"] == 2
                        && s["runtime"]["converged"] == s["current"]["digest"]
                };
                while !converged(&agent.status()) {
                    if http_body(port, "/healthz").is_some_and(|b| b.trim() == "ok") {
                        longest = longest.max(last_answer.elapsed());
                        last_answer = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Converged: the gap ends at its first answer (the endpoint's route follows).
                while http_body(port, "/healthz").is_none_or(|b| b.trim() != "ok") {
                    std::thread::sleep(Duration::from_millis(10));
                }
                downtime.push(longest.max(last_answer.elapsed()));
            }
            agent.stop();
            for container in engine.containers() {
                engine.api("DELETE", &format!("/containers/{container}?force=true"));
            }
            engine.api("DELETE", "/volumes/acme-db-0-data");
        }
        println!(
            "stop-first replace of a {mib} MiB volume: {:.2} s without a snapshot, {:.2} s with one: {:.2} s extra downtime",
            downtime[0].as_secs_f64(),
            downtime[1].as_secs_f64(),
            downtime[1].as_secs_f64() - downtime[0].as_secs_f64()
        );
    }
}

/// Idle RSS of the agent: for each source polling every 1 s with `runtime: none`, then for each
/// container engine with one replica converged (dir source), each after
/// `OUTPOST_BENCH_IDLE_SECS` (default 120) of idling, with what the figure is made of.
fn idle_rss() {
    use outpost_tests::engine::{Kind, TestEngine, demo_image};
    use outpost_tests::git::{VendorRepo, git_daemon};
    let seconds: u64 = env_number("IDLE_SECS", 120);
    let bundle = tar(&signed(release("1.0.0", 1), &BOTH));

    let registry = TestRegistry::start(None);
    push_tar(
        &bundle,
        &format!("oci://{}/acme/shop:stable", registry.host()),
    );
    let oci = format!(
        "source:\n  oci:\n    reference: {}/acme/shop:stable\n    interval: 1s\n",
        registry.host()
    );
    idle(
        "oci source, runtime none",
        &AgentProcess::start(&oci, ""),
        seconds,
    );

    let vendor = VendorRepo::new();
    vendor.publish(&bundle, "1.0.0");
    let (_daemon, port) = git_daemon(vendor.root.path());
    let git = format!(
        "source:\n  git:\n    url: git://127.0.0.1:{port}/vendor.git\n    ref: main\n    path: outpost/bundle.tar\n    interval: 1s\n"
    );
    idle(
        "git source, runtime none",
        &AgentProcess::start(&git, ""),
        seconds,
    );

    let drop = tempfile::tempdir().unwrap();
    drop_file(drop.path(), "v1.tar", &bundle);
    let dir = dir_source(drop.path());
    idle(
        "dir source, runtime none",
        &AgentProcess::start(&dir, ""),
        seconds,
    );

    for kind in [Kind::Docker, Kind::Podman] {
        let engine = TestEngine::start(kind);
        let drop = tempfile::tempdir().unwrap();
        let agent = AgentProcess::start(
            &dir_source(drop.path()),
            &engine.agent_config(&[("web", outpost_tests::free_port())]),
        );
        drop_release(drop.path(), bench_web(&demo_image(&registry, "idle"), 1), 1);
        agent.wait_converged_within(300, 1);
        idle(
            &format!("dir source, runtime docker on {kind:?}, one replica"),
            &agent,
            seconds,
        );
    }
}

/// Lets `agent` idle for `seconds` once its first release is current, then prints its RSS.
fn idle(label: &str, agent: &AgentProcess, seconds: u64) {
    wait_sequence(agent, 1);
    let pid = agent.pid().unwrap();
    let after_start = rss_kib(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    println!(
        "idle rss, {label}: {} KiB after {seconds} s ({after_start} KiB once the release was current; goal <= 8192 KiB): {}",
        rss_kib(pid),
        rss_breakdown(pid)
    );
}

/// Peak RSS of the agent accepting a bundle that carries a big image (`build --with-images`),
/// for each size in `OUTPOST_BENCH_BUNDLE_MIB` (MiB of image payload, default "1024 4096"):
/// from the file's arrival in the drop directory through download, verification, keeping the
/// image and loading it into dockerd, to the replica healthy. Each size gets a fresh agent, so
/// each peak is its own.
fn carried_bundle_rss() {
    use outpost_tests::engine::{Kind, TestEngine, demo_image_with_payload};
    let sizes: Vec<u64> = env_sizes("BUNDLE_MIB", "1024 4096");
    for mib in sizes {
        let work = tempfile::tempdir().unwrap();
        let bundle_file = work.path().join("acme-1.0.0.tar");
        {
            let registry = TestRegistry::start(None);
            let image = demo_image_with_payload(&registry, "carried", mib);
            let stack_file = work.path().join("stack.yaml");
            std::fs::write(&stack_file, acme_stack(bench_web(&image, 1)).to_string()).unwrap();
            outpost_tests::build_bundle(&stack_file, "1.0.0", 1, &["--with-images"], &bundle_file);
            outpost_tests::sign_with(&bundle_file, &BOTH);
        }
        let bytes = std::fs::metadata(&bundle_file).unwrap().len();
        let engine = TestEngine::start(Kind::Docker);
        let drop = tempfile::tempdir_in(work.path()).unwrap();
        let agent = AgentProcess::start(
            &dir_source(drop.path()),
            &engine.agent_config(&[("web", outpost_tests::free_port())]),
        );
        let pid = agent.pid().unwrap();
        let before = status_kib(pid, "VmHWM:");
        let start = Instant::now();
        std::fs::rename(&bundle_file, drop.path().join("acme-1.0.0.tar")).unwrap();
        agent.wait_converged_within(1800, 1);
        println!(
            "carried bundle of {:.2} GiB ({mib} MiB image): accepted, loaded into dockerd and healthy in {:.1} s; agent peak RSS {} KiB ({} KiB before it arrived)",
            bytes as f64 / (1u64 << 30) as f64,
            start.elapsed().as_secs_f64(),
            status_kib(pid, "VmHWM:"),
            before
        );
    }
}

/// 20 replicas of 0.4 cores: four per t3.small machine (1.75 cores after its reserve), so five
/// machines; each machine is a test host with its own dockerd running its user data.
fn vm_pools() {
    use outpost_tests::cloud::{Site, cloud_calls, publish, web_stack};
    let site = Site::start(&[], 6);
    let pid = site.agent.pid().unwrap();
    let start = Instant::now();
    publish(
        site.drop.path(),
        &web_stack(&site.image, "v1", true, 20, 0.4),
        "1.0.0",
        1,
    );
    site.agent.wait_converged_within(600, 1);
    let install = start.elapsed();
    site.wait_serving(5, "v1");
    let before = cloud_calls(&site.agent);
    let idle = Duration::from_secs(20);
    std::thread::sleep(idle);
    let after = cloud_calls(&site.agent);
    let passes = idle.as_secs() / 2; // rollout.drift_interval_seconds
    let mut per_pass = Vec::new();
    for (call, n) in &after {
        let new = n - before.get(call).copied().unwrap_or(0);
        if new > 0 {
            per_pass.push(format!("{call} {:.1}", new as f64 / passes as f64));
        }
    }
    println!(
        "vm pools: 20 replicas on 5 machines healthy {:.1} s after the release arrived (machines launched, booted, nodes joined, images pulled); idle drift pass: {} calls per pass ({}); agent peak RSS {} KiB",
        install.as_secs_f64(),
        per_pass.len(),
        per_pass.join(", "),
        status_kib(pid, "VmHWM:")
    );
    let start = Instant::now();
    publish(
        site.drop.path(),
        &web_stack(&site.image, "v2", true, 20, 0.4),
        "2.0.0",
        2,
    );
    site.agent.wait_converged_within(600, 2);
    println!(
        "vm pools: update of 20 replicas through 5 machines, one machine at a time: {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes --bench; a name filter picks one part.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    let parts: [(&str, fn()); 7] = [
        ("dir", dir_latency),
        ("oci", oci_latency_and_bytes),
        ("idle", idle_rss),
        ("rollout", rollout),
        ("snapshot", snapshot_downtime),
        ("bundle", carried_bundle_rss),
        ("vm", vm_pools),
    ];
    for (name, part) in parts {
        if name.contains(&filter) {
            part();
        }
    }
}
