//! `--responses-store postgres://...`: one database shared by every replica. One client
//! (tokio-postgres pipelines concurrent queries over its connection), reconnected on the
//! next operation after the connection drops or an operation times out; each operation
//! (connecting included) has a deadline, so a database that stops answering costs a
//! request 503 after at most `DEADLINE`, never a hang. No TLS: reach a remote database
//! through a TLS sidecar or a private network.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{newer_schema, StoreError, Stored, Swept, SCHEMA_VERSION};

/// Longest one operation may take, connecting included.
const DEADLINE: Duration = Duration::from_secs(5);
/// Serializes schema creation between servers starting at once (an arbitrary key).
const MIGRATION_LOCK: i64 = 0x696e_6665_7264;

pub struct PostgresStore {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

fn failed(e: tokio_postgres::Error) -> StoreError {
    // Its Display is terse ("db error"); the source says what the server said.
    let detail = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    StoreError(format!("PostgreSQL: {e}{detail}"))
}

/// The URL without its password (in the user part or as `?password=`), for logs.
pub fn redact(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => match user.split_once(':') {
                Some((name, _)) => format!("{scheme}://{name}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    if query.is_empty() {
        return base;
    }
    let query: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError(format!("`{}` is not a PostgreSQL URL: {e}", redact(url))))?;
        let store = PostgresStore {
            url: url.to_owned(),
            client: tokio::sync::Mutex::new(None),
        };
        let version: String = store
            .with_client(|c| async move {
                c.batch_execute(&format!(
                    "BEGIN;
                     SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
                     CREATE TABLE IF NOT EXISTS inferd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                     CREATE TABLE IF NOT EXISTS inferd_responses (
                         seq BIGSERIAL PRIMARY KEY,
                         id TEXT NOT NULL UNIQUE,
                         created_at BIGINT NOT NULL,
                         bytes BIGINT NOT NULL,
                         response TEXT NOT NULL,
                         input_items TEXT NOT NULL,
                         conversation TEXT NOT NULL);
                     CREATE INDEX IF NOT EXISTS inferd_responses_created_at ON inferd_responses (created_at);
                     CREATE INDEX IF NOT EXISTS inferd_responses_bytes ON inferd_responses (bytes);
                     INSERT INTO inferd_meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}')
                         ON CONFLICT (key) DO NOTHING;
                     COMMIT;"
                ))
                .await?;
                c.query_one("SELECT value FROM inferd_meta WHERE key = 'schema_version'", &[])
                    .await?
                    .try_get(0)
            })
            .await?;
        let version: i64 = version
            .parse()
            .map_err(|_| StoreError(format!("the responses store has a schema version `{version}`")))?;
        if version > SCHEMA_VERSION {
            return Err(newer_schema(version));
        }
        Ok(store)
    }

    /// The client, connecting first when there is none or its connection has closed.
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *guard = None;
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await.map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                crate::warn!("responses store: {}", failed(e));
            }
        });
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    /// Forgets the client (unless a reconnection holds it, which replaces it anyway).
    fn drop_client(&self) {
        if let Ok(mut guard) = self.client.try_lock() {
            *guard = None;
        }
    }

    /// Runs one operation, connecting first if needed, all within `DEADLINE`. After a
    /// timeout, or an error of the connection itself (one without an SQLSTATE), the
    /// client is dropped, so the next operation starts on a fresh connection.
    async fn with_client<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let attempt = async {
            let c = self.client().await?;
            op(c).await.map_err(|e| {
                if e.code().is_none() {
                    self.drop_client();
                }
                failed(e)
            })
        };
        match tokio::time::timeout(DEADLINE, attempt).await {
            Ok(result) => result,
            Err(_) => {
                self.drop_client();
                Err(StoreError(format!(
                    "PostgreSQL did not answer within {} s",
                    DEADLINE.as_secs()
                )))
            }
        }
    }

    pub async fn get(&self, id: &str, cutoff: i64) -> Result<Option<Stored>, StoreError> {
        let row = self
            .with_client(|c| async move {
                c.query_opt(
                    "SELECT response, input_items, conversation FROM inferd_responses WHERE id = $1 AND created_at >= $2",
                    &[&id, &cutoff],
                )
                .await
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let text = |i: usize| {
            row.try_get::<_, String>(i)
                .map_err(|e| StoreError(format!("PostgreSQL: an unexpected stored value: {e}")))
        };
        Stored::from_texts(&text(0)?, &text(1)?, &text(2)?).map(Some)
    }

    pub async fn put(&self, id: &str, created_at: i64, stored: &Stored) -> Result<(), StoreError> {
        let ([response, input_items, conversation], bytes) = stored.texts();
        let bytes = bytes as i64;
        let (response, input_items, conversation) = (&response, &input_items, &conversation);
        self.with_client(|c| async move {
            c.execute(
                "INSERT INTO inferd_responses (id, created_at, bytes, response, input_items, conversation)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &created_at, &bytes, response, input_items, conversation],
            )
            .await
        })
        .await
        .map(drop)
    }

    /// Removes a response that is not past its time to live.
    pub async fn remove(&self, id: &str, cutoff: i64) -> Result<bool, StoreError> {
        self.with_client(|c| async move {
            c.execute(
                "DELETE FROM inferd_responses WHERE id = $1 AND created_at >= $2",
                &[&id, &cutoff],
            )
            .await
        })
        .await
        .map(|n| n > 0)
    }

    pub async fn sweep(&self, cutoff: i64, max_count: Option<u64>, max_bytes: u64) -> Result<Swept, StoreError> {
        let max_count = max_count.map(|m| m.min(i64::MAX as u64) as i64);
        let max_bytes = max_bytes.min(i64::MAX as u64) as i64;
        self.with_client(|c| async move {
            let expired = c
                .execute("DELETE FROM inferd_responses WHERE created_at < $1", &[&cutoff])
                .await?;
            // The caps' deletes read every row: first a look at the totals (which the
            // bytes index covers).
            let totals = c
                .query_one(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM inferd_responses",
                    &[],
                )
                .await?;
            let (count, bytes): (i64, i64) = (totals.try_get(0)?, totals.try_get(1)?);
            let mut over_cap = 0;
            if let Some(max) = max_count.filter(|&m| count > m) {
                over_cap += c.execute(super::SWEEP_COUNT_SQL, &[&max]).await?;
            }
            if bytes > max_bytes {
                over_cap += c.execute(super::SWEEP_BYTES_SQL, &[&max_bytes]).await?;
            }
            Ok(Swept { expired, over_cap })
        })
        .await
    }
}
