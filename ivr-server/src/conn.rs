//! One accepted TCP connection's IO, as hyper sees it: a stream whose writes may stall only so
//! long, and that is handed back when hyper is done with it so the close can linger.
//!
//! - [`WRITE_STALL`]: a client that stops reading (its receive window stays full) makes every
//!   write wait; after this long without progress the write fails and hyper drops the
//!   connection. A client that reads, however slowly, is never cut: each write that makes
//!   progress starts the bound again. Event streams are quiet, not stalled, and are unaffected.
//! - [`HeadWait`]: a request's head must arrive within the header-read timeout of when the
//!   server starts waiting for it (the connection's start, or the end of the previous answer);
//!   else [`HeadWait::expired`] completes and the server drops the connection. One timer per
//!   connection, looked at again only when it fires: hyper's own `header_read_timeout` makes
//!   and drops a timer entry for every request, about 1,000 of a cached status GET's 13,000
//!   instructions (callgrind).
//! - [`Served`]: the connection with what may end it early, the head wait's timeout and the
//!   server's shutdown (then it is asked to finish its request and close). Those two are looked
//!   at only when one of them woke the connection's task, not on every wake its IO causes:
//!   polling them each time, as a `select!` does, was about 3% of a cached status GET.
//! - [`linger`]: after the connection ends the server shuts its side (FIN), then reads and drops
//!   what the client still sends, up to [`LINGER_BYTES`] and for at most [`LINGER`], so that a
//!   last answer (a 431, a 503) is read by the client rather than lost to a TCP reset, as
//!   RFC 9112 section 9.6 advises.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

/// A streamed body (Server-Sent Events).
type Stream = UnsyncBoxBody<Bytes, Infallible>;

/// How long a write may wait on a client that does not read.
pub const WRITE_STALL: Duration = Duration::from_secs(30);
/// How long a closing connection is read and drained at most.
pub const LINGER: Duration = Duration::from_secs(2);
/// How much a closing connection may still send.
pub const LINGER_BYTES: usize = 256 * 1024;

/// The stream hyper serves (see the module doc).
pub struct Guarded {
    stream: Option<TcpStream>,
    back: Option<oneshot::Sender<TcpStream>>,
    /// Armed while a write waits; fires [`WRITE_STALL`] after the wait began.
    stall: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    /// The stream, and where it comes back once hyper drops it.
    pub fn new(stream: TcpStream) -> (Self, oneshot::Receiver<TcpStream>) {
        let (back, returned) = oneshot::channel();
        (Guarded { stream: Some(stream), back: Some(back), stall: None }, returned)
    }

    /// Runs one write-side poll of the stream under the stall bound.
    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(stream) = self.stream.as_mut() else { return Poll::Ready(Err(io::ErrorKind::NotConnected.into())) };
        match op(Pin::new(stream), cx) {
            Poll::Ready(result) => {
                self.stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
                if stall.as_mut().poll(cx).is_ready() {
                    tracing::debug!("a client stopped reading its answer; closing the connection");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            let _ = back.send(stream);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_shutdown(cx))
    }
}

/// Where one connection stands between requests (see the module doc). Its service counts each
/// head as it arrives ([`HeadWait::head_arrived`]) and each answer as it ends
/// ([`HeadWait::answered`]: a whole answer once made, as hyper takes it at once; a stream,
/// wrapped by [`HeadWait::track`], once hyper drops it). The connection waits for a head when
/// as many answers ended as heads arrived.
///
/// It is also counted in the server's number of connections still waiting for their first
/// head (which a shutdown gives a moment to arrive), until that head arrives or
/// [`HeadWait::ended`].
pub struct HeadWait {
    opened: Instant,
    heads: AtomicU64,
    answered: AtomicU64,
    /// When the last answer ended, in nanoseconds since `opened`.
    last_answer: AtomicU64,
    /// Counts this connection until its first head (`heads` 0 → 1) or its end.
    awaiting_first: Arc<AtomicUsize>,
}

impl HeadWait {
    /// A connection opened now, waiting for its first head, and counted in `awaiting_first`
    /// until it arrives.
    pub fn new(awaiting_first: &Arc<AtomicUsize>) -> Arc<Self> {
        awaiting_first.fetch_add(1, Ordering::SeqCst);
        Arc::new(HeadWait {
            opened: Instant::now(),
            heads: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
            awaiting_first: Arc::clone(awaiting_first),
        })
    }

    /// A head arrived: the wait is over until its answer ends.
    pub fn head_arrived(&self) {
        if self.heads.fetch_add(1, Ordering::Relaxed) == 0 {
            self.awaiting_first.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The connection is over (called once, after its last head): it no longer waits for a
    /// first head, if it never had one.
    pub fn ended(&self) {
        if self.heads.load(Ordering::Relaxed) == 0 {
            self.awaiting_first.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The answer to the head that arrived last ended `at`: the wait for the next head starts.
    pub fn answered(&self, at: Instant) {
        let since = u64::try_from(at.saturating_duration_since(self.opened).as_nanos()).unwrap_or(u64::MAX);
        self.last_answer.store(since, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Release);
    }

    /// A streamed answer to the head that arrived last, which has [`answered`](Self::answered)
    /// when hyper drops it.
    pub fn track(self: &Arc<Self>, body: Stream) -> Tracked {
        Tracked { body, wait: Arc::clone(self) }
    }

    /// Since when the connection has been waiting for a head; `None` while it is answering.
    fn waiting_since(&self) -> Option<Instant> {
        let answered = self.answered.load(Ordering::Acquire);
        (self.heads.load(Ordering::Relaxed) == answered)
            .then(|| self.opened + Duration::from_nanos(self.last_answer.load(Ordering::Relaxed)))
    }

    /// Completes once the connection has waited `timeout` for a head.
    pub async fn expired(&self, timeout: Duration) {
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let next = match self.waiting_since() {
                Some(since) if since + timeout <= Instant::now() => return,
                Some(since) => since + timeout,
                // Answering (an event stream may take hours): look again a timeout from now.
                None => Instant::now() + timeout,
            };
            sleep.as_mut().reset(next);
        }
    }
}

/// A streamed answer's body, which marks the end of the answer when hyper drops it (once it is
/// written, or the connection ends).
pub struct Tracked {
    body: Stream,
    wait: Arc<HeadWait>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.wait.answered(Instant::now());
    }
}

/// What ended a connection early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No request head within the header-read timeout ([`HeadWait::expired`]).
    HeadTimeout,
    /// The server is shutting down: the connection finishes its request and closes.
    Stopping,
}

/// A connection being served until it ends, or its head wait times out (see the module doc).
pub struct Served<C> {
    connection: Pin<Box<C>>,
    /// Completes with what cuts the connection short; `None` once the shutdown was passed on.
    cuts: Option<Pin<Box<dyn Future<Output = Cut> + Send>>>,
    /// Set when `cuts` woke the task.
    woken: Arc<Woken>,
    /// `woken` as a waker, made once.
    waker: Waker,
}

/// A waker for the futures beside the connection: notes that it was them, and wakes the task.
struct Woken {
    flag: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<C: GracefulConnection> Served<C> {
    /// Serves `connection` until it ends, or until `cuts` completes: with [`Cut::HeadTimeout`]
    /// it is dropped, with [`Cut::Stopping`] asked to finish its request and close.
    pub fn new(connection: C, cuts: impl Future<Output = Cut> + Send + 'static) -> Self {
        let woken = Arc::new(Woken { flag: AtomicBool::new(true), task: AtomicWaker::new() });
        Served {
            connection: Box::pin(connection),
            cuts: Some(Box::pin(cuts)),
            waker: Waker::from(Arc::clone(&woken)),
            woken,
        }
    }
}

impl<C: GracefulConnection> Future for Served<C> {
    /// The connection's own end, or [`Cut::HeadTimeout`].
    type Output = Result<Result<(), C::Error>, Cut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(ended) = this.connection.as_mut().poll(cx) {
                return Poll::Ready(Ok(ended));
            }
            // Registered before the flag is read, so a wake in between is not lost.
            this.woken.task.register(cx.waker());
            let Some(cuts) = this.cuts.as_mut() else { return Poll::Pending };
            if !this.woken.flag.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            match cuts.as_mut().poll(&mut Context::from_waker(&this.waker)) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Cut::HeadTimeout) => return Poll::Ready(Err(Cut::HeadTimeout)),
                Poll::Ready(Cut::Stopping) => {
                    // hyper closes an idle connection at once, and a busy one after its
                    // answer; the connection is polled again for it to act.
                    this.cuts = None;
                    this.connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Ends our side of a finished connection, then drops what the client still sends, within
/// [`LINGER`] and [`LINGER_BYTES`].
pub async fn linger(returned: oneshot::Receiver<TcpStream>) {
    let Ok(mut stream) = returned.await else { return };
    let drain = async {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 8192];
        let mut read = 0;
        while read < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
