//! Callee plans: what the far end of a call does, and how that looks over each channel technology.
//!
//! A [`CalleePlan`] is a technology-neutral description ("rings 2 s, answers, talks 5.5 s, hangs
//! up"). The engine renders it as a script of [`Act`]s: over `Local/<number>@sim` the script is the
//! `[sim]` dialplan the recordings used, step by step (each step is a `ChannelDialplan` event of the
//! `;2` half); over PJSIP it is the SIP responses of the SIPp callee (180, 200, 486, 603, …) with
//! the hangup causes and `tech_cause` values Asterisk reported for them.

use std::time::Duration;

/// What the called party does. The default plan of each test number mirrors the `[sim]` context of
/// the recorded Asterisk (see [`CalleePlan::default_for`]); [`FakeAsterisk::set_plan`] overrides it.
///
/// Over PJSIP (`PJSIP/<number>@trunk`, `PJSIP/callee`) the same plan becomes SIP behaviour:
///
/// | plan | Local `;2` dialplan | PJSIP callee |
/// |---|---|---|
/// | `Answered` | `Ringing, Wait(ring), Answer, Playback(demo-thanks)` for `talk`, `Hangup` | 180, 200 after `ring`, BYE after `talk` |
/// | `LongCall` | `Ringing, Wait(ring), Answer, Wait(talk), Hangup` | 180, 200 after `ring`, BYE after `talk` |
/// | `AnswerAtOnce` | `Answer, Wait(talk), Hangup` | 200 at once (no 180), BYE after `talk` |
/// | `Busy` | `Ringing, Wait(ring), Busy(5)` | 180, 486 after `ring` (cause 17) |
/// | `Congestion` | `Ringing, Wait(ring), Congestion(5)` | 180, 503 after `ring` (cause 34) |
/// | `NoAnswer` | `Ringing, Wait(ring_for), Hangup` | 180, 480 after `ring_for` (cause 19) |
/// | `Rejected` | `Hangup(21)` | 603 at once (cause 21) |
/// | `Unknown` | no such extension | 404 at once (cause 1) |
/// | `Unreachable` | `Wait(60), Hangup` without ringing | no answer to the INVITE at all |
///
/// The originate `timeout` ends any plan that has not answered by then (cause 19), as recorded.
/// PJSIP rows not covered by a recording (BYE from the callee, 503, 480 before the timeout, 404,
/// Local `Unreachable`) are reasoned from Asterisk's SIP-to-cause mapping, not recorded.
///
/// [`FakeAsterisk::set_plan`]: super::FakeAsterisk::set_plan
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CalleePlan {
    /// Rings for `ring`, answers, plays `demo-thanks` to the caller for `talk`, then hangs up.
    /// (+15550000001: 2 s, ~5.52 s.)
    Answered { ring: Duration, talk: Duration },
    /// Rings for `ring`, answers, stays silent for `talk`, then hangs up. (+15550000007: 1 s, 60 s.)
    LongCall { ring: Duration, talk: Duration },
    /// Answers at once without ringing and hangs up after `talk`. (+15550000005: 1 s.)
    AnswerAtOnce { talk: Duration },
    /// Rings for `ring`, then busy. (+15550000002: 1 s.)
    Busy { ring: Duration },
    /// Rings for `ring`, then congestion. (+15550000003: 1 s.)
    Congestion { ring: Duration },
    /// Rings for `ring_for` and gives up; normally the originate timeout ends the call first.
    /// (+15550000004: 60 s.)
    NoAnswer { ring_for: Duration },
    /// Rejects at once with cause 21 "Call Rejected". (+15550000006.)
    Rejected,
    /// The number does not exist. (Any other number.)
    Unknown,
    /// Nothing answers at all, not even with ringing (`callee_down_pjsip`): the channel stays `Down`
    /// until the originate timeout.
    Unreachable,
}

impl CalleePlan {
    /// The plan the recorded `[sim]` dialplan has for `number`, or `None` for a number without an
    /// extension. `callee` (the PJSIP endpoint of the recordings, a SIPp `uas` that answers at once
    /// and never hangs up) is also known.
    pub fn default_for(number: &str) -> Option<CalleePlan> {
        let s = Duration::from_secs;
        Some(match number {
            "+15550000001" => CalleePlan::Answered { ring: s(2), talk: Duration::from_millis(5520) },
            "+15550000002" => CalleePlan::Busy { ring: s(1) },
            "+15550000003" => CalleePlan::Congestion { ring: s(1) },
            "+15550000004" => CalleePlan::NoAnswer { ring_for: s(60) },
            "+15550000005" => CalleePlan::AnswerAtOnce { talk: s(1) },
            "+15550000006" => CalleePlan::Rejected,
            "+15550000007" => CalleePlan::LongCall { ring: s(1), talk: s(60) },
            "callee" => CalleePlan::LongCall { ring: Duration::ZERO, talk: s(3600) },
            _ => return None,
        })
    }
}

/// One step of a callee script. Local scripts use all of them; PJSIP scripts never use `Dp`,
/// `AwaitMedia` or `Playback`.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// The `;2` half runs a dialplan application (a `ChannelDialplan` event, next priority).
    Dp(&'static str, String),
    /// Ringing reaches the caller: the originated channel goes `Ringing`, Dial `RINGING`.
    Ring,
    /// The callee answers.
    Answer,
    /// Local only: `Answer()` waits up to 500 ms for the first media frame from the caller side.
    /// An originated channel parked in Stasis sends none, so the next step comes 0.5 s later
    /// (short_call, get_channel, hangup_answered); a playback or dialplan on the caller side ends
    /// the wait at once (answered_app, answered_play).
    AwaitMedia,
    /// Nothing happens for this long.
    Wait(Duration),
    /// Local only: the `;2` half plays a prompt for this long, then sets `PLAYBACKSTATUS`.
    Playback(Duration),
    /// The callee hangs up (Local `Hangup(cause)`; PJSIP BYE after the answer).
    Hangup(u16),
    /// Local `Busy()`.
    Busy,
    /// Local `Congestion()`.
    Congestion,
    /// PJSIP final failure response before the answer.
    SipFail { cause: u16, tech_cause: u16, dialstatus: &'static str },
}

/// Formats a duration the way the dialplan writes `Wait()` arguments: `2`, `60`, `5.5`.
fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}", d.as_secs_f64())
    }
}

/// The `[sim]` dialplan for `plan`, as run by the Local `;2` half. `None` means "no such extension".
pub(crate) fn local_script(plan: &CalleePlan) -> Option<Vec<Act>> {
    use Act::*;
    let noop = |text: &str| Dp("NoOp", format!("sim: {text}"));
    Some(match *plan {
        CalleePlan::Answered { ring, talk } => vec![
            noop("answered"),
            Dp("Ringing", String::new()),
            Ring,
            Dp("Wait", secs(ring)),
            Wait(ring),
            Dp("Answer", String::new()),
            Answer,
            AwaitMedia,
            Dp("Playback", "demo-thanks".into()),
            Playback(talk),
            Dp("Hangup", String::new()),
            Hangup(16),
        ],
        CalleePlan::LongCall { ring, talk } => vec![
            noop("long answered call"),
            Dp("Ringing", String::new()),
            Ring,
            Dp("Wait", secs(ring)),
            Wait(ring),
            Dp("Answer", String::new()),
            Answer,
            AwaitMedia,
            Dp("Wait", secs(talk)),
            Wait(talk),
            Dp("Hangup", String::new()),
            Hangup(16),
        ],
        CalleePlan::AnswerAtOnce { talk } => vec![
            noop("short call"),
            Dp("Answer", String::new()),
            Answer,
            AwaitMedia,
            Dp("Wait", secs(talk)),
            Wait(talk),
            Dp("Hangup", String::new()),
            Hangup(16),
        ],
        CalleePlan::Busy { ring } => vec![
            noop("busy"),
            Dp("Ringing", String::new()),
            Ring,
            Dp("Wait", secs(ring)),
            Wait(ring),
            Dp("Busy", "5".into()),
            Busy,
        ],
        CalleePlan::Congestion { ring } => vec![
            noop("congestion"),
            Dp("Ringing", String::new()),
            Ring,
            Dp("Wait", secs(ring)),
            Wait(ring),
            Dp("Congestion", "5".into()),
            Congestion,
        ],
        CalleePlan::NoAnswer { ring_for } => vec![
            noop("no answer"),
            Dp("Ringing", String::new()),
            Ring,
            Dp("Wait", secs(ring_for)),
            Wait(ring_for),
            Dp("Hangup", String::new()),
            Hangup(16),
        ],
        CalleePlan::Rejected => vec![noop("rejected"), Dp("Hangup", "21".into()), Hangup(21)],
        CalleePlan::Unknown => return None,
        CalleePlan::Unreachable => vec![
            noop("unreachable"),
            Dp("Wait", "60".into()),
            Wait(Duration::from_secs(60)),
            Dp("Hangup", String::new()),
            Hangup(16),
        ],
    })
}

/// The SIP behaviour of a PJSIP callee following `plan`.
pub(crate) fn pjsip_script(plan: &CalleePlan) -> Vec<Act> {
    use Act::*;
    let fail = |cause, tech_cause, dialstatus| SipFail { cause, tech_cause, dialstatus };
    match *plan {
        CalleePlan::Answered { ring, talk } | CalleePlan::LongCall { ring, talk } => {
            vec![Ring, Wait(ring), Answer, Wait(talk), Hangup(16)]
        }
        CalleePlan::AnswerAtOnce { talk } => vec![Answer, Wait(talk), Hangup(16)],
        CalleePlan::Busy { ring } => vec![Ring, Wait(ring), fail(17, 486, "BUSY")],
        CalleePlan::Congestion { ring } => vec![Ring, Wait(ring), fail(34, 503, "CONGESTION")],
        CalleePlan::NoAnswer { ring_for } => vec![Ring, Wait(ring_for), fail(19, 480, "NOANSWER")],
        CalleePlan::Rejected => vec![fail(21, 603, "NOANSWER")],
        CalleePlan::Unknown => vec![fail(1, 404, "NOANSWER")],
        CalleePlan::Unreachable => Vec::new(),
    }
}

/// A step of the dialplan the originated channel runs after `continue` or a dialplan originate.
#[derive(Debug, Clone)]
pub(crate) struct MenuStep {
    pub app: &'static str,
    pub data: &'static str,
    pub kind: MenuKind,
}

#[derive(Debug, Clone)]
pub(crate) enum MenuKind {
    Plain,
    Playback(Duration),
    Wait(Duration),
    Hangup,
    Goto(&'static str, &'static str, usize),
}

/// The recorded `[ivr-menu]` context: extension `s` (and `1000`, which jumps to it). `None` for
/// any other context or extension.
pub(crate) fn menu_steps(context: &str, exten: &str) -> Option<Vec<MenuStep>> {
    if context != "ivr-menu" {
        return None;
    }
    let step = |app, data, kind| MenuStep { app, data, kind };
    match exten {
        "s" => Some(vec![
            step("NoOp", "ivr-menu: IVR entry", MenuKind::Plain),
            step("Answer", "", MenuKind::Plain),
            step("Playback", "hello-world", MenuKind::Playback(sound_duration("hello-world").unwrap_or_default())),
            step("Wait", "2", MenuKind::Wait(Duration::from_secs(2))),
            step("Hangup", "", MenuKind::Hangup),
        ]),
        "1000" => Some(vec![step("Goto", "ivr-menu,s,1", MenuKind::Goto("ivr-menu", "s", 1))]),
        _ => None,
    }
}

/// How long the built-in sounds play, taken from the recordings (`hello-world` 1.42 s,
/// `demo-congrats` 30.28 s, `demo-thanks` 5.52 s). `silence/N` lasts N seconds.
pub(crate) fn sound_duration(name: &str) -> Option<Duration> {
    match name {
        "hello-world" => Some(Duration::from_millis(1420)),
        "demo-congrats" => Some(Duration::from_millis(30280)),
        "demo-thanks" => Some(Duration::from_millis(5520)),
        "beep" => Some(Duration::from_millis(250)),
        _ => {
            let n: u64 = name.strip_prefix("silence/")?.parse().ok()?;
            (1..=10).contains(&n).then(|| Duration::from_secs(n))
        }
    }
}
