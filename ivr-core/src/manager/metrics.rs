//! The manager's Prometheus metrics. Labels are low-cardinality by construction: fixed
//! outcome, reason and error-kind names, never a number or an id.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// `outcome`: dialing | failed | queued | refused (the active-call cap) | queue_full |
    /// duplicate | lost (Asterisk could not be reached to place it).
    pub originations: IntCounterVec,
    /// Every `POST /channels` sent (retries of one attempt included): its rate is the
    /// originate rate the trunk sees.
    pub originate_requests: IntCounter,
    /// Calls waiting for the calls-per-second limit.
    pub queued_calls: IntGauge,
    /// Reconciles of the active calls with Asterisk.
    pub reconcile_runs: IntCounter,
    /// `request`: list (one `GET /channels`) | get (one `GET /channels/{id}`).
    pub reconcile_requests: IntCounterVec,
    pub active_calls: IntGauge,
    pub answered: IntCounter,
    /// `reason`: a FailureReason name.
    pub failed: IntCounterVec,
    /// `kind`: an AriError kind.
    pub ari_errors: IntCounterVec,
    pub ws_reconnects: IntCounter,
    /// 1 while the event WebSocket is connected.
    pub ari_connected: IntGauge,
    /// ARI events taken by the event loop (none is ever dropped: the stream queues them all).
    pub events: IntCounter,
    /// Events read off the socket and not yet taken by the event loop.
    pub event_queue_depth: IntGauge,
    /// How long the event taken last waited in that queue.
    pub event_lag: Gauge,
    pub originate_seconds: Histogram,
    /// Calls taken over from instances whose lease lapsed.
    pub takeovers: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Metrics {
            originations: IntCounterVec::new(
                Opts::new("ivr_originations_total", "Originate requests by outcome"),
                &["outcome"],
            )?,
            originate_requests: IntCounter::new(
                "ivr_originate_requests_total",
                "POST /channels requests sent to Asterisk, retries included",
            )?,
            queued_calls: IntGauge::new("ivr_calls_queued", "Calls waiting for the calls-per-second limit")?,
            reconcile_runs: IntCounter::new(
                "ivr_reconcile_runs_total",
                "Reconciles of the active calls with Asterisk",
            )?,
            reconcile_requests: IntCounterVec::new(
                Opts::new("ivr_reconcile_requests_total", "ARI requests made by reconciles, by request"),
                &["request"],
            )?,
            active_calls: IntGauge::new("ivr_active_calls", "Calls not yet ended")?,
            answered: IntCounter::new("ivr_calls_answered_total", "Calls answered")?,
            failed: IntCounterVec::new(
                Opts::new("ivr_calls_failed_total", "Calls ended without an answer, by reason"),
                &["reason"],
            )?,
            ari_errors: IntCounterVec::new(
                Opts::new("ivr_ari_errors_total", "Failed ARI requests by kind"),
                &["kind"],
            )?,
            ws_reconnects: IntCounter::new("ivr_ari_websocket_reconnects_total", "ARI event WebSocket reconnects")?,
            ari_connected: IntGauge::new("ivr_ari_connected", "1 while the ARI event WebSocket is connected, else 0")?,
            events: IntCounter::new("ivr_ari_events_total", "ARI events taken by the event loop")?,
            event_queue_depth: IntGauge::new(
                "ivr_ari_event_queue_depth",
                "ARI events read off the WebSocket and not yet taken by the event loop",
            )?,
            event_lag: Gauge::new(
                "ivr_ari_event_lag_seconds",
                "How long the ARI event taken last waited between the socket and the event loop",
            )?,
            originate_seconds: Histogram::with_opts(
                HistogramOpts::new("ivr_originate_duration_seconds", "Time for ARI to accept an originate")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            takeovers: IntCounter::new(
                "ivr_calls_taken_over_total",
                "Calls taken over from other instances whose lease lapsed",
            )?,
        };
        registry.register(Box::new(metrics.takeovers.clone()))?;
        registry.register(Box::new(metrics.originations.clone()))?;
        registry.register(Box::new(metrics.active_calls.clone()))?;
        registry.register(Box::new(metrics.originate_requests.clone()))?;
        registry.register(Box::new(metrics.queued_calls.clone()))?;
        registry.register(Box::new(metrics.reconcile_runs.clone()))?;
        registry.register(Box::new(metrics.reconcile_requests.clone()))?;
        registry.register(Box::new(metrics.answered.clone()))?;
        registry.register(Box::new(metrics.failed.clone()))?;
        registry.register(Box::new(metrics.ari_errors.clone()))?;
        registry.register(Box::new(metrics.ws_reconnects.clone()))?;
        registry.register(Box::new(metrics.ari_connected.clone()))?;
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.event_queue_depth.clone()))?;
        registry.register(Box::new(metrics.event_lag.clone()))?;
        registry.register(Box::new(metrics.originate_seconds.clone()))?;
        Ok(metrics)
    }
}
