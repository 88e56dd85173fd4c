//! Reconcile, deadlines and the sweep, on a task of their own: the event loop only asks.
//!
//! A reconcile reads the active calls from the store and checks them against Asterisk. One
//! runs at a time; asks that come meanwhile (a reconnect, a burst of them) coalesce into
//! exactly one more run. For many calls it takes one `GET /channels` listing instead of one
//! request each; for a few, `GET /channels/{id}` with bounded concurrency.
//!
//! What it concludes, per call:
//! - queued and never sent, not followed here (ivr restarted): it resumes its place in the
//!   queue, in the order calls were accepted. It was never dialled, so this is no double dial;
//! - pending and followed here: its originate is in progress; left alone;
//! - the channel exists: followed (taken over if need be), and its state fed to the tracker;
//! - the channel is gone and no event of it came since the check began: it ended unseen, so
//!   the call ends with what was seen (`lost` if it was never answered).

use std::collections::{HashMap, HashSet};

use futures_util::stream::{self, StreamExt};
use tokio::time::Instant;

use super::follow::Tracker;
use super::request::answer_action;
use super::CallManager;
use crate::ari::{AriError, AriEvent, Channel, ChannelState};
use crate::call::{Call, CallId, CallStatus, FailureReason, Step, Transition};

/// At least this many calls to check: one listing of every channel instead of one GET each.
const LIST_FROM: usize = 8;
/// `GET /channels/{id}` requests of one check in flight at once.
const GET_CONCURRENCY: usize = 4;

/// The reconcile task: runs until aborted with the event loop.
pub(crate) async fn run(manager: CallManager) {
    let shared = &manager.shared;
    let mut sweep = tokio::time::interval(shared.settings.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A Notify keeps one permit for asks made while a run is going: they make one more.
            _ = shared.reconcile.notified() => manager.reconcile_all().await,
            _ = sweep.tick() => manager.sweep().await,
        }
    }
}

impl CallManager {
    /// Asks for every active call to be checked against Asterisk. Returns at once; asks made
    /// while a check runs coalesce into one more.
    pub fn reconcile_soon(&self) {
        self.shared.reconcile.notify_one();
    }

    async fn reconcile_all(&self) {
        let shared = &self.shared;
        shared.metrics.reconcile_runs.inc();
        self.note_startup_time().await;
        let mut calls = match shared.store.list_active().await {
            Ok(calls) => calls,
            Err(e) => return tracing::error!(error = %e, "reconcile: store unavailable"),
        };
        if let Some(instance) = shared.instance.as_ref().filter(|i| i.is_shared()) {
            // Beside other instances: only the calls this one follows (the others' are
            // theirs, and those of lapsed leases are claimed first).
            match instance.leases().owned(instance.lease()).await {
                Ok(owned) => {
                    let owned: std::collections::HashSet<_> = owned.into_iter().collect();
                    calls.retain(|c| owned.contains(&c.call_id));
                }
                Err(e) => return tracing::error!(error = %e, "reconcile: store unavailable"),
            }
        }
        self.reconcile_calls(calls).await;
    }

    /// Resumes the queued calls among `calls` that are not followed here, and checks the
    /// others with Asterisk.
    pub(crate) async fn reconcile_calls(&self, calls: Vec<Call>) {
        let shared = &self.shared;
        let mut resume = Vec::new();
        let mut check = Vec::new();
        for call in calls {
            let followed = shared.calls.contains(call.call_id);
            match (call.is_queued(), call.status == CallStatus::Pending, followed) {
                (true, _, false) => resume.push(call),
                (_, true, true) => {} // queued, or its originate is in progress
                _ => check.push(call),
            }
        }
        resume.sort_by_key(|c| (c.created_at, c.call_id));
        tracing::info!(check = check.len(), resume = resume.len(), "reconciling active calls with Asterisk");
        for call in resume {
            let tracker = Tracker::new(call.attempt_number, answer_action(&call.spec), call.spec.ring_timeout());
            if self.follow(&call, tracker, None) {
                shared.pacer.requeue(call.call_id);
            }
        }
        shared.metrics.queued_calls.set(shared.pacer.queued() as i64);
        let deaf = self.subscribe_taken_over(&check).await;
        self.check_with_asterisk(check, &deaf).await;
    }

    /// Asks Asterisk about the calls whose deadline passed without an end.
    async fn sweep(&self) {
        let settings = &self.shared.settings;
        let overdue = self.shared.calls.overdue(Instant::now(), settings.ring_grace, settings.answered_silence);
        if !overdue.is_empty() {
            tracing::info!(calls = overdue.len(), "deadline passed without an end; asking Asterisk");
            self.check_with_asterisk(overdue, &HashSet::new()).await;
        }
    }

    /// Beside other instances, a call this one did not place may have been placed into
    /// another's application: its channel is subscribed to ours before it is checked, so no
    /// event falls between the check and the subscription. Returns the calls whose
    /// subscription failed (their events may not reach us).
    async fn subscribe_taken_over(&self, calls: &[Call]) -> HashSet<CallId> {
        let shared = &self.shared;
        let mut deaf = HashSet::new();
        if !shared.instance.as_ref().is_some_and(|i| i.is_shared()) {
            return deaf;
        }
        let app = &shared.ari.config().app;
        for call in calls.iter().filter(|c| !shared.calls.contains(c.call_id)) {
            match shared.ari.subscribe(app, &call.channel_id()).await {
                Ok(_) => {}
                // Gone already: the check ends the call.
                Err(AriError::Status { status: 422, .. }) | Err(AriError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(call_id = %call.call_id, error = %e, "could not subscribe to a taken-over channel");
                    self.count_ari_error(&e);
                    deaf.insert(call.call_id);
                }
            }
        }
        deaf
    }

    pub(crate) async fn check_with_asterisk(&self, calls: Vec<Call>, deaf: &HashSet<CallId>) {
        if calls.is_empty() {
            return;
        }
        let shared = &self.shared;
        let ari = &shared.ari;
        let started = Instant::now();
        let found: Vec<(Call, Result<Option<Channel>, AriError>)> = if calls.len() >= LIST_FROM {
            shared.metrics.reconcile_requests.with_label_values(&["list"]).inc();
            match ari.list_channels().await {
                Ok(channels) => {
                    let mut by_id: HashMap<String, Channel> = channels.into_iter().map(|c| (c.id.clone(), c)).collect();
                    calls
                        .into_iter()
                        .map(|call| {
                            let channel = by_id.remove(&call.channel_id());
                            (call, Ok(channel))
                        })
                        .collect()
                }
                Err(e) => {
                    // Asked again at the next deadline or reconcile.
                    tracing::warn!(error = %e, "reconcile: Asterisk did not list its channels");
                    return self.count_ari_error(&e);
                }
            }
        } else {
            stream::iter(calls)
                .map(|call| async move {
                    shared.metrics.reconcile_requests.with_label_values(&["get"]).inc();
                    let channel = match ari.get_channel(&call.channel_id()).await {
                        Ok(channel) => Ok(Some(channel)),
                        Err(AriError::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e),
                    };
                    (call, channel)
                })
                .buffer_unordered(GET_CONCURRENCY)
                .collect()
                .await
        };
        for (call, channel) in found {
            let listening = self.is_connected() && !deaf.contains(&call.call_id);
            self.settle(call, channel, started, listening).await;
        }
    }

    /// Brings one active call in line with what Asterisk said of its channel.
    /// `listening`: every event of the channel from the check on reaches us.
    async fn settle(&self, call: Call, channel: Result<Option<Channel>, AriError>, asked: Instant, listening: bool) {
        let call_id = call.call_id;
        match channel {
            Ok(Some(channel)) => {
                self.take_over(&call);
                if listening {
                    self.shared.calls.with(call_id, |c| c.tracker.confirm_state());
                }
                // Answered and still waiting in our application: its StasisStart was missed
                // (or its follower stopped right after it), so the answer action is still due.
                let waiting_in_stasis = channel.state == ChannelState::Up
                    && channel.dialplan.as_ref().is_some_and(|d| d.app_name == "Stasis");
                let timestamp = String::new();
                let event = if waiting_in_stasis {
                    AriEvent::StasisStart { timestamp, args: Vec::new(), channel }
                } else {
                    AriEvent::ChannelStateChange { timestamp, channel }
                };
                self.on_event(event);
            }
            Ok(None) => {
                // Events heard since we asked: the call is being followed, its end told by them.
                let heard = self.shared.calls.with(call_id, |c| c.tracker.heard_since(asked) || c.tracker.is_ending());
                if heard == Some(true) {
                    return;
                }
                let cause = if call.status == CallStatus::Pending {
                    "not confirmed: ivr stopped before Asterisk accepted the originate"
                } else {
                    "reconciled: Asterisk no longer knows the channel"
                };
                let ended = Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Lost }, cause)
                    .for_attempt(call.attempt_number);
                if let Err(e) = self.write_or_apply(call_id, ended).await {
                    tracing::error!(%call_id, error = %e, "reconcile: could not record the end");
                }
            }
            Err(e) => {
                // Asked again at the call's next deadline (if followed here) or next reconcile.
                tracing::warn!(%call_id, error = %e, "reconcile: Asterisk did not answer");
                self.count_ari_error(&e);
            }
        }
    }

    /// Starts following a call this process did not place (found active after a restart).
    fn take_over(&self, call: &Call) {
        let answered_with_audio = call.status == CallStatus::Answered && call.spec.audio.is_some();
        let tracker = Tracker::adopted(
            call.attempt_number,
            answer_action(&call.spec),
            call.spec.ring_timeout(),
            answered_with_audio,
        );
        self.follow(call, tracker, None);
    }

    async fn note_startup_time(&self) {
        match self.shared.ari.asterisk_info().await {
            Ok(info) => {
                let startup = info.status.map(|s| s.startup_time);
                let mut known = self.shared.startup_time.lock().unwrap_or_else(|e| e.into_inner());
                if known.is_some() && *known != startup {
                    tracing::warn!("Asterisk restarted: every channel it had is gone");
                }
                *known = startup;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read Asterisk's startup time");
                self.count_ari_error(&e);
            }
        }
    }
}
