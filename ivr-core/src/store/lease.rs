//! Leases: the SQL that lets several instances share one PostgreSQL, and keeps a second
//! process off a SQLite file.
//!
//! Each running process holds one row of `instances`, its lease, renewed while it lives; each
//! call names the lease that follows it (`calls.owner`). A call whose owner's lease has lapsed
//! is an orphan, and [`Leases::claim_orphans`] hands each orphan to exactly one claimer
//! (`FOR UPDATE SKIP LOCKED`). Instants are the database's clock, so hosts whose clocks
//! disagree still agree on who is alive.
//!
//! The same tables exist on SQLite (one migration for both engines), where only
//! [`Leases::register`] and [`Leases::renew`] are used: a second process finds the first's
//! live lease and is refused.

use std::time::Duration;

use sqlx::{AnyPool, Executor, Row};
use uuid::Uuid;

use super::sql::{unavailable, Engine};
use super::SqlCallStore;
use crate::call::CallId;
use crate::error::{Error, Result};

/// One process's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// New at every start: what `calls.owner` names.
    pub lease_id: String,
    /// The stable name of the instance (INSTANCE_ID).
    pub instance_id: String,
    /// The ARI application the instance registers.
    pub app: String,
}

/// The lease and ownership SQL over the calls' database.
#[derive(Clone, Debug)]
pub struct Leases {
    pool: AnyPool,
    engine: Engine,
    ttl: Duration,
}

/// The database's clock, in microseconds since the epoch.
fn now_sql(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT",
        Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
    }
}

/// The statuses of a call that is not over, as SQL.
const ACTIVE: &str = "('pending', 'dialing', 'ringing', 'answered')";

/// Leases lapsed longer than this are deleted (their calls were taken over long before).
const FORGET_AFTER_MICROS: i64 = 3_600_000_000;

/// The channel `NOTIFY` announces call changes on (payload: the call id).
pub const CALLS_CHANNEL: &str = "ivr_calls";
/// The channel cancel requests go to their owner on (payload: `<lease id> <call id>`).
pub const CANCEL_CHANNEL: &str = "ivr_cancel";

impl Leases {
    /// Lease SQL on `store`'s database; leases last `ttl` unless renewed.
    pub fn new(store: &SqlCallStore, ttl: Duration) -> Self {
        Leases { pool: store.pool().clone(), engine: store.engine(), ttl }
    }

    pub fn is_postgres(&self) -> bool {
        self.engine == Engine::Postgres
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_micros(&self) -> i64 {
        self.ttl.as_micros() as i64
    }

    /// Takes a lease for `instance_id` with ARI application `app`.
    ///
    /// Who may not hold one at the same time: on PostgreSQL another process with the same
    /// instance id; on SQLite any other process. A lease found live is waited on for up to
    /// one `ttl` (a process that crashed leaves one behind); if it is renewed meanwhile, its
    /// holder is alive and this one is refused with [`Error::InstanceInUse`].
    pub async fn register(&self, instance_id: &str, app: &str) -> Result<Lease> {
        let lease = Lease { lease_id: Uuid::new_v4().to_string(), instance_id: instance_id.into(), app: app.into() };
        let now = now_sql(self.engine);
        let rival = match self.engine {
            Engine::Postgres => "instance_id = $1 AND ",
            // Any process at all; `$1` is named so both engines bind the same parameters.
            Engine::Sqlite => "$1 IS NOT NULL AND ",
        };
        let live = format!("SELECT lease_id, instance_id, expires_at FROM instances WHERE {rival}expires_at > {now}");
        let insert = format!(
            "INSERT INTO instances (lease_id, instance_id, app, started_at, expires_at) \
             SELECT $2, $1, $3, {now}, {now} + $4 WHERE NOT EXISTS \
             (SELECT 1 FROM instances WHERE {rival}expires_at > {now})"
        );
        let give_up = tokio::time::Instant::now() + self.ttl + Duration::from_secs(1);
        let mut first_seen: Option<(String, i64)> = None;
        loop {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            if self.engine == Engine::Postgres {
                // Two processes with one instance id starting at once: one goes first.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(instance_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            let inserted = sqlx::query(&insert)
                .bind(instance_id)
                .bind(&lease.lease_id)
                .bind(app)
                .bind(self.ttl_micros())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            if inserted.rows_affected() == 1 {
                tx.commit().await.map_err(unavailable)?;
                return Ok(lease);
            }
            let row = sqlx::query(&live).bind(instance_id).fetch_optional(&mut *tx).await.map_err(unavailable)?;
            tx.rollback().await.map_err(unavailable)?;
            let Some(row) = row else { continue };
            let holder: String = row.try_get("lease_id").map_err(unavailable)?;
            let holder_instance: String = row.try_get("instance_id").map_err(unavailable)?;
            let expires: i64 = row.try_get("expires_at").map_err(unavailable)?;
            let renewed = match &first_seen {
                Some((id, at)) => *id == holder && expires > *at,
                None => false,
            };
            if renewed || tokio::time::Instant::now() >= give_up {
                return Err(Error::InstanceInUse(match self.engine {
                    Engine::Sqlite => format!(
                        "another process (instance {holder_instance}) is running on this SQLite database and \
                         renews its lease; SQLite serves one instance: run several over PostgreSQL"
                    ),
                    Engine::Postgres => format!(
                        "another process runs as instance {holder_instance} and renews its lease; give each \
                         instance its own INSTANCE_ID"
                    ),
                }));
            }
            if first_seen.is_none() {
                tracing::warn!(instance = %holder_instance, "a lease is still live (a process that stopped?); waiting for it to lapse");
                first_seen = Some((holder, expires));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Extends the lease by `ttl`. `false` if it had lapsed already: the process has lost its
    /// calls to the survivors and must not take them back.
    pub async fn renew(&self, lease: &Lease) -> Result<bool> {
        let now = now_sql(self.engine);
        let sql = format!("UPDATE instances SET expires_at = {now} + $2 WHERE lease_id = $1 AND expires_at > {now}");
        let done = sqlx::query(&sql)
            .bind(&lease.lease_id)
            .bind(self.ttl_micros())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (a clean stop): its calls left are orphans at once, and the next
    /// process on a SQLite file need not wait.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE lease_id = $1")
            .bind(&lease.lease_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Makes `lease` the owner of up to `limit` active calls whose owner's lease has lapsed
    /// (or that have none), oldest first, and returns them. Of concurrent claimers each orphan
    /// goes to exactly one: rows another claimer holds are skipped, and a row claimed
    /// meanwhile is re-checked against its new, live owner. PostgreSQL only.
    pub async fn claim_orphans(&self, lease: &Lease, limit: usize) -> Result<Vec<CallId>> {
        self.claim(lease, None, limit).await
    }

    /// [`claim_orphans`](Self::claim_orphans) for one call: `true` if it is now `lease`'s.
    pub async fn claim_call(&self, lease: &Lease, call_id: CallId) -> Result<bool> {
        Ok(!self.claim(lease, Some(call_id), 1).await?.is_empty())
    }

    async fn claim(&self, lease: &Lease, only: Option<CallId>, limit: usize) -> Result<Vec<CallId>> {
        let now = now_sql(self.engine);
        let one = if only.is_some() { "AND c.call_id = $3 " } else { "" };
        let sql = format!(
            "UPDATE calls SET owner = $1 WHERE call_id IN (\
               SELECT c.call_id FROM calls c WHERE c.status IN {ACTIVE} {one}\
               AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.lease_id = c.owner AND i.expires_at > {now}) \
               ORDER BY c.created_at, c.call_id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING call_id"
        );
        let mut query = sqlx::query(&sql).bind(&lease.lease_id).bind(limit as i64);
        if let Some(id) = only {
            query = query.bind(id.to_string());
        }
        let rows = query.fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(|row| parse(row.try_get("call_id").map_err(unavailable)?)).collect()
    }

    /// The active calls `lease` follows.
    pub async fn owned(&self, lease: &Lease) -> Result<Vec<CallId>> {
        let sql = format!("SELECT call_id FROM calls WHERE owner = $1 AND status IN {ACTIVE}");
        let rows = sqlx::query(&sql).bind(&lease.lease_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(|row| parse(row.try_get("call_id").map_err(unavailable)?)).collect()
    }

    /// Who follows `call_id`: its owner's lease, and whether that lease is live.
    pub async fn owner_of(&self, call_id: CallId) -> Result<Option<(String, bool)>> {
        let now = now_sql(self.engine);
        let sql = format!(
            "SELECT c.owner, (SELECT COUNT(*) FROM instances i WHERE i.lease_id = c.owner AND i.expires_at > {now}) \
             AS live FROM calls c WHERE c.call_id = $1"
        );
        let row = sqlx::query(&sql).bind(call_id.to_string()).fetch_optional(&self.pool).await.map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let owner: Option<String> = row.try_get("owner").map_err(unavailable)?;
        let live: i64 = row.try_get("live").map_err(unavailable)?;
        Ok(owner.map(|owner| (owner, live > 0)))
    }

    /// Records a cancel for the call's owner to carry out and tells it (`NOTIFY`). The record
    /// stays until the owner takes it, so a notification missed during a reconnect is found
    /// at its next lease renewal. PostgreSQL only.
    pub async fn request_cancel(&self, owner: &str, call_id: CallId) -> Result<()> {
        let now = now_sql(self.engine);
        let sql = format!("UPDATE calls SET cancel_requested_at = {now} WHERE call_id = $1");
        sqlx::query(&sql).bind(call_id.to_string()).execute(&self.pool).await.map_err(unavailable)?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CANCEL_CHANNEL)
            .bind(format!("{owner} {call_id}"))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Takes the cancel requests for `lease`'s active calls (each is handed out once).
    pub async fn take_cancel_requests(&self, lease: &Lease) -> Result<Vec<CallId>> {
        let sql = format!(
            "UPDATE calls SET cancel_requested_at = NULL WHERE owner = $1 AND cancel_requested_at IS NOT NULL \
             AND status IN {ACTIVE} RETURNING call_id"
        );
        let rows = sqlx::query(&sql).bind(&lease.lease_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(|row| parse(row.try_get("call_id").map_err(unavailable)?)).collect()
    }

    /// Takes the next originate slot of the bucket all instances share, one every `interval`,
    /// and returns how long to wait for it. PostgreSQL only.
    pub async fn take_slot(&self, interval: Duration) -> Result<Duration> {
        let now = now_sql(self.engine);
        let sql = format!(
            "UPDATE pacing SET next_slot = GREATEST(next_slot, {now}) + $1 WHERE id = 1 \
             RETURNING next_slot - $1 - {now} AS wait"
        );
        let row =
            sqlx::query(&sql).bind(interval.as_micros() as i64).fetch_one(&self.pool).await.map_err(unavailable)?;
        let wait: i64 = row.try_get("wait").map_err(unavailable)?;
        Ok(Duration::from_micros(wait.max(0) as u64))
    }

    /// Deletes leases that lapsed long ago.
    pub async fn forget_old(&self) -> Result<()> {
        let now = now_sql(self.engine);
        let sql = format!("DELETE FROM instances WHERE expires_at < {now} - {FORGET_AFTER_MICROS}");
        sqlx::query(&sql).execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    /// Makes every change of a call announce itself on [`CALLS_CHANNEL`] when it commits
    /// (a trigger, created once: a start does not lock `calls` when it exists; safe when
    /// instances start together). PostgreSQL only.
    pub async fn install_notify(&self) -> Result<()> {
        let ddl = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('ivr_call_changed')); \
             CREATE OR REPLACE FUNCTION ivr_call_changed() RETURNS trigger LANGUAGE plpgsql AS \
             $body$ BEGIN PERFORM pg_notify('{CALLS_CHANNEL}', NEW.call_id); RETURN NULL; END $body$; \
             DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger \
               WHERE tgname = 'ivr_call_changed' AND tgrelid = 'calls'::regclass) THEN \
               CREATE TRIGGER ivr_call_changed AFTER UPDATE OF version ON calls \
               FOR EACH ROW EXECUTE FUNCTION ivr_call_changed(); END IF; END $do$; COMMIT;"
        );
        self.pool.execute(ddl.as_str()).await.map_err(unavailable)?;
        Ok(())
    }
}

fn parse(id: String) -> Result<CallId> {
    id.parse().map_err(|_| Error::StoreCorrupt(format!("call_id {id:?} is not a UUID")))
}
