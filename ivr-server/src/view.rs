//! The JSON shapes of calls, one per use, shared by every route.

use ivr_core::{Call, CallPage, CallStatus, FailureReason, TransitionRecord};
use serde::Serialize;
use time::OffsetDateTime;

/// A call as every route shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    pub call_id: String,
    pub phone_number: String,
    pub status: CallStatus,
    pub channel: Option<String>,
    pub context: String,
    pub extension: String,
    pub priority: u32,
    pub caller_id: Option<String>,
    /// Seconds of ringing before Asterisk gives up.
    pub timeout: u32,
    pub audio: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub dialed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ringing_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub answered_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// Seconds from answer to end; null unless answered and ended.
    pub duration: Option<f64>,
    pub failure_reason: Option<FailureReason>,
    /// The Q.850 cause Asterisk reported at hang-up.
    pub hangup_cause: Option<u16>,
    pub hangup_cause_text: Option<String>,
    pub attempt_number: u32,
    pub max_attempts: u32,
    pub is_active: bool,
    pub is_completed: bool,
    /// Every status the call went through, oldest first.
    pub history: Vec<TransitionRecord>,
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
            is_active: call.is_active(),
            is_completed: call.is_completed(),
            history: call.history.clone(),
        }
    }
}

/// The answer to a call creation.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedView {
    pub success: bool,
    pub call_id: String,
    pub phone_number: String,
    pub message: String,
    pub channel: Option<String>,
    pub status: CallStatus,
    #[serde(with = "time::serde::rfc3339")]
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
#[derive(Debug, Clone, Serialize)]
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
