//! # ivr-core
//!
//! Place one outbound call through Asterisk's REST Interface (ARI) and know, reliably and at
//! once, what became of it.
//!
//! - [`call`]: the call model — [`CallId`], [`PhoneNumber`], [`CallStatus`], [`Call`] and the
//!   forward-only transition rules.
//! - [`ari`]: the ARI client — REST calls and the event WebSocket.
//! - [`manager`]: [`CallManager`], the engine that originates calls and follows them to
//!   their end.
//! - [`store`]: the [`CallStore`] contract with in-memory, SQLite and PostgreSQL
//!   implementations.
//!
//! - `fake` and `ingest` (feature `testing`): a fake Asterisk for tests, and the event
//!   path without a store for benchmarks.
//!
//! ivr-core knows nothing of HTTP routing, JWT or users: that is ivr-server's business.

pub mod ari;
pub mod call;
mod error;
#[cfg(feature = "testing")]
pub mod fake;
#[cfg(feature = "testing")]
pub mod ingest;
pub mod manager;
pub mod store;
pub mod webhook;

pub use call::{
    Call, CallId, CallSpec, CallStatus, FailureReason, Hangup, Ignored, PhoneNumber, PhoneNumberError, Step,
    Transition, TransitionRecord,
};
pub use error::{BoxError, Conflict, Error, Result};
pub use manager::{CallManager, CallRequest, CallUpdates, ManagerSettings, Originated};
pub use store::{Applied, CallPage, CallQuery, CallStore, Cursor, MemoryCallStore, SqlCallStore};
