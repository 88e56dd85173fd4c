//! The in-memory store: what DISABLE_DB mode runs on. Nothing survives the process.
//!
//! A purge takes at most one batch per write lock, so readers get in between batches.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{micros, Applied, CallPage, CallQuery, CallStore};
use crate::call::{Call, CallId, Transition};
use crate::error::{Conflict, Error, Result};
use crate::webhook::{outbox_entries, Attempt, Delivery, DeliveryState};

/// A [`CallStore`] in a map behind one lock. Every operation is a short critical section
/// with no await inside, so a plain `std` lock is the right tool.
#[derive(Debug, Default)]
pub struct MemoryCallStore {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    calls: HashMap<CallId, Call>,
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
        if let Some(existing) = inner.calls.get(&call.call_id) {
            return Err(Error::AlreadyExists { on: Conflict::CallId, existing: Box::new(existing.clone()) });
        }
        if let Some(key) = &call.spec.idempotency_key {
            if let Some(id) = inner.by_key.get(key) {
                let existing = Box::new(inner.calls[id].clone());
                return Err(Error::AlreadyExists { on: Conflict::IdempotencyKey, existing });
            }
            inner.by_key.insert(key.clone(), call.call_id);
        }
        inner.order.insert((micros(call.created_at), call.call_id));
        inner.note_end(call);
        inner.calls.insert(call.call_id, call.clone());
        inner.enqueue(call, 0);
        Ok(())
    }

    async fn get(&self, call_id: CallId) -> Result<Option<Call>> {
        Ok(self.read().calls.get(&call_id).cloned())
    }

    async fn get_by_idempotency_key(&self, key: &str) -> Result<Option<Call>> {
        let inner = self.read();
        Ok(inner.by_key.get(key).map(|id| inner.calls[id].clone()))
    }

    async fn apply(&self, call_id: CallId, transition: &Transition) -> Result<Applied> {
        let mut inner = self.write();
        let call = inner.calls.get_mut(&call_id).ok_or(Error::NotFound(call_id))?;
        let from = call.history.len();
        let applied = match call.apply(transition) {
            Ok(()) => Applied::Changed(call.clone()),
            Err(why) => Applied::Ignored { call: call.clone(), why },
        };
        if let Applied::Changed(call) = &applied {
            inner.note_end(call);
            inner.enqueue(call, from);
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
        let newest_first = older.rev().map(|(_, id)| &inner.calls[id]).filter(|call| query.matches(call));
        Ok(CallPage::from_one_extra(newest_first.take(size + 1).cloned().collect(), size))
    }

    async fn list_active(&self) -> Result<Vec<Call>> {
        Ok(self.read().calls.values().filter(|c| c.is_active()).cloned().collect())
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
            if let Some(call) = inner.calls.remove(&entry.1) {
                inner.order.remove(&(micros(call.created_at), call.call_id));
                if let Some(key) = &call.spec.idempotency_key {
                    inner.by_key.remove(key);
                }
            }
            // Its status callbacks go with it.
            for gone in inner.outbox.remove(&entry.1).into_iter().flatten() {
                inner.event_calls.remove(&gone.delivery.event_id);
            }
        }
        Ok(due.len())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
