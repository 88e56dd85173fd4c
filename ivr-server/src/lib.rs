//! # ivr-server
//!
//! The REST API over [`ivr_core`]: JWT auth, users, metrics, docs and a clean shutdown, on raw
//! hyper. [`serve`] mounts it on a listener the caller owns until the caller's shutdown future
//! completes, so tests run exactly what the binary runs, on port 0.
//!
//! - [`router`]: the route table and the one `match` that resolves it.
//! - [`api`]: the handlers, each with its OpenAPI operation; every failure becomes a
//!   [`problem::Problem`] (RFC 9457).
//! - [`request`], [`fields`], [`view`]: what the API reads and writes; each type parses (or
//!   shows) and documents itself.
//! - [`auth`], [`users`]: access tokens (HS256) and the users table.
//! - [`sse`], [`openapi`], [`metrics`]: the event stream, the generated API document and the
//!   Swagger UI page, the Prometheus registry.
//! - [`settings`], [`cli`], [`logging`], [`app`]: configuration, subcommands, logs, assembly.

use std::sync::Arc;
use std::time::Duration;

use ivr_core::CallManager;
use prometheus::Registry;
use tokio::sync::watch;

pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod fields;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod request;
pub mod router;
pub mod server;
pub mod settings;
pub mod sse;
pub mod users;
pub mod view;

pub use server::{follow_calls, serve, shutdown_signal};

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    manager: CallManager,
    users: Option<users::UserStore>,
    tokens: auth::Tokens,
    registry: Registry,
    http_metrics: metrics::HttpMetrics,
    options: Options,
    closing: watch::Sender<bool>,
    /// The OpenAPI document, for this server's settings.
    openapi: hyper::body::Bytes,
}

/// Switches and bounds of the HTTP layer.
#[derive(Clone, Debug)]
pub struct Options {
    pub metrics_enabled: bool,
    pub docs_enabled: bool,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { metrics_enabled: false, docs_enabled: true, shutdown_grace: Duration::from_secs(10) }
    }
}

impl AppState {
    /// The state for `manager`, with `users` (`None` in DISABLE_DB mode). The HTTP metrics go
    /// into `registry`, which should be the one the manager registered into.
    pub fn new(
        manager: CallManager,
        users: Option<users::UserStore>,
        tokens: auth::Tokens,
        registry: Registry,
        options: Options,
    ) -> prometheus::Result<Self> {
        let http_metrics = metrics::HttpMetrics::register(&registry)?;
        let (closing, _) = watch::channel(false);
        let openapi = openapi::document_json(manager.settings().max_attempts).into();
        Ok(AppState {
            inner: Arc::new(Inner { manager, users, tokens, registry, http_metrics, options, closing, openapi }),
        })
    }

    pub fn manager(&self) -> &CallManager {
        &self.inner.manager
    }

    pub fn users(&self) -> Option<&users::UserStore> {
        self.inner.users.as_ref()
    }

    pub fn tokens(&self) -> &auth::Tokens {
        &self.inner.tokens
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// The OpenAPI document served at `/openapi.json`.
    pub fn openapi_json(&self) -> hyper::body::Bytes {
        self.inner.openapi.clone()
    }

    pub(crate) fn http_metrics(&self) -> &metrics::HttpMetrics {
        &self.inner.http_metrics
    }

    /// Tells long-lived answers (event streams) that the server is shutting down.
    pub(crate) fn begin_closing(&self) {
        self.inner.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }
}
