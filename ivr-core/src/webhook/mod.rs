//! Status callbacks: each selected change of a call POSTed to the call's `status_callback`,
//! signed, retried, and never lost.
//!
//! - this file: a [`Delivery`] (one row of the outbox) and which transitions make one
//!   ([`outbox_entries`]); the stores write those rows in the same transaction as the
//!   transition, so a change that is stored is a change that will be told;
//! - `policy.rs`: [`CallbackPolicy`], which URLs a call may name (no SSRF);
//! - `sign.rs`: the `Ivr-Signature` header (Stripe's scheme);
//! - `worker.rs`: [`Worker`], the task that claims due deliveries from the store, sends them
//!   and records each attempt (backoff with jitter, up to a maximum age).
//!
//! At least once, in order per call: a call's next delivery is not claimed while an earlier
//! one of the same call is still pending, and a delivery is only done when a 2xx was heard.

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::call::{Call, CallId, CallStatus, TransitionRecord};

mod policy;
#[cfg(feature = "testing")]
pub mod receiver;
mod sign;
mod worker;

pub use policy::{CallbackPolicy, InvalidHost};
pub use sign::{sign, signature_header};
pub use worker::{Render, WebhookSettings, Worker};

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet: due at `next_attempt_at`.
    Pending,
    /// A 2xx was received.
    Delivered,
    /// Given up: no 2xx within the maximum age.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [DeliveryState::Pending, DeliveryState::Delivered, DeliveryState::Failed].into_iter().find(|d| d.as_str() == s)
    }
}

/// One status callback of one call: a row of the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The event's id (`Ivr-Event-Id`): the same on every attempt, for the receiver to
    /// deduplicate.
    pub event_id: Uuid,
    pub call_id: CallId,
    /// The index in the call's history of the transition it tells of.
    pub seq: u32,
    /// The status the call reached.
    pub status: CallStatus,
    pub url: String,
    /// The call as it stood right after the transition.
    pub call: Call,
    pub created_at: OffsetDateTime,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: OffsetDateTime,
    pub last_attempt_at: Option<OffsetDateTime>,
    /// What the last attempt got: `HTTP 200`, `HTTP 503`, `timed out`, `connection refused…`.
    pub last_result: Option<String>,
}

impl Delivery {
    /// The transition this delivery tells of.
    pub fn transition(&self) -> Option<&TransitionRecord> {
        self.call.history.get(self.seq as usize)
    }

    /// The event type: `call.<status>`.
    pub fn event_type(&self) -> String {
        format!("call.{}", self.status)
    }
}

/// What an attempt came to, as [`CallStore::record_attempt`](crate::CallStore::record_attempt)
/// stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub at: OffsetDateTime,
    pub result: String,
    /// `Pending` (retry at `next_attempt_at`), `Delivered` or `Failed`.
    pub state: DeliveryState,
    pub next_attempt_at: OffsetDateTime,
}

/// The outbox rows for the entries `call.history[from..]` that its spec selects: one per
/// entry whose status differs from the entry before it (a `sent` mark keeps the status, so it
/// tells nothing) and that is in `status_callback_events`. The failure of an attempt that is
/// retried (a `failed` entry followed by `pending`) is not the call's end and is not sent as
/// `failed`. None without a `status_callback`.
pub fn outbox_entries(call: &Call, from: usize) -> Vec<Delivery> {
    let Some(url) = &call.spec.status_callback else { return Vec::new() };
    let history = &call.history;
    (from..history.len())
        .filter(|&i| {
            let status = history[i].status;
            let changed = i == 0 || history[i - 1].status != status;
            let attempt_failure = status == CallStatus::Failed && i + 1 < history.len();
            changed && !attempt_failure && call.spec.status_callback_events.contains(&status)
        })
        .map(|i| {
            // The call as the transition left it, even when one write appended several.
            let snapshot = if i + 1 < history.len() { as_of(call, i) } else { call.clone() };
            Delivery {
                event_id: Uuid::new_v4(),
                call_id: call.call_id,
                seq: i as u32,
                status: history[i].status,
                url: url.clone(),
                call: snapshot,
                created_at: history[i].at,
                state: DeliveryState::Pending,
                attempts: 0,
                next_attempt_at: history[i].at,
                last_attempt_at: None,
                last_result: None,
            }
        })
        .collect()
}

/// `call` with its history cut after entry `i` and its status that entry's. Only for the
/// intermediate entries of one write (a retry's `pending` before a later one); the other
/// fields are the write's end state.
fn as_of(call: &Call, i: usize) -> Call {
    let mut snapshot = call.clone();
    snapshot.history.truncate(i + 1);
    snapshot.status = call.history[i].status;
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{FailureReason, Step, Transition};
    use crate::store::conformance::new_call;

    fn watched(events: &[CallStatus]) -> Call {
        let spec = crate::CallSpec {
            status_callback: Some("http://hooks.test/ivr".into()),
            status_callback_events: events.to_vec(),
            max_attempts: 2,
            ..new_call("+15550000001")
        };
        Call::new(CallId::new(), spec, crate::call::now())
    }

    #[test]
    fn selected_changes_only_and_no_attempt_failure() {
        let mut call = watched(&[CallStatus::Pending, CallStatus::Answered, CallStatus::Failed]);
        assert_eq!(outbox_entries(&call, 0).len(), 1, "pending at creation");
        let before = call.history.len();
        call.apply(&Transition::new(Step::Sent, "sent")).unwrap();
        assert!(outbox_entries(&call, before).is_empty(), "a sent mark is no change of status");
        call.apply(&Transition::new(Step::Dialing, "dialing")).unwrap();
        let before = call.history.len();
        call.apply(&Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Busy }, "busy")).unwrap();
        let retry = outbox_entries(&call, before);
        assert_eq!(retry.iter().map(|d| d.status).collect::<Vec<_>>(), [CallStatus::Pending]);
        assert_eq!(retry[0].call.status, CallStatus::Pending);
        let before = call.history.len();
        call.apply(&Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Busy }, "busy")).unwrap();
        let end = outbox_entries(&call, before);
        assert_eq!(end.iter().map(|d| d.status).collect::<Vec<_>>(), [CallStatus::Failed]);
        assert_eq!(end[0].transition().map(|t| t.status), Some(CallStatus::Failed));
    }

    #[test]
    fn no_url_no_deliveries() {
        let mut call = watched(&CallStatus::ALL);
        call.spec.status_callback = None;
        assert!(outbox_entries(&call, 0).is_empty());
    }
}
