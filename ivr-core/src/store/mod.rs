//! Where calls live: the [`CallStore`] contract and its implementations.
//!
//! - [`MemoryCallStore`]: a process-local map, for DISABLE_DB mode and tests.
//! - [`SqlCallStore`]: SQLite (the embedded default, one file in WAL mode) or PostgreSQL
//!   (production), through sqlx with embedded migrations and runtime-checked queries.
//!
//! - [`Leases`] (`lease.rs`): beside the calls in a SQL database, the leases of running
//!   processes and which one follows each call (several instances over PostgreSQL).
//!
//! Every implementation runs the same conformance suite (`conformance`, feature `testing`).

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::call::{Call, CallId, CallStatus, Ignored, PhoneNumber, Transition};
use crate::error::Result;
use crate::webhook::{Attempt, Delivery};
use uuid::Uuid;

mod compact;
pub mod lease;
mod memory;
mod outbox;
mod sql;

#[cfg(feature = "testing")]
pub mod conformance;

pub use lease::{Lease, Leases};
pub use memory::{MemoryCallStore, DEFAULT_MEMORY_MAX_CALLS};
pub use sql::{EmbeddedMigrations, SqlCallStore};

/// Persistence for calls. Held as `Arc<dyn CallStore>` by the call manager and the server.
///
/// The contract, which `conformance` checks for every implementation:
/// - [`insert`](CallStore::insert) stores a new call with its history. A call whose id, or
///   whose idempotency key, is already stored is refused with
///   [`Error::AlreadyExists`](crate::Error::AlreadyExists) carrying the stored call; nothing
///   is overwritten.
/// - A call read back equals the call written: every field, timestamps to the microsecond.
/// - [`apply`](CallStore::apply) runs [`Call::apply`] atomically against the stored call. Of
///   concurrent writers, exactly one wins each state; the others are re-evaluated against the
///   state that won, so a loser sees the current call and why its transition was ignored.
///   An unknown id is [`Error::NotFound`](crate::Error::NotFound).
/// - [`list`](CallStore::list) returns calls newest first (created_at, then call_id, both
///   descending), filtered, one page at a time; following `next` cursors visits every
///   matching call exactly once, even while new calls are inserted.
/// - [`list_active`](CallStore::list_active) returns every call that is not terminal, for
///   reconciliation after a fault.
/// - The outbox of status callbacks: [`insert`](CallStore::insert) and
///   [`apply`](CallStore::apply) store the [`outbox_entries`](crate::webhook::outbox_entries)
///   of the entries they add to a call's history *in the same transaction* as the call, so a
///   stored change is always told and a change not stored never is.
///   [`claim_deliveries`](CallStore::claim_deliveries) hands out due deliveries, each to one
///   claimer until its lease ends, and never a call's delivery while an earlier one of the same
///   call is pending (order per call); [`record_attempt`](CallStore::record_attempt) stores an
///   attempt and ends the lease. A call's deliveries go with the call when it is deleted (purged).
/// - [`purge_ended_batch`](CallStore::purge_ended_batch) deletes ended calls for retention:
///   only terminal calls (`completed`, `failed`) whose `ended_at` is strictly before the
///   cutoff, each with its whole history, oldest `ended_at` first, at most `limit` of them in
///   one short step (one transaction on SQL, one lock on memory), and returns how many it
///   deleted. An active call is never deleted, whatever the cutoff. A purged call is gone:
///   `get` answers `None`, it is in no listing, and its idempotency key is free again (a
///   request repeating it makes a new call). [`purge_ended`](CallStore::purge_ended) repeats
///   batches of [`PURGE_BATCH`] until one comes back short.
/// - Failures to reach the backing database are
///   [`Error::StoreUnavailable`](crate::Error::StoreUnavailable).
#[async_trait]
pub trait CallStore: Send + Sync + 'static {
    async fn insert(&self, call: &Call) -> Result<()>;

    async fn get(&self, call_id: CallId) -> Result<Option<Call>>;

    async fn get_by_idempotency_key(&self, key: &str) -> Result<Option<Call>>;

    async fn apply(&self, call_id: CallId, transition: &Transition) -> Result<Applied>;

    async fn list(&self, query: &CallQuery) -> Result<CallPage>;

    async fn list_active(&self) -> Result<Vec<Call>>;

    /// The status-callback deliveries of a call, oldest first (empty for an unknown call).
    async fn deliveries(&self, call_id: CallId) -> Result<Vec<Delivery>>;

    /// Up to `limit` deliveries due at `now` (pending, `next_attempt_at <= now`, not leased
    /// past `now`, and the first pending one of their call), oldest due first, each leased to
    /// this caller until `lease_until`.
    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Delivery>>;

    /// Stores the outcome of an attempt at `event_id` (one more attempt) and ends its lease.
    async fn record_attempt(&self, event_id: Uuid, attempt: &Attempt) -> Result<()>;

    /// Deliveries still pending, for the outbox-depth metric.
    async fn outbox_depth(&self) -> Result<u64>;

    /// Deletes at most `limit` terminal calls that ended before `before`, with their
    /// history, in one short step; returns how many (see the contract above).
    async fn purge_ended_batch(&self, before: OffsetDateTime, limit: usize) -> Result<usize>;

    /// Deletes every terminal call that ended before `before`, with its history, in batches
    /// of [`PURGE_BATCH`] so that no lock or transaction is held long; returns how many. A
    /// failure part way leaves the batches before it deleted (running it again goes on).
    async fn purge_ended(&self, before: OffsetDateTime) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let n = self.purge_ended_batch(before, PURGE_BATCH).await?;
            total += n as u64;
            if n < PURGE_BATCH {
                return Ok(total);
            }
            // Let the requests waiting behind this batch in first.
            tokio::task::yield_now().await;
        }
    }

    /// Cheap reachability check, for readiness probes.
    async fn ping(&self) -> Result<()>;
}

/// Calls deleted per step of [`CallStore::purge_ended`]: small enough that SQLite's writer
/// lock and a PostgreSQL transaction are held for milliseconds, large enough to purge a
/// million calls in a thousand steps.
pub const PURGE_BATCH: usize = 1_000;

/// The result of [`CallStore::apply`]: the call as it now stands, and whether it changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    Changed(Call),
    Ignored { call: Call, why: Ignored },
}

impl Applied {
    pub fn call(&self) -> &Call {
        match self {
            Applied::Changed(call) | Applied::Ignored { call, .. } => call,
        }
    }

    pub fn into_call(self) -> Call {
        match self {
            Applied::Changed(call) | Applied::Ignored { call, .. } => call,
        }
    }

    pub fn is_changed(&self) -> bool {
        matches!(self, Applied::Changed(_))
    }
}

/// Filters and a page position for [`CallStore::list`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallQuery {
    /// Only calls in one of these statuses; empty means any.
    pub statuses: Vec<CallStatus>,
    /// Only calls created at or after this instant.
    pub created_from: Option<OffsetDateTime>,
    /// Only calls created before this instant.
    pub created_to: Option<OffsetDateTime>,
    pub phone_number: Option<PhoneNumber>,
    /// Page size, clamped to `1..=MAX_PAGE_SIZE`; 0 means the default.
    pub limit: usize,
    /// Continue after this position (the `next` of the previous page).
    pub after: Option<Cursor>,
}

impl CallQuery {
    pub const DEFAULT_PAGE_SIZE: usize = 50;
    pub const MAX_PAGE_SIZE: usize = 1000;

    /// The page size to use: `limit` clamped to what the stores serve.
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => Self::DEFAULT_PAGE_SIZE,
            n => n.min(Self::MAX_PAGE_SIZE),
        }
    }

    /// Whether `call` passes the filters (the page position aside).
    pub fn matches(&self, call: &Call) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&call.status))
            && self.created_from.is_none_or(|from| call.created_at >= from)
            && self.created_to.is_none_or(|to| call.created_at < to)
            && self.phone_number.as_ref().is_none_or(|n| *n == call.spec.phone_number)
    }
}

/// One page of [`CallStore::list`].
#[derive(Clone, Debug, PartialEq)]
pub struct CallPage {
    pub calls: Vec<Call>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

impl CallPage {
    /// The page made of `calls`, read in list order with one more than `size` asked for: a
    /// call past `size` only tells that another page follows.
    pub(crate) fn from_one_extra(mut calls: Vec<Call>, size: usize) -> Self {
        let next = (calls.len() > size).then(|| {
            calls.truncate(size);
            calls.last().map(Cursor::of)
        });
        CallPage { calls, next: next.flatten() }
    }
}

/// A position in the newest-first order of calls: the last call of a page.
///
/// Its text form (`<created_at µs>.<call_id>`) is opaque to clients but stable, so it can be
/// handed out in an API and parsed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at_micros: i64,
    pub call_id: CallId,
}

impl Cursor {
    pub fn of(call: &Call) -> Self {
        Cursor { created_at_micros: micros(call.created_at), call_id: call.call_id }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.created_at_micros, self.call_id)
    }
}

/// A cursor string that was not made by [`Cursor`]'s `Display`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor: expected the `next` value of a previous page")]
pub struct InvalidCursor;

impl FromStr for Cursor {
    type Err = InvalidCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (micros, id) = s.split_once('.').ok_or(InvalidCursor)?;
        Ok(Cursor {
            created_at_micros: micros.parse().map_err(|_| InvalidCursor)?,
            call_id: id.parse().map_err(|_| InvalidCursor)?,
        })
    }
}

/// Microseconds since the Unix epoch: how the stores keep and compare instants.
pub(crate) fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

pub(crate) fn from_micros(us: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).ok()
}
