//! The planner on a 10,000-resource release: `Desired::new` (dependency order, config hashes)
//! plus `plan` against an observed state where half the replicas are stale, some are stopped,
//! some missing and some orphaned. Goal: ≤ 50 ms. Run: `cargo bench -p outpost-agent --bench planner`.

#![allow(clippy::unwrap_used)] // bench code: a panic is a failed run

use chrono::Utc;
use outpost_agent::plan::{Desired, ObservedReplica, ReplicaId, ReplicaState, plan};
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::{Stack, StackFile};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const RESOURCES: usize = 10_000;

fn big_stack() -> Stack {
    let image =
        "ghcr.io/acme/svc@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let resources: Vec<_> = (0..RESOURCES)
        .map(|i| {
            let links: std::collections::BTreeSet<String> = [i / 2, i / 3].iter().filter(|&&j| j < i).map(|j| format!("svc-{j}")).collect();
            json!({"lifecycle": "live", "container": {
                "name": format!("svc-{i}"), "code": {"image": image}, "cpu": {"min": 0.5, "desired": 1},
                "memory": "512Mi", "ports": [8080, 9090], "replicas": 1 + (i % 3) as u32,
                "environment": {"INDEX": i.to_string(), "MODE": "bench"}, "links": links,
                "healthCheck": {"path": "/healthz", "port": 8080}, "permissions": "execution"}})
        })
        .collect();
    let file: StackFile = serde_json::from_value(json!({"name": "acme", "permissionProfiles": {"execution": {"aws": ["s3:GetObject"]}}, "resources": resources})).unwrap();
    Stack::from_file(&file).unwrap()
}

fn main() {
    let stack = big_stack();
    let digest = Digest::of(b"release");
    let now = Utc::now();
    let reference = Desired::new(&stack, digest, &BTreeMap::new());
    let mut observed = Vec::new();
    for (i, resource) in reference.resources.iter().enumerate() {
        for ordinal in 0..resource.replicas + u32::from(i % 7 == 0) {
            if i % 11 == 0 && ordinal == 0 {
                continue; // missing
            }
            observed.push(ObservedReplica {
                id: ReplicaId::new(&resource.container.name, ordinal),
                config_hash: if i % 2 == 0 {
                    resource.config_hash.clone()
                } else {
                    "stale".into()
                },
                state: if i % 13 == 0 {
                    ReplicaState::Stopped
                } else {
                    ReplicaState::Running
                },
                started_at: Some(now - chrono::Duration::hours(1)),
            });
        }
    }
    for i in 0..100 {
        observed.push(ObservedReplica {
            id: ReplicaId::new(&format!("orphan-{i}"), 0),
            config_hash: "x".into(),
            state: ReplicaState::Running,
            started_at: None,
        });
    }
    drop(reference);

    let (mut derive, mut planning, mut total): (Vec<Duration>, Vec<Duration>, Vec<Duration>) =
        Default::default();
    let mut actions = 0;
    for _ in 0..30 {
        let start = Instant::now();
        let desired = Desired::new(&stack, digest, &BTreeMap::new());
        let derived = start.elapsed();
        let result = plan(&desired, &observed, now);
        total.push(start.elapsed());
        planning.push(start.elapsed() - derived);
        derive.push(derived);
        actions = result.actions.len();
    }
    let start = Instant::now();
    for resource in &stack.resources {
        std::hint::black_box(outpost_agent::plan::config_hash(
            "acme",
            &resource.container,
        ));
    }
    let order = Instant::now();
    std::hint::black_box(outpost_agent::plan::dependency_order(&stack));
    println!(
        "  dependency order alone: {:.1} ms",
        order.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "  config hashes alone: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let report = |name: &str, samples: &mut Vec<Duration>| {
        samples.sort();
        println!(
            "  {name}: median {:.1} ms, max {:.1} ms",
            samples[samples.len() / 2].as_secs_f64() * 1e3,
            samples[samples.len() - 1].as_secs_f64() * 1e3
        );
    };
    println!(
        "planner: {RESOURCES} resources, {} observed replicas, {actions} actions (goal <= 50 ms)",
        observed.len()
    );
    report(
        "desired state (order + config hashes, once per release)",
        &mut derive,
    );
    report("plan (every observation)", &mut planning);
    report("both", &mut total);
}
