//! Login throttling for `POST /api/v1/token`: failed logins are counted per client address and
//! per username, slowed, then refused with 429 and `Retry-After`.
//!
//! Each address and each username has a leaky bucket of failures: every attempt adds one when
//! it starts (so a flood of parallel guesses is counted before any answer), and one failure is
//! forgiven every `*_forgive` interval. An attempt is refused, without looking at the password,
//! while its address holds `address_failures` or its username `user_failures`; refused attempts
//! add nothing. Once either holds `slow_after`, each further attempt is answered `slowdown`
//! later. A success refunds its own charge to the address, clears the username's failures and
//! remembers the (username, address) pair for [`KNOWN_FOR`]: from a remembered pair the
//! username's limit does not apply (the address's still does), so someone guessing a user's
//! password elsewhere cannot lock the user out where they usually log in. The user limit
//! forgives faster than the address limit lets one address fail, so one attacker alone can keep
//! a username refused to new addresses only for about one `user_forgive` per failure it is
//! allowed. SECURITY.md states the design and its numbers.
//!
//! Memory is bounded: each table holds at most [`MAX_TRACKED`] keys; a full table first drops
//! keys whose failures are all forgiven, then the least recently touched key. IPv6 clients are
//! counted per /64, the block one subscriber usually holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::time::Instant;

use crate::client::address_key;

/// The most keys each table (addresses, usernames, remembered pairs) holds.
pub const MAX_TRACKED: usize = 10_000;
/// How long a successful (username, address) pair is remembered.
pub const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest username kept as a key; longer ones are cut (no real username is this long).
const MAX_KEY_LEN: usize = 128;

/// The throttle's settings (LOGIN_* in README's settings table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures an address may hold before its attempts are refused.
    pub address_failures: u32,
    /// One failure of an address is forgiven per this interval.
    pub address_forgive: Duration,
    /// Failures a username may hold before attempts on it (from addresses it never logged in
    /// from) are refused.
    pub user_failures: u32,
    /// One failure of a username is forgiven per this interval.
    pub user_forgive: Duration,
    /// Failures (of the address or the username) from which each attempt is slowed.
    pub slow_after: u32,
    /// How much later a slowed attempt is answered.
    pub slowdown: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            address_failures: 10,
            address_forgive: Duration::from_secs(60),
            user_failures: 5,
            user_forgive: Duration::from_secs(20),
            slow_after: 3,
            slowdown: Duration::from_secs(1),
        }
    }
}

/// Which limit refused or slowed an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Address,
    Username,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Username => "username",
        }
    }
}

/// An attempt refused: by which limit, and when to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub scope: Scope,
    /// Whole seconds, at least 1.
    pub retry_after: u64,
}

impl From<Refused> for crate::problem::Problem {
    fn from(refused: Refused) -> Self {
        let whose = match refused.scope {
            Scope::Address => "from this address",
            Scope::Username => "for this username",
        };
        let seconds = refused.retry_after;
        crate::problem::Problem::new(
            "too-many-login-attempts",
            format!("too many failed logins {whose}; try again in {seconds} s"),
        )
        .header(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_str(&seconds.to_string())
                .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("60")),
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    failures: f64,
    at: Instant,
}

/// Leaky buckets by key, at most [`MAX_TRACKED`] of them.
struct Table<K> {
    buckets: HashMap<K, Bucket>,
    forgive: Duration,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(forgive: Duration) -> Self {
        Table { buckets: HashMap::new(), forgive }
    }

    fn decayed(&self, bucket: &Bucket, now: Instant) -> f64 {
        let forgiven = now.saturating_duration_since(bucket.at).as_secs_f64() / self.forgive.as_secs_f64().max(1e-9);
        (bucket.failures - forgiven).max(0.0)
    }

    fn failures(&self, key: &K, now: Instant) -> f64 {
        self.buckets.get(key).map_or(0.0, |b| self.decayed(b, now))
    }

    fn add(&mut self, key: &K, delta: f64, now: Instant) {
        let failures = (self.failures(key, now) + delta).max(0.0);
        if !self.buckets.contains_key(key) {
            if failures == 0.0 {
                return;
            }
            self.make_room(now);
        }
        self.buckets.insert(key.clone(), Bucket { failures, at: now });
    }

    fn remove(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    fn make_room(&mut self, now: Instant) {
        if self.buckets.len() < MAX_TRACKED {
            return;
        }
        let forgive = self.forgive.as_secs_f64().max(1e-9);
        self.buckets.retain(|_, b| b.failures - now.saturating_duration_since(b.at).as_secs_f64() / forgive > 0.0);
        if self.buckets.len() >= MAX_TRACKED {
            if let Some(oldest) = self.buckets.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone()) {
                self.buckets.remove(&oldest);
            }
        }
    }

    /// Seconds until the key holds fewer than `limit` failures.
    fn retry_after(&self, failures: f64, limit: u32) -> u64 {
        let excess = failures - f64::from(limit) + 1.0;
        ((excess * self.forgive.as_secs_f64()).ceil() as u64).max(1)
    }
}

fn user_key(username: &str) -> String {
    let mut end = username.len().min(MAX_KEY_LEN);
    while !username.is_char_boundary(end) {
        end -= 1;
    }
    username[..end].to_owned()
}

struct State {
    addresses: Table<IpAddr>,
    users: Table<String>,
    /// (username, address) pairs that logged in, and when.
    known: HashMap<(String, IpAddr), Instant>,
}

/// The login throttle. Shared by all requests (behind the [`AppState`](crate::AppState)).
pub struct LoginThrottle {
    limits: LoginLimits,
    state: Mutex<State>,
    /// `ivr_login_throttled_total{action, scope}`.
    counter: IntCounterVec,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// An attempt allowed to check its password. Its charge stays unless [`Attempt::succeeded`]
/// or [`Attempt::refund`] is called: a client that hangs up mid-attempt has still failed.
#[must_use]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    user: String,
    address: IpAddr,
    /// How long to wait before checking the password, when the attempt is slowed.
    pub delay: Option<Duration>,
}

impl LoginThrottle {
    /// A throttle counting into `counter` (labels `action` = slowed|refused, `scope`).
    pub fn new(limits: LoginLimits, counter: IntCounterVec) -> Self {
        let state = State {
            addresses: Table::new(limits.address_forgive),
            users: Table::new(limits.user_forgive),
            known: HashMap::new(),
        };
        LoginThrottle { limits, state: Mutex::new(state), counter }
    }

    pub fn limits(&self) -> &LoginLimits {
        &self.limits
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a cache of counts: one poisoned by a panic is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts an attempt of `username` from `client`, or refuses it.
    pub fn begin(&self, username: &str, client: IpAddr) -> Result<Attempt<'_>, Refused> {
        let now = Instant::now();
        let user = user_key(username);
        let address = address_key(client);
        let mut state = self.state();
        let by_address = state.addresses.failures(&address, now);
        if by_address + 1.0 > f64::from(self.limits.address_failures) {
            return Err(
                self.refuse(Scope::Address, state.addresses.retry_after(by_address, self.limits.address_failures))
            );
        }
        let known =
            state.known.get(&(user.clone(), address)).is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_FOR);
        let by_user = state.users.failures(&user, now);
        if !known && by_user + 1.0 > f64::from(self.limits.user_failures) {
            return Err(self.refuse(Scope::Username, state.users.retry_after(by_user, self.limits.user_failures)));
        }
        state.addresses.add(&address, 1.0, now);
        state.users.add(&user, 1.0, now);
        drop(state);
        let slow = f64::from(self.limits.slow_after);
        let slowed_by = if by_address >= slow {
            Some(Scope::Address)
        } else if by_user >= slow && !known {
            Some(Scope::Username)
        } else {
            None
        };
        let delay = slowed_by.filter(|_| !self.limits.slowdown.is_zero()).map(|scope| {
            self.counter.with_label_values(&["slowed", scope.label()]).inc();
            self.limits.slowdown
        });
        Ok(Attempt { throttle: self, user, address, delay })
    }

    fn refuse(&self, scope: Scope, retry_after: u64) -> Refused {
        self.counter.with_label_values(&["refused", scope.label()]).inc();
        Refused { scope, retry_after }
    }
}

impl Attempt<'_> {
    /// Waits out the slowdown, if any.
    pub async fn wait(&self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
    }

    /// The password was right: the attempt costs the address nothing, the username's failures
    /// are cleared, and the pair is remembered.
    pub fn succeeded(self) {
        let now = Instant::now();
        let mut state = self.throttle.state();
        state.addresses.add(&self.address, -1.0, now);
        state.users.remove(&self.user);
        let key = (self.user, self.address);
        if !state.known.contains_key(&key) && state.known.len() >= MAX_TRACKED {
            state.known.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
            if state.known.len() >= MAX_TRACKED {
                if let Some(oldest) = state.known.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                    state.known.remove(&oldest);
                }
            }
        }
        state.known.insert(key, now);
    }

    /// The password could not be checked (the store failed): the attempt costs nothing.
    pub fn refund(self) {
        let now = Instant::now();
        let mut state = self.throttle.state();
        state.addresses.add(&self.address, -1.0, now);
        state.users.add(&self.user, -1.0, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn throttle(limits: LoginLimits) -> LoginThrottle {
        let counter = IntCounterVec::new(Opts::new("t", "t"), &["action", "scope"]).unwrap();
        LoginThrottle::new(limits, counter)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(t: &LoginThrottle, user: &str, from: &str) -> Result<Option<Duration>, Refused> {
        t.begin(user, ip(from)).map(|a| a.delay)
    }

    fn count(t: &LoginThrottle, action: &str, scope: &str) -> u64 {
        t.counter.with_label_values(&[action, scope]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn guessing_one_password_is_slowed_then_refused_then_forgiven() {
        let t = throttle(LoginLimits::default());
        for i in 0..5 {
            let delay = fail(&t, "alice", "198.51.100.1").expect("allowed");
            assert_eq!(delay, (i >= 3).then_some(Duration::from_secs(1)), "attempt {i}");
        }
        let refused = fail(&t, "alice", "198.51.100.1").unwrap_err();
        assert_eq!(refused, Refused { scope: Scope::Username, retry_after: 20 });
        // Attempts 4 and 5 were slowed (the address reached the threshold first).
        assert_eq!(count(&t, "slowed", "address"), 2);
        assert_eq!(count(&t, "refused", "username"), 1);
        // A refused attempt adds nothing: one forgiveness interval later, one more try.
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(fail(&t, "alice", "198.51.100.1").is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(fail(&t, "alice", "198.51.100.1").is_ok());
        assert!(fail(&t, "alice", "198.51.100.1").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn spraying_many_users_from_one_address_is_refused() {
        let t = throttle(LoginLimits::default());
        for i in 0..10 {
            assert!(fail(&t, &format!("user{i}"), "203.0.113.5").is_ok(), "attempt {i}");
        }
        let refused = fail(&t, "user99", "203.0.113.5").unwrap_err();
        assert_eq!(refused, Refused { scope: Scope::Address, retry_after: 60 });
        // Another address is not affected.
        assert_eq!(fail(&t, "user99", "203.0.113.6"), Ok(None));
        // The same /64 is the same client.
        assert!(fail(&t, "x", "2001:db8::1").is_ok());
        let t6 = throttle(LoginLimits { address_failures: 1, ..LoginLimits::default() });
        assert!(fail(&t6, "a", "2001:db8::1").is_ok());
        assert_eq!(fail(&t6, "b", "2001:db8::ffff").unwrap_err().scope, Scope::Address);
        assert!(fail(&t6, "c", "2001:db8:0:1::1").is_ok());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(fail(&t, "user99", "203.0.113.5").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_attacker_cannot_lock_a_user_out_where_they_log_in() {
        let t = throttle(LoginLimits::default());
        // Alice logged in from her address once.
        t.begin("alice", ip("192.0.2.10")).unwrap().succeeded();
        // Someone elsewhere exhausts alice's username limit.
        while fail(&t, "alice", "198.51.100.66").is_ok() {}
        assert_eq!(fail(&t, "alice", "198.51.100.77").unwrap_err().scope, Scope::Username);
        // Alice, from her own address, is neither refused nor slowed.
        let attempt = t.begin("alice", ip("192.0.2.10")).expect("alice is not locked out");
        assert_eq!(attempt.delay, None);
        attempt.succeeded();
        // Her success cleared the username's failures for everyone.
        assert!(fail(&t, "alice", "198.51.100.77").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_refunds_its_address_and_a_refund_costs_nothing() {
        let t = throttle(LoginLimits { address_failures: 2, ..LoginLimits::default() });
        for _ in 0..20 {
            t.begin("bob", ip("192.0.2.1")).unwrap().succeeded();
            t.begin("carol", ip("192.0.2.1")).unwrap().refund();
        }
        assert!(fail(&t, "bob", "192.0.2.1").is_ok());
        assert!(fail(&t, "bob", "192.0.2.1").is_ok());
        assert!(fail(&t, "bob", "192.0.2.1").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_tables_stay_bounded() {
        let t = throttle(LoginLimits::default());
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let addr = IpAddr::V4((0x0a00_0000 + i).into());
            let _ = t.begin(&format!("user{i}"), addr);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let state = t.state();
        assert_eq!(state.addresses.buckets.len(), MAX_TRACKED);
        assert_eq!(state.users.buckets.len(), MAX_TRACKED);
        // The oldest were evicted, the newest kept.
        assert!(!state.users.buckets.contains_key("user0"));
        assert!(state.users.buckets.contains_key(&format!("user{}", MAX_TRACKED as u32 + 499)));
    }
}
