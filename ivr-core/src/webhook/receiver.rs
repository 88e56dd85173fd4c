//! A status-callback receiver for tests (feature `testing`): a tiny HTTP server on port 0
//! that records every request and answers as its script says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// When it came, on tokio's clock (paused in a test, it tells the backoff).
    pub at: Instant,
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How to answer a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    /// Never answer (a receiver that hangs, or an ivr killed while waiting).
    Hang,
}

type Script = Box<dyn Fn(usize, &Received) -> Answer + Send + Sync>;

struct Shared {
    received: Mutex<Vec<Received>>,
    script: Mutex<Script>,
    arrived: Notify,
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Listens on 127.0.0.1, port 0; `script(n, request)` answers the `n`th request (0-based).
    pub async fn start(script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("an address"), script).await
    }

    /// Listens on `addr` (a receiver restarted where it was).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            received: Mutex::default(),
            script: Mutex::new(Box::new(script)),
            arrived: Notify::new(),
        });
        let accept = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&accept);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(answer(&shared, req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Receiver { addr, shared, task })
    }

    /// Answers from now on with `script`.
    pub fn set_script(&self, script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static) {
        *self.shared.script.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(script);
    }

    /// `host:port`, for WEBHOOK_ALLOWED_HOSTS.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `n` requests came (at most `limit`), and returns them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let wait = async {
            loop {
                let arrived = self.shared.arrived.notified();
                let received = self.received();
                if received.len() >= n {
                    return received;
                }
                arrived.await;
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(received) => received,
            Err(_) => {
                let got: Vec<String> = self
                    .received()
                    .iter()
                    .map(|r| {
                        serde_json::from_slice::<serde_json::Value>(&r.body)
                            .map(|b| b["type"].to_string())
                            .unwrap_or_default()
                    })
                    .collect();
                panic!("the receiver got {} requests within {limit:?}, not {n}: {got:?}", got.len())
            }
        }
    }
}

async fn answer(shared: &Shared, req: hyper::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let received = Received {
        at: Instant::now(),
        method: parts.method.to_string(),
        target: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let decision = {
        let mut all = shared.received.lock().unwrap_or_else(|e| e.into_inner());
        let n = all.len();
        all.push(received.clone());
        let script = shared.script.lock().unwrap_or_else(|e| e.into_inner());
        script(n, &received)
    };
    shared.arrived.notify_waiters();
    match decision {
        Answer::Status(code) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if (300..400).contains(&code) {
                response.headers_mut().insert("location", hyper::header::HeaderValue::from_static("/elsewhere"));
            }
            response
        }
        Answer::Hang => std::future::pending().await,
    }
}
