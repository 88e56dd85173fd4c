//! What an ARI event means for one call: the transition it causes, and what we must do next.
//!
//! This is the knowledge the transcripts taught (see `ivr-core/tests/transcripts/README.md`):
//! - A Local endpoint gives two halves: `<id>` (ours) and `<id>;2` (the callee's dialplan).
//!   Only our half's ChannelDestroyed ends the call, but the informative hang-up cause is
//!   often on the other half (busy: ours says 0 "Unknown", `;2` says 17 "User busy").
//! - Busy and congestion over Local are told apart only by the Dial `dialstatus`.
//! - An originate timeout sends no final Dial event: only ChannelDestroyed with cause 19.
//! - A Local unknown extension sends no Dial event at all, then ChannelDestroyed(0).
//! - ChannelHangupRequest with `soft: true` carries a flag in `cause`, not a Q.850 code
//!   (32 = our DELETE, 16 = end of dialplan, 4 = Asterisk shutting down).
//! - PlaybackFinished `failed` means a missing sound, or that the channel hung up mid-playback;
//!   only a ChannelHangupRequest arriving first tells the second case.

use std::time::Duration;

use tokio::time::Instant;

use crate::ari::{AriEvent, ChannelState};
use crate::call::{FailureReason, Hangup, Step, Transition};

/// What the call does once answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AnswerAction {
    /// `continue` into the dialplan.
    Continue { context: String, extension: String, priority: u32 },
    /// `play` this media, then hang up when it finishes.
    Play { media: String },
}

/// A REST call the manager must make in reaction to an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Run the call's [`AnswerAction`].
    OnAnswer(AnswerAction),
    HangUp,
    /// Our channel is gone with cause 0 while its callee half, which usually says why
    /// (busy: 17), is still to be destroyed: end the call after a short wait for it.
    FinishEnd,
}

/// The outcome of one event for one call.
#[derive(Debug, Default)]
pub(crate) struct Reaction {
    pub transition: Option<Transition>,
    pub command: Option<Command>,
}

/// What we remember about a live call's current attempt between its events.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub attempt: u32,
    pub on_answer: AnswerAction,
    /// Seconds of ringing Asterisk allows (the originate timeout).
    pub ring_timeout: Duration,
    /// When the originate was accepted, for the no-answer deadline.
    pub dialed: Option<Instant>,
    /// When anything was last heard about the call, for the silence deadline.
    pub last_event: Instant,
    pub canceled: bool,
    pub answered: bool,
    pub answer_action_started: bool,
    rang: bool,
    dial_status: Option<String>,
    /// A Q.850 cause from a (not soft) ChannelHangupRequest of either half.
    requested_cause: Option<i32>,
    hangup_requested: bool,
    shutdown: bool,
    sibling_seen: bool,
    sibling_end: Option<Hangup>,
    /// Our channel's end, held back until the callee half's end gives its cause.
    pending_end: Option<(Hangup, String)>,
    /// Something worth keeping in the history with the end (a failed playback).
    note: Option<String>,
}

/// Which half of the originated channel an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// The channel we originated (`<id>`).
    Ours,
    /// A Local channel's callee half (`<id>;2`).
    Sibling,
}

impl Half {
    pub fn of(channel_id: &str) -> Half {
        if channel_id.ends_with(";2") {
            Half::Sibling
        } else {
            Half::Ours
        }
    }
}

impl Tracker {
    pub fn new(attempt: u32, on_answer: AnswerAction, ring_timeout: Duration) -> Self {
        Tracker {
            attempt,
            on_answer,
            ring_timeout,
            dialed: None,
            last_event: Instant::now(),
            canceled: false,
            answered: false,
            answer_action_started: false,
            rang: false,
            dial_status: None,
            requested_cause: None,
            hangup_requested: false,
            shutdown: false,
            sibling_seen: false,
            sibling_end: None,
            pending_end: None,
            note: None,
        }
    }

    /// Forgets the previous attempt's scratch when a retry starts.
    pub fn next_attempt(&mut self, attempt: u32) {
        *self = Tracker { canceled: self.canceled, ..Tracker::new(attempt, self.on_answer.clone(), self.ring_timeout) };
    }

    fn step(&self, step: Step, cause: impl Into<String>) -> Transition {
        Transition::new(step, cause).for_attempt(self.attempt)
    }

    /// Interprets one event about this call's current attempt.
    pub fn on_event(&mut self, event: &AriEvent, half: Half) -> Reaction {
        self.last_event = Instant::now();
        if half == Half::Sibling {
            self.sibling_seen = true;
        }
        let mut reaction = Reaction::default();
        match (event, half) {
            (AriEvent::ChannelStateChange { channel, .. }, Half::Ours) => match channel.state {
                ChannelState::Ringing | ChannelState::Ring => {
                    self.rang = true;
                    reaction.transition =
                        Some(self.step(Step::Ringing, "ChannelStateChange Ringing").channel(&channel.name));
                }
                ChannelState::Up => {
                    self.answered = true;
                    reaction.transition =
                        Some(self.step(Step::Answered, "ChannelStateChange Up").channel(&channel.name));
                }
                _ => {}
            },
            (AriEvent::Dial { dialstatus, peer, .. }, Half::Ours) => {
                self.dial_status = Some(dialstatus.clone());
                match dialstatus.as_str() {
                    "RINGING" => {
                        self.rang = true;
                        reaction.transition = Some(self.step(Step::Ringing, "Dial RINGING").channel(&peer.name));
                    }
                    "ANSWER" => {
                        self.answered = true;
                        reaction.transition = Some(self.step(Step::Answered, "Dial ANSWER").channel(&peer.name));
                    }
                    _ => {}
                }
            }
            (AriEvent::StasisStart { channel, .. }, Half::Ours) => {
                self.answered = true;
                reaction.transition = Some(self.step(Step::Answered, "StasisStart").channel(&channel.name));
                if !self.answer_action_started && !self.canceled {
                    self.answer_action_started = true;
                    reaction.command = Some(Command::OnAnswer(self.on_answer.clone()));
                }
            }
            (AriEvent::ChannelHangupRequest { cause, soft, .. }, _) => {
                self.hangup_requested = true;
                match (soft, cause) {
                    (Some(true), Some(4)) => self.shutdown = true,
                    (Some(true), _) => {}
                    (_, Some(cause)) if *cause != 0 => self.requested_cause = Some(*cause),
                    _ => {}
                }
            }
            (AriEvent::ChannelDestroyed { cause, cause_txt, .. }, Half::Sibling) => {
                self.sibling_end = Some(Hangup { code: clamp_cause(*cause), text: cause_txt.clone() });
                reaction.transition = self.finish_pending_end();
            }
            (AriEvent::ChannelDestroyed { cause, cause_txt, channel, .. }, Half::Ours) => {
                let own = Hangup { code: clamp_cause(*cause), text: cause_txt.clone() };
                if own.code == 0 && self.sibling_seen && self.sibling_end.is_none() {
                    // Recorded for busy: ours goes first with 0 "Unknown", the callee half
                    // follows within milliseconds with 17 "User busy".
                    self.pending_end = Some((own, channel.name.clone()));
                    reaction.command = Some(Command::FinishEnd);
                } else {
                    reaction.transition = Some(self.end(own, &channel.name));
                }
            }
            (AriEvent::PlaybackFinished { playback, .. }, _) => {
                if playback.state == "failed" && !self.hangup_requested {
                    // Nobody hung up, so the media itself failed (e.g. no such sound). The
                    // call has nothing more to do: end it, keeping the failure in its history.
                    self.note = Some(format!("playback of {} failed", playback.media_uri));
                    reaction.command = Some(Command::HangUp);
                } else if playback.state == "done" {
                    reaction.command = Some(Command::HangUp);
                }
            }
            _ => {}
        }
        reaction
    }

    /// The end held back by [`Command::FinishEnd`], if it is still waiting.
    pub fn finish_pending_end(&mut self) -> Option<Transition> {
        let (own, channel) = self.pending_end.take()?;
        Some(self.end(own, &channel))
    }

    fn end(&self, own: Hangup, channel: &str) -> Transition {
        let reason = self.unanswered_reason(i32::from(own.code));
        let mut cause = format!("ChannelDestroyed {} {}", own.code, own.text);
        let hangup = self.recorded_hangup(own.clone());
        if hangup != own {
            cause = format!("{cause} (callee half: {} {})", hangup.code, hangup.text);
        }
        if let Some(note) = &self.note {
            cause = format!("{cause}; {note}");
        }
        self.step(Step::Ended { reason_if_unanswered: reason }, cause).channel(channel).hangup(hangup)
    }

    /// Why an unanswered call ended, from everything its events said.
    fn unanswered_reason(&self, own_cause: i32) -> FailureReason {
        if self.canceled {
            return FailureReason::Canceled;
        }
        match self.dial_status.as_deref() {
            Some("BUSY") => return FailureReason::Busy,
            Some("CONGESTION") => return FailureReason::Congestion,
            _ => {}
        }
        let sibling = self.sibling_end.as_ref().map(|h| i32::from(h.code));
        let cause = [Some(own_cause), sibling, self.requested_cause].into_iter().flatten().find(|c| *c != 0);
        match cause {
            Some(17) => FailureReason::Busy,
            Some(34 | 38 | 41 | 42 | 44 | 47) => FailureReason::Congestion,
            Some(18 | 19) => FailureReason::NoAnswer,
            Some(21) => FailureReason::Rejected,
            Some(1 | 2 | 3 | 22 | 27 | 28) => FailureReason::Unreachable,
            _ if self.shutdown => FailureReason::Lost,
            _ if self.dial_status.as_deref() == Some("NOANSWER") || self.rang => FailureReason::NoAnswer,
            // No Dial event at all (a Local unknown extension), or a channel that never got
            // anywhere: the number could not be reached.
            _ => FailureReason::Unreachable,
        }
    }

    /// The cause to keep: ours when it says something, else the callee half's.
    fn recorded_hangup(&self, own: Hangup) -> Hangup {
        match &self.sibling_end {
            Some(sibling) if own.code == 0 && sibling.code != 0 => sibling.clone(),
            _ => own,
        }
    }
}

fn clamp_cause(cause: i32) -> u16 {
    u16::try_from(cause).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ari::{Channel, Playback};

    fn channel(id: &str, state: ChannelState) -> Channel {
        serde_json::from_value(serde_json::json!({"id": id, "name": format!("Local/x@sim-1{}", if id.ends_with(";2") {";2"} else {";1"}), "state": state})).unwrap()
    }

    fn tracker() -> Tracker {
        Tracker::new(1, AnswerAction::Play { media: "sound:x".into() }, Duration::from_secs(30))
    }

    fn destroyed(id: &str, cause: i32, text: &str) -> AriEvent {
        AriEvent::ChannelDestroyed {
            timestamp: String::new(),
            cause,
            cause_txt: text.into(),
            tech_cause: None,
            channel: channel(id, ChannelState::Ringing),
        }
    }

    fn dial(status: &str) -> AriEvent {
        AriEvent::Dial {
            timestamp: String::new(),
            dialstatus: status.into(),
            dialstring: None,
            forward: None,
            peer: channel("a", ChannelState::Ringing),
            caller: None,
        }
    }

    fn end_of(t: &mut Tracker, events: &[(AriEvent, Half)]) -> Transition {
        let mut last = None;
        for (event, half) in events {
            if let Some(tr) = t.on_event(event, *half).transition {
                last = Some(tr);
            }
        }
        last.expect("a transition")
    }

    fn reason(t: &Transition) -> FailureReason {
        match t.step {
            Step::Ended { reason_if_unanswered } => reason_if_unanswered,
            other => panic!("not an end: {other:?}"),
        }
    }

    #[test]
    fn local_busy_takes_the_reason_from_dial_and_the_cause_from_the_callee_half() {
        let mut t = tracker();
        let end = end_of(
            &mut t,
            &[
                (dial("RINGING"), Half::Ours),
                (dial("BUSY"), Half::Ours),
                (destroyed("a;2", 17, "User busy"), Half::Sibling),
                (destroyed("a", 0, "Unknown"), Half::Ours),
            ],
        );
        assert_eq!(reason(&end), FailureReason::Busy);
        assert_eq!(end.hangup, Some(Hangup { code: 17, text: "User busy".into() }));
    }

    #[test]
    fn local_busy_in_recorded_order_waits_for_the_callee_halfs_cause() {
        let mut t = tracker();
        t.on_event(&dial("BUSY"), Half::Ours);
        let hangup_request = AriEvent::ChannelHangupRequest {
            timestamp: String::new(),
            cause: Some(0),
            soft: None,
            tech_cause: None,
            channel: channel("a;2", ChannelState::Busy),
        };
        t.on_event(&hangup_request, Half::Sibling);
        let held = t.on_event(&destroyed("a", 0, "Unknown"), Half::Ours);
        assert!(held.transition.is_none());
        assert_eq!(held.command, Some(Command::FinishEnd));
        let end = t.on_event(&destroyed("a;2", 17, "User busy"), Half::Sibling).transition.expect("the end");
        assert_eq!(reason(&end), FailureReason::Busy);
        assert_eq!(end.hangup, Some(Hangup { code: 17, text: "User busy".into() }));
        assert!(t.finish_pending_end().is_none(), "ended once");
    }

    #[test]
    fn reasons_for_the_recorded_endings() {
        let cases: Vec<(Vec<(AriEvent, Half)>, FailureReason)> = vec![
            (
                vec![(dial("CONGESTION"), Half::Ours), (destroyed("a", 0, "Unknown"), Half::Ours)],
                FailureReason::Congestion,
            ),
            (
                vec![(dial("RINGING"), Half::Ours), (destroyed("a", 19, "User alerting, no answer"), Half::Ours)],
                FailureReason::NoAnswer,
            ),
            (
                vec![(dial(""), Half::Ours), (destroyed("a", 19, "User alerting, no answer"), Half::Ours)],
                FailureReason::NoAnswer,
            ),
            (
                vec![
                    (dial(""), Half::Ours),
                    (dial("NOANSWER"), Half::Ours),
                    (destroyed("a", 21, "Call Rejected"), Half::Ours),
                ],
                FailureReason::Rejected,
            ),
            (
                vec![(destroyed("a;2", 0, "Unknown"), Half::Sibling), (destroyed("a", 0, "Unknown"), Half::Ours)],
                FailureReason::Unreachable,
            ),
            (vec![(dial("BUSY"), Half::Ours), (destroyed("a", 17, "User busy"), Half::Ours)], FailureReason::Busy),
        ];
        for (events, want) in cases {
            let mut t = tracker();
            assert_eq!(reason(&end_of(&mut t, &events)), want, "{events:?}");
        }
        let mut t = tracker();
        t.canceled = true;
        let end =
            end_of(&mut t, &[(dial("NOANSWER"), Half::Ours), (destroyed("a", 16, "Normal Clearing"), Half::Ours)]);
        assert_eq!(reason(&end), FailureReason::Canceled);
    }

    #[test]
    fn stasis_start_answers_and_asks_for_the_answer_action_once() {
        let mut t = tracker();
        let start =
            AriEvent::StasisStart { timestamp: String::new(), args: vec![], channel: channel("a", ChannelState::Up) };
        let first = t.on_event(&start, Half::Ours);
        assert_eq!(first.transition.unwrap().step, Step::Answered);
        assert_eq!(first.command, Some(Command::OnAnswer(AnswerAction::Play { media: "sound:x".into() })));
        assert_eq!(t.on_event(&start, Half::Ours).command, None);
    }

    #[test]
    fn a_failed_playback_hangs_up_only_when_nobody_hung_up_first() {
        let finished = AriEvent::PlaybackFinished {
            timestamp: String::new(),
            playback: Playback {
                id: "p".into(),
                media_uri: "sound:nope".into(),
                target_uri: "channel:a".into(),
                language: "en".into(),
                state: "failed".into(),
            },
        };
        let mut t = tracker();
        assert_eq!(t.on_event(&finished, Half::Ours).command, Some(Command::HangUp));
        let end = end_of(&mut t, &[(destroyed("a", 16, "Normal Clearing"), Half::Ours)]);
        assert!(end.cause.contains("playback of sound:nope failed"), "{}", end.cause);

        let mut t = tracker();
        let hangup = AriEvent::ChannelHangupRequest {
            timestamp: String::new(),
            cause: Some(16),
            soft: None,
            tech_cause: None,
            channel: channel("a", ChannelState::Up),
        };
        t.on_event(&hangup, Half::Ours);
        assert_eq!(t.on_event(&finished, Half::Ours).command, None, "the callee hung up; the end follows by itself");
    }
}
