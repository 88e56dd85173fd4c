//! HTTP metrics, in the registry the CallManager also registered into.
//!
//! Labels are the method, the route *template* (`/api/v1/calls/{call_id}`, or `unmatched`) and
//! the status class (`2xx`…): never an id, a number or a raw path.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::router::ROUTES;

#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    /// The series of each route in [`ROUTES`], in its order, looked up once: a label lookup
    /// hashes every label and takes a lock, on every request otherwise.
    routes: Arc<[RouteSeries]>,
}

/// One route's series, each resolved at its first use (so `/metrics` lists only those used).
#[derive(Debug, Default)]
struct RouteSeries {
    /// By status class, `1xx` to `5xx`.
    requests: [OnceLock<IntCounter>; 5],
    latency: OnceLock<Histogram>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("ivr_http_requests_total", "HTTP requests by method, route template and status class"),
            &["method", "route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("ivr_http_request_duration_seconds", "Time to answer an HTTP request (headers)")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        let routes = ROUTES.iter().map(|_| RouteSeries::default()).collect();
        Ok(HttpMetrics { requests, latency, routes })
    }

    pub fn observe(&self, method: &hyper::Method, route: &'static str, status: u16, elapsed: Duration) {
        let label = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::POST => "POST",
            hyper::Method::DELETE => "DELETE",
            hyper::Method::PUT => "PUT",
            hyper::Method::PATCH => "PATCH",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        let class = usize::from(status.clamp(100, 599) / 100 - 1);
        let seconds = elapsed.as_secs_f64();
        // A route of the table, with its own method: its series, once looked up. Anything else
        // (unmatched, a method the path does not allow) is rare and looked up each time.
        // Searched from the end: the status GET is the table's last route, the call's GET
        // five before it.
        match ROUTES.iter().rposition(|(m, template)| m == method && *template == route) {
            Some(i) => {
                let series = &self.routes[i];
                series.requests[class]
                    .get_or_init(|| self.requests.with_label_values(&[label, route, CLASSES[class]]))
                    .inc();
                series.latency.get_or_init(|| self.latency.with_label_values(&[label, route])).observe(seconds);
            }
            None => {
                self.requests.with_label_values(&[label, route, CLASSES[class]]).inc();
                self.latency.with_label_values(&[label, route]).observe(seconds);
            }
        }
    }
}

/// The counters of abuse refused: throttled logins, refused destinations, connections.
#[derive(Clone, Debug)]
pub struct GuardMetrics {
    /// `action` = slowed|refused, `scope` = address|username.
    pub login_throttled: IntCounterVec,
    /// `reason` = denied|not_allowed|not_e164.
    pub destinations_refused: IntCounterVec,
    pub connections_open: IntGauge,
    pub connections_refused: IntCounter,
    /// 1 while a `LISTEN` connection hears the users table's changes (PostgreSQL,
    /// `user_changes.rs`); 0 while users are asked about every USER_CACHE_SECONDS instead.
    pub user_changes_heard: IntGauge,
}

impl GuardMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let login_throttled = IntCounterVec::new(
            Opts::new("ivr_login_throttled_total", "Login attempts slowed or refused, by action and limit (scope)"),
            &["action", "scope"],
        )?;
        let destinations_refused = IntCounterVec::new(
            Opts::new("ivr_destinations_refused_total", "Calls refused by the destination policy, by reason"),
            &["reason"],
        )?;
        let connections_open = IntGauge::new("ivr_http_connections_open", "HTTP connections being served")?;
        let connections_refused = IntCounter::new(
            "ivr_http_connections_refused_total",
            "HTTP connections refused (503) because MAX_CONNECTIONS were open",
        )?;
        let user_changes_heard = IntGauge::new(
            "ivr_user_changes_heard",
            "1 while the users table's changes are heard (PostgreSQL LISTEN); 0 while users are asked about every USER_CACHE_SECONDS",
        )?;
        registry.register(Box::new(login_throttled.clone()))?;
        registry.register(Box::new(destinations_refused.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(user_changes_heard.clone()))?;
        Ok(GuardMetrics {
            login_throttled,
            destinations_refused,
            connections_open,
            connections_refused,
            user_changes_heard,
        })
    }
}

/// The registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_default()
}
