//! A fake Asterisk: an in-process ARI server for tests and demos (feature `testing`).
//!
//! [`FakeAsterisk`] speaks the subset of the Asterisk REST Interface that ivr uses, over real
//! HTTP and WebSocket on `127.0.0.1`, with the status codes, bodies and event JSON of a real
//! Asterisk 22. Its behaviour was built from recordings of a real Asterisk (the ARI transcripts
//! shipped with ivr) and is tested against them, quirks included: busy over Local channels ends
//! the originated channel with cause 0, an originate timeout sends no final `Dial` event, events
//! may reach the event socket before the originate's `200`, a playback of a missing file is
//! accepted with `201` and fails only in the events, and so on.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
//!
//! # async fn demo() -> std::io::Result<()> {
//! // Recorded timings, 50 times faster.
//! let fake = FakeAsterisk::start_with(FakeConfig { time_scale: 0.02, ..FakeConfig::default() }).await?;
//! println!("ARI at {} as {}:{}, app {}", fake.http_url(), fake.username(), fake.password(), fake.app());
//!
//! // +15550000002 is busy by default; make +15550000042 answer after 3 s and talk for 10 s.
//! fake.set_plan("+15550000042", CalleePlan::Answered { ring: Duration::from_secs(3), talk: Duration::from_secs(10) });
//!
//! // Point an ARI client at fake.http_url(): POST /channels?endpoint=Local/+15550000042@sim&app=ivr…
//! // and open ws://…/ari/events?app=ivr&api_key=ivr:ivr-secret for the events.
//!
//! // Faults for the unhappy paths:
//! fake.fail_next_originate(500, serde_json::json!({"error": "Allocation failed"}));
//! fake.drop_websockets(); // every event socket dies without a close frame (1006)
//! fake.restart().await; // `core restart now`: channels hung up, sockets dropped, new startup_time
//! fake.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # What it answers
//!
//! Under `/ari`, with basic auth or `?api_key=user:password` (else 401 with
//! `WWW-Authenticate: Basic realm="Asterisk REST Interface"`):
//!
//! - `POST /channels` and `POST /channels/{channelId}` (originate: `endpoint`, `app`, `appArgs`,
//!   `callerId`, `timeout`, `channelId`, `otherChannelId`, `context`, `extension`, `priority`;
//!   a JSON body may carry the same fields and `{"variables": {…}}`), `GET /channels`,
//!   `GET`/`DELETE /channels/{id}` (`reason`, `reason_code`), `POST /channels/{id}/continue`,
//!   `POST /channels/{id}/play` (`media`, `playbackId`), `GET /channels/{id}/variable`;
//! - `GET /asterisk/info` (`only`), `GET /asterisk/ping`;
//! - `GET /applications`, `GET /applications/{app}`, `POST`/`DELETE
//!   /applications/{app}/subscription` (`eventSource=channel:<id>`), `PUT
//!   /applications/{app}/eventFilter` (`{"allowed": [{"type": …}], "disallowed": […]}`; not
//!   recorded, built from ARI's documentation: `fake/filter.rs`);
//! - the event WebSocket `GET /ari/events?app=…[&subscribeAll=true]`. A second socket for the
//!   same app takes over; the first gets `ApplicationReplaced` and nothing more.
//!
//! Other ARI resources (bridges, recordings, `/playbacks`, …) answer 404 `Resource not found`.
//!
//! Like Asterisk's HTTP server it admits [`FakeConfig::session_limit`] connections at once (event
//! sockets included; `sessionlimit`, 100) and closes any beyond them before answering, and it
//! closes an event socket whose client stops reading for longer than
//! [`FakeConfig::websocket_write_timeout`]. [`FakeAsterisk::stats`] tells the peak session
//! count, the refused connections and the requests a reconcile makes.
//!
//! # Endpoints and callees
//!
//! - `Local/<number>@sim` creates the Local pair of the recordings: the originated channel
//!   `<channelId>` (`Local/<number>@sim-XXXXXXXX;1`) and its `;2` half (`<channelId>;2`, or
//!   `otherChannelId`), which runs the callee's `[sim]` dialplan with every `ChannelDialplan` step.
//!   Another context has no extensions (the pair dies at once with cause 0, as recorded).
//! - `PJSIP/<number>@trunk` (ivr's default dial template), `PJSIP/callee` (the endpoint of the
//!   recordings) and `PJSIP/<endpoint>/sip:<user>@host` create one channel, no `;2` half, with SIP
//!   causes (`tech_cause`). Any other PJSIP endpoint, or another technology, answers 500
//!   `{"error":"Allocation failed"}`, like Asterisk.
//!
//! What the callee does is a [`CalleePlan`], looked up by number (by `callee` for
//! `PJSIP/callee`): [`CalleePlan::default_for`] gives the recorded `[sim]` plans, and
//! [`FakeAsterisk::set_plan`] overrides them.
//!
//! Several apps may hold sockets at once, one each; an app hears the channels originated into
//! it and those it subscribed to, but StasisStart/StasisEnd only of channels in it.
//! After the answer, `app=` channels enter Stasis (`StasisStart`); `continue` (or an originate
//! with `context`/`extension` instead of `app`) runs the recorded `[ivr-menu]` context: extension
//! `s` (and `1000`) plays `hello-world` (1.42 s), waits 2 s and hangs up. Any other
//! context/extension hangs the channel up at once.
//!
//! Sounds for `play`: `sound:hello-world` (1.42 s), `sound:demo-congrats` (30.28 s),
//! `sound:demo-thanks` (5.52 s), `sound:beep`, `sound:silence/1`…`10`, plus any added with
//! [`FakeAsterisk::add_sound`]; anything else starts and fails at once, as a missing file does.
//!
//! # Timing
//!
//! All delays of the simulation (ringing, talk time, playbacks, originate timeouts, the restart)
//! are the recorded ones multiplied by [`FakeConfig::time_scale`], on the Tokio clock. Tests that
//! use real sockets should use real time with a small scale (0.01–0.05) rather than
//! `tokio::time::pause()`, whose auto-advance can fire client timeouts during socket I/O.
//! Event timestamps are the wall clock.

mod channels;
mod events;
mod filter;
mod plan;
mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use channels::{Outgoing, State};
pub use plan::CalleePlan;

/// Settings of a [`FakeAsterisk`].
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// ARI user.
    pub username: String,
    /// ARI password.
    pub password: String,
    /// The Stasis application ivr uses (informational: any app name a socket registers works).
    pub app: String,
    /// Multiplies every simulated delay: 1.0 = recorded timings, 0.01 = 100 times faster.
    /// Must be finite and greater than 0.
    pub time_scale: f64,
    /// HTTP sessions open at once at most, event WebSockets included (`http.conf`
    /// `sessionlimit`, 100 by default and in the recordings). A connection beyond it is
    /// accepted and closed before anything is answered, as Asterisk does.
    pub session_limit: usize,
    /// How long one event may take to be written to a socket before the socket is closed
    /// (`ari.conf` `websocket_write_timeout`; 1000 ms in the recordings' configuration): a
    /// client that stops reading its socket loses it.
    pub websocket_write_timeout: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            port: 0,
            username: "ivr".into(),
            password: "ivr-secret".into(),
            app: "ivr".into(),
            time_scale: 1.0,
            session_limit: 100,
            websocket_write_timeout: Duration::from_millis(1000),
        }
    }
}

/// What a [`FakeAsterisk`] has seen since it started, for tests and load scripts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FakeStats {
    /// `POST /channels` and `POST /channels/{id}` with valid credentials, failed ones included.
    pub originates: usize,
    /// `GET /channels/{id}` requests (a reconcile's per-call question).
    pub channel_gets: usize,
    /// `GET /channels` requests (a reconcile's listing).
    pub channel_lists: usize,
    /// HTTP sessions (connections and event WebSockets) open now.
    pub sessions: usize,
    /// The most HTTP sessions that were open at once.
    pub peak_sessions: usize,
    /// Connections closed unanswered because `session_limit` sessions were open.
    pub refused_sessions: usize,
    /// Event sockets closed because a write outlasted `websocket_write_timeout`.
    pub write_timeouts: usize,
    /// Events written whole to event sockets, all connections together.
    pub events_written: usize,
}

/// A running fake Asterisk. Cheap to clone; every clone controls the same server, which runs
/// until [`FakeAsterisk::shutdown`] (or until the Tokio runtime stops).
#[derive(Clone)]
pub struct FakeAsterisk {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FakeAsterisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAsterisk").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    config: FakeConfig,
    addr: SocketAddr,
    state: Mutex<State>,
    /// Wakes the timer task when timers may have changed.
    timers: Notify,
    shutdown: watch::Sender<bool>,
    /// `false` while Asterisk is down during a restart: new connections wait.
    up: watch::Sender<bool>,
    /// Bumped when Asterisk goes down: every open HTTP connection is dropped.
    epoch: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    sessions: SessionCount,
    requests: RequestCount,
}

/// Asterisk's HTTP session count (`session_count` in `http.c`).
#[derive(Default)]
struct SessionCount {
    open: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicUsize,
}

/// Requests worth counting, outside the state lock.
#[derive(Default)]
struct RequestCount {
    channel_gets: AtomicUsize,
    channel_lists: AtomicUsize,
    write_timeouts: AtomicUsize,
    events_written: AtomicUsize,
}

impl Shared {
    /// The state lock. A panic while holding it cannot leave the simulation half-updated in a
    /// way worse than the panic itself, so a poisoned lock is used as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the timer task to look at the timers again.
    fn kick(&self) {
        self.timers.notify_one();
    }
}

impl FakeAsterisk {
    /// Starts a fake Asterisk with [`FakeConfig::default`].
    pub async fn start() -> std::io::Result<FakeAsterisk> {
        Self::start_with(FakeConfig::default()).await
    }

    /// Starts a fake Asterisk listening on `127.0.0.1:config.port`.
    pub async fn start_with(config: FakeConfig) -> std::io::Result<FakeAsterisk> {
        if config.session_limit == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "session_limit must be at least 1"));
        }
        if !(config.time_scale.is_finite() && config.time_scale > 0.0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("time_scale must be a finite number > 0, not {}", config.time_scale),
            ));
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(config.time_scale)),
            config,
            addr,
            timers: Notify::new(),
            shutdown: watch::channel(false).0,
            up: watch::channel(true).0,
            epoch: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
            sessions: SessionCount::default(),
            requests: RequestCount::default(),
        });
        let timers = tokio::spawn(run_timers(shared.clone()));
        let accept = tokio::spawn(server::serve(shared.clone(), listener));
        shared.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend([timers, accept]);
        Ok(FakeAsterisk { shared })
    }

    /// `http://127.0.0.1:PORT/ari`, the base URL of the REST interface.
    pub fn http_url(&self) -> String {
        format!("http://{}/ari", self.shared.addr)
    }

    /// `ws://127.0.0.1:PORT/ari/events?app=APP&api_key=USER:PASSWORD`, the event socket of
    /// the configured app.
    pub fn events_url(&self) -> String {
        let c = &self.shared.config;
        format!("ws://{}/ari/events?app={}&api_key={}:{}", self.shared.addr, c.app, c.username, c.password)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn username(&self) -> &str {
        &self.shared.config.username
    }

    pub fn password(&self) -> &str {
        &self.shared.config.password
    }

    pub fn app(&self) -> &str {
        &self.shared.config.app
    }

    pub fn time_scale(&self) -> f64 {
        self.shared.config.time_scale
    }

    /// What the callee at `number` does from the next originate on (`callee` for `PJSIP/callee`).
    pub fn set_plan(&self, number: &str, plan: CalleePlan) {
        self.shared.state().core.plans.insert(number.to_string(), plan);
    }

    /// Makes `sound:<name>` playable for `duration` (recorded time).
    pub fn add_sound(&self, name: &str, duration: Duration) {
        self.shared.state().core.sounds.insert(name.to_string(), duration);
    }

    /// While `refuse` is true every request and WebSocket upgrade answers 401, as with a wrong
    /// password (bad_auth).
    pub fn refuse_credentials(&self, refuse: bool) {
        self.shared.state().core.refuse_credentials = refuse;
    }

    /// Closes every event socket abruptly, without a close frame: clients see 1006 / a reset.
    /// Calls go on; their events are lost until a socket registers the app again.
    pub fn drop_websockets(&self) {
        self.shared.state().close_sockets(|| Outgoing::Abort);
    }

    /// `asterisk -rx 'core restart now'`, as recorded: the channels are hung up at once (cause 0,
    /// `StasisEnd` for those in Stasis), about 1.1 s later (about 17 s if an originate was refused
    /// with 409 since the last restart) every socket and HTTP connection drops without a close
    /// frame, and 0.1 s after that ARI answers again with a new `startup_time`, no channels and
    /// no apps. Originates in between fail with 500. Returns when Asterisk is back.
    pub async fn restart(&self) {
        let shared = &self.shared;
        let delay = {
            let mut st = shared.state();
            let delay = st.begin_restart();
            st.core.scaled(delay)
        };
        shared.kick();
        tokio::time::sleep(delay).await;
        let down = {
            let mut st = shared.state();
            st.crash();
            st.core.scaled(Duration::from_millis(100))
        };
        shared.up.send_replace(false);
        shared.epoch.send_modify(|e| *e += 1);
        shared.kick();
        tokio::time::sleep(down).await;
        shared.state().come_back();
        shared.up.send_replace(true);
    }

    /// Makes Asterisk forget the call of channel `channel_id` (both Local halves) without any
    /// event: the channel is simply gone (`GET` answers 404), as after a crash on its side that
    /// no event reports. Returns whether such a channel existed.
    pub fn vanish(&self, channel_id: &str) -> bool {
        self.shared.state().vanish(channel_id)
    }

    /// Delays every originate response by `delay` (real time, not scaled). The channel is created
    /// and its events sent at once; only the HTTP answer waits, so a client that times out and
    /// retries with the same `channelId` meets a 409.
    pub fn set_originate_delay(&self, delay: Duration) {
        self.shared.state().core.originate_delay = delay;
    }

    /// The next originate answers `status` with `body` and creates nothing.
    pub fn fail_next_originate(&self, status: u16, body: serde_json::Value) {
        self.shared.state().core.fail_next = Some((status, body));
    }

    /// How many originates (`POST /channels`, `POST /channels/{id}`) were received with valid
    /// credentials, failed ones included.
    pub fn originate_count(&self) -> usize {
        self.shared.state().core.originate_count
    }

    /// How many originates asked for the channel id `channel_id` (a call dialled twice shows
    /// as 2, whichever ivr process sent them).
    pub fn originates_of(&self, channel_id: &str) -> usize {
        self.shared.state().core.originates_by_channel.get(channel_id).copied().unwrap_or(0)
    }

    /// What the fake has seen so far: requests, and its HTTP session count.
    pub fn stats(&self) -> FakeStats {
        let shared = &self.shared;
        FakeStats {
            originates: shared.state().core.originate_count,
            channel_gets: shared.requests.channel_gets.load(Ordering::Relaxed),
            channel_lists: shared.requests.channel_lists.load(Ordering::Relaxed),
            sessions: shared.sessions.open.load(Ordering::SeqCst),
            peak_sessions: shared.sessions.peak.load(Ordering::SeqCst),
            refused_sessions: shared.sessions.refused.load(Ordering::Relaxed),
            write_timeouts: shared.requests.write_timeouts.load(Ordering::Relaxed),
            events_written: shared.requests.events_written.load(Ordering::Relaxed),
        }
    }

    /// Sends `count` user events to `app`'s socket at once, as `count` calls of ARI's
    /// `POST /events/user/{name}?application=app` would: `ChannelUserevent`s whose `userevent`
    /// is `{"seq": "<n>"}`, n = 0, 1, … in order. Returns how many were queued (0 if no
    /// socket has registered `app`, or its event filter refuses them). For tests of event
    /// throughput and slow consumers.
    pub fn send_user_events(&self, app: &str, name: &str, count: usize) -> usize {
        let mut st = self.shared.state();
        (0..count).take_while(|n| st.core.user_event(app, name, serde_json::json!({"seq": n.to_string()}))).count()
    }

    /// `app` as `GET /applications/{app}` shows it (its subscriptions and event filter), if a
    /// socket has registered it since the last restart.
    pub fn application(&self, app: &str) -> Option<serde_json::Value> {
        self.shared.state().application(app).ok()
    }

    /// The ids of the channels alive now (originated channels and Local `;2` halves).
    pub fn channel_ids(&self) -> Vec<String> {
        self.shared.state().channel_ids()
    }

    /// Stops the server: sockets get a close frame, connections and timers stop.
    pub async fn shutdown(self) {
        let shared = self.shared;
        shared.state().close_sockets(|| Outgoing::Close);
        shared.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            // The tasks end on the shutdown signal; do not wait forever for a stuck one.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Fires the simulation's timers when they fall due.
async fn run_timers(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let next = shared.state().next_deadline();
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = shared.timers.notified() => {}
            _ = due => shared.state().fire_due(Instant::now()),
        }
    }
}
