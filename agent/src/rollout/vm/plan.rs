//! What a pending release changes in the cloud, for `plan`: pools to start, volumes to make
//! (or, with `vm.delete_volumes`, to delete), load balancers to make. Worked out from the
//! release and what the last rollout pass saw (`status`), with no cloud call; how many machines
//! each pool gets is settled by placement at rollout.

use super::volumes::stateful;
use crate::config::{DEFAULT_POOL, VmConfig};
use crate::status::RuntimeStatus;
use outpost_bundle_format::stack::{Protocol, Stack};
use std::collections::BTreeSet;

/// One line per cloud change the release makes, in the order the rollout makes them.
pub fn cloud_changes(stack: &Stack, vm: &VmConfig, seen: &RuntimeStatus) -> Vec<String> {
    let mut changes = Vec::new();
    let pools: BTreeSet<&str> = stack
        .resources
        .iter()
        .map(|r| r.container.pool.as_deref().unwrap_or(DEFAULT_POOL))
        .collect();
    for pool in pools {
        if seen.pools.contains_key(pool) {
            continue;
        }
        match vm.pools.get(pool) {
            Some(config) => changes.push(format!(
                "start pool {pool}: Auto Scaling group outpost-{}-{pool} of {} machines (at most {})",
                stack.name, config.instance_type, config.max_machines
            )),
            None => changes.push(format!(
                "pool {pool} is not configured (vm.pools): the release cannot run"
            )),
        }
    }
    let sizes = stateful(stack);
    let mut wanted = BTreeSet::new();
    for resource in &stack.resources {
        let c = &resource.container;
        let Some(size_gib) = sizes.get(c.name.as_str()) else {
            continue;
        };
        for ordinal in 0..c.scaling.initial() {
            let replica = format!("{}-{ordinal}", c.name);
            if !seen.volumes.contains_key(&replica) {
                changes.push(format!(
                    "make volume of {replica} ({size_gib} GiB, EBS gp3)"
                ));
            }
            wanted.insert(replica);
        }
    }
    for (replica, volume) in &seen.volumes {
        if wanted.contains(replica) {
            continue;
        }
        changes.push(if vm.delete_volumes {
            format!(
                "delete volume {} of {replica} once detached (vm.delete_volumes is set)",
                volume.id
            )
        } else {
            format!(
                "keep volume {} of {replica} (its ordinal is gone)",
                volume.id
            )
        });
    }
    for resource in &stack.resources {
        let c = &resource.container;
        for endpoint in &c.public_endpoints {
            let label = format!("{}.{}", c.name, endpoint.name);
            let exists = seen
                .endpoints
                .iter()
                .any(|e| e.starts_with(&format!("{label}: ")));
            if !exists {
                let kind = match endpoint.protocol {
                    Protocol::Http => "application",
                    Protocol::Tcp => "network",
                };
                changes.push(format!(
                    "make load balancer of {label} ({kind}, port {})",
                    endpoint.port
                ));
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PoolStatus, VolumeStatus};
    use outpost_bundle_format::stack::StackFile;

    fn stack(replicas: u32) -> Stack {
        let file: StackFile = serde_json::from_value(serde_json::json!({
            "name": "acme",
            "permissionProfiles": {"execution": {}},
            "resources": [
                {"lifecycle": "live", "container": {
                    "name": "db", "code": {"image": "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
                    "cpu": 1, "memory": "1Gi", "ports": [5432], "replicas": replicas,
                    "persistentStorage": "10Gi", "permissions": "execution"}},
                {"lifecycle": "live", "container": {
                    "name": "web", "code": {"image": "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
                    "cpu": 1, "memory": "1Gi", "ports": [8080], "replicas": 2, "pool": "front",
                    "publicEndpoints": [{"name": "web", "port": 8080, "protocol": "http"}],
                    "permissions": "execution"}},
            ],
        }))
        .unwrap();
        Stack::from_file(&file).unwrap()
    }

    fn vm(delete_volumes: bool) -> VmConfig {
        serde_saphyr::from_str(&format!(
            "provider: aws\nnodes: {{listen: '127.0.0.1:7480', advertise: 'http://10.0.0.1:7480', bootstrap_secret_file: s}}\ndelete_volumes: {delete_volumes}\npools:\n  default: {{instance_type: m6i.large, image: ami-1, subnets: [a], max_machines: 4}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_first_release_lists_everything_it_makes() {
        let changes = cloud_changes(&stack(2), &vm(false), &RuntimeStatus::default());
        assert_eq!(
            changes,
            [
                "start pool default: Auto Scaling group outpost-acme-default of m6i.large machines (at most 4)",
                "pool front is not configured (vm.pools): the release cannot run",
                "make volume of db-0 (10 GiB, EBS gp3)",
                "make volume of db-1 (10 GiB, EBS gp3)",
                "make load balancer of web.web (application, port 8080)",
            ]
        );
    }

    #[test]
    fn what_exists_is_not_listed_and_volumes_of_ordinals_gone_are_kept_or_deleted() {
        let mut seen = RuntimeStatus::default();
        for pool in ["default", "front"] {
            seen.pools.insert(pool.into(), PoolStatus::default());
        }
        for ordinal in 0..3 {
            seen.volumes.insert(
                format!("db-{ordinal}"),
                VolumeStatus {
                    id: format!("vol-{ordinal}"),
                    zone: "a".into(),
                    size_gib: 10,
                    state: "available".into(),
                },
            );
        }
        seen.endpoints = vec!["web.web: http://lb.example".into()];
        assert_eq!(
            cloud_changes(&stack(2), &vm(false), &seen),
            ["keep volume vol-2 of db-2 (its ordinal is gone)"]
        );
        assert_eq!(
            cloud_changes(&stack(2), &vm(true), &seen),
            ["delete volume vol-2 of db-2 once detached (vm.delete_volumes is set)"]
        );
    }
}
