//! The in-memory store: what DISABLE_DB mode runs on. Nothing survives the process.
//!
//! A purge takes at most one batch per write lock, so readers get in between batches.
//!
//! It keeps at most `max_ended` ended calls (`MEMORY_MAX_CALLS`, default
//! [`DEFAULT_MEMORY_MAX_CALLS`]); past that the call that ended first goes, as a purge would
//! take it. Active calls are never let go. An ended call never changes again, so it is kept
//! compact (`compact.rs`, a few hundred bytes) and read back on `get`;
//! `examples/memory_rss.rs` measures the memory a call takes.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{compact, micros, Applied, CallPage, CallQuery, CallStore};
use crate::call::{Call, CallId, Transition};
use crate::error::{Conflict, Error, Result};
use crate::webhook::{outbox_entries, Attempt, Delivery, DeliveryState};

/// How many ended calls the memory store keeps unless told otherwise.
pub const DEFAULT_MEMORY_MAX_CALLS: usize = 100_000;

/// A [`CallStore`] in a map behind one lock. Every operation is a short critical section
/// with no await inside, so a plain `std` lock is the right tool.
#[derive(Debug)]
pub struct MemoryCallStore {
    inner: RwLock<Inner>,
    max_ended: usize,
}

impl Default for MemoryCallStore {
    fn default() -> Self {
        Self::with_max_ended(DEFAULT_MEMORY_MAX_CALLS)
    }
}

/// A call as kept: an active one whole, an ended one compact.
#[derive(Debug)]
enum Slot {
    Active(Box<Call>),
    Ended(Box<[u8]>),
}

impl Slot {
    fn of(call: &Call) -> Slot {
        if call.is_completed() {
            Slot::Ended(compact::encode(call))
        } else {
            Slot::Active(Box::new(call.clone()))
        }
    }

    fn call(&self) -> Call {
        match self {
            Slot::Active(call) => (**call).clone(),
            // Written by `of` from a `Call`, so it reads back as one.
            Slot::Ended(bytes) => compact::decode(bytes).expect("an ended call reads back"),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    calls: HashMap<CallId, Slot>,
    by_key: HashMap<String, CallId>,
    /// (created_at µs, id) of every call: the list order.
    order: BTreeSet<(i64, CallId)>,
    /// (ended_at µs, id) of every terminal call: the purge order.
    ended: BTreeSet<(i64, CallId)>,
    /// Each call's status-callback deliveries, oldest first, with their leases. Purging a
    /// call removes its entry here too.
    outbox: HashMap<CallId, Vec<Outboxed>>,
    /// The call of each delivery.
    event_calls: HashMap<Uuid, CallId>,
}

#[derive(Debug)]
struct Outboxed {
    delivery: Delivery,
    lease_until: Option<OffsetDateTime>,
}

impl Inner {
    fn call(&self, call_id: &CallId) -> Option<Call> {
        self.calls.get(call_id).map(Slot::call)
    }

    /// Keeps `call` (new, or its new state); past `max_ended` ended calls, the first to end goes.
    fn keep(&mut self, call: &Call, max_ended: usize) {
        self.calls.insert(call.call_id, Slot::of(call));
        self.note_end(call);
        while self.ended.len() > max_ended {
            let Some(first) = self.ended.pop_first() else { break };
            self.remove(first.1);
        }
    }

    /// Lets an ended call go, with its key and its status callbacks.
    fn remove(&mut self, call_id: CallId) {
        if let Some(gone) = self.calls.remove(&call_id) {
            let call = gone.call();
            self.order.remove(&(micros(call.created_at), call_id));
            if let Some(key) = &call.spec.idempotency_key {
                self.by_key.remove(key);
            }
        }
        for gone in self.outbox.remove(&call_id).into_iter().flatten() {
            self.event_calls.remove(&gone.delivery.event_id);
        }
    }

    /// Files `call` under its end, once it has one.
    fn note_end(&mut self, call: &Call) {
        if let (true, Some(at)) = (call.is_completed(), call.ended_at) {
            self.ended.insert((micros(at), call.call_id));
        }
    }

    /// Writes the outbox rows of `call.history[from..]`.
    fn enqueue(&mut self, call: &Call, from: usize) {
        for delivery in outbox_entries(call, from) {
            self.event_calls.insert(delivery.event_id, call.call_id);
            self.outbox.entry(call.call_id).or_default().push(Outboxed { delivery, lease_until: None });
        }
    }
}

impl MemoryCallStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that keeps at most `max_ended` ended calls (at least one), the first to end
    /// going first. Active calls are never let go.
    pub fn with_max_ended(max_ended: usize) -> Self {
        MemoryCallStore { inner: RwLock::default(), max_ended: max_ended.max(1) }
    }

    /// The calls kept now (active and ended).
    pub fn len(&self) -> usize {
        self.read().calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic elsewhere while holding the lock cannot leave a half-written call: every
        // write below is a single insert or an in-place `Call::apply`, which mutates only on
        // success. So a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl CallStore for MemoryCallStore {
    async fn insert(&self, call: &Call) -> Result<()> {
        let mut inner = self.write();
        if let Some(existing) = inner.call(&call.call_id) {
            return Err(Error::AlreadyExists { on: Conflict::CallId, existing: Box::new(existing) });
        }
        if let Some(key) = &call.spec.idempotency_key {
            if let Some(existing) = inner.by_key.get(key).and_then(|id| inner.call(id)) {
                return Err(Error::AlreadyExists { on: Conflict::IdempotencyKey, existing: Box::new(existing) });
            }
            inner.by_key.insert(key.clone(), call.call_id);
        }
        inner.order.insert((micros(call.created_at), call.call_id));
        inner.enqueue(call, 0);
        inner.keep(call, self.max_ended);
        Ok(())
    }

    async fn get(&self, call_id: CallId) -> Result<Option<Call>> {
        Ok(self.read().call(&call_id))
    }

    async fn get_by_idempotency_key(&self, key: &str) -> Result<Option<Call>> {
        let inner = self.read();
        Ok(inner.by_key.get(key).and_then(|id| inner.call(id)))
    }

    async fn apply(&self, call_id: CallId, transition: &Transition) -> Result<Applied> {
        let mut inner = self.write();
        let mut call = inner.calls.get(&call_id).ok_or(Error::NotFound(call_id))?.call();
        let from = call.history.len();
        let applied = match call.apply(transition) {
            Ok(()) => Applied::Changed(call),
            Err(why) => Applied::Ignored { call, why },
        };
        if let Applied::Changed(call) = &applied {
            inner.enqueue(call, from);
            inner.keep(call, self.max_ended);
        }
        Ok(applied)
    }

    async fn list(&self, query: &CallQuery) -> Result<CallPage> {
        let size = query.page_size();
        let inner = self.read();
        let older = match query.after {
            Some(after) => inner.order.range(..(after.created_at_micros, after.call_id)),
            None => inner.order.range(..),
        };
        let newest_first = older.rev().filter_map(|(_, id)| inner.call(id)).filter(|call| query.matches(call));
        Ok(CallPage::from_one_extra(newest_first.take(size + 1).collect(), size))
    }

    async fn list_active(&self) -> Result<Vec<Call>> {
        let inner = self.read();
        let active = inner.calls.values().filter_map(|slot| match slot {
            Slot::Active(call) if call.is_active() => Some((**call).clone()),
            _ => None,
        });
        Ok(active.collect())
    }

    async fn deliveries(&self, call_id: CallId) -> Result<Vec<Delivery>> {
        let inner = self.read();
        Ok(inner.outbox.get(&call_id).map(|all| all.iter().map(|o| o.delivery.clone()).collect()).unwrap_or_default())
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        let mut inner = self.write();
        let mut due: Vec<&mut Outboxed> = inner
            .outbox
            .values_mut()
            .filter_map(|all| all.iter_mut().find(|o| o.delivery.state == DeliveryState::Pending))
            .filter(|o| o.delivery.next_attempt_at <= now && o.lease_until.is_none_or(|l| l <= now))
            .collect();
        due.sort_by_key(|o| o.delivery.next_attempt_at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|o| {
                o.lease_until = Some(lease_until);
                o.delivery.clone()
            })
            .collect())
    }

    async fn record_attempt(&self, event_id: Uuid, attempt: &Attempt) -> Result<()> {
        let mut inner = self.write();
        let Some(call_id) = inner.event_calls.get(&event_id).copied() else { return Ok(()) };
        let all = inner.outbox.get_mut(&call_id).into_iter().flatten();
        if let Some(o) = all.into_iter().find(|o| o.delivery.event_id == event_id) {
            o.lease_until = None;
            let d = &mut o.delivery;
            d.attempts += 1;
            d.state = attempt.state;
            d.next_attempt_at = attempt.next_attempt_at;
            d.last_attempt_at = Some(attempt.at);
            d.last_result = Some(attempt.result.clone());
        }
        Ok(())
    }

    async fn outbox_depth(&self) -> Result<u64> {
        let inner = self.read();
        let pending = inner.outbox.values().flatten().filter(|o| o.delivery.state == DeliveryState::Pending);
        Ok(pending.count() as u64)
    }

    async fn purge_ended_batch(&self, before: time::OffsetDateTime, limit: usize) -> Result<usize> {
        let mut inner = self.write();
        let due: Vec<(i64, CallId)> =
            inner.ended.range(..(micros(before), CallId::from_uuid(uuid::Uuid::nil()))).take(limit).copied().collect();
        for entry in &due {
            inner.ended.remove(entry);
            // Its key and status callbacks go with it.
            inner.remove(entry.1);
        }
        Ok(due.len())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
