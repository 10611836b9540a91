//! `--responses-store sqlite:PATH` (the default): one file, WAL mode, bundled SQLite.
//! One connection, used from the blocking pool; after any failure it is dropped and the
//! next operation opens a fresh one, so a store that was full or unwritable recovers
//! by itself once it is not.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{newer_schema, StoreError, Stored, Swept, SCHEMA_VERSION};

pub struct SqliteStore {
    path: PathBuf,
    full_sync: bool,
    conn: Arc<Mutex<Option<Connection>>>,
}

fn failed(e: rusqlite::Error) -> StoreError {
    StoreError(format!("SQLite: {e}"))
}

fn connect(path: &Path, full_sync: bool) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let _: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    }
    // WAL with NORMAL: a commit survives the process dying (kill -9); FULL also waits
    // for the disk, so it survives the machine losing power.
    c.pragma_update(None, "synchronous", if full_sync { "FULL" } else { "NORMAL" })?;
    Ok(c)
}

/// The schema, created or checked at start (inside one write transaction, so two
/// servers starting on one file do not race).
fn migrate(c: &mut Connection) -> Result<(), StoreError> {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(failed)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS inferd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS inferd_responses (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             id TEXT NOT NULL UNIQUE,
             created_at INTEGER NOT NULL,
             bytes INTEGER NOT NULL,
             response TEXT NOT NULL,
             input_items TEXT NOT NULL,
             conversation TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS inferd_responses_created_at ON inferd_responses (created_at);
             CREATE INDEX IF NOT EXISTS inferd_responses_bytes ON inferd_responses (bytes);",
    )
    .map_err(failed)?;
    tx.execute(
        "INSERT OR IGNORE INTO inferd_meta (key, value) VALUES ('schema_version', ?1)",
        params![SCHEMA_VERSION.to_string()],
    )
    .map_err(failed)?;
    let version: String = tx
        .query_row("SELECT value FROM inferd_meta WHERE key = 'schema_version'", [], |r| {
            r.get(0)
        })
        .map_err(failed)?;
    let version: i64 = version
        .parse()
        .map_err(|_| StoreError(format!("the responses store has a schema version `{version}`")))?;
    if version > SCHEMA_VERSION {
        return Err(newer_schema(version));
    }
    tx.commit().map_err(failed)
}

impl SqliteStore {
    pub async fn open(path: &Path, full_sync: bool) -> Result<SqliteStore, StoreError> {
        // Conversations are user data: a new folder and file are the owner's alone (the
        // WAL and shared-memory files take the file's mode).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", path.display())))?;
        }
        let store = SqliteStore {
            path: path.to_owned(),
            full_sync,
            conn: Arc::default(),
        };
        store.run(|c| Ok(migrate(c))).await??;
        Ok(store)
    }

    /// Runs `f` on the connection (opened first if there is none) on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (conn, path, full_sync) = (self.conn.clone(), self.path.clone(), self.full_sync);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            let c = match guard.as_mut() {
                Some(c) => c,
                None => guard.insert(connect(&path, full_sync).map_err(failed)?),
            };
            let result = f(c);
            if result.is_err() {
                *guard = None;
            }
            result.map_err(failed)
        })
        .await
        .map_err(|e| StoreError(format!("the store's task failed: {e}")))?
    }

    pub async fn get(&self, id: &str, cutoff: i64) -> Result<Option<Stored>, StoreError> {
        let id = id.to_owned();
        let row = self
            .run(move |c| {
                c.query_row(
                    "SELECT response, input_items, conversation FROM inferd_responses WHERE id = ?1 AND created_at >= ?2",
                    params![id, cutoff],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(a, b, c)| Stored::from_texts(&a, &b, &c)).transpose()
    }

    pub async fn put(&self, id: &str, created_at: i64, stored: &Stored) -> Result<(), StoreError> {
        let ([response, input_items, conversation], bytes) = stored.texts();
        let id = id.to_owned();
        self.run(move |c| {
            c.execute(
                "INSERT INTO inferd_responses (id, created_at, bytes, response, input_items, conversation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, created_at, bytes as i64, response, input_items, conversation],
            )
        })
        .await
        .map(drop)
    }

    /// Removes a response that is not past its time to live.
    pub async fn remove(&self, id: &str, cutoff: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.execute(
                "DELETE FROM inferd_responses WHERE id = ?1 AND created_at >= ?2",
                params![id, cutoff],
            )
        })
        .await
        .map(|n| n > 0)
    }

    pub async fn sweep(&self, cutoff: i64, max_count: Option<u64>, max_bytes: u64) -> Result<Swept, StoreError> {
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let expired = tx.execute("DELETE FROM inferd_responses WHERE created_at < ?1", params![cutoff])?;
            // The caps' deletes read every row: first a look at the totals (which the
            // bytes index covers).
            let (count, bytes): (i64, i64) = tx.query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM inferd_responses",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let max_bytes = max_bytes.min(i64::MAX as u64) as i64;
            let mut over_cap = 0;
            if let Some(max) = max_count.map(|m| m.min(i64::MAX as u64) as i64).filter(|&m| count > m) {
                over_cap += tx.execute(super::SWEEP_COUNT_SQL, params![max])?;
            }
            if bytes > max_bytes {
                over_cap += tx.execute(super::SWEEP_BYTES_SQL, params![max_bytes])?;
            }
            tx.commit()?;
            Ok(Swept {
                expired: expired as u64,
                over_cap: over_cap as u64,
            })
        })
        .await
    }
}
