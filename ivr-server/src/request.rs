//! What the API reads: the call body, the token form and the list query. Each is one type
//! that both parses the request and, through its utoipa derive, is the OpenAPI document's
//! schema of it (its values are the rule types of [`crate::fields`]).
//!
//! `null` for an optional body field means "not given" (the default applies); the document
//! says so by making those fields nullable.

use std::collections::BTreeMap;

use ivr_core::{CallQuery, CallRequest, CallStatus};
use serde::Deserialize;
use serde_json::json;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::fields::{
    Audio, CallbackUrl, CallerId, Context, Extension, MaxAttempts, PageCursor, PageSize, PhoneText, Priority,
    RingTimeout, StatusList, Timestamp, VariableName, VariableValue,
};
use crate::problem::Problem;
use crate::view::StatusSchema;

/// The JSON body of `POST /api/v1/calls`; the body of `POST /api/v1/interaction/{number}` is
/// the same without `phone_number` (the `CallOptions` schema). Unknown fields are refused.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CallRequest, example = json!({"phone_number": "+15550000001", "timeout": 30}))]
pub struct CallBody {
    /// The number to call.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = PhoneText, required = true)]
    pub phone_number: Option<PhoneText>,
    /// Dialplan context once answered (default: DEFAULT_CONTEXT).
    pub context: Option<Context>,
    /// Dialplan extension once answered (default: DEFAULT_EXTENSION).
    pub extension: Option<Extension>,
    /// Dialplan priority once answered (default: DEFAULT_PRIORITY).
    #[schema(inline)]
    pub priority: Option<Priority>,
    /// Seconds of ringing before giving up (default: DEFAULT_TIMEOUT).
    #[schema(inline)]
    pub timeout: Option<RingTimeout>,
    /// The caller id to present (default: DEFAULT_CALLER_ID, else Asterisk's).
    pub caller_id: Option<CallerId>,
    /// Media to play once answered instead of the dialplan.
    pub audio: Option<Audio>,
    /// Channel variables to set.
    pub variables: Option<BTreeMap<VariableName, VariableValue>>,
    /// Attempts in all, retrying on busy, no answer or congestion (default 1; at most
    /// MAX_ATTEMPTS).
    #[schema(inline)]
    pub max_attempts: Option<MaxAttempts>,
    /// Where to POST the call's status changes (default: WEBHOOK_DEFAULT_URL, if set).
    pub status_callback: Option<CallbackUrl>,
    /// The statuses to POST, at least one (default: answered, completed, failed).
    #[schema(value_type = Option<Vec<StatusSchema>>, min_items = 1)]
    pub status_callback_events: Option<Vec<CallStatus>>,
}

/// The schema of the optional body of `POST /api/v1/interaction/{number}`: [`CallBody`]'s
/// without `phone_number` (the path gives it), read by the same parser.
pub struct CallOptions;

impl PartialSchema for CallOptions {
    fn schema() -> RefOr<Schema> {
        let mut schema = CallBody::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.properties.shift_remove("phone_number");
            object.required.retain(|name| name != "phone_number");
            object.description = Some("The options of a call: every field may be left out or null.".into());
            object.example = Some(json!({"timeout": 30, "audio": "sound:hello-world"}));
        }
        schema
    }
}

impl ToSchema for CallOptions {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <CallBody as ToSchema>::schemas(schemas);
    }
}

/// `phone_number` may be left out (the interaction route) but not given as null.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<PhoneText>, D::Error> {
    PhoneText::deserialize(deserializer).map(Some)
}

impl CallBody {
    /// Reads a JSON body.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        serde_json::from_slice(bytes).map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))
    }

    /// Reads the options body of the interaction route, where `null` (like no body) means
    /// every default.
    pub fn options_from_json(bytes: &[u8]) -> Result<Self, Problem> {
        serde_json::from_slice::<Option<CallBody>>(bytes)
            .map(Option::unwrap_or_default)
            .map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))
    }

    /// The engine's request for `phone_number` (checked) with these options.
    pub fn into_request(self, phone_number: &PhoneText, idempotency_key: Option<String>) -> CallRequest {
        CallRequest {
            phone_number: Some(phone_number.as_str().to_owned()),
            context: self.context.map(Context::into_string),
            extension: self.extension.map(Extension::into_string),
            priority: self.priority.map(|n| n.0),
            timeout_secs: self.timeout.map(|n| n.0),
            caller_id: self.caller_id.map(CallerId::into_string),
            audio: self.audio.map(Audio::into_string),
            variables: self
                .variables
                .unwrap_or_default()
                .into_iter()
                .map(|(name, value)| (name.into_string(), value.into_string()))
                .collect(),
            max_attempts: self.max_attempts.map(|n| n.0),
            status_callback: self.status_callback.map(CallbackUrl::into_string),
            status_callback_events: self.status_callback_events,
            idempotency_key,
        }
    }
}

/// The OAuth2 password grant's form (`application/x-www-form-urlencoded`). Other fields are
/// refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenForm {
    /// Only `password`; may be left out.
    #[schema(nullable = false)]
    pub grant_type: Option<GrantType>,
    pub username: String,
    pub password: String,
    /// Accepted and ignored (OAuth2 clients send it).
    #[schema(nullable = false)]
    pub scope: Option<String>,
    /// Accepted and ignored.
    #[schema(nullable = false)]
    pub client_id: Option<String>,
    /// Accepted and ignored.
    #[schema(nullable = false)]
    pub client_secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    Password,
}

impl TokenForm {
    /// Reads the form. A `grant_type` other than `password` is `unsupported_grant_type`, any
    /// other fault `invalid_request` (RFC 6749 §5.2).
    pub fn parse(body: &[u8]) -> Result<Self, Problem> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        if let Some((_, value)) = pairs.iter().find(|(k, v)| k == "grant_type" && v != "password") {
            return Err(Problem::bad_request(format!(
                "unsupported grant_type {value:?}: only \"password\" is supported"
            ))
            .with("error", "unsupported_grant_type"));
        }
        let invalid = |detail: String| Problem::bad_request(detail).with("error", "invalid_request");
        let mut fields = serde_json::Map::new();
        for (key, value) in pairs {
            if fields.contains_key(&key) {
                return Err(invalid(format!("the form gives {key} twice")));
            }
            fields.insert(key, value.into());
        }
        serde_json::from_value(fields.into()).map_err(|e| invalid(format!("invalid form: {e}")))
    }
}

/// The query of `GET /api/v1/calls`. Unknown parameters are refused.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only calls in one of these statuses: repeat the parameter, or separate names with
    /// commas.
    #[param(style = Form, explode, nullable = false)]
    pub status: Option<Vec<StatusList>>,
    /// Only calls created at or after this time.
    #[param(inline, nullable = false)]
    pub from: Option<Timestamp>,
    /// Only calls created before this time.
    #[param(inline, nullable = false)]
    pub to: Option<Timestamp>,
    /// Only calls to this number. (A `+` sent unencoded arrives as a space, and is read as
    /// the `+` it was.)
    #[param(nullable = false)]
    pub phone_number: Option<PhoneText>,
    /// Calls per page (default 100).
    #[param(inline, nullable = false)]
    pub limit: Option<PageSize>,
    /// The `next_cursor` of the previous page.
    #[param(nullable = false)]
    pub cursor: Option<PageCursor>,
}

impl ListQuery {
    /// The parameters the query may have, as documented.
    pub const NAMES: [&'static str; 6] = ["status", "from", "to", "phone_number", "limit", "cursor"];

    /// Reads a query string. A `+` that arrives as a space (form encoding) is read as `+`.
    pub fn parse(query: &str) -> Result<Self, Problem> {
        let mut q = ListQuery::default();
        let bad = |detail: String| Problem::bad_request(detail);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "status" => q.status.get_or_insert_with(Vec::new).push(StatusList::parse(&value).map_err(bad)?),
                "from" => q.from = Some(Timestamp::parse(&value, "from").map_err(bad)?),
                "to" => q.to = Some(Timestamp::parse(&value, "to").map_err(bad)?),
                "phone_number" => {
                    let number = match value.strip_prefix(' ') {
                        Some(rest) => format!("+{rest}"),
                        None => value.into_owned(),
                    };
                    let number = PhoneText::parse(&number).map_err(|e| Problem::new("invalid-phone-number", e))?;
                    q.phone_number = Some(number);
                }
                "limit" => q.limit = Some(PageSize::parse(&value, "limit").map_err(bad)?),
                "cursor" => q.cursor = Some(PageCursor::parse(&value).map_err(bad)?),
                other => {
                    return Err(bad(format!("unknown query parameter {other:?}; known: {}", Self::NAMES.join(", "))))
                }
            }
        }
        Ok(q)
    }

    /// The store's query.
    pub fn to_call_query(&self) -> CallQuery {
        let mut q = CallQuery::default();
        for status in self.status.iter().flatten().flat_map(StatusList::statuses) {
            if !q.statuses.contains(&status) {
                q.statuses.push(status);
            }
        }
        q.created_from = self.from.map(|t| t.0);
        q.created_to = self.to.map(|t| t.0);
        q.phone_number = self.phone_number.as_ref().map(PhoneText::to_phone_number);
        if let Some(limit) = self.limit {
            q.limit = limit.0 as usize;
        }
        q.after = self.cursor.as_ref().map(PageCursor::to_cursor);
        q
    }
}

#[cfg(test)]
mod tests {
    use hyper::StatusCode;
    use ivr_core::CallStatus;

    use super::*;

    #[test]
    fn list_query() {
        let q = ListQuery::parse("status=failed,completed&status=failed&limit=5&phone_number=+15550000001&from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00+01:00").unwrap().to_call_query();
        assert_eq!(q.statuses, vec![CallStatus::Failed, CallStatus::Completed]);
        assert_eq!(q.limit, 5);
        assert_eq!(q.phone_number.unwrap().as_str(), "+15550000001");
        assert!(q.created_from.is_some() && q.created_to.is_some());
        for bad in [
            "status=lost",
            "status=",
            "limit=0",
            "limit=1001",
            "from=yesterday",
            "cursor=abc",
            "phone_number=12a",
            "phone_number=",
            "x=1",
        ] {
            let p = ListQuery::parse(bad).unwrap_err();
            assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn every_documented_parameter_is_read() {
        use utoipa::IntoParams as _;
        let documented: Vec<String> = ListQuery::into_params(|| None).into_iter().map(|p| p.name).collect();
        assert_eq!(documented, ListQuery::NAMES);
        for name in ListQuery::NAMES {
            let p = ListQuery::parse(&format!("{name}=?")).unwrap_err();
            assert!(!p.detail.contains("unknown query parameter"), "{name}: {}", p.detail);
        }
    }

    #[test]
    fn call_body_nulls_and_limits() {
        let body =
            CallBody::from_json(br#"{"phone_number": "+15550000001", "caller_id": null, "timeout": null}"#).unwrap();
        assert!(body.caller_id.is_none() && body.timeout.is_none());
        for bad in [
            r#"{"phone_number": null}"#,
            r#"{"phone_number": "+15550000001", "context": ""}"#,
            r#"{"phone_number": "+15550000001", "extension": ""}"#,
            r#"{"phone_number": "+15550000001", "caller_id": ""}"#,
            r#"{"phone_number": "+15550000001", "audio": ""}"#,
            r#"{"phone_number": "+15550000001", "timeout": 0}"#,
            r#"{"phone_number": "+15550000001", "priority": 0}"#,
            r#"{"phone_number": "+15550000001", "priority": 1.5}"#,
            r#"{"phone_number": "+15550000001", "priority": -1}"#,
            r#"{"phone_number": "+15550000001", "variables": {"a b": "x"}}"#,
            r#"{"phone_number": "+15550000001", "extra": 1}"#,
        ] {
            let p = CallBody::from_json(bad.as_bytes()).unwrap_err();
            assert_eq!(p.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn token_form() {
        let form = TokenForm::parse(b"grant_type=password&username=demo&password=pw&scope=").unwrap();
        assert_eq!((form.username.as_str(), form.password.as_str()), ("demo", "pw"));
        let p = TokenForm::parse(b"grant_type=client_credentials&username=a&password=b").unwrap_err();
        assert_eq!(p.extra["error"], "unsupported_grant_type");
        for bad in [&b"username=a"[..], b"username=a&password=b&extra=1", b"username=a&username=b&password=c"] {
            let p = TokenForm::parse(bad).unwrap_err();
            assert_eq!(p.extra["error"], "invalid_request", "{}", String::from_utf8_lossy(bad));
        }
    }
}
