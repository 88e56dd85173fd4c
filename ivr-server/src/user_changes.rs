//! Hearing the users table's changes (PostgreSQL `LISTEN`), so that a user found enabled is
//! trusted until the table says they changed rather than asked about every
//! `USER_CACHE_SECONDS`: the user check then costs the database nothing while the users stay
//! as they are, however many requests come in.
//!
//! [`follow`] keeps one `LISTEN` connection on [`CHANGES_CHANNEL`] open and tells the user
//! cache what it hears (`cache::UserCache`): a username forgets that user, `*` all of them.
//! Every [`HEARTBEAT`] it announces an empty change through the pool, so a connection that
//! stops hearing (dead without a word, or behind a pooler that drops notifications) is
//! noticed: the cache trusts it only while it heard from the database within
//! [`HEARD_WITHIN`], and this task opens another once it has heard nothing for that long. In
//! the meantime the users are trusted for `USER_CACHE_SECONDS` again, as on SQLite.
//!
//! The database delivers notifications in the order their transactions committed, so a
//! heartbeat heard means every change committed before it was heard too.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::cache::HEARD_WITHIN;
use crate::users::{UserStore, CHANGES_CHANNEL};
use crate::AppState;

/// How often each process announces the empty change it listens for.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// The pause before a lost connection is opened again; it doubles, up to [`RETRY_MAX`], while
/// none hears anything: behind a pooler that drops notifications every connection goes silent,
/// and the log need not say so every few seconds.
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest opening the connection and starting to listen may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Hears the users table's changes for `state`'s user cache, over a connection to `url`,
/// until `shutdown` completes. Returns at once where changes are not announced (SQLite,
/// DISABLE_DB).
pub async fn follow(state: AppState, url: String, shutdown: impl Future<Output = ()>) {
    let Some(users) = state.users().filter(|u| u.announces_changes()).cloned() else { return };
    tokio::select! {
        () = shutdown => {}
        ((), ()) = async { tokio::join!(heartbeats(users), hear(&state, &url)) } => {}
    }
}

/// One connection after another.
async fn hear(state: &AppState, url: &str) {
    let mut pause = RETRY;
    loop {
        let (heard, lost) = listen(state, url).await;
        state.enabled_users().deaf();
        state.guard_metrics().user_changes_heard.set(0);
        if heard {
            pause = RETRY;
        }
        tracing::warn!(
            error = %lost,
            retry_in = ?pause,
            "not hearing the users table's changes; users are asked about every USER_CACHE_SECONDS until it is back"
        );
        tokio::time::sleep(pause).await;
        if !heard {
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

/// One connection's life: what it heard, until it stopped hearing. Returns whether it heard
/// anything, and why it stopped.
async fn listen(state: &AppState, url: &str) -> (bool, String) {
    let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    })
    .await;
    let mut listener = match opened {
        Ok(Ok(listener)) => listener,
        // sqlx's errors do not carry the URL (nor its password).
        Ok(Err(e)) => return (false, format!("could not LISTEN: {e}")),
        Err(_) => return (false, format!("could not LISTEN within {CONNECT_TIMEOUT:?}")),
    };
    let cache = state.enabled_users();
    let connection = cache.listening();
    tracing::info!(connection, "listening for the users table's changes");
    let mut heard = false;
    loop {
        // A timed-out `try_recv` may have read half a message: the connection is dropped then,
        // never read from again.
        match tokio::time::timeout(HEARD_WITHIN, listener.try_recv()).await {
            Ok(Ok(Some(notification))) => {
                heard = true;
                state.guard_metrics().user_changes_heard.set(1);
                cache.heard(connection);
                match notification.payload() {
                    "" => {}
                    "*" => cache.changed(None),
                    username => cache.changed(Some(username)),
                }
            }
            Ok(Ok(None)) => return (heard, "the connection was lost".into()),
            Ok(Err(e)) => return (heard, format!("LISTEN failed: {e}")),
            Err(_) => return (heard, format!("nothing heard for {HEARD_WITHIN:?}")),
        }
    }
}

/// Announces the empty change every [`HEARTBEAT`], whatever the listener's state.
async fn heartbeats(users: UserStore) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = users.heartbeat().await {
            tracing::debug!(error = %e, "could not announce the users' heartbeat");
        }
    }
}
