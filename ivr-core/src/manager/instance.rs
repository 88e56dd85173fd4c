//! This process as one instance among several over one PostgreSQL (or as the only one on a
//! SQLite file).
//!
//! [`Instance::join`] takes the process's lease (`store/lease.rs`) and names its ARI
//! application: on PostgreSQL `ARI_APP-INSTANCE_ID`, since ARI gives an application name to one
//! WebSocket only; on SQLite `ARI_APP` itself. Its task ([`run`]), beside the event loop:
//! - renews the lease every third of its term; a lease found lapsed means the others have
//!   taken the calls, so the engine lets go of every call and stops with
//!   [`Error::LeaseLost`] instead of fighting for them;
//! - (PostgreSQL) claims the calls of lapsed leases, a batch a round, and adopts them: queued
//!   ones join the queue, the others have their channel subscribed to our application and
//!   are reconciled like after a restart;
//! - (PostgreSQL) carries out the cancels other instances recorded for our calls;
//! - (PostgreSQL) listens (`LISTEN`) for call changes and cancel requests, and wakes the
//!   watchers of calls followed elsewhere, so their streams are pushed, not polled.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use super::CallManager;
use crate::call::{Call, CallId};
use crate::error::{Error, Result};
use crate::store::lease::{CALLS_CHANNEL, CANCEL_CHANNEL};
use crate::store::{Lease, Leases, SqlCallStore};

/// Orphans claimed per round: a dead instance's calls spread over the survivors' rounds.
const CLAIM_BATCH: usize = 50;
/// The pause before a lost `LISTEN` connection is opened again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Who this instance is and how long its lease lasts.
#[derive(Clone, Debug)]
pub struct InstanceSettings {
    /// Stable across restarts of the same instance (INSTANCE_ID; the host name by default).
    pub instance_id: String,
    /// How long a lease lasts without renewal (INSTANCE_LEASE_SECONDS): how soon the others
    /// take a dead instance's calls over.
    pub lease_ttl: Duration,
}

/// What watchers of calls followed elsewhere are woken with: one call changed, or `None`
/// for "anything may have changed" (the `LISTEN` connection was re-opened).
pub(crate) type Wake = Option<CallId>;

/// This process's lease and its link to the others.
pub struct Instance {
    leases: Leases,
    lease: Lease,
    /// The database URL, for the `LISTEN` connection (sqlx's `Any` driver cannot listen).
    url: String,
    wake: broadcast::Sender<Wake>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("Instance").field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl Instance {
    /// Takes this process's lease in `store`'s database (`url`), named after `base_app`
    /// (ARI_APP). Refused with [`Error::InstanceInUse`] while another live process holds the
    /// file (SQLite) or the instance id (PostgreSQL).
    pub async fn join(store: &SqlCallStore, url: &str, base_app: &str, settings: &InstanceSettings) -> Result<Self> {
        let leases = Leases::new(store, settings.lease_ttl);
        let app = match leases.is_postgres() {
            true => format!("{base_app}-{}", settings.instance_id),
            false => base_app.to_owned(),
        };
        let lease = leases.register(&settings.instance_id, &app).await?;
        if leases.is_postgres() {
            leases.install_notify().await?;
        }
        tracing::info!(instance = %lease.instance_id, lease = %lease.lease_id, app = %lease.app, "instance registered");
        let (wake, _) = broadcast::channel(1024);
        Ok(Instance { leases, lease, url: url.to_owned(), wake })
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The ARI application this instance registers and originates into.
    pub fn app(&self) -> &str {
        &self.lease.app
    }

    /// Whether other instances may share the database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.leases.is_postgres()
    }

    /// `store`, storing new calls as followed by this instance.
    pub fn owning(&self, store: &SqlCallStore) -> SqlCallStore {
        store.with_owner(&self.lease.lease_id)
    }

    pub(crate) fn leases(&self) -> &Leases {
        &self.leases
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.wake.subscribe()
    }

    /// Gives the lease up: what is still active is the others' at once.
    pub(crate) async fn leave(&self) {
        if let Err(e) = self.leases.release(&self.lease).await {
            tracing::warn!(error = %e, "could not release the lease; it lapses by itself");
        }
    }
}

/// The instance's task: renewals, take-overs and remote cancels. Returns only when the lease
/// was lost.
pub(crate) async fn run(manager: CallManager) -> Error {
    let Some(instance) = manager.shared.instance.as_ref() else { return std::future::pending().await };
    let listener = instance.is_shared().then(|| tokio::spawn(listen(manager.clone())));
    let mut tick = tokio::time::interval(instance.leases.ttl() / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds: u64 = 0;
    let lost = loop {
        tick.tick().await;
        match instance.leases.renew(&instance.lease).await {
            Ok(true) => {}
            Ok(false) => break Error::LeaseLost,
            // Renewed at the next tick if the database is back before the lease lapses.
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the lease");
                continue;
            }
        }
        if !instance.is_shared() {
            continue;
        }
        manager.take_over_orphans().await;
        manager.carry_out_cancels().await;
        rounds += 1;
        if rounds.is_multiple_of(100) {
            let _ = instance.leases.forget_old().await;
        }
    };
    tracing::error!("the lease lapsed: the other instances have taken the calls over; letting go of them");
    if let Some(listener) = listener {
        listener.abort();
    }
    manager.let_go_of_all();
    lost
}

/// `LISTEN` for call changes and cancel requests until aborted.
async fn listen(manager: CallManager) {
    let Some(instance) = manager.shared.instance.as_ref() else { return };
    loop {
        match PgListener::connect(&instance.url).await {
            Ok(mut listener) => match listener.listen_all([CALLS_CHANNEL, CANCEL_CHANNEL]).await {
                Ok(()) => loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) if n.channel() == CALLS_CHANNEL => {
                            if let Ok(call_id) = n.payload().parse() {
                                let _ = instance.wake.send(Some(call_id));
                            }
                        }
                        Ok(Some(n)) => {
                            if n.payload().split(' ').next() == Some(instance.lease.lease_id.as_str()) {
                                let manager = manager.clone();
                                tokio::spawn(async move { manager.carry_out_cancels().await });
                            }
                        }
                        // The connection dropped; the next call reconnects. Notifications
                        // made meanwhile are lost: every watcher looks again.
                        Ok(None) => {
                            tracing::warn!("LISTEN connection lost; reconnecting");
                            let _ = instance.wake.send(None);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN failed");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, "could not LISTEN"),
            },
            Err(e) => tracing::warn!(error = %e, "could not open the LISTEN connection"),
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

impl CallManager {
    /// Claims a batch of orphaned calls and follows them.
    async fn take_over_orphans(&self) {
        let Some(instance) = self.shared.instance.as_ref() else { return };
        let ids = match instance.leases.claim_orphans(&instance.lease, CLAIM_BATCH).await {
            Ok(ids) => ids,
            Err(e) => return tracing::warn!(error = %e, "could not claim orphaned calls"),
        };
        if !ids.is_empty() {
            tracing::info!(calls = ids.len(), "taking over calls of an instance whose lease lapsed");
            self.shared.metrics.takeovers.inc_by(ids.len() as u64);
            self.adopt(ids).await;
        }
    }

    /// Follows calls just claimed, as after a restart: queued ones join the queue, the others
    /// are subscribed to our application and checked with Asterisk (`reconcile.rs`).
    pub(crate) async fn adopt(&self, ids: Vec<CallId>) {
        let mut calls: Vec<Call> = Vec::with_capacity(ids.len());
        for id in ids {
            match self.shared.store.get(id).await {
                Ok(Some(call)) if call.is_active() => calls.push(call),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(call_id = %id, error = %e, "could not read a claimed call; the next reconcile will")
                }
            }
        }
        self.reconcile_calls(calls).await;
    }

    /// Cancels the calls other instances asked us to.
    async fn carry_out_cancels(&self) {
        let Some(instance) = self.shared.instance.as_ref() else { return };
        let ids = match instance.leases.take_cancel_requests(&instance.lease).await {
            Ok(ids) => ids,
            Err(e) => return tracing::warn!(error = %e, "could not read cancel requests"),
        };
        for call_id in ids {
            tracing::info!(%call_id, "canceling a call at another instance's request");
            if let Err(e) = self.cancel(call_id).await {
                tracing::warn!(%call_id, error = %e, "a requested cancel failed");
            }
        }
    }

    /// Stops following every call (the lease was lost): the instances that took them over
    /// follow them now.
    fn let_go_of_all(&self) {
        let ids: HashSet<CallId> = self.shared.calls.ids();
        for id in ids {
            self.shared.pacer.remove(id);
            self.forget(id);
        }
    }

    /// The cancel of a call this process does not follow, when other instances may: asks its
    /// live owner, or claims it from a dead one. `Some` is the answer; `None` means the call
    /// is ours to cancel here (now followed, or followed by no instance at all).
    pub(crate) async fn cancel_elsewhere(&self, call: &Call) -> Result<Option<Call>> {
        let Some(instance) = self.shared.instance.as_ref().filter(|i| i.is_shared()) else { return Ok(None) };
        let call_id = call.call_id;
        match instance.leases.owner_of(call_id).await? {
            Some((owner, true)) if owner != instance.lease.lease_id => {
                let mut woken = instance.subscribe();
                instance.leases.request_cancel(&owner, call_id).await?;
                let deadline = tokio::time::Instant::now() + REMOTE_CANCEL_WAIT;
                loop {
                    let current = self.shared.store.get(call_id).await?.ok_or(Error::NotFound(call_id))?;
                    if current.history.len() > call.history.len() {
                        return Ok(Some(current));
                    }
                    match tokio::time::timeout_at(deadline, woken.recv()).await {
                        Err(_) => return Ok(Some(current)), // asked; its end follows
                        Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(Some(current)),
                        Ok(_) => {}
                    }
                }
            }
            Some((owner, _)) if owner == instance.lease.lease_id => {
                // Claimed by us, not followed yet (its adoption is under way): follow it now,
                // so the cancel goes through its tracker. A call followed already is left be.
                self.adopt(vec![call_id]).await;
                Ok(None)
            }
            _ => {
                if instance.leases.claim_call(&instance.lease, call_id).await? {
                    self.adopt(vec![call_id]).await;
                }
                Ok(None)
            }
        }
    }
}

/// How long a cancel sent to another instance waits for it to be recorded before answering
/// with the call as it stands.
const REMOTE_CANCEL_WAIT: Duration = Duration::from_secs(3);
