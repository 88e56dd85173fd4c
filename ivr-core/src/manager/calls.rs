//! The live-call table and the one writer per call.
//!
//! Every call this process follows (queued, being dialled, or up) has an entry: its event
//! tracker, the sender of its updates, and the queue of its writer task. Every transition of
//! the call (the originate's result, a cancel, a reconcile's verdict, its events) is sent to
//! that queue, and the writer applies them to the store one after another, so they land in
//! the order they happened and the event loop never waits on the store. While the store is
//! down the writer holds the transition (and the rest behind it) and tries again.

// foldhash rather than SipHash: the keys are call ids this process made, so no one can choose
// colliding ones, and a server looks a live call up on each of its status GETs.
use foldhash::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::follow::Tracker;
use super::CallManager;
use crate::call::{Call, CallId, CallStatus, Transition};
use crate::error::{Error, Result};
use crate::store::Applied;

/// Bounds of the pause between two tries of a transition while the store is unavailable.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// One transition for a call's writer, and who waits for its outcome, if anyone.
struct Write {
    transition: Transition,
    reply: Option<oneshot::Sender<Result<Call>>>,
}

/// A call this process follows.
pub(crate) struct LiveCall {
    pub tracker: Tracker,
    updates: watch::Sender<Call>,
    writer: mpsc::UnboundedSender<Write>,
    /// The writer is applying a transition: the store may be a step ahead of `updates`.
    writing: bool,
}

impl LiveCall {
    /// Queues a transition for the call's writer; nobody waits for it.
    pub fn send(&self, transition: Transition) {
        let _ = self.writer.send(Write { transition, reply: None });
    }

    /// The call as last published.
    pub fn current(&self) -> Call {
        self.updates.borrow().clone()
    }
}

/// The calls this process follows, by id.
#[derive(Default)]
pub(crate) struct LiveCalls {
    map: Mutex<HashMap<CallId, LiveCall>>,
}

impl LiveCalls {
    fn lock(&self) -> MutexGuard<'_, HashMap<CallId, LiveCall>> {
        // Every critical section is a few map operations without await; a panic inside one
        // cannot leave a half-made entry, so a poisoned lock is still sound.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn ids(&self) -> std::collections::HashSet<CallId> {
        self.lock().keys().copied().collect()
    }

    pub fn contains(&self, call_id: CallId) -> bool {
        self.lock().contains_key(&call_id)
    }

    /// Runs `f` on the call's entry, if the call is followed here.
    pub fn with<T>(&self, call_id: CallId, f: impl FnOnce(&mut LiveCall) -> T) -> Option<T> {
        self.lock().get_mut(&call_id).map(f)
    }

    /// Runs `f` on every entry.
    pub fn each(&self, mut f: impl FnMut(&mut LiveCall)) {
        self.lock().values_mut().for_each(&mut f);
    }

    /// The call as last published, unless its writer is applying a transition right now (then
    /// the store may already hold a newer state, which someone may have read: ask the store).
    pub fn settled(&self, call_id: CallId) -> Option<Call> {
        self.lock().get(&call_id).filter(|c| !c.writing).map(LiveCall::current)
    }

    /// The version ([`Call::version`]) of what [`settled`](Self::settled) would return, without
    /// copying the call.
    pub fn settled_version(&self, call_id: CallId) -> Option<usize> {
        self.lock().get(&call_id).filter(|c| !c.writing).map(|c| c.updates.borrow().version())
    }

    pub fn subscribe(&self, call_id: CallId) -> Option<watch::Receiver<Call>> {
        self.lock().get(&call_id).map(|c| c.updates.subscribe())
    }

    /// The calls due for a check with Asterisk at `now`; each is taken as checked.
    pub fn overdue(&self, now: Instant, ring_grace: Duration, answered_silence: Duration) -> Vec<Call> {
        self.lock()
            .values_mut()
            .filter_map(|c| c.tracker.check_due(now, ring_grace, answered_silence).then(|| c.current()))
            .collect()
    }

    /// Hands a new state to the call's subscribers; a terminal one lets the call go in the same
    /// step, so whoever sees the end sees the call gone too. Returns whether a retry is due
    /// (the call went back to `pending` for a new attempt, not canceled), and how many calls
    /// are left if this one was let go.
    fn publish(&self, call: &Call) -> (bool, Option<usize>) {
        let mut map = self.lock();
        let mut retry = false;
        if let Some(entry) = map.get_mut(&call.call_id) {
            entry.updates.send_if_modified(|current| {
                let newer = call.version() > current.version();
                if newer {
                    *current = call.clone();
                }
                newer
            });
            if call.status == CallStatus::Pending && call.attempt_number > entry.tracker.attempt() {
                entry.tracker.next_attempt(call.attempt_number);
                retry = !entry.tracker.is_canceled();
            }
        }
        if !call.is_completed() {
            return (retry, None);
        }
        map.remove(&call.call_id);
        (false, Some(map.len()))
    }

    fn remove(&self, call_id: CallId) -> usize {
        let mut map = self.lock();
        map.remove(&call_id);
        map.len()
    }
}

impl CallManager {
    /// Starts following `call` with `tracker`, unless `limit` calls are followed already
    /// (`false`). A call followed already keeps its entry.
    pub(crate) fn follow(&self, call: &Call, tracker: Tracker, limit: Option<usize>) -> bool {
        let calls = &self.shared.calls;
        let mut map = calls.lock();
        if map.contains_key(&call.call_id) {
            return true;
        }
        if limit.is_some_and(|limit| map.len() >= limit) {
            return false;
        }
        let (updates, _) = watch::channel(call.clone());
        let (writer, queue) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().write_in_order(call.call_id, queue));
        map.insert(call.call_id, LiveCall { tracker, updates, writer, writing: false });
        self.shared.metrics.active_calls.set(map.len() as i64);
        true
    }

    /// Stops following a call (it ended, or was never stored).
    pub(crate) fn forget(&self, call_id: CallId) {
        let left = self.shared.calls.remove(call_id);
        self.shared.metrics.active_calls.set(left as i64);
    }

    /// Applies `transition` through the call's writer and waits for the outcome; a call not
    /// followed here has no writer, so the store applies it directly.
    pub(crate) async fn write(&self, call_id: CallId, transition: Transition) -> Result<Call> {
        let (reply, outcome) = oneshot::channel();
        // The writer runs as long as the entry holds its sender, so a send to it only fails
        // once the call is let go: then it is not followed.
        let queued =
            self.shared.calls.with(call_id, |c| c.writer.send(Write { transition, reply: Some(reply) }).is_ok());
        if queued != Some(true) {
            return Err(Error::NotFound(call_id));
        }
        outcome.await.map_err(|_| Error::StoreUnavailable("the call's writer stopped".into()))?
    }

    /// [`write`](Self::write) for a transition made here, applied straight to the store when
    /// the call is not followed (found active after a restart, say).
    pub(crate) async fn write_or_apply(&self, call_id: CallId, transition: Transition) -> Result<Call> {
        if self.shared.calls.contains(call_id) {
            match self.write(call_id, transition.clone()).await {
                Err(Error::NotFound(_)) => {} // let go meanwhile
                other => return other,
            }
        }
        self.apply(call_id, &transition).await
    }

    /// The writer of one call: its transitions, in order, until the call is let go.
    async fn write_in_order(self, call_id: CallId, mut queue: mpsc::UnboundedReceiver<Write>) {
        while let Some(Write { transition, reply }) = queue.recv().await {
            // From here until its outcome is published, reads of the call go to the store.
            self.shared.calls.with(call_id, |c| c.writing = true);
            let mut pause = STORE_RETRY_MIN;
            let outcome = loop {
                match self.apply(call_id, &transition).await {
                    // The store is down: keep this transition (and, behind it, the rest of the
                    // call's) until it is back, so no step of the call is lost.
                    Err(Error::StoreUnavailable(e)) => {
                        tracing::warn!(%call_id, error = %e, ?pause, "store unavailable; will record the transition again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(STORE_RETRY_MAX);
                    }
                    other => break other,
                }
            };
            // `apply` has published what changed (or let the call go).
            self.shared.calls.with(call_id, |c| c.writing = false);
            if let Err(e) = &outcome {
                tracing::error!(%call_id, error = %e, cause = %transition.cause, "could not record a transition");
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Applies a transition in the store and reacts to what changed.
    async fn apply(&self, call_id: CallId, transition: &Transition) -> Result<Call> {
        match self.shared.store.apply(call_id, transition).await? {
            Applied::Changed(call) => {
                self.changed(&call);
                Ok(call)
            }
            Applied::Ignored { call, why } => {
                tracing::debug!(%call_id, cause = %transition.cause, %why, "transition ignored");
                if call.is_completed() {
                    // Ended already (elsewhere, or by an earlier transition): nothing to follow.
                    self.forget(call_id);
                }
                Ok(call)
            }
        }
    }

    /// Publishes a new state and does what it calls for: metrics, a retry, or letting go.
    fn changed(&self, call: &Call) {
        let shared = &self.shared;
        tracing::info!(call_id = %call.call_id, status = %call.status, attempt = call.attempt_number, "call status");
        let (retry, left) = shared.calls.publish(call);
        if let Some(left) = left {
            shared.metrics.active_calls.set(left as i64);
        }
        match call.status {
            CallStatus::Answered => shared.metrics.answered.inc(),
            CallStatus::Failed => {
                let reason = call.failure_reason.map_or("unknown", |r| r.as_str());
                shared.metrics.failed.with_label_values(&[reason]).inc();
            }
            _ => {}
        }
        if retry {
            let manager = self.clone();
            let (call_id, attempt) = (call.call_id, call.attempt_number);
            tokio::spawn(async move {
                tokio::time::sleep(manager.shared.settings.retry_delay).await;
                // Still waiting for this attempt (not canceled meanwhile): to the back of the queue.
                let waiting = manager.shared.calls.with(call_id, |c| {
                    let now = c.current();
                    now.is_queued() && now.attempt_number == attempt && !c.tracker.is_canceled()
                });
                if waiting == Some(true) {
                    let pacer = &manager.shared.pacer;
                    pacer.requeue(call_id);
                    manager.shared.metrics.queued_calls.set(pacer.queued() as i64);
                }
            });
        }
    }
}
