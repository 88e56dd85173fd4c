//! Assembly: from [`Settings`] to a store, the users, an ARI client, a CallManager and the
//! [`AppState`] that [`serve`](crate::serve) mounts.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ivr_core::ari::AriClient;
use ivr_core::manager::Instance;
use ivr_core::{CallManager, CallStore, MemoryCallStore, SqlCallStore};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Tokens;
use crate::retention::Retention;
use crate::settings::{DbSettings, Secret, Settings};
use crate::users::UserStore;
use crate::{AppState, Options};

/// Why the server could not start. The text never holds a secret.
#[derive(Debug)]
pub enum StartError {
    Settings(crate::settings::SettingsError),
    Store(ivr_core::Error),
    Users(crate::users::UserError),
    Ari(ivr_core::ari::AriError),
    Manager(ivr_core::Error),
    Instance(ivr_core::Error),
    Metrics(prometheus::Error),
    Listen(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Settings(e) => e.fmt(f),
            StartError::Store(e) => write!(f, "cannot open the database (DATABASE_URL): {e}"),
            StartError::Users(e) => write!(f, "cannot prepare the users table: {e}"),
            StartError::Ari(e) => write!(f, "ARI settings: {e}"),
            StartError::Manager(e) => write!(f, "call manager: {e}"),
            StartError::Instance(e) => e.fmt(f),
            StartError::Metrics(e) => write!(f, "metrics: {e}"),
            StartError::Listen(e) => write!(f, "cannot listen (LISTEN_ADDR): {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The stores behind a running server.
pub struct Stores {
    pub calls: Arc<dyn CallStore>,
    /// The SQL store, unless DISABLE_DB.
    pub sql: Option<SqlCallStore>,
    pub users: Option<UserStore>,
}

impl Stores {
    /// Opens the database (running both sets of migrations), or memory with DISABLE_DB.
    pub async fn open(db: &DbSettings) -> Result<Stores, StartError> {
        let Some(url) = &db.database_url else {
            let memory = MemoryCallStore::with_max_ended(db.memory_max_calls);
            return Ok(Stores { calls: Arc::new(memory), sql: None, users: None });
        };
        let sql = SqlCallStore::connect(url.expose()).await.map_err(StartError::Store)?;
        Self::on(sql, db.bcrypt_cost).await
    }

    /// Users and calls in `sql`'s database, migrated.
    pub async fn on(sql: SqlCallStore, bcrypt_cost: u32) -> Result<Stores, StartError> {
        let users = UserStore::new(&sql, bcrypt_cost).map_err(StartError::Users)?;
        users.migrate().await.map_err(StartError::Users)?;
        Ok(Stores { calls: Arc::new(sql.clone()), sql: Some(sql), users: Some(users) })
    }

    /// Closes the database cleanly (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        if let Some(sql) = &self.sql {
            sql.pool().close().await;
        }
    }
}

/// A server ready to mount.
pub struct App {
    pub state: AppState,
    pub stores: Stores,
    /// How long live calls are still followed once shutdown begins (CALL_DRAIN_SECONDS).
    pub call_drain: Duration,
    /// The retention task's handle, with CALL_RETENTION_DAYS.
    pub retention: Option<Retention>,
    /// The status-callback worker (with WEBHOOK_SECRET), run beside the event loop.
    pub webhooks: Option<ivr_core::webhook::Worker>,
    /// The database to hear the users table's changes from (`user_changes.rs`, which does
    /// nothing unless it is PostgreSQL).
    pub user_changes: Option<Secret>,
}

impl App {
    /// Opens the stores named by `settings` and builds the rest on them.
    /// On a database it takes this process's lease first ([`Instance::join`]): refused while
    /// another live process holds the SQLite file, or this INSTANCE_ID on PostgreSQL.
    pub async fn build(settings: &Settings) -> Result<App, StartError> {
        let mut stores = Stores::open(&settings.db).await?;
        let mut instance = None;
        if let (Some(sql), Some(url)) = (&stores.sql, &settings.db.database_url) {
            let joined = Instance::join(sql, url.expose(), &settings.ari.app, &settings.instance)
                .await
                .map_err(StartError::Instance)?;
            stores.calls = Arc::new(joined.owning(sql));
            instance = Some(joined);
        }
        Ok(App { user_changes: settings.db.database_url.clone(), ..Self::assemble(settings, stores, instance)? })
    }

    /// Builds the manager and the state on stores the caller opened (as one process alone,
    /// without a lease).
    pub fn with_stores(settings: &Settings, stores: Stores) -> Result<App, StartError> {
        Self::assemble(settings, stores, None)
    }

    fn assemble(settings: &Settings, stores: Stores, instance: Option<Instance>) -> Result<App, StartError> {
        let registry = Registry::new();
        let mut ari_config = settings.ari.clone();
        if let Some(instance) = &instance {
            ari_config.app = instance.app().to_owned();
        }
        let ari = AriClient::new(ari_config).map_err(StartError::Ari)?;
        let manager =
            CallManager::with_instance(ari, Arc::clone(&stores.calls), settings.manager.clone(), &registry, instance)
                .map_err(StartError::Manager)?;
        let options = Options {
            metrics_enabled: settings.metrics_enabled,
            docs_enabled: settings.docs_enabled,
            shutdown_grace: settings.shutdown_grace,
            connections: settings.connections.clone(),
            login: settings.login.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            policy: settings.policy.clone(),
            caches: settings.caches.clone(),
        };
        // Its own task, fed by the store's outbox only: a slow receiver never slows the calls.
        let webhooks = match &settings.webhooks {
            Some(w) => Some(
                ivr_core::webhook::Worker::new(Arc::clone(&stores.calls), w.clone(), &registry)
                    .map_err(StartError::Metrics)?
                    .with_render(Arc::new(|call| {
                        serde_json::to_value(crate::view::CallView::from(call)).unwrap_or_default()
                    })),
            ),
            None => None,
        };
        let retention = settings
            .call_retention
            .map(|keep| Retention::new(Arc::clone(&stores.calls), keep, &registry))
            .transpose()
            .map_err(StartError::Metrics)?;
        let state = AppState::new(manager, stores.users.clone(), Tokens::new(&settings.auth), registry, options)
            .map_err(StartError::Metrics)?;
        Ok(App { state, stores, call_drain: settings.call_drain, retention, webhooks, user_changes: None })
    }

    pub fn manager(&self) -> &CallManager {
        self.state.manager()
    }

    /// Serves the API on `listener`, follows the calls, runs the retention task (with
    /// CALL_RETENTION_DAYS) and hears the users table's changes (PostgreSQL) until `shutdown`
    /// completes, or the ARI event loop fails; then drains (see [`serve`](crate::serve) and [`follow_calls`](crate::follow_calls)), stops
    /// the retention task and closes the stores.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let on_signal = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            on_signal.send_replace(true);
        });
        let webhooks = self.webhooks.clone().map(|worker| tokio::spawn(worker.run(until_stopped(stopped.clone()))));
        let follow =
            tokio::spawn(crate::follow_calls(self.manager().clone(), until_stopped(stopped.clone()), self.call_drain));
        let engine_stopped = tokio::spawn(async move {
            if let Ok(Err(e)) = follow.await {
                tracing::error!(error = %e, "the ARI event loop stopped; shutting down");
            }
            stop.send_replace(true);
        });
        let retention = self.retention.clone().map(|r| tokio::spawn(r.run(until_stopped(stopped.clone()))));
        let user_changes = self.user_changes.as_ref().map(|url| {
            let url = url.expose().to_owned();
            tokio::spawn(crate::user_changes::follow(self.state.clone(), url, until_stopped(stopped.clone())))
        });
        let served = crate::serve(listener, self.state.clone(), until_stopped(stopped)).await;
        let _ = engine_stopped.await;
        if let Some(webhooks) = webhooks {
            let _ = webhooks.await;
        }
        if let Some(retention) = retention {
            let _ = retention.await;
        }
        if let Some(user_changes) = user_changes {
            let _ = user_changes.await;
        }
        self.stores.close().await;
        tracing::info!("stopped");
        served
    }
}
