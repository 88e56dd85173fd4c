//! Settings from environment variables.
//!
//! The variables, their defaults and meanings are the table under "Settings" in README.md;
//! keep the two in step.
//!
//! A missing or bad variable is one [`SettingsError`] line naming it; values of secrets are never
//! part of an error or of `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ivr_core::ari::AriConfig;
use ivr_core::manager::InstanceSettings;
use ivr_core::webhook::{CallbackPolicy, WebhookSettings};
use ivr_core::ManagerSettings;

use crate::cache::CacheLimits;
use crate::client::TrustedProxies;
use crate::policy::DestinationPolicy;
use crate::server::ConnectionLimits;
use crate::throttle::LoginLimits;

/// The embedded default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://ivr.db";
/// Where the API listens unless LISTEN_ADDR says otherwise.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8000";
/// The shortest SECRET_KEY accepted (HS256 wants a key at least as long as its 32-byte hash).
pub const MIN_SECRET_BYTES: usize = 32;

/// A setting that stops the start: which variable, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "setting {}: {}", self.variable, self.problem)
    }
}

impl std::error::Error for SettingsError {}

/// A value that must never be printed. `Debug` and `Display` show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where settings come from: the process environment, or a map in tests.
pub trait Source {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Source for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// How to sign and check access tokens.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub secret_key: Secret,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub token_ttl: Duration,
}

/// Where calls and users are kept.
#[derive(Clone, Debug)]
pub struct DbSettings {
    /// `None` with DISABLE_DB=true.
    pub database_url: Option<Secret>,
    pub bcrypt_cost: u32,
    /// With DISABLE_DB=true: the most ended calls kept in memory (oldest ended first out).
    pub memory_max_calls: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything `ivr-server serve` needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub db: DbSettings,
    pub auth: AuthSettings,
    pub ari: AriConfig,
    pub manager: ManagerSettings,
    /// Who this process is among several (INSTANCE_ID, INSTANCE_LEASE_SECONDS).
    pub instance: InstanceSettings,
    pub listen_addr: SocketAddr,
    pub metrics_enabled: bool,
    pub docs_enabled: bool,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub call_drain: Duration,
    pub connections: ConnectionLimits,
    pub login: LoginLimits,
    pub trusted_proxies: TrustedProxies,
    pub policy: DestinationPolicy,
    pub caches: CacheLimits,
    /// How long ended calls are kept (CALL_RETENTION_DAYS); `None` keeps them for ever.
    pub call_retention: Option<Duration>,
    /// How status callbacks are signed and retried; `None` (no WEBHOOK_SECRET) sends none.
    pub webhooks: Option<WebhookSettings>,
}

/// WORKER_THREADS (`None`: one per core), read apart from the rest because the runtime that
/// reads the rest is built from it; [`Settings::load`] checks it too, so every subcommand
/// refuses a bad value alike.
pub fn worker_threads(source: &impl Source) -> Result<Option<usize>, SettingsError> {
    Ok(Reader(source).number("WORKER_THREADS", 1, 1024)?.map(|n| n as usize))
}

impl Settings {
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::load(&Env)
    }

    pub fn load(source: &impl Source) -> Result<Self, SettingsError> {
        let r = Reader(source);
        let db = DbSettings::load(source)?;
        let auth = AuthSettings::load(source)?;
        let defaults = ManagerSettings::default();
        let ari_url = r.string("ARI_HTTP_URL")?.unwrap_or_else(|| "http://127.0.0.1:8088/ari".into());
        if !ari_url.starts_with("http://") {
            return Err(r.error("ARI_HTTP_URL", "must be an http:// URL ending in /ari (ARI is reached over http)"));
        }
        if ari_url.split("://").nth(1).is_some_and(|rest| rest.split('/').next().unwrap_or("").contains('@')) {
            return Err(r.error("ARI_HTTP_URL", "must not hold credentials; use ARI_USERNAME and ARI_PASSWORD"));
        }
        let ari_password = r.string("ARI_PASSWORD")?.ok_or_else(|| r.error("ARI_PASSWORD", "is required"))?;
        let mut ari = AriConfig::new(
            ari_url,
            r.string("ARI_USERNAME")?.unwrap_or_else(|| "ivr".into()),
            ari_password,
            r.string("ARI_APP")?.unwrap_or_else(|| "ivr".into()),
        );
        // At least one REST connection beside the event WebSocket.
        if let Some(n) = r.number("ARI_MAX_CONNECTIONS", 2, 10_000)? {
            ari.max_connections = n as usize;
        }
        let endpoint_template = r.string("ARI_ENDPOINT_TEMPLATE")?.unwrap_or(defaults.endpoint_template.clone());
        if !endpoint_template.contains("{number}") {
            return Err(r.error("ARI_ENDPOINT_TEMPLATE", "must contain {number}"));
        }
        let manager = ManagerSettings {
            endpoint_template,
            default_context: r.string("DEFAULT_CONTEXT")?.unwrap_or(defaults.default_context.clone()),
            default_extension: r.string("DEFAULT_EXTENSION")?.unwrap_or(defaults.default_extension.clone()),
            default_priority: r.number("DEFAULT_PRIORITY", 1, 1_000_000)?.unwrap_or(defaults.default_priority),
            default_timeout_secs: r.number("DEFAULT_TIMEOUT", 1, 3600)?.unwrap_or(defaults.default_timeout_secs),
            default_caller_id: r.string("DEFAULT_CALLER_ID")?.or(defaults.default_caller_id.clone()),
            max_active_calls: r
                .number("MAX_ACTIVE_CALLS", 1, 1_000_000)?
                .map_or(defaults.max_active_calls, |n| n as usize),
            max_calls_per_second: r.number("MAX_CALLS_PER_SECOND", 0, 10_000)?.unwrap_or(defaults.max_calls_per_second),
            max_queued_calls: r
                .number("MAX_QUEUED_CALLS", 1, 1_000_000)?
                .map_or(defaults.max_queued_calls, |n| n as usize),
            originate_retry_window: r
                .number("ORIGINATE_RETRY_SECONDS", 0, 3600)?
                .map_or(defaults.originate_retry_window, |n| Duration::from_secs(n.into())),
            ..defaults
        };
        let (callbacks, webhooks) = webhooks(&r)?;
        let manager = ManagerSettings { callbacks, ..manager };
        let instance_id = match r.string("INSTANCE_ID")? {
            Some(id) => id,
            None => default_instance_id(),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if instance_id.is_empty() || instance_id.len() > 64 || !instance_id.chars().all(valid) {
            return Err(r.error(
                "INSTANCE_ID",
                "must be 1 to 64 letters, digits, '-', '_' or '.' (the host name is used when unset)",
            ));
        }
        let instance = InstanceSettings {
            instance_id,
            lease_ttl: Duration::from_secs(r.number("INSTANCE_LEASE_SECONDS", 2, 3600)?.unwrap_or(15).into()),
        };
        let listen = r.string("LISTEN_ADDR")?.unwrap_or_else(|| DEFAULT_LISTEN_ADDR.into());
        let listen_addr = listen
            .parse()
            .map_err(|_| r.error("LISTEN_ADDR", "must be an IP address and port, e.g. 127.0.0.1:8000"))?;
        let log_format = match r.string("LOG_FORMAT")?.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(r.error("LOG_FORMAT", "must be text or json")),
        };
        let policy =
            DestinationPolicy::parse(r.string("ALLOWED_PREFIXES")?.as_deref(), r.string("DENIED_PREFIXES")?.as_deref())
                .map_err(|(variable, problem)| r.error(variable, &problem))?;
        let trusted_proxies = TrustedProxies::parse(&r.string("TRUSTED_PROXIES")?.unwrap_or_default())
            .map_err(|problem| r.error("TRUSTED_PROXIES", &problem))?;
        let c = ConnectionLimits::default();
        let connections = ConnectionLimits {
            max_connections: r.number("MAX_CONNECTIONS", 1, 1_000_000)?.map_or(c.max_connections, |n| n as usize),
            per_client: r.number("MAX_CONNECTIONS_PER_CLIENT", 1, 1_000_000)?.map_or(c.per_client, |n| n as usize),
            header_read_timeout: r
                .number("HEADER_READ_TIMEOUT_SECONDS", 1, 3600)?
                .map_or(c.header_read_timeout, |n| Duration::from_secs(n.into())),
        };
        let l = LoginLimits::default();
        let secs = |n: u32| Duration::from_secs(n.into());
        let login = LoginLimits {
            address_failures: r.number("LOGIN_ADDRESS_FAILURES", 1, 1_000_000)?.unwrap_or(l.address_failures),
            address_forgive: r.number("LOGIN_ADDRESS_FORGIVE_SECONDS", 1, 86_400)?.map_or(l.address_forgive, secs),
            user_failures: r.number("LOGIN_USER_FAILURES", 1, 1_000_000)?.unwrap_or(l.user_failures),
            user_forgive: r.number("LOGIN_USER_FORGIVE_SECONDS", 1, 86_400)?.map_or(l.user_forgive, secs),
            slow_after: r.number("LOGIN_SLOW_AFTER", 0, 1_000_000)?.unwrap_or(l.slow_after),
            slowdown: r.number("LOGIN_SLOWDOWN_MS", 0, 60_000)?.map_or(l.slowdown, |n| Duration::from_millis(n.into())),
        };
        let k = CacheLimits::default();
        let caches = CacheLimits {
            status_bytes: r.number("STATUS_CACHE_BYTES", 0, 4_000_000_000)?.map_or(k.status_bytes, |n| n as usize),
            user_staleness: r.number("USER_CACHE_SECONDS", 0, 60)?.map_or(k.user_staleness, secs),
        };
        worker_threads(source)?;
        Ok(Settings {
            db,
            auth,
            ari,
            manager,
            instance,
            listen_addr,
            metrics_enabled: r.flag("METRICS_ENABLED")?.unwrap_or(false),
            docs_enabled: r.flag("DOCS_ENABLED")?.unwrap_or(true),
            log_format,
            shutdown_grace: Duration::from_secs(r.number("SHUTDOWN_GRACE_SECONDS", 0, 3600)?.unwrap_or(10).into()),
            call_drain: Duration::from_secs(r.number("CALL_DRAIN_SECONDS", 0, 86_400)?.unwrap_or(30).into()),
            connections,
            login,
            trusted_proxies,
            policy,
            caches,
            call_retention: r
                .number("CALL_RETENTION_DAYS", 1, 36_500)?
                .map(|days| Duration::from_secs(u64::from(days) * 86_400)),
            webhooks,
        })
    }
}

/// The shortest WEBHOOK_SECRET accepted.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;

/// The status-callback settings: which URLs calls may name, and how deliveries are sent.
fn webhooks<S: Source>(r: &Reader<'_, S>) -> Result<(CallbackPolicy, Option<WebhookSettings>), SettingsError> {
    let secret = r.string("WEBHOOK_SECRET")?;
    if secret.as_ref().is_some_and(|s| s.len() < MIN_WEBHOOK_SECRET_BYTES) {
        return Err(r.error(
            "WEBHOOK_SECRET",
            &format!(
                "is too short: at least {MIN_WEBHOOK_SECRET_BYTES} bytes are needed (e.g. `openssl rand -hex 32`)"
            ),
        ));
    }
    let mut allowed_hosts = Vec::new();
    for entry in r.string("WEBHOOK_ALLOWED_HOSTS")?.unwrap_or_default().split(',').filter(|e| !e.trim().is_empty()) {
        allowed_hosts
            .push(CallbackPolicy::parse_host(entry).map_err(|e| r.error("WEBHOOK_ALLOWED_HOSTS", &e.to_string()))?);
    }
    let default_url = r.string("WEBHOOK_DEFAULT_URL")?;
    let policy = CallbackPolicy { enabled: secret.is_some(), default_url: default_url.clone(), allowed_hosts };
    if let Some(url) = &default_url {
        if secret.is_none() {
            return Err(r.error("WEBHOOK_DEFAULT_URL", "needs WEBHOOK_SECRET: every status callback is signed"));
        }
        // The URL may hold a token: it is not repeated.
        policy
            .check(url)
            .map_err(|problem| r.error("WEBHOOK_DEFAULT_URL", &problem.replace("status_callback", "the URL")))?;
    }
    let d = WebhookSettings::default();
    let settings = secret.map(|secret| -> Result<WebhookSettings, SettingsError> {
        Ok(WebhookSettings {
            secret: secret.into_bytes(),
            timeout: r.number("WEBHOOK_TIMEOUT", 1, 300)?.map_or(d.timeout, |n| Duration::from_secs(n.into())),
            max_age: r.number("WEBHOOK_MAX_AGE", 60, 30 * 86_400)?.map_or(d.max_age, |n| Duration::from_secs(n.into())),
            ..d
        })
    });
    Ok((policy, settings.transpose()?))
}

impl AuthSettings {
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::load(&Env)
    }

    pub fn load(source: &impl Source) -> Result<Self, SettingsError> {
        let r = Reader(source);
        let secret = r.string("SECRET_KEY")?.ok_or_else(|| r.error("SECRET_KEY", "is required"))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(r.error(
                "SECRET_KEY",
                &format!("is too short: at least {MIN_SECRET_BYTES} bytes are needed (e.g. `openssl rand -hex 32`)"),
            ));
        }
        let minutes = r.number("ACCESS_TOKEN_EXPIRE_MINUTES", 1, 525_600)?.unwrap_or(30);
        Ok(AuthSettings {
            secret_key: Secret::new(secret),
            issuer: r.string("JWT_ISSUER")?,
            audience: r.string("JWT_AUDIENCE")?,
            token_ttl: Duration::from_secs(u64::from(minutes) * 60),
        })
    }
}

impl DbSettings {
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::load(&Env)
    }

    pub fn load(source: &impl Source) -> Result<Self, SettingsError> {
        let r = Reader(source);
        let disabled = r.flag("DISABLE_DB")?.unwrap_or(false);
        let url = r.string("DATABASE_URL")?.unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        let known = ["sqlite:", "postgres://", "postgresql://"];
        if !known.iter().any(|p| url.starts_with(p)) {
            // The value may hold a password: it is not repeated.
            return Err(r.error("DATABASE_URL", "must start with sqlite: or postgres://"));
        }
        Ok(DbSettings {
            database_url: (!disabled).then(|| Secret::new(url)),
            bcrypt_cost: r.number("BCRYPT_COST", 4, 31)?.unwrap_or(12),
            memory_max_calls: r
                .number("MEMORY_MAX_CALLS", 1, 100_000_000)?
                .map_or(ivr_core::store::DEFAULT_MEMORY_MAX_CALLS, |n| n as usize),
        })
    }
}

/// The host name, made fit for an instance id: stable across restarts on one host (or of one
/// container), and different between hosts. Two instances on one host need INSTANCE_ID.
fn default_instance_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates what fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        String::from_utf8_lossy(buf.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
    } else {
        String::new()
    };
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(64)
        .collect();
    if name.is_empty() {
        "ivr".into()
    } else {
        name
    }
}

struct Reader<'a, S>(&'a S);

impl<S: Source> Reader<'_, S> {
    fn error(&self, variable: &'static str, problem: &str) -> SettingsError {
        SettingsError { variable, problem: problem.to_owned() }
    }

    /// The value, `None` when unset or empty.
    fn string(&self, name: &'static str) -> Result<Option<String>, SettingsError> {
        Ok(self.0.var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()))
    }

    fn flag(&self, name: &'static str) -> Result<Option<bool>, SettingsError> {
        match self.string(name)?.map(|v| v.to_ascii_lowercase()).as_deref() {
            None => Ok(None),
            Some("true" | "1" | "yes" | "on") => Ok(Some(true)),
            Some("false" | "0" | "no" | "off") => Ok(Some(false)),
            Some(_) => Err(self.error(name, "must be true or false")),
        }
    }

    fn number(&self, name: &'static str, min: u32, max: u32) -> Result<Option<u32>, SettingsError> {
        let Some(value) = self.string(name)? else { return Ok(None) };
        match value.parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.error(name, &format!("must be a whole number from {min} to {max}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load(&move |name: &str| map.get(name).cloned())
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef-key";

    #[test]
    fn defaults() {
        let s = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw")]).unwrap();
        assert_eq!(s.db.database_url.as_ref().unwrap().expose(), DEFAULT_DATABASE_URL);
        assert_eq!(s.listen_addr.to_string(), "127.0.0.1:8000");
        assert_eq!(s.auth.token_ttl, Duration::from_secs(30 * 60));
        assert_eq!(s.manager.endpoint_template, "PJSIP/{number}@trunk");
        assert!(!s.metrics_enabled && s.docs_enabled);
        assert_eq!(s.db.bcrypt_cost, 12);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.connections.max_connections, 1024);
        assert_eq!(s.connections.per_client, 64);
        assert_eq!(s.connections.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.caches, CacheLimits { status_bytes: 32 * 1024 * 1024, user_staleness: Duration::from_secs(1) });
        assert_eq!(s.db.memory_max_calls, 100_000);
        let set = [("STATUS_CACHE_BYTES", "0"), ("USER_CACHE_SECONDS", "0"), ("MEMORY_MAX_CALLS", "10")];
        let s = load(&[&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw")][..], &set].concat()).unwrap();
        assert_eq!(s.caches, CacheLimits { status_bytes: 0, user_staleness: Duration::ZERO });
        assert_eq!(s.db.memory_max_calls, 10);
        assert_eq!(s.login, LoginLimits::default());
        assert!(s.trusted_proxies.is_empty() && !s.policy.is_set());
        assert_eq!(s.call_retention, None, "retention is off by default");
        assert_eq!((s.manager.max_calls_per_second, s.manager.max_queued_calls), (10, 1000));
        let unpaced = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), ("MAX_CALLS_PER_SECOND", "0")]).unwrap();
        assert_eq!(unpaced.manager.max_calls_per_second, 0, "0 lifts the limit");
        assert_eq!(s.ari.max_connections, 20);
        let s = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), ("ARI_MAX_CONNECTIONS", "50")]).unwrap();
        assert_eq!(s.ari.max_connections, 50);
    }

    #[test]
    fn instance_id_defaults_to_the_host_name_and_is_checked() {
        let s = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw")]).unwrap();
        assert_eq!(s.instance.instance_id, default_instance_id());
        assert_eq!(s.instance.lease_ttl, Duration::from_secs(15));
        assert!(!s.instance.instance_id.is_empty());
        let again = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw")]).unwrap();
        assert_eq!(again.instance.instance_id, s.instance.instance_id, "stable from one start to the next");
        let s = load(&[
            ("SECRET_KEY", KEY),
            ("ARI_PASSWORD", "pw"),
            ("INSTANCE_ID", "ivr-2"),
            ("INSTANCE_LEASE_SECONDS", "3"),
        ])
        .unwrap();
        assert_eq!((s.instance.instance_id.as_str(), s.instance.lease_ttl), ("ivr-2", Duration::from_secs(3)));
        for bad in ["a/b", "two words", &"x".repeat(65)] {
            let e = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), ("INSTANCE_ID", bad)]).unwrap_err();
            assert_eq!(e.variable, "INSTANCE_ID");
        }
    }

    #[test]
    fn hardening_settings() {
        let s = load(&[
            ("SECRET_KEY", KEY),
            ("ARI_PASSWORD", "pw"),
            ("DENIED_PREFIXES", "+1900, +1976"),
            ("ALLOWED_PREFIXES", "+1"),
            ("TRUSTED_PROXIES", "10.0.0.0/8"),
            ("MAX_CONNECTIONS", "5"),
            ("LOGIN_SLOWDOWN_MS", "0"),
            ("CALL_RETENTION_DAYS", "90"),
        ])
        .unwrap();
        assert_eq!(s.call_retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(s.policy.denied(), ["+1900", "+1976"]);
        assert_eq!(s.policy.allowed(), ["+1"]);
        assert_eq!(s.trusted_proxies.to_string(), "10.0.0.0/8");
        assert_eq!(s.connections.max_connections, 5);
        assert!(s.login.slowdown.is_zero());
    }

    #[test]
    fn errors_name_the_variable_and_never_the_secret() {
        let short = "short-secret-value";
        let e = load(&[("SECRET_KEY", short), ("ARI_PASSWORD", "pw")]).unwrap_err();
        assert_eq!(e.variable, "SECRET_KEY");
        assert!(!e.to_string().contains(short));
        assert_eq!(load(&[("ARI_PASSWORD", "pw")]).unwrap_err().variable, "SECRET_KEY");
        assert_eq!(load(&[("SECRET_KEY", KEY)]).unwrap_err().variable, "ARI_PASSWORD");
        let url = "mysql://root:hunter2@db/ivr";
        let e = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), ("DATABASE_URL", url)]).unwrap_err();
        assert_eq!(e.variable, "DATABASE_URL");
        assert!(!e.to_string().contains("hunter2"));
        for (var, bad) in [
            ("DISABLE_DB", "maybe"),
            ("DEFAULT_PRIORITY", "-1"),
            ("DEFAULT_TIMEOUT", "0"),
            ("MAX_ACTIVE_CALLS", "lots"),
            ("MAX_CALLS_PER_SECOND", "-1"),
            ("MAX_QUEUED_CALLS", "0"),
            ("ACCESS_TOKEN_EXPIRE_MINUTES", "0"),
            ("LISTEN_ADDR", "localhost"),
            ("LOG_FORMAT", "xml"),
            ("ARI_ENDPOINT_TEMPLATE", "PJSIP/trunk"),
            ("ARI_HTTP_URL", "http://ivr:pw@127.0.0.1:8088/ari"),
            ("BCRYPT_COST", "3"),
            ("METRICS_ENABLED", "2"),
            ("DENIED_PREFIXES", "1900"),
            ("ALLOWED_PREFIXES", "+1,premium"),
            ("TRUSTED_PROXIES", "proxy.local"),
            ("MAX_CONNECTIONS", "0"),
            ("MAX_CONNECTIONS_PER_CLIENT", "none"),
            ("HEADER_READ_TIMEOUT_SECONDS", "0"),
            ("LOGIN_ADDRESS_FAILURES", "0"),
            ("LOGIN_USER_FORGIVE_SECONDS", "x"),
            ("LOGIN_SLOWDOWN_MS", "60001"),
            ("ARI_MAX_CONNECTIONS", "1"),
            ("STATUS_CACHE_BYTES", "-1"),
            ("USER_CACHE_SECONDS", "61"),
            ("MEMORY_MAX_CALLS", "0"),
            ("INSTANCE_LEASE_SECONDS", "1"),
            ("CALL_RETENTION_DAYS", "0"),
            ("CALL_RETENTION_DAYS", "ninety"),
            ("WORKER_THREADS", "0"),
            ("WORKER_THREADS", "many"),
        ] {
            let e = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), (var, bad)]).unwrap_err();
            assert_eq!(e.variable, var, "{e}");
            assert!(e.to_string().starts_with(&format!("setting {var}: ")), "{e}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let s = load(&[
            ("SECRET_KEY", KEY),
            ("ARI_PASSWORD", "ari-pass-9"),
            ("DATABASE_URL", "postgres://u:db-pass-7@h/db"),
        ])
        .unwrap();
        let shown = format!("{s:?}");
        for secret in [KEY, "ari-pass-9", "db-pass-7"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn disable_db_drops_the_url() {
        let s = load(&[("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw"), ("DISABLE_DB", "true")]).unwrap();
        assert!(s.db.database_url.is_none());
    }

    #[test]
    fn webhooks() {
        let base = [("SECRET_KEY", KEY), ("ARI_PASSWORD", "pw")];
        let with = |extra: &[(&str, &str)]| load(&[&base[..], extra].concat());
        let off = with(&[]).unwrap();
        assert!(off.webhooks.is_none() && !off.manager.callbacks.enabled);

        let on = with(&[
            ("WEBHOOK_SECRET", "whsec-0123456789abcdef"),
            ("WEBHOOK_ALLOWED_HOSTS", " Hooks.Example , 10.0.0.5:8080 ,"),
            ("WEBHOOK_DEFAULT_URL", "http://crm.example/ivr"),
            ("WEBHOOK_MAX_AGE", "3600"),
        ])
        .unwrap();
        let w = on.webhooks.expect("enabled by the secret");
        assert_eq!((w.max_age, w.timeout), (Duration::from_secs(3600), Duration::from_secs(10)));
        assert_eq!(on.manager.callbacks.allowed_hosts, ["hooks.example", "10.0.0.5:8080"]);
        assert_eq!(on.manager.callbacks.check("http://crm.example/other"), Ok(()), "the default URL's host");
        assert!(!format!("{w:?}").contains("whsec"), "the secret is not in Debug");
        assert_eq!(
            with(&[("WEBHOOK_SECRET", "whsec-0123456789abcdef")]).unwrap().webhooks.unwrap().max_age,
            Duration::from_secs(86_400)
        );

        for (vars, variable) in [
            (&[("WEBHOOK_SECRET", "short")][..], "WEBHOOK_SECRET"),
            (&[("WEBHOOK_DEFAULT_URL", "http://crm.example/")][..], "WEBHOOK_DEFAULT_URL"),
            (
                &[("WEBHOOK_SECRET", "whsec-0123456789abcdef"), ("WEBHOOK_DEFAULT_URL", "https://crm.example/")][..],
                "WEBHOOK_DEFAULT_URL",
            ),
            (&[("WEBHOOK_ALLOWED_HOSTS", "a/b")][..], "WEBHOOK_ALLOWED_HOSTS"),
            (&[("WEBHOOK_SECRET", "whsec-0123456789abcdef"), ("WEBHOOK_MAX_AGE", "5")][..], "WEBHOOK_MAX_AGE"),
        ] {
            assert_eq!(with(vars).unwrap_err().variable, variable, "{vars:?}");
        }
    }
}
