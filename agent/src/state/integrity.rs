//! The store's integrity: that an existing `state.db` is an Outpost store, passes SQLite's
//! quick check, and is this store (its identity is kept in it and beside it, and every write
//! counts itself next to that identity, so a `-wal` from another store cannot pass for this
//! one's). A store that fails is refused, never replaced by an empty one.

use super::{Result, Store};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;

/// `PRAGMA application_id` of an Outpost state store ("OPST"): any other SQLite file is refused.
pub(super) const APPLICATION_ID: i64 = 0x4F50_5354;
/// The tables whose writes count in `identity`.
const COUNTED_TABLES: [&str; 8] = [
    "bundles",
    "rejections",
    "decisions",
    "events",
    "positions",
    "journal",
    "snapshots",
    "restores",
];
/// Where the store's identity is kept beside it, to tell a `-wal` (or a database file) from
/// another store apart from this one's.
const ID_FILE: &str = "state.db.id";

/// Triggers making every write to the store's tables count in `identity`: each
/// transaction's frames in the -wal then carry the store's identity.
pub(super) fn counted_triggers() -> String {
    COUNTED_TABLES
        .iter()
        .flat_map(|table| ["INSERT", "UPDATE", "DELETE"].map(|op| (table, op)))
        .map(|(table, op)| {
            format!(
                "CREATE TRIGGER IF NOT EXISTS counted_{table}_{op} AFTER {op} ON {table}
                 BEGIN UPDATE identity SET writes = writes + 1; END;"
            )
        })
        .collect()
}

impl Store {
    /// A store over `conn` as it is (opened read-only: never upgraded).
    fn as_it_is(conn: Connection) -> rusqlite::Result<Store> {
        let schema = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        Ok(Store {
            conn: Mutex::new(conn),
            schema,
        })
    }

    /// Opens an existing store read-only (`outpost-agent verify` beside a running agent).
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Store>> {
        let path = state_dir.join("state.db");
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Some(Store::as_it_is(conn)?))
    }

    /// Whether the store in `state_dir` is sound, read-only (beside a running agent too): a
    /// one-line summary, or what is wrong.
    pub fn check(state_dir: &Path) -> std::result::Result<String, String> {
        let path = state_dir.join("state.db");
        std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        not_empty(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        soundness(&conn).map_err(|e| format!("{}: {e}", path.display()))?;
        let store = Store::as_it_is(conn).map_err(|e| format!("{}: {e}", path.display()))?;
        let (inside, kept) = store
            .identities(state_dir)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        same_store(&inside, &kept).map_err(|e| format!("{}: {e}", path.display()))?;
        let (accepted, rejected) = store.counts().map_err(|e| e.to_string())?;
        let schema = store.schema;
        Ok(format!(
            "{}: sound (schema {schema}, {accepted} releases, {rejected} rejections)",
            path.display()
        ))
    }

    /// The store's identity, in it and in [`ID_FILE`] beside it: made once, copied to whichever
    /// lost it, and refused when the two differ (a database or -wal from another store).
    pub(super) fn check_identity(&self, state_dir: &Path) -> std::result::Result<(), String> {
        let file = state_dir.join(ID_FILE);
        let (inside, kept) = self.identities(state_dir)?;
        same_store(&inside, &kept)?;
        match (inside, kept) {
            (Some(_), Some(_)) => Ok(()),
            (Some(inside), None) => {
                outpost_bundle_format::layout::write_atomic(&file, inside.as_bytes())
                    .map_err(|e| format!("{}: {e}", file.display()))
            }
            (None, kept) => {
                let id = match kept {
                    Some(kept) => kept,
                    None => outpost_bundle_format::crypto::random_secret()
                        .map_err(|e| e.to_string())?[..32]
                        .to_string(),
                };
                outpost_bundle_format::layout::write_atomic(&file, id.as_bytes())
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                self.with(|conn| {
                    conn.execute(
                        "INSERT INTO identity(id, writes) VALUES (?1, 0)",
                        params![id],
                    )?;
                    Ok(())
                })
                .map_err(|e| e.to_string())
            }
        }
    }
}

impl Store {
    /// The identity in the store (none in a store from before identities, or a new one) and
    /// the one kept beside it.
    fn identities(
        &self,
        state_dir: &Path,
    ) -> std::result::Result<(Option<String>, Option<String>), String> {
        let inside = self.with(identity).map_err(|e| e.to_string())?;
        let file = state_dir.join(ID_FILE);
        let kept = match std::fs::read_to_string(&file) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        Ok((inside, kept))
    }
}

/// Refuses two identities that differ: a database or -wal from another store.
fn same_store(inside: &Option<String>, kept: &Option<String>) -> std::result::Result<(), String> {
    match (inside, kept) {
        (Some(inside), Some(kept)) if inside != kept => Err(format!(
            "holds store {inside}, but {ID_FILE} beside it names {kept}: a database or -wal from another store (if this copy was restored on purpose, remove {ID_FILE})"
        )),
        _ => Ok(()),
    }
}

/// A database file of 0 bytes is no store at all: truncated, or made and never written.
pub(super) fn not_empty(path: &Path) -> std::result::Result<(), String> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err("empty (0 bytes), not a database: truncated? (if this agent never accepted a release, removing it is safe)".into());
    }
    Ok(())
}

/// The store's identity, if it has one yet (a store from before identities has no table).
fn identity(conn: &mut Connection) -> Result<Option<String>> {
    let has_table = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'identity'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !has_table {
        return Ok(None);
    }
    Ok(conn
        .query_row("SELECT id FROM identity LIMIT 1", [], |r| r.get(0))
        .optional()?)
}

/// Whether an existing store reads as an Outpost store and passes SQLite's quick check.
pub(super) fn soundness(conn: &Connection) -> std::result::Result<(), String> {
    let application: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    // Stores made before the application id was set have a schema version.
    if application != APPLICATION_ID && !(application == 0 && version > 0) {
        return Err(format!(
            "not an Outpost state store (application id {application:#x})"
        ));
    }
    let mut problems = Vec::new();
    let mut statement = conn
        .prepare("PRAGMA quick_check(5)")
        .map_err(|e| e.to_string())?;
    let rows = statement
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?;
    for row in rows {
        let row = row.map_err(|e| e.to_string())?;
        if row != "ok" {
            problems.push(row);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("damaged: {}", problems.join("; ")))
    }
}
