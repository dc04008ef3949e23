//! Snapshots of stateful replicas' data, each taken before a release changed it, and the
//! restores a rollback past an irreversible release queues. A snapshot is recorded before it
//! is taken and marked ready after, so a crash mid-copy leaves a record that is retaken, never
//! one that is restored from.

use super::{Result, StateError, Store, digest_column, event};
use chrono::{DateTime, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::release::rfc3339;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub id: i64,
    /// The release whose rollout took it: the data as it was before that release.
    pub release: Digest,
    /// That release's version (when the store still knows it).
    pub version: Option<String>,
    pub resource: String,
    pub ordinal: u32,
    /// Where the backend keeps it: a file name, or an object's name.
    pub location: String,
    pub bytes: Option<u64>,
    pub taken_at: String,
    pub ready: bool,
}

const COLUMNS: &str = "s.id, s.release, b.version, s.resource, s.ordinal, s.location, s.bytes, s.taken_at, s.ready FROM snapshots s LEFT JOIN bundles b ON b.digest = s.release";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: r.get(0)?,
        release: digest_column(r, 1)?,
        version: r.get(2)?,
        resource: r.get(3)?,
        ordinal: r.get::<_, i64>(4)? as u32,
        location: r.get(5)?,
        bytes: r.get::<_, Option<i64>>(6)?.map(|b| b as u64),
        taken_at: r.get(7)?,
        ready: r.get(8)?,
    })
}

impl Store {
    /// What rolling back from `release` would restore (see [`irreversible_snapshots`]).
    pub fn irreversible_snapshots(&self, release: &Digest) -> Result<Vec<Snapshot>> {
        self.with(|conn| irreversible_snapshots(conn, &release.to_string()))
    }

    /// Records a snapshot of `resource`'s replica `ordinal` about to be taken into `location`
    /// before `release` changes it; one left half-taken for the same replica and release is
    /// replaced. Returns its id.
    pub fn begin_snapshot(
        &self,
        release: &Digest,
        resource: &str,
        ordinal: u32,
        location: &str,
        at: DateTime<Utc>,
    ) -> Result<i64> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM snapshots WHERE release = ?1 AND resource = ?2 AND ordinal = ?3 AND ready = 0",
                params![release.to_string(), resource, ordinal],
            )?;
            tx.execute(
                "INSERT INTO snapshots(release, resource, ordinal, location, taken_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![release.to_string(), resource, ordinal, location, rfc3339::format(&at)],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        })
    }

    /// Marks snapshot `id` complete, `bytes` large.
    pub fn snapshot_taken(&self, id: i64, bytes: u64, at: DateTime<Utc>) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE snapshots SET ready = 1, bytes = ?2, taken_at = ?3 WHERE id = ?1",
                params![id, bytes as i64, rfc3339::format(&at)],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The complete snapshot taken of the replica before `release` changed it.
    pub fn snapshot_before(
        &self,
        release: &Digest,
        resource: &str,
        ordinal: u32,
    ) -> Result<Option<Snapshot>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {COLUMNS} WHERE s.release = ?1 AND s.resource = ?2 AND s.ordinal = ?3 AND s.ready = 1"),
                    params![release.to_string(), resource, ordinal],
                    row,
                )
                .optional()?)
        })
    }

    /// Every snapshot record, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        self.with(|conn| {
            let mut statement = conn.prepare(&format!("SELECT {COLUMNS} ORDER BY s.id"))?;
            let rows = statement.query_map([], row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Drops snapshot `id`'s record (its data is already gone).
    pub fn forget_snapshot(&self, id: i64) -> Result<()> {
        self.with(|conn| {
            conn.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// The snapshot a rollback queued for the replica, to be restored before it starts again.
    pub fn pending_restore(&self, resource: &str, ordinal: u32) -> Result<Option<Snapshot>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {COLUMNS} JOIN restores q ON q.snapshot = s.id WHERE q.resource = ?1 AND q.ordinal = ?2"),
                    params![resource, ordinal],
                    row,
                )
                .optional()?)
        })
    }

    /// Every queued restore.
    pub fn pending_restores(&self) -> Result<Vec<Snapshot>> {
        self.with(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {COLUMNS} JOIN restores q ON q.snapshot = s.id ORDER BY s.id"
            ))?;
            let rows = statement.query_map([], row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The queued restore of the replica is done (or no longer applies: `message` says which).
    pub fn restore_finished(
        &self,
        snapshot: &Snapshot,
        message: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM restores WHERE resource = ?1 AND ordinal = ?2",
                params![snapshot.resource, snapshot.ordinal],
            )?;
            event(
                &tx,
                at,
                "restored",
                Some(&snapshot.release.to_string()),
                message,
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

/// The complete snapshots taken before `release` of the resources it declared irreversible:
/// what rolling back past it restores.
pub(super) fn irreversible_snapshots(
    conn: &rusqlite::Connection,
    release: &str,
) -> Result<Vec<Snapshot>> {
    let declared: Option<String> = conn
        .query_row(
            "SELECT irreversible FROM bundles WHERE digest = ?1",
            [release],
            |r| r.get(0),
        )
        .optional()?;
    let declared: Vec<String> = match declared {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StateError(format!("irreversible resources of {release}: {e}")))?,
        None => Vec::new(),
    };
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} WHERE s.release = ?1 AND s.ready = 1 ORDER BY s.resource, s.ordinal"
    ))?;
    let rows = statement.query_map([release], row)?;
    Ok(rows
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .filter(|s| declared.contains(&s.resource))
        .collect())
}

/// Queues the restores rolling back from `release` needs; returns them.
pub(super) fn queue_restores(
    tx: &rusqlite::Transaction<'_>,
    release: &str,
    at: DateTime<Utc>,
) -> Result<Vec<Snapshot>> {
    let snapshots = irreversible_snapshots(tx, release)?;
    for snapshot in &snapshots {
        tx.execute(
            "INSERT OR REPLACE INTO restores(resource, ordinal, snapshot, queued_at) VALUES (?1, ?2, ?3, ?4)",
            params![snapshot.resource, snapshot.ordinal, snapshot.id, rfc3339::format(&at)],
        )?;
    }
    Ok(snapshots)
}
