//! What a caller asks for ([`CallRequest`]) and the checked [`CallSpec`] it becomes: defaults
//! from the settings applied, every field in range. The one place a request is validated.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::follow::AnswerAction;
use super::ManagerSettings;
use crate::call::{CallSpec, CallStatus, PhoneNumber};
use crate::error::{Error, Result};

/// What a caller asks for. Unset fields take the settings' defaults.
///
/// It is also the JSON body of ivr-server's call creation (unknown fields are refused); the
/// idempotency key comes from a header, not the body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// Checked into a [`PhoneNumber`] by validation, so a bad number is
    /// [`Error::InvalidPhoneNumber`] wherever the request came from.
    pub phone_number: Option<String>,
    pub context: Option<String>,
    pub extension: Option<String>,
    pub priority: Option<u32>,
    /// Seconds of ringing before giving up.
    #[serde(rename = "timeout")]
    pub timeout_secs: Option<u32>,
    pub caller_id: Option<String>,
    /// Play this media once answered (e.g. `sound:hello-world`) instead of the dialplan.
    pub audio: Option<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Attempts in all (1 = no retry).
    pub max_attempts: Option<u32>,
    /// Where to POST the call's changes (default: the policy's default URL, if any); checked
    /// against [`CallbackPolicy`](crate::webhook::CallbackPolicy).
    pub status_callback: Option<String>,
    /// Which statuses to POST (default: answered, completed, failed).
    pub status_callback_events: Option<Vec<CallStatus>>,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl CallRequest {
    /// The longest idempotency key accepted, in characters.
    pub const MAX_IDEMPOTENCY_KEY: usize = 255;

    pub fn to(phone_number: PhoneNumber) -> Self {
        CallRequest { phone_number: Some(phone_number.as_str().to_owned()), ..CallRequest::default() }
    }

    /// The spec this request stands for under `settings`, or why it cannot be placed.
    pub fn validate(self, s: &ManagerSettings) -> Result<CallSpec> {
        let number = self.phone_number.ok_or_else(|| Error::InvalidRequest("phone_number is required".into()))?;
        let phone_number = PhoneNumber::parse(&number)?;
        let context = self.context.unwrap_or_else(|| s.default_context.clone());
        let extension = self.extension.unwrap_or_else(|| s.default_extension.clone());
        check_name("context", &context, |c| c.is_ascii_alphanumeric() || "-_.".contains(c))?;
        check_name("extension", &extension, |c| c.is_ascii_alphanumeric() || "-_.+*#".contains(c))?;
        let priority = self.priority.unwrap_or(s.default_priority);
        if priority == 0 {
            return Err(Error::InvalidRequest("priority starts at 1".into()));
        }
        let timeout_secs = self.timeout_secs.unwrap_or(s.default_timeout_secs);
        if !(1..=3600).contains(&timeout_secs) {
            return Err(Error::InvalidRequest(format!("timeout must be 1 to 3600 seconds, not {timeout_secs}")));
        }
        let caller_id = self.caller_id.or_else(|| s.default_caller_id.clone());
        if let Some(caller_id) = &caller_id {
            check_text("caller_id", caller_id, 80)?;
        }
        if let Some(audio) = &self.audio {
            check_text("audio", audio, 256)?;
            let known = ["sound:", "recording:", "number:", "digits:", "characters:", "tone:"];
            if !known.iter().any(|scheme| audio.starts_with(scheme) && audio.len() > scheme.len()) {
                return Err(Error::InvalidRequest(format!(
                    "audio must be a media URI starting with one of {}",
                    known.join(", ")
                )));
            }
        }
        for (name, value) in &self.variables {
            check_name("variable name", name, |c| c.is_ascii_alphanumeric() || "_()".contains(c))?;
            check_text("variable value", value, 1024)?;
        }
        let max_attempts = self.max_attempts.unwrap_or(1);
        if !(1..=s.max_attempts).contains(&max_attempts) {
            return Err(Error::InvalidRequest(format!(
                "max_attempts must be 1 to {}, not {max_attempts}",
                s.max_attempts
            )));
        }
        if let Some(key) = &self.idempotency_key {
            check_text("idempotency key", key, CallRequest::MAX_IDEMPOTENCY_KEY)?;
        }
        let (status_callback, status_callback_events) =
            s.callbacks.resolve(self.status_callback, self.status_callback_events).map_err(Error::InvalidRequest)?;
        Ok(CallSpec {
            phone_number,
            context,
            extension,
            priority,
            caller_id,
            timeout_secs,
            audio: self.audio,
            variables: self.variables,
            max_attempts,
            idempotency_key: self.idempotency_key,
            status_callback,
            status_callback_events,
        })
    }
}

/// What a call does once answered: play its audio, or continue into its dialplan.
pub(crate) fn answer_action(spec: &CallSpec) -> AnswerAction {
    match &spec.audio {
        Some(media) => AnswerAction::Play { media: media.clone() },
        None => AnswerAction::Continue {
            context: spec.context.clone(),
            extension: spec.extension.clone(),
            priority: spec.priority,
        },
    }
}

/// The fields (by their names in the call's JSON) in which `new` differs from `stored`, for a
/// clear refusal of a reused idempotency key. Read from the serialised specs, so a new field is
/// compared without being listed here.
pub(crate) fn differences(stored: &CallSpec, new: &CallSpec) -> Vec<String> {
    let (Ok(serde_json::Value::Object(stored)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(stored), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    stored.iter().filter(|(name, value)| new.get(*name) != Some(value)).map(|(name, _)| name.clone()).collect()
}

fn check_name(what: &str, value: &str, allowed: impl Fn(char) -> bool) -> Result<()> {
    if value.is_empty() || value.len() > 80 {
        return Err(Error::InvalidRequest(format!("{what} must be 1 to 80 characters")));
    }
    match value.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(Error::InvalidRequest(format!("{what} may not contain {c:?}"))),
        None => Ok(()),
    }
}

fn check_text(what: &str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(Error::InvalidRequest(format!("{what} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!("{what} may not contain control characters")));
    }
    Ok(())
}
