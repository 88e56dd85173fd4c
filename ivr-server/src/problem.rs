//! RFC 9457 problem details: every error answer is `application/problem+json` with `type`,
//! `title`, `status` and a `detail` saying what was wrong.
//!
//! `type` is a relative URI into the API's docs page (`/docs#problem-<slug>`), where each kind
//! is described. [`Problem::from`] maps [`ivr_core::Error`] to its status: only a corrupt store
//! gives a 500.

use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{ToResponse, ToSchema};

use crate::body::{full, Body};

/// The problem kinds this API answers with: slug, title, HTTP status, when.
pub const KINDS: &[(&str, &str, u16, &str)] = &[
    ("bad-request", "Bad request", 400, "The request could not be read: malformed JSON, a wrong type, an unknown field, a bad query parameter or header."),
    ("invalid-phone-number", "Invalid phone number", 400, "A phone number must be an optional '+' and 3 to 15 digits."),
    ("invalid-call-request", "Invalid call request", 400, "A field of the call request is out of range or not allowed."),
    ("unauthorized", "Unauthorized", 401, "A bearer token is missing, malformed, expired, or not valid for this API; or the username or password is wrong."),
    ("destination-refused", "Destination refused", 403, "The number is outside this server's destination policy (ALLOWED_PREFIXES, DENIED_PREFIXES); nothing was sent to Asterisk."),
    ("not-found", "Not found", 404, "No such route, or no such call."),
    ("method-not-allowed", "Method not allowed", 405, "The route exists but not with this method; `Allow` lists the methods it has."),
    ("request-timeout", "Request timeout", 408, "The request body did not arrive in time; the connection is closed."),
    ("not-cancelable", "Call already ended", 409, "The call has ended: there is nothing to cancel."),
    ("conflict", "Conflict", 409, "The request collides with a stored call."),
    ("idempotency-key-reused", "Idempotency key reused", 422, "The Idempotency-Key was used before for a different request (another number or body); nothing was dialled. Use a new key for a new call."),
    ("payload-too-large", "Payload too large", 413, "The body is larger than the API accepts."),
    ("unsupported-media-type", "Unsupported media type", 415, "The body's Content-Type is not the one this route reads."),
    ("too-many-login-attempts", "Too many login attempts", 429, "Too many failed logins from this address or for this username; retry after `Retry-After` seconds."),
    ("internal", "Internal error", 500, "The server found stored data it cannot read. This is logged."),
    ("ari-failed", "Asterisk failed", 502, "Asterisk refused the request or could not be reached. A call it refused is stored as failed and can be read by its `call_id`."),
    ("too-many-active-calls", "Too many active calls", 503, "The limit of calls not yet ended is reached; retry after `Retry-After` seconds."),
    ("queue-full", "Queue full", 503, "The calls-per-second limit holds back more calls than the queue may hold; retry after `Retry-After` seconds."),
    ("store-unavailable", "Store unavailable", 503, "The database could not be reached or did not answer in time."),
    ("database-required", "Database required", 503, "This feature needs a database, and the server runs with DISABLE_DB=true."),
    ("too-many-connections", "Too many connections", 503, "MAX_CONNECTIONS connections are open; retry after `Retry-After` seconds."),
    ("not-ready", "Not ready", 503, "The store is not reachable or the ARI event connection is down."),
];

/// Kinds that an outage causes (the database, or Asterisk's event socket, away for a while):
/// they pass by themselves, so the answer says when to try again.
const OUTAGES: &[&str] = &["store-unavailable", "not-ready"];
/// `Retry-After` of an outage's answer, in seconds.
const OUTAGE_RETRY_AFTER: &str = "2";

// The OpenAPI document's schema of a problem: the standard members and the extension members
// some problems add (the `problem_members_are_documented` test keeps this list true).
/// The body of every error answer (RFC 9457).
#[derive(Serialize, ToSchema)]
#[schema(as = Problem, example = json!({
    "type": "/docs#problem-invalid-phone-number",
    "title": "Invalid phone number",
    "status": 400,
    "detail": "phone_number must be a phone number: an optional '+' and 3 to 15 digits",
}))]
pub struct ProblemSchema {
    /// `/docs#problem-<kind>`: the kind, described on the docs page.
    #[serde(rename = "type")]
    #[schema(format = "uri-reference")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What was wrong, for a person.
    pub detail: String,
    /// The call concerned (e.g. the call Asterisk refused, on a 502).
    #[schema(format = "uuid", nullable = false)]
    pub call_id: Option<String>,
    /// The OAuth2 error code, on the token route (RFC 6749 §5.2).
    #[schema(nullable = false)]
    pub error: Option<String>,
    /// `ok` or `unavailable`, on `/readyz`.
    #[schema(nullable = false)]
    pub store: Option<String>,
    /// `connected` or `disconnected`, on `/readyz`.
    #[schema(nullable = false)]
    pub ari: Option<String>,
}

/// The problem answer, a reusable response of the document.
impl<'r> ToResponse<'r> for Problem {
    fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
        let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
        let response = ResponseBuilder::new()
            .description("An RFC 9457 problem; its `type` links to the kind's description on /docs")
            .content("application/problem+json", content)
            .build();
        ("Problem", response.into())
    }
}

/// An error answer under construction.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Members beyond the standard ones (e.g. `call_id`).
    pub extra: Map<String, Value>,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem of a kind listed in [`KINDS`].
    pub fn new(slug: &'static str, detail: impl Into<String>) -> Self {
        let (slug, title, status, _) =
            KINDS.iter().find(|k| k.0 == slug).copied().unwrap_or(("internal", "Internal error", 500, ""));
        let problem = Problem {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            slug,
            title,
            detail: detail.into(),
            extra: Map::new(),
            headers: Vec::new(),
        };
        if OUTAGES.contains(&slug) {
            return problem.header(RETRY_AFTER, HeaderValue::from_static(OUTAGE_RETRY_AFTER));
        }
        problem
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new("bad-request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new("not-found", detail)
    }

    /// 401 with `WWW-Authenticate: Bearer` (and the RFC 6750 error code for a bad token).
    pub fn unauthorized(detail: impl Into<String>, invalid_token: bool) -> Self {
        let challenge = if invalid_token {
            HeaderValue::from_static("Bearer realm=\"ivr\", error=\"invalid_token\"")
        } else {
            HeaderValue::from_static("Bearer realm=\"ivr\"")
        };
        Self::new("unauthorized", detail).header(WWW_AUTHENTICATE, challenge)
    }

    pub fn method_not_allowed(allow: &[hyper::Method]) -> Self {
        let list: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
        let list = list.join(", ");
        let value = HeaderValue::from_str(&list).unwrap_or_else(|_| HeaderValue::from_static(""));
        Self::new("method-not-allowed", format!("this route answers only {list}")).header(ALLOW, value)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn header(mut self, name: hyper::header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = json!({
            "type": format!("/docs#problem-{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(map) = &mut body {
            map.extend(self.extra);
        }
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response
    }
}

impl From<ivr_core::Error> for Problem {
    fn from(error: ivr_core::Error) -> Self {
        use ivr_core::Error as E;
        match error {
            E::InvalidPhoneNumber(e) => Problem::new("invalid-phone-number", e.to_string()),
            E::InvalidRequest(detail) => Problem::new("invalid-call-request", detail),
            E::NotFound(call_id) => Problem::not_found(format!("no call with id {call_id}")),
            E::NotCancelable { call_id, status } => {
                Problem::new("not-cancelable", format!("call {call_id} already ended as {status}"))
                    .with("call_id", call_id.to_string())
            }
            E::AlreadyExists { on, existing } => {
                Problem::new("conflict", format!("a call with this {on} already exists"))
                    .with("call_id", existing.call_id.to_string())
            }
            E::TooManyActiveCalls { limit } => {
                Problem::new("too-many-active-calls", format!("{limit} calls are active, the most allowed"))
                    .header(RETRY_AFTER, HeaderValue::from_static("5"))
            }
            E::QueueFull { limit, retry_after } => {
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                Problem::new("queue-full", format!("{limit} calls already wait for the calls-per-second limit"))
                    .header(RETRY_AFTER, HeaderValue::from(seconds))
            }
            E::IdempotencyKeyReused { call_id, fields } => Problem::new(
                "idempotency-key-reused",
                format!(
                    "this Idempotency-Key was used for call {call_id} with a different request \
                     (it differs in {}); use a new key for a new call",
                    fields.join(", ")
                ),
            )
            .with("call_id", call_id.to_string()),
            E::OriginateFailed { call, source } => {
                Problem::new("ari-failed", format!("Asterisk refused the call: {source}; it is stored as failed"))
                    .with("call_id", call.call_id.to_string())
            }
            E::AsteriskUnreachable { call, source } => Problem::new(
                "ari-failed",
                format!("Asterisk could not be reached to place the call: {source}; it is stored as failed (lost)"),
            )
            .with("call_id", call.call_id.to_string()),
            E::Ari(source) => Problem::new("ari-failed", format!("Asterisk request failed: {source}")),
            E::StoreUnavailable(source) => {
                tracing::warn!(error = %source, "call store unavailable");
                Problem::new("store-unavailable", "the call store could not be reached; try again shortly")
            }
            E::StoreCorrupt(what) => {
                tracing::error!(error = %what, "call store holds data that cannot be read");
                Problem::new("internal", "the server could not read stored data; this has been logged")
            }
            other => {
                tracing::error!(error = %other, "unexpected ivr-core error");
                Problem::new("store-unavailable", "the request could not be completed; try again shortly")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_slug_and_a_valid_status() {
        let mut slugs: Vec<&str> = KINDS.iter().map(|k| k.0).collect();
        slugs.sort_unstable();
        slugs.dedup();
        assert_eq!(slugs.len(), KINDS.len());
        for (slug, _, status, _) in KINDS {
            assert_eq!(Problem::new(slug, "x").status.as_u16(), *status);
        }
    }

    #[test]
    fn problem_members_are_documented() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(ProblemSchema::schema()).unwrap();
        let documented = schema["properties"].as_object().unwrap();
        let problems = [
            Problem::from(ivr_core::Error::NotCancelable {
                call_id: ivr_core::CallId::new(),
                status: ivr_core::CallStatus::Completed,
            }),
            Problem::bad_request("x").with("error", "invalid_request"),
            Problem::new("not-ready", "x").with("store", "ok").with("ari", "connected"),
        ];
        for problem in problems {
            for key in problem.extra.keys() {
                assert!(documented.contains_key(key), "{key} is not in the Problem schema");
            }
        }
    }

    #[test]
    fn only_a_corrupt_store_is_a_500() {
        let p = Problem::from(ivr_core::Error::StoreCorrupt("bad row".into()));
        assert_eq!(p.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!p.detail.contains("bad row"));
        let p = Problem::from(ivr_core::Error::StoreUnavailable("down".into()));
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(p.into_response().headers()[RETRY_AFTER], "2", "an outage says when to come back");
        let users_down = Problem::new("store-unavailable", "the user store could not be reached").into_response();
        assert_eq!(users_down.headers()[RETRY_AFTER], "2");
        let p = Problem::from(ivr_core::Error::TooManyActiveCalls { limit: 3 });
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        let response = p.into_response();
        assert!(response.headers().contains_key(RETRY_AFTER));
    }

    #[test]
    fn a_full_queue_says_when_to_come_back_and_a_reused_key_what_differs() {
        let full = ivr_core::Error::QueueFull { limit: 50, retry_after: std::time::Duration::from_millis(4_100) };
        let response = Problem::from(full).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "5", "whole seconds, rounded up");
        let call_id = ivr_core::CallId::new();
        let reused = ivr_core::Error::IdempotencyKeyReused { call_id, fields: vec!["phone_number".into()] };
        let p = Problem::from(reused);
        assert_eq!((p.status, p.slug), (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused"));
        assert!(p.detail.contains("phone_number") && p.detail.contains(&call_id.to_string()), "{}", p.detail);
    }
}
