//! API users: a table in the same database as the calls, passwords as bcrypt hashes.
//!
//! The table comes from ivr-server's own migrations (versions from 1000 on), kept in the same
//! `_sqlx_migrations` table as ivr-core's: each migrator ignores the other's versions.
//!
//! On PostgreSQL a trigger announces every change to a user (`NOTIFY` on [`CHANGES_CHANNEL`],
//! payload the username, `*` for all of them) so that `user_changes.rs` can tell the user
//! cache at once; [`UserStore::heartbeat`] announces an empty payload, by which a listener
//! knows it still hears.
//!
//! [`UserStore::check_password`] takes about as long for an unknown user as for a wrong
//! password: it verifies against a fixed dummy hash of the same cost, so the answer's timing
//! does not tell which usernames exist.

use std::time::Duration;

use ivr_core::store::{EmbeddedMigrations, SqlCallStore};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Executor as _, Row};

/// ivr-server's migrations: version, description, SQL. Versions start at 1000 so they never
/// collide with ivr-core's.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1000,
    "users",
    "CREATE TABLE ivr_users (
        username      TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        disabled      BIGINT NOT NULL DEFAULT 0,
        created_at    BIGINT NOT NULL,
        updated_at    BIGINT NOT NULL
    )",
)];

/// The channel the users table's changes are announced on (PostgreSQL).
pub const CHANGES_CHANNEL: &str = "ivr_users";

/// The SQL that installs the trigger announcing changes to users on [`CHANGES_CHANNEL`]
/// (PostgreSQL), idempotently; in one transaction under a lock, so that processes starting
/// together do not race to create it. Not a migration: the migrations are SQL both engines run,
/// and this is PostgreSQL's alone.
fn install_notify() -> String {
    format!(
        "BEGIN; SELECT pg_advisory_xact_lock(hashtext('ivr_user_changed')); \
         CREATE OR REPLACE FUNCTION ivr_user_changed() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN \
           IF TG_OP = 'TRUNCATE' THEN PERFORM pg_notify('{CHANGES_CHANNEL}', '*'); \
           ELSE PERFORM pg_notify('{CHANGES_CHANNEL}', OLD.username); END IF; RETURN NULL; END $body$; \
         DO $do$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'ivr_user_changed' \
                          AND tgrelid = 'ivr_users'::regclass) THEN \
             CREATE TRIGGER ivr_user_changed AFTER UPDATE OR DELETE ON ivr_users \
             FOR EACH ROW EXECUTE FUNCTION ivr_user_changed(); END IF; \
           IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'ivr_users_truncated' \
                          AND tgrelid = 'ivr_users'::regclass) THEN \
             CREATE TRIGGER ivr_users_truncated AFTER TRUNCATE ON ivr_users \
             FOR EACH STATEMENT EXECUTE FUNCTION ivr_user_changed(); END IF; \
         END $do$; COMMIT;"
    )
}

/// Longest a user query may take before the store counts as unavailable.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A user as listed (never with its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub disabled: bool,
    pub created_at: time::OffsetDateTime,
}

/// What can go wrong with users.
#[derive(Debug)]
pub enum UserError {
    /// The database could not be reached or failed.
    Unavailable(String),
    /// `user add` of a name that exists.
    Exists(String),
    /// No such user.
    NotFound(String),
    /// A name or password that is not accepted.
    Invalid(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::Unavailable(e) => write!(f, "user store unavailable: {e}"),
            UserError::Exists(name) => write!(f, "user {name:?} already exists"),
            UserError::NotFound(name) => write!(f, "no user {name:?}"),
            UserError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for UserError {}

fn unavailable(e: impl std::fmt::Display) -> UserError {
    UserError::Unavailable(e.to_string())
}

/// Users in the calls database.
#[derive(Clone)]
pub struct UserStore {
    pool: AnyPool,
    /// PostgreSQL, whose changes to users are announced; else SQLite.
    postgres: bool,
    cost: u32,
    /// A hash of a random password at `cost`, checked when the user does not exist.
    dummy_hash: String,
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore").field("cost", &self.cost).finish_non_exhaustive()
    }
}

impl UserStore {
    /// Users in `store`'s database, hashing new passwords at bcrypt `cost`.
    pub fn new(store: &SqlCallStore, cost: u32) -> Result<Self, UserError> {
        let random = uuid::Uuid::new_v4().to_string();
        let dummy_hash = bcrypt::hash(random, cost).map_err(|e| UserError::Invalid(format!("bcrypt: {e}")))?;
        Ok(UserStore { pool: store.pool().clone(), postgres: store.is_postgres(), cost, dummy_hash })
    }

    /// Creates the users table if it is not there yet, and on PostgreSQL the trigger that
    /// announces changes to users.
    pub async fn migrate(&self) -> Result<(), UserError> {
        EmbeddedMigrations(MIGRATIONS).run(&self.pool).await.map_err(unavailable)?;
        if self.postgres {
            timed(self.pool.execute(install_notify().as_str())).await?;
        }
        Ok(())
    }

    /// Whether changes to users are announced (PostgreSQL), for `user_changes.rs` to hear.
    pub fn announces_changes(&self) -> bool {
        self.postgres
    }

    /// Announces an empty change on [`CHANGES_CHANNEL`], by which every listener knows it still
    /// hears the database.
    pub async fn heartbeat(&self) -> Result<(), UserError> {
        timed(sqlx::query("SELECT pg_notify($1, '')").bind(CHANGES_CHANNEL).execute(&self.pool)).await.map(drop)
    }

    pub async fn add(&self, username: &str, password: &str) -> Result<(), UserError> {
        check_username(username)?;
        check_password(password)?;
        let hash = self.hash(password).await?;
        let now = micros_now();
        let result = timed(
            sqlx::query(
                "INSERT INTO ivr_users (username, password_hash, disabled, created_at, updated_at) \
                 VALUES ($1, $2, 0, $3, $3)",
            )
            .bind(username.to_owned())
            .bind(hash)
            .bind(now)
            .execute(&self.pool),
        )
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(UserError::Unavailable(e)) if is_unique_violation(&e) => Err(UserError::Exists(username.into())),
            Err(e) => Err(e),
        }
    }

    pub async fn list(&self) -> Result<Vec<User>, UserError> {
        let rows = timed(
            sqlx::query("SELECT username, disabled, created_at FROM ivr_users ORDER BY username").fetch_all(&self.pool),
        )
        .await?;
        rows.iter().map(decode_user).collect()
    }

    pub async fn set_disabled(&self, username: &str, disabled: bool) -> Result<(), UserError> {
        self.update(username, "disabled = $1", i64::from(disabled)).await
    }

    pub async fn set_password(&self, username: &str, password: &str) -> Result<(), UserError> {
        check_password(password)?;
        let hash = self.hash(password).await?;
        self.update(username, "password_hash = $1", hash).await
    }

    /// Sets one column (`assignment`, bound to `value` as `$1`) of an existing user.
    async fn update<T>(&self, username: &str, assignment: &str, value: T) -> Result<(), UserError>
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Send,
    {
        let sql = format!("UPDATE ivr_users SET {assignment}, updated_at = $2 WHERE username = $3");
        let done =
            timed(sqlx::query(&sql).bind(value).bind(micros_now()).bind(username.to_owned()).execute(&self.pool))
                .await?;
        if done.rows_affected() == 0 {
            return Err(UserError::NotFound(username.into()));
        }
        Ok(())
    }

    /// Whether `username` exists and is enabled. Authenticated requests ask it at least every
    /// `USER_CACHE_SECONDS` (`cache::UserCache`), so a disabled user's tokens stop working
    /// within that bound.
    pub async fn is_enabled(&self, username: &str) -> Result<bool, UserError> {
        let row = timed(
            sqlx::query("SELECT disabled FROM ivr_users WHERE username = $1")
                .bind(username.to_owned())
                .fetch_optional(&self.pool),
        )
        .await?;
        match row {
            Some(row) => Ok(row.try_get::<i64, _>("disabled").map_err(unavailable)? == 0),
            None => Ok(false),
        }
    }

    /// Whether `password` is `username`'s and the user is enabled. Unknown users cost one
    /// bcrypt verification like known ones.
    pub async fn check_password(&self, username: &str, password: &str) -> Result<bool, UserError> {
        let row = timed(
            sqlx::query("SELECT password_hash, disabled FROM ivr_users WHERE username = $1")
                .bind(username.to_owned())
                .fetch_optional(&self.pool),
        )
        .await?;
        let (hash, enabled) = match &row {
            Some(row) => (
                row.try_get::<String, _>("password_hash").map_err(unavailable)?,
                row.try_get::<i64, _>("disabled").map_err(unavailable)? == 0,
            ),
            None => (self.dummy_hash.clone(), false),
        };
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .map_err(unavailable)?;
        Ok(matches && enabled && row.is_some())
    }

    async fn hash(&self, password: &str) -> Result<String, UserError> {
        let (password, cost) = (password.to_owned(), self.cost);
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(unavailable)?
            .map_err(|e| UserError::Invalid(format!("bcrypt: {e}")))
    }
}

fn check_username(username: &str) -> Result<(), UserError> {
    let ok = !username.is_empty()
        && username.len() <= 64
        && username.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(UserError::Invalid("a username is 1 to 64 of: letters, digits, '.', '_', '-', '@'".into()))
    }
}

fn check_password(password: &str) -> Result<(), UserError> {
    // bcrypt reads at most 72 bytes; a longer password would be silently cut.
    if password.len() < 8 || password.len() > 72 {
        return Err(UserError::Invalid("a password is 8 to 72 bytes long".into()));
    }
    Ok(())
}

fn is_unique_violation(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("unique") || m.contains("duplicate key")
}

async fn timed<T>(query: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, UserError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(UserError::Unavailable(format!("no answer within {QUERY_TIMEOUT:?}"))),
    }
}

fn micros_now() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as i64
}

fn decode_user(row: &AnyRow) -> Result<User, UserError> {
    let created: i64 = row.try_get("created_at").map_err(unavailable)?;
    Ok(User {
        username: row.try_get("username").map_err(unavailable)?,
        disabled: row.try_get::<i64, _>("disabled").map_err(unavailable)? != 0,
        created_at: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(created) * 1_000)
            .map_err(unavailable)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (UserStore, SqlCallStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let calls = SqlCallStore::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let users = UserStore::new(&calls, 4).unwrap();
        users.migrate().await.unwrap();
        (users, calls, dir)
    }

    #[tokio::test]
    async fn users_lifecycle_and_shared_migrations() {
        let (users, calls, _dir) = store().await;
        // Both migrators run again, each ignoring the other's versions.
        users.migrate().await.unwrap();
        calls.migrate().await.unwrap();
        users.add("alice", "correct horse").await.unwrap();
        assert!(matches!(users.add("alice", "correct horse").await, Err(UserError::Exists(_))));
        assert!(matches!(users.add("bad name", "correct horse").await, Err(UserError::Invalid(_))));
        assert!(matches!(users.add("bob", "short").await, Err(UserError::Invalid(_))));
        assert!(users.check_password("alice", "correct horse").await.unwrap());
        assert!(!users.check_password("alice", "wrong horse").await.unwrap());
        assert!(!users.check_password("nobody", "correct horse").await.unwrap());
        users.set_password("alice", "battery staple").await.unwrap();
        assert!(users.check_password("alice", "battery staple").await.unwrap());
        users.set_disabled("alice", true).await.unwrap();
        assert!(!users.check_password("alice", "battery staple").await.unwrap());
        assert!(!users.is_enabled("alice").await.unwrap());
        assert!(matches!(users.set_disabled("nobody", true).await, Err(UserError::NotFound(_))));
        let listed = users.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].disabled);
    }

    /// An unknown user costs a bcrypt verification like a wrong password does, so the time of
    /// the answer does not tell which names exist. (Loose bounds: the machine is shared.)
    #[tokio::test]
    async fn unknown_users_take_about_as_long_as_wrong_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let calls = SqlCallStore::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let users = UserStore::new(&calls, 7).unwrap();
        users.migrate().await.unwrap();
        users.add("alice", "correct horse").await.unwrap();
        let mut known = std::time::Duration::ZERO;
        let mut unknown = std::time::Duration::ZERO;
        for _ in 0..4 {
            let t = std::time::Instant::now();
            assert!(!users.check_password("alice", "wrong horse").await.unwrap());
            known += t.elapsed();
            let t = std::time::Instant::now();
            assert!(!users.check_password("mallory", "wrong horse").await.unwrap());
            unknown += t.elapsed();
        }
        let ratio = unknown.as_secs_f64() / known.as_secs_f64();
        assert!((0.33..3.0).contains(&ratio), "unknown {unknown:?} vs known {known:?}");
    }
}
