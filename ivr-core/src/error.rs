//! The one error type at ivr-core's boundary.

use crate::ari::AriError;
use crate::call::{Call, CallId, CallStatus, PhoneNumberError};

/// A boxed error from a layer below (a database driver, an HTTP client).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in ivr-core. Callers match on the kind; new kinds may be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid phone number: {0}")]
    InvalidPhoneNumber(#[from] PhoneNumberError),

    #[error("call {0} not found")]
    NotFound(CallId),

    /// An insert collided with an existing call on its id or its idempotency key. The
    /// existing call comes along, so an idempotent retry can answer with it.
    #[error("a call with this {on} already exists ({})", existing.call_id)]
    AlreadyExists { on: Conflict, existing: Box<Call> },

    /// A call request that cannot be placed as asked (a bad field, a value out of range).
    #[error("invalid call request: {0}")]
    InvalidRequest(String),

    /// The concurrent-call cap is reached; try again when calls have ended.
    #[error("too many active calls: the limit is {limit}")]
    TooManyActiveCalls { limit: usize },

    /// The queue of calls waiting for the calls-per-second limit is full; try again after
    /// `retry_after`, about the time the queue takes to drain.
    #[error("the queue of calls waiting to be dialled is full: the limit is {limit}")]
    QueueFull { limit: usize, retry_after: std::time::Duration },

    /// An idempotency key already used for another request: the stored call was asked for with
    /// other values in `fields`. Nothing is dialled.
    #[error("the idempotency key was used for call {call_id} with a different request (differing: {})", fields.join(", "))]
    IdempotencyKeyReused { call_id: CallId, fields: Vec<String> },

    /// The call has ended; there is nothing to cancel.
    #[error("call {call_id} already ended as {status}")]
    NotCancelable { call_id: CallId, status: CallStatus },

    /// Asterisk refused the originate. The call is stored as failed (`originate_failed`) and
    /// can still be read.
    #[error("Asterisk refused the call: {source}")]
    OriginateFailed { call: Box<Call>, source: AriError },

    /// Asterisk could not be reached to place the call (no answer within the originate retry
    /// window). Whether it was placed is unknown, so the call is stored `failed` as `lost`.
    #[error("Asterisk could not be reached to place the call: {source}")]
    AsteriskUnreachable { call: Box<Call>, source: AriError },

    /// Asterisk refused or failed a request, or could not be reached.
    #[error(transparent)]
    Ari(#[from] AriError),

    /// The store could not be reached or failed to answer.
    #[error("call store unavailable: {0}")]
    StoreUnavailable(#[source] BoxError),

    /// The store returned data that does not decode into a call.
    #[error("call store holds invalid data: {0}")]
    StoreCorrupt(String),

    /// Another live process holds the lease this one needs (a second instance on SQLite, or
    /// two processes with one INSTANCE_ID); the text says which.
    #[error("cannot start this instance: {0}")]
    InstanceInUse(String),

    /// This process's lease lapsed (it could not renew it in time): the other instances have
    /// taken its calls over, and it stops rather than fight for them.
    #[error("this instance's lease lapsed; its calls are the other instances' now")]
    LeaseLost,
}

/// Which unique key an insert collided with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    CallId,
    IdempotencyKey,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conflict::CallId => "call id",
            Conflict::IdempotencyKey => "idempotency key",
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
