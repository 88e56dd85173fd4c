//! [`CallUpdates`]: a call's states as they happen, for `watch` (and the server's SSE).

use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::CallManager;
use crate::call::{Call, CallId};
use crate::error::{Error, Result};

/// A call's states as they happen: the current one first, the last one terminal.
pub struct CallUpdates {
    manager: CallManager,
    call_id: CallId,
    first: Option<Call>,
    receiver: Option<watch::Receiver<Call>>,
    /// Changes announced by PostgreSQL (`instance.rs`), for a call followed elsewhere.
    woken: Option<broadcast::Receiver<super::instance::Wake>>,
    /// History length of the last state handed out.
    seen: usize,
    done: bool,
}

impl CallManager {
    /// The call's current state, then each new state as it happens; ends after the call does.
    pub async fn watch(&self, call_id: CallId) -> Result<CallUpdates> {
        // Before the store is read, so no change between the read and the wait is missed.
        let woken = self.shared.instance.as_ref().filter(|i| i.is_shared()).map(|i| i.subscribe());
        let receiver = self.shared.calls.subscribe(call_id);
        let current = match &receiver {
            Some(rx) => rx.borrow().clone(),
            None => self.shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?,
        };
        Ok(CallUpdates { manager: self.clone(), call_id, first: Some(current), receiver, woken, seen: 0, done: false })
    }
}

impl CallUpdates {
    /// The next state; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Call> {
        loop {
            if self.done {
                return None;
            }
            let candidate = match self.first.take() {
                Some(first) => first,
                None => match &mut self.receiver {
                    Some(rx) => match rx.changed().await {
                        Ok(()) => rx.borrow_and_update().clone(),
                        // No longer followed here: the store has its last word.
                        Err(_) => {
                            self.receiver = None;
                            continue;
                        }
                    },
                    None => {
                        let call = self.manager.shared.store.get(self.call_id).await.ok().flatten()?;
                        if call.history.len() <= self.seen && call.is_active() {
                            self.wait_for_change().await;
                            continue;
                        }
                        call
                    }
                },
            };
            if candidate.history.len() > self.seen {
                self.seen = candidate.history.len();
                self.done = candidate.is_completed();
                return Some(candidate);
            }
            if candidate.is_completed() {
                self.done = true;
            }
        }
    }
}

impl CallUpdates {
    /// Waits for a sign that a call followed by no one in this process has changed: beside
    /// other instances, PostgreSQL's announcement of it (with a slow look now and then, in
    /// case one was missed); alone, a look shortly (a call found active after a restart
    /// and not yet reconciled).
    async fn wait_for_change(&mut self) {
        let Some(woken) = &mut self.woken else {
            return tokio::time::sleep(LOOK_AGAIN).await;
        };
        let deadline = tokio::time::Instant::now() + LOOK_AGAIN_SHARED;
        loop {
            match tokio::time::timeout_at(deadline, woken.recv()).await {
                Ok(Ok(Some(id))) if id != self.call_id => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    self.woken = None;
                    return;
                }
                // This call, everything (a re-opened LISTEN), missed announcements, or time.
                _ => return,
            }
        }
    }
}

/// How soon the store is read again for a call no instance announces.
const LOOK_AGAIN: Duration = Duration::from_millis(500);
/// Beside other instances, changes are announced; this is the fallback in case one is lost.
const LOOK_AGAIN_SHARED: Duration = Duration::from_secs(5);
