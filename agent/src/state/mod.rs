//! The crash-safe state store: SQLite in WAL mode with `synchronous=FULL`, one transaction per
//! decision, so after kill -9 the agent restarts exactly where the last commit left it.
//!
//! SQLite (rusqlite, bundled) over redb: the history and rejection records are queried by
//! time and kind, a schema with SQL is easier for operators to inspect with the stock `sqlite3`
//! tool, and WAL gives readers (`outpost-agent verify`) a consistent view while the daemon writes.

use chrono::{DateTime, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::release::rfc3339;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA_VERSION: i64 = 3;

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(String);

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite says "database or disk is full"; the operator's words are the kernel's.
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            return StateError(format!("no space left on device ({e})"));
        }
        StateError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StateError>;

mod integrity;
mod records;
mod snapshots;

use records::Sealed;
pub use records::{
    BuiltFrom, Decision, Effect, Event, Positions, Rejection, Release, StoredStackError,
};
pub use snapshots::Snapshot;

pub struct Store {
    conn: Mutex<Connection>,
    /// The schema version (`PRAGMA user_version`) read when the store was opened: a store
    /// opened read-only beside an agent that has not upgraded it yet lacks the newer columns.
    schema: i64,
}

impl Store {
    /// Opens (creating if needed) `state_dir/state.db`. A file that is there but damaged,
    /// empty, not an Outpost store or mixed with another store's is refused with one line
    /// naming it and what to do: starting from an empty store would forget every release and
    /// the rollback floor.
    pub fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| StateError(format!("{}: {e}", state_dir.display())))?;
        let path = state_dir.join("state.db");
        let refused = |detail: String| {
            StateError(format!(
                "{}: {detail}; refusing to start from an empty store (that would forget every release and the rollback floor): restore it (with its -wal) from a backup; `outpost-agent check-state` says whether a copy is sound",
                path.display()
            ))
        };
        integrity::not_empty(&path).map_err(refused)?;
        let fresh = !path.exists();
        let conn = Connection::open(&path).map_err(|e| refused(e.to_string()))?;
        let opened = (|| -> rusqlite::Result<()> {
            // Until it is found sound, closing must not checkpoint: a -wal from elsewhere
            // would be written into this store's file for good.
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")
        })();
        opened.map_err(|e| refused(e.to_string()))?;
        if !fresh {
            integrity::soundness(&conn).map_err(refused)?;
        }
        let store = Self::init(conn)?;
        store.check_identity(state_dir).map_err(refused)?;
        store.with(|conn| {
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// An empty store in memory (the offline `verify` on a machine without an agent's state).
    pub fn in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StateError(format!(
                "state.db has schema version {version}; this agent knows {SCHEMA_VERSION} (downgrade?)"
            )));
        }
        // Version 2 added the releases' irreversible resources, snapshots and restores;
        // version 3 how their images were built from source. Columns are added in the same
        // transaction as the version, so a crash cannot leave one added under the old version
        // (and the next start adding it twice).
        let mut upgrade = String::new();
        if version == 1 {
            upgrade.push_str(
                "ALTER TABLE bundles ADD COLUMN irreversible TEXT NOT NULL DEFAULT '[]';",
            );
        }
        if (1..3).contains(&version) {
            upgrade
                .push_str("ALTER TABLE bundles ADD COLUMN built_from TEXT NOT NULL DEFAULT '[]';");
        }
        let counted = integrity::counted_triggers();
        let application = integrity::APPLICATION_ID;
        conn.execute_batch(&format!(
            "BEGIN;
             {upgrade}
             CREATE TABLE IF NOT EXISTS bundles(
                 digest TEXT PRIMARY KEY, name TEXT NOT NULL, channel TEXT NOT NULL,
                 version TEXT NOT NULL, sequence INTEGER NOT NULL, created TEXT NOT NULL,
                 expires TEXT NOT NULL, stack TEXT NOT NULL, origin TEXT NOT NULL,
                 received_at TEXT NOT NULL, irreversible TEXT NOT NULL DEFAULT '[]',
                 built_from TEXT NOT NULL DEFAULT '[]');
             CREATE TABLE IF NOT EXISTS rejections(
                 id INTEGER PRIMARY KEY, digest TEXT, origin TEXT NOT NULL,
                 check_name TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS decisions(
                 id INTEGER PRIMARY KEY, digest TEXT NOT NULL, version TEXT NOT NULL,
                 decision TEXT NOT NULL, who TEXT NOT NULL, reason TEXT, at TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events(
                 id INTEGER PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL,
                 digest TEXT, message TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS positions(key TEXT PRIMARY KEY, value TEXT);
             CREATE TABLE IF NOT EXISTS journal(
                 id INTEGER PRIMARY KEY, digest TEXT NOT NULL, step TEXT NOT NULL,
                 started_at TEXT NOT NULL, outcome TEXT, finished_at TEXT);
             CREATE TABLE IF NOT EXISTS snapshots(
                 id INTEGER PRIMARY KEY, release TEXT NOT NULL, resource TEXT NOT NULL,
                 ordinal INTEGER NOT NULL, location TEXT NOT NULL, bytes INTEGER,
                 taken_at TEXT NOT NULL, ready INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS restores(
                 resource TEXT NOT NULL, ordinal INTEGER NOT NULL, snapshot INTEGER NOT NULL,
                 queued_at TEXT NOT NULL, PRIMARY KEY(resource, ordinal));
             CREATE TABLE IF NOT EXISTS identity(id TEXT NOT NULL, writes INTEGER NOT NULL);
             {counted}
             PRAGMA user_version = {SCHEMA_VERSION};
             PRAGMA application_id = {application};
             COMMIT;"
        ))?;
        Ok(Store {
            conn: Mutex::new(conn),
            schema: SCHEMA_VERSION,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StateError("lock poisoned".into()))?;
        f(&mut conn)
    }

    pub fn positions(&self) -> Result<Positions> {
        let schema = self.schema;
        self.with(|conn| {
            let position = |key: &str| position(conn, key);
            let release = |digest: Option<String>| -> Result<Option<Release>> {
                match digest {
                    Some(d) => release_by_digest(conn, schema, &d),
                    None => Ok(None),
                }
            };
            let digest = |key: &str| -> Result<Option<Digest>> {
                position(key)?.map(|d| parse_digest(&d)).transpose()
            };
            let last_rejection = conn
                .prepare_cached(
                    "SELECT digest, origin, check_name, reason, at FROM rejections ORDER BY id DESC LIMIT 1",
                )?
                .query_row(
                    [],
                    |r| Ok(Rejection { digest: optional_digest_column(r, 0)?, origin: r.get(1)?, check: r.get(2)?, reason: r.get(3)?, at: r.get(4)? }),
                )
                .optional()?;
            Ok(Positions {
                current: release(position("current")?)?,
                pending: release(position("pending")?)?,
                last_good: release(position("last_good")?)?,
                waiting_for: position("waiting_for")?,
                pinned: position("pinned")?,
                highest_sequence: position("highest_sequence")?.and_then(|s| s.parse().ok()),
                last_rejection,
                converged: digest("converged")?,
                rolled_back: digest("rolled_back")?,
            })
        })
    }

    pub fn release(&self, digest: &Digest) -> Result<Option<Release>> {
        let schema = self.schema;
        self.with(|conn| release_by_digest(conn, schema, &digest.to_string()))
    }

    /// Records a verified release as pending, with what it waits for, and raises the highest
    /// accepted sequence, in one transaction. A previous pending release is superseded.
    pub fn accept(
        &self,
        release: &Release,
        waiting_for: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let irreversible =
            serde_json::to_string(&release.irreversible).map_err(|e| StateError(e.to_string()))?;
        let built_from =
            serde_json::to_string(&release.built_from).map_err(|e| StateError(e.to_string()))?;
        self.with(|conn| {
            let tx = conn.transaction()?;
            // The rollback floor is enforced here too, inside the transaction that raises it.
            let highest: Option<String> = position(&tx, "highest_sequence")?;
            if let Some(highest) = highest.and_then(|h| h.parse::<u64>().ok())
                && release.sequence <= highest
            {
                return Err(StateError(format!("sequence {} is not above the highest accepted sequence {highest}", release.sequence)));
            }
            tx.execute(
                "INSERT OR IGNORE INTO bundles(digest, name, channel, version, sequence, created, expires, stack, origin, received_at, irreversible, built_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![release.digest.to_string(), release.name, release.channel, release.version, release.sequence as i64, release.created, release.expires, release.stack, release.origin, release.received_at, irreversible, built_from],
            )?;
            let superseded: Option<String> = position(&tx, "pending")?;
            let digest = release.digest.to_string();
            set(&tx, "pending", Some(&digest))?;
            set(&tx, "waiting_for", waiting_for)?;
            set(&tx, "highest_sequence", Some(&release.sequence.to_string()))?;
            if let Some(old) = superseded.filter(|d| d != &digest) {
                event(&tx, at, "superseded", Some(&old), "a newer release replaced this pending one")?;
            }
            event(&tx, at, "accepted", Some(&digest), &format!("{} {} sequence {} from {}", release.name, release.version, release.sequence, release.origin))?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The trust root version accepted rotations brought trust to (None: the pinned one).
    pub fn root_version(&self) -> Result<Option<u64>> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            Ok(position(&tx, "root_version")?.and_then(|v| v.parse().ok()))
        })
    }

    pub fn set_root_version(&self, version: u64) -> Result<()> {
        self.with(|conn| set(conn, "root_version", Some(&version.to_string())).map(|_| ()))
    }

    /// A value a backend keeps across restarts (`vm.pool.default.good`), beside the positions.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            position(&tx, &format!("setting:{key}"))
        })
    }

    /// Sets (or, with `None`, clears) a backend's value.
    pub fn set_setting(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.with(|conn| set(conn, &format!("setting:{key}"), value).map(|_| ()))
    }

    pub fn set_waiting(&self, waiting_for: &str) -> Result<()> {
        self.with(|conn| set(conn, "waiting_for", Some(waiting_for)).map(|_| ()))
    }

    /// Makes the pending release `digest` current. Refused when `digest` is no longer pending
    /// (a decision or a newer release got there first).
    pub fn promote(&self, digest: &Digest, message: &str, at: DateTime<Utc>) -> Result<()> {
        let digest = &digest.to_string();
        self.with(|conn| {
            let tx = conn.transaction()?;
            expect_pending(&tx, digest)?;
            // The last good release is the one the runtime last ran healthy; with no runtime
            // (or none converged yet), the release this one replaces.
            let converged: Option<String> = position(&tx, "converged")?;
            let current: Option<String> = position(&tx, "current")?;
            if let Some(good) = converged.or(current).filter(|c| c != digest) {
                set(&tx, "last_good", Some(&good))?;
            }
            set(&tx, "current", Some(digest))?;
            set(&tx, "pending", None)?;
            set(&tx, "waiting_for", None)?;
            event(&tx, at, "applied", Some(digest), message)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Drops the pending release `digest` (rejected by the customer, or expired while waiting).
    pub fn drop_pending(&self, digest: &Digest, at: DateTime<Utc>, message: &str) -> Result<()> {
        let digest = &digest.to_string();
        self.with(|conn| {
            let tx = conn.transaction()?;
            drop_pending_in(&tx, digest, at, message)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn record_rejection(&self, rejection: &Rejection) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO rejections(digest, origin, check_name, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rejection.digest.map(|d| d.to_string()), rejection.origin, rejection.check, rejection.reason, rejection.at],
            )?;
            tx.execute(
                "INSERT INTO events(at, kind, digest, message) VALUES (?1, 'rejected', ?2, ?3)",
                params![rejection.at, rejection.digest.map(|d| d.to_string()), format!("{}: {} ({})", rejection.check, rejection.reason, rejection.origin)],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the customer's decision and its effect in one transaction: after a crash either
    /// both are there or neither.
    pub fn record_decision(&self, decision: &Decision, effect: Effect<'_>) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            match effect {
                Effect::None => {}
                Effect::Pin(version) => {
                    set(&tx, "pinned", version)?;
                }
                Effect::DropPending { message } => {
                    drop_pending_in(&tx, &decision_digest(decision)?, decision_time(decision)?, message)?;
                }
                Effect::RollBack { to, message, restore_data } => {
                    roll_back_in(&tx, &decision_digest(decision)?, &to.to_string(), message, decision_time(decision)?, restore_data)?;
                }
            }
            tx.execute(
                "INSERT INTO decisions(digest, version, decision, who, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![stored(decision.digest), decision.version, decision.decision, decision.who, decision.reason, decision.at],
            )?;
            let reason = decision.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            tx.execute(
                "INSERT INTO events(at, kind, digest, message) VALUES (?1, ?2, ?3, ?4)",
                params![decision.at, decision.decision, decision.digest.map(|d| d.to_string()), format!("{} {} by {}{reason}", decision.decision, decision.version, decision.who)],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Whether the customer approved this digest (and did not reject it since).
    pub fn approved(&self, digest: &Digest) -> Result<bool> {
        let digest = digest.to_string();
        self.with(|conn| {
            let last: Option<String> = conn
                .query_row(
                    "SELECT decision FROM decisions WHERE digest = ?1 AND decision IN ('approve', 'reject') ORDER BY id DESC LIMIT 1",
                    [digest],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(last.as_deref() == Some("approve"))
        })
    }

    /// Records that the runtime runs `digest`, healthy; false (nothing recorded) if `digest`
    /// is no longer current: the customer rolled back while it rolled out.
    pub fn set_converged(&self, digest: &Digest, message: &str, at: DateTime<Utc>) -> Result<bool> {
        let digest = &digest.to_string();
        self.with(|conn| {
            let tx = conn.transaction()?;
            if position(&tx, "current")?.as_deref() != Some(digest) {
                return Ok(false);
            }
            set(&tx, "converged", Some(digest))?;
            event(&tx, at, "converged", Some(digest), message)?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Makes `to` current again in place of `from` after `from` failed to roll out; false
    /// (nothing done) if `from` is no longer current: a decision came first. `from` stays
    /// known, so the source offering it again is not a rollback attack.
    /// The data of the resources `from` declared irreversible is restored to the snapshots
    /// taken before it: they are queued in the same transaction.
    pub fn roll_back(
        &self,
        from: &Digest,
        to: &Digest,
        message: &str,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let (from, to) = (&from.to_string(), &to.to_string());
        self.with(|conn| {
            let tx = conn.transaction()?;
            if position(&tx, "current")?.as_deref() != Some(from) {
                return Ok(false);
            }
            roll_back_in(&tx, from, to, message, at, true)?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Journals a rollout step before it runs; `finish_step` records how it ended.
    pub fn begin_step(&self, digest: &Digest, step: &str, at: DateTime<Utc>) -> Result<i64> {
        let digest = digest.to_string();
        self.with(|conn| {
            conn.execute(
                "INSERT INTO journal(digest, step, started_at) VALUES (?1, ?2, ?3)",
                params![digest, step, rfc3339::format(&at)],
            )?;
            Ok(conn.last_insert_rowid())
        })
    }

    pub fn finish_step(&self, id: i64, outcome: &str, at: DateTime<Utc>) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                "UPDATE journal SET outcome = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, outcome, rfc3339::format(&at)],
            )?;
            // The journal is for recovery and review; keep the latest steps only.
            conn.execute(
                "DELETE FROM journal WHERE id <= (SELECT MAX(id) FROM journal) - 10000",
                [],
            )?;
            Ok(())
        })
    }

    /// The latest `limit` journaled steps with their outcomes, oldest first.
    #[cfg(test)]
    pub fn journal(&self, limit: usize) -> Result<Vec<(String, String)>> {
        self.with(|conn| {
            let mut statement = conn.prepare(
                "SELECT step, COALESCE(outcome, 'running') FROM (SELECT * FROM journal ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )?;
            let steps = statement
                .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
            Ok(steps)
        })
    }

    /// Steps begun and never finished (the agent stopped mid-step): marked interrupted.
    pub fn interrupted_steps(&self, at: DateTime<Utc>) -> Result<Vec<(Digest, String)>> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let steps = {
                let mut statement = tx.prepare(
                    "SELECT digest, step FROM journal WHERE outcome IS NULL ORDER BY id",
                )?;
                statement
                    .query_map([], |r| Ok((digest_column(r, 0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<(Digest, String)>>>()?
            };
            tx.execute(
                "UPDATE journal SET outcome = 'interrupted', finished_at = ?1 WHERE outcome IS NULL",
                [rfc3339::format(&at)],
            )?;
            tx.commit()?;
            Ok(steps)
        })
    }

    pub fn event(
        &self,
        at: DateTime<Utc>,
        kind: &str,
        digest: Option<&Digest>,
        message: &str,
    ) -> Result<()> {
        let digest = digest.map(Digest::to_string);
        self.with(|conn| event(conn, at, kind, digest.as_deref(), message))
    }

    /// Newest first.
    pub fn history(&self, limit: usize) -> Result<Vec<Event>> {
        self.with(|conn| {
            let mut statement = conn.prepare(
                "SELECT at, kind, digest, message FROM events ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], |r| {
                Ok(Event {
                    at: r.get(0)?,
                    kind: r.get(1)?,
                    digest: r.get(2)?,
                    message: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
    }

    pub fn decisions(&self, limit: usize) -> Result<Vec<Decision>> {
        self.with(|conn| {
            let mut statement = conn.prepare("SELECT at, digest, version, decision, who, reason FROM decisions ORDER BY id DESC LIMIT ?1")?;
            let rows = statement.query_map([limit as i64], |r| {
                Ok(Decision { at: r.get(0)?, digest: optional_digest_column(r, 1)?, version: r.get(2)?, decision: r.get(3)?, who: r.get(4)?, reason: r.get(5)? })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
    }

    pub fn counts(&self) -> Result<(u64, u64)> {
        self.with(|conn| {
            let accepted: i64 = conn.query_row("SELECT count(*) FROM bundles", [], |r| r.get(0))?;
            let rejected: i64 =
                conn.query_row("SELECT count(*) FROM rejections", [], |r| r.get(0))?;
            Ok((accepted as u64, rejected as u64))
        })
    }
}

/// The release `digest` in a store at `schema` (older schemas lack the newer columns).
fn release_by_digest(conn: &Connection, schema: i64, digest: &str) -> Result<Option<Release>> {
    let irreversible = if schema >= 2 { "irreversible" } else { "'[]'" };
    let built_from = if schema >= 3 { "built_from" } else { "'[]'" };
    Ok(conn
        .prepare_cached(
            &format!("SELECT digest, name, channel, version, sequence, created, expires, stack, origin, received_at, {irreversible}, {built_from} FROM bundles WHERE digest = ?1"),
        )?
        .query_row(
            [digest],
            |r| {
                Ok(Release {
                    digest: digest_column(r, 0)?,
                    name: r.get(1)?,
                    channel: r.get(2)?,
                    version: r.get(3)?,
                    sequence: r.get::<_, i64>(4)? as u64,
                    created: r.get(5)?,
                    expires: r.get(6)?,
                    stack: r.get(7)?,
                    origin: r.get(8)?,
                    received_at: r.get(9)?,
                    irreversible: json_column(r, 10)?,
                    built_from: json_column(r, 11)?,
                    sealed: Sealed,
                })
            },
        )
        .optional()?)
}

/// A column holding JSON, read into `T`.
fn json_column<T: serde::de::DeserializeOwned>(
    row: &rusqlite::Row,
    index: usize,
) -> rusqlite::Result<T> {
    serde_json::from_str(&row.get::<_, String>(index)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Makes `to` current in place of `from`; with `restore_data`, queues the restores of what
/// `from` declared irreversible.
fn roll_back_in(
    tx: &rusqlite::Transaction<'_>,
    from: &str,
    to: &str,
    message: &str,
    at: DateTime<Utc>,
    restore_data: bool,
) -> Result<()> {
    let current: Option<String> = position(tx, "current")?;
    if current.as_deref() != Some(from) {
        return Err(StateError(format!(
            "{from} is no longer current; nothing was rolled back"
        )));
    }
    set(tx, "current", Some(to))?;
    set(tx, "rolled_back", Some(from))?;
    // What runs is a mix of both releases now: converging back is a rollout of its own.
    set(tx, "converged", None)?;
    event(tx, at, "rolled-back", Some(from), message)?;
    if restore_data {
        for snapshot in snapshots::queue_restores(tx, from, at)? {
            let message = format!(
                "{}-{}: data to be restored to the snapshot of {}",
                snapshot.resource, snapshot.ordinal, snapshot.taken_at
            );
            event(tx, at, "restore-queued", Some(from), &message)?;
        }
    }
    Ok(())
}

fn set(conn: &Connection, key: &str, value: Option<&str>) -> Result<usize> {
    Ok(conn.execute(
        "INSERT INTO positions(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?)
}

fn event(
    conn: &Connection,
    at: DateTime<Utc>,
    kind: &str,
    digest: Option<&str>,
    message: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO events(at, kind, digest, message) VALUES (?1, ?2, ?3, ?4)",
        params![rfc3339::format(&at), kind, digest, message],
    )?;
    Ok(())
}

/// One position (`current`, `pending`, `highest_sequence`, ...). Like the other queries each
/// drift pass runs, compiled once per connection (`prepare_cached`): compiling it each time
/// would run SQLite's parser and planner, code an idle agent would otherwise keep paged in.
fn position(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT value FROM positions WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?
        .flatten())
}

/// A decision's digest as stored: the empty text when it names no release (the column is NOT NULL).
fn stored(digest: Option<Digest>) -> String {
    digest.map(|d| d.to_string()).unwrap_or_default()
}

/// The release a decision that changes positions is about.
fn decision_digest(decision: &Decision) -> Result<String> {
    decision
        .digest
        .map(|d| d.to_string())
        .ok_or_else(|| StateError(format!("a {} decision names no release", decision.decision)))
}

fn decision_time(decision: &Decision) -> Result<DateTime<Utc>> {
    outpost_bundle_format::release::rfc3339::parse(&decision.at).map_err(StateError)
}

fn drop_pending_in(
    tx: &rusqlite::Transaction<'_>,
    digest: &str,
    at: DateTime<Utc>,
    message: &str,
) -> Result<()> {
    expect_pending(tx, digest)?;
    set(tx, "pending", None)?;
    set(tx, "waiting_for", None)?;
    event(tx, at, "dropped", Some(digest), message)?;
    Ok(())
}

fn expect_pending(tx: &rusqlite::Transaction<'_>, digest: &str) -> Result<()> {
    let pending = position(tx, "pending")?;
    if pending.as_deref() != Some(digest) {
        return Err(StateError(format!(
            "{digest} is no longer the pending release"
        )));
    }
    Ok(())
}

/// A digest as stored (text), checked on the way out of the store.
fn parse_digest(text: &str) -> Result<Digest> {
    Digest::parse(text).map_err(|e| StateError(format!("stored digest {text:?}: {e}")))
}

fn digest_column(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Digest> {
    let text: String = row.get(index)?;
    Digest::parse(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn optional_digest_column(
    row: &rusqlite::Row<'_>,
    index: usize,
) -> rusqlite::Result<Option<Digest>> {
    match row.get::<_, Option<String>>(index)? {
        Some(text) if !text.is_empty() => digest_column(row, index).map(Some),
        _ => Ok(None),
    }
}
