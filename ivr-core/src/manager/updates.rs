//! [`CallUpdates`]: a call's states as they happen, for `watch` (and the server's SSE).

use std::time::Duration;

use tokio::sync::watch;

use super::CallManager;
use crate::call::{Call, CallId};
use crate::error::{Error, Result};

/// A call's states as they happen: the current one first, the last one terminal.
pub struct CallUpdates {
    manager: CallManager,
    call_id: CallId,
    first: Option<Call>,
    receiver: Option<watch::Receiver<Call>>,
    /// History length of the last state handed out.
    seen: usize,
    done: bool,
}

impl CallManager {
    /// The call's current state, then each new state as it happens; ends after the call does.
    pub async fn watch(&self, call_id: CallId) -> Result<CallUpdates> {
        let receiver = self.shared.calls.subscribe(call_id);
        let current = match &receiver {
            Some(rx) => rx.borrow().clone(),
            None => self.shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?,
        };
        Ok(CallUpdates { manager: self.clone(), call_id, first: Some(current), receiver, seen: 0, done: false })
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
                            // Followed by no one in this process (e.g. found after a restart):
                            // look again shortly.
                            tokio::time::sleep(Duration::from_millis(500)).await;
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
