//! HTTP metrics, in the registry the CallManager also registered into.
//!
//! Labels are the method, the route *template* (`/api/v1/calls/{call_id}`, or `unmatched`) and
//! the status class (`2xx`…): never an id, a number or a raw path.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

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
        Ok(HttpMetrics { requests, latency })
    }

    pub fn observe(&self, method: &hyper::Method, route: &'static str, status: u16, elapsed: Duration) {
        let method = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::POST => "POST",
            hyper::Method::DELETE => "DELETE",
            hyper::Method::PUT => "PUT",
            hyper::Method::PATCH => "PATCH",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.with_label_values(&[method, route, class]).inc();
        self.latency.with_label_values(&[method, route]).observe(elapsed.as_secs_f64());
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
        registry.register(Box::new(login_throttled.clone()))?;
        registry.register(Box::new(destinations_refused.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        Ok(GuardMetrics { login_throttled, destinations_refused, connections_open, connections_refused })
    }
}

/// The registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_default()
}
