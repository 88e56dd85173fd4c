//! The retention part of the contract: [`CallStore::purge_ended_batch`] and
//! [`CallStore::purge_ended`].

use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::{ended, instant, new_call, step, stored};
use crate::call::{Call, CallId, CallSpec, CallStatus, FailureReason, Step};
use crate::store::{CallQuery, CallStore, PURGE_BATCH};

/// A call created at `created_ms` that ends (answered, then hung up) at `ended_ms`.
fn ended_call(number: &str, created_ms: i64, ended_ms: i64) -> Call {
    let mut call = Call::new(CallId::new(), new_call(number), instant(created_ms));
    call.apply(&step(Step::Sent, "sent", created_ms)).unwrap();
    call.apply(&step(Step::Answered, "StasisStart", created_ms + 1)).unwrap();
    call.apply(&step(ended(FailureReason::Lost), "ChannelDestroyed", ended_ms)).unwrap();
    call
}

async fn insert_all(store: &dyn CallStore, calls: &[Call]) {
    stream::iter(calls).map(|call| store.insert(call)).buffer_unordered(16).try_collect::<Vec<()>>().await.unwrap();
}

async fn every_id(store: &dyn CallStore) -> Vec<CallId> {
    let mut ids = Vec::new();
    let mut query = CallQuery { limit: CallQuery::MAX_PAGE_SIZE, ..CallQuery::default() };
    loop {
        let page = store.list(&query).await.unwrap();
        ids.extend(page.calls.iter().map(|c| c.call_id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return ids,
        }
    }
}

/// Only terminal calls ended strictly before the cutoff go, each with its history; active
/// calls stay whatever the cutoff; a purged call's idempotency key is free again.
pub async fn purge_deletes_only_calls_ended_before_the_cutoff(store: Arc<dyn CallStore>) {
    let cutoff = instant(100_000);
    assert_eq!(store.purge_ended(cutoff).await.unwrap(), 0, "an empty store purges nothing");

    // Active calls in every state, created long before the cutoff.
    let mut active = Vec::new();
    for path in [&[][..], &[Step::Sent], &[Step::Sent, Step::Dialing], &[Step::Ringing], &[Step::Answered]] {
        let mut call = Call::new(CallId::new(), new_call("+15550000001"), instant(0));
        for (i, s) in path.iter().enumerate() {
            call.apply(&step(*s, "test", i as i64 + 1)).unwrap();
        }
        active.push(call);
    }
    // A call that failed its first attempt and waits for its retry has no end yet.
    let mut retrying = Call::new(CallId::new(), CallSpec { max_attempts: 2, ..new_call("+15550000002") }, instant(1));
    retrying.apply(&step(Step::Dialing, "originate", 2)).unwrap();
    retrying.apply(&step(ended(FailureReason::Busy), "Dial BUSY", 3)).unwrap();
    assert_eq!(retrying.status, CallStatus::Pending);
    active.push(retrying);

    // Ended before the cutoff: answered, failed, failed after a retry, one with a key.
    let mut old = vec![ended_call("+15550000001", 10, 50_000)];
    let mut busy = Call::new(CallId::new(), new_call("+15550000002"), instant(20));
    busy.apply(&step(ended(FailureReason::Busy), "Dial BUSY", 60_000)).unwrap();
    old.push(busy);
    let mut retried = Call::new(CallId::new(), CallSpec { max_attempts: 2, ..new_call("+15550000003") }, instant(30));
    retried.apply(&step(ended(FailureReason::Congestion), "first", 40)).unwrap();
    retried.apply(&step(ended(FailureReason::Congestion), "second", 99_999)).unwrap();
    assert_eq!((retried.status, retried.history.len()), (CallStatus::Failed, 4));
    old.push(retried);
    let mut keyed = ended_call("+15550000004", 40, 70_000);
    keyed.spec.idempotency_key = Some("retention-key".into());
    old.push(keyed.clone());

    // Ended at the cutoff or after it, though created long before: kept.
    let kept = vec![ended_call("+15550000005", 0, 100_000), ended_call("+15550000006", 0, 100_001)];

    for calls in [&active, &old, &kept] {
        insert_all(&*store, calls).await;
    }
    assert_eq!(store.purge_ended(cutoff).await.unwrap(), old.len() as u64, "the count of calls deleted");
    for call in &old {
        assert_eq!(store.get(call.call_id).await.unwrap(), None, "a purged call is gone");
    }
    for call in active.iter().chain(&kept) {
        assert_eq!(&stored(&*store, call.call_id).await, call, "a kept call is untouched, history and all");
    }
    let mut listed = every_id(&*store).await;
    let mut expected: Vec<CallId> = active.iter().chain(&kept).map(|c| c.call_id).collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected, "the listing holds exactly the kept calls");
    assert_eq!(store.list_active().await.unwrap().len(), active.len());
    assert_eq!(store.purge_ended(cutoff).await.unwrap(), 0, "a second purge finds nothing");

    // Whatever the cutoff, no active call is deleted.
    let far = instant(1_000_000_000);
    assert_eq!(store.purge_ended(far).await.unwrap(), kept.len() as u64);
    for call in &active {
        assert_eq!(&stored(&*store, call.call_id).await, call, "an active call is never purged");
    }

    // The key went with its call: a request repeating it makes a new call.
    assert_eq!(store.get_by_idempotency_key("retention-key").await.unwrap(), None);
    let again = Call::new(
        CallId::new(),
        CallSpec { idempotency_key: Some("retention-key".into()), ..new_call("+15550000004") },
        instant(200_000),
    );
    store.insert(&again).await.expect("a purged call's idempotency key is free");
    assert_eq!(store.get_by_idempotency_key("retention-key").await.unwrap(), Some(again));

    // The history went with its call: the same id stored afresh reads back with its own
    // history only (a leftover row would collide with it, or show up in it).
    let mut reborn = Call::new(old[2].call_id, new_call("+15550000003"), instant(300_000));
    reborn.apply(&step(Step::Dialing, "originate", 300_001)).unwrap();
    store.insert(&reborn).await.expect("nothing of the purged call is left under its id");
    assert_eq!(stored(&*store, reborn.call_id).await, reborn);
}

/// A purge goes in batches of at most the limit, oldest end first, and `purge_ended` goes on
/// until every due call is gone.
pub async fn purge_goes_in_batches_oldest_first(store: Arc<dyn CallStore>) {
    const N: usize = 2_345;
    // Each call ends 10 ms after the previous; all before the cutoff.
    let due: Vec<Call> = (0..N).map(|i| ended_call("+15550000001", 0, 1_000 + 10 * i as i64)).collect();
    let later: Vec<Call> = (0..10).map(|i| ended_call("+15550000002", 0, 10_000_000 + i)).collect();
    let active: Vec<Call> = (0..10).map(|i| Call::new(CallId::new(), new_call("+15550000003"), instant(i))).collect();
    for calls in [&due, &later, &active] {
        insert_all(&*store, calls).await;
    }
    let cutoff = instant(1_000_000);
    assert_eq!(store.purge_ended_batch(cutoff, PURGE_BATCH).await.unwrap(), PURGE_BATCH);
    assert_eq!(store.get(due[PURGE_BATCH - 1].call_id).await.unwrap(), None, "the oldest ends go first");
    assert!(store.get(due[PURGE_BATCH].call_id).await.unwrap().is_some(), "one batch, no more");
    assert_eq!(store.purge_ended_batch(cutoff, PURGE_BATCH).await.unwrap(), PURGE_BATCH);
    assert_eq!(store.purge_ended_batch(cutoff, PURGE_BATCH).await.unwrap(), N - 2 * PURGE_BATCH, "the rest");
    assert_eq!(store.purge_ended_batch(cutoff, PURGE_BATCH).await.unwrap(), 0);
    assert_eq!(store.purge_ended_batch(instant(i64::from(i32::MAX)), 3).await.unwrap(), 3, "the limit holds");

    // purge_ended runs batches until a short one: 1,500 calls take two.
    let more: Vec<Call> = (0..1_500).map(|i| ended_call("+15550000004", 0, 2_000 + i)).collect();
    insert_all(&*store, &more).await;
    assert_eq!(store.purge_ended(cutoff).await.unwrap(), 1_500);
    let mut left = every_id(&*store).await;
    left.sort();
    let mut expected: Vec<CallId> = later[3..].iter().chain(&active).map(|c| c.call_id).collect();
    expected.sort();
    assert_eq!(left, expected, "what is left: calls ended after the cutoff, and the active ones");
}
