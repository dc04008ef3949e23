//! A rollout of 1,000 replicas on the in-memory runtime: the first install, then an update
//! that replaces every replica, through the container-engine backend with the default
//! parallelism. Prints each one's time and the process's peak RSS (`VmHWM`), which is what the
//! agent's own state costs at that size (goal: <= 40 MB). Run:
//! `cargo bench -p outpost-agent --bench rollout` (`OUTPOST_BENCH_REPLICAS` to change 1,000).

#![allow(clippy::unwrap_used)] // bench code: a panic is a failed run

use outpost_agent::config::{Config, RolloutConfig};
use outpost_agent::metrics::Metrics;
use outpost_agent::rollout::Context;
use outpost_agent::rollout::replicas::{Replicas, Settings};
use outpost_agent::runtime::fake::FakeRuntime;
use outpost_agent::state::Store;
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Stack, StackFile};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn stack(replicas: u32, message: &str) -> Stack {
    let image =
        "ghcr.io/acme/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let file: StackFile = serde_json::from_value(json!({
        "name": "acme",
        "permissionProfiles": {"execution": {}},
        "resources": [{"lifecycle": "live", "container": {
            "name": "web", "code": {"image": image}, "cpu": 0.05, "memory": "16Mi",
            "ports": [8080], "replicas": replicas,
            "healthCheck": {"path": "/healthz", "port": 8080},
            "environment": {"MESSAGE": message}, "permissions": "execution"}}],
    }))
    .unwrap();
    Stack::from_file(&file).unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let replicas: u32 = std::env::var("OUTPOST_BENCH_REPLICAS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let text = "source: {dir: {path: drop}}\ntrust: {keys: [a.pub]}\nexpect: {name: acme}\nstate_dir: state\napi: {socket: agent.sock}\nruntime: docker\npermissions: {execution: {}}\n";
    let config = Config::parse(text, &dir.path().join("agent.yaml")).unwrap();
    let context = Context {
        store: Arc::new(Store::in_memory().unwrap()),
        status: Arc::default(),
        changed: Arc::default(),
        rollout: RolloutConfig {
            grace_seconds: 0,
            ..RolloutConfig::default()
        },
        metrics: Arc::new(Metrics::new()),
    };
    let backend = Replicas::new(context, Settings::of(&config), FakeRuntime::default());
    println!("before: peak RSS {} KiB", peak_rss_kib());
    for (step, message) in ["first install", "update replacing every replica"]
        .iter()
        .enumerate()
    {
        let stack = stack(replicas, message);
        let digest = Digest::of(message.as_bytes());
        let start = Instant::now();
        let done = backend.run(digest, &stack, step == 0, None).await.unwrap();
        println!(
            "{message} of {replicas} replicas: {} steps in {:.2} s, peak RSS {} KiB (goal <= 40960)",
            done.len(),
            start.elapsed().as_secs_f64(),
            peak_rss_kib()
        );
    }
}
