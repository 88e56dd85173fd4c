//! The accept loop and the shutdown sequence.
//!
//! [`serve`] answers HTTP/1.1 on a listener until its shutdown future completes, then stops
//! accepting, ends event streams, and lets in-flight requests finish within
//! [`Options::shutdown_grace`](crate::Options). [`follow_calls`] runs the CallManager's event
//! loop and, once shutdown begins, keeps following live calls until they end or a bound passes.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use ivr_core::CallManager;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::problem::Problem;
use crate::AppState;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the API on `listener` until `shutdown` completes, then drains (see the module doc).
pub async fn serve(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let state = state.clone();
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    state.begin_closing();
    let grace = state.options().shutdown_grace;
    tracing::info!(?grace, "shutting down: no new connections; finishing requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("requests still in flight after the grace period were cut"),
    }
    Ok(())
}

/// One request: the answer, its metrics and its log line. A panic in a handler is a 500.
async fn respond(state: &AppState, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let (route, response) = match AssertUnwindSafe(crate::api::handle(state, request)).catch_unwind().await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::error!(%method, "a handler panicked");
            ("unmatched", Problem::new("internal", "the server failed to answer; this has been logged").into_response())
        }
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state.http_metrics().observe(&method, route, status, elapsed);
    tracing::info!(
        target: "ivr_server::access",
        %method,
        route,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response
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
            let deadline = tokio::time::Instant::now() + drain;
            let live = watcher.active_calls();
            if live > 0 {
                tracing::info!(live, ?drain, "following live calls until they end");
            }
            while watcher.active_calls() > 0 && tokio::time::Instant::now() < deadline {
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
