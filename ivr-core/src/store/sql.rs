//! The SQL store: one implementation for SQLite and PostgreSQL.
//!
//! It goes through sqlx's `Any` driver with runtime queries, so a build never needs a database
//! and one set of SQL serves both engines: the schema sticks to types both share (text ids,
//! BIGINT microseconds) and `$n` placeholders, which SQLite accepts too.
//!
//! Transitions are optimistic: read the call, run [`Call::apply`] in Rust, then write it back
//! only if the row's `version` (its history length) is unchanged. A writer that loses the race
//! reads again and re-evaluates, so exactly one of any set of conflicting writers wins.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool, Executor, Row};
use time::OffsetDateTime;

use super::outbox;
use super::{from_micros, micros, Applied, CallPage, CallQuery, CallStore};
use crate::call::{Call, CallId, CallSpec, CallStatus, Hangup, Transition, TransitionRecord};
use crate::error::{Conflict, Error, Result};
use crate::webhook::{outbox_entries, Attempt, Delivery};

/// Longest a single store operation may take before it is reported as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// A race lost this many times in a row means something is wrong, not busy.
const MAX_APPLY_ROUNDS: usize = 64;
/// Ids per `IN (…)` list, well under both engines' bound-parameter limits.
const IN_CHUNK: usize = 500;

/// ivr-core's migrations, embedded in the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "calls", include_str!("../../migrations/0001_calls.sql")),
    (2, "sent_at", include_str!("../../migrations/0002_sent_at.sql")),
    (3, "ended_at", include_str!("../../migrations/0003_ended_at.sql")),
    (4, "instances", include_str!("../../migrations/0004_instances.sql")),
    (5, "status_callbacks", include_str!("../../migrations/0005_status_callbacks.sql")),
];

/// A [`CallStore`] on SQLite or PostgreSQL. Cheap to clone: it is a connection pool handle.
#[derive(Clone, Debug)]
pub struct SqlCallStore {
    pool: AnyPool,
    engine: Engine,
    /// The lease new calls are stored as followed by (`calls.owner`), if any.
    owner: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

impl SqlCallStore {
    /// Connects to `url` (`sqlite:…` or `postgres://…`) and brings the schema up to date.
    /// A SQLite file is created when missing and put in WAL mode.
    pub async fn connect(url: &str) -> Result<Self> {
        let store = Self::connect_without_migrating(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens (creating if needed) the SQLite database file at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    /// Connects without touching the schema (for `ivr-server migrate`-style tooling).
    pub async fn connect_without_migrating(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (engine, url) = engine_url(url)?;
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            // A ping before every checkout doubles the round trips of a read; a broken
            // connection fails its query instead and is replaced.
            .test_before_acquire(false);
        let options = match engine {
            // One writer at a time is SQLite's nature; a few readers beside it is plenty.
            Engine::Sqlite => options.max_connections(8).after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers proceed beside the writer; NORMAL sync is the durable
                    // setting recommended with WAL (a power cut may lose the last commits, a
                    // crash of the process loses nothing).
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;").await?;
                    Ok(())
                })
            }),
            Engine::Postgres => options.max_connections(16),
        };
        let pool = options.connect(&url).await.map_err(unavailable)?;
        Ok(SqlCallStore { pool, engine, owner: None })
    }

    /// Applies the embedded migrations that have not run yet.
    pub async fn migrate(&self) -> Result<()> {
        EmbeddedMigrations(MIGRATIONS).run(&self.pool).await
    }

    /// The pool, for components that keep their own tables in the same database.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn engine(&self) -> Engine {
        self.engine
    }

    /// Whether the database is PostgreSQL (which can `LISTEN`), not SQLite.
    pub fn is_postgres(&self) -> bool {
        self.engine == Engine::Postgres
    }

    /// This store, storing new calls as followed by the lease `lease_id` (`calls.owner`).
    pub fn with_owner(&self, lease_id: &str) -> SqlCallStore {
        SqlCallStore { owner: Some(lease_id.to_owned()), ..self.clone() }
    }

    async fn load(&self, conn: &mut AnyConnection, call_id: CallId) -> Result<Option<Call>> {
        let rows = sqlx::query(SELECT_CALL_WITH_HISTORY)
            .bind(call_id.to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?;
        let Some(first) = rows.first() else { return Ok(None) };
        let mut history = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>("t_seq").map_err(corrupt)?.is_some() {
                history.push(decode_transition(row)?);
            }
        }
        decode_call(first, history).map(Some)
    }

    /// Decodes call rows and attaches their histories, read in a few batched queries.
    async fn with_histories(&self, rows: Vec<AnyRow>) -> Result<Vec<Call>> {
        let mut versions = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("call_id").map_err(corrupt)?;
            let version: i64 = row.try_get("version").map_err(corrupt)?;
            versions.push((id, version));
        }
        let mut histories: HashMap<String, Vec<TransitionRecord>> = HashMap::with_capacity(rows.len());
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        for chunk in versions.chunks(IN_CHUNK) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("{SELECT_HISTORIES_PREFIX}{}) ORDER BY call_id, seq", placeholders.join(", "));
            let mut query = sqlx::query(&sql);
            for (id, _) in chunk {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&mut *conn).await.map_err(unavailable)? {
                let id: String = row.try_get("call_id").map_err(corrupt)?;
                histories.entry(id).or_default().push(decode_transition(&row)?);
            }
        }
        rows.iter()
            .zip(versions)
            .map(|(row, (id, version))| {
                let mut history = histories.remove(&id).unwrap_or_default();
                // Rows past `version` belong to a write that committed after the call row was
                // read; leave them to the next read so the call stays a consistent snapshot.
                history.truncate(version as usize);
                decode_call(row, history)
            })
            .collect()
    }

    /// One round of the optimistic apply. `None` means another writer got there first.
    async fn try_apply(&self, call_id: CallId, transition: &Transition) -> Result<Option<Applied>> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let current = self.load(&mut conn, call_id).await?.ok_or(Error::NotFound(call_id))?;
        let mut next = current.clone();
        if let Err(why) = next.apply(transition) {
            return Ok(Some(Applied::Ignored { call: current, why }));
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(unavailable)?;
        let updated = bind_state(sqlx::query(UPDATE_STATE), &next)
            .bind(call_id.to_string())
            .bind(current.history.len() as i64)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        insert_history(&mut tx, &next, current.history.len()).await.map_err(unavailable)?;
        outbox::insert(&mut tx, &outbox_entries(&next, current.history.len())).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(Applied::Changed(next)))
    }

    async fn try_insert(&self, call: &Call) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let query = sqlx::query(INSERT_CALL).bind(call.call_id.to_string());
        let query = bind_spec(query, &call.spec).bind(micros(call.created_at));
        bind_state(query, call).bind(self.owner.as_deref()).execute(&mut *tx).await?;
        insert_history(&mut tx, call, 0).await?;
        outbox::insert(&mut tx, &outbox_entries(call, 0)).await?;
        tx.commit().await
    }

    /// The call that an insert of `call` collided with, and on which key.
    async fn existing_for(&self, call: &Call) -> Result<Option<(Conflict, Call)>> {
        if let Some(existing) = self.get(call.call_id).await? {
            return Ok(Some((Conflict::CallId, existing)));
        }
        if let Some(key) = &call.spec.idempotency_key {
            if let Some(existing) = self.get_by_idempotency_key(key).await? {
                return Ok(Some((Conflict::IdempotencyKey, existing)));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl CallStore for SqlCallStore {
    async fn insert(&self, call: &Call) -> Result<()> {
        bounded(async {
            match self.try_insert(call).await {
                Ok(()) => Ok(()),
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => match self.existing_for(call).await? {
                    Some((on, existing)) => Err(Error::AlreadyExists { on, existing: Box::new(existing) }),
                    // The colliding row vanished in between (a purge deleted it).
                    None => Err(unavailable(sqlx::Error::Database(e))),
                },
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn get(&self, call_id: CallId) -> Result<Option<Call>> {
        bounded(async {
            let mut conn = self.pool.acquire().await.map_err(unavailable)?;
            self.load(&mut conn, call_id).await
        })
        .await
    }

    async fn get_by_idempotency_key(&self, key: &str) -> Result<Option<Call>> {
        bounded(async {
            let row = sqlx::query("SELECT call_id FROM calls WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
            match row {
                None => Ok(None),
                Some(row) => {
                    let id = parse_id(&row.try_get::<String, _>("call_id").map_err(corrupt)?)?;
                    let mut conn = self.pool.acquire().await.map_err(unavailable)?;
                    self.load(&mut conn, id).await
                }
            }
        })
        .await
    }

    async fn apply(&self, call_id: CallId, transition: &Transition) -> Result<Applied> {
        bounded(async {
            for _ in 0..MAX_APPLY_ROUNDS {
                if let Some(applied) = self.try_apply(call_id, transition).await? {
                    return Ok(applied);
                }
            }
            Err(Error::StoreUnavailable(format!("call {call_id}: too many concurrent writers").into()))
        })
        .await
    }

    async fn list(&self, query: &CallQuery) -> Result<CallPage> {
        bounded(async {
            let size = query.page_size();
            let mut sql = format!("{SELECT_CALLS} WHERE 1 = 1");
            let mut n = 0;
            let mut param = || {
                n += 1;
                format!("${n}")
            };
            if !query.statuses.is_empty() {
                let list: Vec<String> = query.statuses.iter().map(|_| param()).collect();
                sql += &format!(" AND status IN ({})", list.join(", "));
            }
            if query.created_from.is_some() {
                sql += &format!(" AND created_at >= {}", param());
            }
            if query.created_to.is_some() {
                sql += &format!(" AND created_at < {}", param());
            }
            if query.phone_number.is_some() {
                sql += &format!(" AND phone_number = {}", param());
            }
            if query.after.is_some() {
                sql += &format!(" AND (created_at, call_id) < ({}, {})", param(), param());
            }
            sql += &format!(" ORDER BY created_at DESC, call_id DESC LIMIT {}", param());

            let mut q = sqlx::query(&sql);
            for status in &query.statuses {
                q = q.bind(status.as_str());
            }
            if let Some(from) = query.created_from {
                q = q.bind(micros(from));
            }
            if let Some(to) = query.created_to {
                q = q.bind(micros(to));
            }
            if let Some(number) = &query.phone_number {
                q = q.bind(number.as_str());
            }
            if let Some(after) = query.after {
                q = q.bind(after.created_at_micros).bind(after.call_id.to_string());
            }
            let rows = q.bind(size as i64 + 1).fetch_all(&self.pool).await.map_err(unavailable)?;
            Ok(CallPage::from_one_extra(self.with_histories(rows).await?, size))
        })
        .await
    }

    async fn list_active(&self) -> Result<Vec<Call>> {
        bounded(async {
            let sql = format!("{SELECT_CALLS} WHERE status IN ('pending', 'dialing', 'ringing', 'answered')");
            debug_assert!(CallStatus::ACTIVE.iter().all(|s| sql.contains(&format!("'{s}'"))));
            let rows = sqlx::query(&sql).fetch_all(&self.pool).await.map_err(unavailable)?;
            self.with_histories(rows).await
        })
        .await
    }

    async fn deliveries(&self, call_id: CallId) -> Result<Vec<Delivery>> {
        bounded(outbox::of_call(&self.pool, call_id)).await
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        bounded(outbox::claim(&self.pool, now, lease_until, limit)).await
    }

    async fn record_attempt(&self, event_id: uuid::Uuid, attempt: &Attempt) -> Result<()> {
        bounded(outbox::record(&self.pool, event_id, attempt)).await
    }

    async fn outbox_depth(&self) -> Result<u64> {
        bounded(outbox::depth(&self.pool)).await
    }

    async fn purge_ended_batch(&self, before: OffsetDateTime, limit: usize) -> Result<usize> {
        bounded(async {
            // Chosen outside the transaction: a terminal call never changes, so the ids stay
            // valid, and SQLite's write lock is taken by the first DELETE and held only for
            // the deletes (a read that turned into a write could fail at once under WAL).
            let select = format!("SELECT call_id FROM calls WHERE {PURGEABLE} ORDER BY ended_at, call_id LIMIT $2");
            let rows = sqlx::query(&select)
                .bind(micros(before))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            let ids = rows.iter().map(|row| row.try_get::<String, _>("call_id")).collect::<Result<Vec<_>, _>>();
            let ids = ids.map_err(corrupt)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let placeholders =
                |from: usize, n: usize| (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let mut deleted = 0;
            for chunk in ids.chunks(IN_CHUNK) {
                let chosen = format!(
                    "SELECT call_id FROM calls WHERE {PURGEABLE} AND call_id IN ({})",
                    placeholders(2, chunk.len())
                );
                // The history and the status callbacks first (SQLite applies the foreign key's
                // cascade only when told to), of the same calls as the last statement deletes.
                let history = format!("DELETE FROM call_transitions WHERE call_id IN ({chosen})");
                let deliveries = format!("DELETE FROM webhook_deliveries WHERE call_id IN ({chosen})");
                let calls = format!("DELETE FROM calls WHERE call_id IN ({chosen})");
                for (i, sql) in [history, deliveries, calls].iter().enumerate() {
                    let mut q = sqlx::query(sql).bind(micros(before));
                    for id in chunk {
                        q = q.bind(id.as_str());
                    }
                    let done = q.execute(&mut *tx).await.map_err(unavailable)?;
                    if i == 2 {
                        deleted += done.rows_affected() as usize;
                    }
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(deleted)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        bounded(async {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}

/// The columns of `calls`, in the order [`INSERT_CALL`] binds them.
macro_rules! call_columns {
    () => {
        "call_id, phone_number, context, extension, priority, caller_id, timeout_secs, audio, variables, \
         max_attempts, idempotency_key, status_callback, status_callback_events, created_at, status, channel, sent_at, dialed_at, ringing_at, answered_at, \
         ended_at, failure_reason, hangup_cause, hangup_text, attempt_number, version"
    };
}

const SELECT_CALLS: &str = concat!("SELECT ", call_columns!(), " FROM calls");

const INSERT_CALL: &str = concat!(
    "INSERT INTO calls (",
    call_columns!(),
    ", owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)"
);

/// The state columns in [`bind_state`]'s order, then the row guard.
const UPDATE_STATE: &str = "UPDATE calls SET status = $1, channel = $2, sent_at = $3, dialed_at = $4, \
     ringing_at = $5, answered_at = $6, ended_at = $7, failure_reason = $8, hangup_cause = $9, hangup_text = $10, \
     attempt_number = $11, version = $12 WHERE call_id = $13 AND version = $14";

/// A transition's columns of table `$t` (`""` or `"t."`) under the names
/// [`decode_transition`] reads, which keep clear of the `calls` columns in a join.
#[rustfmt::skip]
macro_rules! transition_columns {
    ($t:literal) => {
        concat!(
            $t, "seq AS t_seq, ",
            $t, "status AS t_status, ",
            $t, "at AS t_at, ",
            $t, "attempt AS t_attempt, ",
            $t, "failure_reason AS t_failure_reason, ",
            $t, "cause AS t_cause"
        )
    };
}

/// A call and its history in one round trip: the call's columns repeat on each of its few
/// transition rows, which costs less than a second query. Rows past `version` belong to a
/// write not yet committed when the call row was read, and are left out.
const SELECT_CALL_WITH_HISTORY: &str = concat!(
    "SELECT c.*, ",
    transition_columns!("t."),
    " FROM calls c LEFT JOIN call_transitions t ON t.call_id = c.call_id AND t.seq < c.version \
     WHERE c.call_id = $1 ORDER BY t.seq"
);

/// Which calls retention may delete, with the cutoff as `$1`: ended ones only, whatever the
/// cutoff. (Only a terminal call has an `ended_at`; the status says it again.) The
/// `calls_ended_at` index serves it, oldest first.
const PURGEABLE: &str = "ended_at < $1 AND status IN ('completed', 'failed')";

/// The histories of some calls, up to the list of their ids.
const SELECT_HISTORIES_PREFIX: &str =
    concat!("SELECT call_id, ", transition_columns!(""), " FROM call_transitions WHERE call_id IN (");

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// Binds a call's spec, in the order of its columns in [`INSERT_CALL`]; [`decode_spec`] reads
/// them back. A new field of [`CallSpec`] is a column here, there and in a migration.
fn bind_spec<'q>(query: AnyQuery<'q>, spec: &'q CallSpec) -> AnyQuery<'q> {
    query
        .bind(spec.phone_number.as_str())
        .bind(spec.context.as_str())
        .bind(spec.extension.as_str())
        .bind(i64::from(spec.priority))
        .bind(spec.caller_id.as_deref())
        .bind(i64::from(spec.timeout_secs))
        .bind(spec.audio.as_deref())
        .bind(serde_json::to_string(&spec.variables).expect("a string map always serializes"))
        .bind(i64::from(spec.max_attempts))
        .bind(spec.idempotency_key.as_deref())
        .bind(spec.status_callback.as_deref())
        .bind(spec.status_callback_events.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
}

/// Binds the columns a transition can change, in the order of [`UPDATE_STATE`] (and of the
/// tail of [`INSERT_CALL`]).
fn bind_state<'q>(query: AnyQuery<'q>, call: &'q Call) -> AnyQuery<'q> {
    query
        .bind(call.status.as_str())
        .bind(call.channel.as_deref())
        .bind(call.sent_at.map(micros))
        .bind(call.dialed_at.map(micros))
        .bind(call.ringing_at.map(micros))
        .bind(call.answered_at.map(micros))
        .bind(call.ended_at.map(micros))
        .bind(call.failure_reason.map(|r| r.as_str()))
        .bind(call.hangup.as_ref().map(|h| i64::from(h.code)))
        .bind(call.hangup.as_ref().map(|h| h.text.as_str()))
        .bind(i64::from(call.attempt_number))
        .bind(call.history.len() as i64)
}

/// Inserts `call.history[from..]` as rows of `call_transitions`, in one statement.
async fn insert_history(conn: &mut AnyConnection, call: &Call, from: usize) -> Result<(), sqlx::Error> {
    let entries = &call.history[from..];
    if entries.is_empty() {
        return Ok(());
    }
    let rows: Vec<String> = (0..entries.len())
        .map(|i| {
            let p = i * 7;
            format!("(${}, ${}, ${}, ${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4, p + 5, p + 6, p + 7)
        })
        .collect();
    let sql = format!(
        "INSERT INTO call_transitions (call_id, seq, status, at, attempt, failure_reason, cause) VALUES {}",
        rows.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (i, entry) in entries.iter().enumerate() {
        query = query
            .bind(call.call_id.to_string())
            .bind((from + i) as i64)
            .bind(entry.status.as_str())
            .bind(micros(entry.at))
            .bind(i64::from(entry.attempt))
            .bind(entry.failure_reason.map(|r| r.as_str()))
            .bind(entry.cause.as_str());
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Reads one integer column that holds a `u32`.
fn small(row: &AnyRow, col: &str) -> Result<u32> {
    let value: i64 = row.try_get(col).map_err(corrupt)?;
    u32::try_from(value).map_err(|_| Error::StoreCorrupt(format!("{col} {value} is out of range")))
}

fn opt_text(row: &AnyRow, col: &str) -> Result<Option<String>> {
    row.try_get::<Option<String>, _>(col).map_err(corrupt)
}

/// The spec columns [`bind_spec`] wrote.
fn decode_spec(row: &AnyRow) -> Result<CallSpec> {
    let text = |col: &str| row.try_get::<String, _>(col).map_err(corrupt);
    let variables = serde_json::from_str(&text("variables")?)
        .map_err(|e| Error::StoreCorrupt(format!("variables are not a JSON object of strings: {e}")))?;
    Ok(CallSpec {
        phone_number: text("phone_number")?.parse().map_err(|e| Error::StoreCorrupt(format!("phone_number: {e}")))?,
        context: text("context")?,
        extension: text("extension")?,
        priority: small(row, "priority")?,
        caller_id: opt_text(row, "caller_id")?,
        timeout_secs: small(row, "timeout_secs")?,
        audio: opt_text(row, "audio")?,
        variables,
        max_attempts: small(row, "max_attempts")?,
        idempotency_key: opt_text(row, "idempotency_key")?,
        status_callback: opt_text(row, "status_callback")?,
        status_callback_events: text("status_callback_events")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(corrupt)?,
    })
}

fn decode_call(row: &AnyRow, history: Vec<TransitionRecord>) -> Result<Call> {
    let opt_time = |col: &str| -> Result<Option<OffsetDateTime>> {
        row.try_get::<Option<i64>, _>(col).map_err(corrupt)?.map(|us| instant(col, us)).transpose()
    };
    let hangup = match (row.try_get::<Option<i64>, _>("hangup_cause").map_err(corrupt)?, opt_text(row, "hangup_text")?)
    {
        (Some(code), Some(text)) => Some(Hangup {
            code: u16::try_from(code)
                .map_err(|_| Error::StoreCorrupt(format!("hangup_cause {code} is out of range")))?,
            text,
        }),
        _ => None,
    };
    Ok(Call {
        call_id: parse_id(&row.try_get::<String, _>("call_id").map_err(corrupt)?)?,
        spec: decode_spec(row)?,
        status: row.try_get::<String, _>("status").map_err(corrupt)?.parse().map_err(corrupt)?,
        channel: opt_text(row, "channel")?,
        created_at: instant("created_at", row.try_get("created_at").map_err(corrupt)?)?,
        sent_at: opt_time("sent_at")?,
        dialed_at: opt_time("dialed_at")?,
        ringing_at: opt_time("ringing_at")?,
        answered_at: opt_time("answered_at")?,
        ended_at: opt_time("ended_at")?,
        failure_reason: opt_text(row, "failure_reason")?.map(|r| r.parse()).transpose().map_err(corrupt)?,
        hangup,
        attempt_number: small(row, "attempt_number")?,
        history,
    })
}

fn decode_transition(row: &AnyRow) -> Result<TransitionRecord> {
    let attempt: i64 = row.try_get("t_attempt").map_err(corrupt)?;
    Ok(TransitionRecord {
        status: row.try_get::<String, _>("t_status").map_err(corrupt)?.parse().map_err(corrupt)?,
        at: instant("at", row.try_get("t_at").map_err(corrupt)?)?,
        attempt: u32::try_from(attempt)
            .map_err(|_| Error::StoreCorrupt(format!("attempt {attempt} is out of range")))?,
        failure_reason: row
            .try_get::<Option<String>, _>("t_failure_reason")
            .map_err(corrupt)?
            .map(|r| r.parse())
            .transpose()
            .map_err(corrupt)?,
        cause: row.try_get("t_cause").map_err(corrupt)?,
    })
}

pub(super) fn instant(col: &str, us: i64) -> Result<OffsetDateTime> {
    from_micros(us).ok_or_else(|| Error::StoreCorrupt(format!("{col} {us} is not a valid instant")))
}

pub(super) fn parse_id(s: &str) -> Result<CallId> {
    s.parse().map_err(|_| Error::StoreCorrupt(format!("call_id {s:?} is not a UUID")))
}

pub(crate) fn unavailable(e: impl Into<crate::error::BoxError>) -> Error {
    Error::StoreUnavailable(e.into())
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::StoreCorrupt(e.to_string())
}

async fn bounded<T>(operation: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => result,
        Err(_) => Err(Error::StoreUnavailable(
            format!("no answer from the database within {}s", OPERATION_TIMEOUT.as_secs()).into(),
        )),
    }
}

/// Which engine a URL names, and the URL to hand to sqlx.
fn engine_url(url: &str) -> Result<(Engine, String)> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Engine::Postgres, url.to_owned()));
    }
    if url.starts_with("sqlite:") {
        // Create the file when it is missing, unless the caller chose a mode.
        let url = if url.contains("mode=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        return Ok((Engine::Sqlite, url));
    }
    Err(Error::StoreUnavailable("unsupported database URL: expected sqlite:<path> or postgres://…".into()))
}

/// Migrations compiled into a binary — `(version, description, sql)` — as a sqlx migration
/// source. Components that keep their own tables in the calls' database (ivr-server's users)
/// use it too, with versions of their own; every migrator here ignores versions it does not
/// know, so they share `_sqlx_migrations`.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddedMigrations(pub &'static [(i64, &'static str, &'static str)]);

impl EmbeddedMigrations {
    /// Applies those of the migrations that have not run yet on `pool`.
    pub async fn run(self, pool: &AnyPool) -> Result<()> {
        let mut migrator = Migrator::new(self).await.map_err(unavailable)?;
        migrator.set_ignore_missing(true);
        migrator.run(pool).await.map_err(unavailable)
    }
}

impl MigrationSource<'static> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}
