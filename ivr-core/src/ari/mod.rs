//! The Asterisk REST Interface, as ivr uses it.
//!
//! - [`AriClient`]: the REST calls the call engine needs (originate, channels, hang-up,
//!   continue, play, Asterisk info, applications), at most `max_connections - 1` at a time.
//! - [`EventStream`]: the `/ari/events` WebSocket, typed into [`AriEvent`]s, reconnecting by
//!   itself and telling its user about every connect, disconnect and replacement. It never
//!   drops an event; [`StreamStats`] tells how far behind its consumer is.
//!
//! Credentials travel only in `Authorization` headers, never in a URL that could be logged.

use std::fmt;
use std::time::Duration;

mod client;
mod events;
mod model;
mod pool;
mod stream;

pub use client::{AriClient, AriError};
pub use events::AriEvent;
pub use model::{
    Application, AsteriskInfo, AsteriskStatus, CallerId, Channel, ChannelState, DialplanLocation, OriginateRequest,
    OriginateTarget, Playback,
};
pub use stream::{EventStream, StreamItem, StreamStats};

/// Where ARI is and how to talk to it.
#[derive(Clone)]
pub struct AriConfig {
    /// ARI's base URL including `/ari`, e.g. `http://127.0.0.1:8088/ari`. The WebSocket URL is
    /// derived from it.
    pub http_url: String,
    pub username: String,
    pub password: String,
    /// The Stasis application whose events we receive.
    pub app: String,
    /// Longest wait for a TCP connection (REST and WebSocket).
    pub connect_timeout: Duration,
    /// Longest wait for a whole REST call, including the wait for a free connection.
    pub request_timeout: Duration,
    /// HTTP connections to ARI at most, the event WebSocket included: one [`EventStream`]
    /// and `max_connections - 1` REST requests in flight per [`AriClient`]. Asterisk admits
    /// `sessionlimit` connections (default 100, `http.conf`) and closes any beyond it without
    /// an answer, so keep this well under that, leaving room for other ARI users.
    /// At least 2.
    pub max_connections: usize,
    /// First reconnect delay; it doubles per failed attempt up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// A WebSocket ping this often; a connection silent for two intervals is given up.
    pub ping_interval: Duration,
}

impl AriConfig {
    /// The default of [`max_connections`](AriConfig::max_connections): 19 REST + the WebSocket,
    /// a fifth of Asterisk's default `sessionlimit`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 20;

    pub fn new(
        http_url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
        app: impl Into<String>,
    ) -> Self {
        AriConfig {
            http_url: http_url.into(),
            username: username.into(),
            password: password.into(),
            app: app.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_connections: AriConfig::DEFAULT_MAX_CONNECTIONS,
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
        }
    }

    fn base_url(&self) -> Result<url::Url, AriError> {
        let url = url::Url::parse(&self.http_url)
            .map_err(|e| AriError::Config(format!("the ARI URL does not parse: {e}")))?;
        match url.scheme() {
            "http" if url.username().is_empty() && url.password().is_none() => Ok(url),
            "http" => Err(AriError::Config(
                "put ARI credentials in the username and password settings, not in the URL".into(),
            )),
            // ivr runs beside Asterisk on a private network; TLS is left out of the build.
            "https" => Err(AriError::Config("https is not supported: reach ARI over http on a private network".into())),
            other => Err(AriError::Config(format!("the ARI URL scheme must be http, not {other:?}"))),
        }
    }

    /// `ws://host:port/ari/events?app=<app>`.
    pub fn events_url(&self) -> Result<url::Url, AriError> {
        let mut url = self.base_url()?;
        url.set_scheme("ws").map_err(|()| AriError::Config("cannot derive the WebSocket URL".into()))?;
        url.path_segments_mut()
            .map_err(|()| AriError::Config("base URL cannot hold a path".into()))?
            .pop_if_empty()
            .push("events");
        url.query_pairs_mut().clear().append_pair("app", &self.app);
        Ok(url)
    }
}

impl fmt::Debug for AriConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AriConfig")
            .field("http_url", &self.http_url)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("app", &self.app)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_url_is_derived_from_the_http_url() {
        let config = AriConfig::new("http://127.0.0.1:8088/ari", "ivr", "ivr-secret", "ivr app");
        assert_eq!(config.events_url().unwrap().as_str(), "ws://127.0.0.1:8088/ari/events?app=ivr+app");
        let config = AriConfig::new("http://pbx.example:8088/ari/", "ivr", "s", "ivr");
        assert_eq!(config.events_url().unwrap().as_str(), "ws://pbx.example:8088/ari/events?app=ivr");
        let https = AriConfig::new("https://pbx.example:8089/ari", "ivr", "s", "ivr").events_url().unwrap_err();
        assert!(https.to_string().contains("https is not supported"), "{https}");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_credentials() {
        let err = AriConfig::new("http://ivr:hunter2@127.0.0.1:8088/ari", "ivr", "x", "ivr").base_url().unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(AriConfig::new("ftp://x/ari", "u", "p", "a").base_url().is_err());
        assert!(AriConfig::new("not a url", "u", "p", "a").base_url().is_err());
    }

    #[test]
    fn debug_hides_the_password() {
        let config = AriConfig::new("http://127.0.0.1:8088/ari", "ivr", "ivr-secret", "ivr");
        assert!(!format!("{config:?}").contains("ivr-secret"));
    }
}
