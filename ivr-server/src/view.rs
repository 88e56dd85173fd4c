//! The JSON shapes of calls, one per use, shared by every route.

use std::borrow::Cow;

use ivr_core::{Call, CallPage, CallStatus, FailureReason, TransitionRecord};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Health)]
pub struct HealthView {
    #[schema(value_type = String, pattern = "^ok$")]
    pub status: &'static str,
}

/// `GET /readyz` when ready (when not, a `not-ready` problem with the same `store` and `ari`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Ready)]
pub struct ReadyView {
    #[schema(value_type = String, pattern = "^ready$")]
    pub status: &'static str,
    #[schema(value_type = String, pattern = "^ok$")]
    pub store: &'static str,
    #[schema(value_type = String, pattern = "^connected$")]
    pub ari: &'static str,
}

/// A call as every route shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Call)]
pub struct CallView {
    #[schema(format = "uuid")]
    pub call_id: String,
    pub phone_number: String,
    #[schema(value_type = StatusSchema)]
    pub status: CallStatus,
    /// The ARI channel name, once Asterisk gave one.
    pub channel: Option<String>,
    pub context: String,
    pub extension: String,
    pub priority: u32,
    pub caller_id: Option<String>,
    /// Seconds of ringing before Asterisk gives up.
    pub timeout: u32,
    pub audio: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub dialed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ringing_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub answered_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<OffsetDateTime>,
    /// Seconds from answer to end; null unless answered and ended.
    pub duration: Option<f64>,
    #[schema(value_type = Option<ReasonSchema>)]
    pub failure_reason: Option<FailureReason>,
    /// The Q.850 cause Asterisk reported at hang-up.
    pub hangup_cause: Option<u16>,
    pub hangup_cause_text: Option<String>,
    pub attempt_number: u32,
    pub max_attempts: u32,
    /// Where the call's status changes are POSTed, if anywhere.
    pub status_callback: Option<String>,
    /// The statuses POSTed to `status_callback`.
    #[schema(value_type = Vec<StatusSchema>)]
    pub status_callback_events: Vec<CallStatus>,
    pub is_active: bool,
    pub is_completed: bool,
    /// Every status the call went through, oldest first.
    pub history: Vec<TransitionView>,
}

impl From<&Call> for CallView {
    fn from(call: &Call) -> Self {
        CallView {
            call_id: call.call_id.to_string(),
            phone_number: call.spec.phone_number.to_string(),
            status: call.status,
            channel: call.channel.clone(),
            context: call.spec.context.clone(),
            extension: call.spec.extension.clone(),
            priority: call.spec.priority,
            caller_id: call.spec.caller_id.clone(),
            timeout: call.spec.timeout_secs,
            audio: call.spec.audio.clone(),
            created_at: call.created_at,
            dialed_at: call.dialed_at,
            ringing_at: call.ringing_at,
            answered_at: call.answered_at,
            ended_at: call.ended_at,
            duration: call.duration(),
            failure_reason: call.failure_reason,
            hangup_cause: call.hangup.as_ref().map(|h| h.code),
            hangup_cause_text: call.hangup.as_ref().map(|h| h.text.clone()),
            attempt_number: call.attempt_number,
            max_attempts: call.spec.max_attempts,
            status_callback: call.spec.status_callback.clone(),
            status_callback_events: call.spec.status_callback_events.clone(),
            is_active: call.is_active(),
            is_completed: call.is_completed(),
            history: call.history.iter().map(TransitionView::from).collect(),
        }
    }
}

/// One entry of a call's history: the status it reached, when, and what caused it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Transition)]
pub struct TransitionView {
    #[schema(value_type = StatusSchema)]
    pub status: CallStatus,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    pub attempt: u32,
    #[schema(value_type = Option<ReasonSchema>)]
    pub failure_reason: Option<FailureReason>,
    pub cause: String,
}

impl From<&TransitionRecord> for TransitionView {
    fn from(t: &TransitionRecord) -> Self {
        TransitionView {
            status: t.status,
            at: t.at,
            attempt: t.attempt,
            failure_reason: t.failure_reason,
            cause: t.cause.clone(),
        }
    }
}

/// The schema of [`CallStatus`]: its names, from [`CallStatus::ALL`].
pub struct StatusSchema;

impl PartialSchema for StatusSchema {
    fn schema() -> RefOr<Schema> {
        let names = CallStatus::ALL.map(|s| s.as_str());
        ObjectBuilder::new().schema_type(Type::String).enum_values(Some(names)).into()
    }
}

impl ToSchema for StatusSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CallStatus")
    }
}

/// The schema of [`FailureReason`]: its names, from [`FailureReason::ALL`].
pub struct ReasonSchema;

impl PartialSchema for ReasonSchema {
    fn schema() -> RefOr<Schema> {
        let names = FailureReason::ALL.map(|r| r.as_str());
        ObjectBuilder::new().schema_type(Type::String).enum_values(Some(names)).into()
    }
}

impl ToSchema for ReasonSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("FailureReason")
    }
}

/// The answer to a call creation.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = CreatedCall)]
pub struct CreatedView {
    pub success: bool,
    #[schema(format = "uuid")]
    pub call_id: String,
    pub phone_number: String,
    pub message: String,
    pub channel: Option<String>,
    #[schema(value_type = StatusSchema)]
    pub status: CallStatus,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl From<&Call> for CreatedView {
    fn from(call: &Call) -> Self {
        CreatedView {
            success: true,
            call_id: call.call_id.to_string(),
            phone_number: call.spec.phone_number.to_string(),
            message: format!(
                "call to {} accepted; follow it at /api/v1/calls/{}",
                call.spec.phone_number, call.call_id
            ),
            channel: call.channel.clone(),
            status: call.status,
            created_at: call.created_at,
        }
    }
}

/// One page of calls.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = CallList)]
pub struct ListView {
    pub calls: Vec<CallView>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

impl From<&CallPage> for ListView {
    fn from(page: &CallPage) -> Self {
        ListView {
            calls: page.calls.iter().map(CallView::from).collect(),
            next_cursor: page.next.map(|c| c.to_string()),
        }
    }
}

/// `GET /api/v1/calls/{call_id}/deliveries`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Deliveries)]
pub struct DeliveriesView {
    #[schema(format = "uuid")]
    pub call_id: String,
    /// Oldest first.
    pub deliveries: Vec<DeliveryView>,
}

impl DeliveriesView {
    pub fn new(call_id: ivr_core::CallId, deliveries: &[ivr_core::webhook::Delivery]) -> Self {
        DeliveriesView { call_id: call_id.to_string(), deliveries: deliveries.iter().map(DeliveryView::from).collect() }
    }
}

/// One status callback: the POST of one change of the call to its `status_callback`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Delivery)]
pub struct DeliveryView {
    /// The event's id, sent as `Ivr-Event-Id` (the same on every attempt).
    #[schema(format = "uuid")]
    pub event_id: String,
    /// `call.<status>`.
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(value_type = StatusSchema)]
    pub status: CallStatus,
    pub url: String,
    /// pending (to be tried at `next_attempt_at`), delivered (a 2xx came back) or failed
    /// (given up after WEBHOOK_MAX_AGE).
    #[schema(value_type = String, pattern = "^(pending|delivered|failed)$")]
    pub state: &'static str,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// When the next attempt is due (pending only).
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_attempt_at: Option<OffsetDateTime>,
    /// What the last attempt got, e.g. `HTTP 200`, `HTTP 503`, `no answer within 10000 ms`.
    pub last_result: Option<String>,
}

impl From<&ivr_core::webhook::Delivery> for DeliveryView {
    fn from(d: &ivr_core::webhook::Delivery) -> Self {
        let pending = d.state == ivr_core::webhook::DeliveryState::Pending;
        DeliveryView {
            event_id: d.event_id.to_string(),
            event_type: d.event_type(),
            status: d.status,
            url: d.url.clone(),
            state: d.state.as_str(),
            attempts: d.attempts,
            created_at: d.created_at,
            next_attempt_at: pending.then_some(d.next_attempt_at),
            last_attempt_at: d.last_attempt_at,
            last_result: d.last_result.clone(),
        }
    }
}
