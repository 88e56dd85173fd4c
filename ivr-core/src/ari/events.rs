//! ARI's WebSocket events, typed for the ones the call engine uses. Every other event is still
//! delivered, as [`AriEvent::Unknown`], never as an error.

use std::borrow::Cow;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::model::{Channel, Playback};

/// One event from `/ari/events`.
///
/// On the wire the variant is the object's `type` member. The derive reads it as an externally
/// tagged enum: [`AriEvent::parse`] names the variant from the `type` (read off the text where
/// it leads, as Asterisk writes it; else skimmed from the object) and hands over the whole
/// object as its fields (see `ByType`). An internally tagged derive would buffer
/// every event into serde's `Content` tree first, which was a third of an event's decoding.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[non_exhaustive]
pub enum AriEvent {
    /// The channel entered the application. For an originate into an app this comes only
    /// after the answer, with the channel `Up`.
    StasisStart {
        timestamp: String,
        #[serde(default)]
        args: Vec<String>,
        channel: Channel,
    },
    /// The channel left the application (hang-up, or `continue` into the dialplan — in which
    /// case its later events still arrive).
    StasisEnd {
        timestamp: String,
        channel: Channel,
    },
    ChannelCreated {
        timestamp: String,
        channel: Channel,
    },
    ChannelStateChange {
        timestamp: String,
        channel: Channel,
    },
    /// A hang-up was asked for. With `soft: true`, `cause` is a soft-hangup flag (32 = ARI
    /// DELETE, 16 = end of dialplan, 4 = shutdown), not a Q.850 code.
    ChannelHangupRequest {
        timestamp: String,
        #[serde(default)]
        cause: Option<i32>,
        #[serde(default)]
        soft: Option<bool>,
        #[serde(default)]
        tech_cause: Option<i32>,
        channel: Channel,
    },
    /// The channel is gone. `cause` is the Q.850 code; `tech_cause` the SIP status, if any.
    ChannelDestroyed {
        timestamp: String,
        cause: i32,
        #[serde(default)]
        cause_txt: String,
        #[serde(default)]
        tech_cause: Option<i32>,
        channel: Channel,
    },
    /// Progress of the originated channel's dial: `peer` is the originated channel and
    /// `dialstatus` goes `""` → `RINGING` → `ANSWER` | `BUSY` | `CONGESTION` | `NOANSWER`.
    Dial {
        timestamp: String,
        #[serde(default)]
        dialstatus: String,
        #[serde(default)]
        dialstring: Option<String>,
        #[serde(default)]
        forward: Option<String>,
        peer: Channel,
        /// Absent for an originate: there is no calling channel.
        #[serde(default)]
        caller: Option<Box<Channel>>,
    },
    ChannelVarset {
        timestamp: String,
        variable: String,
        #[serde(default)]
        value: String,
        #[serde(default)]
        channel: Option<Channel>,
    },
    ChannelDialplan {
        timestamp: String,
        #[serde(default)]
        dialplan_app: String,
        #[serde(default)]
        dialplan_app_data: String,
        channel: Channel,
    },
    /// Playback events carry no channel, only the playback and its `channel:<id>` target.
    PlaybackStarted {
        timestamp: String,
        playback: Playback,
    },
    /// `playback.state` is `done` (played to the end) or `failed` (no such sound, or the
    /// channel hung up during it).
    PlaybackFinished {
        timestamp: String,
        playback: Playback,
    },
    /// Another WebSocket took over this application; this one gets no more events.
    ApplicationReplaced {
        timestamp: String,
        #[serde(default)]
        application: String,
    },
    /// An event type ivr does not interpret, or one that did not have the expected shape.
    #[serde(skip)]
    Unknown {
        kind: String,
        raw: serde_json::Value,
    },
}

/// The `type` of an object whose first member it is, when it is a string without escapes:
/// `{"type":"StasisStart", …` (whitespace allowed around the tokens). `None` otherwise.
fn leading_type(text: &str) -> Option<&str> {
    let rest = text.trim_start().strip_prefix('{')?.trim_start().strip_prefix("\"type\"")?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find(['"', '\\'])?;
    (rest.as_bytes()[end] == b'"').then(|| &rest[..end])
}

/// An event's `type`, borrowed from the text unless escaped.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
}

/// An event as the externally tagged enum serde's derive reads: the variant named by the
/// skimmed `type`, its fields the whole object (the `type` member and any other unknown
/// member are ignored, as a struct variant does).
struct ByType<'k, 'a> {
    kind: &'k str,
    fields: &'k mut serde_json::Deserializer<serde_json::de::StrRead<'a>>,
}

impl<'de> serde::Deserializer<'de> for ByType<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("an ARI event is read as an enum"))
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> serde::de::EnumAccess<'de> for ByType<'_, 'de> {
    type Error = serde_json::Error;
    type Variant = Self;

    fn variant_seed<S: serde::de::DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Self::Error> {
        use serde::de::IntoDeserializer as _;
        let variant = seed.deserialize(self.kind.into_deserializer())?;
        Ok((variant, self))
    }
}

impl<'de> serde::de::VariantAccess<'de> for ByType<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        Err(serde::de::Error::custom("every ARI event has fields"))
    }

    fn newtype_variant_seed<S: serde::de::DeserializeSeed<'de>>(self, _seed: S) -> Result<S::Value, Self::Error> {
        Err(serde::de::Error::custom("every ARI event has named fields"))
    }

    fn tuple_variant<V: serde::de::Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("every ARI event has named fields"))
    }

    fn struct_variant<V: serde::de::Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        serde::Deserializer::deserialize_struct(&mut *self.fields, "event", fields, visitor)
    }
}

/// Event types decoded into a typed variant; the rest become [`AriEvent::Unknown`].
const TYPED: &[&str] = &[
    "StasisStart",
    "StasisEnd",
    "ChannelCreated",
    "ChannelStateChange",
    "ChannelHangupRequest",
    "ChannelDestroyed",
    "Dial",
    "ChannelVarset",
    "ChannelDialplan",
    "PlaybackStarted",
    "PlaybackFinished",
    "ApplicationReplaced",
];

impl AriEvent {
    /// Decodes one WebSocket text message. Only text that is not a JSON object with a string
    /// `type` is an error; an unfamiliar or unexpectedly shaped event is `Unknown`.
    pub fn parse(text: &str) -> Result<AriEvent, serde_json::Error> {
        let not_an_event = || serde::de::Error::custom("an ARI event is a JSON object with a string `type`");
        // serde would read a struct from an array; an event is an object.
        if !text.trim_start().starts_with('{') {
            return Err(not_an_event());
        }
        // The type first, then the event straight from the text. (Through a `serde_json::Value`
        // every key and string was an allocation, and the event's decoding took twice as long:
        // benches/event_ingest.rs.) Asterisk writes `type` first, where it is read off the text;
        // elsewhere a skim of the whole object finds it.
        let kind = match leading_type(text) {
            Some(kind) => Cow::Borrowed(kind),
            None => serde_json::from_str::<Kind>(text)?.kind.ok_or_else(not_an_event)?,
        };
        if TYPED.contains(&&*kind) {
            let mut fields = serde_json::Deserializer::from_str(text);
            match AriEvent::deserialize(ByType { kind: &kind, fields: &mut fields }) {
                // Trailing text after the object is refused, as for any other event.
                Ok(event) => return fields.end().map(|()| event),
                // Not JSON at all (the skim used to find that first).
                Err(e) if !e.is_data() => return Err(e),
                Err(e) => {
                    tracing::warn!(event = %kind, error = %e, "ARI event with an unexpected shape; passed on as unknown")
                }
            }
        }
        Ok(AriEvent::Unknown { kind: kind.into_owned(), raw: serde_json::from_str(text)? })
    }

    /// The event's `type`.
    pub fn kind(&self) -> &str {
        match self {
            AriEvent::StasisStart { .. } => "StasisStart",
            AriEvent::StasisEnd { .. } => "StasisEnd",
            AriEvent::ChannelCreated { .. } => "ChannelCreated",
            AriEvent::ChannelStateChange { .. } => "ChannelStateChange",
            AriEvent::ChannelHangupRequest { .. } => "ChannelHangupRequest",
            AriEvent::ChannelDestroyed { .. } => "ChannelDestroyed",
            AriEvent::Dial { .. } => "Dial",
            AriEvent::ChannelVarset { .. } => "ChannelVarset",
            AriEvent::ChannelDialplan { .. } => "ChannelDialplan",
            AriEvent::PlaybackStarted { .. } => "PlaybackStarted",
            AriEvent::PlaybackFinished { .. } => "PlaybackFinished",
            AriEvent::ApplicationReplaced { .. } => "ApplicationReplaced",
            AriEvent::Unknown { kind, .. } => kind,
        }
    }

    /// The id of the channel the event is about: the channel, a Dial's peer (the originated
    /// channel), or a playback's target. `None` for application-level events.
    pub fn channel_id(&self) -> Option<&str> {
        match self {
            AriEvent::StasisStart { channel, .. }
            | AriEvent::StasisEnd { channel, .. }
            | AriEvent::ChannelCreated { channel, .. }
            | AriEvent::ChannelStateChange { channel, .. }
            | AriEvent::ChannelHangupRequest { channel, .. }
            | AriEvent::ChannelDestroyed { channel, .. }
            | AriEvent::ChannelDialplan { channel, .. } => Some(&channel.id),
            AriEvent::ChannelVarset { channel, .. } => channel.as_ref().map(|c| c.id.as_str()),
            AriEvent::Dial { peer, .. } => Some(&peer.id),
            AriEvent::PlaybackStarted { playback, .. } | AriEvent::PlaybackFinished { playback, .. } => {
                playback.channel_id()
            }
            AriEvent::ApplicationReplaced { .. } => None,
            AriEvent::Unknown { raw, .. } => raw.pointer("/channel/id").and_then(|v| v.as_str()),
        }
    }

    /// When Asterisk says the event happened (`timestamp`, e.g. `2026-11-24T12:01:12.895+0000`).
    pub fn timestamp(&self) -> Option<OffsetDateTime> {
        let text = match self {
            AriEvent::StasisStart { timestamp, .. }
            | AriEvent::StasisEnd { timestamp, .. }
            | AriEvent::ChannelCreated { timestamp, .. }
            | AriEvent::ChannelStateChange { timestamp, .. }
            | AriEvent::ChannelHangupRequest { timestamp, .. }
            | AriEvent::ChannelDestroyed { timestamp, .. }
            | AriEvent::Dial { timestamp, .. }
            | AriEvent::ChannelVarset { timestamp, .. }
            | AriEvent::ChannelDialplan { timestamp, .. }
            | AriEvent::PlaybackStarted { timestamp, .. }
            | AriEvent::PlaybackFinished { timestamp, .. }
            | AriEvent::ApplicationReplaced { timestamp, .. } => timestamp.as_str(),
            AriEvent::Unknown { raw, .. } => raw.get("timestamp")?.as_str()?,
        };
        parse_ari_time(text)
    }
}

/// ARI writes offsets as `+0000`; RFC 3339 wants `+00:00`.
pub(crate) fn parse_ari_time(text: &str) -> Option<OffsetDateTime> {
    let (head, offset) = text.split_at_checked(text.len().checked_sub(5)?)?;
    let rfc3339 = match offset.as_bytes() {
        [sign @ (b'+' | b'-'), h1, h2, m1, m2] if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) => {
            format!("{head}{}{}{}:{}{}", *sign as char, *h1 as char, *h2 as char, *m1 as char, *m2 as char)
        }
        _ => text.to_owned(),
    };
    OffsetDateTime::parse(&rfc3339, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ari::model::ChannelState;

    const DESTROYED: &str = r#"{"type": "ChannelDestroyed", "timestamp": "2026-11-24T12:03:17.498+0000", "cause": 17, "cause_txt": "User busy", "tech_cause": 486, "channel": {"id": "3888f6a9-47e9-42c2-821c-0c8039b65d8a", "name": "PJSIP/callee-00000001", "state": "Ringing", "protocol_id": "b8a5", "caller": {"name": "IVR Test", "number": "+15559990000"}, "connected": {"name": "", "number": ""}, "accountcode": "", "dialplan": {"context": "sim", "exten": "s", "priority": 1, "app_name": "AppDial2", "app_data": "(Outgoing Line)"}, "creationtime": "2026-11-24T12:03:16.488+0000", "language": "en"}, "asterisk_id": "02:00:00:00:00:01", "application": "ivr"}"#;

    #[test]
    fn typed_events_decode_with_their_fields() {
        let event = AriEvent::parse(DESTROYED).unwrap();
        let AriEvent::ChannelDestroyed { cause, cause_txt, tech_cause, channel, .. } = &event else {
            panic!("decoded as {event:?}");
        };
        assert_eq!((*cause, cause_txt.as_str(), *tech_cause), (17, "User busy", Some(486)));
        assert_eq!(channel.state, ChannelState::Ringing);
        assert_eq!(event.channel_id(), Some("3888f6a9-47e9-42c2-821c-0c8039b65d8a"));
        let at = event.timestamp().unwrap();
        assert_eq!((at.hour(), at.minute(), at.second(), at.millisecond()), (12, 3, 17, 498));
    }

    #[test]
    fn other_events_are_unknown_not_errors() {
        let text = r#"{"type": "DeviceStateChanged", "application": "ivr", "timestamp": "2026-11-24T12:01:22.643+0000", "device_state": {"name": "Local/+15550000001@sim", "state": "INUSE"}}"#;
        let event = AriEvent::parse(text).unwrap();
        assert_eq!(event.kind(), "DeviceStateChanged");
        assert!(matches!(&event, AriEvent::Unknown { raw, .. } if raw["device_state"]["state"] == "INUSE"));
        assert!(event.timestamp().is_some());

        // A known type with an unexpected shape is passed on, not lost.
        let odd = AriEvent::parse(r#"{"type": "ChannelDestroyed", "cause": "sixteen"}"#).unwrap();
        assert_eq!(odd.kind(), "ChannelDestroyed");
        assert!(matches!(odd, AriEvent::Unknown { .. }));

        assert!(AriEvent::parse("not json").is_err());
        assert!(AriEvent::parse(r#"{"no_type": 1}"#).is_err());
        // serde would read a struct from an array; an event is an object.
        assert!(AriEvent::parse(r#"["StasisStart"]"#).is_err());
        assert!(AriEvent::parse(r#"{"type": 7}"#).is_err());
    }

    /// The variant comes from `type` wherever it sits in the object, and the object's other
    /// members are the variant's fields; trailing text after the object is refused.
    #[test]
    fn the_type_may_come_anywhere_and_the_object_must_end() {
        let last = r#"{"application": "ivr", "timestamp": "2026-11-24T12:35:50.150+0000", "playback": {"id": "4c7a", "media_uri": "sound:x", "target_uri": "channel:95f6ad3c", "state": "done"}, "type": "PlaybackFinished"}"#;
        let event = AriEvent::parse(last).unwrap();
        assert!(matches!(&event, AriEvent::PlaybackFinished { playback, .. } if playback.state == "done"), "{event:?}");
        assert_eq!(event.channel_id(), Some("95f6ad3c"));
        assert!(AriEvent::parse(&format!("{last} {{}}")).is_err());
    }

    /// A leading `type` is read off the text (compact or pretty); the event is the one the
    /// skim of the whole object gives, and trailing text is refused either way. An escaped one
    /// is left to the skim, which unescapes it.
    #[test]
    fn a_leading_type_decodes_as_one_found_by_the_skim() {
        let body = r#""timestamp": "2026-11-24T12:01:12.895+0000", "cause": 16, "channel": {"id": "1764", "name": "PJSIP/trunk-00000001", "state": "Up"}"#;
        let first = format!(r#"{{"type":"ChannelDestroyed", {body}}}"#);
        let pretty = format!("{{\n  \"type\" : \"ChannelDestroyed\",\n  {body}\n}}");
        let last = format!(r#"{{{body}, "type": "ChannelDestroyed"}}"#);
        let escaped = format!(r#"{{"type": "Channel\u0044estroyed", {body}}}"#);
        assert_eq!(leading_type(&first), Some("ChannelDestroyed"));
        assert_eq!(leading_type(&pretty), Some("ChannelDestroyed"));
        assert_eq!(leading_type(&last), None);
        assert_eq!(leading_type(&escaped), None);
        let skimmed = AriEvent::parse(&last).unwrap();
        assert!(matches!(skimmed, AriEvent::ChannelDestroyed { cause: 16, .. }), "{skimmed:?}");
        for text in [&first, &pretty, &escaped] {
            assert_eq!(AriEvent::parse(text).unwrap(), skimmed, "{text}");
            assert!(AriEvent::parse(&format!("{text} {{}}")).is_err(), "{text} with trailing text");
        }
        // Not typed here: passed on whole, read off the text or skimmed alike.
        let other = r#"{"type":"BridgeCreated","bridge":{"id":"b1"}}"#;
        assert!(matches!(AriEvent::parse(other).unwrap(), AriEvent::Unknown { kind, .. } if kind == "BridgeCreated"));
        assert!(AriEvent::parse(&format!("{other} x")).is_err());
        // An unterminated type is not an event.
        assert!(AriEvent::parse(r#"{"type":"StasisStart"#).is_err());
    }

    #[test]
    fn playback_events_name_their_channel_through_the_target() {
        let text = r#"{"type": "PlaybackFinished", "timestamp": "2026-11-24T12:35:50.150+0000", "playback": {"id": "4c7a", "media_uri": "sound:demo-congrats", "target_uri": "channel:95f6ad3c", "language": "en", "state": "failed"}}"#;
        let event = AriEvent::parse(text).unwrap();
        assert_eq!(event.channel_id(), Some("95f6ad3c"));
    }

    #[test]
    fn unknown_channel_states_do_not_fail_decoding() {
        let state: ChannelState = serde_json::from_str("\"Something New\"").unwrap();
        assert_eq!(state, ChannelState::Unknown);
        let state: ChannelState = serde_json::from_str("\"Dialing Offhook\"").unwrap();
        assert_eq!(state, ChannelState::DialingOffhook);
    }
}
