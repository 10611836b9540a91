//! Where the Responses API keeps what it answers (`store: true`): the response object,
//! its input items and the conversation `previous_response_id` continues. Three kinds
//! behind one type (`--responses-store`): SQLite in a file (the default: embedded, WAL
//! mode), PostgreSQL for several replicas, and memory (nothing survives a restart).
//! Each creates and migrates its own schema at start; a background sweep enforces the
//! time to live and the size caps. Every operation is off the tokio workers' hot path
//! (SQLite calls run on the blocking pool) and fails with `StoreError`, which the routes
//! answer with 503, never a panic.

mod memory;
mod postgres;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A finished response as it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub response: Value,
    pub input_items: Vec<Value>,
    /// The whole conversation as chat messages (without instructions), output included:
    /// what a request naming this one as `previous_response_id` continues.
    pub conversation: Vec<Value>,
}

impl Stored {
    /// Its three parts as JSON text, and their total length (what the size cap counts).
    fn texts(&self) -> ([String; 3], u64) {
        let texts = [
            self.response.to_string(),
            Value::from(self.input_items.clone()).to_string(),
            Value::from(self.conversation.clone()).to_string(),
        ];
        let bytes = texts.iter().map(|t| t.len() as u64).sum();
        (texts, bytes)
    }

    fn from_texts(response: &str, input_items: &str, conversation: &str) -> Result<Stored, StoreError> {
        let parse = |what: &str, text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| StoreError(format!("a stored {what} does not parse: {e}")))
        };
        let list = |v: Value| match v {
            Value::Array(items) => items,
            other => vec![other],
        };
        Ok(Stored {
            response: parse("response", response)?,
            input_items: list(parse("input item list", input_items)?),
            conversation: list(parse("conversation", conversation)?),
        })
    }
}

/// The store could not do what was asked (database down, disk full, file not
/// writable): what went wrong, for the log and the 503.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// What `--responses-store` names.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUrl {
    Memory,
    /// A file, and whether each commit waits for the disk (`?synchronous=full`) rather
    /// than only for the operating system (WAL's `NORMAL`, the default).
    Sqlite {
        path: PathBuf,
        full_sync: bool,
    },
    /// A `postgres://` or `postgresql://` URL, as libpq reads it.
    Postgres(String),
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        if text == "memory" {
            return Ok(StoreUrl::Memory);
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(text.to_owned()));
        }
        if let Some(rest) = text.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err("`sqlite:` needs a file path (sqlite:/var/lib/inferd/responses.db)".into());
            }
            let mut full_sync = false;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair {
                    "synchronous=full" => full_sync = true,
                    "synchronous=normal" => full_sync = false,
                    other => {
                        return Err(format!(
                            "unknown SQLite option `{other}` (synchronous=normal or synchronous=full)"
                        ))
                    }
                }
            }
            return Ok(StoreUrl::Sqlite {
                path: PathBuf::from(path),
                full_sync,
            });
        }
        Err(format!(
            "`{text}` is not a store: memory, sqlite:PATH or postgres://USER@HOST:PORT/DB"
        ))
    }

    /// The default: `responses.sqlite3` in inferd's cache folder
    /// (`$XDG_CACHE_HOME/inferd`, else `~/.cache/inferd`).
    pub fn default_sqlite() -> StoreUrl {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("."));
        StoreUrl::Sqlite {
            path: base.join("inferd").join("responses.sqlite3"),
            full_sync: false,
        }
    }

    /// For the log: the kind and where (a PostgreSQL password left out).
    pub fn describe(&self) -> String {
        match self {
            StoreUrl::Memory => "memory".into(),
            StoreUrl::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => postgres::redact(url),
        }
    }
}

/// How long responses are kept and how much.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Responses older than this are removed (OpenAI keeps them 30 days).
    pub ttl: Duration,
    /// Most responses kept (the oldest go first); `None` for no count cap.
    pub max_count: Option<u64>,
    /// Most bytes of stored JSON (response, input items and conversation).
    pub max_bytes: u64,
    /// How often the sweep runs.
    pub sweep_every: Duration,
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: u64,
    pub over_cap: u64,
}

enum Kind {
    Memory(memory::MemoryStore),
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

pub struct ResponseStore {
    kind: Kind,
    pub retention: Retention,
    url: StoreUrl,
}

impl ResponseStore {
    /// Opens the store, creating or migrating its schema; an error here stops the
    /// server from starting (a store that cannot be reached at start is a setup error).
    pub async fn open(url: StoreUrl, retention: Retention) -> Result<ResponseStore, StoreError> {
        let kind = match &url {
            StoreUrl::Memory => Kind::Memory(memory::MemoryStore::new(retention.max_count, retention.max_bytes)),
            StoreUrl::Sqlite { path, full_sync } => Kind::Sqlite(sqlite::SqliteStore::open(path, *full_sync).await?),
            StoreUrl::Postgres(url) => Kind::Postgres(postgres::PostgresStore::open(url).await?),
        };
        Ok(ResponseStore { kind, retention, url })
    }

    pub fn describe(&self) -> String {
        self.url.describe()
    }

    /// A stored response, unless it is past its time to live (swept or not yet).
    pub async fn get(&self, id: &str) -> Result<Option<Stored>, StoreError> {
        let cutoff = self.cutoff();
        match &self.kind {
            Kind::Memory(m) => Ok(m.get(id, cutoff)),
            Kind::Sqlite(s) => s.get(id, cutoff).await,
            Kind::Postgres(p) => p.get(id, cutoff).await,
        }
    }

    /// Responses created before this (unix seconds) are past their time to live.
    fn cutoff(&self) -> i64 {
        now_unix() as i64 - self.retention.ttl.as_secs().min(i64::MAX as u64) as i64
    }

    /// Stores a response under its id; returns once it is committed.
    pub async fn put(&self, id: &str, stored: &Stored) -> Result<(), StoreError> {
        if self.retention.max_count == Some(0) {
            return Ok(());
        }
        let created_at = stored.response["created_at"]
            .as_i64()
            .unwrap_or_else(|| now_unix() as i64);
        match &self.kind {
            Kind::Memory(m) => m.put(id, created_at, stored.clone()),
            Kind::Sqlite(s) => s.put(id, created_at, stored).await,
            Kind::Postgres(p) => p.put(id, created_at, stored).await,
        }
    }

    /// Removes a response: whether there was one (one past its time to live is gone
    /// already, as `get` has it).
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let cutoff = self.cutoff();
        match &self.kind {
            Kind::Memory(m) => Ok(m.remove(id, cutoff)),
            Kind::Sqlite(s) => s.remove(id, cutoff).await,
            Kind::Postgres(p) => p.remove(id, cutoff).await,
        }
    }

    /// Removes what is past its time to live, then the oldest responses while over a cap.
    pub async fn sweep(&self) -> Result<Swept, StoreError> {
        let cutoff = self.cutoff();
        let (count, bytes) = (self.retention.max_count, self.retention.max_bytes);
        match &self.kind {
            Kind::Memory(m) => Ok(m.sweep(cutoff, count, bytes)),
            Kind::Sqlite(s) => s.sweep(cutoff, count, bytes).await,
            Kind::Postgres(p) => p.sweep(cutoff, count, bytes).await,
        }
    }

    /// Sweeps now and then every `sweep_every`, logging what it removed and any failure.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let store = Arc::downgrade(self);
        let every = self.retention.sweep_every;
        tokio::spawn(async move {
            loop {
                let Some(store) = store.upgrade() else { return };
                match store.sweep().await {
                    Ok(Swept {
                        expired: 0,
                        over_cap: 0,
                    }) => {}
                    Ok(s) => crate::info!(
                        "responses store: removed {} expired and {} over the cap",
                        s.expired,
                        s.over_cap
                    ),
                    Err(e) => crate::warn!("responses store: sweep failed: {e}"),
                }
                drop(store);
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// A new response id body: 128 random bits in hex, so ids are unguessable and two
/// servers on one database never pick the same one.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No system randomness: the clock and a counter still give unique ids.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The sweep's caps, in SQL both databases read: the oldest rows beyond the newest
/// `$1`, and the oldest rows once the newest ones' bytes add up to more than `$1`.
const SWEEP_COUNT_SQL: &str =
    "DELETE FROM inferd_responses WHERE seq <= (SELECT seq FROM inferd_responses ORDER BY seq DESC LIMIT 1 OFFSET $1)";
const SWEEP_BYTES_SQL: &str = "DELETE FROM inferd_responses WHERE seq <= (SELECT seq FROM \
     (SELECT seq, CAST(SUM(bytes) OVER (ORDER BY seq DESC) AS BIGINT) AS total FROM inferd_responses) AS t \
     WHERE total > $1 ORDER BY seq DESC LIMIT 1)";

/// The schema version this build writes; a database at a newer version is refused.
const SCHEMA_VERSION: i64 = 1;

fn newer_schema(found: i64) -> StoreError {
    StoreError(format!(
        "the responses store is at schema version {found}, written by a newer inferd (this one knows {SCHEMA_VERSION})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_ids_differ() {
        assert_eq!(StoreUrl::parse("memory"), Ok(StoreUrl::Memory));
        assert_eq!(
            StoreUrl::parse("sqlite:/var/x.db?synchronous=full"),
            Ok(StoreUrl::Sqlite {
                path: "/var/x.db".into(),
                full_sync: true
            })
        );
        assert_eq!(
            StoreUrl::parse("sqlite://rel/x.db"),
            Ok(StoreUrl::Sqlite {
                path: "rel/x.db".into(),
                full_sync: false
            })
        );
        assert!(StoreUrl::parse("sqlite:").is_err());
        assert!(StoreUrl::parse("sqlite:/x?journal=off").is_err());
        assert!(StoreUrl::parse("mysql://x").is_err());
        assert_eq!(
            StoreUrl::parse("postgres://u:secret@h:5/db").unwrap().describe(),
            "postgres://u:***@h:5/db"
        );
        let a = new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_id());
    }
}
