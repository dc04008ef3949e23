//! The Kubernetes runtime against stand-ins for a cluster (no kube-apiserver can run here):
//! `outpost-kube-stand-in` (kube-fake-client's in-memory API server with server-side apply and
//! label selectors, plus controllers that report rollouts), and `tower-test` for the exact
//! requests of a drift pass.

use super::*;
use crate::config::Config;
use crate::pipeline::Agent;
use crate::rollout::Converger;
use crate::testing::{signed_stack, test_config_granting};
use kube::api::PostParams;
use outpost_bundle_format::Digest;
use std::sync::Arc;

const CLAIMS: Kind = kind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims");

const NAMESPACE: &str = "shop";
const IMAGE: &str =
    "r.example/web@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const IMAGE_2: &str =
    "r.example/web@sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// An image whose pods never become ready (the controller stand-in's rule).
fn broken() -> String {
    format!(
        "r.example/web@{}",
        outpost_kube_stand_in::NEVER_READY_DIGEST
    )
}

fn stack(web_image: &str, web_scaling: &str, with_db: bool) -> String {
    let db = if with_db {
        r#"
  - lifecycle: live
    container:
      name: db
      code: {image: "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [5432]
      replicas: 1
      persistentStorage: 1Gi
      permissions: storage"#
    } else {
        ""
    };
    let links = if with_db { "[db]" } else { "[]" };
    format!(
        r#"
name: acme
permissionProfiles: {{execution: {{}}, storage: {{}}}}
resources:{db}
  - lifecycle: live
    container:
      name: web
      code: {{image: "{web_image}"}}
      cpu: {{min: 0.25, desired: 1}}
      memory: 256Mi
      ports: [8080]
      {web_scaling}
      links: {links}
      publicEndpoints: [{{name: site, port: 8080, protocol: http}}]
      healthCheck: {{path: /healthz, port: 8080, method: GET, timeoutSeconds: 2, failureThreshold: 3}}
      permissions: execution
"#
    )
}

struct Harness {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    converger: Converger<Cluster>,
    client: kube::Client,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

async fn harness(extra: &str) -> Harness {
    harness_with(extra, Vec::new()).await
}

async fn harness_with(extra: &str, objects: Vec<Value>) -> Harness {
    harness_on(extra, outpost_kube_stand_in::cluster_with(objects).await).await
}

async fn harness_on(extra: &str, client: kube::Client) -> Harness {
    let (dir, path) = test_config_granting(
        "{execution: {service_account: web-runner, environment: {REGION: eu}}, storage: {service_account: db-runner}}",
        &format!(
            "runtime: kubernetes\nkubernetes: {{namespace: {NAMESPACE}, storage_class: fast, ingress_class: nginx, hosts: {{site: shop.example.com}}{extra}}}\nrollout: {{progress_deadline_seconds: 3}}\n"
        ),
    );
    let agent = Arc::new(Agent::new(Config::load(&path).unwrap()).unwrap());
    let controller = tokio::spawn(outpost_kube_stand_in::run_controllers(
        client.clone(),
        NAMESPACE.into(),
    ));
    Harness {
        _dir: dir,
        converger: Converger::new(agent.rollout_context(), cluster_of(&agent, client.clone())),
        agent,
        client,
        controller,
    }
}

/// The Kubernetes backend of `agent`, on `client`.
fn cluster_of(agent: &Agent, client: kube::Client) -> Cluster {
    let settings = render::Settings::of(&agent.config);
    Cluster::new(agent.rollout_context(), settings, client)
}

impl Harness {
    fn agent(&self) -> &Agent {
        &self.agent
    }

    fn release(&self, yaml: &str, version: &str, sequence: u64) -> Digest {
        let layout = signed_stack(yaml, version, sequence);
        match self
            .agent()
            .ingest(&layout, "test", crate::config::now())
            .unwrap()
        {
            crate::pipeline::Ingested::Accepted { digest, .. } => digest,
            other => panic!("{other:?}"),
        }
    }

    fn current(&self) -> Digest {
        self.agent()
            .store
            .positions()
            .unwrap()
            .current
            .unwrap()
            .digest
    }

    fn api(&self, name: &str) -> Api<DynamicObject> {
        let snapshots = kind(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
            "volumesnapshots",
        );
        let kind = KINDS
            .iter()
            .chain([&CLAIMS, &PODS, &snapshots])
            .find(|k| k.kind == name)
            .unwrap();
        Api::namespaced_with(self.client.clone(), NAMESPACE, &kind.resource())
    }

    async fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let object = self.api(kind).get_opt(name).await.unwrap()?;
        Some(serde_json::to_value(object).unwrap())
    }

    async fn names(&self, kind: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .api(kind)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect();
        names.sort();
        names
    }

    async fn web_image(&self) -> String {
        let web = self.get("Deployment", "acme-web").await.unwrap();
        web["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test]
async fn first_install_applies_everything_in_links_order_and_waits_for_rollout() {
    let h = harness("").await;
    let v1 = h.release(&stack(IMAGE, "replicas: 2", true), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.agent().store.positions().unwrap().converged, Some(v1));

    assert_eq!(h.names("Service").await, ["acme-db", "acme-web"]);
    assert_eq!(h.names("StatefulSet").await, ["acme-db"]);
    assert_eq!(h.names("Deployment").await, ["acme-web"]);
    assert_eq!(h.names("Ingress").await, ["acme-web-site"]);
    assert!(h.names("HorizontalPodAutoscaler").await.is_empty());

    let web = h.get("Deployment", "acme-web").await.unwrap();
    assert_eq!(
        web["metadata"]["managedFields"][0]["manager"],
        FIELD_MANAGER
    );
    assert_eq!(web["metadata"]["managedFields"][0]["operation"], "Apply");
    assert_eq!(web["spec"]["replicas"], 2);
    let pod = &web["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "web-runner");
    let env = &pod["containers"][0]["env"];
    let value = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(value("DB_HOST"), Some(json!("acme-db.shop.svc")));
    assert_eq!(value("REGION"), Some(json!("eu")), "the customer's grant");
    let db = h.get("StatefulSet", "acme-db").await.unwrap();
    assert_eq!(
        db["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "fast"
    );
    assert_eq!(
        db["spec"]["template"]["spec"]["serviceAccountName"],
        "db-runner"
    );

    // Journaled in links order: the database before the web tier that links to it.
    let steps: Vec<String> = h
        .agent()
        .store
        .journal(10)
        .unwrap()
        .into_iter()
        .map(|(step, outcome)| format!("{step}: {outcome}"))
        .collect();
    assert_eq!(
        steps,
        [
            "apply Service/acme-db, StatefulSet/acme-db: done",
            "apply Service/acme-web, Deployment/acme-web, Ingress/acme-web-site: done",
        ]
    );
    let status = h.agent().runtime_view.snapshot();
    assert_eq!(status["phase"], "converged");
    assert_eq!(status["resources"]["web"]["workload"]["available"], 2);
    assert_eq!(
        status["endpoints"],
        json!(["http://shop.example.com/ (Ingress/acme-web-site: no address yet)"])
    );

    // Converged: a drift pass finds nothing to do.
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.agent().store.journal(10).unwrap().len(), 2);
    assert_eq!(
        crate::testing::metric_total(&h.agent().metrics, "outpost_drift_repairs_total"),
        0
    );
}

#[tokio::test]
async fn an_update_rolls_only_what_changed_and_scaling_follows_the_release() {
    let h = harness("").await;
    h.release(&stack(IMAGE, "replicas: 2", true), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    let db_template = h.get("StatefulSet", "acme-db").await.unwrap()["spec"]["template"].clone();

    let v2 = h.release(&stack(IMAGE_2, "replicas: 4", true), "1.1.0", 2);
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.agent().store.positions().unwrap().converged, Some(v2));
    assert_eq!(h.web_image().await, IMAGE_2);
    let web = h.get("Deployment", "acme-web").await.unwrap();
    assert_eq!(web["spec"]["replicas"], 4);
    assert_eq!(web["status"]["availableReplicas"], 4);
    assert_eq!(
        h.get("StatefulSet", "acme-db").await.unwrap()["spec"]["template"],
        db_template,
        "the database did not change, so its pods are not restarted"
    );
}

#[tokio::test]
async fn an_autoscaled_resource_gets_an_autoscaler_that_owns_the_replica_count() {
    let h = harness("").await;
    let scaling =
        "autoScale: {min: 2, desired: 3, max: 6, targetCpuPercent: 70, targetMemoryPercent: 80}";
    h.release(&stack(IMAGE, scaling, false), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();

    let hpa = h.get("HorizontalPodAutoscaler", "acme-web").await.unwrap();
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(hpa["spec"]["maxReplicas"], 6);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    assert_eq!(
        hpa["spec"]["metrics"][1]["resource"]["target"]["averageUtilization"],
        80
    );

    // The autoscaler scales the Deployment; a drift pass must not fight it.
    h.api("Deployment")
        .patch(
            "acme-web",
            &PatchParams::apply("horizontal-pod-autoscaler").force(),
            &Patch::Apply(
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 5}}),
            ),
        )
        .await
        .unwrap();
    h.converger.converge_once().await.unwrap();
    assert_eq!(
        h.get("Deployment", "acme-web").await.unwrap()["spec"]["replicas"],
        5
    );
    assert_eq!(
        crate::testing::metric_total(&h.agent().metrics, "outpost_drift_repairs_total"),
        0
    );
}

#[tokio::test]
async fn a_failed_rollout_rolls_back_to_the_last_good_release() {
    let h = harness("").await;
    let v1 = h.release(&stack(IMAGE, "replicas: 2", false), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();

    let v2 = h.release(&stack(&broken(), "replicas: 2", false), "1.1.0", 2);
    assert_eq!(h.current(), v2);
    h.converger.converge_once().await.unwrap();
    let status = h.agent().runtime_view.snapshot();
    assert!(
        status["last_rollback"]
            .as_str()
            .unwrap()
            .contains("progress deadline exceeded"),
        "{status}"
    );
    assert_eq!(h.current(), v1, "the last good release is current again");
    assert_eq!(
        crate::testing::metric_total(&h.agent().metrics, "outpost_rollbacks_total"),
        1
    );

    // The next pass re-applies the last good release.
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.web_image().await, IMAGE);
    assert_eq!(h.agent().store.positions().unwrap().converged, Some(v1));
}

#[tokio::test]
async fn drift_is_found_by_a_dry_run_and_repaired() {
    let h = harness("").await;
    h.release(&stack(IMAGE, "replicas: 2", false), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();

    // Someone edits the image by hand (read, change, replace) and deletes the Service.
    let deployments = h.api("Deployment");
    let mut edited = deployments.get("acme-web").await.unwrap();
    edited.data["spec"]["template"]["spec"]["containers"][0]["image"] = json!(IMAGE_2);
    deployments
        .replace("acme-web", &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_eq!(h.web_image().await, IMAGE_2);
    h.api("Service")
        .delete("acme-web", &DeleteParams::default())
        .await
        .unwrap();

    h.converger.converge_once().await.unwrap();
    assert_eq!(h.web_image().await, IMAGE);
    assert!(h.get("Service", "acme-web").await.is_some());
    let drift = h.agent().runtime_view.snapshot()["last_drift"].clone();
    assert_eq!(
        drift,
        json!([
            "re-created Service/acme-web",
            "Deployment/acme-web: put back spec.template.spec.containers[0].image"
        ])
    );
    assert_eq!(
        crate::testing::metric_total(&h.agent().metrics, "outpost_drift_repairs_total"),
        2
    );
}

#[tokio::test]
async fn pruning_removes_what_the_release_dropped_but_keeps_claims() {
    let h = harness("").await;
    h.release(&stack(IMAGE, "replicas: 1", true), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.names("PersistentVolumeClaim").await, ["data-acme-db-0"]);

    h.release(&stack(IMAGE, "replicas: 1", false), "2.0.0", 2);
    h.converger.converge_once().await.unwrap();
    assert!(h.names("StatefulSet").await.is_empty());
    assert_eq!(h.names("Service").await, ["acme-web"]);
    assert_eq!(
        h.names("PersistentVolumeClaim").await,
        ["data-acme-db-0"],
        "the data stays unless the customer opted in"
    );
}

#[tokio::test]
async fn claims_are_deleted_with_their_statefulset_only_when_the_customer_opted_in() {
    let h = harness(", delete_volumes: true").await;
    h.release(&stack(IMAGE, "replicas: 1", true), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.names("PersistentVolumeClaim").await, ["data-acme-db-0"]);
    h.release(&stack(IMAGE, "replicas: 1", false), "2.0.0", 2);
    h.converger.converge_once().await.unwrap();
    assert!(h.names("PersistentVolumeClaim").await.is_empty());
}

#[tokio::test]
async fn nothing_outside_the_namespace_or_not_ours_is_touched() {
    let h = harness("").await;
    // An object elsewhere carrying our labels, and one of ours by name that we do not own.
    let labels = json!({MANAGED_BY_LABEL: MANAGED_BY, STACK_LABEL: "acme"});
    let other: Api<DynamicObject> =
        Api::namespaced_with(h.client.clone(), "other", &KINDS[2].resource());
    let object = |name: &str, labels: Value| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {"ports": [{"port": 80}]}}))
        .unwrap()
    };
    other
        .create(&PostParams::default(), &object("acme-old", labels))
        .await
        .unwrap();
    h.api("Service")
        .create(
            &PostParams::default(),
            &object("acme-web", json!({"team": "platform"})),
        )
        .await
        .unwrap();

    h.release(&stack(IMAGE, "replicas: 1", false), "1.0.0", 1);
    let error = h.converger.converge_once().await.unwrap_err().to_string();
    assert!(
        error.contains("refusing to take over Service/acme-web in namespace shop: it exists without the labels of stack acme (app.kubernetes.io/managed-by=outpost, outpost.dev/stack=acme)"),
        "{error}"
    );

    // Another stack's agent in the same namespace: the same tool, not the same stack.
    let theirs = json!({MANAGED_BY_LABEL: MANAGED_BY, STACK_LABEL: "acme-2"});
    h.api("Service")
        .replace(
            "acme-web",
            &PostParams::default(),
            &h.api("Service")
                .get("acme-web")
                .await
                .map(|mut live| {
                    live.metadata.labels = serde_json::from_value(theirs).ok();
                    live
                })
                .unwrap(),
        )
        .await
        .unwrap();
    let error = h.converger.converge_once().await.unwrap_err().to_string();
    assert!(
        error.contains("refusing to take over Service/acme-web in namespace shop: it exists without the labels of stack acme (app.kubernetes.io/managed-by=outpost, outpost.dev/stack=acme)"),
        "{error}"
    );
    assert!(h.names("Deployment").await.is_empty(), "nothing applied");
    assert!(other.get_opt("acme-old").await.unwrap().is_some());

    // A rendered object naming another namespace is refused before any request.
    let cluster = h.converger.backend();
    let escape = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "acme-web", "namespace": "kube-system"}});
    let refused = cluster.admit(&escape).err().unwrap().to_string();
    assert_eq!(
        refused,
        "refusing Service/acme-web in namespace \"kube-system\": the agent writes only to namespace \"shop\""
    );
    let cluster_scoped = json!({"apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding", "metadata": {"name": "x"}});
    assert!(cluster.admit(&cluster_scoped).is_err());
}

#[test]
fn rollout_status_reads_like_kubectl() {
    let deployment = |status: Value| json!({"spec": {"replicas": 2}, "status": status});
    let generation = |generation| Target {
        generation,
        applied_at: None,
    };
    let progressing = |s: RolloutStatus| matches!(s, RolloutStatus::Progressing(_));
    assert!(progressing(rollout_status(
        "Deployment",
        &deployment(json!({"observedGeneration": 1})),
        &generation(2)
    )));
    assert!(progressing(rollout_status(
        "Deployment",
        &deployment(
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2})
        ),
        &generation(2)
    )));
    assert_eq!(
        rollout_status(
            "Deployment",
            &deployment(
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2})
            ),
            &generation(2)
        ),
        RolloutStatus::Done("2 of 2 available".into())
    );
    let timed_out = deployment(json!({"observedGeneration": 2, "updatedReplicas": 1,
        "conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded",
            "message": "timed out", "lastUpdateTime": "2026-11-29T10:00:00Z"}]}));
    assert!(matches!(
        rollout_status("Deployment", &timed_out, &generation(2)),
        RolloutStatus::Failed(m) if m.contains("timed out")
    ));
    // The same condition left over from the rollout our apply replaced is not this one's.
    let after = |at: &str| Target {
        generation: 2,
        applied_at: Some(at.parse().unwrap()),
    };
    assert!(progressing(rollout_status(
        "Deployment",
        &timed_out,
        &after("2026-11-29T10:00:05Z")
    )));
    assert!(matches!(
        rollout_status("Deployment", &timed_out, &after("2026-11-29T09:59:00Z")),
        RolloutStatus::Failed(_)
    ));
    let quota = deployment(json!({"observedGeneration": 2, "updatedReplicas": 1,
        "conditions": [{"type": "ReplicaFailure", "status": "True",
            "message": "exceeded quota: compute"}]}));
    assert_eq!(
        rollout_status("Deployment", &quota, &generation(2)),
        RolloutStatus::Progressing("1 of 2 replicas updated (exceeded quota: compute)".into())
    );
    let statefulset = json!({"spec": {"replicas": 1}, "status": {"observedGeneration": 1,
        "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
        "currentRevision": "db-1", "updateRevision": "db-2"}});
    assert!(progressing(rollout_status(
        "StatefulSet",
        &statefulset,
        &generation(1)
    )));
}

/// The exact requests of a drift pass over an unchanged Service: read it, dry-run apply it
/// (server-side, as `outpost`, forced), list what we own for pruning; and nothing written.
#[tokio::test]
async fn a_drift_pass_asks_the_server_with_a_dry_run_and_writes_nothing_when_nothing_changed() {
    use http::{Request, Response};
    use kube::client::Body;

    let (dir, path) = test_config_granting(
        "{execution: {service_account: web-runner}}",
        &format!("runtime: kubernetes\nkubernetes: {{namespace: {NAMESPACE}}}\n"),
    );
    let agent = Arc::new(Agent::new(Config::load(&path).unwrap()).unwrap());
    let yaml = r#"
name: acme
permissionProfiles: {execution: {}}
resources:
  - lifecycle: live
    container:
      name: jobs
      code: {image: "r.example/jobs@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [9000]
      replicas: 1
      permissions: execution
"#;
    let layout = signed_stack(yaml, "1.0.0", 1);
    agent.ingest(&layout, "test", crate::config::now()).unwrap();
    let release = agent.store.positions().unwrap().current.unwrap();
    let objects = render::render(
        &agent.config,
        &release.stack().unwrap(),
        &release.digest.to_string(),
    )
    .unwrap();

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let line = format!(
                "{} {} {}",
                request.method(),
                request.uri(),
                request
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap_or_default().to_string())
                    .unwrap_or_default()
            );
            let uri = request.uri().path().to_string();
            let body = if request.method() == "GET" && uri.ends_with("/acme-jobs") {
                let kind = if uri.contains("/services/") { 0 } else { 1 };
                let mut live = objects[kind].clone();
                live["metadata"]["generation"] = json!(1);
                live["metadata"]["resourceVersion"] = json!("7");
                live.to_string()
            } else if request.method() == "PATCH" {
                let bytes = http_body_util::BodyExt::collect(request.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let mut applied: Value = serde_json::from_slice(&bytes).unwrap();
                applied["metadata"]["resourceVersion"] = json!("7");
                applied.to_string()
            } else {
                json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}).to_string()
            };
            seen.push(line);
            respond.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(body.into_bytes()))
                    .unwrap(),
            );
        }
        seen
    });

    let cluster = cluster_of(&agent, kube::Client::new(service, NAMESPACE));
    let stack = release.stack().unwrap();
    let repairs = cluster.converge(&release, &stack, false).await.unwrap();
    assert!(repairs.is_empty(), "{repairs:?}");
    drop(cluster);
    let seen = server.await.unwrap();
    let apply = "&dryRun=All&force=true&fieldManager=outpost application/apply-patch+yaml";
    let owned =
        "labelSelector=app.kubernetes.io%2Fmanaged-by%3Doutpost%2Coutpost.dev%2Fstack%3Dacme";
    assert_eq!(
        seen,
        [
            "GET /api/v1/namespaces/shop/services/acme-jobs ".to_string(),
            format!("PATCH /api/v1/namespaces/shop/services/acme-jobs?{apply}"),
            "GET /apis/apps/v1/namespaces/shop/deployments/acme-jobs ".to_string(),
            format!("PATCH /apis/apps/v1/namespaces/shop/deployments/acme-jobs?{apply}"),
            format!("GET /apis/networking.k8s.io/v1/namespaces/shop/ingresses?&{owned} "),
            format!("GET /apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers?&{owned} "),
            format!("GET /api/v1/namespaces/shop/services?&{owned} "),
            format!("GET /apis/apps/v1/namespaces/shop/deployments?&{owned} "),
            format!("GET /apis/apps/v1/namespaces/shop/statefulsets?&{owned} "),
            "GET /apis/apps/v1/namespaces/shop/deployments/acme-jobs ".to_string(),
        ]
    );
    drop(dir);
}

#[tokio::test]
async fn an_object_already_being_deleted_is_not_pruned_again() {
    // Ours, no longer wanted, and going: held by a finalizer as foreground deletion holds an
    // object until its pods are gone.
    let going = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "acme-old", "namespace": NAMESPACE,
            "finalizers": ["example.com/hold"], "deletionTimestamp": "2026-01-01T00:00:00Z",
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, STACK_LABEL: "acme"}},
        "spec": {"ports": [{"port": 80}]},
    });
    let h = harness_with("", vec![going]).await;
    h.release(&stack(IMAGE, "replicas: 1", false), "1.0.0", 1);
    for _ in 0..3 {
        h.converger.converge_once().await.unwrap();
    }
    let steps = h.agent().store.journal(10).unwrap();
    assert!(
        steps.iter().all(|(step, _)| !step.starts_with("prune")),
        "{steps:?}"
    );
    assert!(h.get("Service", "acme-old").await.is_some());
}

#[tokio::test]
async fn a_resource_that_becomes_autoscaled_keeps_its_replicas_for_the_autoscaler() {
    let h = harness("").await;
    h.release(&stack(IMAGE, "replicas: 4", false), "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    let scaling = "autoScale: {min: 2, desired: 3, max: 6, targetCpuPercent: 70}";
    h.release(&stack(IMAGE, scaling, false), "1.1.0", 2);
    h.converger.converge_once().await.unwrap();
    let web = h.get("Deployment", "acme-web").await.unwrap();
    assert_eq!(
        web["spec"]["replicas"], 4,
        "not dropped to the default of 1"
    );
    let managers: Vec<&str> = web["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["fieldsV1"].pointer("/f:spec/f:replicas").is_some())
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, ["outpost-handover"]);
    assert!(h.get("HorizontalPodAutoscaler", "acme-web").await.is_some());
}

#[tokio::test]
async fn a_statefulset_stuck_on_a_pod_that_never_became_ready_is_rolled_back() {
    let h = harness("").await;
    let good = stack(IMAGE, "replicas: 1", true);
    let v1 = h.release(&good, "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    let db = DB;
    let broken = good.replace(
        db,
        &format!("r.example/db@{}", outpost_kube_stand_in::NEVER_READY_DIGEST),
    );
    h.release(&broken, "1.1.0", 2);
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.current(), v1, "rolled back");

    // The StatefulSet controller would wait forever on the unready pod of 1.1.0; the agent
    // deletes it so that 1.0.0's pod comes back, on the same claim.
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.agent().store.positions().unwrap().converged, Some(v1));
    let pod = h.get("Pod", "acme-db-0").await.unwrap();
    let db_set = h.get("StatefulSet", "acme-db").await.unwrap();
    assert_eq!(
        pod["metadata"]["labels"]["controller-revision-hash"],
        db_set["status"]["updateRevision"]
    );
    assert_eq!(pod["spec"]["containers"][0]["image"], db);
    assert_eq!(h.names("PersistentVolumeClaim").await, ["data-acme-db-0"]);
}

const DB: &str =
    "r.example/db@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// 1.0.0 runs; then 1.1.0 changes db's image, declared irreversible when `irreversible`,
/// and never becomes ready. Returns both digests.
async fn migrate_and_fail(h: &Harness, irreversible: bool) -> (Digest, Digest) {
    let good = stack(IMAGE, "replicas: 1", true);
    let v1 = h.release(&good, "1.0.0", 1);
    h.converger.converge_once().await.unwrap();
    let broken = good.replace(
        DB,
        &format!("r.example/db@{}", outpost_kube_stand_in::NEVER_READY_DIGEST),
    );
    let declared: &[&str] = if irreversible { &["db"] } else { &[] };
    let layout = crate::testing::signed_stack_irreversible(&broken, "1.1.0", 2, declared);
    let v2 = match h
        .agent()
        .ingest(&layout, "test", crate::config::now())
        .unwrap()
    {
        crate::pipeline::Ingested::Accepted { digest, .. } => digest,
        other => panic!("{other:?}"),
    };
    h.converger.converge_once().await.unwrap();
    (v1, v2)
}

#[tokio::test]
async fn a_failed_irreversible_release_restores_the_claims_from_their_snapshots() {
    let h = harness(", volume_snapshot_class: csi-snapclass").await;
    let (v1, v2) = migrate_and_fail(&h, true).await;
    assert_eq!(h.current(), v1, "rolled back");

    // The snapshot it took of the claim before changing db, exactly.
    let name = format!("data-acme-db-0-{}", &v2.hex()[..12]);
    let snapshot = h.get("VolumeSnapshot", &name).await.unwrap();
    assert_eq!(
        snapshot["spec"],
        json!({"source": {"persistentVolumeClaimName": "data-acme-db-0"},
            "volumeSnapshotClassName": "csi-snapclass"})
    );
    assert_eq!(snapshot["metadata"]["labels"]["outpost.dev/resource"], "db");
    let recorded = h
        .agent()
        .store
        .snapshot_before(&v2, "db", 0)
        .unwrap()
        .unwrap();
    assert_eq!(
        (recorded.location.as_str(), recorded.bytes),
        (name.as_str(), Some(1 << 30))
    );
    assert_eq!(h.agent().store.pending_restores().unwrap(), [recorded]);

    // Rolling back: the claim is made anew from the snapshot before 1.0.0's pod starts.
    h.converger.converge_once().await.unwrap();
    assert_eq!(h.agent().store.positions().unwrap().converged, Some(v1));
    let claim = h
        .get("PersistentVolumeClaim", "data-acme-db-0")
        .await
        .unwrap();
    assert_eq!(
        claim["spec"]["dataSource"],
        json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name})
    );
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert!(h.agent().store.pending_restores().unwrap().is_empty());
    let pod = h.get("Pod", "acme-db-0").await.unwrap();
    assert_eq!(pod["spec"]["containers"][0]["image"], DB);
    // Kept: retention keeps the newest of each replica.
    assert!(h.get("VolumeSnapshot", &name).await.is_some());
}

#[tokio::test]
async fn without_the_snapshot_api_only_an_irreversible_release_is_refused() {
    // A change that is not declared irreversible goes ahead, saying its claims are not copied.
    let h = harness_on(
        "",
        outpost_kube_stand_in::cluster_of(Vec::new(), false).await,
    )
    .await;
    let (v1, _) = migrate_and_fail(&h, false).await;
    assert_eq!(
        h.current(),
        v1,
        "rolled back for its unready pod, not for the snapshot"
    );
    let history = h.agent().store.history(20).unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.message.contains("not snapshotted")),
        "{history:#?}"
    );

    // An irreversible one cannot keep its promise: refused, saying what to install.
    let h = harness_on(
        "",
        outpost_kube_stand_in::cluster_of(Vec::new(), false).await,
    )
    .await;
    migrate_and_fail(&h, true).await;
    let view = h.agent().runtime_view.snapshot();
    let last_rollback = view["last_rollback"].as_str().unwrap_or_default();
    assert!(
        last_rollback.contains("snapshot.storage.k8s.io/v1 VolumeSnapshots are not served")
            && last_rollback.contains("snapshots.keep: 0"),
        "{last_rollback}"
    );
    assert!(h.names("PersistentVolumeClaim").await == ["data-acme-db-0"]);
}

#[tokio::test]
async fn an_object_still_being_deleted_is_waited_for_before_it_is_applied_again() {
    // The release wants acme-web back while a prune's foreground deletion still holds it.
    let going = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "acme-web", "namespace": NAMESPACE,
            "finalizers": ["foregroundDeletion"], "deletionTimestamp": "2026-01-01T00:00:00Z",
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, STACK_LABEL: "acme"}},
        "spec": {"ports": [{"port": 80}]},
    });
    let h = harness_with("", vec![going]).await;
    h.release(&stack(IMAGE, "replicas: 1", false), "1.0.0", 1);
    let services = h.api("Service");
    let finish = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The garbage collector finishes: the finalizer goes, and with it the object.
        services
            .patch(
                "acme-web",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
    };
    let (converged, ()) = tokio::join!(h.converger.converge_once(), finish);
    converged.unwrap();
    let web = h.get("Service", "acme-web").await.unwrap();
    assert!(web["metadata"]["deletionTimestamp"].is_null(), "{web}");
    assert_eq!(
        web["spec"]["ports"][0]["port"], 8080,
        "the release's Service"
    );
}

#[test]
fn api_errors_say_why_and_outages_are_not_blamed_on_the_release() {
    let api = |code: u16, reason: &str| {
        kube::Error::Api(Box::new(
            serde_json::from_value(json!({"code": code, "reason": reason,
                "message": "services \"acme-web\" is forbidden: User cannot patch"}))
            .unwrap(),
        ))
    };
    let refused = kube_error("applying Service/acme-web".into(), api(403, "Forbidden"));
    assert_eq!(
        refused.to_string(),
        "applying Service/acme-web: 403 Forbidden: services \"acme-web\" is forbidden: User cannot patch"
    );
    assert!(!refused.unavailable);
    assert!(kube_error("x".into(), api(503, "ServiceUnavailable")).unavailable);
    assert!(kube_error("x".into(), api(429, "TooManyRequests")).unavailable);
    let down = kube::Error::Service(Box::new(std::io::Error::other("connection refused")));
    assert!(kube_error("x".into(), down).unavailable);
}
