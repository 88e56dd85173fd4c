//! Sending a call's attempt to Asterisk: the originate and its retries, and the REST commands
//! its events call for (continue, play, hang up).
//!
//! An originate that met a connection-level failure (refused, reset, closed before the answer,
//! no answer in time) is sent again with the same channel id, where a 409 means the earlier
//! one was placed — but only once Asterisk says it has no such channel and no event of it came
//! (a channel that already ended would not answer 409: a resend would dial again). A call is
//! stored `failed` only when Asterisk said no.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::follow::{AnswerAction, Command};
use super::CallManager;
use crate::ari::{AriError, OriginateRequest, OriginateTarget};
use crate::call::{Call, CallId, FailureReason, Step, Transition};
use crate::error::{Error, Result};

/// How long our channel's end waits for its callee half's end, which carries the cause.
const SIBLING_WAIT: Duration = Duration::from_millis(250);

/// How long a channel's events may trail ARI's answer that it does not exist.
const EVENTS_SETTLE: Duration = Duration::from_millis(250);

/// Bounds of the pause between two sends of an originate that got no answer.
const RESEND_MIN: Duration = Duration::from_millis(100);
const RESEND_MAX: Duration = Duration::from_secs(5);

/// What became of an originate.
enum Sent {
    /// Asterisk took it; the channel's name, if it gave one.
    Placed(Option<String>),
    /// Asterisk said no.
    Refused(AriError),
    /// No answer from Asterisk within the retry window.
    Unanswered(AriError),
}

impl CallManager {
    /// Dials the call's current attempt and records the outcome; `reply` hears it, with the
    /// time spent waiting on ARI.
    pub(crate) async fn place(&self, call: Call, reply: Option<oneshot::Sender<(Result<Call>, Duration)>>) {
        let call_id = call.call_id;
        self.wait_for_shared_slot().await;
        let mut ari_time = Duration::ZERO;
        let result = self.try_place(call, &mut ari_time).await;
        match reply {
            Some(reply) => {
                let _ = reply.send((result, ari_time));
            }
            None => {
                if let Err(e) = result {
                    tracing::warn!(%call_id, error = %e, "the call could not be placed");
                }
            }
        }
    }

    /// Beside other instances, the calls-per-second limit holds for all of them together:
    /// each originate also takes a slot of the bucket they share in PostgreSQL. (This
    /// process's own bucket, in `pacing.rs`, keeps its queue in order.) If the database does
    /// not answer, the call goes on with this process's own pacing alone.
    async fn wait_for_shared_slot(&self) {
        let shared = &self.shared;
        let Some(instance) = shared.instance.as_ref().filter(|i| i.is_shared()) else { return };
        let cps = shared.settings.max_calls_per_second;
        if cps == 0 {
            return;
        }
        match instance.leases().take_slot(Duration::from_secs(1) / cps).await {
            Ok(wait) => tokio::time::sleep(wait).await,
            Err(e) => tracing::warn!(error = %e, "the shared calls-per-second bucket did not answer"),
        }
    }

    /// Adds the time spent waiting on ARI to `ari_time`.
    async fn try_place(&self, call: Call, ari_time: &mut Duration) -> Result<Call> {
        let shared = &self.shared;
        let call_id = call.call_id;
        let attempt = call.attempt_number;
        let channel_id = call.channel_id();
        // Recorded first: after a crash from here on, whether Asterisk took it is for Asterisk
        // to say, and the call is never dialled again.
        let sent =
            self.write_or_apply(call_id, Transition::new(Step::Sent, "sent to Asterisk").for_attempt(attempt)).await?;
        if !sent.is_active() || sent.attempt_number != attempt || sent.dialed_at.is_some() {
            return Ok(sent); // canceled, or moved on meanwhile
        }
        let listening = self.is_connected();
        self.shared.calls.with(call_id, |c| c.tracker.sending(listening));
        let mut variables = call.spec.variables.clone();
        variables.insert("IVR_CALL_ID".into(), call_id.to_string());
        variables.insert("IVR_ATTEMPT".into(), attempt.to_string());
        let request = OriginateRequest {
            endpoint: shared.settings.endpoint_template.replace("{number}", call.spec.phone_number.as_str()),
            channel_id: channel_id.clone(),
            target: OriginateTarget::App { app: shared.ari.config().app.clone(), app_args: None },
            caller_id: call.spec.caller_id.clone(),
            timeout_secs: Some(call.spec.timeout_secs),
            variables,
        };
        let started = Instant::now();
        let outcome = self.send_originate(call_id, &request, started + shared.settings.originate_retry_window).await;
        let waited = started.elapsed();
        *ari_time += waited;
        shared.metrics.originate_seconds.observe(waited.as_secs_f64());
        let canceled = || shared.calls.with(call_id, |c| c.tracker.is_canceled()).unwrap_or(true);
        let refused = match outcome {
            Sent::Placed(channel_name) => return self.placed(call_id, attempt, channel_name, canceled()).await,
            Sent::Refused(e) => e,
            Sent::Unanswered(e) => {
                // Placed or not, only Asterisk knows now.
                return match shared.ari.get_channel(&channel_id).await {
                    Ok(channel) => self.placed(call_id, attempt, Some(channel.name), canceled()).await,
                    Err(_) => {
                        let cause = format!("Asterisk could not be reached to place the call: {e}");
                        let lost = Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Lost }, &cause);
                        let call = self.write_or_apply(call_id, lost.for_attempt(attempt)).await?;
                        if call.history.last().is_some_and(|r| r.cause != cause) {
                            return Ok(call); // it ended meanwhile, by its own events or a cancel
                        }
                        shared.metrics.originations.with_label_values(&["lost"]).inc();
                        Err(Error::AsteriskUnreachable { call: Box::new(call), source: e })
                    }
                };
            }
        };
        shared.metrics.originations.with_label_values(&["failed"]).inc();
        tracing::warn!(%call_id, attempt, error = %refused, "originate refused");
        let failed = Transition::new(
            Step::Ended { reason_if_unanswered: FailureReason::OriginateFailed },
            format!("originate refused: {refused}"),
        )
        .for_attempt(attempt);
        let call = self.write_or_apply(call_id, failed).await?;
        Err(Error::OriginateFailed { call: Box::new(call), source: refused })
    }

    /// `POST /channels`, sent again while the connection fails, until `give_up`.
    async fn send_originate(&self, call_id: CallId, request: &OriginateRequest, give_up: Instant) -> Sent {
        let ari = &self.shared.ari;
        let mut pause = RESEND_MIN;
        let first_sent = Instant::now();
        // Whether a send so far may have reached Asterisk and been carried out.
        let mut maybe_placed = false;
        loop {
            self.shared.metrics.originate_requests.inc();
            match ari.originate(request).await {
                Ok(channel) => return Sent::Placed(Some(channel.name)),
                // Our own channel id already exists: an earlier send of this attempt was placed.
                Err(AriError::Conflict { .. }) => {
                    return Sent::Placed(ari.get_channel(&request.channel_id).await.ok().map(|c| c.name))
                }
                Err(e) if e.is_connection_failure() => {
                    self.count_ari_error(&e);
                    let canceled = self.shared.calls.with(call_id, |c| c.tracker.is_canceled()).unwrap_or(true);
                    if canceled || Instant::now() + pause > give_up {
                        return Sent::Unanswered(e);
                    }
                    maybe_placed |= matches!(e, AriError::Timeout(_) | AriError::Transport(_));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RESEND_MAX);
                    if maybe_placed {
                        if let Some(name) = self.placed_meanwhile(call_id, &request.channel_id, first_sent).await {
                            return Sent::Placed(name);
                        }
                    }
                    tracing::warn!(%call_id, error = %e, "originate unanswered; sending it again");
                }
                Err(e) => {
                    self.count_ari_error(&e);
                    return Sent::Refused(e);
                }
            }
        }
    }

    /// Whether an originate of `channel_id` sent at `sent` without an answer was carried out
    /// after all: `Some` (with the channel's name, if known) when Asterisk has the channel or
    /// events of it came, `None` when it looks never placed, so sending it again is safe.
    ///
    /// Sending it again blindly would be safe only while the channel lives (a 409 then says it
    /// was placed): a channel that already ended (a callee that rejects at once) has freed its
    /// id, and a resend would dial the callee again. Its events say it existed; they may trail
    /// the `GET`'s 404 a little, hence the wait.
    async fn placed_meanwhile(&self, call_id: CallId, channel_id: &str, sent: Instant) -> Option<Option<String>> {
        // A call no longer followed has ended (its events came, or a cancel): it was placed, or
        // is over; either way it must not be dialled again.
        let heard = || self.shared.calls.with(call_id, |c| c.tracker.heard_since(sent)).unwrap_or(true);
        if heard() {
            return Some(None);
        }
        match self.shared.ari.get_channel(channel_id).await {
            Ok(channel) => Some(Some(channel.name)),
            Err(AriError::NotFound { .. }) => {
                tokio::time::sleep(EVENTS_SETTLE).await;
                heard().then_some(None)
            }
            // No answer to that either: a resend is still safe from a live duplicate (409).
            Err(_) => None,
        }
    }

    async fn placed(
        &self,
        call_id: CallId,
        attempt: u32,
        channel_name: Option<String>,
        canceled: bool,
    ) -> Result<Call> {
        let shared = &self.shared;
        shared.metrics.originations.with_label_values(&["dialing"]).inc();
        shared.calls.with(call_id, |c| c.tracker.dialed());
        let mut dialing = Transition::new(Step::Dialing, "originate accepted").for_attempt(attempt);
        if let Some(name) = channel_name {
            dialing = dialing.channel(name);
        }
        let call = self.write_or_apply(call_id, dialing).await?;
        if canceled {
            // Canceled while the originate was in flight: do not leave it ringing.
            if let Err(e) = shared.ari.hangup(&call_id.channel_id(attempt)).await {
                if !matches!(e, AriError::NotFound { .. }) {
                    self.count_ari_error(&e);
                }
            }
        }
        tracing::info!(%call_id, attempt, status = %call.status, "originate accepted");
        Ok(call)
    }

    /// Makes the REST call an event asked for.
    pub(crate) async fn run_command(&self, call_id: CallId, attempt: u32, command: Command) {
        let ari = &self.shared.ari;
        let channel_id = &call_id.channel_id(attempt);
        let result = match &command {
            Command::FinishEnd => {
                tokio::time::sleep(SIBLING_WAIT).await;
                self.shared.calls.with(call_id, |c| {
                    if c.tracker.attempt() == attempt {
                        if let Some(end) = c.tracker.finish_pending_end() {
                            c.send(end);
                        }
                    }
                });
                return;
            }
            Command::OnAnswer(AnswerAction::Continue { context, extension, priority }) => {
                ari.continue_in_dialplan(channel_id, context, extension, *priority).await
            }
            Command::OnAnswer(AnswerAction::Play { media }) => ari.play(channel_id, media, None).await.map(drop),
            Command::HangUp => ari.hangup(channel_id).await,
        };
        match result {
            Ok(()) | Err(AriError::NotFound { .. }) => {} // gone already: its end is on the way
            Err(e) => {
                tracing::warn!(%call_id, ?command, error = %e, "ARI command failed");
                self.count_ari_error(&e);
            }
        }
    }
}
