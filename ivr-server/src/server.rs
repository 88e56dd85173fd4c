//! The accept loop, its bounds, and the shutdown sequence.
//!
//! [`serve`] answers HTTP/1.1 on a listener until its shutdown future completes, then stops
//! accepting (taking in the connections the kernel already completed), waits up to
//! [`FIRST_REQUEST_WAIT`] for the first request of connections just accepted, ends event
//! streams, and lets in-flight requests finish within [`Options::shutdown_grace`](crate::Options):
//! a request sent before the shutdown is answered, one sent after is refused at connect. [`follow_calls`] runs the CallManager's event
//! loop and, once shutdown begins, keeps following live calls until they end or a bound passes.
//!
//! Bounds on connections ([`ConnectionLimits`], SECURITY.md):
//! - the request line and headers together may be [`MAX_HEADER_BYTES`]; a larger head is
//!   answered 431 by hyper (no body) and the connection closed;
//! - a request's head must arrive within `header_read_timeout` of the server starting to wait
//!   for it, on a fresh connection and between requests on a kept-alive one alike: a connection
//!   that sends nothing, or sends its head too slowly, is closed then ([`conn::HeadWait`]);
//! - at most `max_connections` are served at once, and at most `per_client` from one client
//!   address (an IPv6 /64; the peer, as connections carry no `X-Forwarded-For`; peers in
//!   TRUSTED_PROXIES are exempt), so one host's flood cannot take every slot. One more is
//!   still accepted and answered
//!   `503` problem+json with `Retry-After` and closed (up to [`REFUSING_AT_ONCE`] such answers
//!   at a time, each within [`REFUSAL_TIMEOUT`]; beyond that the connection is closed at once);
//! - a request body must arrive within [`body::BODY_READ_TIMEOUT`](crate::body::BODY_READ_TIMEOUT)
//!   (408), and a client that stops reading its answer is dropped after
//!   [`conn::WRITE_STALL`](crate::conn::WRITE_STALL);
//! - a closed connection lingers ([`conn`](crate::conn)), so an answer sent just before the
//!   close (a 431, a 503) reaches the client rather than being cut by a TCP reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use ivr_core::CallManager;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::Body;
use crate::cache::LastToken;
use crate::client::{address_key, TrustedProxies};
use crate::conn::{self, Cut, Guarded, HeadWait, Served};
use crate::problem::Problem;
use crate::AppState;

/// The largest request line and headers together, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How many over-the-cap connections are answered 503 at once.
pub const REFUSING_AT_ONCE: usize = 64;
/// How long an over-the-cap connection has to send its request before it is closed unanswered.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// At shutdown, how long connections accepted but not yet sent a request are waited for.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// How many connections, and how long a request's head may take (MAX_CONNECTIONS,
/// MAX_CONNECTIONS_PER_CLIENT, HEADER_READ_TIMEOUT_SECONDS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub per_client: usize,
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 1024, per_client: 64, header_read_timeout: Duration::from_secs(10) }
    }
}

/// Open connections per client address.
type ClientCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The connection slots: a count for the server and one per client address.
struct Slots {
    server: Arc<Semaphore>,
    clients: ClientCounts,
    per_client: usize,
    trusted: TrustedProxies,
}

/// A connection's place in [`Slots`], given back on drop.
struct Slot {
    _server: OwnedSemaphorePermit,
    client: Option<(IpAddr, ClientCounts)>,
}

impl Slots {
    fn new(limits: &ConnectionLimits, trusted: TrustedProxies) -> Self {
        Slots {
            server: Arc::new(Semaphore::new(limits.max_connections)),
            clients: Arc::default(),
            per_client: limits.per_client,
            trusted,
        }
    }

    /// A slot for a connection from `peer`, or which limit is reached.
    fn admit(&self, peer: IpAddr) -> Result<Slot, &'static str> {
        let server = Arc::clone(&self.server).try_acquire_owned().map_err(|_| "MAX_CONNECTIONS")?;
        if self.trusted.contains(peer) {
            return Ok(Slot { _server: server, client: None });
        }
        let key = address_key(peer);
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let count = clients.entry(key).or_insert(0);
        if *count >= self.per_client {
            return Err("MAX_CONNECTIONS_PER_CLIENT");
        }
        *count += 1;
        Ok(Slot { _server: server, client: Some((key, Arc::clone(&self.clients))) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((key, clients)) = self.client.take() {
            let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = clients.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    clients.remove(&key);
                }
            }
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes, then drains (see the module doc).
pub async fn serve(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    // Told to every connection at shutdown; closed once the last connection has ended.
    let (closing, _) = watch::channel(false);
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let limits = state.options().connections.clone();
    let slots = Slots::new(&limits, state.options().trusted_proxies.clone());
    let refusals = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    // The header-read timeout is kept per connection (conn::HeadWait), not by hyper's timer.
    let mut builder = http1::Builder::new();
    builder.header_read_timeout(None).max_header_size(MAX_HEADER_BYTES);
    let mut refusing = builder.clone();
    refusing.keep_alive(false).timer(TokioTimer::new()).header_read_timeout(REFUSAL_TIMEOUT);
    // Connections accepted that have not sent their first request yet.
    let awaiting_first = Arc::new(AtomicUsize::new(0));
    let mut stopping = false;
    loop {
        let accepted = if stopping {
            // Connections the kernel completed but this loop has not taken yet would be reset
            // when the listener closes: take them in, so their requests are answered.
            match listener.accept().now_or_never() {
                Some(accepted) => accepted,
                None => break,
            }
        } else {
            tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => {
                    stopping = true;
                    continue;
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(limit) => {
                state.guard_metrics().connections_refused.inc();
                match Arc::clone(&refusals).try_acquire_owned() {
                    Ok(permit) => {
                        tracing::warn!(limit, "connection refused: the limit of open connections is reached");
                        tokio::spawn(refuse(&refusing, stream, permit, limit));
                    }
                    Err(_) => drop(stream),
                }
                continue;
            }
        };
        let state = state.clone();
        let open = state.guard_metrics().connections_open.clone();
        let wait = HeadWait::new(&awaiting_first);
        let caller = Caller::new(peer.ip(), Arc::clone(&wait));
        let service = service_fn(move |request: Request<Incoming>| respond(&state, &caller, request));
        let (io, returned) = Guarded::new(stream);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        // Two receivers: `told` ends the wait for the shutdown and is dropped with it once the
        // shutdown is passed on; `watching` keeps this connection counted (`closing.closed()`)
        // until it has really ended.
        let (watching, mut told) = (closing.subscribe(), closing.subscribe());
        let cuts = {
            let (wait, timeout) = (Arc::clone(&wait), limits.header_read_timeout);
            async move {
                tokio::select! {
                    () = wait.expired(timeout) => Cut::HeadTimeout,
                    _ = told.wait_for(|closing| *closing) => Cut::Stopping,
                }
            }
        };
        open.inc();
        tokio::spawn(async move {
            match Served::new(connection, cuts).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                Err(_) => tracing::debug!("no request head within HEADER_READ_TIMEOUT_SECONDS; connection closed"),
            }
            drop(watching);
            wait.ended();
            conn::linger(returned).await;
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    // A connection accepted just before the shutdown has its first request on the wire: let
    // it be read and answered rather than close the connection unanswered.
    let waiting_since = Instant::now();
    while awaiting_first.load(Ordering::SeqCst) > 0 && waiting_since.elapsed() < FIRST_REQUEST_WAIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    state.begin_closing();
    let grace = state.options().shutdown_grace;
    tracing::info!(?grace, "shutting down: no new connections; finishing requests in flight");
    closing.send_replace(true);
    tokio::select! {
        () = closing.closed() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("requests still in flight after the grace period were cut"),
    }
    Ok(())
}

/// Answers one request on an over-the-cap connection with 503 and closes it; `limit` names
/// the limit reached.
fn refuse(
    builder: &http1::Builder,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    limit: &'static str,
) -> impl Future<Output = ()> {
    let detail = if limit == "MAX_CONNECTIONS" {
        "the server has as many connections open as it serves at once (MAX_CONNECTIONS); retry shortly"
    } else {
        "this client has as many connections open as one client may (MAX_CONNECTIONS_PER_CLIENT); \
         reuse one, or retry shortly"
    };
    let service = service_fn(move |_request: Request<Incoming>| async move {
        let mut response = Problem::new("too-many-connections", detail)
            .header(RETRY_AFTER, HeaderValue::from_static("1"))
            .into_response();
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        Ok::<_, Infallible>(response)
    });
    let (io, returned) = Guarded::new(stream);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    async move {
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT * 2, connection).await;
        conn::linger(returned).await;
        drop(permit);
    }
}

/// Who calls on one connection: the peer's address, the token its last request was let in
/// with ([`LastToken`]), and where it stands between requests ([`HeadWait`]). One per
/// connection, made when it is accepted.
pub struct Caller {
    peer: IpAddr,
    last_token: LastToken,
    wait: Arc<HeadWait>,
}

impl Caller {
    pub fn new(peer: IpAddr, wait: Arc<HeadWait>) -> Self {
        Caller { peer, last_token: LastToken::default(), wait }
    }
}

/// One request: the answer, its metrics and its log line. A panic in a handler is a 500.
/// This is the service of every connection [`serve`] accepts (the benches call it in-process).
///
/// Most requests are status GETs that memory answers ([`api::answer_at_once`]): they are
/// answered here, before any future exists, so hyper stores and moves only the answer (the
/// handlers' future is a kilobyte, and moving it was a tenth of such a request's work). The
/// rest go through [`api::handle`], boxed.
///
/// [`api::answer_at_once`]: crate::api::answer_at_once
/// [`api::handle`]: crate::api::handle
pub fn respond(
    state: &AppState,
    caller: &Caller,
    request: Request<Incoming>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
    caller.wait.head_arrived();
    let started = Instant::now();
    let at_once = || crate::api::answer_at_once(state, &caller.last_token, started, &request);
    let answered = match std::panic::catch_unwind(AssertUnwindSafe(at_once)) {
        Ok(answered) => answered,
        Err(_) => Some(panicked(request.method())),
    };
    if let Some((route, response)) = answered {
        return Either::Left(ready(Ok(finish(state, &caller.wait, request.method(), route, started, response))));
    }
    let (state, peer, wait) = (state.clone(), caller.peer, Arc::clone(&caller.wait));
    Either::Right(Box::pin(async move {
        let method = request.method().clone();
        let (route, response) = match AssertUnwindSafe(crate::api::handle(&state, peer, request)).catch_unwind().await {
            Ok(answer) => answer,
            Err(_) => panicked(&method),
        };
        Ok(finish(&state, &wait, &method, route, started, response))
    }))
}

fn panicked(method: &Method) -> (&'static str, Response<Body>) {
    tracing::error!(%method, "a handler panicked");
    ("unmatched", Problem::new("internal", "the server failed to answer; this has been logged").into_response())
}

/// Counts and logs an answer, and tells the connection's head wait when it ends: a whole one
/// now (hyper takes it at once), a stream when hyper drops it.
fn finish(
    state: &AppState,
    wait: &Arc<HeadWait>,
    method: &Method,
    route: &'static str,
    started: Instant,
    response: Response<Body>,
) -> Response<Body> {
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state.http_metrics().observe(method, route, status, elapsed);
    tracing::info!(
        target: "ivr_server::access",
        %method,
        route,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response.map(|body| match body {
        http_body_util::Either::Right(stream) => crate::body::stream(wait.track(stream)),
        whole => {
            wait.answered(started + elapsed);
            whole
        }
    })
}

/// Runs the manager's event loop. When `shutdown` completes, live calls are still followed
/// until none is left or `drain` has passed; then the loop stops. Calls still live then stay
/// active in the store and are reconciled with Asterisk at the next start.
pub async fn follow_calls(
    manager: CallManager,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> ivr_core::Result<()> {
    let watcher = manager.clone();
    manager
        .run(async move {
            shutdown.await;
            let deadline = Instant::now() + drain;
            let live = watcher.active_calls();
            if live > 0 {
                tracing::info!(live, ?drain, "following live calls until they end");
            }
            while watcher.active_calls() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let left = watcher.active_calls();
            if left > 0 {
                tracing::warn!(left, "calls still live at shutdown; they are reconciled at the next start");
            }
        })
        .await
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
