//! The in-memory store: what DISABLE_DB mode runs on. Nothing survives the process.
//!
//! It keeps at most `max_ended` ended calls (`MEMORY_MAX_CALLS`, default
//! [`DEFAULT_MEMORY_MAX_CALLS`]); past that the call that ended first goes. Active calls are
//! never let go. An ended call never changes again, so it is kept compact (`compact.rs`, a few
//! hundred bytes) and read back on `get`; `examples/memory_rss.rs` measures the memory a call.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::RwLock;

use async_trait::async_trait;

use super::{compact, micros, Applied, CallPage, CallQuery, CallStore};
use crate::call::{Call, CallId, Transition};
use crate::error::{Conflict, Error, Result};

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

#[derive(Debug, Default)]
struct Inner {
    calls: HashMap<CallId, Slot>,
    by_key: HashMap<String, CallId>,
    /// (created_at µs, id) of every call: the list order.
    order: BTreeSet<(i64, CallId)>,
    /// (created_at µs, id) of the ended calls, in the order they ended: the eviction order.
    ended: VecDeque<(i64, CallId)>,
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

impl Inner {
    fn call(&self, call_id: &CallId) -> Option<Call> {
        self.calls.get(call_id).map(Slot::call)
    }

    /// Keeps `call` (new, or its new state); an ended call counts against `max_ended`.
    fn keep(&mut self, call: &Call, max_ended: usize) {
        let slot = Slot::of(call);
        if matches!(slot, Slot::Ended(_)) {
            self.ended.push_back((micros(call.created_at), call.call_id));
        }
        self.calls.insert(call.call_id, slot);
        while self.ended.len() > max_ended {
            let Some((created, id)) = self.ended.pop_front() else { break };
            if let Some(gone) = self.calls.remove(&id) {
                if let Some(key) = gone.call().spec.idempotency_key {
                    self.by_key.remove(&key);
                }
            }
            self.order.remove(&(created, id));
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
        let slot = inner.calls.get_mut(&call_id).ok_or(Error::NotFound(call_id))?;
        let Slot::Active(call) = slot else {
            // Ended: `Call::apply` refuses every transition of a terminal call.
            let mut call = slot.call();
            return Ok(match call.apply(transition) {
                Err(why) => Applied::Ignored { call, why },
                Ok(()) => {
                    inner.keep(&call, self.max_ended);
                    Applied::Changed(call)
                }
            });
        };
        Ok(match call.apply(transition) {
            Ok(()) => {
                let call = (**call).clone();
                if call.is_completed() {
                    inner.keep(&call, self.max_ended);
                }
                Applied::Changed(call)
            }
            Err(why) => Applied::Ignored { call: (**call).clone(), why },
        })
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

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
