//! The simulated Asterisk: calls, their channels, and the events each step produces.
//!
//! Everything lives in one [`State`] behind one lock, never held across an `await`. HTTP handlers
//! and the timer task call into it; every step runs to completion synchronously and queues its
//! events on the event sockets, so the order on a socket is exactly the order of the steps.
//!
//! Each sequence below is the one recorded for that situation (the transcript named in the
//! comment); where no recording covers a case, the comment says what was assumed and why.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::events::{cause_txt, format_timestamp, now_timestamp, rtp_qos_vars, Channel, Event, Location, Party};
use super::filter::EventFilter;
use super::plan::{local_script, menu_steps, pjsip_script, sound_duration, Act, CalleePlan, MenuKind, MenuStep};

/// How long Local `Answer()` waits for the first media frame from the caller side.
const ANSWER_MEDIA_WAIT: Duration = Duration::from_millis(500);
/// Delay between the caller side starting media and the callee's next dialplan step (2-3 ms).
const MEDIA_DELAY: Duration = Duration::from_millis(2);

/// A message for one event socket's writer task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An event (JSON text).
    Text(String),
    /// Answered once everything queued before it has been written to the socket.
    Barrier(oneshot::Sender<()>),
    /// Drop the connection without a close frame (client sees 1006).
    Abort,
    /// Close politely (close frame 1000).
    Close,
}

/// An error answer of the REST interface.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub body: Value,
}

impl ApiError {
    pub fn msg(status: u16, message: &str) -> ApiError {
        ApiError { status, body: json!({ "message": message }) }
    }

    fn channel_not_found() -> ApiError {
        ApiError::msg(404, "Channel not found")
    }

    fn allocation_failed() -> ApiError {
        ApiError { status: 500, body: json!({"error": "Allocation failed"}) }
    }

    fn not_in_stasis() -> ApiError {
        ApiError::msg(409, "Channel not in Stasis application")
    }
}

#[derive(Debug, Default)]
pub(crate) struct AppEntry {
    /// The socket that receives this app's events (the newest one).
    socket: Option<u64>,
    subscribe_all: bool,
    channels: BTreeSet<String>,
    /// What `PUT /applications/{app}/eventFilter` set; it outlives the app's sockets, as
    /// Asterisk keeps an application registered once a socket named it (until a restart).
    filter: EventFilter,
}

impl AppEntry {
    /// Whether this app's socket gets an event of `kind` about `channel`: it has `subscribeAll`,
    /// or is subscribed to the channel (unless the event goes to `subscribeAll` apps only), and
    /// its event filter lets the type through.
    fn sees(&self, kind: &str, channel: Option<&str>, subscribe_all_only: bool) -> bool {
        let subscribed = !subscribe_all_only && channel.is_some_and(|c| self.channels.contains(c));
        (self.subscribe_all || subscribed) && self.filter.allows(kind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tech {
    Local,
    Pjsip,
}

#[derive(Debug, Clone)]
enum Mode {
    App { app: String, args: Vec<String> },
    Dialplan { context: String, exten: String, priority: usize },
}

/// Where the originated channel is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loc {
    Dialing,
    Stasis,
    Dialplan,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TimerKind {
    Callee,
    Menu,
    Timeout,
    Playback,
}

#[derive(Debug, Clone, Copy)]
struct Timer {
    call: u64,
    kind: TimerKind,
    token: u64,
}

#[derive(Debug)]
struct Playback {
    id: String,
    media_uri: String,
    duration: Option<Duration>,
    started: bool,
    token: u64,
}

/// One originate: the originated channel (`c1`) and, for Local, its `;2` half (`c2`).
#[derive(Debug)]
pub(crate) struct Call {
    tech: Tech,
    c1: Channel,
    c1_alive: bool,
    c2: Option<Channel>,
    dialstring: String,
    mode: Mode,
    loc: Loc,
    answered: bool,
    was_in_stasis: bool,
    /// The caller side sends media (playback or dialplan), which ends the callee's `Answer()` wait.
    media: bool,
    callee: Vec<Act>,
    callee_idx: usize,
    callee_prio: i64,
    callee_token: u64,
    callee_in_playback: bool,
    callee_awaiting_media: bool,
    menu: Vec<MenuStep>,
    menu_ctx: (String, String),
    menu_idx: usize,
    menu_token: u64,
    menu_in_playback: bool,
    timeout_token: u64,
    playbacks: VecDeque<Playback>,
}

impl Call {
    fn ended(&self) -> bool {
        !self.c1_alive && self.c2.is_none()
    }

    fn local(&self) -> bool {
        self.tech == Tech::Local
    }
}

/// Everything but the calls, so a call can be borrowed mutably next to it.
pub(crate) struct Core {
    pub time_scale: f64,
    pub startup_time: OffsetDateTime,
    pub plans: HashMap<String, CalleePlan>,
    pub sounds: HashMap<String, Duration>,
    pub refuse_credentials: bool,
    pub originate_delay: Duration,
    pub fail_next: Option<(u16, Value)>,
    pub originate_count: usize,
    /// The originates of each channel id asked for, answered or not.
    pub originates_by_channel: HashMap<String, usize>,
    /// Between `restart()` hanging up the channels and Asterisk coming back.
    pub shutting_down: bool,
    /// Originates refused with 409 since the last restart. Asterisk leaves a half-allocated
    /// channel behind for each, and its next shutdown waits 15 s for it (see README "Surprises").
    pub stuck_ids: usize,
    apps: BTreeMap<String, AppEntry>,
    sockets: HashMap<u64, mpsc::UnboundedSender<Outgoing>>,
    next_socket: u64,
    by_channel: HashMap<String, u64>,
    timers: BTreeMap<(Instant, u64), Timer>,
    next_token: u64,
    local_seq: u32,
    pjsip_seq: u32,
    /// Sockets that received events since [`State::take_touched`].
    touched: BTreeSet<u64>,
}

impl Core {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// `d` of recorded time, in real time.
    pub fn scaled(&self, d: Duration) -> Duration {
        let secs = d.as_secs_f64() * self.time_scale;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(365 * 24 * 3600))
    }

    fn schedule(&mut self, call: u64, kind: TimerKind, token: u64, after: Duration) {
        let now = Instant::now();
        let at = now.checked_add(self.scaled(after)).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        let seq = self.token();
        self.timers.insert((at, seq), Timer { call, kind, token });
    }

    /// Delivers `ev` to every app that sees it: apps with `subscribeAll`, and apps subscribed to
    /// the event's channel (unless the event predates the subscription).
    fn emit(&mut self, ev: Event) {
        for (name, app) in &self.apps {
            let Some(sid) = app.socket else { continue };
            if ev.only_app.as_ref().is_some_and(|only| only != name) {
                continue;
            }
            if !app.sees(&ev.kind, ev.channel.as_deref(), ev.subscribe_all_only) {
                continue;
            }
            if let Some(tx) = self.sockets.get(&sid) {
                // A send error means the socket task is gone; unregistering will follow.
                let _ = tx.send(Outgoing::Text(ev.render(name)));
                self.touched.insert(sid);
            }
        }
    }

    /// A channel event, made only if an app with a socket will see it (the rule [`Core::emit`]
    /// applies): the snapshot, the timestamp and the text are most of the fake's work, and an
    /// event filter leaves out many of them.
    fn emit_channel(&mut self, kind: &str, chan: &Channel, fields: Value) {
        if self.apps.values().any(|app| app.socket.is_some() && app.sees(kind, Some(&chan.id), false)) {
            self.emit(Event::channel(kind, chan, fields));
        }
    }

    /// A `ChannelUserevent` for `app` alone, with no source object (`POST /events/user/{name}`
    /// with `application` and no `source`). `false` if no socket has registered `app`, or its
    /// event filter refuses the type.
    pub fn user_event(&mut self, app: &str, name: &str, userevent: Value) -> bool {
        let Some(entry) = self.apps.get(app).filter(|a| a.filter.allows("ChannelUserevent")) else { return false };
        let Some(tx) = entry.socket.and_then(|sid| self.sockets.get(&sid)) else {
            return false;
        };
        let ev = Event::new("ChannelUserevent", json!({"eventname": name, "userevent": userevent}));
        tx.send(Outgoing::Text(ev.render(app))).is_ok()
    }

    fn forget_channel(&mut self, id: &str) {
        self.by_channel.remove(id);
        for app in self.apps.values_mut() {
            app.channels.remove(id);
        }
    }

    fn app_json(&self, name: &str) -> Option<Value> {
        let app = self.apps.get(name)?;
        Some(json!({
            "name": name,
            "channel_ids": app.channels.iter().collect::<Vec<_>>(),
            "bridge_ids": [],
            "endpoint_ids": [],
            "device_names": [],
            "events_allowed": app.filter.allowed(),
            "events_disallowed": app.filter.disallowed(),
        }))
    }

    fn sound(&self, media_uri: &str) -> Option<Duration> {
        let name = media_uri.strip_prefix("sound:")?;
        self.sounds.get(name).copied().or_else(|| sound_duration(name))
    }
}

/// The parameters of `POST /channels` (query string and JSON body merged).
#[derive(Debug, Default)]
pub(crate) struct OriginateRequest {
    pub endpoint: Option<String>,
    pub app: Option<String>,
    pub app_args: Option<String>,
    pub caller_id: Option<String>,
    pub timeout: Option<String>,
    pub channel_id: Option<String>,
    pub other_channel_id: Option<String>,
    pub context: Option<String>,
    pub extension: Option<String>,
    pub priority: Option<String>,
    pub variables: BTreeMap<String, String>,
}

enum Target {
    Local { exten: String, context: String },
    Pjsip { endpoint: String, key: String },
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

pub(crate) struct State {
    pub core: Core,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
}

impl State {
    pub fn new(time_scale: f64) -> State {
        State {
            core: Core {
                time_scale,
                startup_time: OffsetDateTime::now_utc(),
                plans: HashMap::new(),
                sounds: HashMap::new(),
                refuse_credentials: false,
                originate_delay: Duration::ZERO,
                fail_next: None,
                originate_count: 0,
                originates_by_channel: HashMap::new(),
                shutting_down: false,
                stuck_ids: 0,
                apps: BTreeMap::new(),
                sockets: HashMap::new(),
                next_socket: 0,
                by_channel: HashMap::new(),
                timers: BTreeMap::new(),
                next_token: 0,
                local_seq: 0,
                pjsip_seq: 0,
                touched: BTreeSet::new(),
            },
            calls: BTreeMap::new(),
            next_call: 0,
        }
    }

    /// Runs `f` on the call `key` with the rest of the state; drops the call once it has ended.
    fn with_call<R>(&mut self, key: u64, f: impl FnOnce(&mut Call, &mut Core) -> R) -> Option<R> {
        let mut call = self.calls.remove(&key)?;
        let r = f(&mut call, &mut self.core);
        if !call.ended() {
            self.calls.insert(key, call);
        }
        Some(r)
    }

    /// Sockets that received events since the last call, each with a barrier to await.
    pub fn take_touched(&mut self) -> Vec<oneshot::Receiver<()>> {
        let touched = std::mem::take(&mut self.core.touched);
        let mut waits = Vec::new();
        for sid in touched {
            if let Some(tx) = self.core.sockets.get(&sid) {
                let (ack, wait) = oneshot::channel();
                if tx.send(Outgoing::Barrier(ack)).is_ok() {
                    waits.push(wait);
                }
            }
        }
        waits
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.core.timers.keys().next().map(|(at, _)| *at)
    }

    // Sockets and apps ----------------------------------------------------------------------

    /// Registers an event socket for `apps`. An app that already had a socket tells the old one
    /// `ApplicationReplaced` and sends it nothing more (second_websocket_same_app).
    pub fn register_socket(
        &mut self,
        apps: &[String],
        subscribe_all: bool,
        tx: mpsc::UnboundedSender<Outgoing>,
    ) -> u64 {
        self.core.next_socket += 1;
        let sid = self.core.next_socket;
        for name in apps {
            let entry = self.core.apps.entry(name.clone()).or_default();
            if let Some(old) = entry.socket.take() {
                let replaced = entry.filter.allows("ApplicationReplaced");
                if let Some(old_tx) = self.core.sockets.get(&old).filter(|_| replaced) {
                    let _ = old_tx.send(Outgoing::Text(Event::new("ApplicationReplaced", json!({})).render(name)));
                }
            }
            entry.socket = Some(sid);
            entry.subscribe_all = subscribe_all;
        }
        self.core.sockets.insert(sid, tx);
        sid
    }

    pub fn unregister_socket(&mut self, sid: u64) {
        self.core.sockets.remove(&sid);
        for app in self.core.apps.values_mut() {
            if app.socket == Some(sid) {
                app.socket = None;
            }
        }
    }

    /// Sends `msg()` to every socket and forgets them (`drop_websockets`, restart, shutdown).
    pub fn close_sockets(&mut self, msg: impl Fn() -> Outgoing) {
        for (_, tx) in self.core.sockets.drain() {
            let _ = tx.send(msg());
        }
        for app in self.core.apps.values_mut() {
            app.socket = None;
        }
    }

    pub fn applications(&self) -> Value {
        Value::Array(self.core.apps.keys().filter_map(|n| self.core.app_json(n)).collect())
    }

    pub fn application(&self, name: &str) -> Result<Value, ApiError> {
        self.core.app_json(name).ok_or_else(|| ApiError::msg(404, "Application not found"))
    }

    /// `PUT /applications/{app}/eventFilter` with its JSON body (`None`: empty).
    pub fn set_event_filter(&mut self, name: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let app = self.core.apps.get_mut(name).ok_or_else(|| ApiError::msg(404, "Application not found"))?;
        app.filter.set(body)?;
        self.application(name)
    }

    /// `POST`/`DELETE /applications/{app}/subscription?eventSource=channel:<id>[,…]`.
    pub fn subscription(&mut self, name: &str, sources: &[String], subscribe: bool) -> Result<Value, ApiError> {
        if sources.is_empty() {
            return Err(ApiError::msg(400, "Missing parameter eventSource"));
        }
        if !self.core.apps.contains_key(name) {
            return Err(ApiError::msg(404, "Application not found"));
        }
        let mut ids = Vec::new();
        for source in sources {
            let Some(id) = source.strip_prefix("channel:") else {
                return Err(ApiError::msg(400, "Invalid event source URI scheme"));
            };
            if !self.core.by_channel.contains_key(id) {
                return Err(ApiError::msg(422, "Event source does not exist"));
            }
            ids.push(id.to_string());
        }
        if let Some(app) = self.core.apps.get_mut(name) {
            for id in ids {
                if subscribe {
                    app.channels.insert(id);
                } else if !app.channels.remove(&id) {
                    return Err(ApiError::msg(409, "Application not subscribed to event source"));
                }
            }
        }
        self.application(name)
    }

    // Channels ------------------------------------------------------------------------------

    fn find(&self, id: &str) -> Option<(u64, &Call)> {
        let key = *self.core.by_channel.get(id)?;
        self.calls.get(&key).map(|c| (key, c))
    }

    fn channel(&self, id: &str) -> Option<&Channel> {
        let (_, call) = self.find(id)?;
        if call.c1_alive && call.c1.id == id {
            Some(&call.c1)
        } else {
            call.c2.as_ref().filter(|c| c.id == id)
        }
    }

    pub fn channel_ids(&self) -> Vec<String> {
        self.list_channels().iter().map(|c| c.id.clone()).collect()
    }

    fn list_channels(&self) -> Vec<&Channel> {
        let mut out = Vec::new();
        for call in self.calls.values() {
            if call.c1_alive {
                out.push(&call.c1);
            }
            out.extend(call.c2.iter());
        }
        out
    }

    pub fn channels_json(&self) -> Value {
        Value::Array(self.list_channels().into_iter().map(Channel::snapshot).collect())
    }

    pub fn channel_json(&self, id: &str) -> Result<Value, ApiError> {
        self.channel(id).map(Channel::snapshot).ok_or_else(ApiError::channel_not_found)
    }

    /// `GET /channels/{id}/variable?variable=…`.
    pub fn variable(&self, id: &str, name: Option<&str>) -> Result<Value, ApiError> {
        let name = name.filter(|n| !n.is_empty()).ok_or_else(|| ApiError::msg(400, "Variable name is required"))?;
        let chan = self.channel(id).ok_or_else(|| ApiError::msg(404, "Provided channel was not found"))?;
        let value = if name.ends_with(')') {
            match name {
                "CHANNEL(state)" => chan.state.to_string(),
                "CHANNEL(name)" => chan.name.clone(),
                "CHANNEL(uniqueid)" => chan.id.clone(),
                "CALLERID(num)" => chan.caller.number.clone(),
                "CALLERID(name)" => chan.caller.name.clone(),
                _ => return Err(ApiError::msg(500, "Unable to read provided function")),
            }
        } else {
            chan.vars.get(name).cloned().ok_or_else(|| ApiError::msg(404, "Provided variable was not found"))?
        };
        Ok(json!({ "value": value }))
    }

    fn resolve(&self, endpoint: &str) -> Result<Target, ApiError> {
        let (tech, resource) = endpoint.split_once('/').unwrap_or((endpoint, ""));
        if tech.is_empty() || resource.is_empty() {
            return Err(ApiError::msg(400, "Invalid endpoint specified"));
        }
        if tech.eq_ignore_ascii_case("local") {
            // `Local/<exten>@<context>[/options]`; a missing context is Asterisk's `default`.
            let resource = resource.split('/').next().unwrap_or(resource);
            let (exten, context) = resource.split_once('@').unwrap_or((resource, "default"));
            return Ok(Target::Local { exten: exten.to_string(), context: context.to_string() });
        }
        if tech.eq_ignore_ascii_case("pjsip") {
            // `PJSIP/<endpoint>`, `PJSIP/<number>@<endpoint>` or `PJSIP/<endpoint>/sip:<user>@<host>`.
            let known = |e: &str| e == "callee" || e == "trunk";
            if let Some((endpoint, uri)) = resource.split_once('/') {
                let user = uri.strip_prefix("sip:").map(|u| u.split('@').next().unwrap_or(u)).unwrap_or("");
                if known(endpoint) && !user.is_empty() {
                    return Ok(Target::Pjsip { endpoint: endpoint.to_string(), key: user.to_string() });
                }
            } else if let Some((number, endpoint)) = resource.split_once('@') {
                if known(endpoint) && !number.is_empty() {
                    return Ok(Target::Pjsip { endpoint: endpoint.to_string(), key: number.to_string() });
                }
            } else if known(resource) {
                return Ok(Target::Pjsip { endpoint: resource.to_string(), key: resource.to_string() });
            }
        }
        // Unknown technology, unknown PJSIP endpoint, malformed URI: the channel driver cannot
        // allocate a channel (bad_endpoint, bad_endpoint_pjsip).
        Err(ApiError::allocation_failed())
    }

    fn plan(&self, key: &str) -> CalleePlan {
        self.core.plans.get(key).cloned().or_else(|| CalleePlan::default_for(key)).unwrap_or(CalleePlan::Unknown)
    }

    /// `POST /channels` and `POST /channels/{id}`: validates in Asterisk's order
    /// (`ari_channels_handle_originate_with_id`), creates the channels and runs every step that
    /// happens at once, so those events precede the 200 as in the recordings.
    pub fn originate(&mut self, req: OriginateRequest) -> Result<Value, ApiError> {
        let endpoint = non_empty(&req.endpoint).ok_or_else(|| ApiError::msg(400, "Endpoint must be specified"))?;
        let (tech, resource) = endpoint.split_once('/').unwrap_or((endpoint, ""));
        if tech.is_empty() || resource.is_empty() {
            return Err(ApiError::msg(400, "Invalid endpoint specified"));
        }
        let mode = if let Some(app) = non_empty(&req.app) {
            let args = non_empty(&req.app_args).map(|a| a.split(',').map(str::to_string).collect()).unwrap_or_default();
            Mode::App { app: app.to_string(), args }
        } else if let Some(exten) = non_empty(&req.extension) {
            let priority = req.priority.as_deref().and_then(|p| p.parse::<usize>().ok()).filter(|p| *p > 0);
            Mode::Dialplan {
                context: non_empty(&req.context).unwrap_or("default").to_string(),
                exten: exten.to_string(),
                priority: priority.unwrap_or(1),
            }
        } else {
            return Err(ApiError::msg(400, "Application or extension must be specified"));
        };
        let target = self.resolve(endpoint)?;
        if self.core.shutting_down {
            return Err(ApiError::allocation_failed());
        }

        let id = non_empty(&req.channel_id).map(str::to_string).unwrap_or_else(uniqueid);
        let other = non_empty(&req.other_channel_id).map(str::to_string);
        let taken = |i: &str| self.core.by_channel.contains_key(i);
        if taken(&id) || other.as_deref().is_some_and(taken) {
            self.core.stuck_ids += 1;
            if matches!(target, Target::Local { .. }) {
                // The Local pair was allocated (and its name number used) before the id clash.
                self.core.local_seq += 1;
            }
            return Err(ApiError::msg(409, "Channel with given unique ID already exists"));
        }

        let party = req.caller_id.as_deref().map(Party::parse).unwrap_or_default();
        let timeout = match req.timeout.as_deref().and_then(|t| t.trim().parse::<i64>().ok()) {
            Some(t) if t > 0 => Some(Duration::from_secs(t as u64)),
            Some(-1) => None,
            _ => Some(Duration::from_secs(30)),
        };
        let creationtime = now_timestamp();
        let blank = |id: String, name: String, state, protocol_id: String, context: &str, exten: &str| Channel {
            id,
            name,
            state,
            protocol_id,
            caller: Party::default(),
            connected: Party::default(),
            dialplan: Location {
                context: context.to_string(),
                exten: exten.to_string(),
                priority: 1,
                app_name: String::new(),
                app_data: String::new(),
            },
            creationtime: creationtime.clone(),
            vars: BTreeMap::new(),
        };

        let (tech, c1, c2, dialstring, callee) = match target {
            Target::Local { exten, context } => {
                let seq = self.core.local_seq;
                self.core.local_seq += 1;
                let base = format!("Local/{exten}@{context}-{seq:08x}");
                let other = other.unwrap_or_else(|| format!("{id};2"));
                let c1 = blank(id.clone(), format!("{base};1"), "Down", String::new(), &context, &exten);
                let c2 = blank(other, format!("{base};2"), "Ring", String::new(), &context, &exten);
                let script = if context == "sim" { local_script(&self.plan(&exten)) } else { None };
                (Tech::Local, c1, Some(c2), format!("{exten}@{context}"), script)
            }
            Target::Pjsip { endpoint, key } => {
                let seq = self.core.pjsip_seq;
                self.core.pjsip_seq += 1;
                let name = format!("PJSIP/{endpoint}-{seq:08x}");
                let call_id = uuid::Uuid::new_v4().to_string();
                let c1 = blank(id.clone(), name, "Down", call_id, "sim", "s");
                let dialstring = if key == endpoint { endpoint.clone() } else { format!("{key}@{endpoint}") };
                (Tech::Pjsip, c1, None, dialstring, Some(pjsip_script(&self.plan(&key))))
            }
        };

        self.next_call += 1;
        let key = self.next_call;
        let mut call = Call {
            tech,
            c1,
            c1_alive: true,
            c2,
            dialstring,
            mode: mode.clone(),
            loc: Loc::Dialing,
            answered: false,
            was_in_stasis: false,
            media: false,
            callee: Vec::new(),
            callee_idx: 0,
            callee_prio: 0,
            callee_token: 0,
            callee_in_playback: false,
            callee_awaiting_media: false,
            menu: Vec::new(),
            menu_ctx: (String::new(), String::new()),
            menu_idx: 0,
            menu_token: 0,
            menu_in_playback: false,
            timeout_token: 0,
            playbacks: VecDeque::new(),
        };
        self.core.by_channel.insert(call.c1.id.clone(), key);
        if let Some(c2) = &call.c2 {
            self.core.by_channel.insert(c2.id.clone(), key);
        }
        // `app=` subscribes the app to the channel and to its Local peer.
        if let Mode::App { app, .. } = &mode {
            if let Some(entry) = self.core.apps.get_mut(app) {
                entry.channels.insert(call.c1.id.clone());
                if let Some(c2) = &call.c2 {
                    entry.channels.insert(c2.id.clone());
                }
            }
        }

        let core = &mut self.core;
        // Published before the app is subscribed: only subscribeAll sees them
        // (answered_app_subscribeall vs answered_app).
        let early = |core: &mut Core, kind: &str, chan: &Channel, fields: Value| {
            let mut ev = Event::channel(kind, chan, fields);
            ev.subscribe_all_only = true;
            core.emit(ev);
        };
        early(core, "ChannelCreated", &call.c1, json!({}));
        if let Some(c2) = &call.c2 {
            early(core, "ChannelCreated", c2, json!({}));
        }
        call.c1.set_app("AppDial2", "(Outgoing Line)");
        early(
            core,
            "ChannelDialplan",
            &call.c1,
            json!({"dialplan_app": "AppDial2", "dialplan_app_data": "(Outgoing Line)"}),
        );
        call.c1.caller = party.clone();
        early(core, "ChannelCallerId", &call.c1, caller_presentation());
        call.c1.connected = party.clone();
        early(core, "ChannelConnectedLine", &call.c1, json!({}));
        call.c1.vars.extend(req.variables);
        if let Some(c2) = &mut call.c2 {
            c2.caller = party.clone();
            c2.connected = party;
            core.emit_channel("ChannelCallerId", c2, caller_presentation());
            core.emit_channel("ChannelConnectedLine", c2, json!({}));
        }
        let response = call.c1.snapshot();

        match callee {
            None => {
                // No such extension: the Local pair dies at once, without a Dial event
                // (unknown_number, bad_endpoint).
                destroy_c2(&mut call, core, 0);
                destroy_c1(&mut call, core, 0, None);
            }
            Some(script) => {
                call.callee = script;
                dial(&mut call, core, "");
                if let Some(t) = timeout {
                    call.timeout_token = core.token();
                    core.schedule(key, TimerKind::Timeout, call.timeout_token, t);
                }
                run_callee(key, &mut call, core);
            }
        }
        if !call.ended() {
            self.calls.insert(key, call);
        }
        Ok(response)
    }

    /// `DELETE /channels/{id}` with the cause from `reason` / `reason_code`.
    pub fn hangup(&mut self, id: &str, reason: Option<&str>, reason_code: Option<&str>) -> Result<(), ApiError> {
        let (key, call) = self.find(id).ok_or_else(ApiError::channel_not_found)?;
        let is_c1 = call.c1_alive && call.c1.id == id;
        let cause = match (reason.filter(|r| !r.is_empty()), reason_code.filter(|r| !r.is_empty())) {
            (Some(_), Some(_)) => return Err(ApiError::msg(400, "The reason and reason_code can't both be specified")),
            (None, Some(code)) => code
                .trim()
                .parse::<u16>()
                .map_err(|_| ApiError::msg(400, "Invalid reason for hangup reason code provided"))?,
            (Some(reason), None) => hangup_reason_cause(reason)
                .ok_or_else(|| ApiError::msg(400, "Invalid reason for hangup reason provided"))?,
            (None, None) => 16,
        };
        self.with_call(key, |call, core| {
            if is_c1 {
                hangup_c1(call, core, cause);
            } else {
                callee_hangup(call, core, cause, 32);
            }
        });
        Ok(())
    }

    /// `POST /channels/{id}/continue`: leaves Stasis and runs the dialplan at once.
    pub fn continue_in_dialplan(
        &mut self,
        id: &str,
        context: Option<&str>,
        extension: Option<&str>,
        priority: Option<&str>,
    ) -> Result<(), ApiError> {
        let key = self.stasis_call(id)?;
        let priority = priority.and_then(|p| p.parse::<usize>().ok()).filter(|p| *p > 0);
        self.with_call(key, |call, core| {
            let here = &call.c1.dialplan;
            let context_arg = context.filter(|c| !c.is_empty());
            let exten_arg = extension.filter(|e| !e.is_empty());
            let (context, exten) = match context_arg {
                None => (here.context.clone(), exten_arg.unwrap_or(&here.exten).to_string()),
                Some(c) => (c.to_string(), exten_arg.unwrap_or("s").to_string()),
            };
            let priority = match priority {
                Some(p) => p,
                // Asterisk's special case: no context and no extension means "the next priority".
                None if context_arg.is_none() && exten_arg.is_none() => here.priority as usize + 1,
                None => 1,
            };
            fail_playbacks(call, core);
            core.emit(stasis_event("StasisEnd", call, json!({})));
            call.loc = Loc::Dialplan;
            start_menu(key, call, core, &context, &exten, priority);
        });
        Ok(())
    }

    /// `POST /channels/{id}/play`: 201 with a `queued` playback; the outcome is only in events.
    pub fn play(&mut self, id: &str, media: Option<&str>, playback_id: Option<&str>) -> Result<Value, ApiError> {
        let key = self.stasis_call(id)?;
        let media = media.filter(|m| !m.is_empty()).ok_or_else(|| ApiError::msg(400, "Missing parameter media"))?;
        let pb_id = playback_id
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let duration = self.core.sound(media);
        let token = self.core.token();
        let playback = Playback { id: pb_id, media_uri: media.to_string(), duration, started: false, token };
        let json = self
            .with_call(key, |call, core| {
                let json = playback_json(call, &playback, "queued");
                call.playbacks.push_back(playback);
                start_next_playback(key, call, core);
                json
            })
            .ok_or_else(ApiError::channel_not_found)?;
        Ok(json)
    }

    /// The call whose originated channel `id` is in Stasis (`find_control` + `channel_state_invalid`).
    fn stasis_call(&self, id: &str) -> Result<u64, ApiError> {
        let (key, call) = self.find(id).ok_or_else(ApiError::channel_not_found)?;
        if !(call.c1_alive && call.c1.id == id) || call.loc != Loc::Stasis {
            return Err(ApiError::not_in_stasis());
        }
        if matches!(call.c1.state, "Down" | "Ringing") {
            return Err(ApiError::msg(412, "Channel in invalid state"));
        }
        Ok(key)
    }

    /// Fires every timer due at `now`, in deadline order.
    pub fn fire_due(&mut self, now: Instant) {
        while let Some(entry) = self.core.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            self.with_call(timer.call, |call, core| fire(timer, call, core));
        }
    }

    /// The first half of `core restart now`: every channel is hung up with the shutdown causes
    /// (asterisk_restart). Returns how long the restart takes before the sockets drop.
    pub fn begin_restart(&mut self) -> Duration {
        self.core.shutting_down = true;
        let keys: Vec<u64> = self.calls.keys().copied().collect();
        for key in keys {
            self.with_call(key, restart_hangup);
        }
        if self.core.stuck_ids > 0 {
            Duration::from_millis(16_950)
        } else {
            Duration::from_millis(1_120)
        }
    }

    /// The second half: Asterisk is gone. Sockets drop without a close frame; apps, calls and
    /// timers are forgotten.
    pub fn crash(&mut self) {
        self.close_sockets(|| Outgoing::Abort);
        self.core.apps.clear();
        for call in std::mem::take(&mut self.calls).into_values() {
            self.core.forget_channel(&call.c1.id);
            if let Some(c2) = call.c2 {
                self.core.forget_channel(&c2.id);
            }
        }
        self.core.timers.clear();
    }

    /// Forgets the call of channel `id` without a single event, as if Asterisk had lost it.
    pub fn vanish(&mut self, id: &str) -> bool {
        let Some(key) = self.core.by_channel.get(id).copied() else { return false };
        let Some(call) = self.calls.remove(&key) else { return false };
        self.core.forget_channel(&call.c1.id);
        if let Some(c2) = call.c2 {
            self.core.forget_channel(&c2.id);
        }
        true
    }

    /// Asterisk is back with a new `startup_time`.
    pub fn come_back(&mut self) {
        self.core.startup_time = OffsetDateTime::now_utc();
        self.core.shutting_down = false;
        self.core.stuck_ids = 0;
    }

    pub fn asterisk_info(&self, only: Option<&str>) -> Value {
        let startup = format_timestamp(self.core.startup_time);
        let mut all = serde_json::Map::new();
        all.insert(
            "build".into(),
            json!({"os": "Linux", "kernel": "6.1.0", "options": "", "machine": "x86_64", "date": "2026-11-01 00:00:00 UTC", "user": "root"}),
        );
        all.insert("system".into(), json!({"version": "22.10.1", "entity_id": super::events::ASTERISK_ID}));
        all.insert("config".into(), json!({"name": "", "default_language": "en", "setid": {"user": "", "group": ""}}));
        all.insert("status".into(), json!({"startup_time": startup, "last_reload_time": startup}));
        let Some(only) = only.filter(|o| !o.is_empty()) else {
            return Value::Object(all);
        };
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        Value::Object(all.into_iter().filter(|(k, _)| wanted.contains(&k.as_str())).collect())
    }
}

/// An Asterisk-style uniqueid (`<epoch>.<n>`) for originates without `channelId`.
fn uniqueid() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{}", OffsetDateTime::now_utc().unix_timestamp(), n)
}

/// `convert_reason_to_hangup_code` of res/ari/resource_channels.c.
fn hangup_reason_cause(reason: &str) -> Option<u16> {
    Some(match reason {
        "normal" => 16,
        "busy" => 17,
        "congestion" => 34,
        "no_answer" => 19,
        "timeout" => 18,
        "rejected" => 21,
        "unallocated" => 1,
        "normal_unspecified" => 31,
        "number_incomplete" => 28,
        "codec_mismatch" => 58,
        "interworking" => 127,
        "failure" => 38,
        "answered_elsewhere" => 26,
        _ => return None,
    })
}

fn caller_presentation() -> Value {
    json!({"caller_presentation": 0, "caller_presentation_txt": "Presentation Allowed, Not Screened"})
}

fn playback_json(call: &Call, pb: &Playback, state: &str) -> Value {
    json!({
        "id": pb.id,
        "media_uri": pb.media_uri,
        "target_uri": format!("channel:{}", call.c1.id),
        "language": "en",
        "state": state,
    })
}

// Event helpers ---------------------------------------------------------------------------

fn hr1(call: &mut Call, core: &mut Core, cause: u16, soft: bool, tech_cause: Option<u16>) {
    let mut fields = json!({ "cause": cause });
    if soft {
        fields["soft"] = true.into();
    }
    if let Some(t) = tech_cause {
        fields["tech_cause"] = t.into();
    }
    core.emit_channel("ChannelHangupRequest", &call.c1, fields);
}

fn hr2(call: &mut Call, core: &mut Core, cause: u16, soft: bool) {
    if let Some(c2) = &call.c2 {
        let fields = if soft { json!({"cause": cause, "soft": true}) } else { json!({ "cause": cause }) };
        core.emit_channel("ChannelHangupRequest", c2, fields);
    }
}

fn sc1(call: &mut Call, core: &mut Core, state: &'static str) {
    call.c1.state = state;
    core.emit_channel("ChannelStateChange", &call.c1, json!({}));
}

fn sc2(call: &mut Call, core: &mut Core, state: &'static str) {
    if let Some(c2) = &mut call.c2 {
        c2.state = state;
        core.emit_channel("ChannelStateChange", c2, json!({}));
    }
}

fn var1(call: &mut Call, core: &mut Core, name: &str, value: &str) {
    call.c1.vars.insert(name.to_string(), value.to_string());
    core.emit_channel("ChannelVarset", &call.c1, json!({"variable": name, "value": value}));
}

fn var2(call: &mut Call, core: &mut Core, name: &str, value: &str) {
    if let Some(c2) = &mut call.c2 {
        c2.vars.insert(name.to_string(), value.to_string());
        core.emit_channel("ChannelVarset", c2, json!({"variable": name, "value": value}));
    }
}

/// `Dial` with the originated channel as `peer` and no `caller` (there is no calling channel).
fn dial(call: &mut Call, core: &mut Core, status: &str) {
    let mut ev = Event::new("Dial", json!({"dialstatus": status, "forward": "", "dialstring": call.dialstring}));
    ev.body.insert("peer".into(), call.c1.snapshot());
    ev.channel = Some(call.c1.id.clone());
    core.emit(ev);
}

fn rtp_qos(call: &mut Call, core: &mut Core) {
    for (name, value) in rtp_qos_vars() {
        var1(call, core, name, &value);
    }
}

fn destroy_c1(call: &mut Call, core: &mut Core, cause: u16, tech_cause: Option<u16>) {
    if !call.c1_alive {
        return;
    }
    // The destroyed snapshot shows the dial application again, wherever the channel was.
    call.c1.set_app("AppDial2", "(Outgoing Line)");
    let mut fields = json!({"cause": cause, "cause_txt": cause_txt(cause)});
    if let Some(t) = tech_cause {
        fields["tech_cause"] = t.into();
    }
    core.emit_channel("ChannelDestroyed", &call.c1, fields);
    call.c1_alive = false;
    core.forget_channel(&call.c1.id);
    call.playbacks.clear();
}

fn destroy_c2(call: &mut Call, core: &mut Core, cause: u16) {
    if let Some(mut c2) = call.c2.take() {
        c2.set_app("", "");
        core.emit_channel("ChannelDestroyed", &c2, json!({"cause": cause, "cause_txt": cause_txt(cause)}));
        core.forget_channel(&c2.id);
    }
}

/// The `;2` half after the originated channel hung up: it gets a hangup request, stops its
/// playback, and dies with 16 (answered_app, hangup_answered, answered_play_short).
fn c2_tail(call: &mut Call, core: &mut Core) {
    if call.c2.is_none() {
        return;
    }
    if std::mem::take(&mut call.callee_in_playback) {
        var2(call, core, "PLAYBACKSTATUS", "SUCCESS");
    }
    hr2(call, core, 16, true);
    destroy_c2(call, core, 16);
}

/// StasisStart or StasisEnd of the originated channel, for its application alone.
fn stasis_event(kind: &str, call: &Call, fields: Value) -> Event {
    let mut ev = Event::channel(kind, &call.c1, fields);
    if let Mode::App { app, .. } = &call.mode {
        ev.only_app = Some(app.clone());
    }
    ev
}

fn stasis_end(call: &mut Call, core: &mut Core) {
    fail_playbacks(call, core);
    core.emit(stasis_event("StasisEnd", call, json!({})));
    var1(call, core, "STASISSTATUS", "SUCCESS");
}

/// What the originated channel's hang-up says of the application: StasisEnd while in Stasis,
/// or the final STASISSTATUS of a channel that was continued into the dialplan.
fn leave_on_hangup(call: &mut Call, core: &mut Core) {
    match call.loc {
        Loc::Stasis => stasis_end(call, core),
        Loc::Dialplan if call.was_in_stasis => var1(call, core, "STASISSTATUS", "SUCCESS"),
        _ => {}
    }
}

/// A running playback ends `failed` when the channel hangs up under it (answered_play).
fn fail_playbacks(call: &mut Call, core: &mut Core) {
    if let Some(pb) = call.playbacks.front() {
        if pb.started {
            let mut ev = Event::new("PlaybackFinished", json!({ "playback": playback_json(call, pb, "failed") }));
            ev.channel = Some(call.c1.id.clone());
            core.emit(ev);
        }
    }
    call.playbacks.clear();
}

// The call's life ---------------------------------------------------------------------------

fn fire(timer: Timer, call: &mut Call, core: &mut Core) {
    let key = timer.call;
    match timer.kind {
        TimerKind::Callee if timer.token == call.callee_token => {
            if std::mem::take(&mut call.callee_in_playback) {
                var2(call, core, "PLAYBACKSTATUS", "SUCCESS");
            }
            call.callee_awaiting_media = false;
            run_callee(key, call, core);
        }
        TimerKind::Menu if timer.token == call.menu_token => {
            if std::mem::take(&mut call.menu_in_playback) {
                var1(call, core, "PLAYBACKSTATUS", "SUCCESS");
            }
            run_menu(key, call, core);
        }
        TimerKind::Timeout if timer.token == call.timeout_token && !call.answered => originate_timeout(call, core),
        TimerKind::Playback => {
            let done = call.playbacks.front().is_some_and(|pb| pb.token == timer.token && pb.started);
            if done {
                if let Some(pb) = call.playbacks.pop_front() {
                    let mut ev =
                        Event::new("PlaybackFinished", json!({ "playback": playback_json(call, &pb, "done") }));
                    ev.channel = Some(call.c1.id.clone());
                    core.emit(ev);
                }
                start_next_playback(key, call, core);
            }
        }
        _ => {}
    }
}

/// Runs the callee's script until it has to wait.
fn run_callee(key: u64, call: &mut Call, core: &mut Core) {
    loop {
        let callee_gone = if call.local() { call.c2.is_none() } else { !call.c1_alive };
        if callee_gone {
            return;
        }
        let Some(act) = call.callee.get(call.callee_idx).cloned() else { return };
        call.callee_idx += 1;
        let wait = |call: &mut Call, core: &mut Core, d: Duration| {
            call.callee_token = core.token();
            core.schedule(key, TimerKind::Callee, call.callee_token, d);
        };
        match act {
            Act::Dp(app, data) => {
                call.callee_prio += 1;
                if let Some(c2) = &mut call.c2 {
                    c2.dialplan.priority = call.callee_prio;
                    c2.set_app(app, &data);
                    core.emit_channel("ChannelDialplan", c2, json!({"dialplan_app": app, "dialplan_app_data": data}));
                }
            }
            Act::Ring => {
                if !call.answered && call.c1.state == "Down" {
                    sc1(call, core, "Ringing");
                    dial(call, core, "RINGING");
                }
            }
            Act::Answer => answer(key, call, core),
            Act::AwaitMedia => {
                if !call.media {
                    call.callee_awaiting_media = true;
                    wait(call, core, ANSWER_MEDIA_WAIT);
                    return;
                }
            }
            Act::Wait(d) => {
                if !d.is_zero() {
                    wait(call, core, d);
                    return;
                }
            }
            Act::Playback(d) => {
                call.callee_in_playback = true;
                wait(call, core, d);
                return;
            }
            Act::Hangup(cause) => {
                callee_hangup(call, core, cause, 16);
                return;
            }
            Act::Busy => {
                // busy: ;2 goes Busy, Dial BUSY, and the originated channel ends with cause 0.
                sc2(call, core, "Busy");
                dial(call, core, "BUSY");
                hr2(call, core, 0, false);
                destroy_c1(call, core, 0, None);
                hr2(call, core, 16, true);
                destroy_c2(call, core, 17);
                return;
            }
            Act::Congestion => {
                // congestion: as busy, but Dial CONGESTION and ;2 cause 34.
                dial(call, core, "CONGESTION");
                sc2(call, core, "Busy");
                hr2(call, core, 0, false);
                hr2(call, core, 16, true);
                destroy_c2(call, core, 34);
                destroy_c1(call, core, 0, None);
                return;
            }
            Act::SipFail { cause, tech_cause, dialstatus } => {
                // busy_pjsip, rejected_pjsip.
                hr1(call, core, cause, false, Some(tech_cause));
                dial(call, core, dialstatus);
                destroy_c1(call, core, cause, Some(tech_cause));
                return;
            }
        }
    }
}

/// The callee answers: state changes, Dial ANSWER, then Stasis (app) or the dialplan.
fn answer(key: u64, call: &mut Call, core: &mut Core) {
    sc2(call, core, "Up");
    sc1(call, core, "Up");
    dial(call, core, "ANSWER");
    call.answered = true;
    call.timeout_token = 0;
    match call.mode.clone() {
        Mode::App { app, args } => {
            let mut data = app.clone();
            for a in &args {
                data.push(',');
                data.push_str(a);
            }
            call.c1.set_app("Stasis", &data);
            var1(call, core, "STASISSTATUS", "");
            core.emit(stasis_event("StasisStart", call, json!({ "args": args })));
            call.loc = Loc::Stasis;
            call.was_in_stasis = true;
        }
        Mode::Dialplan { context, exten, priority } => {
            call.loc = Loc::Dialplan;
            start_menu(key, call, core, &context, &exten, priority);
        }
    }
}

/// The caller side starts sending media: a callee waiting in `Answer()` goes on at once.
fn media_started(key: u64, call: &mut Call, core: &mut Core) {
    call.media = true;
    if std::mem::take(&mut call.callee_awaiting_media) {
        call.callee_token = core.token();
        core.schedule(key, TimerKind::Callee, call.callee_token, MEDIA_DELAY);
    }
}

fn start_menu(key: u64, call: &mut Call, core: &mut Core, context: &str, exten: &str, priority: usize) {
    media_started(key, call, core);
    match menu_steps(context, exten) {
        Some(steps) => {
            call.menu = steps;
            call.menu_ctx = (context.to_string(), exten.to_string());
            call.menu_idx = priority.saturating_sub(1);
            run_menu(key, call, core);
        }
        // No such extension: the channel leaves the dialplan and hangs up (not recorded).
        None => c1_dialplan_hangup(call, core),
    }
}

/// Runs the originated channel's dialplan until it has to wait.
fn run_menu(key: u64, call: &mut Call, core: &mut Core) {
    loop {
        if !call.c1_alive {
            return;
        }
        let Some(step) = call.menu.get(call.menu_idx).cloned() else {
            c1_dialplan_hangup(call, core);
            return;
        };
        call.menu_idx += 1;
        call.c1.dialplan = Location {
            context: call.menu_ctx.0.clone(),
            exten: call.menu_ctx.1.clone(),
            priority: call.menu_idx as i64,
            app_name: step.app.to_string(),
            app_data: step.data.to_string(),
        };
        core.emit_channel(
            "ChannelDialplan",
            &call.c1,
            json!({"dialplan_app": step.app, "dialplan_app_data": step.data}),
        );
        let wait = |call: &mut Call, core: &mut Core, d: Duration| {
            call.menu_token = core.token();
            core.schedule(key, TimerKind::Menu, call.menu_token, d);
        };
        match step.kind {
            MenuKind::Plain => {}
            MenuKind::Playback(d) => {
                call.menu_in_playback = true;
                wait(call, core, d);
                return;
            }
            MenuKind::Wait(d) => {
                wait(call, core, d);
                return;
            }
            MenuKind::Hangup => {
                c1_dialplan_hangup(call, core);
                return;
            }
            MenuKind::Goto(context, exten, priority) => match menu_steps(context, exten) {
                Some(steps) => {
                    call.menu = steps;
                    call.menu_ctx = (context.to_string(), exten.to_string());
                    call.menu_idx = priority.saturating_sub(1);
                }
                None => {
                    c1_dialplan_hangup(call, core);
                    return;
                }
            },
        }
    }
}

/// The originated channel's own dialplan hangs up (answered_app, answered_dialplan_subscribeall,
/// answered_pjsip). A channel that was in Stasis sets STASISSTATUS instead of showing a hangup
/// request.
fn c1_dialplan_hangup(call: &mut Call, core: &mut Core) {
    if call.was_in_stasis {
        var1(call, core, "STASISSTATUS", "SUCCESS");
    } else {
        hr1(call, core, 16, true, None);
    }
    if !call.local() {
        rtp_qos(call, core);
    }
    hr2(call, core, 16, false);
    destroy_c1(call, core, 16, None);
    c2_tail(call, core);
}

/// The callee hangs up (`Hangup()` on the `;2` half, a BYE, or DELETE of the `;2` half with
/// `soft_flag` 32).
fn callee_hangup(call: &mut Call, core: &mut Core, cause: u16, soft_flag: u16) {
    if !call.local() {
        // BYE from a PJSIP callee (not recorded): the RTP statistics come first, as on DELETE.
        rtp_qos(call, core);
        hr1(call, core, 16, false, None);
        c1_remote_hangup(call, core, 16);
        return;
    }
    call.callee_in_playback = false;
    if call.answered {
        // short_call, get_channel, answered_play.
        hr2(call, core, soft_flag, true);
        hr1(call, core, 16, false, None);
        destroy_c2(call, core, 16);
        c1_remote_hangup(call, core, 16);
    } else {
        // rejected: the caller side sees the callee's cause and Dial NOANSWER.
        hr2(call, core, soft_flag, true);
        hr1(call, core, cause, false, None);
        destroy_c2(call, core, cause);
        dial(call, core, "NOANSWER");
        destroy_c1(call, core, cause, None);
    }
}

/// The originated channel after the far end hung up an answered call.
fn c1_remote_hangup(call: &mut Call, core: &mut Core, cause: u16) {
    leave_on_hangup(call, core);
    destroy_c1(call, core, cause, None);
}

/// `DELETE` of the originated channel.
fn hangup_c1(call: &mut Call, core: &mut Core, cause: u16) {
    if !call.answered {
        // hangup_while_ringing, duplicate_channel_id.
        hr1(call, core, 32, true, None);
        dial(call, core, "NOANSWER");
        hr2(call, core, 16, false);
        hr2(call, core, 16, true);
        destroy_c1(call, core, cause, None);
        destroy_c2(call, core, 16);
        return;
    }
    // hangup_answered, answered_play_short, play_missing_sound, answered_play_pjsip.
    if !call.local() {
        rtp_qos(call, core);
    }
    hr1(call, core, 32, true, None);
    leave_on_hangup(call, core);
    hr2(call, core, 16, false);
    destroy_c1(call, core, cause, None);
    c2_tail(call, core);
}

/// The originate timeout while the callee has not answered: no final Dial event (no_answer,
/// no_answer_pjsip, callee_down_pjsip).
fn originate_timeout(call: &mut Call, core: &mut Core) {
    if call.local() {
        hr2(call, core, 19, false);
        destroy_c1(call, core, 19, None);
        hr2(call, core, 16, true);
        destroy_c2(call, core, 19);
    } else {
        destroy_c1(call, core, 19, Some(480));
    }
}

/// `core restart now` hangs every channel up with the shutdown flag (4) and cause 0
/// (asterisk_restart). PJSIP and not-yet-answered calls were not recorded; they follow the same
/// pattern.
fn restart_hangup(call: &mut Call, core: &mut Core) {
    hr2(call, core, 4, true);
    hr1(call, core, 4, true, None);
    hr2(call, core, 16, true);
    if !call.local() && call.answered {
        rtp_qos(call, core);
    }
    hr1(call, core, 0, false, None);
    leave_on_hangup(call, core);
    destroy_c1(call, core, 0, None);
    destroy_c2(call, core, 0);
}

/// Starts the first queued playback: PlaybackStarted (`playing`) always, even for a sound that
/// does not exist, which then fails in the same instant (play_missing_sound).
fn start_next_playback(key: u64, call: &mut Call, core: &mut Core) {
    let Some(pb) = call.playbacks.front_mut() else { return };
    if pb.started {
        return;
    }
    pb.started = true;
    let (token, duration) = (pb.token, pb.duration);
    let Some(pb) = call.playbacks.front() else { return };
    let mut ev = Event::new("PlaybackStarted", json!({ "playback": playback_json(call, pb, "playing") }));
    ev.channel = Some(call.c1.id.clone());
    core.emit(ev);
    match duration {
        Some(d) => {
            media_started(key, call, core);
            core.schedule(key, TimerKind::Playback, token, d);
        }
        None => {
            if let Some(pb) = call.playbacks.pop_front() {
                let mut ev = Event::new("PlaybackFinished", json!({ "playback": playback_json(call, &pb, "failed") }));
                ev.channel = Some(call.c1.id.clone());
                core.emit(ev);
            }
            start_next_playback(key, call, core);
        }
    }
}
