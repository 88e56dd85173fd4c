//! ARI's REST side: HTTP/1.1 over a pool of at most `max_connections - 1` connections
//! (`pool.rs`), basic auth in a header, a timeout on every call, and errors that keep ARI's status and message and tell
//! "Asterisk said no" from "the connection failed".

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use url::{Position, Url};

use super::model::{Application, AsteriskInfo, Channel, OriginateRequest, OriginateTarget, Playback};
use super::pool::Pool;
use super::AriConfig;

/// A failed ARI call.
///
/// Two families matter to a caller deciding what happened: **Asterisk said no** (an HTTP
/// status: [`status`](AriError::status) is `Some`, and the request was not carried out) and
/// **the connection failed before an answer** ([`is_connection_failure`](AriError::is_connection_failure):
/// refused, reset, closed before the response, timed out, or no free connection). After a
/// connection failure the request may or may not have been carried out; see
/// [`AriClient::originate`] for how to retry an originate safely.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AriError {
    /// 401: the username or password was refused.
    #[error("ARI refused the credentials (401)")]
    Unauthorized,
    /// 404: the channel (or other resource) does not exist, e.g. it already hung up.
    #[error("ARI: not found (404): {message}")]
    NotFound { message: String },
    /// 409: e.g. "Channel with given unique ID already exists".
    #[error("ARI: conflict (409): {message}")]
    Conflict { message: String },
    /// Any other error status: 400 "Invalid endpoint specified", 500 "Allocation failed", …
    #[error("ARI answered {status}: {message}")]
    Status { status: u16, message: String },
    /// No answer within the request timeout. The request may have reached Asterisk and been
    /// carried out.
    #[error("ARI did not answer within {0:?}")]
    Timeout(Duration),
    /// No TCP connection could be made (refused, unreachable, connect timeout): the request
    /// never reached Asterisk.
    #[error("cannot connect to ARI: {0}")]
    Connect(String),
    /// The connection broke after it was made: reset, or closed before the response (what
    /// Asterisk does to a connection beyond its `sessionlimit`). The request may or may not
    /// have been carried out.
    #[error("the connection to ARI failed before an answer: {0}")]
    Transport(String),
    /// All `limit` REST connections stayed busy for the whole request timeout: the request
    /// was never sent.
    #[error("no free ARI connection within {waited:?} (all {limit} in use)")]
    NoFreeConnection { limit: usize, waited: Duration },
    /// A 2xx answer whose body was not what ARI sends.
    #[error("unexpected answer from ARI: {0}")]
    Decode(String),
    /// The configuration cannot work (e.g. a base URL that is not http(s)).
    #[error("invalid ARI configuration: {0}")]
    Config(String),
}

impl AriError {
    /// The HTTP status ARI answered with, if it answered: Asterisk said no.
    pub fn status(&self) -> Option<u16> {
        match self {
            AriError::Unauthorized => Some(401),
            AriError::NotFound { .. } => Some(404),
            AriError::Conflict { .. } => Some(409),
            AriError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the request failed for want of a working connection, before any answer from
    /// Asterisk: refused, reset, closed before the response, timed out, no free connection.
    /// Such a request is worth retrying; one Asterisk answered with a status is not.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            AriError::Timeout(_) | AriError::Connect(_) | AriError::Transport(_) | AriError::NoFreeConnection { .. }
        )
    }

    /// A short, fixed label for metrics (no ids, no numbers).
    pub fn kind(&self) -> &'static str {
        match self {
            AriError::Unauthorized => "unauthorized",
            AriError::NotFound { .. } => "not_found",
            AriError::Conflict { .. } => "conflict",
            AriError::Status { status, .. } if *status >= 500 => "server_error",
            AriError::Status { .. } => "bad_request",
            AriError::Timeout(_) => "timeout",
            AriError::Connect(_) => "connect",
            AriError::Transport(_) => "transport",
            AriError::NoFreeConnection { .. } => "no_free_connection",
            AriError::Decode(_) => "decode",
            AriError::Config(_) => "config",
        }
    }
}

/// A cheap-to-clone ARI REST client.
#[derive(Clone, Debug)]
pub struct AriClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `max_connections - 1` connections; the event WebSocket is the other one.
    pool: Pool,
    config: AriConfig,
    base: Url,
    /// `host:port`, for the `Host` header.
    host: String,
    /// `Basic …`, marked sensitive so it is never logged.
    authorization: HeaderValue,
}

impl AriClient {
    /// A client that keeps at most `config.max_connections - 1` connections to ARI open (the
    /// event WebSocket is the last one); a request waits for a free one within its
    /// `request_timeout`.
    pub fn new(config: AriConfig) -> Result<Self, AriError> {
        let base = config.base_url()?;
        if config.max_connections < 2 {
            return Err(AriError::Config(format!(
                "max_connections must be at least 2 (one is the event WebSocket), not {}",
                config.max_connections
            )));
        }
        let host = base.host_str().ok_or_else(|| AriError::Config("the ARI URL has no host".into()))?;
        let port = base.port_or_known_default().unwrap_or(80);
        let host = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let pool = Pool::new(host.clone(), config.max_connections - 1, config.connect_timeout);
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", config.username, config.password));
        let mut authorization = HeaderValue::from_str(&format!("Basic {credentials}"))
            .map_err(|_| AriError::Config("the ARI username or password cannot go in a header".into()))?;
        authorization.set_sensitive(true);
        Ok(AriClient { inner: Arc::new(Inner { pool, config, base, host, authorization }) })
    }

    pub fn config(&self) -> &AriConfig {
        &self.inner.config
    }

    /// `POST /channels`: dial `endpoint` as a channel with the caller's id.
    ///
    /// After a [connection failure](AriError::is_connection_failure) nobody knows whether the
    /// channel was placed. Retry with the **same** `channel_id`: Asterisk refuses a second
    /// channel with a unique id in use, so the retry either places the call once or answers
    /// 409 ([`AriError::Conflict`]), which means the first try placed it (its events are
    /// already on the way). Only a status answer to the first try means Asterisk said no.
    pub async fn originate(&self, request: &OriginateRequest) -> Result<Channel, AriError> {
        let mut query: Vec<(&str, String)> =
            vec![("endpoint", request.endpoint.clone()), ("channelId", request.channel_id.clone())];
        match &request.target {
            OriginateTarget::App { app, app_args } => {
                query.push(("app", app.clone()));
                if let Some(args) = app_args {
                    query.push(("appArgs", args.clone()));
                }
            }
            OriginateTarget::Dialplan { context, extension, priority } => {
                query.push(("context", context.clone()));
                query.push(("extension", extension.clone()));
                query.push(("priority", priority.to_string()));
            }
        }
        if let Some(caller_id) = &request.caller_id {
            query.push(("callerId", caller_id.clone()));
        }
        if let Some(timeout) = request.timeout_secs {
            query.push(("timeout", timeout.to_string()));
        }
        let body = (!request.variables.is_empty()).then(|| serde_json::json!({ "variables": request.variables }));
        self.call(Method::POST, &["channels"], &query, body).await
    }

    /// `GET /channels/{id}`. A channel that is gone is [`AriError::NotFound`].
    pub async fn get_channel(&self, channel_id: &str) -> Result<Channel, AriError> {
        self.call(Method::GET, &["channels", channel_id], &[], None).await
    }

    /// `GET /channels`.
    pub async fn list_channels(&self) -> Result<Vec<Channel>, AriError> {
        self.call(Method::GET, &["channels"], &[], None).await
    }

    /// `DELETE /channels/{id}`: hang up (ARI's default reason, `normal`).
    pub async fn hangup(&self, channel_id: &str) -> Result<(), AriError> {
        self.call_no_content(Method::DELETE, &["channels", channel_id], &[]).await
    }

    /// `POST /channels/{id}/continue`: leave the application for the dialplan.
    pub async fn continue_in_dialplan(
        &self,
        channel_id: &str,
        context: &str,
        extension: &str,
        priority: u32,
    ) -> Result<(), AriError> {
        let query =
            [("context", context.to_owned()), ("extension", extension.to_owned()), ("priority", priority.to_string())];
        self.call_no_content(Method::POST, &["channels", channel_id, "continue"], &query).await
    }

    /// `POST /channels/{id}/play`. ARI answers 201 `queued` even for a sound that does not
    /// exist: only PlaybackStarted / PlaybackFinished tell the outcome.
    pub async fn play(&self, channel_id: &str, media: &str, playback_id: Option<&str>) -> Result<Playback, AriError> {
        let mut query = vec![("media", media.to_owned())];
        if let Some(id) = playback_id {
            query.push(("playbackId", id.to_owned()));
        }
        self.call(Method::POST, &["channels", channel_id, "play"], &query, None).await
    }

    /// `GET /asterisk/info?only=status`: its `startup_time` tells a restart.
    pub async fn asterisk_info(&self) -> Result<AsteriskInfo, AriError> {
        self.call(Method::GET, &["asterisk", "info"], &[("only", "status".to_owned())], None).await
    }

    /// `GET /applications/{name}`.
    pub async fn get_application(&self, name: &str) -> Result<Application, AriError> {
        self.call(Method::GET, &["applications", name], &[], None).await
    }

    /// `POST /applications/{app}/subscription?eventSource=channel:{id}`: `app` hears the
    /// channel's events from now on (answered_dialplan_subscribe); an instance taking over a
    /// call placed by another uses it. A channel that is gone is 422 ([`AriError::Status`]).
    pub async fn subscribe(&self, app: &str, channel_id: &str) -> Result<Application, AriError> {
        let query = [("eventSource", format!("channel:{channel_id}"))];
        self.call(Method::POST, &["applications", app, "subscription"], &query, None).await
    }

    /// `PUT /applications/{app}/eventFilter` with `{"allowed": [{"type": …}, …], "disallowed":
    /// []}`: from now on Asterisk sends `app` only events of those types (an empty `allowed`
    /// sends them all). The filter belongs to the application in Asterisk, not to a socket;
    /// one restart of Asterisk clears it. Asterisk before 13.26 / 16.3 has no such resource
    /// ([`AriError::NotFound`]).
    pub async fn filter_events(&self, app: &str, allowed: &[&str]) -> Result<Application, AriError> {
        let allowed: Vec<serde_json::Value> = allowed.iter().map(|t| serde_json::json!({ "type": t })).collect();
        let body = serde_json::json!({ "allowed": allowed, "disallowed": [] });
        self.call(Method::PUT, &["applications", app, "eventFilter"], &[], Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> Result<T, AriError> {
        let bytes = self.send(method, path, query, body).await?;
        serde_json::from_slice(bytes.as_ref()).map_err(|e| AriError::Decode(e.to_string()))
    }

    async fn call_no_content(&self, method: Method, path: &[&str], query: &[(&str, String)]) -> Result<(), AriError> {
        self.send(method, path, query, None).await.map(drop)
    }

    async fn send(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> Result<impl AsRef<[u8]>, AriError> {
        let inner = &self.inner;
        let mut url = inner.base.clone();
        url.path_segments_mut().map_err(|_| AriError::Config("base URL cannot hold a path".into()))?.extend(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        tracing::debug!(%method, path = url.path(), "ARI request");
        let request = Request::builder()
            .method(method)
            .uri(&url[Position::BeforePath..])
            .header(header::HOST, &inner.host)
            .header(header::AUTHORIZATION, inner.authorization.clone());
        let request = match body {
            Some(body) => {
                request.header(header::CONTENT_TYPE, "application/json").body(Full::new(Bytes::from(body.to_string())))
            }
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|e| AriError::Config(format!("cannot form the request: {e}")))?;
        // On a task of its own: a caller that gives up (e.g. its HTTP client went away) does not
        // cut the request off half-way. Asterisk would carry it out anyway, and would count
        // the abandoned connection as a session until then, while we opened another.
        let owner = inner.clone();
        let exchange = tokio::spawn(async move { owner.pool.send(request, owner.config.request_timeout).await });
        let (status, bytes) =
            exchange.await.map_err(|e| AriError::Transport(format!("the request's task failed: {e}")))??;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = error_message(&bytes);
        Err(match status {
            StatusCode::UNAUTHORIZED => AriError::Unauthorized,
            StatusCode::NOT_FOUND => AriError::NotFound { message },
            StatusCode::CONFLICT => AriError::Conflict { message },
            other => AriError::Status { status: other.as_u16(), message },
        })
    }
}

/// ARI errors come as `{"message": …}` or, for allocation failures, `{"error": …}`.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let from_json = parsed.as_ref().and_then(|v| v.get("message").or_else(|| v.get("error"))).and_then(|m| m.as_str());
    match from_json {
        Some(message) => message.to_owned(),
        None => String::from_utf8_lossy(body).trim().chars().take(200).collect(),
    }
}
