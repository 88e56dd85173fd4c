//! The baseline of the status-path load benchmark: the smallest hyper 1.x server that answers
//! every request with one fixed JSON body, on the same stack as ivr-server (tokio's
//! multi-threaded runtime, hyper's HTTP/1.1 connection, hyper-util's TokioIo). Whatever it
//! reaches on a machine is that machine's limit for the request shape; ivr is measured as a
//! ratio to it in the same run (`scripts/status-load.sh`).
//!
//! ```text
//! cargo run --release --example baseline_http -- [--port 0] [--bytes 900] [--bodies 1]
//! ```
//!
//! It prints `listening on 127.0.0.1:PORT` and serves until killed. `--bodies N` keeps N bodies
//! of that size, each its own allocation, and answers a path with the one its hash picks: a
//! server that, like ivr with 2,000 calls, copies its answers from memory all over rather than
//! from one hot body (not the benchmark's baseline; a way to see what that costs).

use std::convert::Infallible;
use std::io::Write as _;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A JSON object of exactly `bytes` bytes (at least the 10 of its frame).
fn body_of(bytes: usize) -> Bytes {
    let frame = r#"{"pad":""}"#.len();
    let pad = "x".repeat(bytes.saturating_sub(frame));
    Bytes::from(format!(r#"{{"pad":"{pad}"}}"#))
}

/// FNV-1a: cheap, and spreads ids over the bodies.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn parse_args() -> Result<(u16, usize, usize), String> {
    let (mut port, mut bytes, mut bodies) = (0u16, 900usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => port = value.parse().map_err(|_| format!("--port: {value:?} is not a port"))?,
            "--bytes" => bytes = value.parse().map_err(|_| format!("--bytes: {value:?} is not a size"))?,
            "--bodies" => {
                bodies = value.parse().ok().filter(|n| *n > 0).ok_or(format!("--bodies: {value:?} is not a count"))?
            }
            _ => {
                return Err(format!(
                    "unknown argument {flag:?}; usage: baseline_http [--port P] [--bytes N] [--bodies N]"
                ))
            }
        }
    }
    Ok((port, bytes, bodies))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (port, bytes, bodies) = parse_args().unwrap_or_else(|e| {
        eprintln!("baseline_http: {e}");
        std::process::exit(2)
    });
    // Each body made anew, in an allocation of its own.
    let bodies: std::sync::Arc<[Bytes]> = (0..bodies).map(|_| body_of(bytes)).collect();
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                // One body (the benchmark's baseline): no hash on its path.
                let body = match bodies.len() {
                    1 => bodies[0].clone(),
                    n => bodies[fnv1a(request.uri().path().as_bytes()) as usize % n].clone(),
                };
                let mut response = Response::new(Full::new(body));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
