//! The call engine: originate a call, follow its ARI events to its true end, and never strand
//! or double-dial one.
//!
//! [`CallManager`] is a cheap-clone handle over `Arc<Shared>`. Its verbs are
//! [`originate`](CallManager::originate), [`get`](CallManager::get), [`list`](CallManager::list),
//! [`cancel`](CallManager::cancel) and [`watch`](CallManager::watch); [`run`](CallManager::run)
//! drives the event stream until the caller's shutdown future completes.
//!
//! How a call is followed:
//! 1. It is stored as `pending` first, so events that outrun the originate response (they do)
//!    find it; then `POST /channels` with `channelId` = the attempt's channel id.
//! 2. Every event names its channel; ids that do not parse as one of ours, or belong to no
//!    live call, are dropped after a hash lookup. The rest go through the call's
//!    tracker (`follow.rs`), which turns them into transitions; the store applies them atomically.
//! 3. After every WebSocket (re)connect and every missed deadline, active
//!    calls are reconciled with `GET /channels/{id}`: a channel Asterisk no longer knows ends
//!    the call (`lost` if it was never answered).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::Registry;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::ari::{
    AriClient, AriError, AriEvent, ChannelState, EventStream, OriginateRequest, OriginateTarget, StreamItem,
};
use crate::call::{now, Call, CallId, CallStatus, FailureReason, NewCall, PhoneNumber, Step, Transition};
use crate::error::{Conflict, Error, Result};
use crate::store::{Applied, CallPage, CallQuery, CallStore};

// `pub(crate)` for `crate::ingest`, the event path without a store (benchmarks).
pub(crate) mod follow;
mod metrics;

use follow::{AnswerAction, Command, Half, Tracker};
use metrics::Metrics;

/// How the manager places and follows calls. Every field has a sensible default.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    /// The dial string; `{number}` becomes the validated phone number.
    pub endpoint_template: String,
    pub default_context: String,
    pub default_extension: String,
    pub default_priority: u32,
    /// Seconds of ringing before Asterisk gives up.
    pub default_timeout_secs: u32,
    pub default_caller_id: Option<String>,
    /// Calls not yet ended, at most; past it `originate` is refused.
    pub max_active_calls: usize,
    /// The most attempts a request may ask for (retries on busy, no answer, congestion).
    pub max_attempts: u32,
    /// The pause before a retry.
    pub retry_delay: Duration,
    /// How long past its ring timeout an unanswered call may go unheard before Asterisk is asked.
    pub ring_grace: Duration,
    /// How long an answered call may go without any event before Asterisk is asked.
    pub answered_silence: Duration,
    /// How often deadlines are checked.
    pub sweep_interval: Duration,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            endpoint_template: "PJSIP/{number}@trunk".into(),
            default_context: "ivr-menu".into(),
            default_extension: "s".into(),
            default_priority: 1,
            default_timeout_secs: 30,
            default_caller_id: None,
            max_active_calls: 100,
            max_attempts: 3,
            retry_delay: Duration::from_secs(30),
            ring_grace: Duration::from_secs(30),
            answered_silence: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

/// What a caller asks for. Unset fields take the settings' defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallRequest {
    pub phone_number: Option<PhoneNumber>,
    pub context: Option<String>,
    pub extension: Option<String>,
    pub priority: Option<u32>,
    pub timeout_secs: Option<u32>,
    pub caller_id: Option<String>,
    /// Play this media once answered (e.g. `sound:hello-world`) instead of the dialplan.
    pub audio: Option<String>,
    pub variables: BTreeMap<String, String>,
    /// Attempts in all (1 = no retry).
    pub max_attempts: Option<u32>,
    pub idempotency_key: Option<String>,
}

impl CallRequest {
    /// The longest idempotency key accepted, in characters.
    pub const MAX_IDEMPOTENCY_KEY: usize = 255;

    pub fn to(phone_number: PhoneNumber) -> Self {
        CallRequest { phone_number: Some(phone_number), ..CallRequest::default() }
    }
}

/// The call engine. Clone it freely: every clone drives the same calls.
#[derive(Clone)]
pub struct CallManager {
    shared: Arc<Shared>,
}

struct Shared {
    ari: AriClient,
    store: Arc<dyn CallStore>,
    settings: ManagerSettings,
    metrics: Metrics,
    /// The calls this process is following, with their event scratch and subscribers.
    live: Mutex<HashMap<CallId, LiveCall>>,
    connected: AtomicBool,
    startup_time: Mutex<Option<String>>,
}

struct LiveCall {
    tracker: Tracker,
    updates: watch::Sender<Call>,
    /// Transitions from events, applied in order by the call's own task, so the event loop
    /// never waits on the store and one slow call does not hold up the others.
    transitions: mpsc::UnboundedSender<Transition>,
}

/// Bounds of the pause between two tries of a transition while the store is unavailable.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long our channel's end waits for its callee half's end, which carries the cause.
const SIBLING_WAIT: Duration = Duration::from_millis(250);

impl CallManager {
    /// A manager placing calls through `ari`, keeping them in `store`, with its metrics in
    /// `registry`.
    pub fn new(
        ari: AriClient,
        store: Arc<dyn CallStore>,
        settings: ManagerSettings,
        registry: &Registry,
    ) -> Result<Self> {
        if !settings.endpoint_template.contains("{number}") {
            return Err(Error::InvalidRequest("the endpoint template must contain {number}".into()));
        }
        let metrics = Metrics::register(registry).map_err(|e| Error::InvalidRequest(format!("metrics: {e}")))?;
        Ok(CallManager {
            shared: Arc::new(Shared {
                ari,
                store,
                settings,
                metrics,
                live: Mutex::new(HashMap::new()),
                connected: AtomicBool::new(false),
                startup_time: Mutex::new(None),
            }),
        })
    }

    pub fn settings(&self) -> &ManagerSettings {
        &self.shared.settings
    }

    pub fn store(&self) -> &Arc<dyn CallStore> {
        &self.shared.store
    }

    /// Whether the ARI event WebSocket is up (for readiness).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Calls this process is following now.
    pub fn active_calls(&self) -> usize {
        self.live().len()
    }

    pub async fn get(&self, call_id: CallId) -> Result<Option<Call>> {
        self.shared.store.get(call_id).await
    }

    pub async fn list(&self, query: &CallQuery) -> Result<CallPage> {
        self.shared.store.list(query).await
    }

    /// Places a call: validates, stores it as `pending`, then asks Asterisk to dial. Returns
    /// the call as `dialing` (or further along, if its events were quicker).
    ///
    /// With an idempotency key, a repeated request returns the first call and never dials
    /// again. If Asterisk refuses, the call is stored as failed (`originate_failed`) and the
    /// error carries it.
    pub async fn originate(&self, request: CallRequest) -> Result<Call> {
        let shared = &self.shared;
        let new_call = self.validate(request)?;
        if let Some(key) = &new_call.idempotency_key {
            if let Some(existing) = shared.store.get_by_idempotency_key(key).await? {
                shared.metrics.originations.with_label_values(&["duplicate"]).inc();
                return Ok(existing);
            }
        }
        let call = Call::new(CallId::new(), new_call, now());
        let on_answer = answer_action(&call);
        let ring_timeout = Duration::from_secs(u64::from(call.timeout_secs));
        {
            let mut live = self.live();
            if live.len() >= shared.settings.max_active_calls {
                shared.metrics.originations.with_label_values(&["refused"]).inc();
                return Err(Error::TooManyActiveCalls { limit: shared.settings.max_active_calls });
            }
            live.insert(call.call_id, self.live_call(&call, Tracker::new(1, on_answer, ring_timeout)));
            shared.metrics.active_calls.set(live.len() as i64);
        }
        if let Err(e) = shared.store.insert(&call).await {
            self.forget(call.call_id);
            return match e {
                Error::AlreadyExists { on: Conflict::IdempotencyKey, existing } => {
                    shared.metrics.originations.with_label_values(&["duplicate"]).inc();
                    Ok(*existing)
                }
                other => Err(other),
            };
        }
        tracing::info!(call_id = %call.call_id, "call accepted");
        self.place(call).await
    }

    /// Hangs up a call that is pending, dialing, ringing or answered. Returns the call as it
    /// stands; its end follows through the events. Canceling an ended call is
    /// [`Error::NotCancelable`].
    pub async fn cancel(&self, call_id: CallId) -> Result<Call> {
        let call = self.shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?;
        if call.status.is_terminal() {
            return Err(Error::NotCancelable { call_id, status: call.status });
        }
        let tracked = self.with_tracker(call_id, |t| t.canceled = true).is_some();
        let cancel = |cause: &str| {
            Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Canceled }, cause)
                .for_attempt(call.attempt_number)
        };
        if call.status == CallStatus::Pending {
            // Not dialing (yet, or between attempts). An originate in flight sees the flag and
            // hangs up what it placed.
            return self.apply(call_id, cancel("canceled before dialing")).await;
        }
        tracing::info!(%call_id, "canceling call");
        match self.shared.ari.hangup(&call.channel_id()).await {
            Ok(()) => {}
            Err(AriError::NotFound { .. }) if !tracked => {
                return self.apply(call_id, cancel("canceled; Asterisk no longer knew the channel")).await;
            }
            Err(AriError::NotFound { .. }) => {} // already ending: its ChannelDestroyed is on the way
            Err(e) => {
                self.count_ari_error(&e);
                return Err(Error::Ari(e));
            }
        }
        Ok(self.shared.store.get(call_id).await?.unwrap_or(call))
    }

    /// The call's current state, then each new state as it happens; ends after the call does.
    pub async fn watch(&self, call_id: CallId) -> Result<CallUpdates> {
        let receiver = self.live().get(&call_id).map(|c| c.updates.subscribe());
        let current = match &receiver {
            Some(rx) => rx.borrow().clone(),
            None => self.shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?,
        };
        Ok(CallUpdates { manager: self.clone(), call_id, first: Some(current), receiver, seen: 0, done: false })
    }

    /// Follows ARI's events until `shutdown` completes. Reconnects by itself; reconciles
    /// active calls after every (re)connect and checks deadlines every `sweep_interval`.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut events = EventStream::connect(self.shared.ari.config().clone())?;
        let mut sweep = tokio::time::interval(self.shared.settings.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                item = events.next() => match item {
                    Some(item) => self.on_stream_item(item).await,
                    None => break,
                },
                _ = sweep.tick() => self.sweep().await,
            }
        }
        self.shared.connected.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn live(&self) -> MutexGuard<'_, HashMap<CallId, LiveCall>> {
        // Every critical section is a few map operations without await; a panic inside one
        // cannot leave a half-made entry, so a poisoned lock is still sound.
        self.shared.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_tracker<T>(&self, call_id: CallId, f: impl FnOnce(&mut Tracker) -> T) -> Option<T> {
        self.live().get_mut(&call_id).map(|c| f(&mut c.tracker))
    }

    /// The entry for a call we start following, with its transition task.
    fn live_call(&self, call: &Call, tracker: Tracker) -> LiveCall {
        let (updates, _) = watch::channel(call.clone());
        let (transitions, mut queue) = mpsc::unbounded_channel::<Transition>();
        let manager = self.clone();
        let call_id = call.call_id;
        tokio::spawn(async move {
            // Ends when the call is let go and its sender dropped.
            while let Some(transition) = queue.recv().await {
                let mut pause = STORE_RETRY_MIN;
                loop {
                    match manager.apply(call_id, transition.clone()).await {
                        Ok(_) => break,
                        // The store is down: keep this transition (and, behind it, the rest of
                        // the call's) until it is back, so no step of the call is lost.
                        Err(Error::StoreUnavailable(e)) => {
                            tracing::warn!(%call_id, error = %e, ?pause, "store unavailable; will record the transition again");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(STORE_RETRY_MAX);
                        }
                        Err(e) => {
                            tracing::error!(%call_id, error = %e, "could not record a transition");
                            break;
                        }
                    }
                }
            }
        });
        LiveCall { tracker, updates, transitions }
    }

    fn forget(&self, call_id: CallId) {
        let mut live = self.live();
        live.remove(&call_id);
        self.shared.metrics.active_calls.set(live.len() as i64);
    }

    /// Counts a failed ARI request, by kind only.
    fn count_ari_error(&self, e: &AriError) {
        self.shared.metrics.ari_errors.with_label_values(&[e.kind()]).inc();
    }

    fn validate(&self, request: CallRequest) -> Result<NewCall> {
        let s = &self.shared.settings;
        let phone_number =
            request.phone_number.ok_or_else(|| Error::InvalidRequest("phone_number is required".into()))?;
        let context = request.context.unwrap_or_else(|| s.default_context.clone());
        let extension = request.extension.unwrap_or_else(|| s.default_extension.clone());
        check_name("context", &context, |c| c.is_ascii_alphanumeric() || "-_.".contains(c))?;
        check_name("extension", &extension, |c| c.is_ascii_alphanumeric() || "-_.+*#".contains(c))?;
        let priority = request.priority.unwrap_or(s.default_priority);
        if priority == 0 {
            return Err(Error::InvalidRequest("priority starts at 1".into()));
        }
        let timeout_secs = request.timeout_secs.unwrap_or(s.default_timeout_secs);
        if !(1..=3600).contains(&timeout_secs) {
            return Err(Error::InvalidRequest(format!("timeout must be 1 to 3600 seconds, not {timeout_secs}")));
        }
        let caller_id = request.caller_id.or_else(|| s.default_caller_id.clone());
        if let Some(caller_id) = &caller_id {
            check_text("caller_id", caller_id, 80)?;
        }
        if let Some(audio) = &request.audio {
            check_text("audio", audio, 256)?;
            let known = ["sound:", "recording:", "number:", "digits:", "characters:", "tone:"];
            if !known.iter().any(|scheme| audio.starts_with(scheme) && audio.len() > scheme.len()) {
                return Err(Error::InvalidRequest(format!(
                    "audio must be a media URI starting with one of {}",
                    known.join(", ")
                )));
            }
        }
        for (name, value) in &request.variables {
            check_name("variable name", name, |c| c.is_ascii_alphanumeric() || "_()".contains(c))?;
            check_text("variable value", value, 1024)?;
        }
        let max_attempts = request.max_attempts.unwrap_or(1);
        if !(1..=s.max_attempts).contains(&max_attempts) {
            return Err(Error::InvalidRequest(format!(
                "max_attempts must be 1 to {}, not {max_attempts}",
                s.max_attempts
            )));
        }
        if let Some(key) = &request.idempotency_key {
            check_text("idempotency key", key, CallRequest::MAX_IDEMPOTENCY_KEY)?;
        }
        Ok(NewCall {
            phone_number,
            context,
            extension,
            priority,
            caller_id,
            timeout_secs,
            audio: request.audio,
            variables: request.variables,
            max_attempts,
            idempotency_key: request.idempotency_key,
        })
    }

    /// Sends the originate for the call's current attempt and records the outcome.
    async fn place(&self, call: Call) -> Result<Call> {
        let shared = &self.shared;
        let attempt = call.attempt_number;
        let channel_id = call.channel_id();
        let mut variables = call.variables.clone();
        variables.insert("IVR_CALL_ID".into(), call.call_id.to_string());
        variables.insert("IVR_ATTEMPT".into(), attempt.to_string());
        let request = OriginateRequest {
            endpoint: shared.settings.endpoint_template.replace("{number}", call.phone_number.as_str()),
            channel_id: channel_id.clone(),
            target: OriginateTarget::App { app: shared.ari.config().app.clone(), app_args: None },
            caller_id: call.caller_id.clone(),
            timeout_secs: Some(call.timeout_secs),
            variables,
        };
        let started = Instant::now();
        let mut result = shared.ari.originate(&request).await;
        if let Some(e) = result.as_ref().err().filter(|e| e.is_connection_failure()) {
            // We cannot tell whether Asterisk took it. Asking again with the same channel id is
            // safe: a 409 then means it did.
            tracing::warn!(call_id = %call.call_id, error = %e, "originate unanswered; asking again");
            self.count_ari_error(e);
            result = shared.ari.originate(&request).await;
        }
        let placed = match result {
            Ok(channel) => Ok(Some(channel.name)),
            // Our own channel id already exists: an earlier try of this attempt was placed.
            Err(AriError::Conflict { .. }) => Ok(shared.ari.get_channel(&channel_id).await.ok().map(|c| c.name)),
            Err(e) => Err(e),
        };
        shared.metrics.originate_seconds.observe(started.elapsed().as_secs_f64());
        match placed {
            Ok(channel_name) => {
                shared.metrics.originations.with_label_values(&["dialing"]).inc();
                let canceled = self
                    .with_tracker(call.call_id, |t| {
                        t.dialed = Some(Instant::now());
                        t.canceled
                    })
                    .unwrap_or(true);
                let mut dialing = Transition::new(Step::Dialing, "originate accepted").for_attempt(attempt);
                if let Some(name) = channel_name {
                    dialing = dialing.channel(name);
                }
                let call = self.apply(call.call_id, dialing).await?;
                if canceled {
                    // Canceled while the originate was in flight: do not leave it ringing.
                    if let Err(e) = shared.ari.hangup(&channel_id).await {
                        if !matches!(e, AriError::NotFound { .. }) {
                            self.count_ari_error(&e);
                        }
                    }
                }
                tracing::info!(call_id = %call.call_id, attempt, status = %call.status, "originate accepted");
                Ok(call)
            }
            Err(e) => {
                shared.metrics.originations.with_label_values(&["failed"]).inc();
                tracing::warn!(call_id = %call.call_id, attempt, error = %e, "originate refused");
                let failed = Transition::new(
                    Step::Ended { reason_if_unanswered: FailureReason::OriginateFailed },
                    format!("originate refused: {e}"),
                )
                .for_attempt(attempt);
                self.count_ari_error(&e);
                let call = self.apply(call.call_id, failed).await?;
                Err(Error::OriginateFailed { call: Box::new(call), source: e })
            }
        }
    }

    /// Applies a transition in the store and reacts to what changed.
    async fn apply(&self, call_id: CallId, transition: Transition) -> Result<Call> {
        match self.shared.store.apply(call_id, &transition).await? {
            Applied::Changed(call) => {
                self.changed(&call);
                Ok(call)
            }
            Applied::Ignored { call, why } => {
                tracing::debug!(%call_id, cause = %transition.cause, %why, "transition ignored");
                Ok(call)
            }
        }
    }

    /// Publishes a new state and does what it calls for: metrics, a retry, or letting go.
    fn changed(&self, call: &Call) {
        let shared = &self.shared;
        tracing::info!(call_id = %call.call_id, status = %call.status, attempt = call.attempt_number, "call status");
        let mut retry = false;
        {
            let mut live = self.live();
            if let Some(entry) = live.get_mut(&call.call_id) {
                entry.updates.send_if_modified(|current| {
                    let newer = call.history.len() > current.history.len();
                    if newer {
                        *current = call.clone();
                    }
                    newer
                });
                if call.status == CallStatus::Pending && call.attempt_number > entry.tracker.attempt {
                    entry.tracker.next_attempt(call.attempt_number);
                    retry = !entry.tracker.canceled;
                }
            }
            if call.status.is_terminal() {
                live.remove(&call.call_id);
                shared.metrics.active_calls.set(live.len() as i64);
            }
        }
        match call.status {
            CallStatus::Answered => shared.metrics.answered.inc(),
            CallStatus::Failed => {
                let reason = call.failure_reason.map_or("unknown", |r| r.as_str());
                shared.metrics.failed.with_label_values(&[reason]).inc();
            }
            _ => {}
        }
        if retry {
            let manager = self.clone();
            let call = call.clone();
            tokio::spawn(async move { manager.retry(call).await });
        }
    }

    async fn retry(&self, call: Call) {
        tokio::time::sleep(self.shared.settings.retry_delay).await;
        match self.shared.store.get(call.call_id).await {
            Ok(Some(current))
                if current.status == CallStatus::Pending && current.attempt_number == call.attempt_number =>
            {
                if let Err(e) = self.place(current).await {
                    tracing::warn!(call_id = %call.call_id, error = %e, "retry could not be placed");
                }
            }
            Ok(_) => {} // canceled or moved on meanwhile
            Err(e) => tracing::error!(call_id = %call.call_id, error = %e, "retry: store unavailable"),
        }
    }

    async fn on_stream_item(&self, item: StreamItem) {
        let shared = &self.shared;
        match item {
            StreamItem::Event(event) => self.on_event(event),
            StreamItem::Connected { connection } => {
                shared.connected.store(true, Ordering::Relaxed);
                if connection > 1 {
                    shared.metrics.ws_reconnects.inc();
                }
                self.note_startup_time().await;
                self.spawn_reconcile("event stream connected");
            }
            StreamItem::ConnectFailed { .. } | StreamItem::Disconnected { .. } | StreamItem::Replaced { .. } => {
                shared.connected.store(false, Ordering::Relaxed);
            }
        }
    }

    fn on_event(&self, event: AriEvent) {
        let Some(channel_id) = event.channel_id() else { return };
        let Some((call_id, attempt)) = CallId::parse_channel_id(channel_id) else { return };
        let half = Half::of(channel_id);
        let command = {
            let mut live = self.live();
            let Some(entry) = live.get_mut(&call_id) else { return };
            if entry.tracker.attempt != attempt {
                return;
            }
            let reaction = entry.tracker.on_event(&event, half);
            if let Some(transition) = reaction.transition {
                let _ = entry.transitions.send(transition);
            }
            reaction.command
        };
        tracing::debug!(%call_id, event = event.kind(), "ARI event");
        if let Some(command) = command {
            let manager = self.clone();
            tokio::spawn(async move { manager.run_command(call_id, attempt, command).await });
        }
    }

    async fn run_command(&self, call_id: CallId, attempt: u32, command: Command) {
        let ari = &self.shared.ari;
        let channel_id = &call_id.channel_id(attempt);
        let result = match &command {
            Command::FinishEnd => {
                tokio::time::sleep(SIBLING_WAIT).await;
                let mut live = self.live();
                if let Some(entry) = live.get_mut(&call_id) {
                    if let Some(end) = entry.tracker.finish_pending_end() {
                        let _ = entry.transitions.send(end);
                    }
                }
                return;
            }
            Command::OnAnswer(AnswerAction::Continue { context, extension, priority }) => {
                ari.continue_in_dialplan(channel_id, context, extension, *priority).await
            }
            Command::OnAnswer(AnswerAction::Play { media }) => ari.play(channel_id, media, None).await.map(drop),
            Command::HangUp => ari.hangup(channel_id).await,
        };
        match result {
            Ok(()) | Err(AriError::NotFound { .. }) => {} // gone already: its end is on the way
            Err(e) => {
                tracing::warn!(%call_id, ?command, error = %e, "ARI command failed");
                self.count_ari_error(&e);
            }
        }
    }

    async fn note_startup_time(&self) {
        match self.shared.ari.asterisk_info().await {
            Ok(info) => {
                let startup = info.status.map(|s| s.startup_time);
                let mut known = self.shared.startup_time.lock().unwrap_or_else(|e| e.into_inner());
                if known.is_some() && *known != startup {
                    tracing::warn!("Asterisk restarted: every channel it had is gone");
                }
                *known = startup;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read Asterisk's startup time");
                self.count_ari_error(&e);
            }
        }
    }

    fn spawn_reconcile(&self, why: &'static str) {
        let manager = self.clone();
        tokio::spawn(async move {
            let calls = match manager.shared.store.list_active().await {
                Ok(calls) => calls,
                Err(e) => return tracing::error!(error = %e, "reconcile: store unavailable"),
            };
            tracing::info!(why, calls = calls.len(), "reconciling active calls with Asterisk");
            for call in calls {
                manager.reconcile(call).await;
            }
        });
    }

    /// Brings one active call in line with what Asterisk knows of its channel.
    async fn reconcile(&self, call: Call) {
        let call_id = call.call_id;
        let tracked = self.live().contains_key(&call_id);
        if call.status == CallStatus::Pending && tracked {
            return; // our originate or retry is in progress
        }
        let ended = |cause: &str| {
            Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Lost }, cause)
                .for_attempt(call.attempt_number)
        };
        match self.shared.ari.get_channel(&call.channel_id()).await {
            Ok(channel) => {
                if !tracked {
                    self.adopt(&call);
                }
                // Answered and still waiting in our application: its StasisStart was missed
                // (or its follower stopped right after it), so the answer action is still due.
                let waiting_in_stasis = channel.state == ChannelState::Up
                    && channel.dialplan.as_ref().is_some_and(|d| d.app_name == "Stasis");
                let timestamp = String::new();
                let event = if waiting_in_stasis {
                    AriEvent::StasisStart { timestamp, args: Vec::new(), channel }
                } else {
                    AriEvent::ChannelStateChange { timestamp, channel }
                };
                self.on_event(event);
            }
            Err(AriError::NotFound { .. }) => {
                let cause = if call.status == CallStatus::Pending {
                    "not confirmed: ivr stopped before Asterisk accepted the originate"
                } else {
                    "reconciled: Asterisk no longer knows the channel"
                };
                if let Err(e) = self.apply(call_id, ended(cause)).await {
                    tracing::error!(%call_id, error = %e, "reconcile: could not record the end");
                }
                self.forget(call_id);
            }
            Err(e) => {
                // Asked again at the call's next deadline (if followed here) or next reconcile.
                tracing::warn!(%call_id, error = %e, "reconcile: Asterisk did not answer");
                self.count_ari_error(&e);
            }
        }
    }

    /// Starts following a call this process did not place (found active after a restart).
    fn adopt(&self, call: &Call) {
        let ring_timeout = Duration::from_secs(u64::from(call.timeout_secs));
        let mut tracker = Tracker::new(call.attempt_number, answer_action(call), ring_timeout);
        tracker.dialed = Some(Instant::now());
        // A channel still in Stasis has not been continued into the dialplan, so that action is
        // always safe to (re)send. A playback keeps the channel in Stasis; if the call was
        // already answered, its audio is taken as started rather than played twice.
        tracker.answer_action_started = call.status == CallStatus::Answered && call.audio.is_some();
        let entry = self.live_call(call, tracker);
        let mut live = self.live();
        live.entry(call.call_id).or_insert(entry);
        self.shared.metrics.active_calls.set(live.len() as i64);
    }

    /// Asks Asterisk about calls whose end may have been missed.
    async fn sweep(&self) {
        let settings = &self.shared.settings;
        let overdue: Vec<CallId> = {
            let now = Instant::now();
            let mut live = self.live();
            live.iter_mut()
                .filter_map(|(id, entry)| {
                    let t = &mut entry.tracker;
                    let deadline = if t.answered {
                        t.last_event + settings.answered_silence
                    } else {
                        t.dialed? + t.ring_timeout + settings.ring_grace
                    };
                    (now >= deadline).then(|| {
                        // Checked now; the next check waits a whole period again.
                        t.last_event = now;
                        t.dialed = Some(now);
                        *id
                    })
                })
                .collect()
        };
        for call_id in overdue {
            tracing::info!(%call_id, "deadline passed without an end; asking Asterisk");
            match self.shared.store.get(call_id).await {
                Ok(Some(call)) if call.is_active() => self.reconcile(call).await,
                Ok(_) => self.forget(call_id),
                Err(e) => tracing::error!(%call_id, error = %e, "deadline check: store unavailable"),
            }
        }
    }
}

/// A call's states as they happen: the current one first, the last one terminal.
pub struct CallUpdates {
    manager: CallManager,
    call_id: CallId,
    first: Option<Call>,
    receiver: Option<watch::Receiver<Call>>,
    /// History length of the last state handed out.
    seen: usize,
    done: bool,
}

impl CallUpdates {
    /// The next state; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Call> {
        loop {
            if self.done {
                return None;
            }
            let candidate = match self.first.take() {
                Some(first) => first,
                None => match &mut self.receiver {
                    Some(rx) => match rx.changed().await {
                        Ok(()) => rx.borrow_and_update().clone(),
                        // No longer followed here: the store has its last word.
                        Err(_) => {
                            self.receiver = None;
                            continue;
                        }
                    },
                    None => {
                        let call = self.manager.shared.store.get(self.call_id).await.ok().flatten()?;
                        if call.history.len() <= self.seen && call.is_active() {
                            // Followed by no one in this process (e.g. found after a restart):
                            // look again shortly.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        call
                    }
                },
            };
            if candidate.history.len() > self.seen {
                self.seen = candidate.history.len();
                self.done = candidate.is_completed();
                return Some(candidate);
            }
            if candidate.is_completed() {
                self.done = true;
            }
        }
    }
}

fn answer_action(call: &Call) -> AnswerAction {
    match &call.audio {
        Some(media) => AnswerAction::Play { media: media.clone() },
        None => AnswerAction::Continue {
            context: call.context.clone(),
            extension: call.extension.clone(),
            priority: call.priority,
        },
    }
}

fn check_name(what: &str, value: &str, allowed: impl Fn(char) -> bool) -> Result<()> {
    if value.is_empty() || value.len() > 80 {
        return Err(Error::InvalidRequest(format!("{what} must be 1 to 80 characters")));
    }
    match value.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(Error::InvalidRequest(format!("{what} may not contain {c:?}"))),
        None => Ok(()),
    }
}

fn check_text(what: &str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(Error::InvalidRequest(format!("{what} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!("{what} may not contain control characters")));
    }
    Ok(())
}
