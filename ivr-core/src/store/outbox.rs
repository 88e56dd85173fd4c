//! The SQL side of the status-callback outbox (table `webhook_deliveries`), for
//! [`SqlCallStore`](super::SqlCallStore): the rows written in a transition's transaction, and
//! the worker's claim, record and reads.
//!
//! A claim is a compare-and-set on the row's lease (`UPDATE … WHERE lease_until IS NULL OR
//! lease_until <= now`): of several instances claiming one row, exactly one sees a row
//! changed, on SQLite and PostgreSQL alike, without locks held across the HTTP attempt. A
//! claimer that dies leaves a lease that ends, and the delivery is claimed again (at least once).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::micros;
use super::sql::{corrupt, instant, parse_id, unavailable};
use crate::call::{Call, CallId};
use crate::error::{Error, Result};
use crate::webhook::{Attempt, Delivery, DeliveryState};

const COLUMNS: &str = "event_id, call_id, seq, status, url, call_snapshot, created_at, state, attempts, \
     next_attempt_at, last_attempt_at, last_result";

/// Writes new outbox rows (inside the caller's transaction).
pub(super) async fn insert(conn: &mut AnyConnection, deliveries: &[Delivery]) -> Result<(), sqlx::Error> {
    for d in deliveries {
        let sql = format!(
            "INSERT INTO webhook_deliveries ({COLUMNS}, lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL)"
        );
        sqlx::query(&sql)
            .bind(d.event_id.to_string())
            .bind(d.call_id.to_string())
            .bind(i64::from(d.seq))
            .bind(d.status.as_str())
            .bind(d.url.as_str())
            .bind(serde_json::to_string(&d.call).expect("a call always serializes"))
            .bind(micros(d.created_at))
            .bind(d.state.as_str())
            .bind(i64::from(d.attempts))
            .bind(micros(d.next_attempt_at))
            .bind(d.last_attempt_at.map(micros))
            .bind(d.last_result.as_deref())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub(super) async fn of_call(pool: &AnyPool, call_id: CallId) -> Result<Vec<Delivery>> {
    let sql = format!("SELECT {COLUMNS} FROM webhook_deliveries WHERE call_id = $1 ORDER BY seq");
    let rows = sqlx::query(&sql).bind(call_id.to_string()).fetch_all(pool).await.map_err(unavailable)?;
    rows.iter().map(decode).collect()
}

pub(super) async fn claim(
    pool: &AnyPool,
    now: OffsetDateTime,
    lease_until: OffsetDateTime,
    limit: usize,
) -> Result<Vec<Delivery>> {
    let now = micros(now);
    let sql = format!(
        "SELECT {COLUMNS} FROM webhook_deliveries d \
         WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND (d.lease_until IS NULL OR d.lease_until <= $2) \
         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e \
             WHERE e.call_id = d.call_id AND e.state = 'pending' AND e.seq < d.seq) \
         ORDER BY d.next_attempt_at, d.call_id, d.seq LIMIT $3"
    );
    let rows = sqlx::query(&sql).bind(now).bind(now).bind(limit as i64).fetch_all(pool).await.map_err(unavailable)?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let delivery = decode(row)?;
        let taken = sqlx::query(
            "UPDATE webhook_deliveries SET lease_until = $1 \
             WHERE event_id = $2 AND state = 'pending' AND (lease_until IS NULL OR lease_until <= $3)",
        )
        .bind(micros(lease_until))
        .bind(delivery.event_id.to_string())
        .bind(now)
        .execute(pool)
        .await
        .map_err(unavailable)?;
        // Zero rows: another claimer got there between the read and the update.
        if taken.rows_affected() == 1 {
            claimed.push(delivery);
        }
    }
    Ok(claimed)
}

pub(super) async fn record(pool: &AnyPool, event_id: Uuid, attempt: &Attempt) -> Result<()> {
    sqlx::query(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $1, next_attempt_at = $2, \
         last_attempt_at = $3, last_result = $4, lease_until = NULL WHERE event_id = $5",
    )
    .bind(attempt.state.as_str())
    .bind(micros(attempt.next_attempt_at))
    .bind(micros(attempt.at))
    .bind(attempt.result.as_str())
    .bind(event_id.to_string())
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok(())
}

pub(super) async fn depth(pool: &AnyPool) -> Result<u64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE state = 'pending'")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    let n: i64 = row.try_get("n").map_err(corrupt)?;
    Ok(n.max(0) as u64)
}

fn decode(row: &AnyRow) -> Result<Delivery> {
    let text = |col: &str| row.try_get::<String, _>(col).map_err(corrupt);
    let int = |col: &str| -> Result<u32> {
        let v: i64 = row.try_get(col).map_err(corrupt)?;
        u32::try_from(v).map_err(|_| Error::StoreCorrupt(format!("{col} {v} is out of range")))
    };
    let call: Call = serde_json::from_str(&text("call_snapshot")?)
        .map_err(|e| Error::StoreCorrupt(format!("call_snapshot is not a call: {e}")))?;
    let state = text("state")?;
    Ok(Delivery {
        event_id: text("event_id")?.parse().map_err(corrupt)?,
        call_id: parse_id(&text("call_id")?)?,
        seq: int("seq")?,
        status: text("status")?.parse().map_err(corrupt)?,
        url: text("url")?,
        call,
        created_at: instant("created_at", row.try_get("created_at").map_err(corrupt)?)?,
        state: DeliveryState::parse(&state).ok_or_else(|| Error::StoreCorrupt(format!("delivery state {state:?}")))?,
        attempts: int("attempts")?,
        next_attempt_at: instant("next_attempt_at", row.try_get("next_attempt_at").map_err(corrupt)?)?,
        last_attempt_at: row
            .try_get::<Option<i64>, _>("last_attempt_at")
            .map_err(corrupt)?
            .map(|us| instant("last_attempt_at", us))
            .transpose()?,
        last_result: row.try_get::<Option<String>, _>("last_result").map_err(corrupt)?,
    })
}
