//! Response bodies, and reading request bodies within a size cap.

use std::convert::Infallible;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Response, StatusCode};
use serde::Serialize;

use crate::problem::Problem;

/// Every response body: a whole buffer, or a stream (Server-Sent Events). Only the stream is
/// boxed, so a whole answer costs no allocation of its own.
pub type Body = Either<Full<Bytes>, UnsyncBoxBody<Bytes, Infallible>>;

/// The largest request body read, in bytes; a larger one is 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// A streamed body.
pub fn stream(body: impl hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static) -> Body {
    Either::Right(body.boxed_unsync())
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON answer with `status`.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    json_bytes(status, to_json(value))
}

/// A value as JSON bytes.
pub fn to_json(value: &impl Serialize) -> Bytes {
    // Our views always serialize; an error here would be a bug in a view, answered as such.
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()).into()
}

/// A JSON answer with `status` and a body serialized already.
pub fn json_bytes(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// How long a request body may take to arrive; a slower one is 408.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole body, refusing one over [`MAX_BODY_BYTES`] (413) without reading it all,
/// and one that takes longer than [`BODY_READ_TIMEOUT`] (408).
pub async fn read(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Problem> {
    let too_large =
        || Problem::new("payload-too-large", format!("the body is larger than the {MAX_BODY_BYTES} bytes accepted"));
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect()).await;
    let Ok(collected) = collected else {
        return Err(Problem::new("request-timeout", format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"))
            .header(hyper::header::CONNECTION, HeaderValue::from_static("close")));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Problem::bad_request(format!("the body could not be read: {e}"))),
    }
}

/// The media type of the request body (`application/json; charset=utf-8` → `application/json`).
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// 415 unless the body's media type is `expected`.
pub fn require_media_type(headers: &HeaderMap, expected: &str) -> Result<(), Problem> {
    match media_type(headers) {
        Some(found) if found == expected => Ok(()),
        Some(found) => {
            Err(Problem::new("unsupported-media-type", format!("the body must be {expected}, not {found:?}")))
        }
        None => Err(Problem::new("unsupported-media-type", format!("the body must be {expected}; set Content-Type"))),
    }
}
