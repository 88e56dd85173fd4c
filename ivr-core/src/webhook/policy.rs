//! Which status-callback URLs a call may name: no SSRF.
//!
//! A client must not be able to make ivr POST into the operator's private network, so a
//! call's `status_callback` must name a host the operator listed (`WEBHOOK_ALLOWED_HOSTS`:
//! `host` allows any port, `host:port` that port only); the default URL's host is always
//! allowed. Only `http://`: this build has no TLS client (see the README), so an `https://`
//! URL is refused with a reason rather than accepted and never delivered. User info in the URL
//! is refused too: credentials would end up in logs and in the deliveries view.

use url::Url;

use crate::call::CallStatus;

/// The statuses told when a call names none: the answer and the end.
pub const DEFAULT_EVENTS: [CallStatus; 3] = [CallStatus::Answered, CallStatus::Completed, CallStatus::Failed];

/// The operator's rules for status callbacks. `Default` is off: no call may name a callback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallbackPolicy {
    /// Whether callbacks can be sent at all (a signing secret is configured).
    pub enabled: bool,
    /// Used when a call names no `status_callback` (WEBHOOK_DEFAULT_URL); its host is allowed.
    pub default_url: Option<String>,
    /// `host` or `host:port` entries, lower case (WEBHOOK_ALLOWED_HOSTS).
    pub allowed_hosts: Vec<String>,
}

/// An entry of WEBHOOK_ALLOWED_HOSTS that is not `host` or `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a host or host:port")]
pub struct InvalidHost(pub String);

impl CallbackPolicy {
    /// Checks one allowed-hosts entry, as the settings read it.
    pub fn parse_host(entry: &str) -> Result<String, InvalidHost> {
        let entry = entry.trim().to_ascii_lowercase();
        let url = Url::parse(&format!("http://{entry}/")).map_err(|_| InvalidHost(entry.clone()))?;
        let host = url.host_str().ok_or_else(|| InvalidHost(entry.clone()))?;
        let expected = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        // `host:80` loses its port in a URL (the scheme's default); keep what was written.
        if expected != entry && format!("{expected}:80") != entry {
            return Err(InvalidHost(entry));
        }
        Ok(entry)
    }

    /// The callback URL and events a call gets from what it asked for, or why it is refused.
    pub fn resolve(
        &self,
        url: Option<String>,
        events: Option<Vec<CallStatus>>,
    ) -> Result<(Option<String>, Vec<CallStatus>), String> {
        let url = match url {
            Some(url) => {
                self.check(&url)?;
                Some(url)
            }
            None => self.default_url.clone(),
        };
        let events = match events {
            None => DEFAULT_EVENTS.to_vec(),
            Some(events) if events.is_empty() => {
                return Err("status_callback_events must name at least one status (or be left out)".into())
            }
            // Progress order, each once.
            Some(events) => CallStatus::ALL.into_iter().filter(|s| events.contains(s)).collect(),
        };
        Ok((url, events))
    }

    /// Why `url` may not be a call's status callback, if it may not.
    pub fn check(&self, url: &str) -> Result<(), String> {
        if !self.enabled {
            return Err("status callbacks are not enabled on this server (WEBHOOK_SECRET is not set)".into());
        }
        if url.len() > 2048 || url.chars().any(char::is_control) {
            return Err("status_callback must be a URL of at most 2048 characters".into());
        }
        let parsed = Url::parse(url).map_err(|e| format!("status_callback is not an absolute URL: {e}"))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err("status_callback must be an http:// URL: this server has no TLS client for https \
                     callbacks (terminate TLS in front of the receiver, or relay)"
                    .into())
            }
            other => return Err(format!("status_callback must be an http:// URL, not {other}:")),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("status_callback may not carry credentials (user:password@)".into());
        }
        if self.allows(&parsed) {
            Ok(())
        } else {
            let host = parsed.host_str().unwrap_or_default();
            Err(format!("status_callback's host {host} is not one of WEBHOOK_ALLOWED_HOSTS"))
        }
    }

    /// Every host a callback may name with its port (`None`: any port): the allowed hosts,
    /// then the default URL's host and port.
    pub fn allowed_authorities(&self) -> Vec<(String, Option<u16>)> {
        let mut all: Vec<(String, Option<u16>)> = self
            .allowed_hosts
            .iter()
            .filter_map(|entry| {
                let url = Url::parse(&format!("http://{entry}/")).ok()?;
                let port = url.port().or_else(|| entry.ends_with(":80").then_some(80));
                Some((url.host_str()?.to_owned(), port))
            })
            .collect();
        if let Some(url) = self.default_url.as_deref().and_then(|d| Url::parse(d).ok()) {
            if let Some(host) = url.host_str() {
                all.push((host.to_owned(), url.port_or_known_default()));
            }
        }
        all
    }

    fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let port = url.port_or_known_default().unwrap_or(80);
        let with_port = format!("{host}:{port}");
        let default = self.default_url.as_deref().and_then(|d| Url::parse(d).ok());
        let default_ok = default.is_some_and(|d| d.host_str() == Some(host) && d.port_or_known_default() == Some(port));
        default_ok || self.allowed_hosts.iter().any(|entry| *entry == host || *entry == with_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CallbackPolicy {
        CallbackPolicy {
            enabled: true,
            default_url: Some("http://default.example:9000/hook".into()),
            allowed_hosts: ["hooks.example", "127.0.0.1:8080", "[::1]:81"]
                .iter()
                .map(|h| CallbackPolicy::parse_host(h).unwrap())
                .collect(),
        }
    }

    #[test]
    fn allowed_hosts_and_ports() {
        let p = policy();
        for ok in [
            "http://hooks.example/a",
            "http://HOOKS.example:1234/a?b=c",
            "http://127.0.0.1:8080/x",
            "http://[::1]:81/",
            "http://default.example:9000/other",
        ] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("http://127.0.0.1:8081/x", "not one of WEBHOOK_ALLOWED_HOSTS"),
            ("http://169.254.169.254/latest/meta-data", "not one of WEBHOOK_ALLOWED_HOSTS"),
            ("http://default.example/hook", "not one of WEBHOOK_ALLOWED_HOSTS"),
            ("http://hooks.example.evil.test/", "not one of WEBHOOK_ALLOWED_HOSTS"),
            ("http://user:pw@hooks.example/", "credentials"),
            ("https://hooks.example/", "no TLS client"),
            ("ftp://hooks.example/", "http:// URL"),
            ("/relative", "not an absolute URL"),
        ] {
            let err = p.check(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let off = CallbackPolicy { enabled: false, ..policy() };
        assert!(off.check("http://hooks.example/").unwrap_err().contains("WEBHOOK_SECRET"));
    }

    #[test]
    fn resolve_defaults() {
        let p = policy();
        assert_eq!(p.resolve(None, None), Ok((p.default_url.clone(), DEFAULT_EVENTS.to_vec())));
        let events = Some(vec![CallStatus::Failed, CallStatus::Ringing, CallStatus::Ringing]);
        let (_, events) = p.resolve(Some("http://hooks.example/".into()), events).unwrap();
        assert_eq!(events, [CallStatus::Ringing, CallStatus::Failed]);
        assert!(p.resolve(None, Some(vec![])).is_err());
        assert!(CallbackPolicy::parse_host("a b").is_err());
        assert!(CallbackPolicy::parse_host("host/path").is_err());
        assert_eq!(CallbackPolicy::parse_host(" Example.COM:80 "), Ok("example.com:80".into()));
    }
}
