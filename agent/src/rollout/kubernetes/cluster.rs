//! The Kubernetes runtime: a release as objects in the customer's one namespace. The cluster
//! runs the replicas; the agent server-side-applies what `render` maps the release to (field
//! manager `outpost`), waits for the workloads' rollout status (resources together, each after
//! the resources it links), prunes the
//! objects it owns and no longer wants, and on a converged release repairs drift found by a
//! server-side dry-run apply.
//!
//! It never leaves its namespace: every object is checked against it before the first request,
//! and every request goes through a namespaced API (the agent's Role grants nothing else). An
//! object of the same name that is not this stack's is never taken over. Pods are only ever
//! deleted, to free a StatefulSet stuck on one (forced rollback).

use super::render::{self, MANAGED_BY, MANAGED_BY_LABEL, RESOURCE_LABEL, STACK_LABEL, Settings};
use crate::rollout::{Backend, Context, Repair, RolloutError, event, journaled};
use crate::state::Release;
use crate::status::{RuntimeView, WorkloadStatus};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use outpost_bundle_format::stack::Stack;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[path = "snapshots.rs"]
mod snapshots;

pub const FIELD_MANAGER: &str = "outpost";
/// Holds a replica count the agent gave up to an autoscaler.
const HANDOVER_MANAGER: &str = "outpost-handover";
const POLL_EVERY: Duration = Duration::from_millis(500);

/// A kind the runtime writes.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    group: &'static str,
    version: &'static str,
    pub kind: &'static str,
    plural: &'static str,
}

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn is_workload(&self) -> bool {
        matches!(self.kind, "Deployment" | "StatefulSet")
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
    }
}

/// Pods are never written, only deleted when a StatefulSet is stuck on one.
const PODS: Kind = kind("", "v1", "Pod", "pods");

/// Every kind the runtime writes, in prune order: what routes to a workload goes first.
pub const KINDS: [Kind; 5] = [
    kind("networking.k8s.io", "v1", "Ingress", "ingresses"),
    kind(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
    ),
    kind("", "v1", "Service", "services"),
    kind("apps", "v1", "Deployment", "deployments"),
    kind("apps", "v1", "StatefulSet", "statefulsets"),
];

/// One rendered object, admitted: a kind we write, in our namespace.
struct Admitted<'a> {
    kind: &'static Kind,
    name: &'a str,
    stack: &'a str,
    resource: &'a str,
    object: &'a Value,
}

impl Admitted<'_> {
    fn id(&self) -> String {
        format!("{}/{}", self.kind.kind, self.name)
    }
}

/// Runs releases on a Kubernetes cluster, in one namespace.
pub struct Cluster {
    context: Context,
    settings: Settings,
    client: kube::Client,
    namespace: String,
}

impl Cluster {
    pub fn new(context: Context, settings: Settings, client: kube::Client) -> Cluster {
        let namespace = settings.kubernetes.namespace.clone();
        Cluster {
            context,
            settings,
            client,
            namespace,
        }
    }

    /// A client from `kubernetes.kubeconfig`, else in-cluster or `$KUBECONFIG` /
    /// `~/.kube/config`.
    pub async fn connect(context: Context, settings: Settings) -> anyhow::Result<Cluster> {
        let config = match &settings.kubernetes.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    anyhow::anyhow!("kubernetes.kubeconfig {}: {e}", path.display())
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("kubernetes.kubeconfig {}: {e}", path.display())
                    })?
            }
            None => kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!(
                    "runtime kubernetes: no cluster to talk to ({e}); run in a pod with a ServiceAccount or set kubernetes.kubeconfig"
                )
            })?,
        };
        let client = kube::Client::try_from(config)
            .map_err(|e| anyhow::anyhow!("runtime kubernetes: {e}"))?;
        Ok(Cluster::new(context, settings, client))
    }

    fn view(&self) -> &RuntimeView {
        &self.context.status
    }

    fn api(&self, kind: &Kind) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &kind.resource())
    }

    /// Refuses, before anything is applied, an object outside our namespace or of a kind the
    /// runtime does not write.
    fn admit<'a>(&self, object: &'a Value) -> Result<Admitted<'a>, RolloutError> {
        let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
        let (api_version, kind_name) = (
            text("/apiVersion").unwrap_or_default(),
            text("/kind").unwrap_or_default(),
        );
        let name = text("/metadata/name").unwrap_or_default();
        let kind = KINDS
            .iter()
            .find(|k| k.kind == kind_name && k.api_version() == api_version)
            .ok_or_else(|| {
                RolloutError::new(format!(
                    "refusing {api_version} {kind_name}/{name}: not a kind the agent writes"
                ))
            })?;
        let namespace = text("/metadata/namespace").unwrap_or_default();
        if namespace != self.namespace {
            return Err(RolloutError::new(format!(
                "refusing {kind_name}/{name} in namespace {namespace:?}: the agent writes only to namespace {:?}",
                self.namespace
            )));
        }
        let label = |key: &str| text(&format!("/metadata/labels/{}", key.replace('/', "~1")));
        Ok(Admitted {
            kind,
            name,
            stack: label(STACK_LABEL).unwrap_or_default(),
            resource: label(RESOURCE_LABEL).unwrap_or_default(),
            object,
        })
    }

    /// The live object, if any, refused unless it is this stack's.
    async fn live(&self, object: &Admitted<'_>) -> Result<Option<DynamicObject>, RolloutError> {
        let live = self
            .api(object.kind)
            .get_opt(object.name)
            .await
            .map_err(|e| kube_error(format!("reading {}", object.id()), e))?;
        if let Some(live) = &live {
            let label = |key: &str| {
                live.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(key))
                    .map(String::as_str)
            };
            if label(MANAGED_BY_LABEL) != Some(MANAGED_BY)
                || label(STACK_LABEL) != Some(object.stack)
            {
                return Err(RolloutError::new(format!(
                    "refusing to take over {} in namespace {}: it exists without the labels of stack {stack} ({MANAGED_BY_LABEL}={MANAGED_BY}, {STACK_LABEL}={stack})",
                    object.id(),
                    self.namespace,
                    stack = object.stack
                )));
            }
        }
        Ok(live)
    }

    /// Server-side apply, taking over fields another manager changed.
    async fn apply(
        &self,
        object: &Admitted<'_>,
        dry_run: bool,
    ) -> Result<DynamicObject, RolloutError> {
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.dry_run = dry_run;
        self.api(object.kind)
            .patch(object.name, &params, &Patch::Apply(object.object))
            .await
            .map_err(|e| kube_error(format!("applying {}", object.id()), e))
    }

    /// A rollout: each resource's objects applied and its workload rolled out, resources at
    /// once unless one links another (then after it, as `links` order says); then what is no
    /// longer wanted is pruned.
    async fn roll_out(
        &self,
        release: &Release,
        stack: &Stack,
        objects: &[Admitted<'_>],
    ) -> Result<(), RolloutError> {
        let deadline = Duration::from_secs(self.context.rollout.progress_deadline_seconds);
        self.drop_stale_restores(objects)?;
        let mut groups: Vec<Vec<&Admitted>> = Vec::new();
        for object in objects {
            match groups.last_mut() {
                Some(group) if group[0].resource == object.resource => group.push(object),
                _ => groups.push(vec![object]),
            }
        }
        let waits: Vec<Vec<usize>> = groups
            .iter()
            .map(|group| {
                let links = stack
                    .resource(group[0].resource)
                    .map(|r| r.container.links.as_slice())
                    .unwrap_or_default();
                groups
                    .iter()
                    .enumerate()
                    .filter(|(_, other)| links.iter().any(|l| l == other[0].resource))
                    .map(|(position, _)| position)
                    .collect()
            })
            .collect();
        let groups = &groups;
        super::super::steps::after_links(&waits, |position| async move {
            let group = &groups[position];
            let resource = group[0].resource;
            let step = format!(
                "apply {}",
                group.iter().map(|o| o.id()).collect::<Vec<_>>().join(", ")
            );
            self.view().resource_step(resource, &step);
            let outcome = journaled(
                &self.context,
                "kubernetes",
                &release.digest,
                &step,
                self.apply_and_wait(release, stack, group, deadline),
            )
            .await;
            match &outcome {
                Ok(status) => self
                    .view()
                    .resource_step(resource, &format!("{step}: done ({status})")),
                Err(e) => self
                    .view()
                    .resource_step(resource, &format!("{step}: failed: {e}")),
            }
            outcome.map(drop)
        })
        .await?;
        // The release runs; what could not be pruned is retried by the next drift pass.
        if let Err(e) = self.prune(release, objects).await {
            event(
                &self.context.store,
                "prune-failed",
                Some(&release.digest),
                &e.to_string(),
            );
        }
        self.prune_snapshots().await;
        Ok(())
    }

    /// Applies one resource's objects (its autoscaler with its workload), then waits for the
    /// workload's rollout. A StatefulSet's claims are snapshotted first when the release
    /// changes what runs on them, and restored when a rollback queued it.
    async fn apply_and_wait(
        &self,
        release: &Release,
        stack: &Stack,
        group: &[&Admitted<'_>],
        deadline: Duration,
    ) -> Result<String, RolloutError> {
        let until = Instant::now() + deadline;
        let mut workload = None;
        for object in group {
            let mut live = self.live(object).await?;
            // Still going from a prune: applied now, it would vanish under the rollout.
            while live
                .as_ref()
                .is_some_and(|l| l.metadata.deletion_timestamp.is_some())
            {
                if Instant::now() >= until {
                    return Err(RolloutError::new(format!(
                        "{} is still being deleted after the progress deadline",
                        object.id()
                    )));
                }
                tokio::time::sleep(POLL_EVERY).await;
                live = self.live(object).await?;
            }
            if object.kind.kind == "StatefulSet" {
                self.snapshot_claims(release, stack, object, live.as_ref(), until)
                    .await?;
                self.restore_claims(object, live.as_ref(), until).await?;
            }
            if let Some(live) = &live {
                self.hand_over_replicas(object, live).await?;
            }
            let applied = self.apply(object, false).await?;
            if object.kind.is_workload() {
                workload = Some((object, Target::of(&applied)));
            }
        }
        match workload {
            Some((object, target)) => self.wait_rolled_out(object, &target, until).await,
            None => Ok("applied".into()),
        }
    }

    /// A workload that becomes autoscaled no longer carries a replica count. Applied as is,
    /// the API server would drop the count the agent owned and fall back to 1 replica; so the
    /// live count is first handed to another field manager, as Kubernetes advises for moving
    /// a field to an autoscaler, and the autoscaler takes it from there.
    async fn hand_over_replicas(
        &self,
        object: &Admitted<'_>,
        live: &DynamicObject,
    ) -> Result<(), RolloutError> {
        if !object.kind.is_workload() || object.object.pointer("/spec/replicas").is_some() {
            return Ok(());
        }
        let owned = live.metadata.managed_fields.iter().flatten().any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry
                    .fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        });
        let Some(replicas) = live.data.pointer("/spec/replicas").filter(|_| owned) else {
            return Ok(());
        };
        let handover = json!({
            "apiVersion": object.kind.api_version(),
            "kind": object.kind.kind,
            "metadata": {"name": object.name, "namespace": self.namespace},
            "spec": {"replicas": replicas},
        });
        self.api(object.kind)
            .patch(
                object.name,
                &PatchParams::apply(HANDOVER_MANAGER).force(),
                &Patch::Apply(&handover),
            )
            .await
            .map_err(|e| {
                kube_error(
                    format!(
                        "handing the replica count of {} to its autoscaler",
                        object.id()
                    ),
                    e,
                )
            })?;
        Ok(())
    }

    /// Waits until the workload's controller reports the `target` generation rolled out and
    /// available, like `kubectl rollout status`.
    async fn wait_rolled_out(
        &self,
        object: &Admitted<'_>,
        target: &Target,
        until: Instant,
    ) -> Result<String, RolloutError> {
        loop {
            let last = match self.live(object).await? {
                Some(live) => {
                    let live = serde_json::to_value(&live)
                        .map_err(|e| RolloutError::new(format!("{}: {e}", object.id())))?;
                    match rollout_status(object.kind.kind, &live, target) {
                        RolloutStatus::Done(status) => return Ok(status),
                        RolloutStatus::Failed(why) => {
                            return Err(RolloutError::new(format!("{}: {why}", object.id())));
                        }
                        RolloutStatus::Progressing(why) => {
                            // Only once the controller has seen our template is its
                            // updateRevision the one pods must come back at.
                            let observed = live["status"]["observedGeneration"].as_i64();
                            if object.kind.kind == "StatefulSet"
                                && observed >= Some(target.generation)
                            {
                                self.replace_stuck_pods(object, &live).await?;
                            }
                            why
                        }
                    }
                }
                None => "deleted while rolling out".into(),
            };
            if Instant::now() >= until {
                return Err(RolloutError::new(format!(
                    "{}: not rolled out within the progress deadline ({}s): {last}",
                    object.id(),
                    self.context.rollout.progress_deadline_seconds
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The StatefulSet controller never replaces a pod that did not become ready, even once
    /// the template is changed back (what Kubernetes calls a forced rollback): a pod of
    /// another revision that is not ready is deleted, so the controller recreates it from the
    /// current template. Its claim, and so its data, stays.
    async fn replace_stuck_pods(
        &self,
        object: &Admitted<'_>,
        live: &Value,
    ) -> Result<(), RolloutError> {
        let Some(update) = live
            .pointer("/status/updateRevision")
            .and_then(Value::as_str)
        else {
            return Ok(());
        };
        let selector = format!(
            "{STACK_LABEL}={},{RESOURCE_LABEL}={}",
            object.stack, object.resource
        );
        let api = self.api(&PODS);
        let pods = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| kube_error(format!("listing the pods of {}", object.id()), e))?;
        for pod in pods.items {
            let revision = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("controller-revision-hash"));
            let ready = pod.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if revision.map(String::as_str) == Some(update)
                || ready
                || pod.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            api.delete(&name, &DeleteParams::default())
                .await
                .map_err(|e| kube_error(format!("deleting stuck pod {name}"), e))?;
            let note = format!(
                "{}: deleted pod {name}, stuck unready at an older revision, so it is recreated from the current template",
                object.id()
            );
            self.view().update(|s| s.note = Some(note));
        }
        Ok(())
    }

    /// Deletes the stack's objects (by our labels, in our namespace) that the release no
    /// longer has. A StatefulSet's claims follow its retention policy (see `render`): kept
    /// unless the customer opted in.
    async fn prune(
        &self,
        release: &Release,
        wanted: &[Admitted<'_>],
    ) -> Result<Vec<Repair>, RolloutError> {
        let wanted: BTreeSet<(&str, &str)> = wanted.iter().map(|o| (o.kind.kind, o.name)).collect();
        let owned = ListParams::default().labels(&format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{STACK_LABEL}={}",
            release.name
        ));
        let mut pruned = Vec::new();
        for kind in &KINDS {
            let api = self.api(kind);
            let list = api
                .list(&owned)
                .await
                .map_err(|e| kube_error(format!("listing {}s", kind.kind), e))?;
            for item in list.items {
                let name = item.metadata.name.clone().unwrap_or_default();
                // Already going (foreground deletion waits for its pods): pruned before.
                if wanted.contains(&(kind.kind, name.as_str()))
                    || item.metadata.deletion_timestamp.is_some()
                {
                    continue;
                }
                let id = format!("{}/{name}", kind.kind);
                let step = format!("prune {id}");
                journaled(&self.context, "kubernetes", &release.digest, &step, async {
                    api.delete(&name, &DeleteParams::foreground())
                        .await
                        .map(|_| ())
                        .map_err(|e| kube_error(format!("pruning {id}"), e))
                })
                .await?;
                let resource = item
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(RESOURCE_LABEL))
                    .cloned()
                    .unwrap_or_default();
                pruned.push(Repair {
                    resource,
                    what: step,
                });
            }
        }
        Ok(pruned)
    }

    /// A drift pass: objects missing are re-created, fields changed by someone else are put
    /// back (found by a dry-run apply against what is live), objects no longer wanted pruned.
    async fn repair(
        &self,
        release: &Release,
        objects: &[Admitted<'_>],
    ) -> Result<Vec<Repair>, RolloutError> {
        let mut repairs = Vec::new();
        for object in objects {
            let repair = |what: String| Repair {
                resource: object.resource.to_string(),
                what,
            };
            let Some(live) = self.live(object).await? else {
                self.apply(object, false).await?;
                repairs.push(repair(format!("re-created {}", object.id())));
                continue;
            };
            let would_be = self.apply(object, true).await?;
            let changed = changed_fields(&owned_fields(&live), &owned_fields(&would_be));
            if !changed.is_empty() {
                self.apply(object, false).await?;
                repairs.push(repair(format!(
                    "{}: put back {}",
                    object.id(),
                    changed.join(", ")
                )));
            }
        }
        repairs.extend(self.prune(release, objects).await?);
        Ok(repairs)
    }

    /// For `status`: each workload's replica counts, and where each public endpoint is
    /// reachable (the Ingress host, the load balancer's address once the cluster gave one).
    async fn show_status(&self, objects: &[Admitted<'_>]) {
        let mut endpoints = Vec::new();
        for object in objects {
            let is_endpoint = object.kind.kind == "Ingress"
                || object.object.pointer("/spec/type") == Some(&json!("LoadBalancer"));
            if !object.kind.is_workload() && !is_endpoint {
                continue;
            }
            let Ok(Some(live)) = self.api(object.kind).get_opt(object.name).await else {
                continue;
            };
            let status = live.data.get("status").cloned().unwrap_or(Value::Null);
            if is_endpoint {
                let addresses: Vec<&str> = status["loadBalancer"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["ip"].as_str().or(a["hostname"].as_str()))
                    .collect();
                let at = if addresses.is_empty() {
                    "no address yet".to_string()
                } else {
                    addresses.join(", ")
                };
                let to = match object
                    .object
                    .pointer("/spec/rules/0/host")
                    .and_then(Value::as_str)
                {
                    Some(host) => format!("http://{host}/"),
                    None => format!(
                        "tcp port {}",
                        object
                            .object
                            .pointer("/spec/ports/0/port")
                            .unwrap_or(&Value::Null)
                    ),
                };
                endpoints.push(format!("{to} ({}: {at})", object.id()));
                continue;
            }
            let count = |key: &str| status.get(key).and_then(Value::as_i64).unwrap_or(0);
            let workload = WorkloadStatus {
                object: object.id(),
                replicas: count("replicas"),
                ready: count("readyReplicas"),
                updated: count("updatedReplicas"),
                available: count("availableReplicas"),
            };
            // What the workload wants: its spec's count (an autoscaler's, when it owns it).
            let desired = live
                .data
                .pointer("/spec/replicas")
                .and_then(Value::as_u64)
                .or_else(|| u64::try_from(workload.replicas).ok());
            self.view().update(|s| {
                let resource = s.resources.entry(object.resource.to_string()).or_default();
                resource.ready = u64::try_from(workload.ready).ok();
                resource.workload = Some(workload);
                resource.desired = desired;
            });
        }
        self.view().update(|s| s.endpoints = endpoints);
    }
}

impl Backend for Cluster {
    async fn converge(
        &self,
        release: &Release,
        stack: &Stack,
        fresh: bool,
    ) -> Result<Vec<Repair>, RolloutError> {
        let rendered = render::render_with(&self.settings, stack, &release.digest.to_string())
            .map_err(|e| RolloutError::new(e.to_string()))?;
        let objects = rendered
            .iter()
            .map(|o| self.admit(o))
            .collect::<Result<Vec<_>, _>>()?;
        let outcome = if fresh {
            self.roll_out(release, stack, &objects)
                .await
                .map(|()| Vec::new())
        } else {
            self.repair(release, &objects).await
        };
        self.show_status(&objects).await;
        outcome
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

/// A failed API call, in one line: the server's own reason for a refusal; unreachable, timed
/// out, overloaded or failing servers are marked unavailable (retried, never rolled back for).
fn kube_error(what: String, e: kube::Error) -> RolloutError {
    match e {
        kube::Error::Api(status) => {
            let message = format!(
                "{what}: {} {}: {}",
                status.code, status.reason, status.message
            );
            if status.code >= 500 || status.code == 429 {
                RolloutError::unavailable(message)
            } else {
                RolloutError::new(message)
            }
        }
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            RolloutError::unavailable(format!("{what}: {e}"))
        }
        e => RolloutError::new(format!("{what}: {e}")),
    }
}

/// The rollout a workload's status is read for: the generation our apply produced, and when
/// the API server recorded our apply (its clock, from the object's managed fields).
#[derive(Debug, Default)]
pub struct Target {
    pub generation: i64,
    pub applied_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Target {
    fn of(applied: &DynamicObject) -> Target {
        let fields = serde_json::to_value(&applied.metadata.managed_fields).unwrap_or_default();
        let applied_at = fields
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["manager"] == FIELD_MANAGER && entry["operation"] == "Apply")
            .find_map(|entry| entry["time"].as_str().and_then(server_time));
        Target {
            generation: applied.metadata.generation.unwrap_or(0),
            applied_at,
        }
    }
}

fn server_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// What a workload's status says of the rollout of `generation`.
#[derive(Debug, PartialEq)]
pub enum RolloutStatus {
    Done(String),
    Progressing(String),
    Failed(String),
}

/// Reads a Deployment's or StatefulSet's status the way `kubectl rollout status` does.
pub fn rollout_status(kind: &str, live: &Value, target: &Target) -> RolloutStatus {
    let generation = target.generation;
    let status = &live["status"];
    let count = |key: &str| status.get(key).and_then(Value::as_i64).unwrap_or(0);
    let observed = count("observedGeneration");
    if observed < generation {
        return RolloutStatus::Progressing(format!(
            "waiting for the controller to observe generation {generation} (at {observed})"
        ));
    }
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    // A deadline exceeded before our apply (a rollout this one replaces) is not this one's:
    // the controller keeps that condition until the new rollout shows progress.
    let stale = |c: &Value| {
        let updated = c["lastUpdateTime"].as_str().and_then(server_time);
        matches!((updated, target.applied_at), (Some(updated), Some(at)) if updated < at)
    };
    if let Some(stuck) = conditions.iter().find(|c| {
        c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded" && !stale(c)
    }) {
        return RolloutStatus::Failed(format!(
            "progress deadline exceeded: {}",
            stuck["message"].as_str().unwrap_or("no message")
        ));
    }
    let failure = conditions
        .iter()
        .find(|c| c["type"] == "ReplicaFailure" && c["status"] == "True")
        .map(|c| format!(" ({})", c["message"].as_str().unwrap_or("replica failure")))
        .unwrap_or_default();
    let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
    let (updated, replicas, available) = (
        count("updatedReplicas"),
        count("replicas"),
        count("availableReplicas"),
    );
    if updated < want {
        return RolloutStatus::Progressing(format!(
            "{updated} of {want} replicas updated{failure}"
        ));
    }
    if kind == "Deployment" && replicas > updated {
        return RolloutStatus::Progressing(format!(
            "{} old replicas pending termination",
            replicas - updated
        ));
    }
    if kind == "StatefulSet" {
        let (current, update) = (&status["currentRevision"], &status["updateRevision"]);
        if count("readyReplicas") < want {
            return RolloutStatus::Progressing(format!(
                "{} of {want} replicas ready",
                count("readyReplicas")
            ));
        }
        if !update.is_null() && current != update {
            return RolloutStatus::Progressing(format!(
                "waiting for revision {} to replace {}",
                update.as_str().unwrap_or("?"),
                current.as_str().unwrap_or("?")
            ));
        }
    }
    if available < want {
        return RolloutStatus::Progressing(format!(
            "{available} of {want} replicas available{failure}"
        ));
    }
    RolloutStatus::Done(format!("{available} of {want} available"))
}

/// The parts of an object the agent sets: labels, annotations and spec.
fn owned_fields(object: &impl serde::Serialize) -> Value {
    let object = serde_json::to_value(object).unwrap_or(Value::Null);
    json!({
        "labels": object["metadata"]["labels"],
        "annotations": object["metadata"]["annotations"],
        "spec": object["spec"],
    })
}

/// Paths of the leaves that differ between `live` and `wanted`, at most ten.
fn changed_fields(live: &Value, wanted: &Value) -> Vec<String> {
    fn walk(path: &str, live: &Value, wanted: &Value, out: &mut Vec<String>) {
        match (live, wanted) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let null = Value::Null;
                    walk(
                        &format!("{path}.{key}"),
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    walk(&format!("{path}[{i}]"), x, y, out);
                }
            }
            (a, b) if a != b => out.push(path.trim_start_matches('.').to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", live, wanted, &mut out);
    if out.len() > 10 {
        let more = out.len() - 10;
        out.truncate(10);
        out.push(format!("and {more} more"));
    }
    out
}
