//! An application's event type filter: `PUT /applications/{app}/eventFilter`.
//!
//! Not in the recordings (they show only the empty `events_allowed` and `events_disallowed` of
//! every `Application`); built from ARI's documentation of the resource and Asterisk's
//! `stasis_app_event_filter_set` / `stasis_app_event_allowed`, which every message to an
//! application's socket passes through (`ApplicationReplaced` included):
//!
//! - an empty body sets both lists empty; a body naming one list sets that one and leaves the
//!   other; a list that is not an array is 400 `Invalid format definition`;
//! - an empty `allowed` list allows every type, an empty `disallowed` list refuses none;
//! - a type in `disallowed` is refused even when `allowed` names it too.
//!
//! Each list holds objects with a `type` (compared case-sensitively), kept as given: the
//! application's JSON shows them back.

use serde_json::Value;

use super::channels::ApiError;

#[derive(Debug, Default)]
pub(crate) struct EventFilter {
    allowed: Vec<Value>,
    disallowed: Vec<Value>,
}

impl EventFilter {
    /// Sets the lists from a request body (`None`: the body was empty).
    pub fn set(&mut self, body: Option<&Value>) -> Result<(), ApiError> {
        let Some(body) = body else {
            *self = EventFilter::default();
            return Ok(());
        };
        let list = |key: &str| match body.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.clone())),
            Some(_) => Err(ApiError::msg(400, "Invalid format definition")),
        };
        let (allowed, disallowed) = (list("allowed")?, list("disallowed")?);
        if let Some(allowed) = allowed {
            self.allowed = allowed;
        }
        if let Some(disallowed) = disallowed {
            self.disallowed = disallowed;
        }
        Ok(())
    }

    /// Whether an event of type `kind` goes to the application's socket.
    pub fn allows(&self, kind: &str) -> bool {
        let names = |list: &[Value]| list.iter().any(|f| f.get("type").and_then(Value::as_str) == Some(kind));
        !names(&self.disallowed) && (self.allowed.is_empty() || names(&self.allowed))
    }

    pub fn allowed(&self) -> &[Value] {
        &self.allowed
    }

    pub fn disallowed(&self) -> &[Value] {
        &self.disallowed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lists_follow_the_documented_rules() {
        let mut f = EventFilter::default();
        assert!(f.allows("ChannelDialplan"), "no filter: everything");

        f.set(Some(&json!({"allowed": [{"type": "StasisStart"}, {"type": "Dial"}]}))).unwrap();
        assert!(f.allows("StasisStart") && f.allows("Dial"));
        assert!(!f.allows("ChannelDialplan") && !f.allows("stasisstart"), "case-sensitive");

        // One list given: the other stays.
        f.set(Some(&json!({"disallowed": [{"type": "Dial"}]}))).unwrap();
        assert!(f.allows("StasisStart") && !f.allows("Dial"), "disallowed wins over allowed");
        assert_eq!(f.allowed().len(), 2);

        // An empty allowed list allows every type (but the disallowed one).
        f.set(Some(&json!({"allowed": []}))).unwrap();
        assert!(f.allows("ChannelVarset") && !f.allows("Dial"));

        // Not an array: refused, nothing changed.
        let e = f.set(Some(&json!({"allowed": {"type": "Dial"}}))).unwrap_err();
        assert_eq!((e.status, e.body["message"].as_str()), (400, Some("Invalid format definition")));
        assert!(!f.allows("Dial"));

        // An empty body clears both.
        f.set(None).unwrap();
        assert!(f.allows("Dial") && f.allowed().is_empty() && f.disallowed().is_empty());
    }
}
