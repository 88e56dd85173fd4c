//! Load correctness: thousands of calls of known outcomes through the engine at once, against
//! the fake Asterisk at accelerated time, with no calls-per-second limit. Every call must end
//! with its true status and reason, none may be left active, and no event may be dropped.
//! (How fast it goes is the load script's and the benches' business, not this test's.)

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use ivr_core::ari::{AriClient, AriConfig};
use ivr_core::fake::{FakeAsterisk, FakeConfig};
use ivr_core::{
    CallId, CallManager, CallRequest, CallStatus, FailureReason, ManagerSettings, MemoryCallStore, PhoneNumber,
};
use prometheus::Registry;
use tokio::sync::oneshot;

use common::{counter, within};

const CALLS: usize = 5_000;
/// Originates in flight at once: as many as the test's client side sensibly keeps open.
const IN_FLIGHT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_mixed_calls_all_end_true() {
    // The recorded timings a hundred times faster: a short call talks 10 ms, busy rings 10 ms.
    let fake = FakeAsterisk::start_with(FakeConfig { time_scale: 0.01, ..FakeConfig::default() }).await.unwrap();
    let mut ari = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
    ari.reconnect_min = Duration::from_millis(20);
    ari.reconnect_max = Duration::from_millis(200);
    let registry = Registry::new();
    let settings = ManagerSettings {
        endpoint_template: "Local/{number}@sim".into(),
        max_active_calls: CALLS,
        max_calls_per_second: 0,
        ..ManagerSettings::default()
    };
    let store = Arc::new(MemoryCallStore::new());
    let manager = CallManager::new(AriClient::new(ari).unwrap(), store, settings, &registry).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let runner = tokio::spawn({
        let manager = manager.clone();
        async move { manager.run(async { stopped.await.unwrap_or(()) }).await.expect("run") }
    });
    within("connect", Duration::from_secs(10), async {
        while !manager.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // (number, ring timeout, status, reason): the recorded [sim] callees.
    let plan: [(&str, u32, CallStatus, Option<FailureReason>); 5] = [
        ("+15550000005", 30, CallStatus::Completed, None),
        ("+15550000002", 30, CallStatus::Failed, Some(FailureReason::Busy)),
        ("+15550000004", 2, CallStatus::Failed, Some(FailureReason::NoAnswer)),
        ("+15550000006", 30, CallStatus::Failed, Some(FailureReason::Rejected)),
        ("+15550009999", 30, CallStatus::Failed, Some(FailureReason::Unreachable)),
    ];
    let placed: Vec<(CallId, usize)> = within(
        "5,000 originates",
        Duration::from_secs(120),
        stream::iter(0..CALLS)
            .map(|i| {
                let manager = manager.clone();
                let (number, timeout, _, _) = plan[i % plan.len()];
                async move {
                    let request = CallRequest {
                        timeout_secs: Some(timeout),
                        ..CallRequest::to(PhoneNumber::parse(number).unwrap())
                    };
                    let placed = manager.originate(request).await.expect("originate");
                    (placed.call.call_id, i % plan.len())
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect(),
    )
    .await;

    within("every call to end", Duration::from_secs(120), async {
        while manager.active_calls() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let mut wrong: HashMap<String, usize> = HashMap::new();
    for (call_id, kind) in &placed {
        let (number, _, status, reason) = plan[*kind];
        let call = manager.get(*call_id).await.unwrap().expect("stored");
        assert!(call.is_completed(), "stranded: {call:?}");
        if (call.status, call.failure_reason) != (status, reason) {
            let last = call.history.last().map(|r| r.cause.as_str()).unwrap_or("");
            let key = format!("{number}: {} {:?} (want {status} {reason:?}): {last}", call.status, call.failure_reason);
            *wrong.entry(key).or_default() += 1;
        }
    }
    assert!(wrong.is_empty(), "calls that ended wrong: {wrong:#?}");
    assert_eq!(placed.len(), CALLS);
    // No event dropped: every event the fake wrote is taken by the event loop (the last
    // halves' ChannelDestroyed may trail the calls' ends by a moment).
    within("every event written to be taken", Duration::from_secs(10), async {
        while counter(&registry, "ivr_ari_events_total") < fake.stats().events_written as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(counter(&registry, "ivr_ari_events_total"), fake.stats().events_written as f64, "no event dropped");
    assert_eq!(fake.originate_count(), CALLS, "each call dialled once");

    let _ = stop.send(());
    within("run stops", Duration::from_secs(10), runner).await.unwrap();
}
