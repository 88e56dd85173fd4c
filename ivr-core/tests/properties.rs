//! Property tests of ivr-core's parsers: the phone-number parser, the ARI event decoder, the
//! channel model and the text forms of statuses and cursors. Arbitrary input never panics;
//! what is accepted round-trips.

use ivr_core::ari::{AriEvent, Channel, ChannelState};
use ivr_core::{CallId, CallStatus, Cursor, PhoneNumber};
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, ..ProptestConfig::default() }
}

/// Strings near the accepted shape (an optional `+`, digits) mixed with anything at all.
fn number_like() -> impl Strategy<Value = String> {
    prop_oneof!["\\+?[0-9]{0,18}", "[+0-9 ()&@/;,.-]{0,20}", any::<String>(),]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn phone_numbers_parse_without_panicking_and_round_trip(input in number_like()) {
        match PhoneNumber::parse(&input) {
            Ok(number) => {
                // Accepted: exactly `+`? and 3 to 15 digits, kept as given.
                let digits = input.strip_prefix('+').unwrap_or(&input);
                prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                prop_assert!((PhoneNumber::MIN_DIGITS..=PhoneNumber::MAX_DIGITS).contains(&digits.len()));
                prop_assert_eq!(number.as_str(), input.as_str());
                prop_assert_eq!(&PhoneNumber::parse(number.as_str()).unwrap(), &number);
                prop_assert_eq!(number.to_string(), input.clone());
                prop_assert_eq!(&input.parse::<PhoneNumber>().unwrap(), &number);
                let json = serde_json::to_string(&number).unwrap();
                prop_assert_eq!(&serde_json::from_str::<PhoneNumber>(&json).unwrap(), &number);
            }
            Err(e) => {
                // Refused: and serde refuses it the same way, with a message.
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(serde_json::from_value::<PhoneNumber>(Value::String(input)).is_err());
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics_the_event_decoder(text in any::<String>()) {
        let _ = AriEvent::parse(&text);
    }

    #[test]
    fn arbitrary_json_decodes_or_is_unknown(value in json_value()) {
        let text = value.to_string();
        match AriEvent::parse(&text) {
            Ok(event) => {
                // Only an object with a string `type` is decoded, and `kind` is that type.
                prop_assert_eq!(Some(event.kind()), value.get("type").and_then(Value::as_str));
                let _ = (event.channel_id(), event.timestamp());
                // The same JSON with its keys in another order decodes to the same event.
                let reordered = serde_json::to_string_pretty(&value).unwrap();
                prop_assert_eq!(AriEvent::parse(&reordered).unwrap(), event);
            }
            Err(_) => prop_assert!(value.get("type").and_then(Value::as_str).is_none()),
        }
    }

    #[test]
    fn known_events_decode_to_their_variant(
        channel in channel(),
        kind in prop::sample::select(vec!["StasisStart", "StasisEnd", "ChannelCreated", "ChannelStateChange", "ChannelDestroyed"]),
        cause in any::<i32>(),
        extra in json_value(),
    ) {
        let mut event = json!({
            "type": kind,
            "timestamp": "2026-11-24T12:01:12.895+0000",
            "channel": serde_json::to_value(&channel).unwrap(),
            "cause": cause,
            "application": "ivr",
            "extra_field": extra,
        });
        let text = event.to_string();
        let decoded = AriEvent::parse(&text).unwrap();
        prop_assert_eq!(decoded.kind(), kind);
        prop_assert_eq!(decoded.channel_id(), Some(channel.id.as_str()));
        prop_assert!(decoded.timestamp().is_some());
        prop_assert!(!matches!(decoded, AriEvent::Unknown { .. }), "{:?}", decoded);
        // A channel that lacks its required `id` makes the event Unknown, never an error.
        event["channel"].as_object_mut().unwrap().remove("id");
        let unknown = AriEvent::parse(&event.to_string()).unwrap();
        let is_unknown = matches!(unknown, AriEvent::Unknown { .. });
        prop_assert!(is_unknown);
        prop_assert_eq!(unknown.kind(), kind);
    }

    #[test]
    fn channels_round_trip_through_json(channel in channel()) {
        let json = serde_json::to_string(&channel).unwrap();
        prop_assert_eq!(serde_json::from_str::<Channel>(&json).unwrap(), channel);
    }

    #[test]
    fn statuses_and_cursors_round_trip(text in any::<String>(), micros in any::<i64>(), id in any::<u128>()) {
        if let Ok(status) = text.parse::<CallStatus>() {
            prop_assert_eq!(status.to_string(), text.clone());
        }
        if let Ok(cursor) = text.parse::<Cursor>() {
            prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
        let call_id: CallId = uuid::Uuid::from_u128(id).to_string().parse().unwrap();
        let cursor = Cursor { created_at_micros: micros, call_id };
        prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
    }
}

#[test]
fn every_status_round_trips_by_name() {
    for status in CallStatus::ALL {
        assert_eq!(status.to_string().parse::<CallStatus>().unwrap(), status);
    }
}

/// Any JSON value, a few levels deep, with ARI-ish keys so that decoding paths are reached.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["StasisStart", "Dial", "ChannelDestroyed", "PlaybackFinished", "Up", "channel:x"])
            .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let key = prop::sample::select(vec![
            "type",
            "timestamp",
            "channel",
            "id",
            "name",
            "state",
            "peer",
            "playback",
            "cause",
            "target_uri",
            "x",
        ])
        .prop_map(str::to_owned);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn channel_state() -> impl Strategy<Value = ChannelState> {
    prop::sample::select(vec![
        ChannelState::Down,
        ChannelState::Rsrvd,
        ChannelState::OffHook,
        ChannelState::Dialing,
        ChannelState::Ring,
        ChannelState::Ringing,
        ChannelState::Up,
        ChannelState::Busy,
        ChannelState::DialingOffhook,
        ChannelState::PreRing,
        ChannelState::Unknown,
    ])
}

fn channel() -> impl Strategy<Value = Channel> {
    (any::<String>(), any::<String>(), channel_state(), any::<String>(), any::<String>()).prop_map(
        |(id, name, state, caller_number, language)| {
            let mut channel: Channel = serde_json::from_value(json!({"id": "", "name": "", "state": "Down"})).unwrap();
            channel.id = id;
            channel.name = name;
            channel.state = state;
            channel.caller.number = caller_number;
            channel.language = language;
            channel
        },
    )
}
