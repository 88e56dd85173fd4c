//! A call as a few hundred bytes: how the memory store keeps ended calls.
//!
//! Integers are LEB128 varints, instants microseconds since the epoch (what every store keeps),
//! strings a varint length and their UTF-8, enums their index in `ALL`, an `Option` a 0/1 tag.
//! The fields go in the order of the struct; [`decode`] reads back exactly what [`encode`]
//! wrote (a unit test round-trips every field), so a changed `Call` changes both here.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::{from_micros, micros};
use crate::call::{Call, CallId, CallSpec, CallStatus, FailureReason, Hangup, PhoneNumber, TransitionRecord};

/// `call` as bytes.
pub(crate) fn encode(call: &Call) -> Box<[u8]> {
    let mut w = Vec::with_capacity(384);
    w.extend_from_slice(call.call_id.as_uuid().as_bytes());
    let spec = &call.spec;
    text(&mut w, spec.phone_number.as_str());
    text(&mut w, &spec.context);
    text(&mut w, &spec.extension);
    uint(&mut w, spec.priority.into());
    option(&mut w, spec.caller_id.as_deref(), text);
    uint(&mut w, spec.timeout_secs.into());
    option(&mut w, spec.audio.as_deref(), text);
    uint(&mut w, spec.variables.len() as u64);
    for (name, value) in &spec.variables {
        text(&mut w, name);
        text(&mut w, value);
    }
    uint(&mut w, spec.max_attempts.into());
    option(&mut w, spec.idempotency_key.as_deref(), text);
    option(&mut w, spec.status_callback.as_deref(), text);
    uint(&mut w, spec.status_callback_events.len() as u64);
    for event in &spec.status_callback_events {
        status(&mut w, *event);
    }
    status(&mut w, call.status);
    option(&mut w, call.channel.as_deref(), text);
    instant(&mut w, call.created_at);
    for at in [call.sent_at, call.dialed_at, call.ringing_at, call.answered_at, call.ended_at] {
        option(&mut w, at, instant);
    }
    option(&mut w, call.failure_reason, reason);
    option(&mut w, call.hangup.as_ref(), |w, h| {
        uint(w, h.code.into());
        text(w, &h.text);
    });
    uint(&mut w, call.attempt_number.into());
    uint(&mut w, call.history.len() as u64);
    for record in &call.history {
        status(&mut w, record.status);
        instant(&mut w, record.at);
        uint(&mut w, record.attempt.into());
        option(&mut w, record.failure_reason, reason);
        text(&mut w, &record.cause);
    }
    w.into_boxed_slice()
}

/// The call [`encode`] wrote; `None` for bytes it did not write.
pub(crate) fn decode(bytes: &[u8]) -> Option<Call> {
    let mut r = Reader(bytes);
    let call_id = CallId::from_uuid(uuid::Uuid::from_bytes(r.take(16)?.try_into().ok()?));
    let spec = CallSpec {
        phone_number: PhoneNumber::parse(&r.text()?).ok()?,
        context: r.text()?,
        extension: r.text()?,
        priority: r.u32()?,
        caller_id: r.option(Reader::text)?,
        timeout_secs: r.u32()?,
        audio: r.option(Reader::text)?,
        variables: {
            let n = r.uint()?;
            let mut variables = BTreeMap::new();
            for _ in 0..n {
                variables.insert(r.text()?, r.text()?);
            }
            variables
        },
        max_attempts: r.u32()?,
        idempotency_key: r.option(Reader::text)?,
        status_callback: r.option(Reader::text)?,
        status_callback_events: (0..r.uint()?).map(|_| r.status()).collect::<Option<_>>()?,
    };
    let status = r.status()?;
    let channel = r.option(Reader::text)?;
    let created_at = r.instant()?;
    let mut call = Call::new(call_id, spec, created_at);
    call.status = status;
    call.channel = channel;
    call.sent_at = r.option(Reader::instant)?;
    call.dialed_at = r.option(Reader::instant)?;
    call.ringing_at = r.option(Reader::instant)?;
    call.answered_at = r.option(Reader::instant)?;
    call.ended_at = r.option(Reader::instant)?;
    call.failure_reason = r.option(Reader::reason)?;
    call.hangup = r.option(|r| Some(Hangup { code: u16::try_from(r.uint()?).ok()?, text: r.text()? }))?;
    call.attempt_number = r.u32()?;
    let n = r.uint()?;
    call.history = (0..n)
        .map(|_| {
            Some(TransitionRecord {
                status: r.status()?,
                at: r.instant()?,
                attempt: r.u32()?,
                failure_reason: r.option(Reader::reason)?,
                cause: r.text()?,
            })
        })
        .collect::<Option<_>>()?;
    r.0.is_empty().then_some(call)
}

fn uint(w: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        w.push((n as u8) | 0x80);
        n >>= 7;
    }
    w.push(n as u8);
}

fn text(w: &mut Vec<u8>, s: &str) {
    uint(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

fn instant(w: &mut Vec<u8>, at: OffsetDateTime) {
    // Zig-zag, so an instant before the epoch stays short too.
    let us = micros(at);
    uint(w, ((us << 1) ^ (us >> 63)) as u64);
}

fn status(w: &mut Vec<u8>, s: CallStatus) {
    w.push(CallStatus::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8);
}

fn reason(w: &mut Vec<u8>, r: FailureReason) {
    w.push(FailureReason::ALL.iter().position(|x| *x == r).unwrap_or(0) as u8);
}

fn option<T>(w: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            write(w, v);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn uint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.uint()?).ok()
    }

    fn text(&mut self) -> Option<String> {
        let n = usize::try_from(self.uint()?).ok()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn instant(&mut self) -> Option<OffsetDateTime> {
        let z = self.uint()?;
        from_micros(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn status(&mut self) -> Option<CallStatus> {
        CallStatus::ALL.get(usize::from(self.byte()?)).copied()
    }

    fn reason(&mut self) -> Option<FailureReason> {
        FailureReason::ALL.get(usize::from(self.byte()?)).copied()
    }

    fn option<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.byte()? {
            0 => Some(None),
            1 => read(self).map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{Step, Transition};

    #[test]
    fn every_field_round_trips() {
        let mut spec = crate::store::conformance::new_call("+15550000001");
        spec.audio = Some("sound:héllo-wörld".into());
        spec.variables.insert("CALLERNAME".into(), "Zoë ☎".into());
        spec.idempotency_key = Some("key-1".into());
        spec.max_attempts = 3;
        spec.status_callback = Some("http://hooks.example/ivr".into());
        spec.status_callback_events = vec![CallStatus::Answered, CallStatus::Completed];
        let mut call = Call::new(CallId::new(), spec, crate::call::now());
        let ended = Step::Ended { reason_if_unanswered: FailureReason::Busy };
        for t in [
            Transition::new(Step::Sent, "sent"),
            Transition::new(Step::Dialing, "originate").channel("PJSIP/trunk-0001"),
            Transition::new(ended, "ChannelDestroyed").hangup(Hangup { code: 17, text: "User busy".into() }),
        ] {
            call.apply(&t).unwrap();
        }
        let bytes = encode(&call);
        assert_eq!(decode(&bytes).as_ref(), Some(&call));
        // A call before the epoch, and bytes cut short, or with a byte too many.
        call.created_at = OffsetDateTime::from_unix_timestamp_nanos(-1_234_567_000).unwrap();
        assert_eq!(decode(&encode(&call)), Some(call));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }
}
