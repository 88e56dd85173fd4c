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
//!
//! An outcome names only what was observed. A reason is given when an event says it (a Dial
//! status, a Q.850 cause with a meaning); "unreachable" is concluded from the *absence* of any
//! Dial event, which is evidence only when no event can have been missed. After a gap (the
//! event socket dropped, or the call was taken over after a restart) a call that no event
//! explains ends `lost`: an answer may have been among the missed events.

use std::time::Duration;

use tokio::time::Instant;

use crate::ari::{AriEvent, ChannelState};
use crate::call::{CallId, FailureReason, Hangup, Step, Transition};

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

/// What we remember about a live call's current attempt between its events. Its state changes
/// only through its methods.
#[derive(Debug)]
pub(crate) struct Tracker {
    attempt: u32,
    on_answer: AnswerAction,
    /// Seconds of ringing Asterisk allows (the originate timeout).
    ring_timeout: Duration,
    /// When the originate was accepted (or the call last checked), for the no-answer deadline.
    dialed: Option<Instant>,
    /// When anything was last heard about the call (or it was last checked), for the silence
    /// deadline.
    last_event: Instant,
    /// When an event of Asterisk's was last heard (a check does not count).
    last_heard: Option<Instant>,
    canceled: bool,
    answered: bool,
    answer_action_started: bool,
    /// The originate of this attempt was sent: from here on its events may come.
    sent: bool,
    /// Events of this attempt may have been missed (a socket drop, a take-over).
    gap: bool,
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
    /// Whether any Dial event of our channel was seen.
    dial_seen: bool,
    /// Asterisk told the channel's state while every later event of it reaches us: whether
    /// it was answered cannot have been missed, gap or not (see [`Tracker::confirm_state`]).
    answer_known: bool,
    /// Found active, not placed by this tracker's process (a restart, a take-over).
    adopted: bool,
    /// A check for a StasisStart that went elsewhere was asked (see
    /// [`Tracker::wants_stasis_check`]).
    stasis_check_asked: bool,
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

/// The event types the engine asks Asterisk for (`PUT /applications/{app}/eventFilter` after
/// every connect): those a call's tracker reacts to, StasisEnd and PlaybackStarted (rare, and
/// they keep an answered call's silence honest), and ApplicationReplaced (the event stream
/// needs it; Asterisk filters it like any other). The rest of an application's traffic
/// (ChannelDialplan, ChannelVarset, ChannelCallerId, …: about 40% of the recorded calls'
/// events) was decoded only to be dropped. The filter is a saving, never a premise: a tracker
/// hearing every event reacts to every recording as one hearing only these (a test replays
/// them all), so an Asterisk without the resource (before 16.3) changes nothing but the work.
pub const FOLLOWED_EVENTS: &[&str] = &[
    "StasisStart",
    "StasisEnd",
    "ChannelStateChange",
    "Dial",
    "ChannelHangupRequest",
    "ChannelDestroyed",
    "PlaybackStarted",
    "PlaybackFinished",
    "ApplicationReplaced",
];

/// Where an event goes: the call and attempt its channel id names, and which half it is.
/// `None` for an event about no channel of ours. (The event loop and `crate::ingest` route by
/// this one rule.)
pub fn route(event: &AriEvent) -> Option<(CallId, u32, Half)> {
    let channel_id = event.channel_id()?;
    let (call_id, attempt) = CallId::parse_channel_id(channel_id)?;
    Some((call_id, attempt, Half::of(channel_id)))
}

impl Tracker {
    /// A call this process follows from its first attempt.
    pub fn new(attempt: u32, on_answer: AnswerAction, ring_timeout: Duration) -> Self {
        Tracker {
            attempt,
            on_answer,
            ring_timeout,
            dialed: None,
            last_event: Instant::now(),
            last_heard: None,
            canceled: false,
            answered: false,
            answer_action_started: false,
            sent: false,
            gap: false,
            rang: false,
            dial_status: None,
            requested_cause: None,
            hangup_requested: false,
            shutdown: false,
            sibling_seen: false,
            sibling_end: None,
            pending_end: None,
            note: None,
            dial_seen: false,
            answer_known: false,
            adopted: false,
            stasis_check_asked: false,
        }
    }

    /// A call found active that this process did not follow until now: its earlier events were
    /// not seen. A channel still in Stasis has not been continued into the dialplan, so that
    /// action is always safe to (re)send; a playback keeps the channel in Stasis, so for an
    /// answered call with audio the playback is taken as started rather than played twice.
    pub fn adopted(attempt: u32, on_answer: AnswerAction, ring_timeout: Duration, answered_with_audio: bool) -> Self {
        let mut tracker = Tracker::new(attempt, on_answer, ring_timeout);
        tracker.sent = true;
        tracker.gap = true;
        tracker.dialed = Some(Instant::now());
        tracker.answer_action_started = answered_with_audio;
        tracker.adopted = true;
        tracker
    }

    /// Forgets the previous attempt's scratch when a retry starts.
    pub fn next_attempt(&mut self, attempt: u32) {
        *self = Tracker { canceled: self.canceled, ..Tracker::new(attempt, self.on_answer.clone(), self.ring_timeout) };
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled
    }

    /// We hang the call up: an unanswered end is a cancel, and no answer action is started.
    /// Asterisk has just told the channel's state (a reconcile's `GET`), and every event of the
    /// channel from then on reaches us (our socket is up and the channel is ours, or
    /// subscribed to our application). An answer before it shows in that state, one after it
    /// comes as an event, so a cancel of a call not answered is a cancel even after a gap.
    pub fn confirm_state(&mut self) {
        self.answer_known = true;
    }

    /// Whether Asterisk should be asked about the channel now, once: an adopted call was
    /// answered and its answer action has not run. Its StasisStart goes to the application it
    /// was placed into, which may be another instance's (gone), so it may never reach us; a
    /// check that finds it waiting in Stasis stands in for it (`reconcile.rs`).
    pub fn wants_stasis_check(&mut self) -> bool {
        let due = self.adopted && self.answered && !self.answer_action_started && !self.canceled;
        if !due || self.stasis_check_asked {
            return false;
        }
        self.stasis_check_asked = true;
        true
    }

    pub fn cancel(&mut self) {
        self.canceled = true;
    }

    /// Asterisk accepted the originate now: the no-answer deadline runs from here.
    pub fn dialed(&mut self) {
        self.dialed = Some(Instant::now());
    }

    /// The originate is about to be sent. If the event socket is down (`listening` false),
    /// the first events may be missed.
    pub fn sending(&mut self, listening: bool) {
        self.sent = true;
        self.gap |= !listening;
    }

    /// Events may have been missed (the socket dropped): this matters only for an attempt
    /// already sent; one still queued has no events yet.
    pub fn note_gap(&mut self) {
        self.gap |= self.sent;
        self.answer_known = false;
    }

    /// Whether an event of Asterisk's about this attempt was heard at or after `since`.
    pub fn heard_since(&self, since: Instant) -> bool {
        self.last_heard.is_some_and(|t| t >= since)
    }

    /// Whether an end is held back for the callee half's cause (it is on its way).
    pub fn is_ending(&self) -> bool {
        self.pending_end.is_some()
    }

    /// Whether Asterisk should be asked about the call at `now`: past its ring timeout and
    /// `ring_grace` unanswered, or `answered_silence` without an event once answered. A call
    /// found overdue is taken as checked: the next check waits a whole period again.
    pub fn check_due(&mut self, now: Instant, ring_grace: Duration, answered_silence: Duration) -> bool {
        let deadline = if self.answered {
            self.last_event + answered_silence
        } else {
            match self.dialed {
                Some(dialed) => dialed + self.ring_timeout + ring_grace,
                None => return false,
            }
        };
        if now < deadline {
            return false;
        }
        self.last_event = now;
        self.dialed = Some(now);
        true
    }

    fn step(&self, step: Step, cause: impl Into<String>) -> Transition {
        Transition::new(step, cause).for_attempt(self.attempt)
    }

    /// Interprets one event about this call's current attempt.
    pub fn on_event(&mut self, event: &AriEvent, half: Half) -> Reaction {
        self.last_event = Instant::now();
        self.last_heard = Some(self.last_event);
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
                self.dial_seen = true;
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

    /// Why an unanswered call ended, from what its events said, and only that.
    fn unanswered_reason(&self, own_cause: i32) -> FailureReason {
        if self.canceled {
            // Our DELETE ends a ringing call and an answered one alike (cause 16): after a gap
            // the answer may have been missed, so only without one is it a cancel.
            return if self.gap && !self.answer_known { FailureReason::Lost } else { FailureReason::Canceled };
        }
        match self.dial_status.as_deref() {
            Some("BUSY") => return FailureReason::Busy,
            Some("CONGESTION") => return FailureReason::Congestion,
            _ => {}
        }
        let sibling = self.sibling_end.as_ref().map(|h| i32::from(h.code));
        // The first cause that means something: 0 says nothing, and 16 "Normal Clearing"
        // ends answered calls as well as canceled ones, so it tells no reason either.
        let meant = [Some(own_cause), sibling, self.requested_cause].into_iter().flatten().find_map(|c| match c {
            17 => Some(FailureReason::Busy),
            34 | 38 | 41 | 42 | 44 | 47 => Some(FailureReason::Congestion),
            18 | 19 => Some(FailureReason::NoAnswer),
            21 => Some(FailureReason::Rejected),
            1 | 2 | 3 | 22 | 27 | 28 => Some(FailureReason::Unreachable),
            _ => None,
        });
        if let Some(reason) = meant {
            return reason;
        }
        if self.shutdown {
            return FailureReason::Lost;
        }
        if self.dial_status.as_deref() == Some("NOANSWER") {
            return FailureReason::NoAnswer;
        }
        // Recorded for a Local unknown extension: no Dial event at all, both halves end with
        // cause 0. The absence of events is evidence only if none can have been missed.
        let silent_end = own_cause == 0 && sibling.unwrap_or(0) == 0 && !self.dial_seen && !self.rang;
        if silent_end && !self.gap {
            return FailureReason::Unreachable;
        }
        FailureReason::Lost
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
        t.cancel();
        let end =
            end_of(&mut t, &[(dial("NOANSWER"), Half::Ours), (destroyed("a", 16, "Normal Clearing"), Half::Ours)]);
        assert_eq!(reason(&end), FailureReason::Canceled);
    }

    /// A call taken over (or heard again after a socket drop) and then canceled: a cancel only
    /// once Asterisk told its state while its later events reach us, else `lost`.
    #[test]
    fn a_cancel_after_a_gap_is_a_cancel_once_the_state_was_confirmed() {
        let ended = [(destroyed("a", 16, "Normal Clearing"), Half::Ours)];
        let adopted = || {
            let mut t =
                Tracker::adopted(1, AnswerAction::Play { media: "sound:x".into() }, Duration::from_secs(30), false);
            t.on_event(
                &AriEvent::ChannelStateChange {
                    timestamp: String::new(),
                    channel: channel("a", ChannelState::Ringing),
                },
                Half::Ours,
            );
            t
        };
        let mut unconfirmed = adopted();
        unconfirmed.cancel();
        assert_eq!(reason(&end_of(&mut unconfirmed, &ended)), FailureReason::Lost, "the answer may have been missed");
        let mut confirmed = adopted();
        confirmed.confirm_state();
        confirmed.cancel();
        assert_eq!(reason(&end_of(&mut confirmed, &ended)), FailureReason::Canceled);
        let mut dropped_since = adopted();
        dropped_since.confirm_state();
        dropped_since.note_gap();
        dropped_since.cancel();
        assert_eq!(reason(&end_of(&mut dropped_since, &ended)), FailureReason::Lost, "a later gap undoes it");
    }

    /// An adopted call answered without a StasisStart (it went to the application it was
    /// placed into): Asterisk is asked once; a call placed here, or one whose action ran, never.
    #[test]
    fn an_adopted_call_answered_elsewhere_asks_for_one_stasis_check() {
        let up = AriEvent::ChannelStateChange { timestamp: String::new(), channel: channel("a", ChannelState::Up) };
        let action = AnswerAction::Continue { context: "ivr-menu".into(), extension: "s".into(), priority: 1 };
        let mut adopted = Tracker::adopted(1, action.clone(), Duration::from_secs(30), false);
        assert!(!adopted.wants_stasis_check(), "not answered yet");
        adopted.on_event(&up, Half::Ours);
        assert!(adopted.wants_stasis_check());
        assert!(!adopted.wants_stasis_check(), "once");
        let mut ours = tracker();
        ours.on_event(&up, Half::Ours);
        assert!(!ours.wants_stasis_check(), "our own StasisStart comes to us");
        let mut played = Tracker::adopted(1, action, Duration::from_secs(30), true);
        played.on_event(&up, Half::Ours);
        assert!(!played.wants_stasis_check(), "its action ran already");
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

    /// How a call ended: its status and failure reason.
    type Outcome = (crate::CallStatus, Option<FailureReason>);

    /// The events of one recorded scenario about its originated channel (both halves).
    fn recorded(name: &str) -> Vec<(AriEvent, Half)> {
        // Cargo sets the package's directory when it runs the tests; the one compiled in is
        // the fallback for a test binary run by hand.
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
        let path = format!("{dir}/tests/transcripts/{name}.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("the recording {path}: {e}"));
        let mut id = None;
        let mut events = Vec::new();
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            match record["kind"].as_str() {
                Some("meta") => id = record["channel_id"].as_str().map(str::to_owned),
                Some("ws") => {
                    let event = AriEvent::parse(&record["event"].to_string()).expect("an ARI event");
                    let Some(channel) = event.channel_id() else { continue };
                    if channel.split(';').next() == id.as_deref() {
                        let half = Half::of(channel);
                        events.push((event, half));
                    }
                }
                _ => {}
            }
        }
        assert!(!events.is_empty(), "{name}: no events of its channel");
        events
    }

    /// A tracker of a call whose originate went out (and which ivr canceled, if `canceled`).
    fn following(canceled: bool) -> Tracker {
        let mut t = tracker();
        t.sending(true);
        if canceled {
            t.cancel();
        }
        t
    }

    /// How a call ends when its tracker hears `events`, with those in `missed` lost to a gap
    /// (the socket dropped before the first of them and came back after the last). `None`
    /// when no end was heard (a reconcile settles it).
    fn outcome(events: &[(AriEvent, Half)], missed: std::ops::Range<usize>, canceled: bool) -> Option<Outcome> {
        use crate::call::{now, Call, CallId};
        let mut call = Call::new(CallId::new(), crate::store::conformance::new_call("+15550000001"), now());
        call.apply(&Transition::new(Step::Sent, "sent")).unwrap();
        call.apply(&Transition::new(Step::Dialing, "originate accepted")).unwrap();
        let mut t = following(canceled);
        for (i, (event, half)) in events.iter().enumerate() {
            if missed.contains(&i) {
                if i == missed.start {
                    t.note_gap();
                }
                continue;
            }
            if let Some(transition) = t.on_event(event, *half).transition {
                let _ = call.apply(&transition);
            }
        }
        // A held-back end is finished after a short wait (Command::FinishEnd).
        if let Some(end) = t.finish_pending_end() {
            let _ = call.apply(&end);
        }
        call.is_completed().then_some((call.status, call.failure_reason))
    }

    /// Every recorded ending: the recording, whether ivr canceled the call, and how it ended.
    fn endings() -> [(&'static str, bool, Outcome); 19] {
        use crate::CallStatus::{Completed, Failed};
        [
            ("answered_app", false, (Completed, None)),
            ("short_call", false, (Completed, None)),
            ("busy", false, (Failed, Some(FailureReason::Busy))),
            ("congestion", false, (Failed, Some(FailureReason::Congestion))),
            ("no_answer", false, (Failed, Some(FailureReason::NoAnswer))),
            ("rejected", false, (Failed, Some(FailureReason::Rejected))),
            ("unknown_number", false, (Failed, Some(FailureReason::Unreachable))),
            ("hangup_while_ringing", true, (Failed, Some(FailureReason::Canceled))),
            ("hangup_answered", true, (Completed, None)),
            ("answered_play", false, (Completed, None)),
            ("answered_play_short", false, (Completed, None)),
            ("play_missing_sound", false, (Completed, None)),
            ("asterisk_restart", false, (Completed, None)),
            ("answered_pjsip", false, (Completed, None)),
            ("busy_pjsip", false, (Failed, Some(FailureReason::Busy))),
            ("rejected_pjsip", false, (Failed, Some(FailureReason::Rejected))),
            ("no_answer_pjsip", false, (Failed, Some(FailureReason::NoAnswer))),
            ("callee_down_pjsip", false, (Failed, Some(FailureReason::NoAnswer))),
            ("answered_play_pjsip", false, (Completed, None)),
        ]
    }

    /// Asserts that `events` heard whole end as `truth`, and with any run of them missed end
    /// the same or `lost`, never another reason. Returns how many gaps it tried.
    fn ends_true_or_lost(name: &str, events: &[(AriEvent, Half)], canceled: bool, truth: Outcome) -> usize {
        let lost = (crate::CallStatus::Failed, Some(FailureReason::Lost));
        assert_eq!(outcome(events, 0..0, canceled), Some(truth), "{name}, heard whole");
        let mut gaps = 0;
        for from in 0..events.len() {
            for to in from + 1..=events.len() {
                gaps += 1;
                let got = outcome(events, from..to, canceled);
                assert!(
                    got.is_none() || got == Some(truth) || got == Some(lost),
                    "{name} missing events {from}..{to}: {got:?}, but it was {truth:?}"
                );
            }
        }
        gaps
    }

    /// Every recorded ending, heard whole, gives its true outcome; with any run of its events
    /// missed, it gives that same outcome or `lost`, never another reason.
    #[test]
    fn every_gap_the_recordings_allow_ends_true_or_lost() {
        let gaps: usize = endings()
            .into_iter()
            .map(|(name, canceled, truth)| ends_true_or_lost(name, &recorded(name), canceled, truth))
            .sum();
        assert!(gaps > 2_000, "{gaps} gaps tried");
    }

    /// What a tracker makes of `events`, event by event: each transition (but its time) and
    /// each command, then the held-back end if one is left.
    fn reactions(events: &[(AriEvent, Half)], canceled: bool) -> Vec<String> {
        let mut t = following(canceled);
        let show = |tr: &Transition| format!("{:?} {} {:?} {:?}", tr.step, tr.cause, tr.channel, tr.hangup);
        let mut seen = Vec::new();
        for (event, half) in events {
            let reaction = t.on_event(event, *half);
            seen.extend(reaction.transition.as_ref().map(show));
            seen.extend(reaction.command.map(|c| format!("{c:?}")));
        }
        seen.extend(t.finish_pending_end().as_ref().map(show));
        seen
    }

    /// The event filter's premise: a tracker hearing only `FOLLOWED_EVENTS` reacts to every
    /// recording exactly as one hearing everything (the same transitions, causes, channels,
    /// hang-ups and commands, in order), and every gap among those events still ends true or
    /// `lost`. Each recording loses events to the filter (about half of them in all).
    #[test]
    fn the_followed_events_tell_what_all_of_them_tell() {
        let (mut all, mut followed) = (0, 0);
        for (name, canceled, truth) in endings() {
            let events = recorded(name);
            let kept: Vec<(AriEvent, Half)> =
                events.iter().filter(|(e, _)| FOLLOWED_EVENTS.contains(&e.kind())).cloned().collect();
            (all, followed) = (all + events.len(), followed + kept.len());
            assert_eq!(reactions(&kept, canceled), reactions(&events, canceled), "{name}");
            ends_true_or_lost(name, &kept, canceled, truth);
        }
        assert!(followed * 10 < all * 7, "{followed} of {all} events followed: the filter would save little");
    }

    /// The ending of the load reports: an answered call whose answer was missed ends with
    /// 16 "Normal Clearing". That is no failure to reach anyone: it is `lost`.
    #[test]
    fn a_missed_answer_is_lost_not_unreachable() {
        let events = recorded("short_call");
        let answer_events: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, (e, h))| {
                *h == Half::Ours
                    && matches!(
                        e,
                        AriEvent::ChannelStateChange { .. } | AriEvent::Dial { .. } | AriEvent::StasisStart { .. }
                    )
            })
            .map(|(i, _)| i)
            .collect();
        let (first, last) = (answer_events[0], *answer_events.last().unwrap());
        assert_eq!(
            outcome(&events, first..last + 1, false),
            Some((crate::CallStatus::Failed, Some(FailureReason::Lost)))
        );
    }
}
