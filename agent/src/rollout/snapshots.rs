//! Snapshots before change, restores on rollback. Before a release changes a stateful
//! replica, the data its previous release left is copied (once per release and replica) and
//! recorded in the store; a rollback past a release that declared the resource irreversible
//! queues the restore of that copy, done before the replica starts again. Retention keeps at
//! most `snapshots.keep` per replica and `snapshots.max_gib` in all, never deleting one that a
//! rollback from the current (or pending) release could need.
//!
//! On container engines a snapshot is a volume-relative tar under `<state_dir>/snapshots`,
//! taken while the replica is stopped for its stop-first replace.

use super::{Context, RolloutError, event};
use crate::config::SnapshotsConfig;
use crate::plan::{Action, Desired, ObservedReplica, ReplicaId};
use crate::runtime::{Instance, ReplicaSpec, Runtime, Slot};
use crate::state::{Snapshot, Store};
use outpost_bundle_format::Digest;
use outpost_bundle_format::stack::Container;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Where a container-engine backend keeps its snapshots, and how many.
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub dir: PathBuf,
    pub config: SnapshotsConfig,
    /// Snapshots being written now (steps run in parallel): while any is, files no record
    /// names are not swept, since theirs is one.
    writing: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one snapshot being written while it lives.
struct Writing<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Snapshots {
    pub fn of(config: &crate::config::Config) -> Snapshots {
        Snapshots {
            dir: config.state_dir.join("snapshots"),
            config: config.snapshots.clone(),
            writing: Default::default(),
        }
    }

    /// No snapshots (a node of a VM pool: its volumes are the cloud's).
    pub fn off(state_dir: &std::path::Path) -> Snapshots {
        Snapshots {
            dir: state_dir.join("snapshots"),
            config: SnapshotsConfig {
                keep: 0,
                ..SnapshotsConfig::default()
            },
            writing: Default::default(),
        }
    }

    /// Copies the replica's data before the release `digest` replaces it with `new`, unless
    /// no copy is wanted: snapshots are off (`keep: 0`), it has no volume, the release changes
    /// only its limits (see [`changes_data`]), a rollback is about to restore the volume
    /// anyway, or the release already has its copy (a retried or resumed step). The runtime
    /// stops the replica for it.
    pub async fn take_before<R: Runtime>(
        &self,
        context: &Context,
        runtime: &R,
        digest: &Digest,
        spec: &ReplicaSpec,
        running: &[Instance],
        new: &Container,
    ) -> Result<(), RolloutError> {
        let (store, replica, stack) = (&context.store, &spec.replica, spec.stack.as_str());
        if self.config.keep == 0
            || spec.volume.is_none()
            || store
                .pending_restore(&replica.resource, replica.ordinal)?
                .is_some()
            || store
                .snapshot_before(digest, &replica.resource, replica.ordinal)?
                .is_some()
            || !changes_data(
                store,
                running_digest(running, replica),
                &replica.resource,
                new,
            )
        {
            return Ok(());
        }
        let location = format!("{}-{}.tar", replica.name(stack), &digest.hex()[..12]);
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            RolloutError::unavailable(format!("snapshots: {}: {e}", self.dir.display()))
        })?;
        let id = store.begin_snapshot(
            digest,
            &replica.resource,
            replica.ordinal,
            &location,
            crate::config::now(),
        )?;
        let started = std::time::Instant::now();
        self.writing
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let writing = Writing(&self.writing);
        let bytes = runtime
            .snapshot(
                stack,
                replica,
                &self.dir.join(&location),
                self.config.max_bytes(),
            )
            .await?;
        drop(writing);
        store.snapshot_taken(id, bytes, crate::config::now())?;
        event(
            store,
            "snapshot",
            Some(digest),
            &format!(
                "{}: data snapshotted before this release ({bytes} bytes in {} ms)",
                replica.name(stack),
                started.elapsed().as_millis()
            ),
        );
        self.prune(context);
        Ok(())
    }

    /// Restores the snapshot a rollback queued for `spec`'s replica, if any, into its volume,
    /// then records the restore done. The replica must be gone; it is started only after this.
    pub async fn restore_if_queued<R: Runtime>(
        &self,
        context: &Context,
        runtime: &R,
        spec: &ReplicaSpec,
        notes: crate::runtime::Notes<'_>,
    ) -> Result<(), RolloutError> {
        if spec.volume.is_none() {
            return Ok(());
        }
        let Some(snapshot) = context
            .store
            .pending_restore(&spec.replica.resource, spec.replica.ordinal)?
        else {
            return Ok(());
        };
        let name = spec.replica.name(&spec.stack);
        let file = self.dir.join(&snapshot.location);
        if !file.is_file() {
            // Nothing to restore from: the replica must not start on data its release cannot read.
            return Err(RolloutError::new(format!(
                "{name}: the snapshot to restore ({}) is missing; {name} stays stopped rather than start on data its release may not read",
                file.display()
            )));
        }
        notes(format!(
            "{name}: restoring its data to the snapshot of {}",
            snapshot.taken_at
        ));
        runtime.restore(spec, &file, notes).await?;
        context
            .store
            .restore_finished(
                &snapshot,
                &format!(
                    "{name}: data restored to the snapshot taken {} (before {})",
                    snapshot.taken_at,
                    snapshot
                        .version
                        .as_deref()
                        .unwrap_or("the release rolled back from")
                ),
                crate::config::now(),
            )
            .map_err(RolloutError::from)
    }

    /// Deletes what retention no longer keeps, and files no record names (a copy a crash
    /// interrupted).
    pub fn prune(&self, context: &Context) {
        for snapshot in doomed(&context.store, &self.config) {
            let file = self.dir.join(&snapshot.location);
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!("snapshot retention: {}: {e}", file.display());
                }
                _ => retired(&context.store, &snapshot),
            }
        }
        let named: BTreeSet<String> = match context.store.snapshots() {
            Ok(left) => left.into_iter().map(|s| s.location).collect(),
            Err(_) => return,
        };
        if self.writing.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !named.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// A queued restore happens when its replica is replaced or created: a replica the plan
/// leaves alone (its configuration is the same in both releases) is replaced for it, first,
/// before what depends on its data; one the release no longer has is dropped.
pub fn plan_restores(
    store: &Store,
    desired: &Desired<'_>,
    observed: &[ObservedReplica],
    actions: &mut Vec<Action>,
) -> Result<(), RolloutError> {
    for snapshot in store.pending_restores()? {
        let replica = ReplicaId {
            resource: snapshot.resource.clone(),
            ordinal: snapshot.ordinal,
        };
        let wanted = desired.resources.iter().find(|r| {
            r.container.name == replica.resource
                && r.container.persistent_storage.is_some()
                && replica.ordinal < r.replicas
        });
        let Some(wanted) = wanted else {
            let message = format!(
                "{}: not restored: this release does not run it",
                replica.name(desired.stack)
            );
            store.restore_finished(&snapshot, &message, crate::config::now())?;
            continue;
        };
        if actions.iter().any(|a| *a.replica() == replica) {
            continue;
        }
        if let Some(running) = observed.iter().find(|o| o.id == replica) {
            actions.insert(
                0,
                Action::Replace {
                    replica,
                    from_hash: running.config_hash.clone(),
                    config_hash: wanted.config_hash.clone(),
                    stop_first: true,
                },
            );
        }
    }
    Ok(())
}

/// Whether replacing what runs from release `old` (a bundle digest, as the runtime labels
/// it) with `new` changes what runs on `resource`'s data (image, command or environment), as
/// against a change of limits; true when the release it runs from is not known.
pub(crate) fn changes_data(
    store: &Store,
    old: Option<&str>,
    resource: &str,
    new: &Container,
) -> bool {
    let old = old
        .and_then(|digest| Digest::parse(digest).ok())
        .and_then(|digest| store.release(&digest).ok().flatten())
        .and_then(|release| release.stack().ok());
    let Some(old) = old.as_ref().and_then(|s| s.resource(resource)) else {
        return true;
    };
    let old = &old.container;
    old.image != new.image || old.command != new.command || old.environment != new.environment
}

/// The snapshots retention no longer keeps (see [`beyond_retention`]); none when the store
/// cannot say (logged; retried at the next pass).
pub(crate) fn doomed(store: &Store, config: &SnapshotsConfig) -> Vec<Snapshot> {
    let found = protected(store)
        .and_then(|(needed, restoring)| Ok((store.snapshots()?, needed, restoring)));
    match found {
        Ok((all, needed, restoring)) => {
            beyond_retention(&all, config.keep, config.max_bytes(), &needed, &restoring)
        }
        Err(e) => {
            tracing::warn!("snapshot retention: {e}");
            Vec::new()
        }
    }
}

/// Forgets a snapshot whose data the backend deleted.
pub(crate) fn retired(store: &Store, snapshot: &Snapshot) {
    if let Err(e) = store.forget_snapshot(snapshot.id) {
        tracing::warn!("snapshot retention: {e}");
    } else if snapshot.ready {
        event(
            store,
            "snapshot-deleted",
            Some(&snapshot.release),
            &format!(
                "{}-{}: snapshot of {} deleted by retention",
                snapshot.resource, snapshot.ordinal, snapshot.taken_at
            ),
        );
    }
}

/// The bundle digest the replica's primary runs from.
fn running_digest<'a>(running: &'a [Instance], replica: &ReplicaId) -> Option<&'a str> {
    running
        .iter()
        .find(|i| i.replica.id == *replica && i.slot == Slot::Primary)
        .map(|i| i.digest.as_str())
}

/// What retention must keep: the releases a rollback could need restored (current, pending),
/// and the snapshots queued restores read.
fn protected(store: &Store) -> Result<(BTreeSet<Digest>, BTreeSet<i64>), crate::state::StateError> {
    let positions = store.positions()?;
    let needed = [positions.current, positions.pending]
        .into_iter()
        .flatten()
        .map(|r| r.digest)
        .collect();
    let restoring = store
        .pending_restores()?
        .into_iter()
        .map(|s| s.id)
        .collect();
    Ok((needed, restoring))
}

/// The snapshots retention deletes, oldest first: those left half-taken by a release that is no
/// longer in play; per replica those beyond the newest `keep`; then, while all together take
/// more than `max_bytes`, the oldest. Never one of a `needed` release (a rollback from it
/// restores it) nor one a queued restore (`restoring`) reads.
pub fn beyond_retention(
    all: &[Snapshot],
    keep: u32,
    max_bytes: u64,
    needed: &BTreeSet<Digest>,
    restoring: &BTreeSet<i64>,
) -> Vec<Snapshot> {
    let kept = |s: &Snapshot| needed.contains(&s.release) || restoring.contains(&s.id);
    let mut doomed: BTreeSet<i64> = all
        .iter()
        .filter(|s| !s.ready && !kept(s))
        .map(|s| s.id)
        .collect();
    let mut per_replica: BTreeMap<(&str, u32), Vec<&Snapshot>> = BTreeMap::new();
    for snapshot in all.iter().filter(|s| s.ready) {
        per_replica
            .entry((&snapshot.resource, snapshot.ordinal))
            .or_default()
            .push(snapshot);
    }
    for snapshots in per_replica.values() {
        // Oldest first (ids grow with time): all but the newest `keep`.
        let beyond = snapshots.len().saturating_sub(keep as usize);
        doomed.extend(
            snapshots[..beyond]
                .iter()
                .filter(|s| !kept(s))
                .map(|s| s.id),
        );
    }
    let mut total: u64 = all
        .iter()
        .filter(|s| s.ready && !doomed.contains(&s.id))
        .map(|s| s.bytes.unwrap_or(0))
        .sum();
    for snapshot in all.iter().filter(|s| s.ready) {
        if total <= max_bytes {
            break;
        }
        if !kept(snapshot) && doomed.insert(snapshot.id) {
            total -= snapshot.bytes.unwrap_or(0);
        }
    }
    all.iter()
        .filter(|s| doomed.contains(&s.id))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).unwrap()
    }

    fn snapshot(id: i64, release: u8, ordinal: u32, bytes: u64, ready: bool) -> Snapshot {
        Snapshot {
            id,
            release: digest(release),
            version: None,
            resource: "db".into(),
            ordinal,
            location: format!("{id}.tar"),
            bytes: Some(bytes),
            taken_at: String::new(),
            ready,
        }
    }

    fn ids(doomed: Vec<Snapshot>) -> Vec<i64> {
        doomed.into_iter().map(|s| s.id).collect()
    }

    #[test]
    fn retention_keeps_the_newest_per_replica_and_what_a_rollback_needs() {
        let all: Vec<_> = (1..=5).map(|n| snapshot(n, n as u8, 0, 10, true)).collect();
        let (none, no_ids) = (BTreeSet::new(), BTreeSet::new());
        assert_eq!(
            ids(beyond_retention(&all, 2, 1 << 30, &none, &no_ids)),
            [1, 2, 3]
        );
        // Release 1 is current: its snapshot stays whatever the count.
        let current = BTreeSet::from([digest(1)]);
        assert_eq!(
            ids(beyond_retention(&all, 2, 1 << 30, &current, &no_ids)),
            [2, 3]
        );
        // A queued restore reads snapshot 2.
        let restoring = BTreeSet::from([2]);
        assert_eq!(
            ids(beyond_retention(&all, 2, 1 << 30, &current, &restoring)),
            [3]
        );
        // Each replica counts on its own.
        let mut two = all.clone();
        two.push(snapshot(6, 6, 1, 10, true));
        assert_eq!(
            ids(beyond_retention(&two, 2, 1 << 30, &none, &no_ids)),
            [1, 2, 3]
        );
    }

    #[test]
    fn retention_by_space_deletes_the_oldest_until_the_rest_fit() {
        let all: Vec<_> = (1..=4).map(|n| snapshot(n, n as u8, 0, 40, true)).collect();
        let (none, no_ids) = (BTreeSet::new(), BTreeSet::new());
        assert_eq!(ids(beyond_retention(&all, 10, 100, &none, &no_ids)), [1, 2]);
        // The oldest is needed: the next oldest go instead, even past the bound.
        let needed = BTreeSet::from([digest(1), digest(4)]);
        assert_eq!(
            ids(beyond_retention(&all, 10, 50, &needed, &no_ids)),
            [2, 3]
        );
    }

    #[test]
    fn half_taken_snapshots_go_unless_their_release_is_in_play() {
        let all = vec![snapshot(1, 1, 0, 0, false), snapshot(2, 2, 0, 0, false)];
        let current = BTreeSet::from([digest(2)]);
        assert_eq!(
            ids(beyond_retention(
                &all,
                3,
                1 << 30,
                &current,
                &BTreeSet::new()
            )),
            [1]
        );
    }
}
