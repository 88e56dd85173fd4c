//! The request values that have rules: each type here is parsed and documented from one
//! definition, so the OpenAPI document says exactly what the parser accepts.
//!
//! - Text types ([`PhoneText`], [`Context`], …): a string checked by a [`TextRule`] (its length
//!   in characters, an ECMA-262 pattern for the document and the same test as code). They
//!   deserialize from JSON, parse from a query or path, and are their own schema component.
//! - [`Bounded<MIN, MAX>`]: a whole number in `MIN..=MAX`.
//! - [`Timestamp`]: an RFC 3339 date-time.
//!
//! The rules restate ivr-core's own checks (`CallManager` validates every request again), so
//! a request the document allows is one the engine accepts.

use std::borrow::Cow;

use ivr_core::{CallQuery, CallStatus};
use serde::{Deserialize, Deserializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// What a text value must be.
pub struct TextRule {
    /// The value's name in error details (`context`, `phone_number`).
    pub label: &'static str,
    /// What it must be, as a phrase after "must be" (also the schema's description).
    pub must_be: &'static str,
    /// Length in characters (Unicode scalar values, as JSON Schema counts them).
    pub min: usize,
    pub max: Option<usize>,
    /// The rule as an anchored ECMA-262 pattern, for the document.
    pub pattern: fn() -> String,
    /// The rule as code: whether a value of the right length matches `pattern`.
    pub matches: fn(&str) -> bool,
}

impl TextRule {
    /// Checks `text`; the error is the detail to answer with.
    pub fn check(&self, text: &str) -> Result<(), String> {
        let chars = text.chars().count();
        if chars < self.min || self.max.is_some_and(|max| chars > max) || !(self.matches)(text) {
            return Err(format!("{} must be {}", self.label, self.must_be));
        }
        Ok(())
    }

    /// The rule as a string schema.
    pub fn schema(&self) -> Schema {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(self.min))
            .max_length(self.max)
            .pattern(Some((self.pattern)()))
            .description(Some(upper_first(self.must_be)))
            .into()
    }
}

fn upper_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Declares a text type for a [`TextRule`]: parse, deserialize, schema.
macro_rules! text_type {
    ($(#[$meta:meta])* $name:ident = $rule:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const RULE: TextRule = $rule;

            /// The value, if it keeps the rule; else the detail to answer with.
            pub fn parse(text: &str) -> Result<Self, String> {
                Self::RULE.check(text).map(|()| $name(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = Cow::<'de, str>::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                Self::RULE.schema().into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

/// Neither a C0 nor a C1 control character (what `char::is_control` refuses).
const VISIBLE: &str = r"[^\u0000-\u001f\u007f-\u009f]";

fn visible(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

fn name_chars(text: &str, extra: &str) -> bool {
    text.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// The media schemes `audio` may use.
const MEDIA_SCHEMES: [&str; 6] = ["sound", "recording", "number", "digits", "characters", "tone"];

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

const UUID_PATTERN: &str = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";

text_type!(
    /// A phone number: an optional `+` and 3 to 15 digits.
    PhoneText = TextRule {
        label: "phone_number",
        must_be: "a phone number: an optional '+' and 3 to 15 digits",
        min: 3,
        max: Some(16),
        pattern: || r"^\+?[0-9]{3,15}$".into(),
        matches: |t| ivr_core::PhoneNumber::parse(t).is_ok(),
    }
);

impl PhoneText {
    pub fn to_phone_number(&self) -> ivr_core::PhoneNumber {
        // The rule is PhoneNumber's own test: this cannot fail.
        ivr_core::PhoneNumber::parse(&self.0).expect("checked by PhoneText::RULE")
    }
}

text_type!(
    /// A dialplan context.
    Context = TextRule {
        label: "context",
        must_be: "1 to 80 of the characters A-Z a-z 0-9 - _ .",
        min: 1,
        max: Some(80),
        pattern: || r"^[A-Za-z0-9_.\-]+$".into(),
        matches: |t| name_chars(t, "-_."),
    }
);

text_type!(
    /// A dialplan extension.
    Extension = TextRule {
        label: "extension",
        must_be: "1 to 80 of the characters A-Z a-z 0-9 - _ . + * #",
        min: 1,
        max: Some(80),
        pattern: || r"^[A-Za-z0-9_.+*#\-]+$".into(),
        matches: |t| name_chars(t, "-_.+*#"),
    }
);

text_type!(
    /// The caller id to present, e.g. `"IVR" <+15559990000>`.
    CallerId = TextRule {
        label: "caller_id",
        must_be: "1 to 80 characters, none of them a control character",
        min: 1,
        max: Some(80),
        pattern: || format!("^{VISIBLE}+$"),
        matches: visible,
    }
);

text_type!(
    /// Media to play once answered instead of running the dialplan, e.g. `sound:hello-world`.
    Audio = TextRule {
        label: "audio",
        must_be: "a media URI of at most 256 characters: sound:, recording:, number:, digits:, characters: \
                  or tone: and a name, with no control character",
        min: 1,
        max: Some(256),
        pattern: || format!("^({}):{VISIBLE}+$", MEDIA_SCHEMES.join("|")),
        matches: |t| {
            visible(t)
                && t.split_once(':').is_some_and(|(scheme, rest)| MEDIA_SCHEMES.contains(&scheme) && !rest.is_empty())
        },
    }
);

text_type!(
    /// Where to POST the call's status changes: an absolute `http://` URL on a host the
    /// server allows (WEBHOOK_ALLOWED_HOSTS). `https://` is refused: the server has no TLS client.
    CallbackUrl = TextRule {
        label: "status_callback",
        must_be: "an absolute http:// URL of at most 2048 characters, without spaces or control characters \
                  (https is not supported: the server has no TLS client), on a host in WEBHOOK_ALLOWED_HOSTS",
        min: 8,
        max: Some(2048),
        pattern: || r"^http://[^\u0000-\u0020\u007f-\u009f]+$".into(),
        matches: |t| t.starts_with("http://") && !t.chars().any(|c| c.is_control() || c == ' '),
    }
);

text_type!(
    /// The name of a channel variable.
    VariableName = TextRule {
        label: "a variable name",
        must_be: "1 to 80 of the characters A-Z a-z 0-9 _ ( )",
        min: 1,
        max: Some(80),
        pattern: || r"^[A-Za-z0-9_()]+$".into(),
        matches: |t| name_chars(t, "_()"),
    }
);

text_type!(
    /// The value of a channel variable.
    VariableValue = TextRule {
        label: "a variable value",
        must_be: "at most 1024 characters, none of them a control character",
        min: 0,
        max: Some(1024),
        pattern: || format!("^{VISIBLE}*$"),
        matches: visible,
    }
);

text_type!(
    /// The `Idempotency-Key` header: a repeated request with the same key returns the first
    /// call and never dials again.
    IdempotencyKey = TextRule {
        label: "Idempotency-Key",
        must_be: "1 to 255 visible ASCII characters (inner spaces allowed)",
        min: 1,
        max: Some(ivr_core::CallRequest::MAX_IDEMPOTENCY_KEY),
        pattern: || "^[!-~]([ -~]*[!-~])?$".into(),
        matches: |t| {
            t.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && !t.starts_with(' ') && !t.ends_with(' ')
        },
    }
);

text_type!(
    /// A page position: the `next_cursor` of a previous page.
    PageCursor = TextRule {
        label: "cursor",
        must_be: "the next_cursor of a previous page",
        min: 39,
        max: Some(56),
        pattern: || format!(r"^-?[0-9]{{1,18}}\.{UUID_PATTERN}$"),
        matches: |t| {
            let Some((micros, id)) = t.split_once('.') else { return false };
            let digits = micros.strip_prefix('-').unwrap_or(micros);
            (1..=18).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && is_uuid(id)
                && t.parse::<ivr_core::Cursor>().is_ok()
        },
    }
);

impl PageCursor {
    pub fn to_cursor(&self) -> ivr_core::Cursor {
        self.0.parse().expect("checked by PageCursor::RULE")
    }
}

text_type!(
    /// Statuses to match: one or more of pending, dialing, ringing, answered, completed,
    /// failed, separated by commas.
    StatusList = TextRule {
        label: "status",
        must_be: "one or more of pending, dialing, ringing, answered, completed, failed, separated by commas",
        min: 1,
        max: None,
        pattern: || {
            let names: Vec<&str> = CallStatus::ALL.iter().map(|s| s.as_str()).collect();
            let one = format!("({})", names.join("|"));
            format!("^{one}(,{one})*$")
        },
        matches: |t| t.split(',').all(|name| name.parse::<CallStatus>().is_ok()),
    }
);

impl StatusList {
    pub fn statuses(&self) -> impl Iterator<Item = CallStatus> + '_ {
        self.0.split(',').filter_map(|name| name.parse().ok())
    }
}

/// A whole number from `MIN` to `MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<const MIN: u32, const MAX: u32>(pub u32);

impl<const MIN: u32, const MAX: u32> Bounded<MIN, MAX> {
    pub fn check(value: u64, label: &str) -> Result<Self, String> {
        match u32::try_from(value) {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Bounded(n)),
            _ => Err(format!("{label} must be a whole number from {MIN} to {MAX}")),
        }
    }

    /// Parses decimal digits only (no sign, no spaces).
    pub fn parse(text: &str, label: &str) -> Result<Self, String> {
        let value = (!text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse::<u64>().ok())
            .flatten();
        value.map_or_else(
            || Err(format!("{label} must be a whole number from {MIN} to {MAX}")),
            |v| Self::check(v, label),
        )
    }
}

/// Reads a JSON number that is a whole number, as JSON Schema's `integer` is: `816.0` too.
impl<'de, const MIN: u32, const MAX: u32> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Whole<const MIN: u32, const MAX: u32>;
        impl<const MIN: u32, const MAX: u32> serde::de::Visitor<'_> for Whole<MIN, MAX> {
            type Value = Bounded<MIN, MAX>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a whole number from {MIN} to {MAX}")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Bounded::check(v, "the value").map_err(E::custom)
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format_args!("{v} is not from {MIN} to {MAX}")))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&v) {
                    self.visit_u64(v as u64)
                } else {
                    Err(E::custom(format_args!("{v} is not a whole number from {MIN} to {MAX}")))
                }
            }
        }
        deserializer.deserialize_any(Whole::<MIN, MAX>)
    }
}

impl<const MIN: u32, const MAX: u32> PartialSchema for Bounded<MIN, MAX> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(MIN)).maximum(Some(MAX)).into()
    }
}

impl<const MIN: u32, const MAX: u32> ToSchema for Bounded<MIN, MAX> {}

/// A dialplan priority.
pub type Priority = Bounded<1, { u32::MAX }>;
/// Seconds of ringing before giving up.
pub type RingTimeout = Bounded<1, 3600>;
/// Attempts in all; the upper bound is the server's MAX_ATTEMPTS, which the document states
/// (see [`crate::openapi`]) and the engine checks.
pub type MaxAttempts = Bounded<1, { u32::MAX }>;
/// The page size of `GET /api/v1/calls`.
pub type PageSize = Bounded<1, { CallQuery::MAX_PAGE_SIZE as u32 }>;

/// An RFC 3339 date-time, e.g. `2025-01-31T12:00:00Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub OffsetDateTime);

impl Timestamp {
    /// Parses RFC 3339; a `+` that arrived as a space (form encoding) is read as `+`.
    pub fn parse(text: &str, label: &str) -> Result<Self, String> {
        OffsetDateTime::parse(&text.replace(' ', "+"), &Rfc3339)
            .map(Timestamp)
            .map_err(|_| format!("{label} must be an RFC 3339 timestamp, e.g. 2025-01-31T12:00:00Z"))
    }
}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    }
}

impl ToSchema for Timestamp {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules() {
        assert!(PhoneText::parse("+15550000001").is_ok());
        for bad in ["", "12", "+", "1234567890123456", "12a4", " 123"] {
            assert!(PhoneText::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Context::parse("ivr-menu_1.x").is_ok());
        assert_eq!(Context::parse("").unwrap_err(), "context must be 1 to 80 of the characters A-Z a-z 0-9 - _ .");
        assert!(Context::parse(&"c".repeat(81)).is_err());
        assert!(Extension::parse("*#+1").is_ok() && Extension::parse("s s").is_err());
        assert!(CallerId::parse("\"IVR\" <+15559990000>").is_ok());
        assert!(CallerId::parse("").is_err() && CallerId::parse("a\nb").is_err() && CallerId::parse("\u{85}").is_err());
        assert!(Audio::parse("sound:hello-world").is_ok());
        for bad in ["", "sound:", "hello", "video:x", "sound:a\u{7}"] {
            assert!(Audio::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IdempotencyKey::parse("order 42").is_ok());
        assert!(IdempotencyKey::parse(" x").is_err() && IdempotencyKey::parse(&"k".repeat(256)).is_err());
        let cursor = ivr_core::Cursor { created_at_micros: 1_750_000_000_000_000, call_id: ivr_core::CallId::new() };
        assert_eq!(PageCursor::parse(&cursor.to_string()).unwrap().to_cursor(), cursor);
        assert!(PageCursor::parse("abc").is_err() && PageCursor::parse("+1.x").is_err());
        assert_eq!(StatusList::parse("failed,pending").unwrap().statuses().count(), 2);
        for bad in ["", "failed,", ",failed", "lost", "failed, pending"] {
            assert!(StatusList::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_status_pattern_names_every_status() {
        let pattern = (StatusList::RULE.pattern)();
        for status in CallStatus::ALL {
            assert!(pattern.contains(status.as_str()), "{pattern}");
        }
    }

    #[test]
    fn bounded_numbers() {
        type Timeout = Bounded<1, 3600>;
        assert_eq!(Timeout::parse("30", "timeout"), Ok(Bounded(30)));
        for bad in ["0", "3601", "", "+5", " 5", "1.0", "99999999999"] {
            assert!(Timeout::parse(bad, "timeout").is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Timeout>("0").is_err());
        assert!(serde_json::from_str::<Timeout>("1.5").is_err());
        assert!(serde_json::from_str::<Timeout>("-3").is_err());
        assert_eq!(serde_json::from_str::<Timeout>("30.0").unwrap(), Bounded(30));
        assert_eq!(serde_json::from_str::<Timeout>("3600").unwrap(), Bounded(3600));
    }
}
