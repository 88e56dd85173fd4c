//! Retention: phone numbers are personal data, so ended calls are not kept for ever.
//!
//! With `CALL_RETENTION_DAYS` set, [`Retention::run`] deletes every call that ended more than
//! that many days ago, with its history, at start and then every [`PURGE_INTERVAL`], through
//! [`CallStore::purge_ended`] (batches of [`ivr_core::store::PURGE_BATCH`], so the database
//! is never locked for long). Each run that deletes anything logs a line with the count and
//! adds it to `ivr_calls_purged_total`. `ivr-server purge --before DATE` does the same once,
//! on demand ([`parse_cutoff`] reads its DATE).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ivr_core::CallStore;
use prometheus::{IntCounter, Registry};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime};

/// How often the retention task purges, after its first run at start.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// The retention task's handle: the store, how long ended calls are kept, and its counter.
#[derive(Clone)]
pub struct Retention {
    store: Arc<dyn CallStore>,
    keep: Duration,
    purged: IntCounter,
}

impl Retention {
    /// Keeps ended calls in `store` for `keep`; registers `ivr_calls_purged_total` in `registry`.
    pub fn new(store: Arc<dyn CallStore>, keep: Duration, registry: &Registry) -> prometheus::Result<Self> {
        let purged =
            IntCounter::new("ivr_calls_purged_total", "Ended calls deleted by retention (CALL_RETENTION_DAYS)")?;
        registry.register(Box::new(purged.clone()))?;
        Ok(Retention { store, keep, purged })
    }

    /// The instant before which ended calls are deleted now.
    pub fn cutoff(&self) -> OffsetDateTime {
        ivr_core::call::now() - self.keep
    }

    /// One purge of every call that ended before [`cutoff`](Self::cutoff); returns the count.
    pub async fn purge_once(&self) -> ivr_core::Result<u64> {
        let before = self.cutoff();
        let purged = self.store.purge_ended(before).await?;
        self.purged.inc_by(purged);
        if purged > 0 {
            tracing::info!(purged, before = %before.format(&Rfc3339).unwrap_or_default(), "retention: ended calls deleted");
        }
        Ok(purged)
    }

    /// Purges at once, then every [`PURGE_INTERVAL`], until `shutdown` completes. A purge
    /// that fails (the store is down) is logged and tried again at the next interval.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let days = self.keep.as_secs() / 86_400;
        tracing::info!(days, "retention: ended calls are deleted after CALL_RETENTION_DAYS");
        let mut ticks = tokio::time::interval(PURGE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = &mut shutdown => return,
                result = self.purge_once() => if let Err(e) = result {
                    tracing::warn!(error = %e, "retention: purge failed; trying again in an hour");
                },
            }
        }
    }
}

/// A purge cutoff: an RFC 3339 date-time (`2026-01-31T12:00:00Z`, any offset) or a full date
/// (`2026-01-31`, midnight UTC). The error says which forms are accepted.
pub fn parse_cutoff(text: &str) -> Result<OffsetDateTime, String> {
    let bad = || {
        format!("--before {text:?} is not a date: expected an RFC 3339 date (2026-01-31) or date-time (2026-01-31T12:00:00Z)")
    };
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let mut parts = text.split('-');
    let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 || !text.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(bad());
    }
    let number = |s: &str| s.parse::<u16>().map_err(|_| bad());
    let month = Month::try_from(number(m)? as u8).map_err(|_| bad())?;
    let date = Date::from_calendar_date(i32::from(number(y)?), month, number(d)? as u8).map_err(|_| bad())?;
    Ok(date.midnight().assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_are_rfc_3339_dates_or_date_times() {
        let at = |s: &str| parse_cutoff(s).map(|t| t.unix_timestamp());
        assert_eq!(at("2026-01-31"), Ok(1_769_817_600), "a date is midnight UTC");
        assert_eq!(at("2026-01-31T00:00:00Z"), Ok(1_769_817_600));
        assert_eq!(at("2026-01-31T02:00:00+02:00"), Ok(1_769_817_600), "offsets are honoured");
        assert_eq!(parse_cutoff("2026-01-31T00:00:00.25Z").unwrap().millisecond(), 250);
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2026-1-31",
            "31/01/2026",
            "2026-01-31T25:00:00Z",
            "2026-01-31 00:00",
            "+2026-01-31",
            "2026-01-31-01",
        ] {
            let e = parse_cutoff(bad).unwrap_err();
            assert!(e.contains("RFC 3339") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
