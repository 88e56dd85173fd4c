//! The call engine: originate a call, follow its ARI events to its true end, and never strand
//! or double-dial one.
//!
//! [`CallManager`] is a cheap-clone handle over `Arc<Shared>`. Its verbs are
//! [`originate`](CallManager::originate), [`get`](CallManager::get), [`list`](CallManager::list),
//! [`cancel`](CallManager::cancel) and [`watch`](CallManager::watch); [`run`](CallManager::run)
//! drives the event stream until the caller's shutdown future completes.
//!
//! The modules, one concept each:
//! - `request.rs`: [`CallRequest`] and its validation into a [`CallSpec`];
//! - `pacing.rs`: the calls-per-second bucket, the queue of calls waiting for it, and its
//!   dispatcher task;
//! - `calls.rs`: the live-call table and each call's writer task (every transition of a call
//!   goes through it, in order);
//! - `dial.rs`: the originate, its resends, and the REST commands events call for;
//! - `follow.rs`: what one event means for one call (pure, unit-tested);
//! - `reconcile.rs`: reconcile, deadlines and the sweep, on their own task;
//! - `updates.rs`: [`CallUpdates`];
//! - `instance.rs`: this process as one [`Instance`] among several over PostgreSQL (lease,
//!   take-overs, cancels from other instances, `LISTEN`), or alone on SQLite;
//! - this file: the handle, admission, cancel, and the event loop, which only interprets
//!   events and never awaits the store or ARI.
//!
//! How a call is followed:
//! 1. It is stored as `pending`, then dialled when the calls-per-second bucket has a token (at
//!    once, or from the queue, in order). Its `sent` mark is stored before `POST /channels`
//!    with `channelId` = the attempt's channel id, so events that outrun the originate
//!    response (they do) find it, and a restart knows it must not dial it again.
//! 2. Every event names its channel; ids that do not parse as one of ours, or belong to no
//!    live call, are dropped after a hash lookup. The rest go through the call's tracker
//!    (`follow.rs`), which turns them into transitions for the call's writer.
//! 3. After every WebSocket (re)connect and every missed deadline, active calls are checked
//!    against Asterisk: a channel Asterisk no longer knows ends the call (`lost` if it was
//!    never answered).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use tokio::sync::{oneshot, Notify};

use crate::ari::{AriClient, AriError, AriEvent, EventStream, StreamItem};
use crate::call::{now, Call, CallId, CallSpec, CallStatus, FailureReason, Step, Transition};
use crate::error::{Conflict, Error, Result};
use crate::store::{CallPage, CallQuery, CallStore};

mod calls;
mod dial;
// `pub(crate)` for `crate::ingest`, the event path without a store (benchmarks).
pub(crate) mod follow;
mod instance;
mod metrics;
mod pacing;
mod reconcile;
mod request;
mod updates;

use calls::LiveCalls;
use follow::Tracker;
/// The ARI event types the engine follows: it asks Asterisk for only these after every connect.
pub use follow::FOLLOWED_EVENTS;
pub use instance::{Instance, InstanceSettings};
use metrics::Metrics;
use pacing::Pacer;
pub use request::CallRequest;
use request::{answer_action, differences};
pub use updates::CallUpdates;

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
    /// Calls not yet ended (queued ones included), at most; past it `originate` is refused.
    pub max_active_calls: usize,
    /// Originates sent per second, at most, evenly spread (a trunk's CPS); `0` = no limit.
    pub max_calls_per_second: u32,
    /// Calls waiting for the rate, at most; past it `originate` is refused with
    /// [`Error::QueueFull`]. Unused without a rate limit.
    pub max_queued_calls: usize,
    /// How long an originate that gets no answer (connection refused, reset, timed out) is
    /// sent again before the call is given up as `lost`.
    pub originate_retry_window: Duration,
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
    /// Which status callbacks a call may ask for (off by default).
    pub callbacks: crate::webhook::CallbackPolicy,
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
            max_calls_per_second: 10,
            max_queued_calls: 1000,
            originate_retry_window: Duration::from_secs(30),
            max_attempts: 3,
            retry_delay: Duration::from_secs(30),
            ring_grace: Duration::from_secs(30),
            answered_silence: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(5),
            callbacks: crate::webhook::CallbackPolicy::default(),
        }
    }
}

/// What [`CallManager::originate`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Originated {
    /// The call as it stands: `pending` while queued, `dialing` or further once placed.
    pub call: Call,
    /// The request repeated an earlier one's idempotency key: this is that call, not a new one.
    pub replayed: bool,
    /// How long this request waited on ARI to take the originate, when it was dialled while
    /// the caller waited (not when queued, replayed, or answered before ARI did): what of the
    /// request's time was Asterisk's rather than ivr's.
    pub ari_time: Option<Duration>,
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
    /// The calls this process is following, with their trackers, writers and subscribers.
    calls: LiveCalls,
    pacer: Pacer,
    /// Asks the reconcile task for a run.
    reconcile: Notify,
    connected: AtomicBool,
    startup_time: Mutex<Option<String>>,
    /// This process's lease, on a SQL store (`instance.rs`).
    instance: Option<Instance>,
}

/// How long `originate` waits for a call dialled at once to be placed before it answers with
/// the call as it stands (`pending`); the placing goes on.
const PLACE_WAIT: Duration = Duration::from_secs(15);

/// How long after an adopted call's answer Asterisk is asked whether it waits in Stasis.
const STASIS_CHECK_DELAY: Duration = Duration::from_millis(250);

/// How long `cancel` waits for its transition to be recorded.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

impl CallManager {
    /// A manager placing calls through `ari`, keeping them in `store`, with its metrics in
    /// `registry`.
    pub fn new(
        ari: AriClient,
        store: Arc<dyn CallStore>,
        settings: ManagerSettings,
        registry: &Registry,
    ) -> Result<Self> {
        Self::with_instance(ari, store, settings, registry, None)
    }

    /// [`new`](Self::new) for an instance that joined a SQL store ([`Instance::join`]): it
    /// renews its lease, and on PostgreSQL shares the calls, the pacing and the event streams
    /// with the other instances. `ari` must be configured with [`Instance::app`] and `store`
    /// should be [`Instance::owning`] it.
    pub fn with_instance(
        ari: AriClient,
        store: Arc<dyn CallStore>,
        settings: ManagerSettings,
        registry: &Registry,
        instance: Option<Instance>,
    ) -> Result<Self> {
        if !settings.endpoint_template.contains("{number}") {
            return Err(Error::InvalidRequest("the endpoint template must contain {number}".into()));
        }
        let metrics = Metrics::register(registry).map_err(|e| Error::InvalidRequest(format!("metrics: {e}")))?;
        let pacer = Pacer::new(settings.max_calls_per_second, settings.max_queued_calls);
        Ok(CallManager {
            shared: Arc::new(Shared {
                ari,
                store,
                settings,
                metrics,
                calls: LiveCalls::default(),
                pacer,
                reconcile: Notify::new(),
                connected: AtomicBool::new(false),
                startup_time: Mutex::new(None),
                instance,
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

    /// Calls this process is following now (queued ones included).
    pub fn active_calls(&self) -> usize {
        self.shared.calls.len()
    }

    /// Calls waiting for the calls-per-second limit now.
    pub fn queued_calls(&self) -> usize {
        self.shared.pacer.queued()
    }

    /// The version ([`Call::version`]) of a call this process follows, as [`get`](Self::get)
    /// would read it from the live table now; `None` when `get` would ask the store (the call
    /// is not followed here, or its writer is applying a transition). A caller that kept
    /// something made from a call of this version may use it instead of calling `get`.
    pub fn live_version(&self, call_id: CallId) -> Option<usize> {
        self.shared.calls.settled_version(call_id)
    }

    /// The call as it stands. A call followed here is read from the live table (no store
    /// round trip), never older than a state this process has read from the store: while its
    /// writer is applying a transition, the store is asked instead (`LiveCalls::settled`).
    pub async fn get(&self, call_id: CallId) -> Result<Option<Call>> {
        if let Some(call) = self.shared.calls.settled(call_id) {
            return Ok(Some(call));
        }
        self.shared.store.get(call_id).await
    }

    pub async fn list(&self, query: &CallQuery) -> Result<CallPage> {
        self.shared.store.list(query).await
    }

    /// Places a call: validates, stores it as `pending`, and dials it when the
    /// calls-per-second limit allows. A call dialled at once is returned `dialing` (or further
    /// along, if its events were quicker); one that must wait is returned `pending` and dialled
    /// from the queue, in order.
    ///
    /// With an idempotency key, a repeated request returns the first call (`replayed`) and
    /// never dials again; the same key with a different request is
    /// [`Error::IdempotencyKeyReused`]. If Asterisk refuses, the call is stored as failed
    /// (`originate_failed`) and the error carries it. Past the active-call cap it is
    /// [`Error::TooManyActiveCalls`], past the queue bound [`Error::QueueFull`]. An originate
    /// Asterisk does not answer is sent again (see [`ManagerSettings::originate_retry_window`]);
    /// past 15 s of that the call is returned as it stands (`pending`) while the resends go on.
    pub async fn originate(&self, request: CallRequest) -> Result<Originated> {
        let shared = &self.shared;
        let spec = request.validate(&shared.settings)?;
        if let Some(key) = &spec.idempotency_key {
            if let Some(existing) = shared.store.get_by_idempotency_key(key).await? {
                return self.replay(existing, &spec);
            }
        }
        let refused = |outcome: &str| shared.metrics.originations.with_label_values(&[outcome]).inc();
        let reservation = shared.pacer.reserve().map_err(|full| {
            refused("queue_full");
            Error::QueueFull { limit: full.limit, retry_after: full.retry_after }
        })?;
        let call = Call::new(CallId::new(), spec, now());
        let tracker = Tracker::new(1, answer_action(&call.spec), call.spec.ring_timeout());
        if !self.follow(&call, tracker, Some(shared.settings.max_active_calls)) {
            refused("refused");
            return Err(Error::TooManyActiveCalls { limit: shared.settings.max_active_calls });
        }
        if let Err(e) = shared.store.insert(&call).await {
            self.forget(call.call_id);
            return match e {
                Error::AlreadyExists { on: Conflict::IdempotencyKey, existing } => self.replay(*existing, &call.spec),
                other => Err(other),
            };
        }
        tracing::info!(call_id = %call.call_id, "call accepted");
        if !reservation.admit(call.call_id) {
            shared.metrics.queued_calls.set(shared.pacer.queued() as i64);
            return Ok(Originated { call, replayed: false, ari_time: None });
        }
        let (reply, placed) = oneshot::channel();
        let manager = self.clone();
        let placing = call.clone();
        // On a task of its own, so a caller that goes away does not stop it halfway.
        tokio::spawn(async move { manager.place(placing, Some(reply)).await });
        match tokio::time::timeout(PLACE_WAIT, placed).await {
            Ok(Ok((result, ari_time))) => {
                result.map(|call| Originated { call, replayed: false, ari_time: Some(ari_time) })
            }
            _ => {
                let current = shared.calls.with(call.call_id, |c| c.current()).unwrap_or(call);
                Ok(Originated { call: current, replayed: false, ari_time: None })
            }
        }
    }

    /// The answer to a request whose idempotency key names `existing`.
    fn replay(&self, existing: Call, spec: &CallSpec) -> Result<Originated> {
        let fields = differences(&existing.spec, spec);
        if !fields.is_empty() {
            return Err(Error::IdempotencyKeyReused { call_id: existing.call_id, fields });
        }
        self.shared.metrics.originations.with_label_values(&["duplicate"]).inc();
        Ok(Originated { call: existing, replayed: true, ari_time: None })
    }

    /// Hangs up a call that is pending, dialing, ringing or answered. Returns the call as it
    /// stands; its end follows through the events. Canceling an ended call is
    /// [`Error::NotCancelable`].
    pub async fn cancel(&self, call_id: CallId) -> Result<Call> {
        let shared = &self.shared;
        let call = shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?;
        if call.status.is_terminal() {
            return Err(Error::NotCancelable { call_id, status: call.status });
        }
        if !shared.calls.contains(call_id) {
            // Followed by another instance: it is asked (one writer per call).
            if let Some(answer) = self.cancel_elsewhere(&call).await? {
                return Ok(answer);
            }
        }
        let tracked = shared.calls.with(call_id, |c| c.tracker.cancel()).is_some();
        let cancel = |cause: &str| {
            Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Canceled }, cause)
                .for_attempt(call.attempt_number)
        };
        let recorded = |transition: Transition| async move {
            tokio::time::timeout(CANCEL_WAIT, self.write_or_apply(call_id, transition))
                .await
                .map_err(|_| Error::StoreUnavailable("the cancel could not be recorded in time".into()))?
        };
        if call.status == CallStatus::Pending {
            // Not dialing (queued, or between attempts). An originate in flight sees the flag
            // and hangs up what it placed.
            if shared.pacer.remove(call_id) {
                shared.metrics.queued_calls.set(shared.pacer.queued() as i64);
            }
            return recorded(cancel("canceled before dialing")).await;
        }
        tracing::info!(%call_id, "canceling call");
        match shared.ari.hangup(&call.channel_id()).await {
            Ok(()) => {}
            Err(AriError::NotFound { .. }) if !tracked => {
                return recorded(cancel("canceled; Asterisk no longer knew the channel")).await;
            }
            Err(AriError::NotFound { .. }) => {} // already ending: its ChannelDestroyed is on the way
            Err(e) => {
                self.count_ari_error(&e);
                return Err(Error::Ari(e));
            }
        }
        Ok(shared.store.get(call_id).await?.unwrap_or(call))
    }

    /// Follows ARI's events until `shutdown` completes. Reconnects by itself; reconciles
    /// active calls after every (re)connect and checks deadlines every `sweep_interval`, on a
    /// task of its own, while the queue's dispatcher dials queued calls on another: this loop
    /// only interprets events, and never awaits the store or ARI.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut events = EventStream::connect(self.shared.ari.config().clone())?;
        let stats = events.stats();
        let metrics = &self.shared.metrics;
        let background = [tokio::spawn(reconcile::run(self.clone())), tokio::spawn(pacing::dispatch(self.clone()))];
        // Renewals and take-overs, on a task of their own; it ends only if the lease is lost.
        let mut lease = tokio::spawn(instance::run(self.clone()));
        tokio::pin!(shutdown);
        let mut outcome = Ok(());
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                lost = &mut lease => {
                    outcome = Err(lost.unwrap_or(Error::LeaseLost));
                    break;
                }
                item = events.next() => match item {
                    Some(item) => {
                        metrics.event_queue_depth.set(i64::try_from(stats.queue_depth()).unwrap_or(i64::MAX));
                        metrics.event_lag.set(stats.consumer_lag().as_secs_f64());
                        self.on_stream_item(item);
                    }
                    None => break,
                },
            }
        }
        for task in background {
            task.abort();
        }
        lease.abort();
        self.shared.connected.store(false, Ordering::Relaxed);
        metrics.ari_connected.set(0);
        if let (Some(instance), Ok(())) = (&self.shared.instance, &outcome) {
            instance.leave().await;
        }
        outcome
    }

    /// Counts a failed ARI request, by kind only.
    fn count_ari_error(&self, e: &AriError) {
        self.shared.metrics.ari_errors.with_label_values(&[e.kind()]).inc();
    }

    fn on_stream_item(&self, item: StreamItem) {
        let shared = &self.shared;
        match item {
            StreamItem::Event(event) => {
                shared.metrics.events.inc();
                self.on_event(event);
            }
            StreamItem::Connected { connection } => {
                shared.connected.store(true, Ordering::Relaxed);
                shared.metrics.ari_connected.set(1);
                if connection > 1 {
                    shared.metrics.ws_reconnects.inc();
                }
                self.filter_events();
                self.reconcile_soon();
            }
            StreamItem::Disconnected { .. } | StreamItem::Replaced { .. } => {
                shared.connected.store(false, Ordering::Relaxed);
                shared.metrics.ari_connected.set(0);
                shared.calls.each(|c| c.tracker.note_gap());
            }
            StreamItem::ConnectFailed { .. } => {
                shared.connected.store(false, Ordering::Relaxed);
                shared.metrics.ari_connected.set(0);
            }
        }
    }

    /// Asks Asterisk, on a task of its own, to send the application only the events the
    /// engine follows (`follow::FOLLOWED_EVENTS`). Until that lands, and if it fails, every
    /// event still comes and the others are dropped here, as before: the filter saves work,
    /// nothing depends on it. Asked after every connect: an Asterisk restart forgets it.
    fn filter_events(&self) {
        let manager = self.clone();
        tokio::spawn(async move {
            let ari = &manager.shared.ari;
            match ari.filter_events(&ari.config().app, follow::FOLLOWED_EVENTS).await {
                Ok(_) => tracing::debug!("ARI events filtered to the followed types"),
                Err(AriError::NotFound { message }) => tracing::info!(
                    %message,
                    "this Asterisk has no event filter (before 16.3?): every event of the application comes"
                ),
                Err(e) => {
                    manager.count_ari_error(&e);
                    tracing::warn!(error = %e, "could not filter ARI events; every event of the application comes");
                }
            }
        });
    }

    fn on_event(&self, event: AriEvent) {
        let Some((call_id, attempt, half)) = follow::route(&event) else { return };
        let reacted = self.shared.calls.with(call_id, |c| {
            if c.tracker.attempt() != attempt {
                return (None, None);
            }
            let reaction = c.tracker.on_event(&event, half);
            if let Some(transition) = reaction.transition {
                c.send(transition);
            }
            (reaction.command, c.tracker.wants_stasis_check().then(|| c.current()))
        });
        tracing::debug!(%call_id, event = event.kind(), "ARI event");
        let Some((command, stasis_check)) = reacted else { return };
        if let Some(command) = command {
            let manager = self.clone();
            tokio::spawn(async move { manager.run_command(call_id, attempt, command).await });
        }
        if let Some(call) = stasis_check {
            let manager = self.clone();
            tokio::spawn(async move {
                // A StasisStart that does come (our own application's) comes first.
                tokio::time::sleep(STASIS_CHECK_DELAY).await;
                manager.check_with_asterisk(vec![call], &Default::default()).await;
            });
        }
    }
}
