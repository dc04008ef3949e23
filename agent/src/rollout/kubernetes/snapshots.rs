//! Claims' data across irreversible releases, on a cluster: before a release changes a
//! stateful resource's image, command or environment, each of its claims gets a
//! `VolumeSnapshot` (`snapshot.storage.k8s.io/v1`, class `kubernetes.volume_snapshot_class`),
//! recorded in the store once ready; a rollback past a release that declared the resource
//! irreversible queues restores, done before its StatefulSet is applied: the StatefulSet is
//! scaled to 0 and its pods deleted, then each claim is deleted and made anew with the snapshot
//! as its `dataSource`. The rules for when to copy and what to keep are the container engines'
//! (`rollout/snapshots.rs`).

use super::{Admitted, Cluster, POLL_EVERY, kind, kube_error};
use crate::rollout::snapshots::{changes_data, doomed, retired};
use crate::rollout::{RolloutError, event};
use crate::state::Release;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use outpost_bundle_format::stack::Stack;
use serde_json::{Value, json};
use std::time::Instant;

use super::super::render::{DIGEST_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, RESOURCE_LABEL};
use super::super::render::{STACK_LABEL, STATEFUL_CLAIM};

const VOLUME_SNAPSHOTS: super::Kind = kind(
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshot",
    "volumesnapshots",
);
const CLAIMS: super::Kind = kind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims");

impl Cluster {
    /// Snapshots the claims of `object` (a StatefulSet with a claim template, live as `live`)
    /// before `release` changes what runs on them; nothing on a first install, with snapshots
    /// off, for a change of limits only, for a claim a queued restore replaces anyway, or one
    /// this release already copied (a resumed step).
    pub(super) async fn snapshot_claims(
        &self,
        release: &Release,
        stack: &Stack,
        object: &Admitted<'_>,
        live: Option<&kube::api::DynamicObject>,
        until: Instant,
    ) -> Result<(), RolloutError> {
        let (Some(live), Some(resource)) = (live, stack.resource(object.resource)) else {
            return Ok(());
        };
        let store = &self.context.store;
        let old = live
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DIGEST_ANNOTATION))
            .map(String::as_str);
        if self.settings.snapshots.keep == 0
            || object
                .object
                .pointer("/spec/volumeClaimTemplates")
                .is_none()
            || !changes_data(store, old, object.resource, &resource.container)
        {
            return Ok(());
        }
        if !self.snapshots_served().await? {
            let what = "snapshot.storage.k8s.io/v1 VolumeSnapshots are not served by this cluster";
            if release.irreversible.iter().any(|r| r == object.resource) {
                return Err(RolloutError::new(format!(
                    "{}: declared irreversible, but {what}: install the CSI snapshot CRDs and controller, or set snapshots.keep: 0 to go ahead without snapshots",
                    object.resource
                )));
            }
            event(
                store,
                "snapshot-skipped",
                Some(&release.digest),
                &format!("{}: claims not snapshotted: {what}", object.resource),
            );
            return Ok(());
        }
        let replicas = live.data.pointer("/spec/replicas").and_then(Value::as_u64);
        for ordinal in 0..replicas.unwrap_or(0) as u32 {
            if store.pending_restore(object.resource, ordinal)?.is_some()
                || store
                    .snapshot_before(&release.digest, object.resource, ordinal)?
                    .is_some()
            {
                continue;
            }
            let claim = format!("{STATEFUL_CLAIM}-{}-{ordinal}", object.name);
            let name = format!("{claim}-{}", &release.digest.hex()[..12]);
            let id = store.begin_snapshot(
                &release.digest,
                object.resource,
                ordinal,
                &name,
                crate::config::now(),
            )?;
            let mut snapshot = json!({
                "apiVersion": VOLUME_SNAPSHOTS.api_version(),
                "kind": VOLUME_SNAPSHOTS.kind,
                "metadata": {"name": name, "namespace": self.namespace, "labels": {
                    MANAGED_BY_LABEL: MANAGED_BY,
                    STACK_LABEL: object.stack,
                    RESOURCE_LABEL: object.resource,
                }},
                "spec": {"source": {"persistentVolumeClaimName": claim}},
            });
            if let Some(class) = &self.settings.kubernetes.volume_snapshot_class {
                snapshot["spec"]["volumeSnapshotClassName"] = json!(class);
            }
            let bytes = self.snapshot_ready(&name, &snapshot, until).await?;
            store.snapshot_taken(id, bytes, crate::config::now())?;
            event(
                store,
                "snapshot",
                Some(&release.digest),
                &format!("{claim}: VolumeSnapshot {name} taken before this release"),
            );
        }
        self.prune_snapshots().await;
        Ok(())
    }

    /// Whether the cluster serves VolumeSnapshots (the CSI snapshot CRDs are installed).
    async fn snapshots_served(&self) -> Result<bool, RolloutError> {
        match self
            .api(&VOLUME_SNAPSHOTS)
            .list(&ListParams::default().limit(1))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(kube_error("listing VolumeSnapshots".into(), e)),
        }
    }

    /// Creates the VolumeSnapshot (found already made by an interrupted step: kept) and waits
    /// until it is ready to use; returns its restore size in bytes (0 when not reported).
    async fn snapshot_ready(
        &self,
        name: &str,
        snapshot: &Value,
        until: Instant,
    ) -> Result<u64, RolloutError> {
        let api = self.api(&VOLUME_SNAPSHOTS);
        let what = format!("VolumeSnapshot/{name}");
        if api
            .get_opt(name)
            .await
            .map_err(|e| kube_error(format!("reading {what}"), e))?
            .is_none()
        {
            let object = serde_json::from_value(snapshot.clone())
                .map_err(|e| RolloutError::new(format!("{what}: {e}")))?;
            api.create(&PostParams::default(), &object)
                .await
                .map_err(|e| kube_error(format!("creating {what}"), e))?;
        }
        loop {
            let live = api
                .get_opt(name)
                .await
                .map_err(|e| kube_error(format!("reading {what}"), e))?;
            let status = live.map(|l| l.data["status"].clone()).unwrap_or_default();
            if let Some(error) = status.pointer("/error/message").and_then(Value::as_str) {
                return Err(RolloutError::new(format!("{what} failed: {error}")));
            }
            if status["readyToUse"] == true {
                let size = status["restoreSize"].as_str().unwrap_or("0");
                return Ok(outpost_bundle_format::quantity::ByteQuantity::parse(size)
                    .map(|q| q.bytes())
                    .unwrap_or(0));
            }
            if Instant::now() >= until {
                return Err(RolloutError::new(format!(
                    "{what} not ready to use within the progress deadline ({}s)",
                    self.context.rollout.progress_deadline_seconds
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Restores the claims of `object` (a StatefulSet) that a rollback queued restores for,
    /// before it is applied: no pod runs on them meanwhile, and each is made anew from its
    /// snapshot. Redone whole after a crash: the restore stays queued until its claim is made.
    pub(super) async fn restore_claims(
        &self,
        object: &Admitted<'_>,
        live: Option<&kube::api::DynamicObject>,
        until: Instant,
    ) -> Result<(), RolloutError> {
        let store = &self.context.store;
        let queued: Vec<_> = store
            .pending_restores()?
            .into_iter()
            .filter(|s| s.resource == object.resource)
            .collect();
        let template = object.object.pointer("/spec/volumeClaimTemplates/0");
        let (false, Some(template)) = (queued.is_empty(), template) else {
            return Ok(());
        };
        let replicas = match live {
            Some(_) => self.stop_pods(object, until).await?,
            None => None,
        };
        let claims = self.api(&CLAIMS);
        for snapshot in &queued {
            let claim = format!("{STATEFUL_CLAIM}-{}-{}", object.name, snapshot.ordinal);
            let what = format!("PersistentVolumeClaim/{claim}");
            let gone = claims
                .delete(&claim, &DeleteParams::default())
                .await
                .map(|_| ());
            match gone {
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                other => other.map_err(|e| kube_error(format!("deleting {what}"), e))?,
            }
            while claims
                .get_opt(&claim)
                .await
                .map_err(|e| kube_error(format!("reading {what}"), e))?
                .is_some()
            {
                if Instant::now() >= until {
                    return Err(RolloutError::new(format!(
                        "{what} is still being deleted after the progress deadline"
                    )));
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
            let mut spec = template["spec"].clone();
            spec["dataSource"] = json!({
                "apiGroup": VOLUME_SNAPSHOTS.group,
                "kind": VOLUME_SNAPSHOTS.kind,
                "name": snapshot.location,
            });
            let restored = json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": self.namespace,
                    "labels": template["metadata"]["labels"]},
                "spec": spec,
            });
            let restored = serde_json::from_value(restored)
                .map_err(|e| RolloutError::new(format!("{what}: {e}")))?;
            claims
                .create(&PostParams::default(), &restored)
                .await
                .map_err(|e| kube_error(format!("creating {what}"), e))?;
            store.restore_finished(
                snapshot,
                &format!(
                    "{claim}: made anew from VolumeSnapshot {} (taken {})",
                    snapshot.location, snapshot.taken_at
                ),
                crate::config::now(),
            )?;
        }
        // An autoscaled StatefulSet gets its count back from here, not from the apply (which
        // leaves the count to the autoscaler, and an autoscaler does not scale up from 0): at
        // least 1, should a restore interrupted after the scale-down find it at 0.
        if let (Some(replicas), None) = (replicas, object.object.pointer("/spec/replicas")) {
            self.scale(object, replicas.max(1)).await?;
        }
        Ok(())
    }

    async fn scale(&self, object: &Admitted<'_>, replicas: u64) -> Result<(), RolloutError> {
        self.api(object.kind)
            .patch(
                object.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .map_err(|e| kube_error(format!("scaling {} to {replicas}", object.id()), e))?;
        Ok(())
    }

    /// Scales the StatefulSet to 0 and deletes its pods (one stuck unready would hold the
    /// controller), then waits until none is left; returns the count it had.
    async fn stop_pods(
        &self,
        object: &Admitted<'_>,
        until: Instant,
    ) -> Result<Option<u64>, RolloutError> {
        let id = object.id();
        let replicas = self
            .api(object.kind)
            .get_opt(object.name)
            .await
            .map_err(|e| kube_error(format!("reading {id}"), e))?
            .and_then(|live| live.data.pointer("/spec/replicas").and_then(Value::as_u64));
        self.scale(object, 0).await?;
        let pods = self.api(&super::PODS);
        let selector = format!(
            "{STACK_LABEL}={},{RESOURCE_LABEL}={}",
            object.stack, object.resource
        );
        loop {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| kube_error(format!("listing the pods of {id}"), e))?;
            if list.items.is_empty() {
                return Ok(replicas);
            }
            for pod in list.items {
                let name = pod.metadata.name.unwrap_or_default();
                match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(kube_error(format!("deleting Pod/{name}"), e)),
                }
            }
            if Instant::now() >= until {
                return Err(RolloutError::new(format!(
                    "the pods of {id} are still running after the progress deadline"
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Queued restores of resources `objects` has no claims for are dropped: the release does
    /// not run them.
    pub(super) fn drop_stale_restores(&self, objects: &[Admitted<'_>]) -> Result<(), RolloutError> {
        let store = &self.context.store;
        for snapshot in store.pending_restores()? {
            let claimed = objects.iter().any(|o| {
                o.resource == snapshot.resource
                    && o.object.pointer("/spec/volumeClaimTemplates").is_some()
            });
            if !claimed {
                store.restore_finished(
                    &snapshot,
                    &format!(
                        "{}-{}: not restored: this release does not run it",
                        snapshot.resource, snapshot.ordinal
                    ),
                    crate::config::now(),
                )?;
            }
        }
        Ok(())
    }

    /// Deletes the VolumeSnapshots retention no longer keeps.
    pub(super) async fn prune_snapshots(&self) {
        let api = self.api(&VOLUME_SNAPSHOTS);
        for snapshot in doomed(&self.context.store, &self.settings.snapshots) {
            match api
                .delete(&snapshot.location, &DeleteParams::default())
                .await
            {
                Ok(_) => retired(&self.context.store, &snapshot),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    retired(&self.context.store, &snapshot)
                }
                Err(e) => tracing::warn!(
                    "snapshot retention: deleting VolumeSnapshot/{}: {e}",
                    snapshot.location
                ),
            }
        }
    }
}
