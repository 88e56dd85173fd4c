//! The handlers, one per route of [`router::ROUTES`]. [`handle`] resolves the route, checks
//! the token where one is needed, and turns every failure into a problem answer: nothing
//! reaches hyper as an error.
//!
//! Each handler carries its OpenAPI operation (`#[utoipa::path]`): its parameters, body and
//! answers, with the request and response types it really reads and writes. [`openapi`]
//! gathers them into the document.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION, PRAGMA};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Request, Response, StatusCode};
use ivr_core::CallId;
use tokio::time::Instant;

use crate::body::{self, full, Body};
use crate::cache::{Checked, LastToken};
use crate::fields::{IdempotencyKey, PhoneText};
use crate::problem::Problem;
use crate::request::{CallBody, CallOptions, ListQuery, TokenForm};
use crate::router::{self, Miss, Route};
use crate::users::UserStore;
use crate::view::{CallView, CreatedView, DeliveriesView, HealthView, ListView, ReadyView};
use crate::{metrics, openapi, sse, AppState};

/// Answers one request. Returns the route template (`unmatched` when none) for logs and
/// metrics along with the response.
pub async fn handle(state: &AppState, peer: IpAddr, request: Request<Incoming>) -> (&'static str, Response<Body>) {
    let route = match router::route(request.method(), request.uri().path()) {
        // Owned: the handler takes the request.
        Ok(route) => route.into_owned(),
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
    let response = match answer(state, route, request, peer).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    };
    (template, response)
}

/// Answers, without waiting, what memory can answer: `/healthz`, and a call's GET
/// (`/api/v1/calls/{id}`, `/api/v1/status/{id}`) whose token is remembered as verified (and whose
/// user is fresh in the user cache), when the call's answer is kept
/// (`kept_answer`). Such an answer is exactly what [`handle`] would give; `None` for every
/// other request, which [`handle`] then answers (a failure, too, is left to it). The server
/// tries this first, so the status path carries no future (see `server::respond`).
pub fn answer_at_once(
    state: &AppState,
    last_token: &LastToken,
    now: Instant,
    request: &Request<Incoming>,
) -> Option<(&'static str, Response<Body>)> {
    let route = router::route(request.method(), request.uri().path()).ok()?;
    let response = match &route {
        Route::Healthz => healthz(),
        Route::GetCall { call_id } | Route::Status { call_id } => {
            let sub = known_caller(state, last_token, request.headers(), now)?;
            if state.users().is_some() && !user_is_fresh(state, &sub) {
                return None;
            }
            body::json_bytes(StatusCode::OK, kept_answer(state, parse_call_id(call_id).ok()?, now)?)
        }
        _ => return None,
    };
    Some((route.template(), response))
}

/// The subject of the request's token if it is known as verified, without verifying it: the
/// one this connection's last request was let in with, or one the token cache holds (which
/// the connection then remembers).
fn known_caller(state: &AppState, last_token: &LastToken, headers: &HeaderMap, now: Instant) -> Option<Arc<str>> {
    let header = headers.get(AUTHORIZATION)?.as_bytes();
    if let Some(sub) = last_token.get(header, now) {
        return Some(sub);
    }
    let token = crate::auth::bearer(headers).ok()?;
    let (sub, exp) = state.verified_tokens().get(token, crate::auth::unix_now())?;
    last_token.set(header, Arc::clone(&sub), exp, now);
    Some(sub)
}

async fn answer(
    state: &AppState,
    route: Route<'static>,
    request: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<Body>, Problem> {
    let (parts, body) = request.into_parts();
    if route.needs_auth() {
        authenticate(state, &parts).await?;
    }
    let docs = state.options().docs_enabled;
    match route {
        Route::Healthz => Ok(healthz()),
        Route::Readyz => readyz(state).await,
        Route::Metrics if state.options().metrics_enabled => Ok(metrics(state)),
        Route::Docs if docs => Ok(openapi::docs()),
        Route::DocsFile { file } if docs => openapi::docs_file(&file),
        Route::OpenApi if docs => Ok(openapi::openapi_json(state.openapi_json())),
        Route::Metrics | Route::Docs | Route::DocsFile { .. } | Route::OpenApi => {
            Err(Problem::not_found("this route is turned off"))
        }
        Route::Token => token(state, &parts, body::read(&parts.headers, body).await?, peer).await,
        Route::Interaction { number } => {
            interaction(state, &parts, body::read(&parts.headers, body).await?, &number).await
        }
        Route::CreateCall => create_call(state, &parts, body::read(&parts.headers, body).await?).await,
        Route::ListCalls => list_calls(state, &parts).await,
        Route::GetCall { call_id } => get_call(state, &call_id).await,
        Route::Status { call_id } => call_status(state, &call_id).await,
        Route::CancelCall { call_id } => cancel_call(state, &call_id).await,
        Route::CallEvents { call_id } => call_events(state, &call_id).await,
        Route::CallDeliveries { call_id } => call_deliveries(state, &call_id).await,
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "healthz",
    responses((status = 200, description = "Up", body = HealthView)))]
pub(crate) fn healthz() -> Response<Body> {
    body::json(StatusCode::OK, &HealthView { status: "ok" })
}

/// Prometheus metrics (only with METRICS_ENABLED=true).
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics",
    responses(
        (status = 200, description = "The Prometheus text format", body = String, content_type = "text/plain"),
        (status = 404, response = Problem),
    ))]
pub(crate) fn metrics(state: &AppState) -> Response<Body> {
    text("text/plain; version=0.0.4; charset=utf-8", metrics::render(state.registry()))
}

fn text(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Checks the bearer token, and that its user still exists and is enabled. A verified token
/// is remembered until its `exp`, and a user found enabled as the user cache says (cache.rs).
async fn authenticate(state: &AppState, parts: &Parts) -> Result<(), Problem> {
    let sub = caller(state, crate::auth::bearer(&parts.headers)?)?;
    let Some(users) = state.users() else { return Ok(()) };
    if user_is_fresh(state, &sub) {
        return Ok(());
    }
    // Boxed: asked only when the user is stale in the cache, and a query's future is large.
    match Box::pin(ask_users_table(state, users, &sub)).await {
        Some(true) => Ok(()),
        Some(false) => Err(crate::auth::TokenError::UnknownUser.into()),
        None => Err(Problem::new("store-unavailable", "the user store could not be reached")),
    }
}

/// Whether `sub` is fresh in the user cache, so that a request may be answered without asking
/// the users table; past half the bound one request asks again, in the background
/// ([`Checked`](crate::cache::Checked)). Only for a server with a users table.
fn user_is_fresh(state: &AppState, sub: &Arc<str>) -> bool {
    match state.enabled_users().check(sub) {
        Checked::Fresh => true,
        Checked::Stale => false,
        Checked::FreshAskAgain => {
            let (state, sub) = (state.clone(), Arc::clone(sub));
            tokio::spawn(async move {
                // Unanswered, the entry lapses at its bound, and the next request asks in the open.
                if let Some(users) = state.users() {
                    ask_users_table(&state, users, &sub).await;
                }
            });
            true
        }
    }
}

/// Asks the users table whether `sub` exists and is enabled, and keeps the answer in the user
/// cache: a yes counted from when the query started, a no by forgetting the user. `None`: the
/// table could not be reached (logged here).
async fn ask_users_table(state: &AppState, users: &UserStore, sub: &str) -> Option<bool> {
    let asked = state.enabled_users().asking();
    match users.is_enabled(sub).await {
        Ok(true) => {
            state.enabled_users().enabled_at(sub, asked);
            Some(true)
        }
        Ok(false) => {
            state.enabled_users().forget(sub);
            Some(false)
        }
        Err(e) => {
            tracing::warn!(error = %e, "user store unavailable");
            None
        }
    }
}

/// The subject of a valid token: remembered, or verified now and remembered until its `exp`.
fn caller(state: &AppState, token: &str) -> Result<Arc<str>, Problem> {
    let now = crate::auth::unix_now();
    if let Some((sub, _)) = state.verified_tokens().get(token, now) {
        return Ok(sub);
    }
    let (sub, exp) = state.tokens().verify_claims(token)?;
    state.verified_tokens().insert(token, &sub, exp, now);
    Ok(Arc::from(sub))
}

/// The store answers and the ARI event WebSocket is connected.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "readyz",
    responses(
        (status = 200, description = "Ready", body = ReadyView),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn readyz(state: &AppState) -> Result<Response<Body>, Problem> {
    let store = state.manager().store().ping().await;
    let ari = state.manager().is_connected();
    let detail = match (&store, ari) {
        (Ok(()), true) => {
            return Ok(body::json(StatusCode::OK, &ReadyView { status: "ready", store: "ok", ari: "connected" }))
        }
        (Err(_), true) => "the call store does not answer",
        (Ok(()), false) => "the ARI event WebSocket is not connected",
        (Err(_), false) => "the call store does not answer and the ARI event WebSocket is not connected",
    };
    Err(Problem::new("not-ready", detail)
        .with("store", if store.is_ok() { "ok" } else { "unavailable" })
        .with("ari", if ari { "connected" } else { "disconnected" }))
}

/// Get an access token (OAuth2 password grant).
///
/// Wrong username and wrong password get the same 401. With DISABLE_DB=true this answers
/// 503: mint tokens with `ivr-server token --sub NAME`.
#[utoipa::path(post, path = "/api/v1/token", tag = "auth", operation_id = "token",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A token", body = crate::auth::AccessToken,
            headers(("Cache-Control" = String, description = "no-store"))),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 408, response = Problem),
        (status = 413, response = Problem),
        (status = 415, response = Problem),
        (status = 429, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn token(
    state: &AppState,
    parts: &Parts,
    body: Bytes,
    peer: IpAddr,
) -> Result<Response<Body>, Problem> {
    let Some(users) = state.users() else {
        return Err(Problem::new(
            "database-required",
            "issuing tokens needs a database of users, and this server runs with DISABLE_DB=true; \
             mint a token with `ivr-server token --sub NAME` instead",
        ));
    };
    body::require_media_type(&parts.headers, "application/x-www-form-urlencoded")?;
    let TokenForm { username, password, .. } = TokenForm::parse(&body)?;
    // Counted before the password is looked at; see throttle.rs.
    let client = state.options().trusted_proxies.client(peer, &parts.headers);
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

/// What both routes that place a call may answer (the OpenAPI document's responses of each).
#[allow(dead_code)] // a description for the document, never built
#[derive(utoipa::IntoResponses)]
enum CreateAnswers {
    /// Accepted and dialing
    #[response(status = 201,
        headers(("Location" = String, description = "The call's URL"),
            ("Idempotent-Replayed" = String, description = "`true` when an earlier request with this Idempotency-Key made the call"),
            ("Server-Timing" = String, description = "`ari;dur=MS`: the milliseconds of this request spent waiting on Asterisk to take the originate, when it was dialled at once (W3C Server Timing)")))]
    Created(CreatedView),
    #[response(status = 400)]
    BadRequest(#[ref_response] Problem),
    #[response(status = 401)]
    Unauthorized(#[ref_response] Problem),
    #[response(status = 403)]
    Forbidden(#[ref_response] Problem),
    #[response(status = 408)]
    RequestTimeout(#[ref_response] Problem),
    #[response(status = 409)]
    Conflict(#[ref_response] Problem),
    #[response(status = 413)]
    PayloadTooLarge(#[ref_response] Problem),
    #[response(status = 415)]
    UnsupportedMediaType(#[ref_response] Problem),
    #[response(status = 422)]
    Unprocessable(#[ref_response] Problem),
    #[response(status = 500)]
    Internal(#[ref_response] Problem),
    #[response(status = 502)]
    BadGateway(#[ref_response] Problem),
    #[response(status = 503)]
    Unavailable(#[ref_response] Problem),
}

/// Place a call to the number in the path.
///
/// The body is optional: without one, every option takes its default.
#[utoipa::path(post, path = "/api/v1/interaction/{number}", tag = "calls", operation_id = "interaction",
    security(("bearer" = []), ("oauth2" = [])),
    params(
        ("number" = PhoneText, Path, description = "The number to call (encode `+` as `%2B`)"),
        ("Idempotency-Key" = Option<IdempotencyKey>, Header, nullable = false),
    ),
    request_body(content = Option<CallOptions>, content_type = "application/json"),
    responses(CreateAnswers))]
pub(crate) async fn interaction(
    state: &AppState,
    parts: &Parts,
    bytes: Bytes,
    number: &str,
) -> Result<Response<Body>, Problem> {
    let number = PhoneText::parse(number).map_err(|e| Problem::new("invalid-phone-number", e))?;
    let options = if bytes.iter().all(u8::is_ascii_whitespace) {
        CallBody::default()
    } else {
        body::require_media_type(&parts.headers, "application/json")?;
        CallBody::options_from_json(&bytes)?
    };
    if options.phone_number.is_some() {
        return Err(Problem::bad_request("phone_number is given in the path; leave it out of the body"));
    }
    originate(state, parts, options, &number).await
}

/// Place a call.
#[utoipa::path(post, path = "/api/v1/calls", tag = "calls", operation_id = "createCall",
    security(("bearer" = []), ("oauth2" = [])),
    params(("Idempotency-Key" = Option<IdempotencyKey>, Header, nullable = false)),
    request_body(content = CallBody, content_type = "application/json"),
    responses(CreateAnswers))]
pub(crate) async fn create_call(state: &AppState, parts: &Parts, bytes: Bytes) -> Result<Response<Body>, Problem> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::bad_request("a JSON body with phone_number is required"));
    }
    body::require_media_type(&parts.headers, "application/json")?;
    let mut call_body = CallBody::from_json(&bytes)?;
    let number = call_body.phone_number.take().ok_or_else(|| Problem::bad_request("phone_number is required"))?;
    originate(state, parts, call_body, &number).await
}

async fn originate(
    state: &AppState,
    parts: &Parts,
    options: CallBody,
    number: &PhoneText,
) -> Result<Response<Body>, Problem> {
    // The destination policy, before anything reaches the engine (and Asterisk).
    state.check_destination(&number.to_phone_number())?;
    let request = options.into_request(number, idempotency_key(parts)?);
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
    if let Some(ari) = placed.ari_time {
        // Asterisk's part of this request's time; the rest is ivr's (scripts/status-load.sh).
        let timing = format!("ari;dur={:.3}", ari.as_secs_f64() * 1000.0);
        if let Ok(value) = HeaderValue::from_str(&timing) {
            response.headers_mut().insert("server-timing", value);
        }
    }
    Ok(response)
}

fn idempotency_key(parts: &Parts) -> Result<Option<String>, Problem> {
    let Some(value) = parts.headers.get("idempotency-key") else { return Ok(None) };
    let text = value
        .to_str()
        .map_err(|_| Problem::bad_request(format!("Idempotency-Key must be {}", IdempotencyKey::RULE.must_be)))?;
    let key = IdempotencyKey::parse(text).map_err(Problem::bad_request)?;
    Ok(Some(key.into_string()))
}

fn parse_call_id(text: &str) -> Result<CallId, Problem> {
    text.parse().map_err(|_| Problem::bad_request(format!("{text:?} is not a call id (a UUID)")))
}

/// List calls, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/calls", tag = "calls", operation_id = "listCalls",
    security(("bearer" = []), ("oauth2" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of calls", body = ListView),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 500, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn list_calls(state: &AppState, parts: &Parts) -> Result<Response<Body>, Problem> {
    let query = ListQuery::parse(parts.uri.query().unwrap_or(""))?.to_call_query();
    let page = state.manager().list(&query).await?;
    Ok(body::json(StatusCode::OK, &ListView::from(&page)))
}

/// One call.
#[utoipa::path(get, path = "/api/v1/calls/{call_id}", tag = "calls", operation_id = "getCall",
    security(("bearer" = []), ("oauth2" = [])),
    params(("call_id" = String, Path, format = "uuid", description = "The call's id")),
    responses(
        (status = 200, description = "The call", body = CallView),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 404, response = Problem),
        (status = 500, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn get_call(state: &AppState, call_id: &str) -> Result<Response<Body>, Problem> {
    let call_id = parse_call_id(call_id)?;
    if let Some(answer) = kept_answer(state, call_id, Instant::now()) {
        return Ok(body::json_bytes(StatusCode::OK, answer));
    }
    let live = state.manager().live_version(call_id);
    let call = state.manager().get(call_id).await?.ok_or(ivr_core::Error::NotFound(call_id))?;
    let answer = body::to_json(&CallView::from(&call));
    if call.is_completed() {
        state.answers().insert_ended(call_id, answer.clone());
        state.live_answers().remove(call_id);
    } else if live.is_some() {
        state.live_answers().insert(call_id, call.version(), answer.clone());
    }
    Ok(body::json_bytes(StatusCode::OK, answer))
}

/// The call's answer as memory keeps it (cache.rs), if it does: an ended call's (it never
/// changes), or a live call's while the call is still at the version the answer shows.
fn kept_answer(state: &AppState, call_id: CallId, now: Instant) -> Option<Bytes> {
    if let Some(answer) = state.answers().get(call_id, now) {
        return Some(answer);
    }
    let version = state.manager().live_version(call_id)?;
    state.live_answers().get(call_id, version)
}

/// One call (the same as GET /api/v1/calls/{call_id}).
#[utoipa::path(get, path = "/api/v1/status/{call_id}", tag = "calls", operation_id = "callStatus",
    security(("bearer" = []), ("oauth2" = [])),
    params(("call_id" = String, Path, format = "uuid", description = "The call's id")),
    responses(
        (status = 200, description = "The call", body = CallView),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 404, response = Problem),
        (status = 500, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn call_status(state: &AppState, call_id: &str) -> Result<Response<Body>, Problem> {
    get_call(state, call_id).await
}

/// Cancel a call: hang it up, or stop it before it dials.
#[utoipa::path(delete, path = "/api/v1/calls/{call_id}", tag = "calls", operation_id = "cancelCall",
    security(("bearer" = []), ("oauth2" = [])),
    params(("call_id" = String, Path, format = "uuid", description = "The call's id")),
    responses(
        (status = 202, description = "Canceling: the call as it is now", body = CallView),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 404, response = Problem),
        (status = 409, response = Problem),
        (status = 500, response = Problem),
        (status = 502, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn cancel_call(state: &AppState, call_id: &str) -> Result<Response<Body>, Problem> {
    let call = state.manager().cancel(parse_call_id(call_id)?).await?;
    Ok(body::json(StatusCode::ACCEPTED, &CallView::from(&call)))
}

/// Follow a call: Server-Sent Events until it ends.
///
/// The first event is the call as it is; then one event per change; the stream ends after
/// the call's last state. Each event is `event: status`, `id: <history length>` and
/// `data: <the call as JSON, the Call schema>`; a `: keep-alive` comment comes every 15 s
/// of quiet.
#[utoipa::path(get, path = "/api/v1/calls/{call_id}/events", tag = "calls", operation_id = "callEvents",
    security(("bearer" = []), ("oauth2" = [])),
    params(("call_id" = String, Path, format = "uuid", description = "The call's id")),
    responses(
        (status = 200, description = "A stream of `status` events, each a Call", body = crate::sse::EventSchema,
            content_type = "text/event-stream"),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 404, response = Problem),
        (status = 500, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn call_events(state: &AppState, call_id: &str) -> Result<Response<Body>, Problem> {
    let updates = state.manager().watch(parse_call_id(call_id)?).await?;
    Ok(sse::response(updates, state.closing()))
}

/// The call's status callbacks (POSTs to its `status_callback`): for each, its state, its
/// attempts and the last one's result, oldest first.
#[utoipa::path(get, path = "/api/v1/calls/{call_id}/deliveries", tag = "calls", operation_id = "callDeliveries",
    security(("bearer" = []), ("oauth2" = [])),
    params(("call_id" = String, Path, format = "uuid", description = "The call's id")),
    responses(
        (status = 200, description = "The call's deliveries", body = DeliveriesView),
        (status = 400, response = Problem),
        (status = 401, response = Problem),
        (status = 404, response = Problem),
        (status = 500, response = Problem),
        (status = 503, response = Problem),
    ))]
pub(crate) async fn call_deliveries(state: &AppState, call_id: &str) -> Result<Response<Body>, Problem> {
    let call_id = parse_call_id(call_id)?;
    state.manager().get(call_id).await?.ok_or(ivr_core::Error::NotFound(call_id))?;
    let deliveries = state.manager().store().deliveries(call_id).await?;
    Ok(body::json(StatusCode::OK, &DeliveriesView::new(call_id, &deliveries)))
}
