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

/// A running `fake-apiserver` (the binary at the given path), with a kubeconfig that points
/// at it; stopped when dropped.
pub struct FakeApiserver {
    child: std::process::Child,
    pub address: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl FakeApiserver {
    pub fn start(binary: &std::path::Path, namespace: &str) -> std::io::Result<FakeApiserver> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--namespace", namespace])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        let address = match line.trim().trim_start_matches("listening on ").parse() {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other(format!(
                    "{} said {line:?}, not `listening on ADDRESS`",
                    binary.display()
                )));
            }
        };
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: stand-in, cluster: {{server: \"http://{address}\"}}}}]\nusers: [{{name: agent, user: {{}}}}]\ncontexts: [{{name: stand-in, context: {{cluster: stand-in, user: agent}}}}]\ncurrent-context: stand-in\n"
            ),
        )?;
        Ok(FakeApiserver {
            child,
            address,
            dir,
        })
    }

    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pods of an image with this digest never become ready: a Deployment of it exceeds its
/// progress deadline, a StatefulSet of it stays unready.
pub const NEVER_READY_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// An empty in-memory cluster.
pub async fn cluster() -> kube::Client {
    cluster_with(Vec::new()).await
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshot, the CSI snapshot CRD a cluster installs: only
/// its name, for the fake client's registry (objects of it are handled as JSON).
pub struct VolumeSnapshot {
    metadata: kube::api::ObjectMeta,
}

impl kube::Resource for VolumeSnapshot {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "VolumeSnapshot".into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "snapshot.storage.k8s.io".into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "volumesnapshots".into()
    }

    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

/// An in-memory cluster holding `objects` (JSON, each with its namespace), stored as given:
/// also what the API would not let a client write, such as a `deletionTimestamp`. The
/// VolumeSnapshot CRD is installed.
pub async fn cluster_with(objects: Vec<Value>) -> kube::Client {
    cluster_of(objects, true).await
}

/// [`cluster_with`], without the VolumeSnapshot CRD when `snapshots` is false (a cluster
/// whose CSI driver has no snapshot support installed).
pub async fn cluster_of(objects: Vec<Value>, snapshots: bool) -> kube::Client {
    let mut builder = kube_fake_client::ClientBuilder::new();
    if snapshots {
        builder = builder.with_resource::<VolumeSnapshot>();
    }
    builder
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

/// Plays the controllers' part in `namespace`: Deployments report their rollout as done once
/// their pods would be ready; StatefulSets run pods one ordinal at a time (OrderedReady), each
/// labelled with its revision, replace them in reverse order, and, like the real controller,
/// stop at a pod that is not ready, whatever its revision; claims are made from the templates;
/// VolumeSnapshots of existing claims become ready to use. Runs until dropped.
pub async fn run_controllers(client: kube::Client, namespace: String) {
    let apis = Apis {
        deployments: api(&client, &namespace, "apps", "Deployment", "deployments"),
        statefulsets: api(&client, &namespace, "apps", "StatefulSet", "statefulsets"),
        pods: api(&client, &namespace, "", "Pod", "pods"),
        claims: api(
            &client,
            &namespace,
            "",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
        ),
        snapshots: api(
            &client,
            &namespace,
            "snapshot.storage.k8s.io",
            "VolumeSnapshot",
            "volumesnapshots",
        ),
    };
    loop {
        if let Ok(list) = apis.deployments.list(&ListParams::default()).await {
            for item in list.items {
                let name = item.metadata.name.clone().unwrap_or_default();
                let spec = &item.data["spec"];
                let status = deployment_status(
                    &name,
                    item.metadata.generation.unwrap_or(1),
                    spec["replicas"].as_i64().unwrap_or(1),
                    becomes_ready(&spec["template"]),
                );
                report(&apis.deployments, &item, status).await;
            }
        }
        if let Ok(list) = apis.statefulsets.list(&ListParams::default()).await {
            for item in list.items {
                let want = item.data["spec"]["replicas"].as_i64().unwrap_or(1);
                reconcile_claims(&apis.claims, &item, want).await;
                let status = run_statefulset(&apis.pods, &item, want).await;
                report(&apis.statefulsets, &item, status).await;
            }
        }
        ready_snapshots(&apis.snapshots, &apis.claims).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Plays the snapshot controller's part: a VolumeSnapshot of an existing claim becomes ready
/// to use, its restore size the claim's request; one of a missing claim reports an error.
async fn ready_snapshots(snapshots: &Api<DynamicObject>, claims: &Api<DynamicObject>) {
    let Ok(list) = snapshots.list(&ListParams::default()).await else {
        return;
    };
    for item in list.items {
        if !item.data["status"].is_null() {
            continue;
        }
        let source = item.data["spec"]["source"]["persistentVolumeClaimName"]
            .as_str()
            .unwrap_or_default();
        let status = match claims.get_opt(source).await {
            Ok(Some(claim)) => json!({
                "readyToUse": true,
                "restoreSize": claim.data["spec"]["resources"]["requests"]["storage"],
                "creationTime": "2026-01-01T00:00:00Z",
            }),
            _ => json!({"readyToUse": false,
                "error": {"message": format!("claim {source} not found")}}),
        };
        let name = item.metadata.name.clone().unwrap_or_default();
        let _ = snapshots
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await;
    }
}

struct Apis {
    deployments: Api<DynamicObject>,
    statefulsets: Api<DynamicObject>,
    pods: Api<DynamicObject>,
    claims: Api<DynamicObject>,
    snapshots: Api<DynamicObject>,
}

/// Whether pods of this template become ready.
fn becomes_ready(template: &Value) -> bool {
    !template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["image"]
                .as_str()
                .is_some_and(|i| i.ends_with(NEVER_READY_DIGEST))
        })
}

async fn report(api: &Api<DynamicObject>, item: &DynamicObject, status: Value) {
    if item.data.get("status") != Some(&status) {
        let name = item.metadata.name.clone().unwrap_or_default();
        let _ = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await;
    }
}

/// A revision names a pod template, as the real controller's hash does: the same template
/// gives the same revision again.
fn revision(name: &str, template: &Value) -> String {
    let text = template.to_string();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{name}-{:08x}", hash as u32)
}

const REVISION_LABEL: &str = "controller-revision-hash";

/// One step of the StatefulSet controller, OrderedReady: the first missing ordinal is
/// created, else the highest pod of an older revision is replaced, else the extra ordinals
/// go; nothing moves past a pod that is not ready. Returns the status it reports.
async fn run_statefulset(
    pods: &Api<DynamicObject>,
    statefulset: &DynamicObject,
    want: i64,
) -> Value {
    let name = statefulset.metadata.name.clone().unwrap_or_default();
    let template = &statefulset.data["spec"]["template"];
    let update = revision(&name, template);
    let mut running = Vec::new();
    for ordinal in 0.. {
        match pods.get_opt(&format!("{name}-{ordinal}")).await {
            Ok(Some(pod)) => running.push(pod),
            _ => break,
        }
    }
    let pod_revision = |pod: &DynamicObject| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(REVISION_LABEL))
            .cloned()
            .unwrap_or_default()
    };
    let is_ready = |pod: &DynamicObject| {
        pod.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    let all_ready = running.iter().all(is_ready);
    if all_ready && (running.len() as i64) < want {
        let mut labels = template["metadata"]["labels"].clone();
        labels[REVISION_LABEL] = json!(update);
        let ready = if becomes_ready(template) {
            "True"
        } else {
            "False"
        };
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{}", running.len()), "labels": labels},
            "spec": template["spec"],
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        });
        if let Ok(pod) = serde_json::from_value::<DynamicObject>(pod) {
            let _ = pods.create(&PostParams::default(), &pod).await;
        }
    } else if all_ready {
        let old = running.iter().rposition(|p| pod_revision(p) != update);
        let extra = (running.len() as i64 > want).then(|| running.len() - 1);
        if let Some(index) = extra.or(old) {
            let _ = pods
                .delete(&format!("{name}-{index}"), &Default::default())
                .await;
        }
    }
    let count = |f: &dyn Fn(&DynamicObject) -> bool| running.iter().filter(|p| f(p)).count();
    let ready = count(&is_ready);
    let updated = count(&|p| pod_revision(p) == update);
    let current = if updated == running.len() {
        update.clone()
    } else {
        running
            .iter()
            .map(pod_revision)
            .find(|r| *r != update)
            .unwrap_or_default()
    };
    json!({
        "observedGeneration": statefulset.metadata.generation.unwrap_or(1),
        "replicas": running.len(), "readyReplicas": ready, "availableReplicas": ready,
        "updatedReplicas": updated, "currentRevision": current, "updateRevision": update,
    })
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
            let Ok(list) = claims.list(&ListParams::default()).await else {
                continue;
            };
            let stem = format!("{prefix}-{name}-");
            for claim in list.items {
                let claim = claim.metadata.name.unwrap_or_default();
                let ordinal = claim
                    .strip_prefix(&stem)
                    .and_then(|o| o.parse::<i64>().ok());
                if ordinal.is_some_and(|o| o >= want) {
                    let _ = claims.delete(&claim, &Default::default()).await;
                }
            }
        }
    }
}
