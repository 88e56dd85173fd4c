//! The JSON shapes ARI uses: channel snapshots, events, timestamps and hangup-cause texts, as they
//! appear in the recordings.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

/// The `asterisk_id` of the recorded system.
pub(crate) const ASTERISK_ID: &str = "02:00:00:00:00:01";

/// `2026-11-24T12:01:12.895+0000`: ARI's timestamp format (UTC, milliseconds, `+0000`).
pub(crate) fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub(crate) fn now_timestamp() -> String {
    format_timestamp(OffsetDateTime::now_utc())
}

/// Asterisk's text for a Q.850 cause (`ast_cause2str`), for the causes the fake produces.
pub(crate) fn cause_txt(cause: u16) -> &'static str {
    match cause {
        1 => "Unallocated (unassigned) number",
        16 => "Normal Clearing",
        17 => "User busy",
        18 => "No user responding",
        19 => "User alerting, no answer",
        21 => "Call Rejected",
        26 => "Answered elsewhere",
        28 => "Invalid number format (incomplete number)",
        31 => "Normal, unspecified",
        34 => "Circuit/channel congestion",
        38 => "Network out of order",
        58 => "Bearer capability not available",
        127 => "Interworking, unspecified",
        _ => "Unknown",
    }
}

/// Caller / connected party.
#[derive(Debug, Clone, Default)]
pub(crate) struct Party {
    pub name: String,
    pub number: String,
}

impl Party {
    /// Parses an ARI `callerId` the way `ast_callerid_parse` does for the usual forms:
    /// `"Name" <number>`, `Name <number>`, `number`, `Name`.
    pub fn parse(s: &str) -> Party {
        let s = s.trim();
        if let (Some(lt), true) = (s.rfind('<'), s.ends_with('>')) {
            let number = s[lt + 1..s.len() - 1].trim().to_string();
            let name = s[..lt].trim().trim_matches('"').trim().to_string();
            return Party { name, number };
        }
        let looks_like_number = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || "+*#-() ".contains(c));
        if looks_like_number {
            Party { name: String::new(), number: s.chars().filter(|c| !"-() ".contains(*c)).collect() }
        } else {
            Party { name: s.trim_matches('"').to_string(), number: String::new() }
        }
    }

    fn json(&self) -> Value {
        json!({"name": self.name, "number": self.number})
    }
}

/// The dialplan location shown in a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    pub context: String,
    pub exten: String,
    pub priority: i64,
    pub app_name: String,
    pub app_data: String,
}

/// One channel as ARI shows it, plus its variables.
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub protocol_id: String,
    pub caller: Party,
    pub connected: Party,
    pub dialplan: Location,
    pub creationtime: String,
    pub vars: BTreeMap<String, String>,
}

impl Channel {
    pub fn snapshot(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": self.protocol_id,
            "caller": self.caller.json(),
            "connected": self.connected.json(),
            "accountcode": "",
            "dialplan": {
                "context": self.dialplan.context,
                "exten": self.dialplan.exten,
                "priority": self.dialplan.priority,
                "app_name": self.dialplan.app_name,
                "app_data": self.dialplan.app_data,
            },
            "creationtime": self.creationtime,
            "language": "en",
        })
    }

    pub fn set_app(&mut self, app: &str, data: &str) {
        self.dialplan.app_name = app.to_string();
        self.dialplan.app_data = data.to_string();
    }
}

/// An event before delivery: its type and other members (without `application`, which depends
/// on the receiving app), the channel it concerns (for subscriptions) and whether only `subscribeAll` apps see it
/// (events Asterisk publishes before the originate subscribes the app to the new channels).
#[derive(Debug, Clone)]
pub(crate) struct Event {
    /// `type`, written first (as Asterisk does).
    pub kind: String,
    /// The other members but `application`, which is written last.
    pub body: Map<String, Value>,
    pub channel: Option<String>,
    pub subscribe_all_only: bool,
    /// StasisStart and StasisEnd go to the application the channel enters or leaves, and to
    /// no other: Asterisk sends them to that app (`app_send`), not to the channel's
    /// subscribers. (Not recorded: no recording has a channel in one app subscribed by another.)
    pub only_app: Option<String>,
}

impl Event {
    /// `{"type": kind, "timestamp": now, ...fields}`.
    pub fn new(kind: &str, fields: Value) -> Event {
        let mut body = Map::new();
        body.insert("timestamp".into(), now_timestamp().into());
        if let Value::Object(fields) = fields {
            body.extend(fields);
        }
        body.insert("asterisk_id".into(), ASTERISK_ID.into());
        Event { kind: kind.to_owned(), body, channel: None, subscribe_all_only: false, only_app: None }
    }

    /// A channel event: `fields` plus the channel snapshot under `channel`.
    pub fn channel(kind: &str, chan: &Channel, fields: Value) -> Event {
        let mut ev = Event::new(kind, fields);
        ev.body.insert("channel".into(), chan.snapshot());
        ev.channel = Some(chan.id.clone());
        ev
    }

    /// The JSON text delivered to `app`: `type` first and `application` last, as Asterisk
    /// writes them (the recordings; in a `Map` they would sit where their names sort).
    pub fn render(&self, app: &str) -> String {
        let (kind, app) = (Value::from(self.kind.as_str()), Value::from(app));
        // A map with string keys always serializes; `{…}`, of which the members are spliced in.
        let body = serde_json::to_string(&self.body).unwrap_or_default();
        let members = body.get(1..body.len().saturating_sub(1)).unwrap_or_default();
        let comma = if members.is_empty() { "" } else { "," };
        format!("{{\"type\":{kind}{comma}{members},\"application\":{app}}}")
    }
}

/// The five `RTPAUDIOQOS*` variables PJSIP channels set when their RTP session ends.
pub(crate) fn rtp_qos_vars() -> [(&'static str, String); 5] {
    let ssrc = fastrand::u32(..);
    [
        (
            "RTPAUDIOQOS",
            format!(
                "ssrc={ssrc};themssrc=0;lp=0;rxjitter=0.000000;rxcount=0;txjitter=0.000000;txcount=0;rlp=0;\
                 rtt=0.000000;rxmes=0.000000;txmes=0.000000"
            ),
        ),
        (
            "RTPAUDIOQOSJITTER",
            "minrxjitter=000.000000;maxrxjitter=000.000000;avgrxjitter=000.000000;stdevrxjitter=000.000000;\
             mintxjitter=000.000000;maxtxjitter=000.000000;avgtxjitter=000.000000;stdevtxjitter=000.000000;"
                .into(),
        ),
        (
            "RTPAUDIOQOSLOSS",
            "  minrxlost=000.000000;  maxrxlost=000.000000;  avgrxlost=000.000000;  stdevrxlost=000.000000;  \
             mintxlost=000.000000;  maxtxlost=000.000000;  avgtxlost=000.000000;  stdevtxlost=000.000000;"
                .into(),
        ),
        (
            "RTPAUDIOQOSRTT",
            "     minrtt=000.000000;     maxrtt=000.000000;     avgrtt=000.000000;     stdevrtt=000.000000;".into(),
        ),
        (
            "RTPAUDIOQOSMES",
            "   minrxmes=000.000000;   maxrxmes=000.000000;   avgrxmes=000.000000;   stdevrxmes=000.000000;   \
             mintxmes=000.000000;   maxtxmes=000.000000;   avgtxmes=000.000000;   stdevtxmes=000.000000;"
                .into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As in the recordings, `type` leads (ivr reads it off the text there and skims for it
    /// elsewhere); the rest of the members are all there, `application` included.
    #[test]
    fn an_event_is_written_type_first() {
        let text = Event::new("StasisStart", json!({"args": [], "replace_channel": null})).render("ivr");
        assert!(text.starts_with(r#"{"type":"StasisStart","#), "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "StasisStart");
        assert_eq!(value["application"], "ivr");
        assert_eq!(value["asterisk_id"], ASTERISK_ID);
        assert!(value["timestamp"].is_string() && value["args"].is_array());
    }
}
