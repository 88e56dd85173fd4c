//! The [`CallStore`] contract as executable checks, written once and run by every
//! implementation (feature `testing`).
//!
//! An implementation's test file names a factory and lets [`call_store_conformance!`](crate::call_store_conformance) make
//! one `#[tokio::test]` per check:
//!
//! ```no_run
//! use std::sync::Arc;
//! use ivr_core::store::conformance::Fixture;
//!
//! async fn memory() -> Option<Fixture> {
//!     Some(Fixture::new(Arc::new(ivr_core::MemoryCallStore::new())))
//! }
//!
//! ivr_core::call_store_conformance!(memory);
//! ```
//!
//! A factory returns `None` to skip (and should say so), e.g. when its database is not
//! configured. Each check gets a fresh, empty store.

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use time::{Duration, OffsetDateTime};

use super::{Applied, CallQuery, CallStore};

mod retention;
use crate::call::{Call, CallId, CallSpec, CallStatus, FailureReason, Hangup, Ignored, PhoneNumber, Step, Transition};
use crate::error::{Conflict, Error};
use crate::webhook::{Attempt, DeliveryState};
pub use retention::{purge_deletes_only_calls_ended_before_the_cutoff, purge_goes_in_batches_oldest_first};

/// A fresh store for one check, with whatever must live as long as it (a temp dir, say).
pub struct Fixture {
    pub store: Arc<dyn CallStore>,
    _keep: Option<Box<dyn Any + Send>>,
}

impl Fixture {
    pub fn new(store: Arc<dyn CallStore>) -> Self {
        Fixture { store, _keep: None }
    }

    /// Keeps `guard` alive until the check is over.
    pub fn keeping(mut self, guard: impl Any + Send) -> Self {
        self._keep = Some(Box::new(guard));
        self
    }
}

/// A PostgreSQL store in a new schema of its own (named `ivr_test_<uuid>`), so parallel tests
/// and runs against one database never see each other's rows.
pub async fn postgres_in_fresh_schema(url: &str) -> crate::Result<super::SqlCallStore> {
    let schema = format!("ivr_test_{}", uuid::Uuid::new_v4().simple());
    let admin = super::SqlCallStore::connect_without_migrating(url).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(admin.pool())
        .await
        .map_err(|e| Error::StoreUnavailable(e.into()))?;
    admin.pool().close().await;
    let separator = if url.contains('?') { '&' } else { '?' };
    super::SqlCallStore::connect(&format!("{url}{separator}options[search_path]={schema}")).await
}

/// One `#[tokio::test]` per conformance check, each on a store from `$factory`
/// (an `async fn() -> Option<Fixture>`).
#[macro_export]
macro_rules! call_store_conformance {
    ($factory:path) => {
        $crate::call_store_conformance!(@checks $factory;
            round_trip_of_every_field,
            duplicates_are_refused_with_the_existing_call,
            idempotency_key_conflicts,
            transition_contract,
            retry_returns_to_pending_in_the_store,
            racing_writers_one_wins,
            filters_and_pagination_over_10000_calls,
            active_calls_are_listed,
            outbox_is_written_with_the_transition,
            racing_claimers_each_delivery_once,
            purging_a_call_purges_its_deliveries,
            purge_deletes_only_calls_ended_before_the_cutoff,
            purge_goes_in_batches_oldest_first,
        );
    };
    (@checks $factory:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                if let Some(fixture) = $factory().await {
                    let check = $crate::store::conformance::$check(::std::sync::Arc::clone(&fixture.store));
                    ::tokio::time::timeout(::std::time::Duration::from_secs(300), check)
                        .await
                        .expect(concat!(stringify!($check), " did not finish within 300 s"));
                }
            }
        )*
    };
}

/// A plain request for `number`.
pub fn new_call(number: &str) -> CallSpec {
    CallSpec {
        phone_number: PhoneNumber::parse(number).expect("a valid test number"),
        context: "ivr-menu".into(),
        extension: "s".into(),
        priority: 1,
        caller_id: Some("\"IVR Test\" <+15559990000>".into()),
        timeout_secs: 30,
        audio: None,
        variables: BTreeMap::new(),
        max_attempts: 1,
        idempotency_key: None,
        status_callback: None,
        status_callback_events: Vec::new(),
    }
}

/// Call `i` of a seeded table: answered, talked and hung up, with the six-step history the
/// engine records (for benches and memory measurements that need many realistic ended calls).
pub fn answered_call_that_ended(i: usize) -> Call {
    let mut call = Call::new(CallId::new(), new_call(&format!("+1555{:07}", i % 10_000_000)), crate::call::now());
    for step in [
        Transition::new(Step::Sent, "originate sent"),
        Transition::new(Step::Dialing, "originate accepted").channel(format!("PJSIP/trunk-{i:08x}")),
        Transition::new(Step::Ringing, "ChannelStateChange Ringing"),
        Transition::new(Step::Answered, "ChannelStateChange Up"),
        Transition::new(Step::Ended { reason_if_unanswered: FailureReason::NoAnswer }, "ChannelDestroyed")
            .hangup(Hangup { code: 16, text: "Normal Clearing".into() }),
    ] {
        call.apply(&step).expect("a forward step");
    }
    call
}

/// An instant with a non-zero microsecond part, `offset_ms` after a fixed base.
fn instant(offset_ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(1_764_076_455_123_456_000).unwrap() + Duration::milliseconds(offset_ms)
}

fn step(step: Step, cause: &str, at_ms: i64) -> Transition {
    Transition::new(step, cause).at(instant(at_ms))
}

fn ended(reason: FailureReason) -> Step {
    Step::Ended { reason_if_unanswered: reason }
}

async fn stored(store: &dyn CallStore, id: CallId) -> Call {
    store.get(id).await.expect("get").expect("the call is stored")
}

/// Every field survives a round trip: unicode, optionals set and unset, microseconds.
pub async fn round_trip_of_every_field(store: Arc<dyn CallStore>) {
    let mut full = Call::new(
        CallId::new(),
        CallSpec {
            phone_number: PhoneNumber::parse("+15550000001").unwrap(),
            context: "ivr-menü".into(),
            extension: "1000".into(),
            priority: 7,
            caller_id: Some("\"Zoë Ünïcødé 電話 📞\" <+15559990000>".into()),
            timeout_secs: 45,
            audio: Some("sound:hello-world".into()),
            variables: BTreeMap::from([("GREETING".into(), "grüß dich".into()), ("X".into(), "".into())]),
            max_attempts: 3,
            idempotency_key: Some("key-ключ-1".into()),
            status_callback: Some("http://hooks.example:8080/ivr?ü=1".into()),
            status_callback_events: vec![CallStatus::Ringing, CallStatus::Completed],
        },
        instant(0),
    );
    full.apply(&step(Step::Sent, "sent to Asterisk", 0)).unwrap();
    full.apply(&step(Step::Dialing, "originate accepted", 1).channel("Local/+15550000001@sim-00000001;1")).unwrap();
    full.apply(&step(Step::Ringing, "ChannelStateChange Ringing", 2)).unwrap();
    full.apply(&step(Step::Answered, "StasisStart", 2_003)).unwrap();
    full.apply(
        &step(ended(FailureReason::Lost), "ChannelDestroyed", 7_777)
            .hangup(Hangup { code: 16, text: "Normal Clearing".into() }),
    )
    .unwrap();
    assert_eq!(full.created_at.microsecond(), 123_456, "the fixture has sub-millisecond precision");

    let bare = Call::new(CallId::new(), CallSpec { caller_id: None, ..new_call("123") }, instant(10));

    for call in [&full, &bare] {
        store.insert(call).await.expect("insert");
        assert_eq!(&stored(&*store, call.call_id).await, call, "get returns what was inserted");
    }
    assert_eq!(store.get_by_idempotency_key("key-ключ-1").await.unwrap().as_ref(), Some(&full));
    assert_eq!(store.get_by_idempotency_key("key-ключ-2").await.unwrap(), None);
    assert_eq!(store.get(CallId::new()).await.unwrap(), None, "an unknown id is not an error");
    store.ping().await.expect("ping");
}

/// A second insert of the same id is refused and carries the stored call, unchanged.
pub async fn duplicates_are_refused_with_the_existing_call(store: Arc<dyn CallStore>) {
    let first = Call::new(CallId::new(), new_call("+15550000002"), instant(0));
    store.insert(&first).await.unwrap();
    let mut again = Call::new(first.call_id, new_call("+15550000003"), instant(5));
    again.spec.context = "other".into();
    match store.insert(&again).await {
        Err(Error::AlreadyExists { on: Conflict::CallId, existing }) => assert_eq!(*existing, first),
        other => panic!("expected AlreadyExists on the call id, got {other:?}"),
    }
    assert_eq!(stored(&*store, first.call_id).await, first, "nothing was overwritten");
}

/// An idempotency key names one call; a second call with it is refused, also under a race.
pub async fn idempotency_key_conflicts(store: Arc<dyn CallStore>) {
    let keyed = |key: &str| CallSpec { idempotency_key: Some(key.into()), ..new_call("+15550000001") };
    let first = Call::new(CallId::new(), keyed("order-42"), instant(0));
    store.insert(&first).await.unwrap();

    let second = Call::new(CallId::new(), keyed("order-42"), instant(1));
    match store.insert(&second).await {
        Err(Error::AlreadyExists { on: Conflict::IdempotencyKey, existing }) => assert_eq!(*existing, first),
        other => panic!("expected AlreadyExists on the idempotency key, got {other:?}"),
    }
    assert_eq!(store.get(second.call_id).await.unwrap(), None, "the refused call was not stored");
    assert_eq!(store.get_by_idempotency_key("order-42").await.unwrap(), Some(first));

    // 16 different calls race for one new key: exactly one is stored, the others see it.
    let contenders: Vec<Call> = (0..16).map(|i| Call::new(CallId::new(), keyed("order-43"), instant(i))).collect();
    let results = futures_util::future::join_all(contenders.iter().map(|call| {
        let store = Arc::clone(&store);
        let call = call.clone();
        tokio::spawn(async move { store.insert(&call).await })
    }))
    .await;
    let mut winners = Vec::new();
    let mut seen = HashSet::new();
    for (call, result) in contenders.iter().zip(results) {
        match result.expect("insert task") {
            Ok(()) => winners.push(call.call_id),
            Err(Error::AlreadyExists { on: Conflict::IdempotencyKey, existing }) => {
                seen.insert(existing.call_id);
            }
            Err(other) => panic!("unexpected error in the key race: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one insert wins the key");
    assert!(seen.iter().all(|id| *id == winners[0]), "every loser is shown the winner");
    let holder = store.get_by_idempotency_key("order-43").await.unwrap().unwrap();
    assert_eq!(holder.call_id, winners[0]);
}

/// Forward moves are stored; backward, repeated and post-terminal ones are ignored visibly.
pub async fn transition_contract(store: Arc<dyn CallStore>) {
    let missing = CallId::new();
    match store.apply(missing, &step(Step::Dialing, "x", 0)).await {
        Err(Error::NotFound(id)) => assert_eq!(id, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }

    let call = Call::new(CallId::new(), new_call("+15550000001"), instant(0));
    store.insert(&call).await.unwrap();
    let id = call.call_id;
    let mut model = call.clone();

    let script = [
        (step(Step::Sent, "sent to Asterisk", 5), None),
        (step(Step::Sent, "sent twice", 6), Some(Ignored::AlreadySent)),
        (step(Step::Dialing, "originate 200", 10).channel("PJSIP/+15550000001@trunk-00000001"), None),
        (
            step(Step::Dialing, "duplicate", 11),
            Some(Ignored::NotForward { current: CallStatus::Dialing, requested: CallStatus::Dialing }),
        ),
        (step(Step::Answered, "StasisStart", 2_000), None),
        (
            step(Step::Ringing, "late ChannelStateChange", 2_001),
            Some(Ignored::NotForward { current: CallStatus::Answered, requested: CallStatus::Ringing }),
        ),
        (
            step(ended(FailureReason::NoAnswer), "ChannelDestroyed 16", 5_000)
                .hangup(Hangup { code: 16, text: "Normal Clearing".into() }),
            None,
        ),
        (step(ended(FailureReason::Busy), "second destroy", 5_001), Some(Ignored::Terminal(CallStatus::Completed))),
        (step(Step::Answered, "very late", 5_002), Some(Ignored::Terminal(CallStatus::Completed))),
    ];
    for (transition, expect_ignored) in script {
        let applied = store.apply(id, &transition).await.expect("apply");
        let model_result = model.apply(&transition);
        match (&applied, expect_ignored) {
            (Applied::Changed(call), None) => assert_eq!(call, &model, "{}", transition.cause),
            (Applied::Ignored { call, why }, Some(expected)) => {
                assert_eq!(why, &expected, "{}", transition.cause);
                assert_eq!(model_result, Err(expected));
                assert_eq!(call, &model, "an ignored transition shows the current call");
            }
            (other, expected) => panic!("{}: got {other:?}, expected ignored = {expected:?}", transition.cause),
        }
        assert_eq!(stored(&*store, id).await, model, "the store holds what apply returned");
    }
    let done = stored(&*store, id).await;
    assert_eq!(done.status, CallStatus::Completed);
    assert_eq!(done.ringing_at, None);
    assert_eq!(done.answered_at, Some(instant(2_000)));
    assert_eq!(done.duration(), Some(3.0));
    assert_eq!(done.sent_at, Some(instant(5)), "the queue is told from the sent by sent_at");
    assert_eq!(done.history.len(), 5);
}

/// A retryable failure with attempts left goes back to pending, attempt and history intact.
pub async fn retry_returns_to_pending_in_the_store(store: Arc<dyn CallStore>) {
    let call = Call::new(CallId::new(), CallSpec { max_attempts: 2, ..new_call("+15550000002") }, instant(0));
    store.insert(&call).await.unwrap();
    let id = call.call_id;
    store.apply(id, &step(Step::Dialing, "originate", 1).for_attempt(1)).await.unwrap();
    let after_busy =
        store.apply(id, &step(ended(FailureReason::Busy), "Dial BUSY", 1_500).for_attempt(1)).await.unwrap();
    assert!(after_busy.is_changed());
    let call = stored(&*store, id).await;
    assert_eq!(call, after_busy.into_call());
    assert_eq!((call.status, call.attempt_number, call.channel.as_deref()), (CallStatus::Pending, 2, None));
    assert!(call.is_queued(), "the next attempt was never sent");
    let failed = &call.history[call.history.len() - 2];
    assert_eq!(
        (failed.status, failed.attempt, failed.failure_reason),
        (CallStatus::Failed, 1, Some(FailureReason::Busy))
    );

    let stale = store.apply(id, &step(Step::Ringing, "late ring of attempt 1", 1_600).for_attempt(1)).await.unwrap();
    assert_eq!(stale.call(), &call);
    assert!(matches!(stale, Applied::Ignored { why: Ignored::StaleAttempt { current: 2, requested: 1 }, .. }));

    store.apply(id, &step(Step::Dialing, "originate", 3_000).for_attempt(2)).await.unwrap();
    store.apply(id, &step(ended(FailureReason::Congestion), "Dial CONGESTION", 4_000).for_attempt(2)).await.unwrap();
    let call = stored(&*store, id).await;
    assert_eq!((call.status, call.failure_reason), (CallStatus::Failed, Some(FailureReason::Congestion)));
    assert!(call.is_completed());
}

/// 32 tasks apply conflicting transitions to one call: exactly one wins, every time.
pub async fn racing_writers_one_wins(store: Arc<dyn CallStore>) {
    for round in 0..5 {
        let call = Call::new(CallId::new(), new_call("+15550000004"), instant(round));
        store.insert(&call).await.unwrap();
        let id = call.call_id;
        store.apply(id, &step(Step::Ringing, "ring", round + 1)).await.unwrap();

        // Half try to answer, half to end it with their own reason; all conflict with each other
        // except answer-then-end, which the contract allows as two steps. Ends are what we count.
        let reasons =
            [FailureReason::Busy, FailureReason::NoAnswer, FailureReason::Congestion, FailureReason::Canceled];
        let tasks = (0..32).map(|i| {
            let store = Arc::clone(&store);
            let transition = step(ended(reasons[i % reasons.len()]), &format!("task {i}"), round + 2);
            tokio::spawn(async move { (i, store.apply(id, &transition).await.expect("apply")) })
        });
        let results = futures_util::future::join_all(tasks).await;
        let mut winners = Vec::new();
        for result in results {
            let (i, applied) = result.expect("task");
            match applied {
                Applied::Changed(call) => winners.push((i, call)),
                Applied::Ignored { call, why } => {
                    assert_eq!(why, Ignored::Terminal(CallStatus::Failed), "a loser sees the winner's state");
                    assert_eq!(call.status, CallStatus::Failed);
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one writer wins");
        let (winner, won) = &winners[0];
        let final_call = stored(&*store, id).await;
        assert_eq!(&final_call, won, "the store holds the winner's call");
        assert_eq!(final_call.failure_reason, Some(reasons[winner % reasons.len()]));
        assert_eq!(final_call.history.last().unwrap().cause, format!("task {winner}"));
        assert_eq!(final_call.history.len(), 3, "pending, ringing and one end");

        // The same with 32 identical answers: one moves the call, 31 are told it is answered.
        let call = Call::new(CallId::new(), new_call("+15550000001"), instant(round));
        store.insert(&call).await.unwrap();
        let answers = (0..32).map(|i| {
            let store = Arc::clone(&store);
            let transition = step(Step::Answered, &format!("answer {i}"), round + 3);
            tokio::spawn(async move { store.apply(call.call_id, &transition).await.expect("apply") })
        });
        let changed = futures_util::future::join_all(answers)
            .await
            .into_iter()
            .filter(|r| r.as_ref().expect("task").is_changed())
            .count();
        assert_eq!(changed, 1, "round {round}: exactly one answer is applied");
        assert_eq!(stored(&*store, call.call_id).await.history.len(), 2);
    }
}

/// Filters and keyset pagination over 10,000 calls: every call seen exactly once, in order.
pub async fn filters_and_pagination_over_10000_calls(store: Arc<dyn CallStore>) {
    const N: usize = 10_000;
    let numbers = ["+15550000001", "+15550000002", "+15550000003", "+15550000004", "+15550000005"];
    // Three calls share each millisecond, so ties on created_at must be broken consistently.
    let calls: Vec<Call> = (0..N)
        .map(|i| {
            let mut call = Call::new(CallId::new(), new_call(numbers[i % numbers.len()]), instant((i / 3) as i64));
            let at = (i / 3) as i64 + 1;
            match i % 4 {
                0 => {}
                1 => call.apply(&step(Step::Dialing, "originate", at)).unwrap(),
                2 => call.apply(&step(ended(FailureReason::Busy), "busy", at)).unwrap(),
                _ => {
                    call.apply(&step(Step::Answered, "answer", at)).unwrap();
                    call.apply(&step(ended(FailureReason::Lost), "hangup", at + 1)).unwrap();
                }
            }
            call
        })
        .collect();
    stream::iter(&calls)
        .map(|call| store.insert(call))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("inserting 10,000 calls");

    // Everything, 100 a page, while newer calls keep arriving.
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut query = CallQuery { limit: 100, ..CallQuery::default() };
    let mut pages = 0;
    loop {
        let page = store.list(&query).await.expect("list");
        pages += 1;
        assert!(page.calls.len() <= 100);
        for call in &page.calls {
            assert!(seen.insert(call.call_id), "{} seen twice", call.call_id);
            order.push((call.created_at, call.call_id));
        }
        if pages == 1 {
            let late = Call::new(CallId::new(), new_call("+15550000009"), instant(1_000_000));
            store.insert(&late).await.unwrap();
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), N, "every call is seen exactly once ({pages} pages)");
    assert!(order.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");
    assert_eq!(pages, N / 100, "full pages, and no empty page at the end");
    let first_page = store.list(&CallQuery::default()).await.unwrap();
    assert_eq!(first_page.calls.len(), CallQuery::DEFAULT_PAGE_SIZE);
    assert_eq!(first_page.calls[0].spec.phone_number.as_str(), "+15550000009", "the late call is newest");
    assert!(!first_page.calls[1].history.is_empty(), "listed calls carry their history");

    // Filtered: two statuses, one number, a created_at window; small odd pages.
    let query = CallQuery {
        statuses: vec![CallStatus::Failed, CallStatus::Completed],
        phone_number: Some(PhoneNumber::parse(numbers[2]).unwrap()),
        created_from: Some(instant(500)),
        created_to: Some(instant(2_500)),
        limit: 7,
        after: None,
    };
    let expected: HashSet<CallId> = calls.iter().filter(|c| query.matches(c)).map(|c| c.call_id).collect();
    assert!(expected.len() > 50, "the filter keeps a few pages' worth");
    let mut got = HashSet::new();
    let mut query = query;
    loop {
        let page = store.list(&query).await.unwrap();
        for call in page.calls {
            assert!(query.matches(&call), "{} passes the filters", call.call_id);
            assert!(got.insert(call.call_id), "{} seen twice", call.call_id);
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(got, expected, "the filtered listing is exactly the matching calls");

    let capped = store.list(&CallQuery { limit: 5_000, ..CallQuery::default() }).await.unwrap();
    assert_eq!(capped.calls.len(), CallQuery::MAX_PAGE_SIZE);
    let none = CallQuery { phone_number: Some(PhoneNumber::parse("+19999999999").unwrap()), ..CallQuery::default() };
    let empty = store.list(&none).await.unwrap();
    assert!(empty.calls.is_empty() && empty.next.is_none());
}

/// `list_active` returns exactly the calls that are not terminal, with their history.
pub async fn active_calls_are_listed(store: Arc<dyn CallStore>) {
    assert!(store.list_active().await.unwrap().is_empty());
    let mut expected = HashSet::new();
    for (i, path) in [
        &[][..],
        &[Step::Dialing],
        &[Step::Dialing, Step::Ringing],
        &[Step::Answered],
        &[Step::Answered, ended(FailureReason::Lost)],
        &[ended(FailureReason::Rejected)],
    ]
    .into_iter()
    .enumerate()
    {
        let call = Call::new(CallId::new(), new_call("+15550000001"), instant(i as i64));
        store.insert(&call).await.unwrap();
        for (j, s) in path.iter().enumerate() {
            store.apply(call.call_id, &step(*s, "test", (i * 10 + j) as i64)).await.unwrap();
        }
        let call = stored(&*store, call.call_id).await;
        if call.is_active() {
            expected.insert(call.call_id);
        }
    }
    let active = store.list_active().await.unwrap();
    let ids: HashSet<CallId> = active.iter().map(|c| c.call_id).collect();
    assert_eq!(ids, expected);
    assert_eq!(ids.len(), 4);
    for call in active {
        assert_eq!(call, stored(&*store, call.call_id).await, "listed calls are complete");
    }
}

/// A store that keeps at most `max_ended` ended calls (the memory store's `MEMORY_MAX_CALLS`):
/// past the bound the call that *ended* first goes, with its idempotency key, from `get` and
/// `list` alike; active calls are never let go, however many there are and however old.
pub async fn keeps_at_most_max_ended_calls(store: Arc<dyn CallStore>, max_ended: usize) {
    // Old active calls, created before everything else.
    let mut active = Vec::new();
    for i in 0..max_ended + 2 {
        let call = Call::new(CallId::new(), new_call("+15550000001"), instant(i as i64));
        store.insert(&call).await.unwrap();
        store.apply(call.call_id, &step(Step::Answered, "test", i as i64)).await.unwrap();
        active.push(call.call_id);
    }
    // Calls that end in the reverse order of their creation, each with a key.
    let mut ended_in_order = Vec::new();
    let mut created = Vec::new();
    for i in 0..max_ended + 3 {
        let mut spec = new_call("+15550000002");
        spec.idempotency_key = Some(format!("bound-{i}"));
        let call = Call::new(CallId::new(), spec, instant(1_000 + i as i64));
        store.insert(&call).await.unwrap();
        created.push(call.call_id);
    }
    for (j, id) in created.iter().rev().enumerate() {
        store.apply(*id, &step(ended(FailureReason::Rejected), "test", 2_000 + j as i64)).await.unwrap();
        ended_in_order.push(*id);
    }
    let gone = &ended_in_order[..3];
    let kept = &ended_in_order[3..];
    for id in gone {
        assert!(store.get(*id).await.unwrap().is_none(), "the first calls to end are let go first");
    }
    for id in kept {
        assert!(stored(&*store, *id).await.is_completed());
    }
    for id in &active {
        assert!(stored(&*store, *id).await.is_active(), "active calls are never let go");
    }
    assert_eq!(store.list_active().await.unwrap().len(), active.len());
    let listed = store.list(&CallQuery { limit: 100, ..CallQuery::default() }).await.unwrap();
    assert_eq!(listed.calls.len(), active.len() + kept.len(), "list shows what get shows");
    // The keys of the calls let go are free again; those kept still name their calls.
    let first_gone_key = format!("bound-{}", max_ended + 2);
    assert!(store.get_by_idempotency_key(&first_gone_key).await.unwrap().is_none());
    assert_eq!(store.get_by_idempotency_key("bound-0").await.unwrap().map(|c| c.call_id), Some(created[0]));
}

/// A call that asks for the status callbacks of `events`.
fn watched(number: &str, events: &[CallStatus]) -> CallSpec {
    CallSpec {
        status_callback: Some("http://hooks.example/ivr".into()),
        status_callback_events: events.to_vec(),
        ..new_call(number)
    }
}

fn attempt(state: DeliveryState, at_ms: i64, next_ms: i64) -> Attempt {
    Attempt { at: instant(at_ms), result: format!("test {at_ms}"), state, next_attempt_at: instant(next_ms) }
}

/// The outbox is written with the transitions it tells of: one delivery per selected change,
/// with the call as that change left it; none for an ignored transition or a call without a
/// callback; claims hand out a call's deliveries one at a time, in order, leased; an attempt
/// is recorded and ends the lease.
pub async fn outbox_is_written_with_the_transition(store: Arc<dyn CallStore>) {
    let events = [CallStatus::Pending, CallStatus::Answered, CallStatus::Completed];
    let call = Call::new(CallId::new(), watched("+15550000001", &events), instant(0));
    store.insert(&call).await.unwrap();
    let silent = Call::new(CallId::new(), new_call("+15550000002"), instant(0));
    store.insert(&silent).await.unwrap();
    let mut snapshots = vec![call.clone()];
    for s in [Step::Sent, Step::Dialing, Step::Answered] {
        let applied = store.apply(call.call_id, &step(s, "test", 10)).await.unwrap();
        if s == Step::Answered {
            snapshots.push(applied.into_call());
        }
    }
    assert!(!store.apply(call.call_id, &step(Step::Ringing, "late", 11)).await.unwrap().is_changed());
    assert!(store.deliveries(silent.call_id).await.unwrap().is_empty(), "no callback, no outbox");
    assert!(store.deliveries(CallId::new()).await.unwrap().is_empty());

    let outbox = store.deliveries(call.call_id).await.unwrap();
    assert_eq!(outbox.iter().map(|d| d.status).collect::<Vec<_>>(), [CallStatus::Pending, CallStatus::Answered]);
    for (d, snapshot) in outbox.iter().zip(&snapshots) {
        assert_eq!(&d.call, snapshot, "the call as the transition left it");
        assert_eq!((d.state, d.attempts, d.last_result.as_deref()), (DeliveryState::Pending, 0, None));
        assert_eq!(d.url, "http://hooks.example/ivr");
        assert_eq!(d.transition().map(|t| t.status), Some(d.status));
    }
    assert_ne!(outbox[0].event_id, outbox[1].event_id);
    assert_eq!(store.outbox_depth().await.unwrap(), 2);

    // Nothing is due before its time; then only the call's first, leased to one claimer.
    assert!(store.claim_deliveries(instant(-1), instant(1_000), 10).await.unwrap().is_empty());
    let first = store.claim_deliveries(instant(100), instant(1_000), 10).await.unwrap();
    assert_eq!(first.iter().map(|d| d.event_id).collect::<Vec<_>>(), [outbox[0].event_id]);
    assert!(store.claim_deliveries(instant(200), instant(1_000), 10).await.unwrap().is_empty(), "leased");
    // A lease that ended (its claimer died) is claimed again.
    let again = store.claim_deliveries(instant(1_000), instant(2_000), 10).await.unwrap();
    assert_eq!(again.iter().map(|d| d.event_id).collect::<Vec<_>>(), [outbox[0].event_id]);

    store.record_attempt(outbox[0].event_id, &attempt(DeliveryState::Pending, 1_100, 5_000)).await.unwrap();
    assert!(store.claim_deliveries(instant(4_999), instant(9_000), 10).await.unwrap().is_empty(), "in order");
    let retried = &store.deliveries(call.call_id).await.unwrap()[0];
    assert_eq!((retried.attempts, retried.last_result.as_deref()), (1, Some("test 1100")));
    assert_eq!((retried.last_attempt_at, retried.next_attempt_at), (Some(instant(1_100)), instant(5_000)));
    let due = store.claim_deliveries(instant(5_000), instant(9_000), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    store.record_attempt(outbox[0].event_id, &attempt(DeliveryState::Delivered, 5_001, 5_001)).await.unwrap();
    let next = store.claim_deliveries(instant(5_002), instant(9_000), 10).await.unwrap();
    assert_eq!(next.iter().map(|d| d.event_id).collect::<Vec<_>>(), [outbox[1].event_id], "then the next");
    store.record_attempt(outbox[1].event_id, &attempt(DeliveryState::Failed, 5_003, 5_003)).await.unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    assert!(store.claim_deliveries(instant(99_999), instant(100_000), 10).await.unwrap().is_empty());
    let done = store.deliveries(call.call_id).await.unwrap();
    assert_eq!(
        done.iter().map(|d| (d.state, d.attempts)).collect::<Vec<_>>(),
        [(DeliveryState::Delivered, 2), (DeliveryState::Failed, 1)]
    );
}

/// Of claimers racing over many calls' deliveries, each delivery goes to exactly one.
pub async fn racing_claimers_each_delivery_once(store: Arc<dyn CallStore>) {
    let mut expected = HashSet::new();
    for i in 0..40 {
        let call = Call::new(CallId::new(), watched("+15550000003", &[CallStatus::Pending]), instant(i));
        store.insert(&call).await.unwrap();
        expected.insert(store.deliveries(call.call_id).await.unwrap()[0].event_id);
    }
    let claims = (0..8).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store.claim_deliveries(instant(1_000), instant(60_000), 3).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|d| d.event_id));
            }
        })
    });
    let mut seen = Vec::new();
    for claim in claims {
        seen.extend(claim.await.unwrap());
    }
    assert_eq!(seen.len(), expected.len(), "no delivery claimed twice");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
}

/// Retention: purging an ended call deletes its status callbacks with it, pending ones too;
/// the deliveries of a call that is kept stay.
pub async fn purging_a_call_purges_its_deliveries(store: Arc<dyn CallStore>) {
    let events = [CallStatus::Pending, CallStatus::Failed];
    let old = Call::new(CallId::new(), watched("+15550000001", &events), instant(0));
    let kept = Call::new(CallId::new(), watched("+15550000002", &events), instant(0));
    for call in [&old, &kept] {
        store.insert(call).await.unwrap();
    }
    store.apply(old.call_id, &step(ended(FailureReason::Rejected), "rejected", 10)).await.unwrap();
    assert_eq!(store.deliveries(old.call_id).await.unwrap().len(), 2);
    assert_eq!(store.outbox_depth().await.unwrap(), 3);
    assert_eq!(store.purge_ended(instant(1_000)).await.unwrap(), 1);
    assert!(store.deliveries(old.call_id).await.unwrap().is_empty(), "purged with the call");
    assert_eq!(store.deliveries(kept.call_id).await.unwrap().len(), 1);
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
    let claimed = store.claim_deliveries(instant(2_000), instant(3_000), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|d| d.call_id).collect::<Vec<_>>(), [kept.call_id]);
}
