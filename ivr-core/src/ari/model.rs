//! ARI's resources as ivr uses them: channels, playbacks, Asterisk info, applications, and
//! the originate request. Field names follow ARI's JSON; unknown fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A channel's state as ARI spells it. The originated channel goes `Down` → `Ringing` → `Up`;
/// a Local channel's `;2` half shows `Ring`, and `Busy` on Busy() or Congestion().
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelState {
    Down,
    Rsrvd,
    OffHook,
    Dialing,
    Ring,
    Ringing,
    Up,
    Busy,
    #[serde(rename = "Dialing Offhook")]
    DialingOffhook,
    #[serde(rename = "Pre-ring")]
    PreRing,
    /// `Unknown`, or a state this version does not know.
    #[serde(other)]
    Unknown,
}

/// Caller or connected-line identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerId {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub number: String,
}

/// Where a channel is in the dialplan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialplanLocation {
    #[serde(default)]
    pub context: String,
    #[serde(default)]
    pub exten: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub app_name: String,
    #[serde(default)]
    pub app_data: String,
}

/// An ARI channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub state: ChannelState,
    #[serde(default)]
    pub protocol_id: String,
    #[serde(default)]
    pub caller: CallerId,
    #[serde(default)]
    pub connected: CallerId,
    #[serde(default)]
    pub accountcode: String,
    #[serde(default)]
    pub dialplan: Option<DialplanLocation>,
    #[serde(default)]
    pub creationtime: String,
    #[serde(default)]
    pub language: String,
}

/// A playback started by [`AriClient::play`](super::AriClient::play). Its `state` is
/// `queued` in the 201 answer, then `playing`, and finally `done` or `failed` in events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Playback {
    pub id: String,
    pub media_uri: String,
    /// `channel:<id>` for a playback on a channel.
    pub target_uri: String,
    #[serde(default)]
    pub language: String,
    pub state: String,
}

impl Playback {
    /// The channel id of a `channel:<id>` target.
    pub fn channel_id(&self) -> Option<&str> {
        self.target_uri.strip_prefix("channel:")
    }
}

/// `GET /asterisk/info`. Only `status` matters to ivr: its `startup_time` changes when
/// Asterisk restarts, which means every channel is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsteriskInfo {
    #[serde(default)]
    pub status: Option<AsteriskStatus>,
    #[serde(default)]
    pub build: Option<serde_json::Value>,
    #[serde(default)]
    pub system: Option<serde_json::Value>,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsteriskStatus {
    pub startup_time: String,
    #[serde(default)]
    pub last_reload_time: String,
}

/// A Stasis application and what it is subscribed to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub channel_ids: Vec<String>,
    #[serde(default)]
    pub bridge_ids: Vec<String>,
    #[serde(default)]
    pub endpoint_ids: Vec<String>,
    #[serde(default)]
    pub device_names: Vec<String>,
}

/// Where an originated channel goes once the callee answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginateTarget {
    /// Into a Stasis application (`app`, `appArgs`): the channel is subscribed at once and
    /// its events come to that application from the first ring.
    App { app: String, app_args: Option<String> },
    /// Straight into the dialplan. Note: without `subscribeAll` or an explicit subscription
    /// the application then receives no events for the channel at all.
    Dialplan { context: String, extension: String, priority: u32 },
}

/// `POST /channels` with a caller-chosen channel id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginateRequest {
    /// A dial string such as `PJSIP/+15550000001@trunk` or `Local/+15550000001@sim`.
    pub endpoint: String,
    /// The id the channel gets; events can arrive before the response, so this is how they
    /// are matched. Reusing a live id gives 409.
    pub channel_id: String,
    pub target: OriginateTarget,
    /// e.g. `"IVR" <+15559990000>`.
    pub caller_id: Option<String>,
    /// Seconds to wait for an answer.
    pub timeout_secs: Option<u32>,
    pub variables: BTreeMap<String, String>,
}
