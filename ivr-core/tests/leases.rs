//! The lease and take-over SQL (`ivr_core::store::lease`): on SQLite a second process is
//! refused; on PostgreSQL each orphaned call goes to exactly one claimer, a live owner keeps
//! its calls, and a lease that lapsed cannot be renewed.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ivr_core::call::now;
use ivr_core::store::conformance;
use ivr_core::store::Leases;
use ivr_core::{Call, CallId, CallStore, Error, FailureReason, SqlCallStore, Step, Transition};

/// The longest any single step may take.
const STEP: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

async fn postgres() -> Option<SqlCallStore> {
    let Ok(url) = std::env::var("IVR_TEST_DATABASE_URL") else {
        let _ = writeln!(std::io::stderr(), "skipped: PostgreSQL lease test (IVR_TEST_DATABASE_URL is not set)");
        return None;
    };
    Some(within("connect", conformance::postgres_in_fresh_schema(&url)).await.expect("connect"))
}

async fn insert_owned(store: &SqlCallStore, lease_id: &str) -> CallId {
    let call = Call::new(CallId::new(), conformance::new_call("+15550000001"), now());
    within("insert", store.with_owner(lease_id).insert(&call)).await.expect("insert");
    call.call_id
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused_and_a_released_lease_is_free_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqlCallStore::open_sqlite(&dir.path().join("ivr.db")).await.expect("sqlite");
    let leases = Leases::new(&store, Duration::from_secs(2));
    let first = within("first", leases.register("host-a", "ivr")).await.expect("the first process starts");
    assert_eq!(first.app, "ivr", "on SQLite the app is ARI_APP itself");
    // The first keeps renewing, as a live process does.
    let renewer = {
        let (leases, lease) = (leases.clone(), first.clone());
        tokio::spawn(async move {
            loop {
                assert!(leases.renew(&lease).await.expect("renew"), "a renewed lease stays live");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    // Another process on the same file, even with another instance id, is refused.
    let refused = within("second", leases.register("host-b", "ivr")).await.expect_err("refused");
    assert!(matches!(refused, Error::InstanceInUse(_)), "{refused:?}");
    let text = refused.to_string();
    assert!(text.contains("SQLite serves one instance") && text.contains("PostgreSQL"), "{text}");
    renewer.abort();
    // A process that stops cleanly gives its lease up: the next starts at once.
    within("release", leases.release(&first)).await.expect("release");
    let started = tokio::time::Instant::now();
    let next = within("next", leases.register("host-a", "ivr")).await.expect("starts after a clean stop");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_ne!(next.lease_id, first.lease_id, "a new lease at every start");
    // A crashed process leaves its lease; the next start waits for it to lapse, then goes.
    let after_crash = within("after crash", leases.register("host-a", "ivr")).await.expect("starts once it lapsed");
    assert_ne!(after_crash.lease_id, next.lease_id);
    assert!(!leases.renew(&next).await.expect("renew"), "the crashed process's lease lapsed for good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphans_go_to_exactly_one_claimer_and_live_owners_keep_their_calls() {
    let Some(store) = postgres().await else { return };
    // The survivors' leases outlast the test; the dead instance's lasts 3 s, never renewed.
    let leases = Leases::new(&store, Duration::from_secs(60));
    let dead =
        within("dead", Leases::new(&store, Duration::from_secs(3)).register("a", "ivr-a")).await.expect("lease a");
    assert_eq!(dead.app, "ivr-a");
    let alive = within("alive", leases.register("b", "ivr-b")).await.expect("lease b");
    let mut orphans = HashSet::new();
    for _ in 0..120 {
        orphans.insert(insert_owned(&store, &dead.lease_id).await);
    }
    let kept = insert_owned(&store, &alive.lease_id).await;
    // A call stored before ownership existed has no owner: an orphan at once.
    let ownerless = insert_owned_none(&store).await;
    // An ended call of the dead instance is nobody's business.
    let ended = insert_owned(&store, &dead.lease_id).await;
    let end = Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Canceled }, "canceled");
    within("end", store.apply(ended, &end)).await.expect("apply");

    // While its lease is live, nobody takes a call from its owner.
    let first = within("claim", leases.claim_orphans(&alive, 1000)).await.expect("claim");
    assert_eq!(first, vec![ownerless], "only the call without an owner");
    assert!(owned_by(&store, &alive.lease_id, ownerless).await);

    // The dead lease lapses (its process stopped renewing). Three survivors claim at once,
    // in small batches, until nothing is left.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!leases.renew(&dead).await.expect("renew"), "a lapsed lease is not renewed: its calls are gone");
    let mut survivors = vec![alive.clone()];
    for id in ["c", "d"] {
        survivors.push(within("survivor", leases.register(id, &format!("ivr-{id}"))).await.expect("lease"));
    }
    let claims = survivors.iter().map(|lease| {
        let (leases, lease) = (leases.clone(), lease.clone());
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = leases.claim_orphans(&lease, 7).await.expect("claim");
                if got.is_empty() {
                    return (lease, mine);
                }
                mine.extend(got);
            }
        })
    });
    let mut claimed = Vec::new();
    for claim in claims {
        let (lease, mine) = within("claimers", claim).await.expect("claimer");
        for id in &mine {
            assert!(owned_by(&store, &lease.lease_id, *id).await, "the store names the claimer as the owner");
        }
        claimed.extend(mine);
    }
    let unique: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "no call claimed twice");
    assert_eq!(unique, orphans, "every orphan claimed");
    assert!(!unique.contains(&kept) && !unique.contains(&ended));
    let owned = within("owned", leases.owned(&alive)).await.expect("owned");
    assert!(owned.contains(&kept), "the live owner's call stayed its own");
    assert_eq!(within("owner", leases.owner_of(kept)).await.expect("owner"), Some((alive.lease_id.clone(), true)));
    assert_eq!(within("owner", leases.owner_of(ended)).await.expect("owner"), Some((dead.lease_id.clone(), false)));
}

#[tokio::test]
async fn one_instance_id_is_one_process_and_cancel_requests_reach_the_owner_once() {
    let Some(store) = postgres().await else { return };
    let leases = Leases::new(&store, Duration::from_secs(2));
    let first = within("first", leases.register("a", "ivr-a")).await.expect("lease");
    let renewer = {
        let (leases, lease) = (leases.clone(), first.clone());
        tokio::spawn(async move {
            loop {
                let _ = leases.renew(&lease).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let other = within("other id", leases.register("b", "ivr-b")).await.expect("another id starts beside it");
    let e = within("same id", leases.register("a", "ivr-a")).await.expect_err("the same id is refused while live");
    assert!(e.to_string().contains("INSTANCE_ID"), "{e}");
    renewer.abort();

    let call = insert_owned(&store, &first.lease_id).await;
    within("request", leases.request_cancel(&first.lease_id, call)).await.expect("request");
    assert!(within("other's", leases.take_cancel_requests(&other)).await.expect("take").is_empty());
    assert_eq!(within("owner's", leases.take_cancel_requests(&first)).await.expect("take"), vec![call]);
    assert!(within("again", leases.take_cancel_requests(&first)).await.expect("take").is_empty(), "handed out once");
}

#[tokio::test]
async fn the_shared_bucket_spreads_slots_over_all_takers() {
    let Some(store) = postgres().await else { return };
    let leases = Leases::new(&store, Duration::from_secs(2));
    let interval = Duration::from_millis(100);
    let takers = (0..3).map(|_| {
        let leases = leases.clone();
        tokio::spawn(async move {
            let mut slots = Vec::new();
            for _ in 0..5 {
                let asked = std::time::Instant::now();
                slots.push(asked + leases.take_slot(interval).await.expect("slot"));
            }
            slots
        })
    });
    let mut slots = Vec::new();
    for taker in takers {
        slots.extend(within("takers", taker).await.expect("taker"));
    }
    slots.sort();
    // 15 slots one interval apart, whoever took them: the three together keep one rate.
    let gaps: Vec<Duration> = slots.windows(2).map(|pair| pair[1] - pair[0]).collect();
    for gap in &gaps {
        assert!(*gap >= Duration::from_millis(80), "never two slots in one interval: {gaps:?}");
    }
    assert!(slots[14] - slots[0] >= Duration::from_millis(1300), "{gaps:?}");
}

async fn insert_owned_none(store: &SqlCallStore) -> CallId {
    let call = Call::new(CallId::new(), conformance::new_call("+15550000001"), now());
    within("insert", store.insert(&call)).await.expect("insert");
    call.call_id
}

async fn owned_by(store: &SqlCallStore, lease_id: &str, call_id: CallId) -> bool {
    let row: Option<(Option<String>,)> = sqlx::query_as("SELECT owner FROM calls WHERE call_id = $1")
        .bind(call_id.to_string())
        .fetch_optional(store.pool())
        .await
        .expect("owner");
    row.and_then(|r| r.0).as_deref() == Some(lease_id)
}

/// An instance that finds its lease lapsed (the others took its calls) lets go of every call
/// and stops, rather than fight for them.
#[tokio::test]
async fn an_instance_whose_lease_lapsed_lets_go_of_its_calls_and_stops() {
    use ivr_core::ari::{AriClient, AriConfig};
    use ivr_core::fake::FakeAsterisk;
    use ivr_core::manager::{Instance, InstanceSettings};
    use ivr_core::{CallManager, CallRequest, ManagerSettings, PhoneNumber};

    let fake = within("fake", FakeAsterisk::start()).await.expect("fake asterisk");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("ivr.db").display());
    let store = SqlCallStore::connect(&url).await.expect("sqlite");
    let settings = InstanceSettings { instance_id: "a".into(), lease_ttl: Duration::from_secs(2) };
    let instance = within("join", Instance::join(&store, &url, "ivr", &settings)).await.expect("join");
    assert_eq!(instance.app(), "ivr", "alone on SQLite, the app is ARI_APP");
    let ari =
        AriClient::new(AriConfig::new(fake.http_url(), fake.username(), fake.password(), instance.app())).expect("ari");
    let owning = Arc::new(instance.owning(&store));
    let manager = CallManager::with_instance(
        ari,
        owning,
        ManagerSettings::default(),
        &prometheus::Registry::new(),
        Some(instance),
    )
    .expect("manager");
    let running = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.run(std::future::pending()).await })
    };
    within("connected", async {
        while !manager.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // +15550000007 talks for a minute: the call is up when the lease goes.
    let number: PhoneNumber = "+15550000007".parse().expect("number");
    within("originate", manager.originate(CallRequest::to(number))).await.expect("originate");
    assert_eq!(manager.active_calls(), 1);
    sqlx::query("DELETE FROM instances").execute(store.pool()).await.expect("the lease goes");
    let stopped = within("the engine to stop", running).await.expect("run task");
    assert!(matches!(stopped, Err(Error::LeaseLost)), "{stopped:?}");
    assert_eq!(manager.active_calls(), 0, "no call is followed any more");
}

/// Every change of a call is announced on `ivr_calls` when it commits: what wakes the event
/// streams of calls followed by another instance. Installing twice (two instances) is fine.
#[tokio::test]
async fn a_change_of_a_call_is_announced_to_listeners() {
    let Ok(base) = std::env::var("IVR_TEST_DATABASE_URL") else {
        let _ = writeln!(std::io::stderr(), "skipped: PostgreSQL NOTIFY test (IVR_TEST_DATABASE_URL is not set)");
        return;
    };
    let schema = format!("ivr_test_{}", uuid::Uuid::new_v4().simple());
    let admin = SqlCallStore::connect_without_migrating(&base).await.expect("connect");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(admin.pool()).await.expect("schema");
    let url = format!("{base}{}options[search_path]={schema}", if base.contains('?') { '&' } else { '?' });
    let store = SqlCallStore::connect(&url).await.expect("migrate");
    let leases = Leases::new(&store, Duration::from_secs(60));
    within("install", leases.install_notify()).await.expect("install");
    within("install again", leases.install_notify()).await.expect("idempotent");
    let mut listener = within("listen", sqlx::postgres::PgListener::connect(&url)).await.expect("listener");
    within("listen", listener.listen(ivr_core::store::lease::CALLS_CHANNEL)).await.expect("listen");
    let call = insert_owned_none(&store).await;
    let sent = Transition::new(Step::Sent, "sent to Asterisk");
    within("apply", store.apply(call, &sent)).await.expect("apply");
    let told = within("notification", listener.recv()).await.expect("notification");
    assert_eq!(told.payload(), call.to_string());
    // One per change, not one per trigger installed.
    let dialing = Transition::new(Step::Dialing, "originate accepted");
    within("apply", store.apply(call, &dialing)).await.expect("apply");
    assert_eq!(within("notification", listener.recv()).await.expect("notification").payload(), call.to_string());
    assert!(tokio::time::timeout(Duration::from_millis(300), listener.recv()).await.is_err(), "nothing more");
}
