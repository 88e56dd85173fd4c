//! The load client of `scripts/status-load.sh` for what wrk cannot do: POST /api/v1/calls with
//! ivr's own share of each request, and requests paced at a fixed rate. `--connections`
//! kept-alive connections on one thread (as `wrk -t1`), for `--seconds`.
//!
//! ```text
//! IVR_LOAD_TOKEN=... cargo run --release --example api_load -- --url http://127.0.0.1:8000 [--connections 32] [--seconds 10] [--rate N]
//! IVR_LOAD_TOKEN=... cargo run --release --example api_load -- --url ... --rate 50000 --get IDS_FILE [--prefix /api/v1/status/]
//! ```
//!
//! Creates (the default): each answer's `Server-Timing: ari;dur=MS` says how long that request
//! waited on Asterisk to take the originate; the rest of the time the client saw (ivr, the
//! kernel, this client) is ivr's share, measured per request, not as a difference of two
//! percentiles. The numbers rotate over the fake's outcomes as `scripts/load.lua` does: four of
//! seven answer at once (and hang up after 1 s), one is busy, one rejects, one is unknown.
//!
//! `--get FILE`: GET `--prefix` + each id of FILE in turn instead (a server without tokens
//! ignores the bearer header, so the same run drives the baseline).
//!
//! Without `--rate` the connections run flat out: the machine saturates and, by Little's law,
//! every request takes about `connections / throughput`, most of it queueing wherever the
//! bottleneck is. With `--rate N` the connections together offer N requests a second, evenly
//! spread (each at its own fixed interval; under 5 ms, waited for to within microseconds by
//! yielding, so this client keeps a core busy), and a request the previous answer held past its slot is
//! counted from when it was due (as wrk2 does): at equal offered load the latency is the
//! server's, wherever the queue would sit flat out.
//!
//! It prints the answers by status, p50/p99 of the whole request and, for creates, of the ARI
//! part and of ivr's share; then a last line for scripts: `own_p99_ms=… total_p99_ms=…
//! ari_p99_ms=… rps=…`, or `total_p50_ms=… total_p99_ms=… rps=…` when no answer had an ARI part.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const NUMBERS: [&str; 7] =
    ["+15550000005", "+15550000005", "+15550000005", "+15550000005", "+15550000002", "+15550000006", "+15550009999"];

struct Options {
    url: String,
    token: String,
    connections: usize,
    seconds: u64,
    /// Requests per second offered by all connections together; `None`: as fast as answered.
    rate: Option<f64>,
    /// GET `prefix` + one of these ids (drawn in turn) instead of creating calls.
    get: Option<(String, Vec<String>)>,
}

fn options() -> Result<Options, String> {
    let mut url = None;
    let (mut connections, mut seconds, mut rate) = (32usize, 10u64, None);
    let (mut ids_file, mut prefix) = (None, "/api/v1/status/".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--connections" => connections = value.parse().map_err(|_| format!("--connections: {value:?}"))?,
            "--seconds" => seconds = value.parse().map_err(|_| format!("--seconds: {value:?}"))?,
            "--get" => ids_file = Some(value),
            "--prefix" => prefix = value,
            "--rate" => {
                rate = Some(value.parse::<f64>().ok().filter(|r| *r > 0.0).ok_or(format!("--rate: {value:?}"))?)
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    // A server without tokens (the baseline) ignores the header.
    let token = std::env::var("IVR_LOAD_TOKEN").unwrap_or_default();
    if connections == 0 || seconds == 0 {
        return Err("--connections and --seconds must be at least 1".into());
    }
    let get = match ids_file {
        Some(file) => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("--get {file}: {e}"))?;
            let ids: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
            if ids.is_empty() {
                return Err(format!("--get {file}: no ids in it"));
            }
            Some((prefix, ids))
        }
        None => None,
    };
    Ok(Options { url, token, connections, seconds, rate, get })
}

/// One answered request.
struct Sample {
    status: u16,
    total: Duration,
    /// From `Server-Timing`, when the answer had it.
    ari: Option<Duration>,
}

fn ari_time(headers: &hyper::HeaderMap) -> Option<Duration> {
    let text = headers.get("server-timing")?.to_str().ok()?;
    let ms: f64 = text.split(',').find_map(|metric| metric.trim().strip_prefix("ari;dur="))?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

/// One connection's closed loop until `until`; `first` staggers the numbers between connections.
async fn connection(options: &Options, first: usize, until: Instant) -> Result<Vec<Sample>, String> {
    let authority = options.url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let stream = TcpStream::connect(&authority).await.map_err(|e| format!("connect {authority}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut samples = Vec::new();
    let mut i = first;
    // With a rate: this connection's interval, its first slot staggered among the others'.
    let interval = options.rate.map(|rate| Duration::from_secs_f64(options.connections as f64 / rate));
    let mut due = Instant::now()
        + interval.map_or(Duration::ZERO, |every| every.mul_f64(first as f64 / options.connections as f64));
    while Instant::now() < until {
        // Whether the last answer came after this request was due: then the wait is the server's.
        let behind = interval.is_some() && Instant::now() > due;
        match interval {
            // Fast pacing needs the slot to within microseconds; slower pacing does not, and
            // spinning would take a core from the server under test.
            Some(every) if every < FINE_PACING_BELOW => wait_until(due).await,
            Some(_) => tokio::time::sleep_until(due.into()).await,
            None => {}
        }
        let request = match &options.get {
            Some((prefix, ids)) => {
                Request::get(format!("{prefix}{}", ids[i % ids.len()])).body(Full::new(Bytes::new()))
            }
            None => {
                let body = format!(r#"{{"phone_number": "{}"}}"#, NUMBERS[i % NUMBERS.len()]);
                Request::post("/api/v1/calls")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
            }
        };
        i += 1;
        let mut request = request.map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        headers.insert("host", authority.parse().map_err(|_| format!("{authority:?} is not a host"))?);
        headers.insert(
            "authorization",
            format!("Bearer {}", options.token).parse().map_err(|_| "IVR_LOAD_TOKEN is not a header value")?,
        );
        // Counted from when it was due if the server held it up, else from when it went out.
        let started = if behind { due } else { Instant::now() };
        if let Some(every) = interval {
            due += every;
        }
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        body.collect().await.map_err(|e| e.to_string())?;
        samples.push(Sample { status: parts.status.as_u16(), total: started.elapsed(), ari: ari_time(&parts.headers) });
    }
    Ok(samples)
}

/// Per-connection intervals below this are waited for by [`wait_until`]; longer ones by the timer.
const FINE_PACING_BELOW: Duration = Duration::from_millis(5);

/// Waits until `due` to within microseconds: tokio's timer (1 ms grain) for the bulk, then
/// yielding to the other connections until it is time.
async fn wait_until(due: Instant) {
    if let Some(far) = due.checked_duration_since(Instant::now()).filter(|d| *d > Duration::from_millis(2)) {
        tokio::time::sleep(far - Duration::from_millis(1)).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Prints one line of p50 and p99 and returns them, in milliseconds.
fn line(name: &str, mut values: Vec<Duration>) -> (f64, f64) {
    values.sort_unstable();
    let (p50, p99) = (percentile(&values, 50.0), percentile(&values, 99.0));
    println!("{name:<28} p50 {p50:>7.3} ms   p99 {p99:>7.3} ms   ({} requests)", values.len());
    (p50, p99)
}

fn main() {
    let options = options().unwrap_or_else(|e| {
        eprintln!("api_load: {e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let started = Instant::now();
    let until = started + Duration::from_secs(options.seconds);
    let results = runtime.block_on(async {
        let loops = (0..options.connections).map(|n| connection(&options, n, until));
        futures_util::future::join_all(loops).await
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for result in results {
        match result {
            Ok(mut s) => samples.append(&mut s),
            Err(e) => {
                eprintln!("api_load: a connection failed: {e}");
                std::process::exit(1)
            }
        }
    }
    let mut by_status = BTreeMap::new();
    for s in &samples {
        *by_status.entry(s.status).or_insert(0usize) += 1;
    }
    let rps = samples.len() as f64 / elapsed;
    let offered = options.rate.map_or("as fast as answered".to_owned(), |r| format!("{r:.0}/s offered"));
    println!(
        "{} requests in {elapsed:.1} s ({rps:.0}/s; {offered}) on {} connections; by status: {by_status:?}",
        samples.len(),
        options.connections
    );
    let (total_p50, total_p99) = line("whole request (client)", samples.iter().map(|s| s.total).collect());
    let timed: Vec<&Sample> = samples.iter().filter(|s| s.ari.is_some()).collect();
    if timed.is_empty() {
        // GETs, or no create was dialled at once: there is no ARI part to take out.
        println!("total_p50_ms={total_p50:.3} total_p99_ms={total_p99:.3} rps={rps:.0}");
        return;
    }
    let (_, ari_p99) = line("  of which ARI originate", timed.iter().filter_map(|s| s.ari).collect());
    let (_, own_p99) = line(
        "  ivr's share (whole − ARI)",
        timed.iter().map(|s| s.total.saturating_sub(s.ari.unwrap_or_default())).collect(),
    );
    println!("own_p99_ms={own_p99:.3} total_p99_ms={total_p99:.3} ari_p99_ms={ari_p99:.3} rps={rps:.0}");
}
