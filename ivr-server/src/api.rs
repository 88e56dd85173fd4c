//! The handlers. [`handle`] resolves the route, checks the token where one is needed, and
//! turns every failure into a problem answer: nothing reaches hyper as an error.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, PRAGMA};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use ivr_core::{CallId, CallQuery, CallRequest, CallStatus, Cursor, PhoneNumber};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::body::{self, full, Body};
use crate::problem::Problem;
use crate::router::{self, Miss, Route};
use crate::view::{CallView, CreatedView, ListView};
use crate::{metrics, openapi, sse, AppState};

/// The longest `Idempotency-Key` accepted: the manager's own limit.
const MAX_IDEMPOTENCY_KEY: usize = CallRequest::MAX_IDEMPOTENCY_KEY;

/// Answers one request. Returns the route template (`unmatched` when none) for logs and
/// metrics along with the response.
pub async fn handle(state: &AppState, request: Request<Incoming>) -> (&'static str, Response<Body>) {
    let route = match router::route(request.method(), request.uri().path()) {
        Ok(route) => route,
        Err(Miss::NotFound) => {
            return ("unmatched", Problem::not_found("no such route; see /docs for the API").into_response())
        }
        Err(Miss::MethodNotAllowed(allow)) => {
            // The template of the path, for the metrics, from any method it does allow.
            let template = router::route(&allow[0], request.uri().path()).map_or("unmatched", |r| r.template());
            return (template, Problem::method_not_allowed(&allow).into_response());
        }
    };
    let template = route.template();
    let response = match answer(state, route, request).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    };
    (template, response)
}

async fn answer(state: &AppState, route: Route, request: Request<Incoming>) -> Result<Response<Body>, Problem> {
    let (parts, body) = request.into_parts();
    if route.needs_auth() {
        authenticate(state, &parts).await?;
    }
    match route {
        Route::Healthz => Ok(body::json(StatusCode::OK, &json!({"status": "ok"}))),
        Route::Readyz => readyz(state).await,
        Route::Metrics if state.options().metrics_enabled => {
            Ok(text("text/plain; version=0.0.4; charset=utf-8", metrics::render(state.registry())))
        }
        Route::Docs if state.options().docs_enabled => Ok(text("text/html; charset=utf-8", openapi::docs_html())),
        Route::OpenApi if state.options().docs_enabled => Ok(text("application/json", openapi::SPEC)),
        Route::Metrics | Route::Docs | Route::OpenApi => Err(Problem::not_found("this route is turned off")),
        Route::Token => token(state, &parts, body::read(&parts.headers, body).await?).await,
        Route::Interaction { number } => {
            let bytes = body::read(&parts.headers, body).await?;
            create_call(state, &parts, &bytes, Some(number)).await
        }
        Route::CreateCall => {
            let bytes = body::read(&parts.headers, body).await?;
            create_call(state, &parts, &bytes, None).await
        }
        Route::ListCalls => list_calls(state, &parts).await,
        Route::GetCall { call_id } | Route::Status { call_id } => {
            let call_id = parse_call_id(&call_id)?;
            let call = state.manager().get(call_id).await?.ok_or(ivr_core::Error::NotFound(call_id))?;
            Ok(body::json(StatusCode::OK, &CallView::from(&call)))
        }
        Route::CancelCall { call_id } => {
            let call = state.manager().cancel(parse_call_id(&call_id)?).await?;
            Ok(body::json(StatusCode::ACCEPTED, &CallView::from(&call)))
        }
        Route::CallEvents { call_id } => {
            let updates = state.manager().watch(parse_call_id(&call_id)?).await?;
            Ok(sse::response(updates, state.closing()))
        }
    }
}

fn text(content_type: &'static str, body: impl Into<hyper::body::Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Checks the bearer token, and that its user still exists and is enabled.
async fn authenticate(state: &AppState, parts: &Parts) -> Result<String, Problem> {
    let sub = state.tokens().authenticate(&parts.headers)?;
    if let Some(users) = state.users() {
        match users.is_enabled(&sub).await {
            Ok(true) => {}
            Ok(false) => return Err(crate::auth::TokenError::UnknownUser.into()),
            Err(e) => {
                tracing::warn!(error = %e, "user store unavailable");
                return Err(Problem::new("store-unavailable", "the user store could not be reached"));
            }
        }
    }
    Ok(sub)
}

async fn readyz(state: &AppState) -> Result<Response<Body>, Problem> {
    let store = state.manager().store().ping().await;
    let ari = state.manager().is_connected();
    let detail = match (&store, ari) {
        (Ok(()), true) => {
            return Ok(body::json(StatusCode::OK, &json!({"status": "ready", "store": "ok", "ari": "connected"})))
        }
        (Err(_), true) => "the call store does not answer",
        (Ok(()), false) => "the ARI event WebSocket is not connected",
        (Err(_), false) => "the call store does not answer and the ARI event WebSocket is not connected",
    };
    Err(Problem::new("not-ready", detail)
        .with("store", if store.is_ok() { "ok" } else { "unavailable" })
        .with("ari", if ari { "connected" } else { "disconnected" }))
}

/// `POST /api/v1/token`: the OAuth2 password grant.
async fn token(state: &AppState, parts: &Parts, body: hyper::body::Bytes) -> Result<Response<Body>, Problem> {
    let Some(users) = state.users() else {
        return Err(Problem::new(
            "database-required",
            "issuing tokens needs a database of users, and this server runs with DISABLE_DB=true; \
             mint a token with `ivr-server token --sub NAME` instead",
        ));
    };
    body::require_media_type(&parts.headers, "application/x-www-form-urlencoded")?;
    let mut username = None;
    let mut password = None;
    for (key, value) in form_urlencoded::parse(&body) {
        match &*key {
            "username" => username = Some(value.into_owned()),
            "password" => password = Some(value.into_owned()),
            "grant_type" if value != "password" => {
                return Err(Problem::bad_request(format!(
                    "unsupported grant_type {value:?}: only \"password\" is supported"
                ))
                .with("error", "unsupported_grant_type"))
            }
            // OAuth2 clients may send these; they change nothing here.
            "grant_type" | "scope" | "client_id" | "client_secret" => {}
            other => return Err(Problem::bad_request(format!("unknown form field {other:?}"))),
        }
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(Problem::bad_request("the form needs both username and password").with("error", "invalid_request"));
    };
    // Counted before the password is looked at; see throttle.rs.
    let client = state.options().trusted_proxies.client_of(&parts.extensions, &parts.headers);
    let attempt = state.login_throttle().begin(&username, client)?;
    attempt.wait().await;
    let valid = match users.check_password(&username, &password).await {
        Ok(valid) => valid,
        Err(e) => {
            attempt.refund();
            tracing::warn!(error = %e, "user store unavailable");
            return Err(Problem::new("store-unavailable", "the user store could not be reached"));
        }
    };
    if !valid {
        tracing::info!("token refused: wrong username or password");
        return Err(Problem::unauthorized("incorrect username or password", false).with("error", "invalid_grant"));
    }
    attempt.succeeded();
    let token = state.tokens().issue(&username).map_err(|e| {
        tracing::error!(error = %e, "could not sign a token");
        Problem::new("internal", "the token could not be signed")
    })?;
    tracing::info!(user = %username, "token issued");
    let mut response = body::json(StatusCode::OK, &token);
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `POST /api/v1/calls` and the interaction route: the body is the engine's [`CallRequest`]
/// (every field optional but `phone_number` on `POST /api/v1/calls`; unknown fields refused),
/// the idempotency key a header.
async fn create_call(
    state: &AppState,
    parts: &Parts,
    bytes: &[u8],
    path_number: Option<String>,
) -> Result<Response<Body>, Problem> {
    let mut request: CallRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        if path_number.is_none() {
            return Err(Problem::bad_request("a JSON body with phone_number is required"));
        }
        CallRequest::default()
    } else {
        body::require_media_type(&parts.headers, "application/json")?;
        serde_json::from_slice(bytes).map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))?
    };
    match (path_number, &request.phone_number) {
        (Some(_), Some(_)) => {
            return Err(Problem::bad_request("phone_number is given in the path; leave it out of the body"))
        }
        (Some(n), None) => request.phone_number = Some(n),
        (None, Some(_)) => {}
        (None, None) => return Err(Problem::bad_request("phone_number is required")),
    }
    if let Some(number) = &request.phone_number {
        // The destination policy, before anything reaches the engine (and Asterisk).
        state.check_destination(&PhoneNumber::parse(number).map_err(ivr_core::Error::from)?)?;
    }
    request.idempotency_key = idempotency_key(parts)?;
    let placed = state.manager().originate(request).await?;
    let call = &placed.call;
    let mut response = body::json(StatusCode::CREATED, &CreatedView::from(call));
    let location = format!("/api/v1/calls/{}", call.call_id);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    if placed.replayed {
        // An earlier request with the same Idempotency-Key made this call.
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn idempotency_key(parts: &Parts) -> Result<Option<String>, Problem> {
    let Some(value) = parts.headers.get("idempotency-key") else { return Ok(None) };
    let bad =
        || Problem::bad_request(format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"));
    let key = value.to_str().map_err(|_| bad())?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

fn parse_call_id(text: &str) -> Result<CallId, Problem> {
    text.parse().map_err(|_| Problem::bad_request(format!("{text:?} is not a call id (a UUID)")))
}

/// `GET /api/v1/calls`: filters and a page position from the query string.
async fn list_calls(state: &AppState, parts: &Parts) -> Result<Response<Body>, Problem> {
    let query = parse_list_query(parts.uri.query().unwrap_or(""))?;
    let page = state.manager().list(&query).await?;
    Ok(body::json(StatusCode::OK, &ListView::from(&page)))
}

/// Reads `status` (repeated or comma-separated), `from`, `to` (RFC 3339), `phone_number`,
/// `limit` (1–1000) and `cursor`. A `+` that arrives as a space (form encoding) is read as `+`.
pub fn parse_list_query(query: &str) -> Result<CallQuery, Problem> {
    let mut q = CallQuery::default();
    let time = |name: &str, value: &str| {
        OffsetDateTime::parse(&value.replace(' ', "+"), &Rfc3339).map_err(|_| {
            Problem::bad_request(format!("{name} must be an RFC 3339 timestamp, e.g. 2025-01-31T12:00:00Z"))
        })
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "status" => {
                for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let status: CallStatus = name.parse().map_err(|e| Problem::bad_request(format!("{e}")))?;
                    if !q.statuses.contains(&status) {
                        q.statuses.push(status);
                    }
                }
            }
            "from" => q.created_from = Some(time("from", &value)?),
            "to" => q.created_to = Some(time("to", &value)?),
            "phone_number" => {
                let number = match value.strip_prefix(' ') {
                    Some(rest) => format!("+{rest}"),
                    None => value.into_owned(),
                };
                q.phone_number = Some(PhoneNumber::parse(&number).map_err(ivr_core::Error::from)?);
            }
            "limit" => {
                q.limit =
                    value.parse::<usize>().ok().filter(|n| (1..=CallQuery::MAX_PAGE_SIZE).contains(n)).ok_or_else(
                        || {
                            Problem::bad_request(format!(
                                "limit must be a whole number from 1 to {}",
                                CallQuery::MAX_PAGE_SIZE
                            ))
                        },
                    )?;
            }
            "cursor" => {
                q.after = Some(value.parse::<Cursor>().map_err(|e| Problem::bad_request(e.to_string()))?);
            }
            other => {
                return Err(Problem::bad_request(format!(
                    "unknown query parameter {other:?}; known: status, from, to, phone_number, limit, cursor"
                )))
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query() {
        let q = parse_list_query("status=failed,completed&status=failed&limit=5&phone_number=+15550000001&from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00+01:00").unwrap();
        assert_eq!(q.statuses, vec![CallStatus::Failed, CallStatus::Completed]);
        assert_eq!(q.limit, 5);
        assert_eq!(q.phone_number.unwrap().as_str(), "+15550000001");
        assert!(q.created_from.is_some() && q.created_to.is_some());
        for bad in ["status=lost", "limit=0", "limit=1001", "from=yesterday", "cursor=abc", "phone_number=12a", "x=1"] {
            let p = parse_list_query(bad).unwrap_err();
            assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
