//! Snapshots of stateful replicas' data, each taken before a release changed it, and the
//! restores a rollback past an irreversible release queues. A snapshot is recorded before it
//! is taken and marked ready after, so a crash mid-copy leaves a record that is retaken, never
//! one that is restored from.

use super::{Result, Store, digest_column, event, release_by_digest};
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
        let schema = self.schema;
        self.with(|conn| irreversible_snapshots(conn, schema, &release.to_string()))
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
            conn.execute(
                "UPDATE snapshots SET ready = 1, bytes = ?2, taken_at = ?3 WHERE id = ?1",
                params![id, bytes as i64, rfc3339::format(&at)],
            )?;
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
    schema: i64,
    release: &str,
) -> Result<Vec<Snapshot>> {
    let declared = release_by_digest(conn, schema, release)?
        .map(|r| r.irreversible)
        .unwrap_or_default();
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
    // Only a store opened for writing writes, and opening it brought it to this schema.
    let snapshots = irreversible_snapshots(tx, super::SCHEMA_VERSION, release)?;
    for snapshot in &snapshots {
        tx.execute(
            "INSERT OR REPLACE INTO restores(resource, ordinal, snapshot, queued_at) VALUES (?1, ?2, ?3, ?4)",
            params![snapshot.resource, snapshot.ordinal, snapshot.id, rfc3339::format(&at)],
        )?;
    }
    Ok(snapshots)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn version_1_and_2_stores_are_upgraded_in_place_and_keep_their_releases() {
        for (version, extra_column, extra_value) in [
            (1usize, "", ""),
            (
                2,
                ", irreversible TEXT NOT NULL DEFAULT '[]'",
                ", '[\"db\"]'",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let digest = format!("sha256:{}", "ab".repeat(32));
            {
                let conn = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
                conn.execute_batch(&format!(
                    "CREATE TABLE bundles(
                         digest TEXT PRIMARY KEY, name TEXT NOT NULL, channel TEXT NOT NULL,
                         version TEXT NOT NULL, sequence INTEGER NOT NULL, created TEXT NOT NULL,
                         expires TEXT NOT NULL, stack TEXT NOT NULL, origin TEXT NOT NULL,
                         received_at TEXT NOT NULL{extra_column});
                     PRAGMA user_version = {version};"
                ))
                .unwrap();
                conn.execute(
                    &format!("INSERT INTO bundles VALUES (?1, 'acme', 'stable', '1.0.0', 1, 'c', 'e', '{{}}', 'o', 'r'{extra_value})"),
                    [&digest],
                )
                .unwrap();
            }
            let digest = Digest::parse(&digest).unwrap();
            // Read-only beside an agent that has not upgraded it yet.
            let before = Store::open_read_only(dir.path()).unwrap().unwrap();
            assert!(
                before
                    .release(&digest)
                    .unwrap()
                    .unwrap()
                    .built_from
                    .is_empty()
            );
            drop(before);
            for _ in 0..2 {
                let store = Store::open(dir.path()).unwrap();
                let release = store.release(&digest).unwrap().unwrap();
                assert_eq!(release.version, "1.0.0");
                assert_eq!(release.irreversible.len(), version - 1, "v{version}");
                assert!(release.built_from.is_empty());
                assert!(store.irreversible_snapshots(&digest).unwrap().is_empty() || version == 2);
                let now: i64 = store
                    .with(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
                    .unwrap();
                assert_eq!(now, 3);
            }
        }
    }
}
