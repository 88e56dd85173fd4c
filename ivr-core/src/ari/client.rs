//! ARI's REST side: one pooled HTTP client, basic auth in a header, a timeout on every call,
//! and errors that keep ARI's status and message.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::model::{Application, AsteriskInfo, Channel, OriginateRequest, OriginateTarget, Playback};
use super::AriConfig;

/// A failed ARI call.
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
    /// No answer within the configured time.
    #[error("ARI did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection could not be made or broke.
    #[error("cannot reach ARI: {0}")]
    Transport(String),
    /// A 2xx answer whose body was not what ARI sends.
    #[error("unexpected answer from ARI: {0}")]
    Decode(String),
    /// The configuration cannot work (e.g. a base URL that is not http(s)).
    #[error("invalid ARI configuration: {0}")]
    Config(String),
}

impl AriError {
    /// The HTTP status ARI answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AriError::Unauthorized => Some(401),
            AriError::NotFound { .. } => Some(404),
            AriError::Conflict { .. } => Some(409),
            AriError::Status { status, .. } => Some(*status),
            _ => None,
        }
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
            AriError::Transport(_) => "transport",
            AriError::Decode(_) => "decode",
            AriError::Config(_) => "config",
        }
    }

    fn from_reqwest(e: reqwest::Error, timeout: Duration) -> Self {
        if e.is_timeout() {
            AriError::Timeout(timeout)
        } else {
            // reqwest's message names the URL; ours never carries credentials, so it is safe
            // to show. The source chain says why (refused, reset, …).
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            AriError::Transport(text)
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
    http: reqwest::Client,
    config: AriConfig,
    base: reqwest::Url,
}

impl AriClient {
    pub fn new(config: AriConfig) -> Result<Self, AriError> {
        let base = config.base_url()?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| AriError::Config(e.to_string()))?;
        Ok(AriClient { inner: Arc::new(Inner { http, config, base }) })
    }

    pub fn config(&self) -> &AriConfig {
        &self.inner.config
    }

    /// `POST /channels`: dial `endpoint` as a channel with the caller's id.
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
        tracing::debug!(%method, path = url.path(), "ARI request");
        let mut request = inner
            .http
            .request(method, url)
            .basic_auth(&inner.config.username, Some(&inner.config.password))
            .query(query);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let timeout = inner.config.request_timeout;
        let response = request.send().await.map_err(|e| AriError::from_reqwest(e, timeout))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| AriError::from_reqwest(e, timeout))?;
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
