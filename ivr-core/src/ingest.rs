//! The engine's event path without a store or ARI, for benchmarks (feature `testing`).
//!
//! [`EventIngest`] does what [`CallManager`](crate::CallManager)'s event loop does with one
//! WebSocket text: decode it into an [`AriEvent`], route it (parse the channel id into a call
//! id and attempt, one hash lookup among the live calls under the table's lock) and interpret
//! it with the call's tracker (the pure `manager/follow.rs` logic), yielding the transition the
//! manager would hand to the call's writer. Nothing is stored and no REST call is made; the
//! commands an event asks for (answer actions, hang-ups) are counted, not run.
//! `benches/event_ingest.rs` measures it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::ari::AriEvent;
use crate::call::{CallId, Transition};
use crate::manager::follow::{self, AnswerAction, Tracker};

/// Live calls and their trackers, fed one WebSocket text at a time.
pub struct EventIngest {
    live: Mutex<HashMap<CallId, Tracker>>,
}

/// What one text came to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Ingested {
    /// Not an ARI event (not a JSON object with a `type`).
    NotAnEvent,
    /// An event about no live call of ours (another channel, another attempt, or none).
    NotOurs,
    /// Interpreted for its call: the transition, if any, and whether a REST command was due.
    Interpreted { transition: Option<Transition>, command: bool },
}

impl EventIngest {
    /// Follows `calls`, each on its first attempt, dialled, with the default answer action
    /// (continue into `ivr-menu,s,1`) and a 30 s ring timeout.
    pub fn new(calls: impl IntoIterator<Item = CallId>) -> Self {
        let on_answer = AnswerAction::Continue { context: "ivr-menu".into(), extension: "s".into(), priority: 1 };
        let live = calls
            .into_iter()
            .map(|id| {
                let mut tracker = Tracker::new(1, on_answer.clone(), Duration::from_secs(30));
                tracker.dialed();
                (id, tracker)
            })
            .collect();
        EventIngest { live: Mutex::new(live) }
    }

    /// Decodes, routes and interprets one event socket text.
    pub fn ingest(&self, text: &str) -> Ingested {
        let Ok(event) = AriEvent::parse(text) else { return Ingested::NotAnEvent };
        let Some((call_id, attempt, half)) = follow::route(&event) else { return Ingested::NotOurs };
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tracker) = live.get_mut(&call_id).filter(|t| t.attempt() == attempt) else { return Ingested::NotOurs };
        let reaction = tracker.on_event(&event, half);
        Ingested::Interpreted { transition: reaction.transition, command: reaction.command.is_some() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Step;
    use crate::FailureReason;

    #[test]
    fn a_recorded_busy_call_ends_busy_and_other_channels_are_not_ours() {
        let id = CallId::new();
        let ingest = EventIngest::new([id]);
        let ch = id.channel_id(1);
        let channel = |id: &str, state: &str| serde_json::json!({"id": id, "name": "Local/+15550000002@sim-00000001;1", "state": state});
        let texts = [
            serde_json::json!({"type": "Dial", "timestamp": "", "dialstatus": "BUSY", "peer": channel(&ch, "Ringing")}),
            serde_json::json!({"type": "ChannelDestroyed", "timestamp": "", "cause": 0, "cause_txt": "Unknown", "channel": channel(&ch, "Ringing")}),
            serde_json::json!({"type": "ChannelDestroyed", "timestamp": "", "cause": 17, "cause_txt": "User busy", "channel": channel(&format!("{ch};2"), "Busy")}),
        ];
        let mut last = None;
        for text in &texts {
            if let Ingested::Interpreted { transition: Some(t), .. } = ingest.ingest(&text.to_string()) {
                last = Some(t);
            }
        }
        assert_eq!(last.expect("an end").step, Step::Ended { reason_if_unanswered: FailureReason::Busy });
        let other = serde_json::json!({"type": "ChannelDestroyed", "timestamp": "", "cause": 16, "channel": channel("PJSIP/x-1", "Up")});
        assert!(matches!(ingest.ingest(&other.to_string()), Ingested::NotOurs));
        assert!(matches!(ingest.ingest("not json"), Ingested::NotAnEvent));
    }
}
