//! HTTP/1.1 connections to ARI: at most `limit` open at once, reused while they stay open.
//!
//! Asterisk admits `sessionlimit` HTTP sessions and closes any connection beyond them before
//! answering, so the number of *connections* must be bounded, not only the requests in flight.
//! A general-purpose pool (hyper-util's, which reqwest uses) opens a new connection whenever
//! none is idle at the instant a request starts, even if one is about to come back, so a
//! burst opens more connections than it has requests in flight.
//!
//! Here each open connection holds one of `limit` permits, from before it is made until it
//! has closed (its driver task ends), so a request dropped half-way (its caller gave up) frees
//! its permit only once its connection is really gone. A request takes an idle connection, or
//! opens one when a permit is free, or waits for whichever comes first.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpStream;

use tokio::sync::{Notify, Semaphore};
use tokio::time::{timeout_at, Instant};

use super::AriError;

/// An idle connection is not reused after this long: Asterisk closes idle sessions after
/// `session_keep_alive` (15 s by default), and a request on a connection it is closing
/// would fail.
const IDLE_MAX: Duration = Duration::from_secs(10);

pub(crate) struct Pool {
    /// `host:port`, for connecting.
    addr: String,
    connect_timeout: Duration,
    limit: usize,
    /// One per open connection, held by its driver task.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Told when a connection goes back to the idle list.
    returned: Notify,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(addr: String, limit: usize, connect_timeout: Duration) -> Pool {
        Pool {
            addr,
            connect_timeout,
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
        }
    }

    /// Sends `request` and reads the whole answer, all within `timeout`: the wait for a free
    /// connection, the connect, the send and the answer.
    pub async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), AriError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => match timeout_at(deadline, self.free_connection()).await {
                    Ok(Some(permit)) => (self.connect(permit, deadline).await?, false),
                    // One went back to the idle list: take it (or, if another request was
                    // quicker, wait again).
                    Ok(None) => continue,
                    Err(_) => return Err(AriError::NoFreeConnection { limit: self.limit, waited: timeout }),
                },
            };
            match timeout_at(deadline, sender.ready()).await {
                Err(_) => return Err(AriError::Timeout(timeout)),
                // An idle connection Asterisk closed meanwhile: take another.
                Ok(Err(_)) if reused => continue,
                Ok(Err(e)) => return Err(AriError::Transport(describe(&e))),
                Ok(Ok(())) => {}
            }
            let response = match timeout_at(deadline, sender.try_send_request(request)).await {
                Err(_) => return Err(AriError::Timeout(timeout)),
                Ok(Ok(response)) => response,
                Ok(Err(mut e)) => match e.take_message() {
                    // Not written at all (the connection closed first): safe to send again.
                    Some(unsent) if reused => {
                        request = unsent;
                        continue;
                    }
                    _ => return Err(AriError::Transport(describe(e.error()))),
                },
            };
            let status = response.status();
            let body = match timeout_at(deadline, response.into_body().collect()).await {
                Err(_) => return Err(AriError::Timeout(timeout)),
                Ok(Err(e)) => return Err(AriError::Transport(describe(&e))),
                Ok(Ok(body)) => body.to_bytes(),
            };
            self.put_idle(sender);
            return Ok((status, body));
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // Each critical section is one push or pop; a poisoned list is still a list.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open and fresh.
    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle();
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_MAX {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if !sender.is_closed() {
            self.idle().push(Idle { sender, since: Instant::now() });
            self.returned.notify_one();
        }
    }

    /// A permit for a new connection, or `None` when an idle connection may be available.
    async fn free_connection(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            // The semaphore is never closed; a closed one would mean no new connection.
            permit = self.permits.clone().acquire_owned() => permit.ok(),
            () = self.returned.notified() => None,
        }
    }

    async fn connect(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Result<SendRequest<Full<Bytes>>, AriError> {
        let connect_by = deadline.min(Instant::now() + self.connect_timeout);
        let stream = match timeout_at(connect_by, TcpStream::connect(&self.addr)).await {
            Err(_) if connect_by < deadline => {
                return Err(AriError::Connect(format!(
                    "{}: no connection within {:?}",
                    self.addr, self.connect_timeout
                )))
            }
            // The request's own time ran out first.
            Err(_) => return Err(AriError::Timeout(deadline.saturating_duration_since(Instant::now()))),
            Ok(Err(e)) => return Err(AriError::Connect(format!("{}: {e}", self.addr))),
            Ok(Ok(stream)) => stream,
        };
        // Requests are small and answered at once: do not wait to fill a segment.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AriError::Connect(format!("{}: {}", self.addr, describe(&e))))?;
        // Drives the connection until it closes (Asterisk hangs up, or the sender is dropped:
        // after a failure, past IDLE_MAX, or with a request given up half-way); only then is
        // its permit free for another.
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
        Ok(sender)
    }
}

/// An error with its causes, e.g. "connection closed before message completed".
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
