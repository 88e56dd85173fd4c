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
//! - [`auth`], [`users`]: access tokens (HS256) and the users table; [`cache`]: the status
//!   path's bounded caches (ended calls' answers, verified tokens, enabled users).
//! - [`throttle`], [`client`], [`policy`]: login throttling, who the client is, which numbers
//!   may be dialled (SECURITY.md states these promises).
//! - [`sse`], [`openapi`], [`metrics`]: the event stream, the generated API document and the
//!   Swagger UI page, the Prometheus registry.
//! - [`server`], [`conn`]: the accept loop with its bounds, and one connection's IO.
//! - [`retention`]: ended calls deleted after CALL_RETENTION_DAYS, and `purge --before`.
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
pub mod cache;
pub mod cli;
pub mod client;
pub mod conn;
pub mod fields;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod problem;
pub mod request;
pub mod retention;
pub mod router;
pub mod server;
pub mod settings;
pub mod sse;
pub mod throttle;
pub mod user_changes;
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
    guard_metrics: metrics::GuardMetrics,
    throttle: throttle::LoginThrottle,
    options: Options,
    closing: watch::Sender<bool>,
    /// The OpenAPI document, for this server's settings.
    openapi: hyper::body::Bytes,
    answers: cache::AnswerCache,
    live_answers: cache::LiveAnswers,
    verified: cache::TokenCache,
    enabled: cache::UserCache,
}

/// Switches and bounds of the HTTP layer.
#[derive(Clone, Debug)]
pub struct Options {
    pub metrics_enabled: bool,
    pub docs_enabled: bool,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Open connections and header bounds.
    pub connections: server::ConnectionLimits,
    /// Login throttling.
    pub login: throttle::LoginLimits,
    /// Whose `X-Forwarded-For` names the client.
    pub trusted_proxies: client::TrustedProxies,
    /// Which numbers may be dialled.
    pub policy: policy::DestinationPolicy,
    /// Bounds of the status path's caches.
    pub caches: cache::CacheLimits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            metrics_enabled: false,
            docs_enabled: true,
            shutdown_grace: Duration::from_secs(10),
            connections: server::ConnectionLimits::default(),
            login: throttle::LoginLimits::default(),
            trusted_proxies: client::TrustedProxies::default(),
            policy: policy::DestinationPolicy::default(),
            caches: cache::CacheLimits::default(),
        }
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
        let guard_metrics = metrics::GuardMetrics::register(&registry)?;
        let throttle = throttle::LoginThrottle::new(options.login.clone(), guard_metrics.login_throttled.clone());
        let (closing, _) = watch::channel(false);
        let openapi = openapi::document_json_for(manager.settings()).into();
        let answers = cache::AnswerCache::new(options.caches.status_bytes);
        let live_answers = cache::LiveAnswers::new(manager.settings().max_active_calls.saturating_mul(2).max(1));
        let enabled = cache::UserCache::new(options.caches.user_staleness);
        let inner = Inner {
            manager,
            users,
            tokens,
            registry,
            http_metrics,
            guard_metrics,
            throttle,
            options,
            closing,
            openapi,
            answers,
            live_answers,
            verified: cache::TokenCache::new(),
            enabled,
        };
        Ok(AppState { inner: Arc::new(inner) })
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

    pub(crate) fn guard_metrics(&self) -> &metrics::GuardMetrics {
        &self.inner.guard_metrics
    }

    /// Ended calls' answers.
    pub fn answers(&self) -> &cache::AnswerCache {
        &self.inner.answers
    }

    /// Live calls' answers, by the version they show.
    pub fn live_answers(&self) -> &cache::LiveAnswers {
        &self.inner.live_answers
    }

    pub(crate) fn verified_tokens(&self) -> &cache::TokenCache {
        &self.inner.verified
    }

    /// Users found enabled, and whether the users table's changes are heard.
    pub fn enabled_users(&self) -> &cache::UserCache {
        &self.inner.enabled
    }

    pub fn login_throttle(&self) -> &throttle::LoginThrottle {
        &self.inner.throttle
    }

    /// 403 unless the destination policy lets `number` be dialled (counted when refused).
    pub fn check_destination(&self, number: &ivr_core::PhoneNumber) -> Result<(), problem::Problem> {
        self.inner.options.policy.check(number).map_err(|refusal| {
            self.inner.guard_metrics.destinations_refused.with_label_values(&[refusal.reason()]).inc();
            tracing::info!(reason = refusal.reason(), "call refused by the destination policy");
            problem::Problem::new("destination-refused", refusal.to_string())
        })
    }

    /// Tells long-lived answers (event streams) that the server is shutting down.
    pub(crate) fn begin_closing(&self) {
        self.inner.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }
}
