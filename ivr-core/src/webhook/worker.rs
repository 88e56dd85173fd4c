//! The delivery worker: a task of its own that claims due deliveries from the store, POSTs
//! them, and records each attempt. It never touches the ARI event loop: the only thing the
//! two share is the store, where the transition's transaction left the outbox row.
//!
//! Each round claims up to `batch` due deliveries (leased for longer than an attempt can
//! take), sends them concurrently (they belong to different calls: the store hands out only
//! the first pending delivery of a call), and records each outcome. A 2xx ends a delivery;
//! anything else (another status, a redirect, which is never followed, a refused connection,
//! a timeout) schedules a retry after an exponential backoff with jitter, until the delivery
//! is older than `max_age`, when it is marked failed. A worker that dies mid-attempt leaves a
//! lease that ends, and the delivery is claimed again: at least once.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::time::Instant;
use url::{Host, Url};

use super::{sign::signature_header, Attempt, Delivery, DeliveryState};
use crate::call::{truncate_to_micros, Call};
use crate::store::CallStore;

/// Turns the call of a delivery into the `call` of its payload (ivr-server gives the JSON its
/// `GET /api/v1/calls/{id}` answers; the default is [`Call`]'s own serialization).
pub type Render = Arc<dyn Fn(&Call) -> serde_json::Value + Send + Sync>;

/// How deliveries are signed, sent and retried.
#[derive(Clone)]
pub struct WebhookSettings {
    /// The HMAC key of `Ivr-Signature` (WEBHOOK_SECRET). Never logged.
    pub secret: Vec<u8>,
    /// How long one attempt (connect, send, status line) may take (WEBHOOK_TIMEOUT).
    pub timeout: Duration,
    /// Retries stop once a delivery is this old; it is then marked failed (WEBHOOK_MAX_AGE).
    pub max_age: Duration,
    /// The wait after the first failed attempt; each further failure doubles it.
    pub first_retry: Duration,
    /// The longest wait between two attempts.
    pub max_retry: Duration,
    /// How often the outbox is looked at when it had nothing due.
    pub poll_interval: Duration,
    /// Deliveries claimed, and sent concurrently, per round.
    pub batch: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            secret: Vec::new(),
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(24 * 3600),
            first_retry: Duration::from_secs(10),
            max_retry: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1),
            batch: 32,
        }
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .field("first_retry", &self.first_retry)
            .field("max_retry", &self.max_retry)
            .field("poll_interval", &self.poll_interval)
            .field("batch", &self.batch)
            .finish()
    }
}

impl WebhookSettings {
    /// The wait before the attempt after `failures` failed ones: `first_retry · 2^(failures-1)`,
    /// at most `max_retry`, of which a random part up to half is taken off (jitter, so the
    /// retries of many calls failing together spread out).
    pub fn retry_delay(&self, failures: u32) -> Duration {
        let doubled = self.first_retry.saturating_mul(1 << failures.saturating_sub(1).min(20));
        let delay = doubled.min(self.max_retry);
        delay.mul_f64(1.0 - fastrand::f64() * 0.5)
    }

    /// How long a claim holds a delivery: well past the longest attempt (the attempt's
    /// timeout, then recording it).
    fn lease(&self) -> Duration {
        self.timeout * 3
    }
}

#[derive(Clone, Debug)]
struct Metrics {
    /// `outcome`: sent | retried | failed.
    attempts: IntCounterVec,
    depth: IntGauge,
}

impl Metrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Metrics {
            attempts: IntCounterVec::new(
                Opts::new(
                    "ivr_webhook_deliveries_total",
                    "Status-callback attempts by outcome: sent (2xx), retried (will be tried again), failed (given up)",
                ),
                &["outcome"],
            )?,
            depth: IntGauge::new("ivr_webhook_outbox_depth", "Status callbacks not yet delivered nor given up")?,
        };
        registry.register(Box::new(metrics.attempts.clone()))?;
        registry.register(Box::new(metrics.depth.clone()))?;
        for outcome in ["sent", "retried", "failed"] {
            metrics.attempts.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }
}

/// The delivery worker. [`run`](Worker::run) it on a task of its own.
#[derive(Clone)]
pub struct Worker {
    store: Arc<dyn CallStore>,
    settings: WebhookSettings,
    metrics: Metrics,
    render: Render,
    /// The wall clock when the worker was made and tokio's clock then: the worker's "now"
    /// follows tokio's clock (so a paused test clock drives the retries), never behind the wall.
    started: (OffsetDateTime, Instant),
}

impl Worker {
    pub fn new(store: Arc<dyn CallStore>, settings: WebhookSettings, registry: &Registry) -> prometheus::Result<Self> {
        Ok(Worker {
            store,
            settings,
            metrics: Metrics::register(registry)?,
            render: Arc::new(|call: &Call| serde_json::to_value(call).unwrap_or_default()),
            started: (crate::call::now(), Instant::now()),
        })
    }

    /// Renders each payload's `call` with `render`.
    pub fn with_render(mut self, render: Render) -> Self {
        self.render = render;
        self
    }

    fn now(&self) -> OffsetDateTime {
        let (wall, tokio) = self.started;
        let followed = wall + tokio.elapsed();
        truncate_to_micros(followed.max(OffsetDateTime::now_utc()))
    }

    /// Delivers until `shutdown` completes. An attempt cut short by the shutdown is sent again
    /// later (its lease ends).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let round = self.round();
            let sent = tokio::select! {
                sent = round => sent,
                () = &mut shutdown => return,
            };
            if sent == 0 {
                tokio::select! {
                    () = tokio::time::sleep(self.settings.poll_interval) => {}
                    () = &mut shutdown => return,
                }
            }
        }
    }

    /// One round: claim what is due, send it, record the outcomes. Returns how many attempts
    /// were made.
    pub async fn round(&self) -> usize {
        let now = self.now();
        let lease_until = now + self.settings.lease();
        let claimed = match self.store.claim_deliveries(now, lease_until, self.settings.batch.max(1)).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "status callbacks: cannot read the outbox");
                return 0;
            }
        };
        let count = claimed.len();
        stream::iter(claimed).for_each_concurrent(None, |delivery| self.attempt(delivery)).await;
        if let Ok(depth) = self.store.outbox_depth().await {
            self.metrics.depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        count
    }

    async fn attempt(&self, delivery: Delivery) {
        let body = payload(&delivery, &self.render);
        let sent_at = self.now();
        let signature = signature_header(&self.settings.secret, sent_at.unix_timestamp(), &body);
        let outcome = match tokio::time::timeout(self.settings.timeout, post(&delivery, body, &signature)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Ok(format!("HTTP {status}")),
            Ok(Ok(status)) if (300..400).contains(&status) => {
                Err(format!("HTTP {status} (redirects are not followed)"))
            }
            Ok(Ok(status)) => Err(format!("HTTP {status}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} ms", self.settings.timeout.as_millis())),
        };
        let at = self.now();
        let attempt = match outcome {
            Ok(result) => {
                self.metrics.attempts.with_label_values(&["sent"]).inc();
                Attempt { at, result, state: DeliveryState::Delivered, next_attempt_at: at }
            }
            Err(result) => {
                let next = at + self.settings.retry_delay(delivery.attempts + 1);
                let expired = next - delivery.created_at > self.settings.max_age;
                let (state, outcome) =
                    if expired { (DeliveryState::Failed, "failed") } else { (DeliveryState::Pending, "retried") };
                self.metrics.attempts.with_label_values(&[outcome]).inc();
                tracing::info!(call_id = %delivery.call_id, event_id = %delivery.event_id, %result, outcome,
                    "status callback not accepted");
                Attempt { at, result, state, next_attempt_at: if expired { at } else { next } }
            }
        };
        if let Err(e) = self.store.record_attempt(delivery.event_id, &attempt).await {
            // The lease ends and the delivery is claimed again: sent twice, never lost.
            tracing::warn!(error = %e, event_id = %delivery.event_id, "status callbacks: cannot record an attempt");
        }
    }
}

/// The JSON body of a delivery: the same on every attempt.
fn payload(delivery: &Delivery, render: &Render) -> Vec<u8> {
    let body = serde_json::json!({
        "id": delivery.event_id,
        "type": delivery.event_type(),
        "created_at": delivery.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
        "call_id": delivery.call_id,
        "transition": delivery.transition(),
        "call": render(&delivery.call),
    });
    serde_json::to_vec(&body).expect("a JSON value always serializes")
}

/// POSTs `body` to the delivery's URL on a connection of its own; the status code, or why
/// there was none. The URL was checked (http, an allowed host) when the call was made.
async fn post(delivery: &Delivery, body: Vec<u8>, signature: &str) -> Result<u16, String> {
    let url = Url::parse(&delivery.url).map_err(|e| format!("bad URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("{} URLs are not supported", url.scheme()));
    }
    let host = match url.host() {
        Some(Host::Domain(name)) => name.to_owned(),
        Some(Host::Ipv4(ip)) => ip.to_string(),
        Some(Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("the URL has no host".into()),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let stream = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let header = |v: &str| HeaderValue::from_str(v).map_err(|e| format!("bad header value: {e}"));
    let request = Request::post(path)
        .header(HOST, header(&authority)?)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .header(USER_AGENT, concat!("ivr/", env!("CARGO_PKG_VERSION")))
        .header("Ivr-Signature", header(signature)?)
        .header("Ivr-Event-Id", header(&delivery.event_id.to_string())?)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let s = WebhookSettings {
            first_retry: Duration::from_secs(10),
            max_retry: Duration::from_secs(60),
            ..WebhookSettings::default()
        };
        for _ in 0..100 {
            let d1 = s.retry_delay(1);
            let d3 = s.retry_delay(3);
            let d9 = s.retry_delay(9);
            assert!(d1 >= Duration::from_secs(5) && d1 <= Duration::from_secs(10), "{d1:?}");
            assert!(d3 >= Duration::from_secs(20) && d3 <= Duration::from_secs(40), "{d3:?}");
            assert!(d9 >= Duration::from_secs(30) && d9 <= Duration::from_secs(60), "{d9:?}");
        }
        assert!(s.retry_delay(u32::MAX) <= Duration::from_secs(60));
    }
}
