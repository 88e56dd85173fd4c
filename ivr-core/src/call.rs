//! The call model: identifiers, phone numbers, statuses and the rules for moving a call forward.
//!
//! Everything here is plain data and pure functions. Stores persist a [`Call`] and run
//! [`Call::apply`] atomically; the call manager decides *which* [`Transition`] an ARI event means.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A call's identity. It is also the ARI channel id of the call's first attempt, so every event
/// Asterisk sends about the call can be matched to it without a lookup table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CallId(Uuid);

impl CallId {
    /// A fresh random id.
    pub fn new() -> Self {
        CallId(Uuid::new_v4())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        CallId(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The ARI channel id used for `attempt` (1-based). Attempt 1 is the call id itself; later
    /// attempts append `-<n>`, so a retried originate of the same attempt reuses its id and
    /// Asterisk's 409 "already exists" tells that it was placed.
    pub fn channel_id(&self, attempt: u32) -> String {
        if attempt <= 1 {
            self.0.to_string()
        } else {
            format!("{}-{attempt}", self.0)
        }
    }

    /// The call and attempt an ARI channel id belongs to, for ids made by [`CallId::channel_id`].
    /// A Local channel's second half (`<id>;2`) maps to the same call and attempt.
    pub fn parse_channel_id(channel_id: &str) -> Option<(CallId, u32)> {
        let id = channel_id.split(';').next()?;
        if id.len() == 36 {
            return Some((CallId(Uuid::parse_str(id).ok()?), 1));
        }
        let (uuid, attempt) = id.split_at_checked(36)?;
        let attempt: u32 = attempt.strip_prefix('-')?.parse().ok()?;
        (attempt >= 2).then_some((CallId(Uuid::parse_str(uuid).ok()?), attempt))
    }
}

impl Default for CallId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for CallId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(CallId)
    }
}

/// A number that is safe to put into an Asterisk dial string: an optional leading `+`, then 3
/// to 15 digits (E.164's maximum), nothing else. This is the only way a number enters ivr, so
/// dial-string injection (`&`, `/`, `@`, `,`, `;`, …) cannot be expressed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

/// Why a string is not a [`PhoneNumber`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PhoneNumberError {
    #[error("the phone number is empty")]
    Empty,
    #[error(
        "the phone number may hold only digits after an optional leading '+'; found {found:?} at position {position}"
    )]
    InvalidCharacter { found: char, position: usize },
    #[error("the phone number has {digits} digits; at least 3 are needed")]
    TooShort { digits: usize },
    #[error("the phone number has {digits} digits; at most 15 are allowed")]
    TooLong { digits: usize },
}

impl PhoneNumber {
    pub const MIN_DIGITS: usize = 3;
    pub const MAX_DIGITS: usize = 15;

    pub fn parse(input: &str) -> Result<Self, PhoneNumberError> {
        if input.is_empty() {
            return Err(PhoneNumberError::Empty);
        }
        let digits = input.strip_prefix('+').unwrap_or(input);
        let offset = input.len() - digits.len();
        if let Some((i, found)) = digits.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            return Err(PhoneNumberError::InvalidCharacter { found, position: offset + i });
        }
        match digits.len() {
            n if n < Self::MIN_DIGITS => Err(PhoneNumberError::TooShort { digits: n }),
            n if n > Self::MAX_DIGITS => Err(PhoneNumberError::TooLong { digits: n }),
            _ => Ok(PhoneNumber(input.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PhoneNumber {
    type Err = PhoneNumberError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for PhoneNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PhoneNumber::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a call is in its life. The order of the variants is the order of progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// Accepted and stored, not yet sent to Asterisk (or waiting for its next attempt).
    Pending,
    /// Asterisk accepted the originate.
    Dialing,
    /// The callee is being alerted.
    Ringing,
    /// The callee answered.
    Answered,
    /// Ended after being answered.
    Completed,
    /// Ended without being answered, or could not be placed.
    Failed,
}

impl CallStatus {
    pub const ALL: [CallStatus; 6] = [
        CallStatus::Pending,
        CallStatus::Dialing,
        CallStatus::Ringing,
        CallStatus::Answered,
        CallStatus::Completed,
        CallStatus::Failed,
    ];
    pub const ACTIVE: [CallStatus; 4] =
        [CallStatus::Pending, CallStatus::Dialing, CallStatus::Ringing, CallStatus::Answered];

    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Pending => "pending",
            CallStatus::Dialing => "dialing",
            CallStatus::Ringing => "ringing",
            CallStatus::Answered => "answered",
            CallStatus::Completed => "completed",
            CallStatus::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, CallStatus::Completed | CallStatus::Failed)
    }

    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }

    /// Progress rank: a transition must raise it. Both terminal statuses share the top rank.
    fn rank(self) -> u8 {
        match self {
            CallStatus::Pending => 0,
            CallStatus::Dialing => 1,
            CallStatus::Ringing => 2,
            CallStatus::Answered => 3,
            CallStatus::Completed | CallStatus::Failed => 4,
        }
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An unknown status or failure-reason name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

fn parse_name<T: Copy>(
    what: &'static str,
    value: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, UnknownName> {
    all.iter().copied().find(|v| name(*v) == value).ok_or_else(|| UnknownName {
        what,
        value: value.to_owned(),
        expected: all.iter().map(|v| name(*v)).collect::<Vec<_>>().join(", "),
    })
}

impl FromStr for CallStatus {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_name("status", s, &Self::ALL, Self::as_str)
    }
}

/// Why a call ended without being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureReason {
    Busy,
    NoAnswer,
    Congestion,
    Rejected,
    /// We hung it up (a cancel) before it was answered.
    Canceled,
    /// The number or route does not exist.
    Unreachable,
    /// Asterisk refused the originate.
    OriginateFailed,
    /// What became of the call was not seen: Asterisk no longer knows its channel and its end
    /// was never heard, or Asterisk could not be reached to place it.
    Lost,
}

impl FailureReason {
    pub const ALL: [FailureReason; 8] = [
        FailureReason::Busy,
        FailureReason::NoAnswer,
        FailureReason::Congestion,
        FailureReason::Rejected,
        FailureReason::Canceled,
        FailureReason::Unreachable,
        FailureReason::OriginateFailed,
        FailureReason::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Busy => "busy",
            FailureReason::NoAnswer => "no_answer",
            FailureReason::Congestion => "congestion",
            FailureReason::Rejected => "rejected",
            FailureReason::Canceled => "canceled",
            FailureReason::Unreachable => "unreachable",
            FailureReason::OriginateFailed => "originate_failed",
            FailureReason::Lost => "lost",
        }
    }

    /// Outcomes worth another attempt when the request asked for retries.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureReason::Busy | FailureReason::NoAnswer | FailureReason::Congestion)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for FailureReason {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_name("failure reason", s, &Self::ALL, Self::as_str)
    }
}

/// A Q.850 hang-up cause as Asterisk reported it (`cause`, `cause_txt`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hangup {
    pub code: u16,
    pub text: String,
}

/// What a call is to be: a request with every default applied and every field checked
/// (`CallManager` validates it). [`Call::new`] turns it into a `pending` call, which keeps it
/// whole as [`Call::spec`]; the stores write and read it with one helper each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSpec {
    pub phone_number: PhoneNumber,
    pub context: String,
    pub extension: String,
    pub priority: u32,
    pub caller_id: Option<String>,
    /// Seconds of ringing before Asterisk gives up (ARI's originate `timeout`; `timeout` in
    /// the JSON, as in the request).
    #[serde(rename = "timeout")]
    pub timeout_secs: u32,
    /// Media to play once answered (e.g. `sound:hello-world`) instead of continuing in the dialplan.
    pub audio: Option<String>,
    /// Channel variables set on the originated channel.
    pub variables: BTreeMap<String, String>,
    /// Attempts allowed in all (1 = no retry).
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// Where the call's status changes are POSTed (an allowed `http://` URL), if anywhere.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// The statuses whose transitions are POSTed to `status_callback`, in progress order.
    #[serde(default)]
    pub status_callback_events: Vec<CallStatus>,
}

impl CallSpec {
    /// How long Asterisk lets the callee ring.
    pub fn ring_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.timeout_secs))
    }
}

/// One entry of a call's history: the status it reached, when, and what caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub status: CallStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub attempt: u32,
    pub failure_reason: Option<FailureReason>,
    pub cause: String,
}

/// A call and everything known about it.
///
/// Timestamps are UTC with microsecond precision: that is what the stores keep, and
/// [`now`] gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub call_id: CallId,
    /// What was asked for, defaults applied.
    #[serde(flatten)]
    pub spec: CallSpec,
    pub status: CallStatus,
    /// The ARI channel name (e.g. `PJSIP/+15550000001@trunk-00000001`) once Asterisk gave one.
    pub channel: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the originate of the current attempt was first sent to Asterisk. `None` while the
    /// call waits in the queue (never sent, so it may be dialled without any risk of a double
    /// dial); once set, whether Asterisk took it is known only from Asterisk.
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub dialed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ringing_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub answered_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub failure_reason: Option<FailureReason>,
    pub hangup: Option<Hangup>,
    /// 1-based number of the current (or last) attempt.
    pub attempt_number: u32,
    /// Every transition in order, the first being the call's acceptance as `pending`.
    pub history: Vec<TransitionRecord>,
}

/// The current time, truncated to the microsecond precision the stores keep.
pub fn now() -> OffsetDateTime {
    truncate_to_micros(OffsetDateTime::now_utc())
}

pub(crate) fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000).expect("a truncated nanosecond is in range")
}

/// Where a transition wants to move a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The originate of the current attempt is about to be sent (the call leaves the queue).
    /// The call stays `pending`; [`Call::sent_at`] records it.
    Sent,
    /// Asterisk accepted the originate.
    Dialing,
    Ringing,
    Answered,
    /// The call's channel is gone. It is `completed` if it had been answered; otherwise it
    /// failed for `reason_if_unanswered`, or goes back to `pending` when that reason is
    /// retryable and attempts are left.
    Ended {
        reason_if_unanswered: FailureReason,
    },
}

/// A request to move a call forward, as the call manager derives it from ARI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub step: Step,
    pub at: OffsetDateTime,
    /// What caused it, for the history (e.g. `ChannelStateChange Ringing`).
    pub cause: String,
    /// The ARI channel name, when the event carried one.
    pub channel: Option<String>,
    pub hangup: Option<Hangup>,
    /// The attempt this transition is about; a transition for another attempt than the
    /// current one is stale and ignored. `None` applies to whatever attempt is current.
    pub attempt: Option<u32>,
}

impl Transition {
    pub fn new(step: Step, cause: impl Into<String>) -> Self {
        Transition { step, at: now(), cause: cause.into(), channel: None, hangup: None, attempt: None }
    }

    pub fn at(mut self, at: OffsetDateTime) -> Self {
        self.at = truncate_to_micros(at);
        self
    }

    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    pub fn hangup(mut self, hangup: Hangup) -> Self {
        self.hangup = Some(hangup);
        self
    }

    pub fn for_attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }
}

/// Why a transition left a call as it was. Not an error: late and duplicate events are normal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("the call already ended as {0}")]
    Terminal(CallStatus),
    #[error("the call is {current}; {requested} would not move it forward")]
    NotForward { current: CallStatus, requested: CallStatus },
    #[error("the transition is for attempt {requested} but the call is on attempt {current}")]
    StaleAttempt { current: u32, requested: u32 },
    #[error("the originate of this attempt was already sent")]
    AlreadySent,
}

impl Call {
    /// A call accepted as `pending`, its history starting with that acceptance.
    pub fn new(call_id: CallId, mut spec: CallSpec, created_at: OffsetDateTime) -> Self {
        let created_at = truncate_to_micros(created_at);
        spec.max_attempts = spec.max_attempts.max(1);
        Call {
            call_id,
            spec,
            status: CallStatus::Pending,
            channel: None,
            created_at,
            sent_at: None,
            dialed_at: None,
            ringing_at: None,
            answered_at: None,
            ended_at: None,
            failure_reason: None,
            hangup: None,
            attempt_number: 1,
            history: vec![TransitionRecord {
                status: CallStatus::Pending,
                at: created_at,
                attempt: 1,
                failure_reason: None,
                cause: "accepted".to_owned(),
            }],
        }
    }

    pub fn is_active(&self) -> bool {
        self.status.is_active()
    }

    /// How many changes the call has been through: the length of its history, to which every
    /// change [`apply`](Self::apply) makes appends (and an ignored transition changes nothing).
    /// Two states of one call with the same version are the same state.
    pub fn version(&self) -> usize {
        self.history.len()
    }

    /// True once the call is over, answered or not (`completed` or `failed`).
    pub fn is_completed(&self) -> bool {
        self.status.is_terminal()
    }

    /// Seconds between answer and end; `None` when never answered (or not ended yet).
    pub fn duration(&self) -> Option<f64> {
        let talk = self.ended_at? - self.answered_at?;
        Some(talk.as_seconds_f64())
    }

    /// Waiting in the queue: pending with the current attempt's originate never sent.
    pub fn is_queued(&self) -> bool {
        self.status == CallStatus::Pending && self.sent_at.is_none()
    }

    /// The ARI channel id of the current attempt.
    pub fn channel_id(&self) -> String {
        self.call_id.channel_id(self.attempt_number)
    }

    /// Moves the call forward, or leaves it untouched and says why not.
    ///
    /// The rules: statuses only move forward (pending → dialing → ringing → answered → ended,
    /// skipping allowed, since events can outrun the originate response); a terminal call
    /// never changes; the one step back is a failed attempt with retries left, which returns
    /// to `pending` for the next attempt with the failure kept in the history.
    pub fn apply(&mut self, t: &Transition) -> Result<(), Ignored> {
        if let Some(requested) = t.attempt {
            if requested != self.attempt_number {
                return Err(Ignored::StaleAttempt { current: self.attempt_number, requested });
            }
        }
        if self.status.is_terminal() {
            return Err(Ignored::Terminal(self.status));
        }
        let at = truncate_to_micros(t.at);
        let requested = match t.step {
            Step::Sent => {
                if self.status != CallStatus::Pending || self.sent_at.is_some() {
                    return Err(Ignored::AlreadySent);
                }
                self.sent_at = Some(at);
                self.record(CallStatus::Pending, at, None, &t.cause);
                return Ok(());
            }
            Step::Dialing => CallStatus::Dialing,
            Step::Ringing => CallStatus::Ringing,
            Step::Answered => CallStatus::Answered,
            Step::Ended { reason_if_unanswered } => {
                self.end(t, at, reason_if_unanswered);
                return Ok(());
            }
        };
        if requested.rank() <= self.status.rank() {
            return Err(Ignored::NotForward { current: self.status, requested });
        }
        self.note_channel(t);
        // Reaching any of these means Asterisk took the originate, even if its response is
        // still on the way.
        self.sent_at.get_or_insert(at);
        self.dialed_at.get_or_insert(at);
        match requested {
            CallStatus::Ringing => self.ringing_at = Some(at),
            CallStatus::Answered => self.answered_at = Some(at),
            _ => {}
        }
        self.record(requested, at, None, &t.cause);
        Ok(())
    }

    fn end(&mut self, t: &Transition, at: OffsetDateTime, reason: FailureReason) {
        self.note_channel(t);
        if self.status == CallStatus::Answered {
            self.ended_at = Some(at);
            self.record(CallStatus::Completed, at, None, &t.cause);
            return;
        }
        if reason.is_retryable() && self.attempt_number < self.spec.max_attempts {
            self.history.push(TransitionRecord {
                status: CallStatus::Failed,
                at,
                attempt: self.attempt_number,
                failure_reason: Some(reason),
                cause: t.cause.clone(),
            });
            self.attempt_number += 1;
            self.channel = None;
            self.sent_at = None;
            self.dialed_at = None;
            self.ringing_at = None;
            self.hangup = None;
            let cause = format!("retry after {reason} (attempt {} of {})", self.attempt_number, self.spec.max_attempts);
            self.record(CallStatus::Pending, at, None, &cause);
            return;
        }
        self.ended_at = Some(at);
        self.failure_reason = Some(reason);
        self.record(CallStatus::Failed, at, Some(reason), &t.cause);
    }

    fn note_channel(&mut self, t: &Transition) {
        if let Some(channel) = &t.channel {
            self.channel = Some(channel.clone());
        }
        if let Some(hangup) = &t.hangup {
            self.hangup = Some(hangup.clone());
        }
    }

    fn record(&mut self, status: CallStatus, at: OffsetDateTime, failure_reason: Option<FailureReason>, cause: &str) {
        self.status = status;
        self.history.push(TransitionRecord {
            status,
            at,
            attempt: self.attempt_number,
            failure_reason,
            cause: cause.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(max_attempts: u32) -> CallSpec {
        CallSpec {
            phone_number: PhoneNumber::parse("+15550000001").unwrap(),
            context: "ivr-menu".into(),
            extension: "s".into(),
            priority: 1,
            caller_id: Some("IVR <+15559990000>".into()),
            timeout_secs: 30,
            audio: None,
            variables: BTreeMap::new(),
            max_attempts,
            idempotency_key: None,
            status_callback: None,
            status_callback_events: Vec::new(),
        }
    }

    fn call_in(status: CallStatus) -> Call {
        let mut call = Call::new(CallId::new(), request(1), now());
        let path: &[Step] = match status {
            CallStatus::Pending => &[],
            CallStatus::Dialing => &[Step::Dialing],
            CallStatus::Ringing => &[Step::Dialing, Step::Ringing],
            CallStatus::Answered => &[Step::Dialing, Step::Ringing, Step::Answered],
            CallStatus::Completed => {
                &[Step::Dialing, Step::Answered, Step::Ended { reason_if_unanswered: FailureReason::Lost }]
            }
            CallStatus::Failed => &[Step::Dialing, Step::Ended { reason_if_unanswered: FailureReason::Busy }],
        };
        for step in path {
            call.apply(&Transition::new(*step, "setup")).unwrap();
        }
        assert_eq!(call.status, status);
        call
    }

    /// Every (status, step) pair: the status it leads to, or `None` when it is ignored.
    #[test]
    fn transition_table() {
        use CallStatus::*;
        let end = Step::Ended { reason_if_unanswered: FailureReason::Rejected };
        let steps = [Step::Dialing, Step::Ringing, Step::Answered, end];
        let table: [(CallStatus, [Option<CallStatus>; 4]); 6] = [
            (Pending, [Some(Dialing), Some(Ringing), Some(Answered), Some(Failed)]),
            (Dialing, [None, Some(Ringing), Some(Answered), Some(Failed)]),
            (Ringing, [None, None, Some(Answered), Some(Failed)]),
            (Answered, [None, None, None, Some(Completed)]),
            (Completed, [None, None, None, None]),
            (Failed, [None, None, None, None]),
        ];
        for (from, expected) in table {
            for (step, want) in steps.iter().zip(expected) {
                let mut call = call_in(from);
                let before = call.clone();
                let result = call.apply(&Transition::new(*step, "test"));
                match want {
                    Some(to) => {
                        assert_eq!(result, Ok(()), "{from} + {step:?}");
                        assert_eq!(call.status, to, "{from} + {step:?}");
                        assert_eq!(call.history.len(), before.history.len() + 1);
                        assert!(call.version() > before.version(), "a change is a new version");
                        assert_eq!(call.history.last().unwrap().status, to);
                    }
                    None => {
                        let why = result.expect_err(&format!("{from} + {step:?} should be ignored"));
                        if from.is_terminal() {
                            assert_eq!(why, Ignored::Terminal(from));
                        } else {
                            assert!(matches!(why, Ignored::NotForward { current, .. } if current == from));
                        }
                        assert_eq!(call, before, "an ignored transition changes nothing");
                    }
                }
            }
        }
    }

    #[test]
    fn timestamps_follow_the_path() {
        let mut call = call_in(CallStatus::Pending);
        let t0 = now();
        call.apply(&Transition::new(Step::Answered, "StasisStart").at(t0).channel("Local/x;1")).unwrap();
        assert_eq!(call.dialed_at, Some(t0), "answering implies the originate was taken");
        assert_eq!(call.ringing_at, None, "a call answered at once never rang");
        assert_eq!(call.answered_at, Some(t0));
        assert_eq!(call.channel.as_deref(), Some("Local/x;1"));
        let t1 = t0 + time::Duration::milliseconds(5500);
        let hangup = Hangup { code: 16, text: "Normal Clearing".into() };
        call.apply(
            &Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Lost }, "ChannelDestroyed")
                .at(t1)
                .hangup(hangup.clone()),
        )
        .unwrap();
        assert_eq!(call.status, CallStatus::Completed);
        assert_eq!(call.failure_reason, None, "an answered call ends completed whatever the reason");
        assert_eq!(call.ended_at, Some(t1));
        assert_eq!(call.hangup, Some(hangup));
        assert_eq!(call.duration(), Some(5.5));
        assert!(call.is_completed() && !call.is_active());
    }

    #[test]
    fn unanswered_end_fails_with_its_reason() {
        let mut call = call_in(CallStatus::Ringing);
        call.apply(&Transition::new(
            Step::Ended { reason_if_unanswered: FailureReason::NoAnswer },
            "ChannelDestroyed 19",
        ))
        .unwrap();
        assert_eq!(call.status, CallStatus::Failed);
        assert_eq!(call.failure_reason, Some(FailureReason::NoAnswer));
        assert_eq!(call.duration(), None);
        assert_eq!(call.history.last().unwrap().failure_reason, Some(FailureReason::NoAnswer));
    }

    #[test]
    fn retry_returns_to_pending_until_attempts_run_out() {
        let mut call = Call::new(CallId::new(), request(2), now());
        let busy = Step::Ended { reason_if_unanswered: FailureReason::Busy };
        call.apply(&Transition::new(Step::Dialing, "originate").channel("PJSIP/a")).unwrap();
        call.apply(&Transition::new(busy, "Dial BUSY").for_attempt(1)).unwrap();
        assert_eq!(call.status, CallStatus::Pending);
        assert_eq!(call.attempt_number, 2);
        assert_eq!(call.channel, None);
        assert_eq!(call.dialed_at, None);
        assert_eq!(call.failure_reason, None);
        assert!(call.is_active());
        let statuses: Vec<_> = call.history.iter().map(|r| (r.status, r.attempt)).collect();
        assert_eq!(
            statuses,
            [(CallStatus::Pending, 1), (CallStatus::Dialing, 1), (CallStatus::Failed, 1), (CallStatus::Pending, 2)]
        );
        assert_eq!(call.history[2].failure_reason, Some(FailureReason::Busy));

        // A late event of the first attempt is stale now.
        let late = call.apply(&Transition::new(Step::Ringing, "late").for_attempt(1));
        assert_eq!(late, Err(Ignored::StaleAttempt { current: 2, requested: 1 }));

        call.apply(&Transition::new(Step::Dialing, "originate").for_attempt(2)).unwrap();
        call.apply(&Transition::new(busy, "Dial BUSY").for_attempt(2)).unwrap();
        assert_eq!(call.status, CallStatus::Failed, "the last attempt's failure is final");
        assert_eq!(call.failure_reason, Some(FailureReason::Busy));
        assert_eq!(call.attempt_number, 2);
    }

    #[test]
    fn non_retryable_failures_end_at_once_even_with_attempts_left() {
        let mut call = Call::new(CallId::new(), request(3), now());
        call.apply(&Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Rejected }, "21")).unwrap();
        assert_eq!(call.status, CallStatus::Failed);
        assert_eq!(call.attempt_number, 1);
    }

    #[test]
    fn phone_numbers() {
        for ok in ["+15550000001", "123", "+123", "123456789012345", "+123456789012345"] {
            assert_eq!(PhoneNumber::parse(ok).unwrap().as_str(), ok);
        }
        let cases = [
            ("", PhoneNumberError::Empty),
            ("+", PhoneNumberError::TooShort { digits: 0 }),
            ("12", PhoneNumberError::TooShort { digits: 2 }),
            ("1234567890123456", PhoneNumberError::TooLong { digits: 16 }),
            ("555&1", PhoneNumberError::InvalidCharacter { found: '&', position: 3 }),
            ("+1555/2", PhoneNumberError::InvalidCharacter { found: '/', position: 5 }),
            ("1555@trunk", PhoneNumberError::InvalidCharacter { found: '@', position: 4 }),
            ("155,5", PhoneNumberError::InvalidCharacter { found: ',', position: 3 }),
            ("1555;2", PhoneNumberError::InvalidCharacter { found: ';', position: 4 }),
            ("155 5", PhoneNumberError::InvalidCharacter { found: ' ', position: 3 }),
            ("15a55", PhoneNumberError::InvalidCharacter { found: 'a', position: 2 }),
            ("155\n5", PhoneNumberError::InvalidCharacter { found: '\n', position: 3 }),
            ("++155", PhoneNumberError::InvalidCharacter { found: '+', position: 1 }),
            ("1+55", PhoneNumberError::InvalidCharacter { found: '+', position: 1 }),
            ("１２３", PhoneNumberError::InvalidCharacter { found: '１', position: 0 }),
        ];
        for (input, want) in cases {
            assert_eq!(PhoneNumber::parse(input), Err(want), "{input:?}");
        }
        let err: Result<PhoneNumber, _> = serde_json::from_str("\"555&1\"");
        assert!(err.unwrap_err().to_string().contains("'&'"));
    }

    #[test]
    fn channel_ids_map_back_to_their_call_and_attempt() {
        let id = CallId::new();
        assert_eq!(id.channel_id(1), id.to_string());
        assert_eq!(CallId::parse_channel_id(&id.channel_id(1)), Some((id, 1)));
        assert_eq!(CallId::parse_channel_id(&format!("{};2", id.channel_id(1))), Some((id, 1)));
        assert_eq!(CallId::parse_channel_id(&id.channel_id(3)), Some((id, 3)));
        assert_eq!(CallId::parse_channel_id(&format!("{};2", id.channel_id(3))), Some((id, 3)));
        assert_eq!(CallId::parse_channel_id("1700000000.12"), None);
        assert_eq!(CallId::parse_channel_id(&format!("{id}-1")), None);
    }

    #[test]
    fn names_round_trip() {
        for s in CallStatus::ALL {
            assert_eq!(s.as_str().parse::<CallStatus>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        for r in FailureReason::ALL {
            assert_eq!(r.as_str().parse::<FailureReason>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert!("done".parse::<CallStatus>().unwrap_err().to_string().contains("pending, dialing"));
    }
}
