//! The `/ari/events` WebSocket as a stream that never loses an event.
//!
//! A background task owns the socket. It reconnects by itself (exponential backoff with
//! jitter) and reports every connect, disconnect and replacement as a [`StreamItem`], so the
//! call engine knows when it must reconcile. The task reads the socket as fast as Asterisk
//! writes (Asterisk closes a socket whose reader stalls past `websocket_write_timeout`) and
//! hands every event on through an unbounded queue: a slow consumer delays events, never
//! loses them. What bounds that queue is admission (the calls a process takes on), not
//! discarding. [`StreamStats`] tells the queue's depth and the consumer's lag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{AriConfig, AriError, AriEvent};

/// What the event stream tells its consumer.
#[derive(Clone, Debug, PartialEq)]
// Events are nearly all of the traffic; boxing them would cost an allocation each for nothing.
#[allow(clippy::large_enum_variant)]
pub enum StreamItem {
    /// A WebSocket is open. `connection` counts them from 1; anything above 1 is a reconnect,
    /// after which events may have been missed and calls should be reconciled.
    Connected {
        connection: u64,
    },
    /// An attempt to connect failed; the next one comes after `retry_in`.
    ConnectFailed {
        reason: String,
        retry_in: Duration,
    },
    /// The open WebSocket closed or broke; a reconnect comes after `retry_in`.
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// Another WebSocket took over this application (ApplicationReplaced): this one would get
    /// no more events. We reconnect after `retry_in`, the longest backoff, so two consumers
    /// of one app name do not fight at full speed.
    Replaced {
        retry_in: Duration,
    },
    Event(AriEvent),
}

/// The ARI event stream. Dropping it closes the WebSocket.
#[derive(Debug)]
pub struct EventStream {
    items: mpsc::UnboundedReceiver<(Instant, StreamItem)>,
    stats: StreamStats,
    task: JoinHandle<()>,
}

impl EventStream {
    /// Starts connecting in the background; the first item says how that went.
    pub fn connect(config: AriConfig) -> Result<EventStream, AriError> {
        let url = config.events_url()?;
        let (tx, items) = mpsc::unbounded_channel();
        let stats = StreamStats::default();
        let sender = Sender { tx, stats: stats.clone() };
        let task = tokio::spawn(run(config, url, sender));
        Ok(EventStream { items, stats, task })
    }

    /// The next item; `None` once the stream has stopped.
    pub async fn next(&mut self) -> Option<StreamItem> {
        let (read_at, item) = self.items.recv().await?;
        let shared = &self.stats.shared;
        shared.queued.fetch_sub(1, Ordering::Relaxed);
        shared.consumed.fetch_add(1, Ordering::Relaxed);
        let lag = u64::try_from(read_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        shared.lag_micros.store(lag, Ordering::Relaxed);
        Some(item)
    }

    /// A handle on the queue's figures, for metrics; it stays valid after the stream is gone.
    pub fn stats(&self) -> StreamStats {
        self.stats.clone()
    }
}

/// The event queue between the socket reader and the consumer, in figures. Cheap to clone
/// (an `Arc` over atomics); every clone reads the same stream.
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    shared: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Items read from the socket (or made by the reader) and not yet taken by the consumer.
    queued: AtomicU64,
    /// Items the consumer has taken.
    consumed: AtomicU64,
    /// Between the read and the take of the item taken last, in microseconds.
    lag_micros: AtomicU64,
}

impl StreamStats {
    /// Items (events, mostly) read but not yet consumed: the consumer's backlog.
    pub fn queue_depth(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// How long the item consumed last waited in the queue, from its read off the socket to
    /// its take by the consumer. Zero while the consumer keeps up; it grows as it falls behind.
    pub fn consumer_lag(&self) -> Duration {
        Duration::from_micros(self.shared.lag_micros.load(Ordering::Relaxed))
    }

    /// Items the consumer has taken since the stream was made.
    pub fn consumed(&self) -> u64 {
        self.shared.consumed.load(Ordering::Relaxed)
    }
}

/// The reader's end of the queue: stamps each item with its read time and counts it.
struct Sender {
    tx: mpsc::UnboundedSender<(Instant, StreamItem)>,
    stats: StreamStats,
}

impl Sender {
    /// Queues `item`; `false` when the consumer is gone.
    fn send(&self, item: StreamItem) -> bool {
        // Counted before the send, so the consumer's decrement can never come first.
        self.stats.shared.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send((Instant::now(), item)).is_ok() {
            return true;
        }
        self.stats.shared.queued.fetch_sub(1, Ordering::Relaxed);
        false
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a connection ended.
enum Ended {
    Closed(String),
    Replaced,
    ConsumerGone,
}

async fn run(config: AriConfig, url: url::Url, tx: Sender) {
    let mut connections = 0u64;
    let mut failures = 0u32;
    loop {
        let (item, delay) = match open(&config, &url).await {
            Ok(socket) => {
                connections += 1;
                failures = 0;
                tracing::info!(connection = connections, app = %config.app, "ARI event stream connected");
                if !tx.send(StreamItem::Connected { connection: connections }) {
                    return;
                }
                match pump(socket, &config, &tx).await {
                    Ended::ConsumerGone => return,
                    Ended::Replaced => {
                        tracing::warn!(app = %config.app, "another WebSocket took over the ARI application");
                        (StreamItem::Replaced { retry_in: config.reconnect_max }, config.reconnect_max)
                    }
                    Ended::Closed(reason) => {
                        tracing::warn!(%reason, "ARI event stream disconnected");
                        let retry_in = backoff(&config, 0);
                        (StreamItem::Disconnected { reason, retry_in }, retry_in)
                    }
                }
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                let retry_in = backoff(&config, failures);
                tracing::warn!(%reason, ?retry_in, "ARI event stream could not connect");
                (StreamItem::ConnectFailed { reason, retry_in }, retry_in)
            }
        };
        if !tx.send(item) {
            return;
        }
        tokio::select! {
            _ = sleep(delay) => {}
            _ = tx.closed() => return,
        }
    }
}

/// The delay before reconnect attempt `failures` (0 right after a working connection broke):
/// `reconnect_min · 2^failures`, capped, then jittered to between half and all of it so that
/// many clients restarted together do not reconnect in step.
fn backoff(config: &AriConfig, failures: u32) -> Duration {
    let ceiling = config.reconnect_min.saturating_mul(1u32 << failures.min(16)).min(config.reconnect_max);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The most one read of the event socket takes in. tungstenite zero-fills the room for a read
/// before every read, even one that finds nothing: its default of 128 KiB was a 128 KiB memset
/// per wakeup, 5% of ivr's CPU at 1,000 calls a second (perf); at 16 KiB the memset was still
/// 18% of a create's instructions under callgrind (which counts `rep stosb` byte by byte, so
/// less of its time). An event is 1–2 KB, as the fake's own socket reads them; a larger
/// message is still read whole, in several reads.
const READ_BUFFER_BYTES: usize = 4 * 1024;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(config: &AriConfig, url: &url::Url) -> Result<Socket, String> {
    let mut request = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", config.username, config.password));
    let mut auth = HeaderValue::from_str(&format!("Basic {credentials}")).map_err(|e| e.to_string())?;
    auth.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, auth);
    let socket_config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(socket_config), false);
    match timeout(config.connect_timeout, connect).await {
        Err(_) => Err(format!("no WebSocket handshake within {:?}", config.connect_timeout)),
        Ok(Err(tungstenite::Error::Http(response))) => Err(match response.status().as_u16() {
            401 => "ARI refused the credentials (401)".to_owned(),
            status => format!("ARI refused the WebSocket with HTTP {status}"),
        }),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((socket, _))) => Ok(socket),
    }
}

/// Reads one connection until it ends, forwarding every event and answering keep-alive. It
/// never waits for the consumer, so the socket is read as fast as Asterisk writes.
async fn pump(mut socket: Socket, config: &AriConfig, tx: &Sender) -> Ended {
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await; // the first tick is immediate
    let mut last_heard = Instant::now();
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = ping.tick() => {
                if last_heard.elapsed() > config.ping_interval * 2 {
                    return Ended::Closed(format!("nothing heard from ARI for {:?}", last_heard.elapsed()));
                }
                if let Err(e) = socket.send(Message::Ping(Vec::new().into())).await {
                    return Ended::Closed(e.to_string());
                }
                continue;
            }
            _ = tx.closed() => return Ended::ConsumerGone,
        };
        last_heard = Instant::now();
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Ended::Closed(match frame {
                    Some(frame) => format!("closed by ARI ({} {})", u16::from(frame.code), frame.reason),
                    None => "closed by ARI".to_owned(),
                })
            }
            Some(Ok(_)) => continue, // pings are answered by tungstenite; pongs and binary carry nothing
            Some(Err(e)) => return Ended::Closed(e.to_string()),
            None => return Ended::Closed("connection ended".to_owned()),
        };
        let event = match AriEvent::parse(text.as_str()) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "ARI sent a message that is not an event");
                continue;
            }
        };
        let replaced = matches!(event, AriEvent::ApplicationReplaced { .. });
        if !tx.send(StreamItem::Event(event)) {
            return Ended::ConsumerGone;
        }
        if replaced {
            let _ = socket.close(None).await;
            return Ended::Replaced;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let config = AriConfig::new("http://127.0.0.1:1/ari", "u", "p", "a");
        for failures in 0..12u32 {
            let ceiling = (config.reconnect_min * 2u32.pow(failures)).min(config.reconnect_max);
            for _ in 0..50 {
                let d = backoff(&config, failures);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {failures}: {d:?} outside {ceiling:?}");
            }
        }
        assert!(backoff(&config, u32::MAX) <= config.reconnect_max);
    }
}
