//! The status path's caches, each bounded and each with the promise it keeps (SECURITY.md and
//! ARCHITECTURE.md state them too).
//!
//! - [`AnswerCache`]: the serialized answer of an *ended* call, by call id, at most
//!   `STATUS_CACHE_BYTES` of bodies (oldest in, first out), each for at most
//!   [`ANSWER_MAX_AGE`]. A terminal call never changes (`Call::apply`), so the answer stays
//!   right for as long as it is kept, with any number of instances over one database. The one
//!   thing that can still happen to it is its deletion (retention, `ivr-server purge`, from any
//!   process): the age bound is how long a deleted call's answer may still be served here.
//! - [`LiveAnswers`]: the serialized answer of a call this process follows, with the version of
//!   the call it was made from (`Call::version`). It is served only while the manager's live
//!   table holds that same version (`CallManager::live_version`), so it is exactly what reading
//!   the call would give, never older. At most a fixed number of entries (twice
//!   MAX_ACTIVE_CALLS); an ended call's entry goes when it is next read, or when the map is full.
//! - [`UserCache`]: "this user exists and is enabled", remembered for `USER_CACHE_SECONDS`
//!   (default 1 s), and asked again in the background by one request past half the bound. Only
//!   a yes is remembered, counted from when its query started, so disabling or deleting a user
//!   locks their tokens out within that bound, and a re-enabled user is let in at once. On
//!   PostgreSQL, a yes found while a `LISTEN` connection hears the table's changes
//!   (`user_changes.rs`) is kept until a change to that user is heard, or until the connection
//!   has not heard from the database for [`HEARD_WITHIN`], and then for the bound only.
//! - [`TokenCache`]: a token whose signature and claims were verified, with its subject,
//!   remembered until its `exp` (at most [`TOKEN_CACHE_ENTRIES`] tokens). The verification's
//!   outcome cannot change before `exp`: the key, the algorithm, issuer and audience are fixed
//!   for the process, and `nbf`/`iat` only ever become more valid with time.
//! - [`LastToken`]: per connection, the `Authorization` value its last at-once request was let
//!   in with, and until when (its token's `exp`), as the token cache had it. A client sends the
//!   same header on every request of a connection, so comparing bytes replaces parsing the
//!   header and hashing the token into the shared cache; the promise is the token cache's.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// foldhash rather than SipHash: every key is a call id or token this process made or verified
// (so no one can choose colliding keys), and SipHash was a tenth of a cached GET's own work.
use foldhash::HashMap;
use hyper::body::Bytes;
use ivr_core::CallId;
use tokio::time::Instant;

/// The longest an ended call's answer is served from the cache: a call deleted from the store
/// (retention, `ivr-server purge`) answers 404 here at most this long after.
pub const ANSWER_MAX_AGE: Duration = Duration::from_secs(300);
/// Default bound of the ended calls' answers kept, in bytes of bodies.
pub const DEFAULT_STATUS_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Default staleness of the "user still enabled" check.
pub const DEFAULT_USER_CACHE: Duration = Duration::from_secs(1);
/// The most verified tokens remembered, and the most users.
pub const TOKEN_CACHE_ENTRIES: usize = 10_000;
/// How long a `LISTEN` connection counts as hearing the users table's changes after it last
/// heard from the database (`user_changes.rs` has it announce a heartbeat more often): a
/// connection that died without a word stops being trusted within this bound.
pub const HEARD_WITHIN: Duration = Duration::from_secs(5);

/// The caches' bounds (settings `STATUS_CACHE_BYTES`, `USER_CACHE_SECONDS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Bytes of ended calls' answers kept; 0 turns the cache off.
    pub status_bytes: usize,
    /// How long a user found enabled is taken as still enabled; zero asks every time.
    pub user_staleness: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits { status_bytes: DEFAULT_STATUS_CACHE_BYTES, user_staleness: DEFAULT_USER_CACHE }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below is a few map operations that cannot leave a half-made entry.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ended calls' answers (the JSON body of `GET /api/v1/calls/{id}`), bounded by bytes.
#[derive(Debug)]
pub struct AnswerCache {
    limit: usize,
    inner: Mutex<Answers>,
}

#[derive(Debug, Default)]
struct Answers {
    /// Each body with the instant it is no longer served ([`ANSWER_MAX_AGE`] after it was kept).
    bodies: HashMap<CallId, (Bytes, Instant)>,
    /// Insertion order, for eviction.
    order: VecDeque<CallId>,
    bytes: usize,
}

impl AnswerCache {
    pub fn new(limit: usize) -> Self {
        AnswerCache { limit, inner: Mutex::new(Answers::default()) }
    }

    /// The answer kept for `call_id`, unless it is [`ANSWER_MAX_AGE`] old at `now`.
    pub fn get(&self, call_id: CallId, now: Instant) -> Option<Bytes> {
        if self.limit == 0 {
            return None;
        }
        let inner = lock(&self.inner);
        let (body, until) = inner.bodies.get(&call_id)?;
        // Past its age the entry is left for eviction; the caller reads the store again and
        // keeps the fresh answer in its place.
        (now < *until).then(|| body.clone())
    }

    /// Keeps the answer of an ended call. The caller vouches that the call is terminal.
    pub fn insert_ended(&self, call_id: CallId, body: Bytes) {
        if body.len() > self.limit {
            return;
        }
        let mut inner = lock(&self.inner);
        if let Some((old, _)) = inner.bodies.remove(&call_id) {
            // An aged entry being renewed: it takes a new place in the order.
            inner.bytes -= old.len();
            inner.order.retain(|id| *id != call_id);
        }
        while inner.bytes + body.len() > self.limit {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some((gone, _)) = inner.bodies.remove(&oldest) {
                inner.bytes -= gone.len();
            }
        }
        inner.bytes += body.len();
        inner.order.push_back(call_id);
        inner.bodies.insert(call_id, (body, Instant::now() + ANSWER_MAX_AGE));
    }

    /// Bytes of bodies kept now.
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        lock(&self.inner).bodies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Live calls' answers by call id, each with the version of the call it shows.
#[derive(Debug)]
pub struct LiveAnswers {
    limit: usize,
    inner: Mutex<HashMap<CallId, (usize, Bytes)>>,
}

impl LiveAnswers {
    pub fn new(limit: usize) -> Self {
        LiveAnswers { limit, inner: Mutex::new(HashMap::default()) }
    }

    /// The answer kept for `call_id` if it shows `version`.
    pub fn get(&self, call_id: CallId, version: usize) -> Option<Bytes> {
        lock(&self.inner).get(&call_id).filter(|(kept, _)| *kept == version).map(|(_, body)| body.clone())
    }

    /// Keeps the answer showing `version` of `call_id`, in place of any older one.
    pub fn insert(&self, call_id: CallId, version: usize, body: Bytes) {
        let mut inner = lock(&self.inner);
        if inner.len() >= self.limit && !inner.contains_key(&call_id) {
            // Full of calls that ended unread since: start again (each live call's answer is
            // made once more on its next read).
            inner.clear();
        }
        match inner.get(&call_id) {
            Some((kept, _)) if *kept > version => {} // a newer one is kept already
            _ => {
                inner.insert(call_id, (version, body));
            }
        }
    }

    pub fn remove(&self, call_id: CallId) {
        lock(&self.inner).remove(&call_id);
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Users found enabled, and when; and what this process hears of the users table's changes.
#[derive(Debug)]
pub struct UserCache {
    staleness: Duration,
    inner: Mutex<Users>,
}

#[derive(Debug, Default)]
struct Users {
    enabled: HashMap<String, Enabled>,
    hearing: Hearing,
}

/// The users table's changes as heard over `LISTEN` (PostgreSQL, `user_changes.rs`).
#[derive(Debug, Default)]
struct Hearing {
    /// The `LISTEN` connection now open, numbered from 1 (0: none yet).
    connection: u64,
    /// When that connection last heard from the database; `None` until its first heartbeat,
    /// and once it is lost.
    heard: Option<Instant>,
    /// Changes heard so far, on any connection.
    changes: u64,
}

impl Hearing {
    fn hearing(&self, now: Instant) -> bool {
        self.heard.is_some_and(|heard| now.duration_since(heard) < HEARD_WITHIN)
    }
}

#[derive(Debug)]
struct Enabled {
    /// When the query that found the user enabled started.
    checked: Instant,
    /// A caller was told to ask again ([`Checked::FreshAskAgain`]) since.
    asking: bool,
    /// The `LISTEN` connection that was open from before that query to its answer, with no
    /// change heard meanwhile: while it still hears, a change to this user would have been
    /// heard, so the user is still enabled.
    heard_on: Option<u64>,
}

/// When a question about a user was asked ([`UserCache::asking`]): its answer counts from then.
#[derive(Debug, Clone, Copy)]
pub struct Question {
    at: Instant,
    connection: u64,
    changes: u64,
}

/// What [`UserCache::check`] knows of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Found enabled less than half the staleness bound ago, or since the `LISTEN`
    /// connection that still hears the table's changes was opened, and no change to them heard.
    Fresh,
    /// Found enabled less than the bound ago, but more than half: this caller (and no other,
    /// until the answer is in) should ask the users table again without waiting for it. A
    /// steady stream of requests then never finds its user stale, and the table is asked
    /// once per half bound, not by every request that comes in while a lapsed entry is being
    /// asked about (with 32 connections, up to 32 queries at once, once a bound).
    FreshAskAgain,
    /// Not known to be enabled: ask before answering.
    Stale,
}

impl UserCache {
    pub fn new(staleness: Duration) -> Self {
        UserCache { staleness, inner: Mutex::new(Users::default()) }
    }

    /// Whether `username` is known to be enabled, and whether to ask again now (see
    /// [`Checked`]). The bound holds whatever the answers' order: an entry is served only
    /// until its own query's start plus the staleness bound, or while the connection it was
    /// heard on still hears.
    pub fn check(&self, username: &str) -> Checked {
        if self.staleness.is_zero() {
            return Checked::Stale;
        }
        let now = Instant::now();
        let mut users = lock(&self.inner);
        let hearing = users.hearing.hearing(now).then_some(users.hearing.connection);
        let Some(entry) = users.enabled.get_mut(username) else { return Checked::Stale };
        let age = now.duration_since(entry.checked);
        if hearing.is_some() && entry.heard_on == hearing {
            Checked::Fresh
        } else if age >= self.staleness {
            Checked::Stale
        } else if age >= self.staleness / 2 && !entry.asking {
            entry.asking = true;
            Checked::FreshAskAgain
        } else {
            Checked::Fresh
        }
    }

    /// A question about a user is being asked now: hand it to [`enabled_at`](Self::enabled_at)
    /// with the answer.
    pub fn asking(&self) -> Question {
        let users = lock(&self.inner);
        Question { at: Instant::now(), connection: users.hearing.connection, changes: users.hearing.changes }
    }

    /// `username` was found enabled by `question`.
    pub fn enabled_at(&self, username: &str, question: Question) {
        if self.staleness.is_zero() {
            return;
        }
        let mut users = lock(&self.inner);
        let h = &users.hearing;
        // Heard-fresh only if the connection was listening before the query ran and nothing
        // changed meanwhile: a change the query's snapshot missed was heard after it began.
        let heard_on = (h.heard.is_some() && question.connection == h.connection && question.changes == h.changes)
            .then_some(h.connection);
        if users.enabled.len() >= TOKEN_CACHE_ENTRIES && !users.enabled.contains_key(username) {
            let now = Instant::now();
            users.enabled.retain(|_, e| now.duration_since(e.checked) < self.staleness);
            if users.enabled.len() >= TOKEN_CACHE_ENTRIES {
                return;
            }
        }
        users.enabled.insert(username.to_owned(), Enabled { checked: question.at, asking: false, heard_on });
    }

    /// `username` was found disabled or gone: not fresh from now on.
    pub fn forget(&self, username: &str) {
        lock(&self.inner).enabled.remove(username);
    }

    /// A `LISTEN` connection for the table's changes is open (not yet heard from); its number.
    /// What was heard on earlier ones no longer counts.
    pub fn listening(&self) -> u64 {
        let mut users = lock(&self.inner);
        users.hearing.connection += 1;
        users.hearing.heard = None;
        users.hearing.connection
    }

    /// `connection` heard from the database (its heartbeat, or any change): it still hears.
    pub fn heard(&self, connection: u64) {
        let mut users = lock(&self.inner);
        if users.hearing.connection == connection {
            users.hearing.heard = Some(Instant::now());
        }
    }

    /// `username` changed (disabled, deleted, a new password), or with `None` every user did:
    /// asked about again at their next request.
    pub fn changed(&self, username: Option<&str>) {
        let mut users = lock(&self.inner);
        users.hearing.changes += 1;
        match username {
            Some(username) => drop(users.enabled.remove(username)),
            None => users.enabled.clear(),
        }
    }

    /// The `LISTEN` connection was lost: users are trusted for the staleness bound only.
    pub fn deaf(&self) {
        lock(&self.inner).hearing.heard = None;
    }

    /// Whether a `LISTEN` connection hears the users table's changes now.
    pub fn is_hearing(&self) -> bool {
        lock(&self.inner).hearing.hearing(Instant::now())
    }
}

/// Verified tokens and their subjects, until their `exp`.
#[derive(Debug, Default)]
pub struct TokenCache {
    verified: Mutex<HashMap<Box<str>, Verified>>,
}

#[derive(Debug, Clone)]
struct Verified {
    /// Shared, so a hit costs no allocation.
    sub: Arc<str>,
    /// Seconds since the epoch.
    exp: u64,
}

impl TokenCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The subject of `token` and its `exp`, if it was verified and `now` (seconds since the
    /// epoch) is before that `exp`.
    pub fn get(&self, token: &str, now: u64) -> Option<(Arc<str>, u64)> {
        lock(&self.verified).get(token).filter(|v| now < v.exp).map(|v| (v.sub.clone(), v.exp))
    }

    /// Remembers a verified token. When full, the expired ones go; if none has, nothing is added.
    pub fn insert(&self, token: &str, sub: &str, exp: u64, now: u64) {
        if now >= exp {
            return;
        }
        let mut verified = lock(&self.verified);
        if verified.len() >= TOKEN_CACHE_ENTRIES {
            verified.retain(|_, v| now < v.exp);
            if verified.len() >= TOKEN_CACHE_ENTRIES {
                return;
            }
        }
        verified.insert(token.into(), Verified { sub: sub.into(), exp });
    }

    pub fn len(&self) -> usize {
        lock(&self.verified).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's last token let in at once, with its subject (see the module doc). Not
/// shared between connections, so it needs no lock.
#[derive(Debug, Default)]
pub struct LastToken(RefCell<Option<Known>>);

#[derive(Debug)]
struct Known {
    /// The whole `Authorization` value, as sent.
    header: Box<[u8]>,
    sub: Arc<str>,
    /// The token's `exp`, on the clock requests are timed by.
    until: Instant,
}

impl LastToken {
    /// The subject of `header` (an `Authorization` value) if it is the one remembered and
    /// `now` is before its token's `exp`.
    pub fn get(&self, header: &[u8], now: Instant) -> Option<Arc<str>> {
        let known = self.0.borrow();
        let known = known.as_ref().filter(|k| *k.header == *header && now < k.until)?;
        Some(Arc::clone(&known.sub))
    }

    /// Remembers `header`, whose token the [`TokenCache`] holds as verified for `sub` until
    /// `exp` (seconds since the epoch), in place of the one before.
    pub fn set(&self, header: &[u8], sub: Arc<str>, exp: u64, now: Instant) {
        let left = (UNIX_EPOCH + Duration::from_secs(exp)).duration_since(SystemTime::now()).unwrap_or_default();
        *self.0.borrow_mut() = Some(Known { header: header.into(), sub, until: now + left });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> CallId {
        CallId::new()
    }

    #[test]
    fn answers_stay_within_their_bytes_oldest_out_first() {
        let cache = AnswerCache::new(100);
        let ids: Vec<CallId> = (0..5).map(|_| id()).collect();
        for id in &ids {
            cache.insert_ended(*id, Bytes::from(vec![b'x'; 30]));
            assert!(cache.bytes() <= 100, "{} bytes kept", cache.bytes());
        }
        assert_eq!(cache.len(), 3);
        let now = Instant::now();
        assert!(cache.get(ids[0], now).is_none() && cache.get(ids[1], now).is_none());
        assert_eq!(cache.get(ids[4], now).unwrap().len(), 30);
        // A body larger than the whole bound is not kept, and evicts nothing.
        cache.insert_ended(id(), Bytes::from(vec![b'x'; 101]));
        assert_eq!(cache.len(), 3);
        // Off: nothing kept.
        let off = AnswerCache::new(0);
        off.insert_ended(ids[0], Bytes::from_static(b"{}"));
        assert!(off.get(ids[0], now).is_none());
    }

    #[test]
    fn a_live_answer_is_served_only_for_the_version_it_shows() {
        let live = LiveAnswers::new(2);
        let call = id();
        live.insert(call, 3, Bytes::from_static(b"ringing"));
        assert_eq!(live.get(call, 3).as_deref(), Some(&b"ringing"[..]));
        assert!(live.get(call, 4).is_none(), "the call moved on: made afresh");
        live.insert(call, 4, Bytes::from_static(b"answered"));
        live.insert(call, 3, Bytes::from_static(b"ringing"));
        assert_eq!(live.get(call, 4).as_deref(), Some(&b"answered"[..]), "never replaced by an older one");
        live.remove(call);
        assert!(live.get(call, 4).is_none());
        // Bounded: a third call into a full map starts it again.
        let (a, b, c) = (id(), id(), id());
        live.insert(a, 1, Bytes::from_static(b"a"));
        live.insert(b, 1, Bytes::from_static(b"b"));
        live.insert(c, 1, Bytes::from_static(b"c"));
        assert!(live.len() <= 2);
        assert_eq!(live.get(c, 1).as_deref(), Some(&b"c"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_answer_is_served_for_at_most_its_age() {
        let cache = AnswerCache::new(1_000);
        let call = id();
        cache.insert_ended(call, Bytes::from_static(b"{\"v\":1}"));
        tokio::time::advance(ANSWER_MAX_AGE - Duration::from_secs(1)).await;
        assert!(cache.get(call, Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get(call, Instant::now()).is_none(), "a call purged meanwhile must be read from the store");
        // Read again and kept again: served again, counted once.
        cache.insert_ended(call, Bytes::from_static(b"{\"v\":2}"));
        assert_eq!(cache.get(call, Instant::now()).as_deref(), Some(&b"{\"v\":2}"[..]));
        assert_eq!((cache.len(), cache.bytes()), (1, 7));
    }

    #[test]
    fn tokens_are_remembered_until_their_exp_and_bounded() {
        let cache = TokenCache::new();
        cache.insert("a.b.c", "alice", 1_000, 900);
        assert_eq!(cache.get("a.b.c", 999).map(|(sub, exp)| (sub.to_string(), exp)), Some(("alice".into(), 1_000)));
        assert_eq!(cache.get("a.b.c", 1_000), None, "not at or after exp");
        assert_eq!(cache.get("a.b.d", 999), None);
        for i in 0..TOKEN_CACHE_ENTRIES + 10 {
            cache.insert(&format!("t{i}"), "bob", 2_000, 900);
        }
        assert!(cache.len() <= TOKEN_CACHE_ENTRIES);
        // Once the old ones expire, new ones are let in again.
        cache.insert("late", "carol", 5_000, 3_000);
        assert_eq!(cache.get("late", 3_001).map(|(sub, _)| sub).as_deref(), Some("carol"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connections_last_token_is_its_own_until_its_exp() {
        let last = LastToken::default();
        let now = Instant::now();
        assert_eq!(last.get(b"Bearer a.b.c", now), None, "nothing remembered yet");
        let exp = crate::auth::unix_now() + 60;
        last.set(b"Bearer a.b.c", Arc::from("alice"), exp, now);
        assert_eq!(last.get(b"Bearer a.b.c", now).as_deref(), Some("alice"));
        assert_eq!(last.get(b"Bearer a.b.d", now), None, "another token is not this one");
        assert_eq!(last.get(b"Bearer a.b.", now), None, "nor a prefix of it");
        tokio::time::advance(Duration::from_secs(58)).await;
        assert_eq!(last.get(b"Bearer a.b.c", Instant::now()).as_deref(), Some("alice"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(last.get(b"Bearer a.b.c", Instant::now()), None, "not at or after exp");
        // A new token takes its place.
        last.set(b"Bearer x.y.z", Arc::from("bob"), exp + 60, Instant::now());
        assert_eq!(last.get(b"Bearer a.b.c", Instant::now()), None);
        assert_eq!(last.get(b"Bearer x.y.z", Instant::now()).as_deref(), Some("bob"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_enabled_user_is_trusted_for_the_staleness_bound_only() {
        let cache = UserCache::new(Duration::from_secs(1));
        assert_eq!(cache.check("alice"), Checked::Stale);
        cache.enabled_at("alice", cache.asking());
        assert_eq!(cache.check("alice"), Checked::Fresh);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(cache.check("alice"), Checked::FreshAskAgain, "past half the bound: ask again");
        assert_eq!(cache.check("alice"), Checked::Fresh, "one caller asks; the others are served");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(cache.check("alice"), Checked::Fresh, "no answer yet, still within the bound");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cache.check("alice"), Checked::Stale, "asked again once the bound has passed");
        let never = UserCache::new(Duration::ZERO);
        never.enabled_at("alice", never.asking());
        assert_eq!(never.check("alice"), Checked::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_counts_from_when_its_question_was_asked() {
        let cache = UserCache::new(Duration::from_secs(1));
        cache.enabled_at("alice", cache.asking());
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(cache.check("alice"), Checked::FreshAskAgain);
        let asked = cache.asking();
        tokio::time::advance(Duration::from_millis(100)).await;
        cache.enabled_at("alice", asked);
        assert_eq!(cache.check("alice"), Checked::Fresh, "the new answer is 0.1 s old");
        // Fresh until the second question's start plus the bound, not its answer's.
        tokio::time::advance(Duration::from_millis(899)).await;
        assert_ne!(cache.check("alice"), Checked::Stale);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cache.check("alice"), Checked::Stale);
        // Found disabled: stale at once, and asked about again.
        cache.enabled_at("alice", cache.asking());
        cache.forget("alice");
        assert_eq!(cache.check("alice"), Checked::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn while_a_connection_hears_the_table_a_user_is_trusted_until_it_changes() {
        let cache = UserCache::new(Duration::from_secs(1));
        let connection = cache.listening();
        // Open but not yet heard from: the bound as before.
        cache.enabled_at("alice", cache.asking());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(cache.check("alice"), Checked::Stale, "no heartbeat yet: trusted for the bound only");
        cache.heard(connection);
        assert!(cache.is_hearing());
        cache.enabled_at("alice", cache.asking());
        cache.enabled_at("bob", cache.asking());
        for _ in 0..30 {
            // Well past the bound, never asked again, while heartbeats keep coming.
            tokio::time::advance(Duration::from_secs(2)).await;
            cache.heard(connection);
            assert_eq!(cache.check("alice"), Checked::Fresh);
        }
        cache.changed(Some("alice"));
        assert_eq!(cache.check("alice"), Checked::Stale, "a change heard: asked about at once");
        assert_eq!(cache.check("bob"), Checked::Fresh, "another user's change leaves bob be");
        cache.changed(None);
        assert_eq!(cache.check("bob"), Checked::Stale, "every user changed (TRUNCATE)");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_to_a_question_asked_before_a_change_is_trusted_for_the_bound_only() {
        let cache = UserCache::new(Duration::from_secs(1));
        let connection = cache.listening();
        cache.heard(connection);
        // The query's snapshot may predate alice's disabling, whose notification came first.
        let question = cache.asking();
        cache.changed(Some("alice"));
        cache.enabled_at("alice", question);
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.heard(connection);
        assert_eq!(cache.check("alice"), Checked::Stale);
        // Asked before the connection was opened: the same.
        let early = cache.asking();
        let second = cache.listening();
        cache.heard(second);
        cache.enabled_at("bob", early);
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.heard(second);
        assert_eq!(cache.check("bob"), Checked::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stops_hearing_is_trusted_no_more() {
        let cache = UserCache::new(Duration::from_secs(1));
        let first = cache.listening();
        cache.heard(first);
        cache.enabled_at("alice", cache.asking());
        tokio::time::advance(HEARD_WITHIN - Duration::from_millis(1)).await;
        assert_eq!(cache.check("alice"), Checked::Fresh);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!cache.is_hearing());
        assert_eq!(cache.check("alice"), Checked::Stale, "silent for HEARD_WITHIN: its word counts no more");
        // Lost, and opened again: what the lost one heard does not count on the new one.
        cache.heard(first);
        cache.enabled_at("alice", cache.asking());
        cache.deaf();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(cache.check("alice"), Checked::Stale, "deaf: the bound again");
        cache.heard(first);
        cache.enabled_at("alice", cache.asking());
        let second = cache.listening();
        cache.heard(first);
        cache.heard(second);
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.heard(second);
        assert_eq!(cache.check("alice"), Checked::Stale, "found on the connection before");
        // USER_CACHE_SECONDS=0 asks every time, heard or not.
        let never = UserCache::new(Duration::ZERO);
        let connection = never.listening();
        never.heard(connection);
        never.enabled_at("alice", never.asking());
        assert_eq!(never.check("alice"), Checked::Stale);
    }
}
