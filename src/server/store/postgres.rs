//! `--responses-store postgres://...`: one database shared by every replica. One client
//! (tokio-postgres pipelines concurrent queries over its connection), reconnected on the
//! next operation after the connection drops; each operation has a deadline, so a
//! database that stops answering costs a request 503 after at most `DEADLINE`, never a
//! hang. No TLS: reach a remote database through a TLS sidecar or a private network.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{newer_schema, StoreError, Stored, Swept, SCHEMA_VERSION};

/// Longest a connection attempt or a query may take.
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

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

async fn deadline<T>(
    what: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(DEADLINE, what).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(StoreError(format!(
            "PostgreSQL did not answer within {} s",
            DEADLINE.as_secs()
        ))),
    }
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        url.parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError(format!("`{}` is not a PostgreSQL URL: {e}", redact(url))))?;
        let store = PostgresStore {
            url: url.to_owned(),
            client: tokio::sync::Mutex::new(None),
        };
        let c = store.client().await?;
        deadline(c.batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS inferd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS responses (
                 seq BIGSERIAL PRIMARY KEY,
                 id TEXT NOT NULL UNIQUE,
                 created_at BIGINT NOT NULL,
                 bytes BIGINT NOT NULL,
                 response TEXT NOT NULL,
                 input_items TEXT NOT NULL,
                 conversation TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
             INSERT INTO inferd_meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}')
                 ON CONFLICT (key) DO NOTHING;
             COMMIT;"
        )))
        .await?;
        let row = deadline(c.query_one("SELECT value FROM inferd_meta WHERE key = 'schema_version'", &[])).await?;
        let version: String = row.get(0);
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
        let (client, connection) = deadline(tokio_postgres::connect(&self.url, NoTls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                crate::warn!("responses store: {}", failed(e));
            }
        });
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    pub async fn get(&self, id: &str, cutoff: i64) -> Result<Option<Stored>, StoreError> {
        let c = self.client().await?;
        let row = deadline(c.query_opt(
            "SELECT response, input_items, conversation FROM responses WHERE id = $1 AND created_at >= $2",
            &[&id, &cutoff],
        ))
        .await?;
        row.map(|r| Stored::from_texts(r.get(0), r.get(1), r.get(2)))
            .transpose()
    }

    pub async fn put(&self, id: &str, created_at: i64, stored: &Stored) -> Result<(), StoreError> {
        let ([response, input_items, conversation], bytes) = stored.texts();
        let c = self.client().await?;
        deadline(c.execute(
            "INSERT INTO responses (id, created_at, bytes, response, input_items, conversation)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &created_at,
                &(bytes as i64),
                &response,
                &input_items,
                &conversation,
            ],
        ))
        .await
        .map(drop)
    }

    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        deadline(c.execute("DELETE FROM responses WHERE id = $1", &[&id]))
            .await
            .map(|n| n > 0)
    }

    pub async fn sweep(&self, cutoff: i64, max_count: Option<u64>, max_bytes: u64) -> Result<Swept, StoreError> {
        let c = self.client().await?;
        let expired = deadline(c.execute("DELETE FROM responses WHERE created_at < $1", &[&cutoff])).await?;
        let mut over_cap = 0;
        if let Some(max) = max_count {
            let max = max.min(i64::MAX as u64) as i64;
            over_cap += deadline(c.execute(super::SWEEP_COUNT_SQL, &[&max])).await?;
        }
        let max = max_bytes.min(i64::MAX as u64) as i64;
        over_cap += deadline(c.execute(super::SWEEP_BYTES_SQL, &[&max])).await?;
        Ok(Swept { expired, over_cap })
    }
}
