//! Server-Sent Events for one call: its current state, then each change as it happens; the
//! stream ends after the terminal state (or when the server shuts down).
//!
//! Each event is `event: status`, `id: <history length>`, `data: <the call as JSON>`. A
//! comment line goes out every 15 s of quiet so proxies keep the connection open.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use ivr_core::{Call, CallUpdates};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::body::Body;
use crate::view::CallView;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct State {
    updates: CallUpdates,
    closing: watch::Receiver<bool>,
}

// The OpenAPI document's schema of the stream's items; `event` below writes them.
/// One event of the stream, as an SSE client reads it.
#[derive(ToSchema)]
#[schema(as = CallEvent)]
pub struct EventSchema {
    /// Always `status`.
    #[schema(pattern = "^status$")]
    pub event: String,
    /// The number of statuses the call has been through (its history's length).
    #[schema(pattern = "^[0-9]+$")]
    pub id: String,
    /// The call, as JSON (the Call schema).
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// The `text/event-stream` answer for a call's updates.
pub fn response(updates: CallUpdates, closing: watch::Receiver<bool>) -> Response<Body> {
    let stream = futures_util::stream::unfold(State { updates, closing }, |mut state| async move {
        let bytes = tokio::select! {
            next = state.updates.next() => event(&next?),
            _ = tokio::time::sleep(KEEP_ALIVE) => Bytes::from_static(b": keep-alive\n\n"),
            // The server is shutting down (or gone): end the stream.
            _ = state.closing.wait_for(|closing| *closing) => return None,
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), state))
    });
    let mut response = Response::new(crate::body::stream(StreamBody::new(stream)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One SSE event for a call state.
pub fn event(call: &Call) -> Bytes {
    let data = serde_json::to_string(&CallView::from(call)).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("event: status\nid: {}\ndata: {data}\n\n", call.history.len()))
}
