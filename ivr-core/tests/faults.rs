//! Faults the engine must survive, against the fake Asterisk (issue 11): the event socket
//! dropped again and again under load, Asterisk losing every channel without a word, and ARI
//! answering slower than the request timeout. Each test states what a user would check: every
//! call ends with its true status, none is dialled twice, none is lost or stranded.
//!
//! Time runs on the fake's time scale (recorded seconds × scale); every await that could hang
//! is bounded.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use ivr_core::ari::{AriClient, AriConfig};
use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
use ivr_core::{
    CallId, CallManager, CallRequest, CallStatus, CallStore, FailureReason, ManagerSettings, MemoryCallStore,
    PhoneNumber,
};
use prometheus::Registry;
use tokio::sync::oneshot;
use tokio::time::Instant;

use common::{counter, within};

/// A sound long enough to outlast every call here: an answered call plays it until the callee
/// hangs up (the default answer action, ivr-menu, would hang up after 3.4 s of its own).
const LONG_SOUND: &str = "long-silence";

struct Rig {
    fake: FakeAsterisk,
    manager: CallManager,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    runner: tokio::task::JoinHandle<()>,
}

impl Rig {
    async fn start(
        scale: f64,
        store: Arc<dyn CallStore>,
        settings: ManagerSettings,
        ari: impl FnOnce(&mut AriConfig),
    ) -> Rig {
        let fake = FakeAsterisk::start_with(FakeConfig { time_scale: scale, ..FakeConfig::default() }).await.unwrap();
        fake.add_sound(LONG_SOUND, Duration::from_secs(36_000));
        let mut config = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
        config.reconnect_min = Duration::from_millis(20);
        config.reconnect_max = Duration::from_millis(100);
        config.request_timeout = Duration::from_secs(5);
        ari(&mut config);
        let registry = Registry::new();
        let manager = CallManager::new(AriClient::new(config).unwrap(), store, settings, &registry).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn({
            let manager = manager.clone();
            async move { manager.run(async { stopped.await.unwrap_or(()) }).await.expect("run") }
        });
        let rig = Rig { fake, manager, registry, stop: Some(stop), runner };
        rig.until_connected().await;
        rig
    }

    async fn until_connected(&self) {
        within("the event socket to connect", Duration::from_secs(10), async {
            while !self.manager.is_connected() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }

    async fn until_status(&self, call_id: CallId, status: CallStatus) {
        within(&format!("{call_id} to be {status}"), Duration::from_secs(10), async {
            loop {
                let call = self.manager.get(call_id).await.unwrap().expect("stored");
                if call.status == status {
                    return;
                }
                assert!(call.is_active(), "{call_id} ended before it was {status}: {:?}", call.history);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    async fn until_all_ended(&self, limit: Duration) {
        within("every call to end", limit, async {
            while self.manager.active_calls() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        within("run to stop", Duration::from_secs(10), &mut self.runner).await.unwrap();
    }
}

fn local(settings: ManagerSettings) -> ManagerSettings {
    ManagerSettings { endpoint_template: "Local/{number}@sim".into(), ..settings }
}

fn request(number: &str, timeout_secs: u32) -> CallRequest {
    CallRequest {
        timeout_secs: Some(timeout_secs),
        audio: Some(format!("sound:{LONG_SOUND}")),
        ..CallRequest::to(PhoneNumber::parse(number).unwrap())
    }
}

/// What a call must end as.
type Outcome = (CallStatus, Option<FailureReason>);

/// Checks every call ended as expected; lists those that did not, with their last cause.
async fn check_outcomes(manager: &CallManager, expected: &[(CallId, Outcome)]) {
    let mut wrong = Vec::new();
    for (call_id, (status, reason)) in expected {
        let call = manager.get(*call_id).await.unwrap().expect("every accepted call is stored");
        if (call.status, call.failure_reason) != (*status, *reason) {
            let causes: Vec<&str> = call.history.iter().map(|r| r.cause.as_str()).collect();
            wrong.push(format!("{} {:?} (want {status} {reason:?}): {causes:?}", call.status, call.failure_reason));
        }
    }
    assert!(wrong.is_empty(), "{} of {} calls ended wrong: {wrong:#?}", wrong.len(), expected.len());
}

/// 200 calls of five known outcomes are live (ringing, talking) while the event socket is
/// dropped 20 times, each time without a close frame, and each time only after the previous
/// reconnect. Every call ends with its true status and reason: events missed in the gaps
/// (rings, answers) are recovered by the reconcile after each reconnect, and the ends, which
/// come after the drops, are heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_socket_drops_during_200_live_calls_every_call_ends_true() {
    const CALLS: usize = 200;
    const DROPS: usize = 20;
    // Recorded seconds are 50 ms here: every call ends 250 recorded s = 12.5 s after it was
    // placed, well after the drops (about 20 × 100 ms).
    let scale = 0.05;
    let end = Duration::from_secs(250);
    let settings =
        local(ManagerSettings { max_active_calls: CALLS, max_calls_per_second: 0, ..ManagerSettings::default() });
    let rig = Rig::start(scale, Arc::new(MemoryCallStore::new()), settings, |_| {}).await;

    // Answers spread over the drops (some in the gaps), and four kinds of unanswered ends.
    let plan = |i: usize| -> (CalleePlan, u32, Outcome) {
        let s = Duration::from_secs;
        match i % 5 {
            0 => {
                let ring = s(1 + (i as u64 / 5) % 40);
                (CalleePlan::LongCall { ring, talk: end - ring }, 600, (CallStatus::Completed, None))
            }
            1 => (CalleePlan::LongCall { ring: s(1), talk: end - s(1) }, 600, (CallStatus::Completed, None)),
            2 => (CalleePlan::Busy { ring: end }, 600, (CallStatus::Failed, Some(FailureReason::Busy))),
            3 => (CalleePlan::Congestion { ring: end }, 600, (CallStatus::Failed, Some(FailureReason::Congestion))),
            _ => (CalleePlan::NoAnswer { ring_for: s(3600) }, 250, (CallStatus::Failed, Some(FailureReason::NoAnswer))),
        }
    };
    let numbers: Vec<String> = (0..CALLS).map(|i| format!("+1555010{i:04}")).collect();
    for (i, number) in numbers.iter().enumerate() {
        rig.fake.set_plan(number, plan(i).0);
    }
    let expected: Vec<(CallId, Outcome)> = within(
        "200 originates",
        Duration::from_secs(30),
        stream::iter(0..CALLS)
            .map(|i| {
                let manager = rig.manager.clone();
                let number = numbers[i].clone();
                async move {
                    let (_, timeout, outcome) = plan(i);
                    let placed = manager.originate(request(&number, timeout)).await.expect("originate");
                    (placed.call.call_id, outcome)
                }
            })
            .buffer_unordered(16)
            .collect(),
    )
    .await;
    let placed_by = Instant::now();

    for _ in 0..DROPS {
        rig.fake.drop_websockets();
        // The drop is seen, then the socket comes back; the next drop comes a little later.
        within("the drop to be seen", Duration::from_secs(5), async {
            while rig.manager.is_connected() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        rig.until_connected().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let first_end = end.mul_f64(scale);
    assert!(
        placed_by.elapsed() < first_end,
        "the drops took {:?}: they must be over before the first call ends ({first_end:?}) for the outcome to be \
         observable",
        placed_by.elapsed()
    );
    assert_eq!(rig.manager.active_calls(), CALLS, "no call ended during the drops");

    rig.until_all_ended(Duration::from_secs(30)).await;
    check_outcomes(&rig.manager, &expected).await;
    assert!(counter(&rig.registry, "ivr_ari_websocket_reconnects_total") >= DROPS as f64, "every reconnect counted");
    assert_eq!(rig.fake.originate_count(), CALLS, "each call dialled once");
    rig.stop().await;
}

/// Asterisk loses every channel at once and never says so (no hang-up, no ChannelDestroyed,
/// no StasisEnd: the channels are simply gone) and the event socket drops, with calls queued,
/// dialing, ringing and answered. Promise (SECURITY.md, "Faults"): each call Asterisk lost is
/// settled by the first reconcile after the reconnect — here within [`SETTLE_BOUND`] of it —
/// as `lost` if it was never answered and `completed` if it was; the queued calls, never
/// sent, are dialled afterwards and end as their callees decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_losing_every_channel_without_a_word_settles_each_call_after_the_reconnect() {
    /// One reconcile: a `GET /channels` (ARI's request timeout, 2 s here, bounds it) and a
    /// store write per call, with room for a loaded machine.
    const SETTLE_BOUND: Duration = Duration::from_secs(5);
    let settings = local(ManagerSettings {
        // One call a second: the three live calls are dialled at 0, 1 and 2 s, the queued four
        // from 3 s on; the kill comes at about 2.2 s, so the last ones are surely still queued.
        max_calls_per_second: 1,
        // Deadlines far away: only the reconcile after the reconnect may settle the calls.
        ring_grace: Duration::from_secs(600),
        answered_silence: Duration::from_secs(600),
        ..ManagerSettings::default()
    });
    // Recorded seconds are 200 ms here, so the unreachable callee (60 s) outlasts the test.
    let rig =
        Rig::start(0.2, Arc::new(MemoryCallStore::new()), settings, |c| c.request_timeout = Duration::from_secs(2))
            .await;
    let s = Duration::from_secs;
    rig.fake.set_plan("+15550200001", CalleePlan::Unreachable); // stays dialing
    rig.fake.set_plan("+15550200002", CalleePlan::NoAnswer { ring_for: s(3600) }); // ringing
    rig.fake.set_plan("+15550200003", CalleePlan::LongCall { ring: s(1), talk: s(3600) }); // answered
                                                                                           // Queued, then busy or answered (and hung up after 2 s).
    for number in ["+15550200004", "+15550200006"] {
        rig.fake.set_plan(number, CalleePlan::Busy { ring: s(1) });
    }
    for number in ["+15550200005", "+15550200007"] {
        rig.fake.set_plan(number, CalleePlan::LongCall { ring: s(1), talk: s(2) });
    }
    let numbers = [
        "+15550200001",
        "+15550200002",
        "+15550200003",
        "+15550200004",
        "+15550200005",
        "+15550200006",
        "+15550200007",
    ];
    let busy = (CallStatus::Failed, Some(FailureReason::Busy));
    let queued_outcome = |i: usize| if i % 2 == 1 { busy } else { (CallStatus::Completed, None) };
    let mut ids = Vec::new();
    for number in numbers {
        let placed = within("originate", Duration::from_secs(10), rig.manager.originate(request(number, 3600))).await;
        ids.push(placed.expect("originate").call.call_id);
    }
    rig.until_status(ids[0], CallStatus::Dialing).await;
    rig.until_status(ids[1], CallStatus::Ringing).await;
    rig.until_status(ids[2], CallStatus::Answered).await;
    // Which of the last four still wait in the queue (never sent) at the kill: the last ones
    // surely; on a slow machine the first may have been dialled just before.
    let mut queued = Vec::new();
    for (i, id) in ids.iter().enumerate().skip(3) {
        if rig.manager.get(*id).await.unwrap().unwrap().is_queued() {
            queued.push((*id, queued_outcome(i)));
        }
    }
    assert!(queued.len() >= 2, "calls still wait in the queue at the kill");

    // The kill: every channel gone without an event, every socket cut.
    for id in rig.fake.channel_ids() {
        rig.fake.vanish(&id);
    }
    assert!(rig.fake.channel_ids().is_empty());
    rig.fake.drop_websockets();
    within("the drop to be seen", Duration::from_secs(5), async {
        while rig.manager.is_connected() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    rig.until_connected().await;
    let reconnected = Instant::now();

    let lost = (CallStatus::Failed, Some(FailureReason::Lost));
    let settled = [(ids[0], lost), (ids[1], lost), (ids[2], (CallStatus::Completed, None))];
    within("every lost call to be settled after the reconnect", SETTLE_BOUND, async {
        for (id, _) in &settled {
            while rig.manager.get(*id).await.unwrap().unwrap().is_active() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
    .await;
    let took = reconnected.elapsed();
    check_outcomes(&rig.manager, &settled).await;
    let answered = rig.manager.get(ids[2]).await.unwrap().unwrap();
    assert!(answered.answered_at.is_some(), "an answered call keeps its answer");
    assert!(answered.history.last().unwrap().cause.contains("no longer knows"), "{:?}", answered.history);

    // The queued calls were never sent before the kill: they are dialled now, and end true.
    // (One dialled just before the kill ends as the kill left it: it only has to end.)
    rig.until_all_ended(Duration::from_secs(20)).await;
    check_outcomes(&rig.manager, &queued).await;
    assert_eq!(rig.fake.originate_count(), numbers.len(), "each call dialled once");
    eprintln!("lost calls settled {took:?} after the reconnect (bound {SETTLE_BOUND:?})");
    rig.stop().await;
}

/// Counts `ChannelCreated` per channel id, from a socket of its own that sees every event
/// (`subscribeAll`) — what Asterisk really created, whatever the manager believes.
async fn watch_channel_creations(
    fake: &FakeAsterisk,
) -> (Arc<Mutex<HashMap<String, usize>>>, tokio::task::JoinHandle<()>) {
    let url = format!(
        "ws://{}/ari/events?app=observer&subscribeAll=true&api_key={}:{}",
        fake.addr(),
        fake.username(),
        fake.password()
    );
    let (mut socket, _) =
        within("observer socket", Duration::from_secs(5), tokio_tungstenite::connect_async(url)).await.unwrap();
    let created = Arc::new(Mutex::new(HashMap::new()));
    let counts = Arc::clone(&created);
    let task = tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Ok(text) = message.into_text() else { continue };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            if event["type"] == "ChannelCreated" {
                if let Some(id) = event["channel"]["id"].as_str() {
                    *counts.lock().unwrap().entry(id.to_owned()).or_default() += 1;
                }
            }
        }
    });
    (created, task)
}

/// ARI takes longer to answer an originate than the client waits (800 ms against a 300 ms
/// request timeout) for a while, then answers at once again. An originate without an answer
/// is sent again with the same channel id (a 409 then means it was placed), unless its
/// channel's end was heard meanwhile — a callee that rejects at once frees the id before the
/// resend would go, and the resend would dial it again. Asterisk creates each call's channel
/// exactly once, no call is stored as failed or lost, and every call ends with its true
/// status. (This test found the resend that dialled a rejecting callee twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_slower_than_the_request_timeout_dials_no_call_twice_and_loses_none() {
    const CALLS: usize = 20;
    let settings = local(ManagerSettings {
        max_calls_per_second: 0,
        originate_retry_window: Duration::from_secs(30),
        ..ManagerSettings::default()
    });
    let rig = Rig::start(0.05, Arc::new(MemoryCallStore::new()), settings, |c| {
        c.request_timeout = Duration::from_millis(300)
    })
    .await;
    let (created, observer) = watch_channel_creations(&rig.fake).await;
    let plan = move |i: usize| -> (CalleePlan, Outcome) {
        let s = Duration::from_secs;
        match i % 4 {
            0 => (CalleePlan::LongCall { ring: s(2), talk: s(20) }, (CallStatus::Completed, None)),
            1 => (CalleePlan::Busy { ring: s(2) }, (CallStatus::Failed, Some(FailureReason::Busy))),
            2 => (CalleePlan::Congestion { ring: s(2) }, (CallStatus::Failed, Some(FailureReason::Congestion))),
            _ => (CalleePlan::Rejected, (CallStatus::Failed, Some(FailureReason::Rejected))),
        }
    };
    let numbers: Vec<String> = (0..CALLS).map(|i| format!("+1555030{i:04}")).collect();
    for (i, number) in numbers.iter().enumerate() {
        rig.fake.set_plan(number, plan(i).0);
    }

    rig.fake.set_originate_delay(Duration::from_millis(800));
    let placing = tokio::spawn({
        let manager = rig.manager.clone();
        let numbers = numbers.clone();
        async move {
            stream::iter(0..CALLS)
                .map(|i| {
                    let manager = manager.clone();
                    let number = numbers[i].clone();
                    async move {
                        (manager.originate(request(&number, 60)).await.expect("originate").call.call_id, plan(i).1)
                    }
                })
                .buffer_unordered(CALLS)
                .collect::<Vec<_>>()
                .await
        }
    });
    // Slow for two seconds: every first send and several resends time out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.fake.set_originate_delay(Duration::ZERO);
    let expected = within("the originates to be answered", Duration::from_secs(30), placing).await.unwrap();
    assert!(
        counter(&rig.registry, "ivr_ari_errors_total") >= CALLS as f64,
        "every first send timed out (ARI errors counted: {})",
        counter(&rig.registry, "ivr_ari_errors_total")
    );
    // Sends: one per call, plus resends of those whose channel's events had not come yet.
    assert!(rig.fake.originate_count() >= CALLS, "{} sends", rig.fake.originate_count());

    rig.until_all_ended(Duration::from_secs(20)).await;
    check_outcomes(&rig.manager, &expected).await;
    let created = created.lock().unwrap().clone();
    for (call_id, _) in &expected {
        let channel = call_id.channel_id(1);
        let call = rig.manager.get(*call_id).await.unwrap().unwrap();
        assert_eq!(created.get(&channel), Some(&1), "{channel}: created exactly once: {:?}", call.history);
        assert_eq!(call.attempt_number, 1, "no second attempt");
        let sent = call.history.iter().filter(|r| r.cause == "sent to Asterisk").count();
        assert_eq!(sent, 1, "one sent mark: {:?}", call.history);
    }
    let ours = created.keys().filter(|id| !id.ends_with(";2")).count();
    assert_eq!(ours, CALLS, "no channel but the calls' own was created: {created:?}");
    observer.abort();
    rig.stop().await;
}
