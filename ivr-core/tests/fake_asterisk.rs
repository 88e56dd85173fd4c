//! The fake Asterisk against the recordings of a real one.
//!
//! Each test replays one transcript of `tests/transcripts/` against a fresh [`FakeAsterisk`]: the
//! same HTTP requests (plain reqwest), the same WebSocket connections (plain tokio-tungstenite),
//! the same restart, in the recorded order. The transcript is the oracle, read at test time:
//!
//! - every HTTP answer must have the recorded status and (normalized) body, and error answers the
//!   recorded `WWW-Authenticate`, `Allow`, `Content-type`, `Server` and `Content-Length` headers;
//! - on every connection, each channel's events must be the recorded ones, in the recorded order,
//!   compared as whole JSON objects after normalization.
//!
//! **When** to send a request: a request is sent once the fake has delivered, for every channel,
//! as many events as the recording had received by the time the request went out, and then after
//! the recorded gap (scaled). GET requests are repeated until they give the recorded answer (or
//! fail after a deadline), since their answer depends on timing only, never the reverse.
//!
//! **Normalization** (applied to both sides, so nothing is edited in one side only):
//! - times (`timestamp`, `creationtime`, `startup_time`, `last_reload_time`) become `<time>`;
//!   a restart must still change `startup_time` when the recording shows it changing;
//! - the 8-hex-digit number in channel names (`Local/…@sim-0000000e;1`), the SIP Call-ID in
//!   `protocol_id`, and playback ids (numbered by first appearance) are replaced by placeholders;
//! - the values of the `RTPAUDIOQOS*` variables (RTP statistics) become `<qos>`;
//! - `Dial` events lose `peer.state`: it only tells whether the Dial came before or after the
//!   concurrent ChannelStateChange, an order the README says varies between runs;
//! - for the same reason, within a run of adjacent `Dial`/`ChannelStateChange` events of one
//!   channel, state changes are put first (each type keeping its own order);
//! - `DeviceStateChanged` events are dropped: they concern devices, not channels, and the fake
//!   does not model device state.
//!
//! Events of different channels are compared per channel, never across channels: the README
//! says the relative order of the two Local halves varies between runs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

/// The longest any single wait may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

/// The recordings live beside this test (`tests/transcripts/`, a copy of the team's
/// `ari-transcripts`), so a clone anywhere replays them.
fn transcripts_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/transcripts"))
}

fn load(name: &str) -> Vec<Value> {
    let path = transcripts_dir().join(format!("{name}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the ARI transcript {} ({e}). The transcripts are the oracle of these tests \
             and are kept in the repository",
            path.display()
        )
    });
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad JSON line {l}: {e}", path.display())))
        .collect()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn start(scale: f64) -> FakeAsterisk {
    FakeAsterisk::start_with(FakeConfig { time_scale: scale, ..FakeConfig::default() })
        .await
        .expect("fake Asterisk starts")
}

// Normalization ------------------------------------------------------------------------------

/// Replaces what differs between runs by placeholders (see the module docs).
struct Normalizer {
    playbacks: HashMap<String, String>,
}

impl Normalizer {
    fn new() -> Normalizer {
        Normalizer { playbacks: HashMap::new() }
    }

    fn value(&mut self, v: &Value) -> Value {
        match v {
            Value::Array(items) => Value::Array(items.iter().map(|i| self.value(i)).collect()),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let v = match (k.as_str(), v) {
                        ("timestamp" | "creationtime" | "startup_time" | "last_reload_time", _) => json!("<time>"),
                        ("name", Value::String(name)) if map.contains_key("dialplan") => json!(channel_name(name)),
                        ("protocol_id", Value::String(p)) if !p.is_empty() => json!("<call-id>"),
                        ("id", Value::String(id)) if map.contains_key("media_uri") => {
                            let n = self.playbacks.len() + 1;
                            json!(self.playbacks.entry(id.clone()).or_insert_with(|| format!("<playback {n}>")).clone())
                        }
                        _ => self.value(v),
                    };
                    out.insert(k.clone(), v);
                }
                if out.get("type").and_then(Value::as_str) == Some("Dial") {
                    if let Some(peer) = out.get_mut("peer").and_then(Value::as_object_mut) {
                        peer.remove("state");
                    }
                }
                let is_qos = out.get("variable").and_then(Value::as_str).is_some_and(|v| v.starts_with("RTPAUDIOQOS"));
                if is_qos && out.get("type").and_then(Value::as_str) == Some("ChannelVarset") {
                    out.insert("value".into(), json!("<qos>"));
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

/// `Local/+1555@sim-0000000e;1` → `Local/+1555@sim-XXXXXXXX;1`.
fn channel_name(name: &str) -> String {
    if let Some(dash) = name.rfind('-') {
        let tail = &name[dash + 1..];
        let hex: String = tail.chars().take_while(char::is_ascii_hexdigit).collect();
        if hex.len() == 8 {
            return format!("{}-XXXXXXXX{}", &name[..dash], &tail[8..]);
        }
    }
    name.to_string()
}

/// Which channel an event belongs to: its channel, the Dial peer, or the playback's target.
fn channel_of(ev: &Value) -> String {
    if let Some(id) = ev.pointer("/channel/id").or_else(|| ev.pointer("/peer/id")).and_then(Value::as_str) {
        return id.to_string();
    }
    if let Some(target) = ev.pointer("/playback/target_uri").and_then(Value::as_str) {
        return target.trim_start_matches("channel:").to_string();
    }
    "(no channel)".to_string()
}

fn ignored(ev: &Value) -> bool {
    ev["type"] == "DeviceStateChanged"
}

/// The events of each channel, normalized, with Dial/ChannelStateChange runs in canonical order.
fn per_channel(events: &[Value], norm: &mut Normalizer) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ev in events.iter().filter(|e| !ignored(e)) {
        out.entry(channel_of(ev)).or_default().push(norm.value(ev));
    }
    for seq in out.values_mut() {
        let mut i = 0;
        while i < seq.len() {
            let in_run = |e: &Value| e["type"] == "Dial" || e["type"] == "ChannelStateChange";
            let mut j = i;
            while j < seq.len() && in_run(&seq[j]) {
                j += 1;
            }
            if j > i {
                seq[i..j].sort_by_key(|e| e["type"] != "ChannelStateChange");
                i = j;
            } else {
                i += 1;
            }
        }
    }
    out
}

fn summary(ev: &Value) -> String {
    let mut s = ev["type"].as_str().unwrap_or("?").to_string();
    for (label, ptr) in [
        ("state", "/channel/state"),
        ("dialstatus", "/dialstatus"),
        ("app", "/dialplan_app"),
        ("var", "/variable"),
        ("value", "/value"),
        ("cause", "/cause"),
        ("soft", "/soft"),
        ("tech_cause", "/tech_cause"),
        ("playback", "/playback/state"),
    ] {
        if let Some(v) = ev.pointer(ptr) {
            s.push_str(&format!(" {label}={v}"));
        }
    }
    s
}

fn compare_sequences(what: &str, expected: &[Value], actual: &[Value]) {
    if expected == actual {
        return;
    }
    let first = expected.iter().zip(actual).position(|(e, a)| e != a).unwrap_or(expected.len().min(actual.len()));
    let lines = |seq: &[Value]| seq.iter().map(|e| format!("    {}", summary(e))).collect::<Vec<_>>().join("\n");
    panic!(
        "{what}: the fake differs from the recording at event #{first}\n  recorded:\n{}\n  fake:\n{}\n  \
         recorded #{first}: {}\n  fake #{first}: {}",
        lines(expected),
        lines(actual),
        expected.get(first).map_or("(none)".into(), Value::to_string),
        actual.get(first).map_or("(none)".into(), Value::to_string),
    );
}

// Event sockets ------------------------------------------------------------------------------

#[derive(Default)]
struct Received {
    events: Vec<Value>,
    /// `Some(Some(code))` after a close frame, `Some(None)` after a drop without one (1006).
    closed: Option<Option<u16>>,
}

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

struct Socket {
    received: Arc<Mutex<Received>>,
    sink: Sink,
    reader: JoinHandle<()>,
}

fn ws_url(fake: &FakeAsterisk, query: &Value) -> String {
    let pairs: Vec<String> = query
        .as_object()
        .map(|q| q.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect())
        .unwrap_or_default();
    format!("ws://{}/ari/events?{}", fake.addr(), pairs.join("&"))
}

async fn open_socket(fake: &FakeAsterisk, query: &Value) -> Result<Socket, tungstenite::Error> {
    let (ws, _) = timeout(STEP, tokio_tungstenite::connect_async(ws_url(fake, query)))
        .await
        .expect("WebSocket connect in time")?;
    let (sink, mut stream) = ws.split();
    let received = Arc::new(Mutex::new(Received::default()));
    let log = received.clone();
    let reader = tokio::spawn(async move {
        loop {
            let msg = stream.next().await;
            let mut r = log.lock().unwrap();
            match msg {
                Some(Ok(Message::Text(text))) => {
                    r.events.push(serde_json::from_str(&text).expect("events are JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    r.closed = Some(Some(frame.map_or(1005, |f| u16::from(f.code))));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    r.closed.get_or_insert(None);
                    return;
                }
            }
        }
    });
    Ok(Socket { received, sink, reader })
}

// Replay ---------------------------------------------------------------------------------------

struct Replay {
    name: &'static str,
    fake: FakeAsterisk,
    scale: f64,
    records: Vec<Value>,
    http: reqwest::Client,
    sockets: BTreeMap<String, Socket>,
    /// Normalizers of the recorded and the fake side (playback ids are numbered per side).
    norm: (Normalizer, Normalizer),
    restart: Option<(JoinHandle<()>, Instant, f64)>,
    startup_times: (Vec<String>, Vec<String>),
}

/// Replays transcript `name` against `fake` (already configured), checking everything recorded.
async fn replay(name: &'static str, fake: FakeAsterisk) {
    let scale = fake.time_scale();
    let mut r = Replay {
        name,
        records: load(name),
        fake: fake.clone(),
        scale,
        http: reqwest::Client::new(),
        sockets: BTreeMap::new(),
        norm: (Normalizer::new(), Normalizer::new()),
        restart: None,
        startup_times: (Vec::new(), Vec::new()),
    };
    r.run().await;
    for (_, socket) in std::mem::take(&mut r.sockets) {
        let mut sink = socket.sink;
        let _ = timeout(STEP, sink.close()).await;
        socket.reader.abort();
    }
    timeout(STEP, fake.shutdown()).await.expect("shutdown in time");
}

impl Replay {
    /// The recorded events of each connection, per channel, received at or before `t`.
    fn recorded_counts(&self, until: f64) -> (BTreeMap<(String, String), usize>, f64) {
        let mut counts = BTreeMap::new();
        let mut last = 0.0f64;
        for rec in &self.records {
            let t = rec["t"].as_f64().unwrap_or(0.0);
            if rec["kind"] == "ws" && t <= until && !ignored(&rec["event"]) {
                let conn = rec["conn"].as_str().unwrap_or_default().to_string();
                *counts.entry((conn, channel_of(&rec["event"]))).or_insert(0) += 1;
                last = last.max(t);
            }
        }
        (counts, last)
    }

    fn delivered_counts(&self) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for (conn, socket) in &self.sockets {
            for ev in socket.received.lock().unwrap().events.iter().filter(|e| !ignored(e)) {
                *counts.entry((conn.clone(), channel_of(ev))).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Waits until the fake has delivered what the recording had received by `t`, then for the
    /// rest of the recorded gap (scaled).
    async fn catch_up(&self, t: f64, previous: f64) {
        let (wanted, last_event) = self.recorded_counts(t);
        let deadline = Instant::now() + STEP;
        loop {
            let have = self.delivered_counts();
            let missing: Vec<_> = wanted.iter().filter(|(k, n)| have.get(*k).copied().unwrap_or(0) < **n).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: before the step at t={t} the fake still lacks events (connection, channel) → recorded count: {missing:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gap = t - last_event.max(previous);
        if gap > 0.0 {
            tokio::time::sleep(secs(gap * self.scale)).await;
        }
    }

    async fn run(&mut self) {
        let records = self.records.clone();
        let mut previous = 0.0;
        for rec in &records {
            let t = rec["t_sent"].as_f64().or(rec["t"].as_f64()).unwrap_or(0.0);
            match rec["kind"].as_str().unwrap_or_default() {
                "ws_open" => {
                    // `ws_open` is stamped when the handshake has completed, and what the opening
                    // causes (ApplicationReplaced on the older socket) may be stamped a moment
                    // before it: wait only for what came clearly earlier.
                    self.catch_up(t - 0.005, previous).await;
                    let conn = rec["conn"].as_str().unwrap_or_default().to_string();
                    let socket = open_socket(&self.fake, &rec["query"])
                        .await
                        .unwrap_or_else(|e| panic!("{}: {conn}: {e}", self.name));
                    self.sockets.insert(conn, socket);
                }
                "ws_error" => {
                    self.catch_up(t, previous).await;
                    self.refused_socket(rec).await;
                }
                "http" => {
                    self.catch_up(t, previous).await;
                    self.http(rec).await;
                }
                "note" if rec["text"].as_str().is_some_and(|s| s.contains("core restart now")) => {
                    self.catch_up(t, previous).await;
                    let fake = self.fake.clone();
                    self.restart = Some((tokio::spawn(async move { fake.restart().await }), Instant::now(), t));
                }
                "ws_close" if rec["code"] == 1006 => {
                    let conn = rec["conn"].as_str().unwrap_or_default();
                    self.dropped(conn, t).await;
                }
                _ => continue,
            }
            previous = t;
        }
        self.compare_events().await;
        if self.startup_times.0.windows(2).any(|w| w[0] != w[1]) {
            assert!(
                self.startup_times.1.windows(2).any(|w| w[0] != w[1]),
                "{}: startup_time changed in the recording but not in the fake: {:?}",
                self.name,
                self.startup_times.1
            );
        }
    }

    /// A socket the recording saw dropped without a close frame (restart).
    async fn dropped(&mut self, conn: &str, t: f64) {
        let socket = self.sockets.get(conn).unwrap_or_else(|| panic!("{}: no connection {conn}", self.name));
        let received = socket.received.clone();
        let deadline = Instant::now() + STEP * 3;
        loop {
            if let Some(closed) = received.lock().unwrap().closed {
                assert_eq!(closed, None, "{}: {conn} must drop without a close frame (1006)", self.name);
                break;
            }
            assert!(Instant::now() < deadline, "{}: {conn} was not dropped", self.name);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some((task, started, t_note)) = self.restart.take() {
            // The restart must take about as long as recorded: check the lower bound only.
            let took = started.elapsed();
            let recorded = secs((t - t_note) * self.scale);
            assert!(
                took >= recorded.mul_f64(0.8),
                "{}: the socket dropped after {took:?}, recorded {recorded:?}",
                self.name
            );
            timeout(STEP, task).await.expect("restart ends in time").expect("restart task");
        }
    }

    async fn refused_socket(&mut self, rec: &Value) {
        let conn = rec["conn"].as_str().unwrap_or_default();
        match open_socket(&self.fake, &rec["query"]).await {
            Ok(_) => panic!("{}: {conn}: the upgrade must be refused", self.name),
            Err(tungstenite::Error::Http(resp)) => {
                let what = format!("{}: {conn}", self.name);
                assert_eq!(resp.status().as_u16(), rec["status"].as_u64().unwrap_or(0) as u16, "{what}: status");
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
                let expected = match &rec["body"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                assert_eq!(body, expected, "{what}: body");
                check_headers(&what, &rec["headers"], resp.headers());
            }
            Err(e) => panic!("{}: {conn}: expected an HTTP refusal, got {e}", self.name),
        }
    }

    async fn http(&mut self, rec: &Value) {
        let method = reqwest::Method::from_bytes(rec["method"].as_str().unwrap_or("GET").as_bytes()).expect("method");
        let path = rec["path"].as_str().unwrap_or_default();
        let query: Vec<(String, String)> = rec["query"]
            .as_object()
            .map(|q| q.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default();
        let what = format!("{}: {} {path} {query:?}", self.name, rec["method"].as_str().unwrap_or_default());
        let expected_status = rec["status"].as_u64().unwrap_or(0) as u16;
        let expected_body = self.norm.0.value(&rec["body"]);
        if path == "/ari/asterisk/info" {
            if let Some(s) = rec.pointer("/body/status/startup_time").and_then(Value::as_str) {
                self.startup_times.0.push(s.to_string());
            }
        }
        // Only GETs are repeated: their answer may lag the recorded one by scheduling jitter.
        let deadline = Instant::now() + STEP;
        loop {
            let mut request =
                self.http.request(method.clone(), format!("http://{}{path}", self.fake.addr())).query(&query);
            request = match rec["auth"].as_str() {
                None => request.basic_auth(self.fake.username(), Some(self.fake.password())),
                Some("none") => request,
                Some(cred) => {
                    let (user, pass) = cred.split_once(':').unwrap_or((cred, ""));
                    request.basic_auth(user, Some(pass))
                }
            };
            let resp = timeout(STEP, request.send())
                .await
                .expect("HTTP answer in time")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let text = timeout(STEP, resp.text()).await.expect("body in time").expect("body");
            let raw: Value =
                if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
            let body = self.norm.1.value(&raw);
            if status == expected_status && body == expected_body {
                if status >= 400 {
                    check_headers(&what, &rec["headers"], &headers);
                }
                if let Some(s) = raw.pointer("/status/startup_time").and_then(Value::as_str) {
                    self.startup_times.1.push(s.to_string());
                }
                return;
            }
            if method != reqwest::Method::GET || Instant::now() > deadline {
                panic!("{what}\n  recorded: {expected_status} {expected_body}\n  fake:     {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for every recorded event, lets extra ones arrive, and compares per channel.
    async fn compare_events(&mut self) {
        let (wanted, _) = self.recorded_counts(f64::INFINITY);
        let deadline = Instant::now() + STEP;
        while wanted.iter().any(|(k, n)| self.delivered_counts().get(k).copied().unwrap_or(0) < *n)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Anything the fake sends beyond the recording would come now.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let conns: Vec<String> = self
            .records
            .iter()
            .filter(|r| r["kind"] == "ws_open")
            .filter_map(|r| r["conn"].as_str().map(String::from))
            .collect();
        for conn in conns {
            let recorded: Vec<Value> = self
                .records
                .iter()
                .filter(|r| r["kind"] == "ws" && r["conn"] == conn.as_str())
                .map(|r| r["event"].clone())
                .collect();
            let delivered =
                self.sockets.get(&conn).map(|s| s.received.lock().unwrap().events.clone()).unwrap_or_default();
            let expected = per_channel(&recorded, &mut self.norm.0);
            let actual = per_channel(&delivered, &mut self.norm.1);
            let channels: Vec<&String> = expected.keys().chain(actual.keys()).collect();
            for channel in channels {
                compare_sequences(
                    &format!("{}: connection {conn}, channel {channel}", self.name),
                    expected.get(channel).map_or(&[][..], Vec::as_slice),
                    actual.get(channel).map_or(&[][..], Vec::as_slice),
                );
            }
        }
    }
}

fn check_headers(what: &str, recorded: &Value, actual: &reqwest::header::HeaderMap) {
    let Some(recorded) = recorded.as_object() else { return };
    for (name, value) in recorded {
        if ["www-authenticate", "allow", "content-type", "server", "content-length"]
            .contains(&name.to_ascii_lowercase().as_str())
        {
            let got = actual.get(name.as_str()).and_then(|v| v.to_str().ok());
            assert_eq!(got, value.as_str(), "{what}: header {name}");
        }
    }
}

// One test per transcript -------------------------------------------------------------------------

/// Most scenarios run 20 times faster than recorded.
const FAST: f64 = 0.05;
/// Scenarios that poll `GET /channels/{id}` through dialplan steps 0.4 s apart without events to
/// pace the requests: 10 times faster leaves 40 ms of slack on a loaded machine.
const POLLED: f64 = 0.1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_app() {
    replay("answered_app", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_app_subscribeall() {
    replay("answered_app_subscribeall", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_dialplan() {
    replay("answered_dialplan", start(POLLED).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_dialplan_subscribe() {
    replay("answered_dialplan_subscribe", start(POLLED).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_dialplan_subscribeall() {
    replay("answered_dialplan_subscribeall", start(POLLED).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_pjsip() {
    // SIPp's built-in `uas`: the default plan of `callee`.
    replay("answered_pjsip", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_play() {
    replay("answered_play", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_play_pjsip() {
    replay("answered_play_pjsip", start(0.02).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_play_short() {
    replay("answered_play_short", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_restart() {
    replay("asterisk_restart", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_restart_after_duplicate_channel_id() {
    // Recorded right after duplicate_channel_id: one originate refused with 409 first.
    let fake = start(0.02).await;
    let http = reqwest::Client::new();
    let id = "0b8f3d0e-0000-4000-8000-00000000dup1";
    let originate = || {
        http.post(format!("{}/channels", fake.http_url()))
            .basic_auth(fake.username(), Some(fake.password()))
            .query(&[("endpoint", "Local/+15550000004@sim"), ("app", "ivr"), ("channelId", id)])
            .send()
    };
    assert_eq!(timeout(STEP, originate()).await.unwrap().unwrap().status(), 200);
    assert_eq!(timeout(STEP, originate()).await.unwrap().unwrap().status(), 409);
    let hangup =
        http.delete(format!("{}/channels/{id}", fake.http_url())).basic_auth(fake.username(), Some(fake.password()));
    assert_eq!(timeout(STEP, hangup.send()).await.unwrap().unwrap().status(), 204);
    replay("asterisk_restart_after_duplicate_channel_id", fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_auth() {
    replay("bad_auth", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoint() {
    replay("bad_endpoint", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoint_pjsip() {
    replay("bad_endpoint_pjsip", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy() {
    replay("busy", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pjsip() {
    let fake = start(FAST).await;
    // sipp/uas_busy.xml: 180, 1 s, 486.
    fake.set_plan("callee", CalleePlan::Busy { ring: secs(1.0) });
    replay("busy_pjsip", fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_down_pjsip() {
    let fake = start(FAST).await;
    // Nothing listens on the SIP port.
    fake.set_plan("callee", CalleePlan::Unreachable);
    replay("callee_down_pjsip", fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn congestion() {
    replay("congestion", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_channel_id() {
    replay("duplicate_channel_id", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_channel() {
    replay("get_channel", start(POLLED).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_answered() {
    replay("hangup_answered", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_while_ringing() {
    replay("hangup_while_ringing", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer() {
    replay("no_answer", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_pjsip() {
    let fake = start(FAST).await;
    // sipp/uas_noanswer.xml: 180 until CANCEL.
    fake.set_plan("callee", CalleePlan::NoAnswer { ring_for: secs(3600.0) });
    replay("no_answer_pjsip", fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_missing_sound() {
    // The DELETE must beat the callee's 0.5 s Answer() media wait, as it did when recorded: a
    // slower scale leaves room for a busy machine.
    replay("play_missing_sound", start(0.2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected() {
    replay("rejected", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_pjsip() {
    let fake = start(FAST).await;
    // sipp/uas_decline.xml: 603 at once.
    fake.set_plan("callee", CalleePlan::Rejected);
    replay("rejected_pjsip", fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_websocket_same_app() {
    replay("second_websocket_same_app", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_call() {
    replay("short_call", start(FAST).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_number() {
    replay("unknown_number", start(FAST).await).await;
}

// Beyond the recordings: the PJSIP trunk of ivr's default dial template, plans and faults -----------

fn app_query() -> Value {
    json!({"app": "ivr", "api_key": "ivr:ivr-secret"})
}

async fn post(fake: &FakeAsterisk, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let req = reqwest::Client::new()
        .post(format!("{}{path}", fake.http_url()))
        .basic_auth(fake.username(), Some(fake.password()))
        .query(query);
    let resp = timeout(STEP, req.send()).await.expect("answer in time").expect("HTTP");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Waits until `socket` has an event satisfying `done`, and returns all its events so far.
async fn events_until(socket: &Socket, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + STEP;
    loop {
        let events = socket.received.lock().unwrap().events.clone();
        if events.iter().any(&done) {
            return events;
        }
        assert!(Instant::now() < deadline, "no such event; got {:#?}", events.iter().map(summary).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn destroyed(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["type"] == "ChannelDestroyed" && e["channel"]["id"] == id
}

/// `type [state of a state change] [cause] [tech_cause] [dialstatus, "" when empty]`.
fn brief(e: &Value) -> String {
    let mut s = e["type"].as_str().unwrap_or("?").to_string();
    if e["type"] == "ChannelStateChange" {
        s.push_str(&format!(" {}", e["channel"]["state"].as_str().unwrap_or("?")));
    }
    for p in ["/cause", "/tech_cause"] {
        if let Some(v) = e.pointer(p) {
            s.push_str(&format!(" {v}"));
        }
    }
    if let Some(d) = e["dialstatus"].as_str() {
        s.push_str(if d.is_empty() { " \"\"" } else { " " });
        s.push_str(d);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pjsip_trunk_numbers_follow_the_sim_plans() {
    let fake = start(0.02).await;
    let socket = open_socket(&fake, &app_query()).await.unwrap();
    // (number, expected events of the one channel as "type cause tech_cause dialstatus")
    let cases = [
        (
            "+15550000002",
            vec![
                "Dial \"\"",
                "ChannelStateChange Ringing",
                "Dial RINGING",
                "ChannelHangupRequest 17 486",
                "Dial BUSY",
                "ChannelDestroyed 17 486",
            ],
        ),
        ("+15550000006", vec!["Dial \"\"", "ChannelHangupRequest 21 603", "Dial NOANSWER", "ChannelDestroyed 21 603"]),
        ("+15550009999", vec!["Dial \"\"", "ChannelHangupRequest 1 404", "Dial NOANSWER", "ChannelDestroyed 1 404"]),
    ];
    for (i, (number, expected)) in cases.iter().enumerate() {
        let id = format!("trunk-{i}");
        let endpoint = format!("PJSIP/{number}@trunk");
        let (status, body) =
            post(&fake, "/channels", &[("endpoint", &endpoint), ("app", "ivr"), ("channelId", &id)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(channel_name(body["name"].as_str().unwrap()), "PJSIP/trunk-XXXXXXXX");
        let events = events_until(&socket, destroyed(&id)).await;
        let mine: Vec<String> = events.iter().filter(|e| channel_of(e) == id).map(brief).collect();
        assert_eq!(mine, *expected, "{number}");
        assert!(events
            .iter()
            .filter(|e| channel_of(e) == id)
            .all(|e| e["type"] != "Dial" || e["dialstring"] == format!("{number}@trunk")));
    }
    assert!(fake.channel_ids().is_empty());
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_plan_overrides_a_number() {
    let fake = start(0.02).await;
    fake.set_plan("+15550000042", CalleePlan::AnswerAtOnce { talk: secs(0.5) });
    let socket = open_socket(&fake, &app_query()).await.unwrap();
    let (status, _) =
        post(&fake, "/channels", &[("endpoint", "Local/+15550000042@sim"), ("app", "ivr"), ("channelId", "plan-1")])
            .await;
    assert_eq!(status, 200);
    let events = events_until(&socket, destroyed("plan-1")).await;
    let types: Vec<&str> =
        events.iter().filter(|e| channel_of(e) == "plan-1").filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "Dial",
            "ChannelStateChange",
            "Dial",
            "ChannelVarset",
            "StasisStart",
            "ChannelHangupRequest",
            "StasisEnd",
            "ChannelVarset",
            "ChannelDestroyed"
        ]
    );
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_delay_refuse_drop_and_vanish() {
    let fake = start(0.02).await;
    let local = [("endpoint", "Local/+15550000004@sim"), ("app", "ivr"), ("channelId", "fault-1")];

    // One failing originate, then normal service; both are counted.
    fake.fail_next_originate(503, json!({"message": "try later"}));
    assert_eq!(post(&fake, "/channels", &local).await, (503, json!({"message": "try later"})));
    assert!(fake.channel_ids().is_empty());

    // A slow answer: the channel exists before the answer, so a retry with the id meets 409.
    fake.set_originate_delay(Duration::from_millis(300));
    let started = Instant::now();
    let slow = tokio::spawn({
        let fake = fake.clone();
        async move { post(&fake, "/channels", &local).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.channel_ids(), ["fault-1", "fault-1;2"]);
    assert!(!slow.is_finished());
    assert_eq!(timeout(STEP, slow).await.unwrap().unwrap().0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    fake.set_originate_delay(Duration::ZERO);
    let (status, body) = post(&fake, "/channels", &local).await;
    assert_eq!((status, body), (409, json!({"message": "Channel with given unique ID already exists"})));
    assert_eq!(fake.originate_count(), 3);

    // Refused credentials: REST and WebSocket answer 401.
    fake.refuse_credentials(true);
    assert_eq!(post(&fake, "/channels", &local).await.0, 401);
    match open_socket(&fake, &app_query()).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| "a socket")),
    }
    fake.refuse_credentials(false);

    // Dropped sockets close without a close frame.
    let socket = open_socket(&fake, &app_query()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    fake.drop_websockets();
    let deadline = Instant::now() + STEP;
    while socket.received.lock().unwrap().closed.is_none() {
        assert!(Instant::now() < deadline, "socket not dropped");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(socket.received.lock().unwrap().closed, Some(None), "no close frame: the client sees 1006");

    // A vanished channel is gone without a word.
    let socket = open_socket(&fake, &app_query()).await.unwrap();
    assert!(fake.vanish("fault-1"));
    assert!(fake.channel_ids().is_empty());
    let resp = reqwest::Client::new()
        .get(format!("{}/channels/fault-1", fake.http_url()))
        .basic_auth(fake.username(), Some(fake.password()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(socket.received.lock().unwrap().events.is_empty());
    fake.shutdown().await;
}

/// Asterisk's two limits on its HTTP side: `sessionlimit` connections at once (beyond it a
/// connection is closed unanswered), and `websocket_write_timeout` for an event socket whose
/// reader stopped reading (the socket is closed).
#[tokio::test]
async fn sessions_beyond_the_limit_and_stalled_readers_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config =
        FakeConfig { session_limit: 2, websocket_write_timeout: Duration::from_millis(50), ..FakeConfig::default() };
    let fake = FakeAsterisk::start_with(config).await.unwrap();
    // Two sessions: an event socket nobody reads, and an idle connection.
    let (_unread, _) = timeout(STEP, tokio_tungstenite::connect_async(fake.events_url())).await.unwrap().unwrap();
    let idle = timeout(STEP, tokio::net::TcpStream::connect(fake.addr())).await.unwrap().unwrap();
    let deadline = Instant::now() + STEP;
    while fake.stats().sessions < 2 {
        assert!(Instant::now() < deadline, "{:?}", fake.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A third is accepted and closed before any answer.
    let mut third = timeout(STEP, tokio::net::TcpStream::connect(fake.addr())).await.unwrap().unwrap();
    let _ = third.write_all(b"GET /ari/asterisk/info HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = timeout(STEP, third.read_to_end(&mut answer)).await.expect("closed");
    assert!(answer.is_empty(), "answered: {}", String::from_utf8_lossy(&answer));
    let seen = fake.stats();
    assert_eq!((seen.refused_sessions, seen.peak_sessions), (1, 2), "{seen:?}");
    drop(idle);

    // More events than the socket buffers hold: the writer stalls, and the socket is closed.
    assert_eq!(fake.send_user_events("ivr", "flood", 100_000), 100_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.stats().write_timeouts == 0 || fake.stats().sessions > 0 {
        assert!(Instant::now() < deadline, "{:?}", fake.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.stats().write_timeouts, 1);
    fake.shutdown().await;
}

/// Several applications at once, one WebSocket each (several ivr instances): each hears the
/// channels it originated; one subscribed to another's channel hears its channel events from
/// then on, but not StasisStart/StasisEnd, which go to the application the channel is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_apps_each_hear_their_own_channels_and_what_they_subscribe_to() {
    let fake = start(0.05).await;
    let a = open_socket(&fake, &json!({"app": "ivr-a", "api_key": "ivr:ivr-secret"})).await.unwrap();
    let b = open_socket(&fake, &json!({"app": "ivr-b", "api_key": "ivr:ivr-secret"})).await.unwrap();
    let (status, _) =
        post(&fake, "/channels", &[("endpoint", "PJSIP/+15550000001@trunk"), ("app", "ivr-a"), ("channelId", "ca")])
            .await;
    assert_eq!(status, 200);
    let (status, _) =
        post(&fake, "/channels", &[("endpoint", "PJSIP/+15550000001@trunk"), ("app", "ivr-b"), ("channelId", "cb")])
            .await;
    assert_eq!(status, 200);
    // b takes "ca" over (its instance died, say): a subscription, as in answered_dialplan_subscribe.
    let (status, app) = post(&fake, "/applications/ivr-b/subscription", &[("eventSource", "channel:ca")]).await;
    assert_eq!(status, 200, "{app}");
    assert!(app["channel_ids"].as_array().unwrap().contains(&json!("ca")), "{app}");
    let (status, _) = post(&fake, "/applications/ivr-b/subscription", &[("eventSource", "channel:gone")]).await;
    assert_eq!(status, 422, "a channel that does not exist");
    let a_events = events_until(&a, |e| e["type"] == "StasisStart" && e["channel"]["id"] == "ca").await;
    assert!(a_events.iter().all(|e| channel_of(e) != "cb"), "a hears nothing of b's channel");
    assert!(a_events.iter().all(|e| e["application"] == "ivr-a"));
    let b_events = events_until(&b, |e| e["type"] == "StasisStart" && e["channel"]["id"] == "cb").await;
    let b_events = events_until(&b, |e| {
        e["type"] == "ChannelStateChange" && e["channel"]["id"] == "ca" && e["channel"]["state"] == "Up"
    })
    .await
    .into_iter()
    .chain(b_events)
    .collect::<Vec<_>>();
    assert!(b_events.iter().all(|e| e["application"] == "ivr-b"));
    assert!(
        !b_events.iter().any(|e| channel_of(e) == "ca" && e["type"].as_str().unwrap().starts_with("Stasis")),
        "StasisStart of a's channel goes to a alone"
    );
    fake.shutdown().await;
}
