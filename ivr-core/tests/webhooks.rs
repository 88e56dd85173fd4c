//! Status callbacks against a local receiver: retries with backoff (on the paused clock), a
//! worker killed mid-delivery and a new one over the same SQLite file, order per call, the
//! signature checked by an HMAC written here from SHA-256 alone, a redirect not followed, and
//! giving up after the maximum age.

use std::sync::Arc;
use std::time::Duration;

use ivr_core::call::now;
use ivr_core::store::conformance::new_call;
use ivr_core::webhook::receiver::{Answer, Received, Receiver};
use ivr_core::webhook::{DeliveryState, WebhookSettings, Worker};
use ivr_core::{Call, CallId, CallSpec, CallStatus, CallStore, MemoryCallStore, SqlCallStore, Step, Transition};
use prometheus::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

const SECRET: &[u8] = b"whsec-test-0123456789abcdef";
const LIMIT: Duration = Duration::from_secs(3600);

/// HMAC-SHA256 by RFC 2104, from the hash alone: the check a receiver would write.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    let outer = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `Ivr-Signature` as the README tells a receiver to; returns the signed time.
fn verify(request: &Received) -> i64 {
    let header = request.header("ivr-signature").expect("Ivr-Signature");
    let (t, v1) = header.split_once(",v1=").expect("t=…,v1=…");
    let t = t.strip_prefix("t=").expect("t=");
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&request.body);
    assert_eq!(v1, hmac_sha256(SECRET, &message), "the signature is the HMAC of t.body");
    assert_ne!(v1, hmac_sha256(b"another secret", &message));
    t.parse().expect("a unix time")
}

fn settings() -> WebhookSettings {
    WebhookSettings {
        secret: SECRET.to_vec(),
        timeout: Duration::from_secs(5),
        first_retry: Duration::from_secs(10),
        max_retry: Duration::from_secs(600),
        poll_interval: Duration::from_millis(100),
        ..WebhookSettings::default()
    }
}

fn watched(receiver: &Receiver, events: &[CallStatus]) -> CallSpec {
    CallSpec {
        status_callback: Some(receiver.url("/ivr/status?tenant=7")),
        status_callback_events: events.to_vec(),
        ..new_call("+15550000001")
    }
}

/// A worker on `store` until the returned sender is dropped or sent `true`.
fn start(
    store: Arc<dyn CallStore>,
    settings: WebhookSettings,
) -> (watch::Sender<bool>, Registry, tokio::task::JoinHandle<()>) {
    let registry = Registry::new();
    let worker = Worker::new(store, settings, &registry).unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    (stop, registry, task)
}

fn counter(registry: &Registry, name: &str, outcome: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| m.get_label().iter().all(|l| l.value() == outcome))
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

async fn apply(store: &dyn CallStore, call: &Call, step: Step) {
    assert!(store.apply(call.call_id, &Transition::new(step, "test")).await.unwrap().is_changed());
}

#[tokio::test(start_paused = true)]
async fn a_receiver_failing_three_times_then_accepting_gets_it_after_growing_waits() {
    let receiver = Receiver::start(|n, _| if n < 3 { Answer::Status(503) } else { Answer::Status(204) }).await.unwrap();
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let call = Call::new(CallId::new(), watched(&receiver, &[CallStatus::Pending]), now());
    store.insert(&call).await.unwrap();
    let (_stop, registry, _task) = start(Arc::clone(&store), settings());

    let got = receiver.wait_for(4, LIMIT).await;
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    // 10 s, 20 s, 40 s, each less up to half (jitter), plus at most one poll interval.
    for (gap, full) in gaps.iter().zip([10, 20, 40]) {
        let full = Duration::from_secs(full);
        assert!(*gap >= full / 2 && *gap <= full + Duration::from_millis(200), "gap {gap:?} for a {full:?} backoff");
    }
    let ids: Vec<_> = got.iter().map(|r| r.header("ivr-event-id").unwrap().to_owned()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one event id on every attempt: {ids:?}");
    let bodies: Vec<_> = got.iter().map(Received::json).collect();
    assert!(bodies.iter().all(|b| *b == bodies[0]), "one body on every attempt");
    for r in &got {
        verify(r);
        assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/ivr/status?tenant=7"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    let delivery = wait_until(&*store, call.call_id, |d| d.state == DeliveryState::Delivered).await;
    assert_eq!((delivery.attempts, delivery.last_result.as_deref()), (4, Some("HTTP 204")));
    assert_eq!(counter(&registry, "ivr_webhook_deliveries_total", "retried"), 3.0);
    assert_eq!(counter(&registry, "ivr_webhook_deliveries_total", "sent"), 1.0);
    assert_eq!(counter(&registry, "ivr_webhook_deliveries_total", "failed"), 0.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counter(&registry, "ivr_webhook_outbox_depth", ""), 0.0);
    assert_eq!(receiver.received().len(), 4, "nothing more once delivered");
}

/// The delivery of `call_id` once `done` holds of it.
async fn wait_until(
    store: &dyn CallStore,
    call_id: CallId,
    done: impl Fn(&ivr_core::webhook::Delivery) -> bool,
) -> ivr_core::webhook::Delivery {
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Some(d) = store.deliveries(call_id).await.unwrap().into_iter().find(|d| done(d)) {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the delivery reached the state")
}

#[tokio::test(start_paused = true)]
async fn the_payload_is_the_event_with_the_call_as_it_stood() {
    let receiver = Receiver::start(|_, _| Answer::Status(200)).await.unwrap();
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let call = Call::new(CallId::new(), watched(&receiver, &[CallStatus::Ringing, CallStatus::Completed]), now());
    store.insert(&call).await.unwrap();
    for step in [Step::Dialing, Step::Ringing, Step::Answered] {
        apply(&*store, &call, step).await;
    }
    let ringing = store.deliveries(call.call_id).await.unwrap()[0].call.clone();
    apply(&*store, &call, Step::Ended { reason_if_unanswered: ivr_core::FailureReason::Lost }).await;
    let (_stop, _registry, _task) = start(Arc::clone(&store), settings());

    let got = receiver.wait_for(2, LIMIT).await;
    let signed = verify(&got[0]);
    assert!((signed - now().unix_timestamp()).abs() < 5, "t is the time of sending");
    let first = got[0].json();
    assert_eq!(first["type"], "call.ringing");
    assert_eq!(first["id"], got[0].header("ivr-event-id").unwrap());
    assert_eq!(first["call_id"], call.call_id.to_string());
    assert_eq!(first["transition"]["status"], "ringing");
    assert_eq!(first["call"], serde_json::to_value(&ringing).unwrap(), "the call as the transition left it");
    assert_eq!(first["call"]["status"], "ringing");
    let second = got[1].json();
    assert_eq!(second["type"], "call.completed");
    assert_eq!(second["call"]["status"], "completed");
    assert_ne!(second["id"], first["id"]);
}

#[tokio::test(start_paused = true)]
async fn each_call_is_told_in_order_while_another_proceeds() {
    // The first delivery of call A is refused twice; B's go through meanwhile.
    let receiver = Receiver::start(|_, r| {
        let body = r.json();
        let first_of_a = body["call"]["phone_number"] == "+15550000001" && body["type"] == "call.pending";
        if first_of_a {
            Answer::Status(500)
        } else {
            Answer::Status(200)
        }
    })
    .await
    .unwrap();
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let all = [CallStatus::Pending, CallStatus::Dialing, CallStatus::Ringing, CallStatus::Answered];
    let a = Call::new(CallId::new(), watched(&receiver, &all), now());
    let b = Call::new(
        CallId::new(),
        CallSpec { phone_number: "+15550000002".parse().unwrap(), ..watched(&receiver, &all) },
        now(),
    );
    for call in [&a, &b] {
        store.insert(call).await.unwrap();
        for step in [Step::Dialing, Step::Ringing, Step::Answered] {
            apply(&*store, call, step).await;
        }
    }
    let (_stop, _registry, _task) = start(Arc::clone(&store), settings());
    // B's four, and A's first twice.
    let got = receiver.wait_for(6, LIMIT).await;
    let of = |got: &[Received], number: &str| -> Vec<String> {
        got.iter()
            .map(Received::json)
            .filter(|b| b["call"]["phone_number"] == number)
            .map(|b| b["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(of(&got, "+15550000002"), ["call.pending", "call.dialing", "call.ringing", "call.answered"]);
    assert!(
        of(&got, "+15550000001").iter().all(|t| t == "call.pending"),
        "A waits for its first: {:?}",
        of(&got, "+15550000001")
    );
    // A's first is accepted now: the rest follow, in order.
    receiver.set_script(|_, _| Answer::Status(200));
    let got = receiver.wait_for(got.len() + 4, LIMIT).await;
    let a_types = of(&got, "+15550000001");
    let first_ok = a_types.iter().rposition(|t| t == "call.pending").unwrap();
    assert_eq!(&a_types[first_ok..], ["call.pending", "call.dialing", "call.ringing", "call.answered"]);
    let seqs: Vec<u32> = store.deliveries(a.call_id).await.unwrap().iter().map(|d| d.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_delivery_loses_nothing_the_next_one_delivers_it() {
    let receiver = Receiver::start(|_, _| Answer::Hang).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ivr.db");
    let fast = WebhookSettings { timeout: Duration::from_secs(1), ..settings() };

    let first = SqlCallStore::open_sqlite(&path).await.unwrap();
    let call = Call::new(CallId::new(), watched(&receiver, &[CallStatus::Pending]), now());
    first.insert(&call).await.unwrap();
    let (_stop, _registry, task) = start(Arc::new(first.clone()), fast.clone());
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    // Killed while the receiver holds the request: nothing of the attempt is recorded.
    task.abort();
    let _ = task.await;
    first.pool().close().await;
    drop(first);
    receiver.set_script(|_, _| Answer::Status(200));

    let second = SqlCallStore::open_sqlite(&path).await.unwrap();
    let stored = second.deliveries(call.call_id).await.unwrap();
    assert_eq!((stored.len(), stored[0].state, stored[0].attempts), (1, DeliveryState::Pending, 0));
    // The new worker waits out the dead one's lease (3 × its timeout), then delivers.
    let (_stop, _registry, _task) = start(Arc::new(second.clone()), fast);
    let again = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(again[1].header("ivr-event-id"), got[0].header("ivr-event-id"), "the same event, for deduplication");
    verify(&again[1]);
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let d = second.deliveries(call.call_id).await.unwrap().remove(0);
            if d.state == DeliveryState::Delivered {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("delivered after the restart");
    assert_eq!((done.attempts, done.last_result.as_deref()), (1, Some("HTTP 200")));
}

#[tokio::test(start_paused = true)]
async fn redirects_are_not_followed_and_old_deliveries_are_given_up() {
    let receiver = Receiver::start(|_, _| Answer::Status(302)).await.unwrap();
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let call = Call::new(CallId::new(), watched(&receiver, &[CallStatus::Pending]), now());
    store.insert(&call).await.unwrap();
    let short = WebhookSettings { max_age: Duration::from_secs(60), ..settings() };
    let (_stop, registry, _task) = start(Arc::clone(&store), short);
    let failed = wait_until(&*store, call.call_id, |d| d.state == DeliveryState::Failed).await;
    assert_eq!(failed.last_result.as_deref(), Some("HTTP 302 (redirects are not followed)"));
    let got = receiver.received();
    assert!(got.iter().all(|r| r.target == "/ivr/status?tenant=7"), "never /elsewhere");
    // Attempts at 0, ~10, ~30: the next (~70 s) would be past the 60 s age.
    assert!((2..=4).contains(&got.len()), "{} attempts", got.len());
    assert_eq!(failed.attempts as usize, got.len());
    assert_eq!(counter(&registry, "ivr_webhook_deliveries_total", "failed"), 1.0);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(receiver.received().len(), got.len(), "a failed delivery is not tried again");
}

/// Retention: deleting a call (as purging old calls does) deletes its deliveries with it, by
/// the outbox's `ON DELETE CASCADE`, on SQLite and PostgreSQL.
#[tokio::test]
async fn deleting_a_call_deletes_its_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = vec![("sqlite", SqlCallStore::open_sqlite(&dir.path().join("ivr.db")).await.unwrap())];
    match std::env::var("IVR_TEST_DATABASE_URL") {
        Ok(url) => {
            stores.push(("postgres", ivr_core::store::conformance::postgres_in_fresh_schema(&url).await.unwrap()))
        }
        Err(_) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: the PostgreSQL store (IVR_TEST_DATABASE_URL is not set)");
        }
    }
    for (name, store) in stores {
        let spec = CallSpec {
            status_callback: Some("http://hooks.example/".into()),
            status_callback_events: vec![CallStatus::Pending, CallStatus::Dialing],
            ..new_call("+15550000001")
        };
        let (gone, kept) = (Call::new(CallId::new(), spec.clone(), now()), Call::new(CallId::new(), spec, now()));
        for call in [&gone, &kept] {
            store.insert(call).await.unwrap();
            apply(&store, call, Step::Dialing).await;
        }
        assert_eq!(store.outbox_depth().await.unwrap(), 4, "{name}");
        sqlx::query("DELETE FROM calls WHERE call_id = $1")
            .bind(gone.call_id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        assert!(store.deliveries(gone.call_id).await.unwrap().is_empty(), "{name}: the deliveries went with the call");
        assert_eq!(store.deliveries(kept.call_id).await.unwrap().len(), 2, "{name}");
        assert_eq!(store.outbox_depth().await.unwrap(), 2, "{name}");
    }
}

/// A receiver that is down (connection refused), then up but silent (the attempt times out),
/// then answering: the delivery is retried through both and taken once it answers.
#[tokio::test(start_paused = true)]
async fn a_receiver_down_then_silent_then_back_gets_it() {
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = spot.local_addr().unwrap();
    drop(spot);
    let store: Arc<dyn CallStore> = Arc::new(MemoryCallStore::new());
    let spec = CallSpec {
        status_callback: Some(format!("http://{addr}/hook")),
        status_callback_events: vec![CallStatus::Pending],
        ..new_call("+15550000001")
    };
    let call = Call::new(CallId::new(), spec, now());
    store.insert(&call).await.unwrap();
    let (_stop, _registry, _task) = start(Arc::clone(&store), settings());

    let refused = wait_until(&*store, call.call_id, |d| d.attempts >= 1).await;
    assert!(refused.last_result.as_deref().unwrap().starts_with("cannot connect"), "{refused:?}");
    assert_eq!(refused.state, DeliveryState::Pending);

    // Back, but answering nothing: the attempt times out (5 s) and is retried.
    let receiver =
        Receiver::start_on(addr, |n, _| if n == 0 { Answer::Hang } else { Answer::Status(200) }).await.unwrap();
    let done = wait_until(&*store, call.call_id, |d| d.state == DeliveryState::Delivered).await;
    let got = receiver.received();
    assert_eq!(got.len(), 2, "one silent attempt, one answered");
    assert_eq!(done.attempts as usize, refused.attempts as usize + 2);
    assert_eq!(done.last_result.as_deref(), Some("HTTP 200"));
    assert_eq!(got[0].header("ivr-event-id"), got[1].header("ivr-event-id"));
}
