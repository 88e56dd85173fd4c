//! HTTP and WebSocket: connections, authentication, routing, and the event socket writer.
//!
//! Error answers copy Asterisk's: JSON `{"message": …}` with `Content-type: application/json`,
//! `Server: Asterisk/22.10.1` and `Cache-Control: no-cache, no-store` (the transcripts' headers).
//! Nothing here panics on client input; anything malformed gets the answer Asterisk gives.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::channels::{ApiError, OriginateRequest, Outgoing};
use super::events::{now_timestamp, ASTERISK_ID};
use super::Shared;

type Body = Full<Bytes>;

/// Largest request body accepted (originate variables are small).
const MAX_BODY: usize = 1 << 20;
/// How long a handler waits for its events to reach the event sockets before answering.
const BARRIER_WAIT: Duration = Duration::from_secs(1);

/// Accepts connections until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Session::open(&shared) {
                    Some(session) => {
                        tokio::spawn(connection(shared.clone(), stream, Arc::new(session)));
                    }
                    // Asterisk's `httpd_helper_thread`: past `sessionlimit` the accepted
                    // connection is closed before anything is read or answered.
                    None => drop(stream),
                },
                // Out of file descriptors and the like: keep serving the others.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// One HTTP session in Asterisk's count: an open connection, or the WebSocket it became.
/// The count goes down when the last holder (the connection, or its upgraded socket) is gone.
pub(crate) struct Session(Arc<Shared>);

impl Session {
    /// Counts a new connection in, or `None` past the session limit (counted as refused).
    fn open(shared: &Arc<Shared>) -> Option<Session> {
        let sessions = &shared.sessions;
        let open = sessions.open.fetch_add(1, Ordering::SeqCst) + 1;
        if open > shared.config.session_limit {
            sessions.open.fetch_sub(1, Ordering::SeqCst);
            sessions.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        sessions.peak.fetch_max(open, Ordering::SeqCst);
        Some(Session(shared.clone()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.0.sessions.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, session: Arc<Session>) {
    let mut up = shared.up.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    // While Asterisk restarts, a new connection waits until it is back.
    tokio::select! {
        r = up.wait_for(|up| *up) => if r.is_err() { return },
        _ = shutdown.changed() => return,
    }
    let mut epoch = shared.epoch.subscribe();
    epoch.borrow_and_update();
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let session = session.clone();
            async move { Ok::<_, Infallible>(handle(shared, req, session).await) }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::select! {
        _ = conn => {}
        // Asterisk went down (restart): the connection dies with it.
        _ = epoch.changed() => {}
        _ = shutdown.changed() => {}
    }
}

/// Query or form parameters, in order, percent-decoded.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Params {
        Params(
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k, true), percent_decode(v, true))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn owned(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_string)
    }

    /// Every value of `key`, commas splitting lists (`eventSource=a,b&eventSource=c`).
    fn list(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string))
            .collect()
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base(status: u16) -> hyper::http::response::Builder {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::SERVER, "Asterisk/22.10.1")
        .header(header::CACHE_CONTROL, "no-cache, no-store")
}

fn finish(builder: hyper::http::response::Builder, body: Body) -> Response<Body> {
    builder.body(body).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    finish(base(status).header(header::CONTENT_TYPE, "application/json"), Full::new(Bytes::from(body.to_string())))
}

fn no_content() -> Response<Body> {
    finish(base(204), Full::new(Bytes::new()))
}

fn error(e: ApiError) -> Response<Body> {
    json_response(e.status, &e.body)
}

fn unauthorized() -> Response<Body> {
    let resp = base(401)
        .header(header::WWW_AUTHENTICATE, "Basic realm=\"Asterisk REST Interface\"")
        .header(header::CONTENT_TYPE, "application/json");
    finish(resp, Full::new(Bytes::from(json!({"message": "Authentication required"}).to_string())))
}

fn not_found() -> Response<Body> {
    json_response(404, &json!({"message": "Resource not found"}))
}

fn invalid_method(allow: &str) -> Response<Body> {
    let resp = base(405).header(header::ALLOW, allow).header(header::CONTENT_TYPE, "application/json");
    finish(resp, Full::new(Bytes::from(json!({"message": "Invalid method"}).to_string())))
}

/// Asterisk's HTML error page (`ast_http_error`), used outside the JSON API.
fn html_error(status: u16, title: &str, text: &str) -> Response<Body> {
    let body = format!(
        "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\r\n<html><head>\r\n<title>{status} {title}</title>\r\n\
         </head><body>\r\n<h1>{title}</h1>\r\n<p>{text}</p>\r\n<hr />\r\n<address>Asterisk/22.10.1</address>\r\n\
         </body></html>\r\n"
    );
    finish(base(status).header(header::CONTENT_TYPE, "text/html"), Full::new(Bytes::from(body)))
}

/// Basic auth if the request has an `Authorization` header, else `api_key=user:password`.
fn authorized(shared: &Shared, req: &Request<Incoming>, params: &Params) -> bool {
    if shared.state().core.refuse_credentials {
        return false;
    }
    let expected = format!("{}:{}", shared.config.username, shared.config.password);
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        let Some(encoded) = auth.to_str().ok().and_then(|a| a.strip_prefix("Basic ")) else { return false };
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok();
        return decoded.is_some_and(|d| d == expected.as_bytes());
    }
    params.get("api_key") == Some(expected.as_str())
}

/// `ast_true`: the values Asterisk reads as true.
fn truthy(v: Option<&str>) -> bool {
    v.is_some_and(|v| ["yes", "true", "y", "t", "1", "on"].contains(&v.to_ascii_lowercase().as_str()))
}

async fn handle(shared: Arc<Shared>, mut req: Request<Incoming>, session: Arc<Session>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let params = Params::parse(req.uri().query().unwrap_or(""));
    let Some(rest) = path.strip_prefix("/ari").filter(|r| r.is_empty() || r.starts_with('/')) else {
        return html_error(404, "Not Found", "The requested URL was not found on this server.");
    };
    if !authorized(&shared, &req, &params) {
        return unauthorized();
    }
    let segs: Vec<String> = rest.split('/').filter(|s| !s.is_empty()).map(|s| percent_decode(s, false)).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method().clone();

    // Each route: (allowed methods, handler). OPTIONS answers the Allow list.
    let allow = match segs.as_slice() {
        ["events"] => "OPTIONS,GET",
        ["asterisk", "info"] | ["asterisk", "ping"] | ["applications"] | ["applications", _] => "OPTIONS,GET",
        ["channels"] => "OPTIONS,GET,POST",
        ["channels", _] => "OPTIONS,GET,POST,DELETE",
        ["channels", _, "continue"] | ["channels", _, "play"] => "OPTIONS,POST",
        ["channels", _, "variable"] => "OPTIONS,GET",
        ["applications", _, "subscription"] => "OPTIONS,POST,DELETE",
        ["applications", _, "eventFilter"] => "OPTIONS,PUT",
        _ => return not_found(),
    };
    if method == Method::OPTIONS {
        return finish(base(204).header(header::ALLOW, allow), Full::new(Bytes::new()));
    }
    if !allow.split(',').any(|m| m == method.as_str()) {
        return invalid_method(allow);
    }

    match (segs.as_slice(), &method) {
        (["events"], _) => events_socket(shared, &mut req, &params, session),
        (["asterisk", "info"], _) => json_response(200, &shared.state().asterisk_info(params.get("only"))),
        (["asterisk", "ping"], _) => {
            json_response(200, &json!({"ping": "pong", "timestamp": now_timestamp(), "asterisk_id": ASTERISK_ID}))
        }
        (["applications"], _) => json_response(200, &shared.state().applications()),
        (["applications", app], _) => match shared.state().application(app) {
            Ok(v) => json_response(200, &v),
            Err(e) => error(e),
        },
        (["applications", app, "subscription"], m) => {
            let subscribe = *m == Method::POST;
            let sources = params.list("eventSource");
            respond_after_events(&shared, |st| st.subscription(app, &sources, subscribe).map(Some)).await
        }
        (["applications", app, "eventFilter"], _) => {
            let app = app.to_string();
            event_filter(shared, req, &app).await
        }
        (["channels"], &Method::GET) => {
            shared.requests.channel_lists.fetch_add(1, Ordering::Relaxed);
            json_response(200, &shared.state().channels_json())
        }
        (["channels"], _) => originate(shared, req, params, None).await,
        (["channels", id], &Method::GET) => {
            shared.requests.channel_gets.fetch_add(1, Ordering::Relaxed);
            match shared.state().channel_json(id) {
                Ok(v) => json_response(200, &v),
                Err(e) => error(e),
            }
        }
        (["channels", id], &Method::POST) => {
            let id = id.to_string();
            originate(shared, req, params, Some(id)).await
        }
        (["channels", id], _) => {
            respond_after_events(&shared, |st| {
                st.hangup(id, params.get("reason"), params.get("reason_code")).map(|()| None)
            })
            .await
        }
        (["channels", id, "continue"], _) => {
            respond_after_events(&shared, |st| {
                st.continue_in_dialplan(id, params.get("context"), params.get("extension"), params.get("priority"))
                    .map(|()| None)
            })
            .await
        }
        (["channels", id, "play"], _) => {
            let result = {
                let mut st = shared.state();
                let r = st.play(id, params.get("media"), params.get("playbackId"));
                (r, st.take_touched())
            };
            shared.kick();
            wait_barriers(result.1).await;
            match result.0 {
                Ok(pb) => {
                    let location = format!("/playbacks/{}", pb["id"].as_str().unwrap_or_default());
                    let resp = base(201).header(header::CONTENT_TYPE, "application/json");
                    let resp = match HeaderValue::from_str(&location) {
                        Ok(v) => resp.header(header::LOCATION, v),
                        Err(_) => resp,
                    };
                    finish(resp, Full::new(Bytes::from(pb.to_string())))
                }
                Err(e) => error(e),
            }
        }
        (["channels", id, "variable"], _) => match shared.state().variable(id, params.get("variable")) {
            Ok(v) => json_response(200, &v),
            Err(e) => error(e),
        },
        _ => not_found(),
    }
}

/// Runs a state change, waits until its events are on the sockets (Asterisk publishes them
/// before it answers), then answers 200 with the value or 204 without one.
async fn respond_after_events(
    shared: &Shared,
    f: impl FnOnce(&mut super::channels::State) -> Result<Option<Value>, ApiError>,
) -> Response<Body> {
    let (result, waits) = {
        let mut st = shared.state();
        let r = f(&mut st);
        (r, st.take_touched())
    };
    shared.kick();
    wait_barriers(waits).await;
    match result {
        Ok(Some(v)) => json_response(200, &v),
        Ok(None) => no_content(),
        Err(e) => error(e),
    }
}

async fn wait_barriers(waits: Vec<tokio::sync::oneshot::Receiver<()>>) {
    for w in waits {
        // A socket that died meanwhile drops its barrier; that is fine.
        let _ = tokio::time::timeout(BARRIER_WAIT, w).await;
    }
}

/// `POST /channels[/{id}]`. Body fields (JSON) fill parameters the query string lacks, and
/// `variables` sets channel variables (`ast_ari_channels_originate_parse_body`).
async fn originate(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    params: Params,
    path_id: Option<String>,
) -> Response<Body> {
    let body = match json_body(req).await {
        Ok(body) => body,
        Err(e) => return error(e),
    };
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut variables = BTreeMap::new();
    if let Some(body) = body {
        let Value::Object(obj) = body else {
            return error(ApiError::msg(400, "Invalid JSON in request body"));
        };
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("variables", Value::Object(vars)) => {
                    for (name, value) in vars {
                        let Value::String(value) = value else {
                            return error(ApiError::msg(400, "Only string values in the 'variables' object allowed"));
                        };
                        variables.insert(name, value);
                    }
                }
                (_, Value::String(s)) => {
                    fields.insert(k, s);
                }
                (_, v @ (Value::Number(_) | Value::Bool(_))) => {
                    fields.insert(k, v.to_string());
                }
                _ => {}
            }
        }
    }
    let param = |key: &str| params.owned(key).or_else(|| fields.get(key).cloned());
    let request = OriginateRequest {
        endpoint: param("endpoint"),
        app: param("app"),
        app_args: param("appArgs"),
        caller_id: param("callerId"),
        timeout: param("timeout"),
        channel_id: path_id.or_else(|| param("channelId")),
        other_channel_id: param("otherChannelId"),
        context: param("context"),
        extension: param("extension"),
        priority: param("priority"),
        variables,
    };
    let (result, waits, delay) = {
        let mut st = shared.state();
        st.core.originate_count += 1;
        if let Some(id) = &request.channel_id {
            *st.core.originates_by_channel.entry(id.clone()).or_default() += 1;
        }
        let result = match st.core.fail_next.take() {
            Some((status, body)) => Err(ApiError { status, body }),
            None => st.originate(request),
        };
        let waits = st.take_touched();
        (result, waits, st.core.originate_delay)
    };
    shared.kick();
    wait_barriers(waits).await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match result {
        Ok(v) => json_response(200, &v),
        Err(e) => error(e),
    }
}

/// A request's JSON body: `None` when it is empty (or only whitespace), 400 when it is too
/// large, unreadable or not JSON.
async fn json_body(req: Request<Incoming>) -> Result<Option<Value>, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::msg(400, "Request body too large or unreadable"))?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(|_| ApiError::msg(400, "Invalid JSON in request body"))
}

/// `PUT /applications/{app}/eventFilter`: the JSON body is the filter; an empty body clears it.
async fn event_filter(shared: Arc<Shared>, req: Request<Incoming>, app: &str) -> Response<Body> {
    let filter = match json_body(req).await {
        Ok(filter) => filter,
        Err(e) => return error(e),
    };
    respond_after_events(&shared, |st| st.set_event_filter(app, filter.as_ref()).map(Some)).await
}

/// `GET /ari/events?app=…`: the WebSocket upgrade.
fn events_socket(
    shared: Arc<Shared>,
    req: &mut Request<Incoming>,
    params: &Params,
    session: Arc<Session>,
) -> Response<Body> {
    let apps: Vec<String> = params.list("app");
    if apps.is_empty() {
        return html_error(400, "Bad Request", "HTTP request is missing param: [app]");
    }
    let headers = req.headers();
    let is_upgrade =
        headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return html_error(426, "Upgrade Required", "The WebSocket upgrade is required for this resource.");
    };
    let accept = derive_accept_key(key.as_bytes());
    let wants_ari = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "ari"));

    let (tx, rx) = mpsc::unbounded_channel();
    // Registered now, so no event is lost between this answer and the upgrade.
    let sid = shared.state().register_socket(&apps, truthy(params.get("subscribeAll")), tx);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        // The socket stays one of Asterisk's HTTP sessions until it closes.
        let _session = session;
        match on_upgrade.await {
            Ok(upgraded) => socket(shared, sid, upgraded, rx).await,
            Err(_) => shared.state().unregister_socket(sid),
        }
    });
    let mut resp = base(101)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if wants_ari {
        resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, "ari");
    }
    finish(resp, Full::new(Bytes::new()))
}

/// Writes queued events to one event socket and answers the client's control frames. A write
/// that does not finish within `websocket_write_timeout` (the client stopped reading and the
/// TCP buffers are full) closes the socket, as Asterisk does.
async fn socket(
    shared: Arc<Shared>,
    sid: u64,
    upgraded: hyper::upgrade::Upgraded,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    // The client only sends pings and a close. tungstenite zero-fills the room for a read before
    // every poll of the read side, which this loop does once per event sent: its default of
    // 128 KiB was a tenth of the fake's CPU under load (perf).
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let write_timeout = shared.config.websocket_write_timeout;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outgoing::Text(text)) => match tokio::time::timeout(write_timeout, ws.send(Message::text(text))).await {
                    Ok(Ok(())) => {
                        shared.requests.events_written.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => break,
                    Err(_) => {
                        shared.requests.write_timeouts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                // `send` flushes each message, so everything before the barrier is written.
                Some(Outgoing::Barrier(ack)) => {
                    let _ = ack.send(());
                }
                Some(Outgoing::Close) => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    let _ = ws.close(Some(frame)).await;
                    break;
                }
                // Abort: drop the TCP connection without a close frame.
                Some(Outgoing::Abort) | None => break,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) => {
                    // Sends tungstenite's queued close reply.
                    let _ = ws.flush().await;
                    break;
                }
                Some(Ok(_)) => {
                    // Pongs to pings are queued by tungstenite; send them now.
                    let _ = ws.flush().await;
                }
                Some(Err(_)) | None => break,
            },
        }
    }
    shared.state().unregister_socket(sid);
}
