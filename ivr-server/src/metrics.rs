//! HTTP metrics, in the registry the CallManager also registered into.
//!
//! Labels are the method, the route *template* (`/api/v1/calls/{call_id}`, or `unmatched`) and
//! the status class (`2xx`…): never an id, a number or a raw path.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

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

/// The registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_default()
}
