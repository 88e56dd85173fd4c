//! CallManager against the fake Asterisk, with each store kind: the outcome table of every
//! recorded scenario, and the faults the engine must survive.

mod common;

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use ivr_core::ari::{AriClient, AriConfig, ChannelState, EventStream, OriginateRequest, OriginateTarget, StreamItem};
use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
use ivr_core::manager::FOLLOWED_EVENTS;
use ivr_core::store::conformance::{new_call, postgres_in_fresh_schema};
use ivr_core::webhook::{Attempt, Delivery};
use ivr_core::{
    Call, CallManager, CallRequest, CallStatus, CallStore, Error, FailureReason, ManagerSettings, MemoryCallStore,
    PhoneNumber, SqlCallStore, Step, Transition,
};
use prometheus::Registry;
use tokio::sync::oneshot;

use common::{counter, counter_with};

const WAIT: Duration = Duration::from_secs(20);
const LOCAL: &str = "Local/{number}@sim";
const PJSIP: &str = "PJSIP/{number}@trunk";

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    common::within(what, WAIT, fut).await
}

/// Every store kind this run can use: memory and SQLite always, PostgreSQL when configured.
async fn stores() -> Vec<(&'static str, Arc<dyn CallStore>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqlCallStore::open_sqlite(&dir.path().join("calls.db")).await.unwrap();
    let mut stores: Vec<(&'static str, Arc<dyn CallStore>, Option<tempfile::TempDir>)> =
        vec![("memory", Arc::new(MemoryCallStore::new()), None), ("sqlite", Arc::new(sqlite), Some(dir))];
    match std::env::var("IVR_TEST_DATABASE_URL") {
        Ok(url) => stores.push(("postgres", Arc::new(postgres_in_fresh_schema(&url).await.unwrap()), None)),
        Err(_) => {
            let _ = writeln!(std::io::stderr(), "skipped: the PostgreSQL store (IVR_TEST_DATABASE_URL is not set)");
        }
    }
    stores
}

struct Rig {
    fake: FakeAsterisk,
    manager: CallManager,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    runner: tokio::task::JoinHandle<()>,
}

impl Rig {
    async fn start(store: Arc<dyn CallStore>, settings: ManagerSettings) -> Rig {
        Self::start_on(FakeAsterisk::start_with(fast()).await.expect("fake Asterisk"), store, settings).await
    }

    async fn start_on(fake: FakeAsterisk, store: Arc<dyn CallStore>, settings: ManagerSettings) -> Rig {
        let mut ari = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
        ari.request_timeout = Duration::from_secs(5);
        ari.reconnect_min = Duration::from_millis(20);
        ari.reconnect_max = Duration::from_millis(200);
        let registry = Registry::new();
        let manager = CallManager::new(AriClient::new(ari).unwrap(), store, settings, &registry).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn({
            let manager = manager.clone();
            async move {
                manager.run(async { stopped.await.unwrap_or(()) }).await.expect("run");
            }
        });
        let rig = Rig { fake, manager, registry, stop: Some(stop), runner };
        rig.until_connected().await;
        rig
    }

    async fn until_connected(&self) {
        within("connect", async {
            while !self.manager.is_connected() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// Waits for the call's end through `watch`, checking the states come in order.
    async fn end_of(&self, call: &Call) -> Call {
        let mut updates = self.manager.watch(call.call_id).await.unwrap();
        let mut last = None;
        within("the call's end", async {
            while let Some(state) = updates.next().await {
                if let Some(previous) = &last {
                    let previous: &Call = previous;
                    assert!(state.history.len() > previous.history.len(), "each update is a new state");
                }
                last = Some(state);
            }
        })
        .await;
        let end = last.expect("at least the current state");
        assert!(end.is_completed(), "the updates end with the call: {:?}", end.status);
        assert_eq!(Some(&end), self.manager.get(call.call_id).await.unwrap().as_ref(), "the store agrees");
        end
    }

    async fn until_status(&self, call: &Call, status: CallStatus) {
        let mut updates = self.manager.watch(call.call_id).await.unwrap();
        within("status", async {
            while let Some(state) = updates.next().await {
                if state.status == status {
                    return;
                }
                assert!(state.is_active(), "ended as {} before reaching {status}", state.status);
            }
        })
        .await;
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within("run stops", &mut self.runner).await.unwrap();
    }
}

fn fast() -> FakeConfig {
    FakeConfig { time_scale: 0.03, ..FakeConfig::default() }
}

fn settings(template: &str) -> ManagerSettings {
    ManagerSettings {
        endpoint_template: template.into(),
        default_caller_id: Some("\"IVR Test\" <+15559990000>".into()),
        retry_delay: Duration::from_millis(20),
        // The tests dial as fast as they can; pacing has tests of its own.
        max_calls_per_second: 0,
        ..ManagerSettings::default()
    }
}

/// Places a call and returns it as `originate` left it.
async fn originate(manager: &CallManager, request: CallRequest) -> ivr_core::Result<Call> {
    manager.originate(request).await.map(|placed| placed.call)
}

fn to(number: &str) -> CallRequest {
    CallRequest::to(PhoneNumber::parse(number).unwrap())
}

/// A call to `number` that plays demo-congrats once answered: 30 s, 0.9 s at the fake's scale.
/// On +15550000007 that keeps the call up after the answer, where the recorded ivr-menu
/// dialplan alone hangs up 3.4 s (0.1 s) after it: too soon on a loaded machine for a test to
/// act on the answered call first.
fn playing(number: &str) -> CallRequest {
    CallRequest { audio: Some("sound:demo-congrats".into()), ..to(number) }
}

/// What the outcome table promises for one scenario.
struct Expect {
    status: CallStatus,
    reason: Option<FailureReason>,
    rang: bool,
    answered: bool,
    hangup_code: Option<u16>,
}

fn completed(rang: bool) -> Expect {
    Expect { status: CallStatus::Completed, reason: None, rang, answered: true, hangup_code: Some(16) }
}

fn failed(reason: FailureReason, rang: bool, hangup_code: Option<u16>) -> Expect {
    Expect { status: CallStatus::Failed, reason: Some(reason), rang, answered: false, hangup_code }
}

fn check(store: &str, scenario: &str, call: &Call, expect: &Expect) {
    let what = format!("{scenario} on {store}: {call:#?}");
    assert_eq!(call.status, expect.status, "{what}");
    assert_eq!(call.failure_reason, expect.reason, "{what}");
    assert_eq!(call.ringing_at.is_some(), expect.rang, "ringing_at, {what}");
    assert_eq!(call.answered_at.is_some(), expect.answered, "answered_at, {what}");
    assert!(call.ended_at.is_some(), "{what}");
    if let Some(code) = expect.hangup_code {
        assert_eq!(call.hangup.as_ref().map(|h| h.code), Some(code), "hangup cause, {what}");
    }
    // The history: accepted first, the end last, every status in between at most once and in order.
    let statuses: Vec<CallStatus> = call.history.iter().map(|r| r.status).collect();
    assert_eq!(statuses.first(), Some(&CallStatus::Pending), "{what}");
    assert_eq!(statuses.last(), Some(&expect.status), "{what}");
    assert_eq!(statuses.contains(&CallStatus::Ringing), expect.rang, "{what}");
    assert_eq!(statuses.contains(&CallStatus::Answered), expect.answered, "{what}");
    // `pending` twice at most: accepted, then sent to Asterisk.
    let order = |s: &CallStatus| CallStatus::ALL.iter().position(|x| x == s).unwrap().min(4);
    let pending = statuses.iter().take_while(|s| **s == CallStatus::Pending).count();
    assert!(pending <= 2, "accepted and sent: {statuses:?}");
    let rest = &statuses[pending - 1..];
    assert!(rest.windows(2).all(|w| order(&w[0]) < order(&w[1])), "history in order: {statuses:?}");
}

/// Runs one scenario on every store kind: `act` may act on the live call before its end.
async fn scenario<A, F>(name: &str, template: &str, request: CallRequest, expect: Expect, act: A)
where
    A: Fn(Rig, Call) -> F,
    F: Future<Output = (Rig, Call)>,
{
    for (store_name, store, _dir) in stores().await {
        let rig = Rig::start(store, settings(template)).await;
        let call = within("originate", originate(&rig.manager, request.clone())).await.expect("originate");
        let (rig, call) = act(rig, call).await;
        let end = rig.end_of(&call).await;
        check(store_name, name, &end, &expect);
        rig.stop().await;
    }
}

async fn as_is(rig: Rig, call: Call) -> (Rig, Call) {
    (rig, call)
}

/// Waits until the fake's application shows the engine's event filter.
async fn until_filtered(fake: &FakeAsterisk) {
    let want = serde_json::Value::from_iter(FOLLOWED_EVENTS.iter().map(|t| serde_json::json!({ "type": t })));
    within("the event filter", async {
        while fake.application("ivr").is_none_or(|app| app["events_allowed"] != want) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(fake.application("ivr").unwrap()["events_disallowed"], serde_json::json!([]));
}

/// After each connect the engine asks Asterisk for only the events it follows (a restart of
/// Asterisk forgets the filter; the reconnect sets it again), and calls end as recorded with
/// only those events coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_asks_asterisk_for_only_the_events_it_follows() {
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;
    until_filtered(&rig.fake).await;
    let call = within("originate", originate(&rig.manager, to("+15550000002"))).await.unwrap();
    check("memory", "busy, filtered", &rig.end_of(&call).await, &failed(FailureReason::Busy, true, Some(17)));

    within("restart", rig.fake.restart()).await;
    until_filtered(&rig.fake).await;
    let call = within("originate", originate(&rig.manager, playing("+15550000001"))).await.unwrap();
    check("memory", "answered, filtered", &rig.end_of(&call).await, &completed(true));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_app_continues_into_the_dialplan() {
    scenario("answered_app", LOCAL, to("+15550000001"), completed(true), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_call() {
    scenario("short_call", LOCAL, to("+15550000005"), completed(false), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy() {
    scenario("busy", LOCAL, to("+15550000002"), failed(FailureReason::Busy, true, Some(17)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn congestion() {
    scenario("congestion", LOCAL, to("+15550000003"), failed(FailureReason::Congestion, true, Some(34)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer() {
    let request = CallRequest { timeout_secs: Some(5), ..to("+15550000004") };
    scenario("no_answer", LOCAL, request, failed(FailureReason::NoAnswer, true, Some(19)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected() {
    scenario("rejected", LOCAL, to("+15550000006"), failed(FailureReason::Rejected, false, Some(21)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_number() {
    scenario("unknown_number", LOCAL, to("+15550009999"), failed(FailureReason::Unreachable, false, Some(0)), as_is)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_while_ringing_is_a_cancel() {
    let expect = failed(FailureReason::Canceled, true, Some(16));
    scenario("hangup_while_ringing", LOCAL, to("+15550000004"), expect, |rig, call| async move {
        rig.until_status(&call, CallStatus::Ringing).await;
        let canceled = within("cancel", rig.manager.cancel(call.call_id)).await.unwrap();
        assert!(canceled.is_active() || canceled.status == CallStatus::Failed);
        (rig, call)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_fail_the_originate_and_keep_the_call() {
    for (template, status) in [("Foo/{number}", 500), ("nobody{number}", 400), ("PJSIP/{number}", 500)] {
        for (store_name, store, _dir) in stores().await {
            let rig = Rig::start(store, settings(template)).await;
            let err = within("originate", originate(&rig.manager, to("+15550000001"))).await.unwrap_err();
            let Error::OriginateFailed { call, source } = err else {
                panic!("{template}: expected OriginateFailed, got {err}")
            };
            assert_eq!(source.status(), Some(status), "{template}: {source}");
            let stored = rig.manager.get(call.call_id).await.unwrap().expect("the failed call is stored");
            check(store_name, template, &stored, &failed(FailureReason::OriginateFailed, false, None));
            assert!(stored.history.last().unwrap().cause.contains(&status.to_string()), "{:?}", stored.history);
            rig.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_restart_with_the_call_up() {
    scenario(
        "asterisk_restart",
        LOCAL,
        playing("+15550000007"),
        Expect { hangup_code: Some(0), ..completed(true) },
        |rig, call| async move {
            rig.until_status(&call, CallStatus::Answered).await;
            within("restart", rig.fake.restart()).await;
            (rig, call)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_play_cut_by_the_callee() {
    scenario("answered_play", LOCAL, playing("+15550000001"), completed(true), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_missing_sound_hangs_up_and_keeps_the_failure() {
    let request = CallRequest { audio: Some("sound:no-such-sound-xyz".into()), ..to("+15550000007") };
    for (store_name, store, _dir) in stores().await {
        let rig = Rig::start(store, settings(LOCAL)).await;
        let call = within("originate", originate(&rig.manager, request.clone())).await.unwrap();
        let end = rig.end_of(&call).await;
        check(store_name, "play_missing_sound", &end, &completed(true));
        let last = &end.history.last().unwrap().cause;
        assert!(last.contains("playback of sound:no-such-sound-xyz failed"), "{last}");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_answered_is_a_cancel_that_completes() {
    scenario("hangup_answered", LOCAL, playing("+15550000007"), completed(true), |rig, call| async move {
        rig.until_status(&call, CallStatus::Answered).await;
        within("cancel", rig.manager.cancel(call.call_id)).await.unwrap();
        (rig, call)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_pjsip() {
    scenario("answered_pjsip", PJSIP, to("+15550000001"), completed(true), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pjsip() {
    scenario("busy_pjsip", PJSIP, to("+15550000002"), failed(FailureReason::Busy, true, Some(17)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_pjsip() {
    let request = CallRequest { timeout_secs: Some(5), ..to("+15550000004") };
    scenario("no_answer_pjsip", PJSIP, request, failed(FailureReason::NoAnswer, true, Some(19)), as_is).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_pjsip() {
    scenario("rejected_pjsip", PJSIP, to("+15550000006"), failed(FailureReason::Rejected, false, Some(21)), as_is)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_down_pjsip() {
    for (store_name, store, _dir) in stores().await {
        let fake = FakeAsterisk::start_with(fast()).await.unwrap();
        fake.set_plan("+15550000008", CalleePlan::Unreachable);
        let rig = Rig::start_on(fake, store, settings(PJSIP)).await;
        let request = CallRequest { timeout_secs: Some(10), ..to("+15550000008") };
        let call = within("originate", originate(&rig.manager, request)).await.unwrap();
        let end = rig.end_of(&call).await;
        check(store_name, "callee_down_pjsip", &end, &failed(FailureReason::NoAnswer, false, Some(19)));
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_events_are_applied_before_the_originate_returns() {
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;
    // The answer to the originate comes after the whole short call has happened.
    rig.fake.set_originate_delay(Duration::from_millis(200));
    let call = within("originate", originate(&rig.manager, to("+15550000006"))).await.unwrap();
    assert_eq!(call.status, CallStatus::Failed, "the call ended before its originate returned");
    check("memory", "early events", &call, &failed(FailureReason::Rejected, false, Some(21)));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_never_dials_twice() {
    for (store_name, store, _dir) in stores().await {
        let rig = Rig::start(store, settings(LOCAL)).await;
        let request = CallRequest { idempotency_key: Some("order-1".into()), ..to("+15550000004") };
        let first = within("first", rig.manager.originate(request.clone())).await.unwrap();
        let again = within("again", rig.manager.originate(request.clone())).await.unwrap();
        assert!(!first.replayed && again.replayed, "{store_name}: the second is a replay");
        assert_eq!(again.call.call_id, first.call.call_id, "{store_name}");
        assert_eq!(rig.fake.originate_count(), 1, "{store_name}: one POST /channels");
        // The same key with another request: refused, naming what differs; nothing dialled.
        let other = CallRequest { timeout_secs: Some(7), ..request.clone() };
        match within("reused", rig.manager.originate(other)).await {
            Err(Error::IdempotencyKeyReused { call_id, fields }) => {
                assert_eq!((call_id, fields), (first.call.call_id, vec!["timeout".to_owned()]), "{store_name}")
            }
            other => panic!("{store_name}: expected IdempotencyKeyReused, got {other:?}"),
        }
        assert_eq!(rig.fake.originate_count(), 1, "{store_name}: still one POST /channels");
        // Ten at once, too.
        let racing = CallRequest { idempotency_key: Some("order-2".into()), ..to("+15550000004") };
        let calls = join_all((0..10).map(|_| originate(&rig.manager, racing.clone()))).await;
        let ids: std::collections::HashSet<_> = calls.into_iter().map(|c| c.unwrap().call_id).collect();
        assert_eq!(ids.len(), 1, "{store_name}: one call for one key");
        assert_eq!(rig.fake.originate_count(), 2, "{store_name}: one more POST /channels");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_every_state() {
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;

    // Pending, between two attempts: the cancel ends it, and the retry never dials.
    let patient = ManagerSettings { retry_delay: Duration::from_secs(3600), ..settings(LOCAL) };
    let waiting = Rig::start(Arc::new(MemoryCallStore::new()), patient).await;
    let call = originate(&waiting.manager, CallRequest { max_attempts: Some(2), ..to("+15550000002") }).await.unwrap();
    within("back to pending for attempt 2", async {
        loop {
            let now = waiting.manager.get(call.call_id).await.unwrap().unwrap();
            if now.status == CallStatus::Pending && now.attempt_number == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let canceled = waiting.manager.cancel(call.call_id).await.unwrap();
    assert_eq!((canceled.status, canceled.failure_reason), (CallStatus::Failed, Some(FailureReason::Canceled)));
    assert_eq!(waiting.fake.originate_count(), 1, "the canceled retry was never dialled");
    assert_eq!(waiting.manager.active_calls(), 0);
    waiting.stop().await;

    // Dialing (right after the originate), ringing and answered.
    for (number, wait_for, expect) in [
        ("+15550000004", None, failed(FailureReason::Canceled, false, None)),
        ("+15550000004", Some(CallStatus::Ringing), failed(FailureReason::Canceled, true, Some(16))),
        ("+15550000007", Some(CallStatus::Answered), completed(true)),
    ] {
        let call = within("originate", originate(&rig.manager, to(number))).await.unwrap();
        if let Some(status) = wait_for {
            rig.until_status(&call, status).await;
        }
        within("cancel", rig.manager.cancel(call.call_id)).await.unwrap();
        let end = rig.end_of(&call).await;
        assert_eq!((end.status, end.failure_reason), (expect.status, expect.reason), "{:?}", end.history);
    }

    // Ended: a clear error.
    let call = within("originate", originate(&rig.manager, to("+15550000006"))).await.unwrap();
    let end = rig.end_of(&call).await;
    match rig.manager.cancel(call.call_id).await {
        Err(Error::NotCancelable { status, .. }) => assert_eq!(status, end.status),
        other => panic!("expected NotCancelable, got {other:?}"),
    }
    assert!(matches!(rig.manager.cancel(ivr_core::CallId::new()).await, Err(Error::NotFound(_))));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_mid_call_loses_nothing() {
    for (store_name, store, _dir) in stores().await {
        let rig = Rig::start(store, settings(LOCAL)).await;
        let call = within("originate", originate(&rig.manager, to("+15550000001"))).await.unwrap();
        rig.until_status(&call, CallStatus::Ringing).await;
        rig.fake.drop_websockets();
        let end = rig.end_of(&call).await;
        check(store_name, "dropped websocket", &end, &completed(true));
        rig.until_connected().await;
        let reconnects = counter(&rig.registry, "ivr_ari_websocket_reconnects_total");
        assert!(reconnects >= 1.0, "{store_name}: the reconnect is counted");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asterisk_restart_ends_every_call_that_was_up() {
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;
    let mut calls = Vec::new();
    for number in ["+15550000007", "+15550000007", "+15550000004"] {
        calls.push(within("originate", originate(&rig.manager, to(number))).await.unwrap());
    }
    rig.until_status(&calls[0], CallStatus::Answered).await;
    rig.until_status(&calls[1], CallStatus::Answered).await;
    rig.until_status(&calls[2], CallStatus::Ringing).await;
    within("restart", rig.fake.restart()).await;
    for call in &calls {
        let end = rig.end_of(call).await;
        assert!(end.is_completed(), "{:?}", end.history);
    }
    assert_eq!(rig.manager.active_calls(), 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_end_is_settled_by_the_deadline() {
    let settings = ManagerSettings {
        answered_silence: Duration::from_millis(300),
        sweep_interval: Duration::from_millis(50),
        ..settings(LOCAL)
    };
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings).await;
    let call = within("originate", originate(&rig.manager, playing("+15550000007"))).await.unwrap();
    rig.until_status(&call, CallStatus::Answered).await;
    // Asterisk forgets the channel and says nothing: a crash on its side.
    rig.fake.vanish(&call.call_id.to_string());
    let end = rig.end_of(&call).await;
    assert_eq!(end.status, CallStatus::Completed);
    assert!(end.history.last().unwrap().cause.contains("no longer knows"), "{:?}", end.history);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ringing_call_whose_end_is_missed_is_settled_after_its_ring_timeout() {
    let settings = ManagerSettings {
        ring_grace: Duration::from_millis(100),
        sweep_interval: Duration::from_millis(50),
        ..settings(LOCAL)
    };
    // Recorded timings here: the manager's deadline and the fake's ring run on one clock.
    let fake = FakeAsterisk::start_with(FakeConfig::default()).await.unwrap();
    let rig = Rig::start_on(fake, Arc::new(MemoryCallStore::new()), settings).await;
    let call = originate(&rig.manager, CallRequest { timeout_secs: Some(1), ..to("+15550000004") }).await.unwrap();
    rig.until_status(&call, CallStatus::Ringing).await;
    rig.fake.vanish(&call.call_id.to_string());
    let end = rig.end_of(&call).await;
    assert_eq!((end.status, end.failure_reason), (CallStatus::Failed, Some(FailureReason::Lost)), "{:?}", end.history);
    assert!(end.ringing_at.is_some() && end.answered_at.is_none());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_ivr_takes_over_a_call_answered_while_nobody_followed_it() {
    // An ivr placed this call and stopped right after Asterisk answered it: the store says
    // `dialing`, and the channel waits in Stasis for a `continue` that never came.
    let fake = FakeAsterisk::start_with(fast()).await.unwrap();
    fake.set_plan(
        "+15550000042",
        CalleePlan::LongCall { ring: Duration::from_secs(1), talk: Duration::from_secs(3600) },
    );
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let mut call = Call::new(ivr_core::CallId::new(), new_call("+15550000042"), ivr_core::call::now());
    call.apply(&Transition::new(Step::Dialing, "originate accepted")).unwrap();
    store.insert(&call).await.unwrap();
    let config = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
    let mut previous = EventStream::connect(config.clone()).unwrap();
    // The previous ivr's socket is up (its app registered) before it places the call.
    within("previous connected", async {
        while !matches!(previous.next().await, Some(StreamItem::Connected { .. })) {}
    })
    .await;
    let ari = AriClient::new(config).unwrap();
    let request = OriginateRequest {
        endpoint: "Local/+15550000042@sim".into(),
        channel_id: call.channel_id(),
        target: OriginateTarget::App { app: "ivr".into(), app_args: None },
        caller_id: None,
        timeout_secs: Some(30),
        variables: Default::default(),
    };
    within("originate", ari.originate(&request)).await.unwrap();
    within("answered", async {
        while !ari.get_channel(&call.channel_id()).await.is_ok_and(|c| c.state == ChannelState::Up) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(previous);

    // The new ivr finds it on its first reconcile and sends it on into the dialplan, whose
    // ivr-menu plays a greeting and hangs up.
    let rig = Rig::start_on(fake, store, settings(LOCAL)).await;
    let end = rig.end_of(&call).await;
    assert_eq!(end.status, CallStatus::Completed, "{:?}", end.history);
    assert!(end.answered_at.is_some());
    rig.stop().await;
}

/// A memory store the tests can reach into: `apply` answers "unavailable" while `down` is
/// set, and `list_active` (what a reconcile reads first) is counted and takes `listing_delay`.
#[derive(Default)]
struct ProbeStore {
    inner: MemoryCallStore,
    down: std::sync::atomic::AtomicBool,
    listings: std::sync::atomic::AtomicUsize,
    listing_delay: Duration,
}

#[async_trait::async_trait]
impl CallStore for ProbeStore {
    async fn insert(&self, call: &Call) -> ivr_core::Result<()> {
        self.inner.insert(call).await
    }
    async fn get(&self, call_id: ivr_core::CallId) -> ivr_core::Result<Option<Call>> {
        self.inner.get(call_id).await
    }
    async fn get_by_idempotency_key(&self, key: &str) -> ivr_core::Result<Option<Call>> {
        self.inner.get_by_idempotency_key(key).await
    }
    async fn apply(&self, call_id: ivr_core::CallId, transition: &Transition) -> ivr_core::Result<ivr_core::Applied> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::StoreUnavailable("the test took the store down".into()));
        }
        self.inner.apply(call_id, transition).await
    }
    async fn list(&self, query: &ivr_core::CallQuery) -> ivr_core::Result<ivr_core::CallPage> {
        self.inner.list(query).await
    }
    async fn list_active(&self) -> ivr_core::Result<Vec<Call>> {
        self.listings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.listing_delay).await;
        self.inner.list_active().await
    }
    async fn purge_ended_batch(&self, before: time::OffsetDateTime, limit: usize) -> ivr_core::Result<usize> {
        self.inner.purge_ended_batch(before, limit).await
    }
    async fn ping(&self) -> ivr_core::Result<()> {
        self.inner.ping().await
    }
    async fn deliveries(&self, call_id: ivr_core::CallId) -> ivr_core::Result<Vec<Delivery>> {
        self.inner.deliveries(call_id).await
    }
    async fn claim_deliveries(
        &self,
        now: time::OffsetDateTime,
        lease_until: time::OffsetDateTime,
        limit: usize,
    ) -> ivr_core::Result<Vec<Delivery>> {
        self.inner.claim_deliveries(now, lease_until, limit).await
    }
    async fn record_attempt(&self, event_id: uuid::Uuid, attempt: &Attempt) -> ivr_core::Result<()> {
        self.inner.record_attempt(event_id, attempt).await
    }
    async fn outbox_depth(&self) -> ivr_core::Result<u64> {
        self.inner.outbox_depth().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_delays_the_calls_transitions_but_loses_none() {
    let fake = FakeAsterisk::start_with(fast()).await.unwrap();
    fake.set_plan("+15550000052", CalleePlan::Busy { ring: Duration::from_secs(10) });
    let store = Arc::new(ProbeStore::default());
    let rig = Rig::start_on(fake, store.clone(), settings(LOCAL)).await;
    let call = within("originate", originate(&rig.manager, to("+15550000052"))).await.unwrap();
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);

    // The callee rings, is busy, and the channels are gone, all while the store is down.
    within("the channels end", async {
        while !rig.fake.channel_ids().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(store.get(call.call_id).await.unwrap().unwrap().is_active(), "nothing could be recorded yet");

    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let end = rig.end_of(&call).await;
    check("flaky memory", "store outage", &end, &failed(FailureReason::Busy, true, Some(17)));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_refuses_clearly() {
    let rig =
        Rig::start(Arc::new(MemoryCallStore::new()), ManagerSettings { max_active_calls: 2, ..settings(LOCAL) }).await;
    let a = originate(&rig.manager, to("+15550000004")).await.unwrap();
    let _b = originate(&rig.manager, to("+15550000004")).await.unwrap();
    match originate(&rig.manager, to("+15550000004")).await {
        Err(e @ Error::TooManyActiveCalls { limit: 2 }) => assert!(e.to_string().contains("limit is 2")),
        other => panic!("expected the cap, got {other:?}"),
    }
    rig.manager.cancel(a.call_id).await.unwrap();
    rig.end_of(&a).await;
    originate(&rig.manager, to("+15550000004")).await.expect("room again after a call ended");
    assert_eq!(counter(&rig.registry, "ivr_originations_total"), 4.0, "three placed and one refused");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_place_a_new_attempt_after_a_busy_one() {
    let rig = Rig::start(Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;
    let call = originate(&rig.manager, CallRequest { max_attempts: Some(2), ..to("+15550000002") }).await.unwrap();
    let end = rig.end_of(&call).await;
    assert_eq!(
        (end.status, end.failure_reason, end.attempt_number),
        (CallStatus::Failed, Some(FailureReason::Busy), 2)
    );
    let failed_attempts: Vec<u32> =
        end.history.iter().filter(|r| r.status == CallStatus::Failed).map(|r| r.attempt).collect();
    assert_eq!(failed_attempts, [1, 2], "{:?}", end.history);
    assert_eq!(rig.fake.originate_count(), 2);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_each_reach_their_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqlCallStore::open_sqlite(&dir.path().join("calls.db")).await.unwrap());
    let rig = Rig::start(store, ManagerSettings { max_active_calls: 1000, ..settings(LOCAL) }).await;
    let plan: [(&str, CallStatus, Option<FailureReason>); 5] = [
        ("+15550000005", CallStatus::Completed, None),
        ("+15550000002", CallStatus::Failed, Some(FailureReason::Busy)),
        ("+15550000003", CallStatus::Failed, Some(FailureReason::Congestion)),
        ("+15550000006", CallStatus::Failed, Some(FailureReason::Rejected)),
        ("+15550009999", CallStatus::Failed, Some(FailureReason::Unreachable)),
    ];
    let placed = within(
        "1000 originates",
        join_all((0..1000).map(|i| {
            let manager = rig.manager.clone();
            let (number, status, reason) = plan[i % plan.len()];
            async move { (originate(&manager, to(number)).await.expect("originate"), status, reason) }
        })),
    )
    .await;
    let ends = within("1000 ends", join_all(placed.iter().map(|(call, _, _)| rig.end_of(call)))).await;
    for ((_, status, reason), end) in placed.iter().zip(&ends) {
        assert_eq!(
            (end.status, end.failure_reason),
            (*status, *reason),
            "{}: {:?}",
            end.spec.phone_number,
            end.history
        );
    }
    assert_eq!(rig.manager.active_calls(), 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_asks_during_a_slow_one_coalesce_into_one_more() {
    let store = Arc::new(ProbeStore { listing_delay: Duration::from_millis(300), ..ProbeStore::default() });
    let listings = || store.listings.load(std::sync::atomic::Ordering::SeqCst);
    let until = |n: usize| async move {
        within("a reconcile starts", async {
            while listings() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    };
    let rig = Rig::start(store.clone(), settings(LOCAL)).await;
    until(1).await; // the one after connecting
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listings(), 1);

    rig.manager.reconcile_soon();
    until(2).await;
    // Ten asks while that one is still reading the store.
    for _ in 0..10 {
        rig.manager.reconcile_soon();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(listings(), 3, "the slow one, then exactly one more for the ten asks");
    assert_eq!(counter(&rig.registry, "ivr_reconcile_runs_total"), 3.0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_active_calls_are_reconciled_with_one_listing() {
    let fake = FakeAsterisk::start_with(fast()).await.unwrap();
    fake.set_plan(
        "+15550000042",
        CalleePlan::LongCall { ring: Duration::from_millis(100), talk: Duration::from_secs(3600) },
    );
    // Played on answer until the cancel: the default answer action, ivr-menu, would hang up
    // after 3.4 recorded seconds (0.1 s here) and race the checks below.
    fake.add_sound("long-silence", Duration::from_secs(3600));
    let rig = Rig::start_on(fake, Arc::new(MemoryCallStore::new()), settings(LOCAL)).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let request = CallRequest { audio: Some("sound:long-silence".into()), ..to("+15550000042") };
        calls.push(within("originate", originate(&rig.manager, request)).await.unwrap());
    }
    for call in &calls {
        rig.until_status(call, CallStatus::Answered).await;
    }
    let before = counter_with(&rig.registry, "ivr_reconcile_requests_total", "request", "get");
    rig.fake.drop_websockets();
    within("the reconcile after the reconnect", async {
        while counter_with(&rig.registry, "ivr_reconcile_requests_total", "request", "list") < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        counter_with(&rig.registry, "ivr_reconcile_requests_total", "request", "get"),
        before,
        "no GET per call"
    );
    // The listing found every call up: none was ended for it.
    for call in &calls {
        assert_eq!(rig.manager.get(call.call_id).await.unwrap().unwrap().status, CallStatus::Answered);
    }
    for call in &calls {
        within("cancel", rig.manager.cancel(call.call_id)).await.unwrap();
        let end = rig.end_of(call).await;
        assert_eq!(end.status, CallStatus::Completed, "{:?}", end.history);
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_resume_in_order_after_a_restart_and_none_is_dialled_twice() {
    let fake = FakeAsterisk::start_with(fast()).await.unwrap();
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    // One call a second: the first is dialled at once, the other four wait.
    let paced = ManagerSettings { max_calls_per_second: 1, ..settings(LOCAL) };
    let first = Rig::start_on(fake.clone(), store.clone(), paced).await;
    let mut calls = Vec::new();
    for _ in 0..5 {
        calls.push(within("originate", originate(&first.manager, to("+15550000005"))).await.unwrap());
    }
    assert!(calls[1..].iter().all(|c| c.is_queued()), "{:?}", calls.iter().map(|c| c.status).collect::<Vec<_>>());
    assert_eq!(first.manager.queued_calls(), 4);
    first.stop().await; // the process stops with four calls never sent

    for call in &calls[1..] {
        assert!(store.get(call.call_id).await.unwrap().unwrap().is_queued(), "still queued in the store");
    }
    let second =
        Rig::start_on(fake, store.clone(), ManagerSettings { max_calls_per_second: 20, ..settings(LOCAL) }).await;
    let mut sent = Vec::new();
    for call in &calls {
        let end = second.end_of(call).await;
        assert_eq!(end.status, CallStatus::Completed, "{:?}", end.history);
        sent.push(end.sent_at.expect("sent"));
    }
    assert!(sent[1..].windows(2).all(|w| w[0] < w[1]), "resumed in the order they were accepted: {sent:?}");
    assert_eq!(second.fake.originate_count(), 5, "each dialled once");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_originate_whose_answer_is_lost_is_found_placed_and_not_sent_again() {
    let fake = FakeAsterisk::start_with(fast()).await.unwrap();
    let rig = {
        let mut ari = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
        // The first answer comes too late: the client gives up on it, the channel exists.
        ari.request_timeout = Duration::from_millis(150);
        ari.reconnect_min = Duration::from_millis(20);
        let registry = Registry::new();
        let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
        let manager = CallManager::new(AriClient::new(ari).unwrap(), store, settings(LOCAL), &registry).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn({
            let manager = manager.clone();
            async move { manager.run(async { stopped.await.unwrap_or(()) }).await.expect("run") }
        });
        let rig = Rig { fake, manager, registry, stop: Some(stop), runner };
        rig.until_connected().await;
        rig
    };
    rig.fake.set_originate_delay(Duration::from_millis(400));
    let placing = tokio::spawn({
        let manager = rig.manager.clone();
        async move { originate(&manager, to("+15550000004")).await }
    });
    // The first send is in flight (the channel exists); the next gets its answer at once.
    within("the first send", async {
        while rig.fake.originate_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    rig.fake.set_originate_delay(Duration::ZERO);
    let call = within("originate", placing).await.unwrap().expect("placed");
    assert_ne!(call.status, CallStatus::Failed, "{:?}", call.history);
    // Before a resend, Asterisk is asked: the channel exists, so the call is placed.
    assert_eq!(rig.fake.originate_count(), 1, "not sent again: GET /channels/{{id}} found it");
    assert_eq!(rig.fake.channel_ids().len(), 2, "one Local pair, not two");
    assert_eq!(counter_with(&rig.registry, "ivr_ari_errors_total", "kind", "timeout"), 1.0);
    let end = rig.end_of(&call).await;
    assert_eq!(
        (end.status, end.failure_reason),
        (CallStatus::Failed, Some(FailureReason::NoAnswer)),
        "{:?}",
        end.history
    );
    rig.stop().await;
}
