//! A stand-in for a Kubernetes cluster, for tests only: no kube-apiserver can run on the
//! machines these tests run on. [`cluster`] is `kube-fake-client`'s in-memory API server
//! (server-side apply, label selectors, status subresources); [`run_controllers`] plays
//! kube-controller-manager's part for the objects the agent writes, so rollouts finish or
//! fail as they would; the `fake-apiserver` binary serves both over HTTP for a real agent
//! process.
//!
//! It is not a cluster: no pods, no scheduling, no admission, no dry-run (a dry-run request is
//! applied like any other), and lists merge as whole values.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch};
use kube::api::{PatchParams, PostParams};
use serde_json::{Value, json};
use std::time::Duration;

/// Pods of an image with this digest never become ready: a Deployment of it exceeds its
/// progress deadline, a StatefulSet of it stays unready.
pub const NEVER_READY_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// An empty in-memory cluster.
pub async fn cluster() -> kube::Client {
    cluster_with(Vec::new()).await
}

/// An in-memory cluster holding `objects` (JSON, each with its namespace), stored as given:
/// also what the API would not let a client write, such as a `deletionTimestamp`.
pub async fn cluster_with(objects: Vec<Value>) -> kube::Client {
    kube_fake_client::ClientBuilder::new()
        .with_runtime_objects(objects)
        .with_status_subresource::<Deployment>()
        .with_status_subresource::<StatefulSet>()
        .with_return_managed_fields()
        .build()
        .await
        .unwrap_or_else(|e| panic!("kube-fake-client: {e}"))
}

fn api(
    client: &kube::Client,
    namespace: &str,
    group: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural);
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Reports the rollouts of Deployments and StatefulSets in `namespace` as their controllers
/// would once their pods are ready, and creates a StatefulSet's claims from its templates.
/// Runs until dropped.
pub async fn run_controllers(client: kube::Client, namespace: String) {
    let deployments = api(&client, &namespace, "apps", "Deployment", "deployments");
    let statefulsets = api(&client, &namespace, "apps", "StatefulSet", "statefulsets");
    let claims = api(
        &client,
        &namespace,
        "",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
    );
    loop {
        for (api, stateful) in [(&deployments, false), (&statefulsets, true)] {
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            for item in list.items {
                let name = item.metadata.name.clone().unwrap_or_default();
                let generation = item.metadata.generation.unwrap_or(1);
                let spec = &item.data["spec"];
                let want = spec["replicas"].as_i64().unwrap_or(1);
                let ready = !spec["template"]["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        c["image"]
                            .as_str()
                            .is_some_and(|i| i.ends_with(NEVER_READY_DIGEST))
                    });
                let status = if stateful {
                    reconcile_claims(&claims, &item, want).await;
                    statefulset_status(&name, generation, want, ready)
                } else {
                    deployment_status(&name, generation, want, ready)
                };
                if item.data.get("status") != Some(&status) {
                    let _ = api
                        .patch_status(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": status})),
                        )
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn deployment_status(name: &str, generation: i64, want: i64, ready: bool) -> Value {
    if ready {
        json!({
            "observedGeneration": generation, "replicas": want, "updatedReplicas": want,
            "availableReplicas": want, "readyReplicas": want,
            "conditions": [{"type": "Progressing", "status": "True",
                "reason": "NewReplicaSetAvailable", "message": "rolled out"}],
        })
    } else {
        // The new ReplicaSet's pod never becomes ready; the old ones keep serving.
        json!({
            "observedGeneration": generation, "replicas": want + 1, "updatedReplicas": 1,
            "availableReplicas": want, "readyReplicas": want,
            "conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": format!("ReplicaSet \"{name}-new\" has timed out progressing.")}],
        })
    }
}

fn statefulset_status(name: &str, generation: i64, want: i64, ready: bool) -> Value {
    let ready = if ready { want } else { 0 };
    json!({
        "observedGeneration": generation, "replicas": want, "updatedReplicas": want,
        "readyReplicas": ready, "availableReplicas": ready,
        "currentRevision": format!("{name}-{generation}"),
        "updateRevision": format!("{name}-{generation}"),
    })
}

/// What the StatefulSet controller does with claims: `<template>-<statefulset>-<ordinal>` per
/// replica, labelled from the template; with the retention policy `Delete` they are owned by
/// the StatefulSet (deleted with it) and those of replicas scaled away are deleted.
async fn reconcile_claims(claims: &Api<DynamicObject>, statefulset: &DynamicObject, want: i64) {
    let name = statefulset.metadata.name.clone().unwrap_or_default();
    let spec = &statefulset.data["spec"];
    let policy = &spec["persistentVolumeClaimRetentionPolicy"];
    let owner = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
        "uid": statefulset.metadata.uid, "controller": true}]);
    for template in spec["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let prefix = template["metadata"]["name"].as_str().unwrap_or("data");
        for ordinal in 0..want {
            let mut claim = json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("{prefix}-{name}-{ordinal}"),
                    "labels": template["metadata"]["labels"]},
                "spec": template["spec"],
            });
            if policy["whenDeleted"] == "Delete" {
                claim["metadata"]["ownerReferences"] = owner.clone();
            }
            if let Ok(claim) = serde_json::from_value::<DynamicObject>(claim) {
                // Exists already: nothing to do, as with the real controller.
                let _ = claims.create(&PostParams::default(), &claim).await;
            }
        }
        if policy["whenScaled"] == "Delete" {
            for ordinal in want..want + 16 {
                let _ = claims
                    .delete(&format!("{prefix}-{name}-{ordinal}"), &Default::default())
                    .await;
            }
        }
    }
}
