//! Pacing and admission: the calls-per-second bucket and the queue of calls waiting for it.
//!
//! Trunks limit calls per second, so originates are sent no faster than
//! [`ManagerSettings::max_calls_per_second`](super::ManagerSettings::max_calls_per_second): a
//! bucket of one token refilled every `1/cps` seconds, so dials are evenly spread and never
//! burst past the rate. A call that finds no token waits in the queue (stored `pending`,
//! never sent), in the order it was accepted; past `max_queued_calls` a new call is refused.
//! The queue holds only ids: the call itself is in the live table and the store.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::CallManager;
use crate::call::CallId;

pub(crate) struct Pacer {
    /// Time between two dials; `None` for no limit.
    interval: Option<Duration>,
    max_queued: usize,
    state: Mutex<State>,
    /// Wakes the dispatcher when a call is queued.
    queued: Notify,
}

struct State {
    queue: VecDeque<CallId>,
    /// Places promised to calls being stored, not queued yet (see [`Pacer::reserve`]).
    reserved: usize,
    /// When the next token is there.
    next_slot: Instant,
}

/// A place in the queue held while a new call is stored; it counts against the bound.
pub(crate) struct Reservation<'a> {
    pacer: &'a Pacer,
    used: bool,
}

/// Why a call could not be admitted: the queue is full.
#[derive(Debug)]
pub(crate) struct Full {
    pub limit: usize,
    pub retry_after: Duration,
}

impl Pacer {
    pub fn new(calls_per_second: u32, max_queued: usize) -> Self {
        let interval = (calls_per_second > 0).then(|| Duration::from_secs(1) / calls_per_second);
        Pacer {
            interval,
            max_queued,
            state: Mutex::new(State { queue: VecDeque::new(), reserved: 0, next_slot: Instant::now() }),
            queued: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each critical section is a few queue operations; a panic cannot leave one half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.state().queue.len()
    }

    /// Holds a place for a call about to be stored, or says the queue is full.
    pub fn reserve(&self) -> Result<Reservation<'_>, Full> {
        let mut state = self.state();
        // Without a rate limit nothing waits, so there is nothing to bound.
        if self.interval.is_some() && state.queue.len() + state.reserved >= self.max_queued {
            let waiting = (state.queue.len() + state.reserved) as u32;
            let retry_after = match self.interval {
                Some(interval) => (interval * waiting).max(Duration::from_secs(1)),
                None => Duration::from_secs(1),
            };
            return Err(Full { limit: self.max_queued, retry_after });
        }
        state.reserved += 1;
        Ok(Reservation { pacer: self, used: false })
    }

    /// Takes a token now if one is there and nobody is waiting before us.
    fn try_now(state: &mut State, interval: Option<Duration>) -> bool {
        let Some(interval) = interval else { return state.queue.is_empty() };
        let now = Instant::now();
        if !state.queue.is_empty() || state.next_slot > now {
            return false;
        }
        state.next_slot = now + interval;
        true
    }

    /// Queues a call that was accepted before (a retry, or one resumed after a restart); the
    /// bound is for new calls only, so these are never refused.
    pub fn requeue(&self, call_id: CallId) {
        self.state().queue.push_back(call_id);
        self.queued.notify_one();
    }

    /// Takes a call out of the queue (it was canceled). True if it was there.
    pub fn remove(&self, call_id: CallId) -> bool {
        let mut state = self.state();
        let before = state.queue.len();
        state.queue.retain(|id| *id != call_id);
        state.queue.len() != before
    }

    /// The next call to dial, in queue order, once its token is there.
    pub async fn next(&self) -> CallId {
        loop {
            let wait = {
                let mut state = self.state();
                match self.interval {
                    _ if state.queue.is_empty() => None,
                    None => return state.queue.pop_front().expect("not empty"),
                    Some(interval) => {
                        let now = Instant::now();
                        if state.next_slot <= now {
                            state.next_slot = now + interval;
                            return state.queue.pop_front().expect("not empty");
                        }
                        Some(state.next_slot)
                    }
                }
            };
            match wait {
                Some(at) => tokio::time::sleep_until(at).await,
                None => self.queued.notified().await,
            }
        }
    }
}

impl Reservation<'_> {
    /// Admits the stored call: `true` if it may be dialled at once (a token was there and
    /// nobody waits), else it is queued and `false`.
    pub fn admit(mut self, call_id: CallId) -> bool {
        self.used = true;
        let pacer = self.pacer;
        let mut state = pacer.state();
        state.reserved -= 1;
        if Pacer::try_now(&mut state, pacer.interval) {
            return true;
        }
        state.queue.push_back(call_id);
        drop(state);
        pacer.queued.notify_one();
        false
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.pacer.state().reserved -= 1;
        }
    }
}

/// The queue's consumer: dials each queued call when its token comes, in order. Runs until
/// aborted with the event loop.
pub(crate) async fn dispatch(manager: CallManager) {
    let shared = &manager.shared;
    loop {
        let call_id = shared.pacer.next().await;
        shared.metrics.queued_calls.set(shared.pacer.queued() as i64);
        // Canceled or ended meanwhile: it is no longer followed, or no longer queued.
        let due = shared
            .calls
            .with(call_id, |c| Some(c.current()).filter(|call| call.is_queued() && !c.tracker.is_canceled()));
        if let Some(Some(call)) = due {
            let manager = manager.clone();
            tokio::spawn(async move { manager.place(call, None).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 50 calls at 10 per second on the paused clock: dialled over 4.9 s, one every 100 ms, in
    /// the order they were accepted.
    #[tokio::test(start_paused = true)]
    async fn fifty_calls_at_ten_per_second_are_spread_over_five_seconds_in_order() {
        let pacer = Pacer::new(10, 1000);
        let start = Instant::now();
        let ids: Vec<CallId> = (0..50).map(|_| CallId::new()).collect();
        let mut dialled_at_once = Vec::new();
        for id in &ids {
            if pacer.reserve().expect("room").admit(*id) {
                dialled_at_once.push(*id);
            }
        }
        assert_eq!(dialled_at_once, ids[..1], "one token at first, the rest wait");
        assert_eq!(pacer.queued(), 49);
        let mut order = dialled_at_once;
        let mut times = vec![Duration::ZERO];
        for _ in 1..50 {
            let id = tokio::time::timeout(Duration::from_secs(10), pacer.next()).await.expect("a call is due");
            order.push(id);
            times.push(start.elapsed());
        }
        assert_eq!(order, ids, "in order");
        assert_eq!(times.last().copied(), Some(Duration::from_millis(4900)));
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(100), "never faster than the rate: {times:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_refuses_with_the_time_to_drain() {
        let pacer = Pacer::new(10, 3);
        for _ in 0..4 {
            pacer.reserve().unwrap().admit(CallId::new());
        }
        assert_eq!(pacer.queued(), 3, "the first went at once");
        let full = pacer.reserve().err().expect("full");
        assert_eq!((full.limit, full.retry_after), (3, Duration::from_secs(1)));
        // A dropped reservation gives its place back.
        let id = CallId::new();
        assert!(pacer.remove(pacer.queue_front()));
        drop(pacer.reserve().unwrap());
        assert!(!pacer.reserve().unwrap().admit(id));
        assert!(pacer.reserve().is_err());
        // Retries and resumed calls are never refused.
        pacer.requeue(CallId::new());
        assert_eq!(pacer.queued(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_dials_at_once() {
        let pacer = Pacer::new(0, 10);
        for _ in 0..100 {
            assert!(pacer.reserve().unwrap().admit(CallId::new()));
        }
        assert_eq!(pacer.queued(), 0);
    }

    impl Pacer {
        fn queue_front(&self) -> CallId {
            *self.state().queue.front().unwrap()
        }
    }
}
