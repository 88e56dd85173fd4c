//! The destination policy: which numbers the API may dial (ALLOWED_PREFIXES, DENIED_PREFIXES).
//!
//! Both lists hold E.164 prefixes (`+` and 1 to 15 digits, e.g. `+1900`), comma separated. A
//! number is refused when it matches a denied prefix (deny wins), or when an allow list is set
//! and it matches none of it. With either list set, a number must itself be in E.164 form
//! (start with `+`): a national or `00`-prefixed number cannot be judged against country
//! prefixes, so it is refused rather than guessed at. With neither list set every valid number
//! passes. The handlers check the policy before the call reaches the CallManager, so a refused
//! number never reaches Asterisk.

use std::fmt;

use ivr_core::PhoneNumber;

/// Why a number is refused; its `Display` is the 403's detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The number matches this denied prefix.
    Denied(String),
    /// An allow list is set and the number matches none of its prefixes.
    NotAllowed,
    /// A policy is set and the number is not in E.164 form.
    NotE164,
}

impl Refusal {
    /// A label for the metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Denied(_) => "denied",
            Refusal::NotAllowed => "not_allowed",
            Refusal::NotE164 => "not_e164",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied(prefix) => {
                write!(f, "calls to numbers starting with {prefix} are denied by this server's destination policy")
            }
            Refusal::NotAllowed => {
                f.write_str("the number is outside the prefixes this server's destination policy allows")
            }
            Refusal::NotE164 => f.write_str(
                "this server has a destination policy, so numbers must be in E.164 form: '+', country code, number",
            ),
        }
    }
}

/// Which destinations may be dialled. The default allows every valid number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    /// Empty: no allow list.
    allowed: Vec<String>,
    denied: Vec<String>,
}

impl DestinationPolicy {
    /// The policy from the two settings' values (`None` or empty: not set). The error names
    /// the bad entry.
    pub fn parse(allowed: Option<&str>, denied: Option<&str>) -> Result<Self, (&'static str, String)> {
        Ok(DestinationPolicy {
            allowed: parse_list(allowed).map_err(|e| ("ALLOWED_PREFIXES", e))?,
            denied: parse_list(denied).map_err(|e| ("DENIED_PREFIXES", e))?,
        })
    }

    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    pub fn denied(&self) -> &[String] {
        &self.denied
    }

    /// Whether either list is set.
    pub fn is_set(&self) -> bool {
        !self.allowed.is_empty() || !self.denied.is_empty()
    }

    /// `Ok` when `number` may be dialled.
    pub fn check(&self, number: &PhoneNumber) -> Result<(), Refusal> {
        if !self.is_set() {
            return Ok(());
        }
        let number = number.as_str();
        if !number.starts_with('+') {
            return Err(Refusal::NotE164);
        }
        if let Some(prefix) = self.denied.iter().find(|p| number.starts_with(p.as_str())) {
            return Err(Refusal::Denied(prefix.clone()));
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|p| number.starts_with(p.as_str())) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

fn parse_list(value: Option<&str>) -> Result<Vec<String>, String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(Vec::new()) };
    value
        .split(',')
        .map(str::trim)
        .map(|entry| {
            let digits = entry.strip_prefix('+').unwrap_or("");
            let valid = !digits.is_empty()
                && digits.len() <= PhoneNumber::MAX_DIGITS
                && digits.bytes().all(|b| b.is_ascii_digit());
            if valid {
                Ok(entry.to_owned())
            } else {
                Err(format!(
                    "{entry:?} is not an E.164 prefix: each comma-separated entry must be '+' and 1 to {} digits, \
                     e.g. +1900",
                    PhoneNumber::MAX_DIGITS
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(n: &str) -> PhoneNumber {
        PhoneNumber::parse(n).unwrap()
    }

    #[test]
    fn no_policy_allows_every_valid_number() {
        let policy = DestinationPolicy::parse(None, Some("  ")).unwrap();
        assert!(!policy.is_set());
        assert_eq!(policy.check(&number("+19005550100")), Ok(()));
        assert_eq!(policy.check(&number("0019005550100")), Ok(()));
    }

    #[test]
    fn deny_wins_over_allow() {
        let policy = DestinationPolicy::parse(Some("+1, +44"), Some("+1900,+1976, +4490")).unwrap();
        assert_eq!(policy.allowed(), ["+1", "+44"]);
        assert_eq!(policy.check(&number("+15550000001")), Ok(()));
        assert_eq!(policy.check(&number("+442071234567")), Ok(()));
        assert_eq!(policy.check(&number("+19005550100")), Err(Refusal::Denied("+1900".into())));
        assert_eq!(policy.check(&number("+449012345678")), Err(Refusal::Denied("+4490".into())));
        assert_eq!(policy.check(&number("+33123456789")), Err(Refusal::NotAllowed));
        assert_eq!(policy.check(&number("19005550100")), Err(Refusal::NotE164));
        assert!(Refusal::Denied("+1900".into()).to_string().contains("+1900"));
    }

    #[test]
    fn a_deny_list_alone_lets_the_rest_through() {
        let policy = DestinationPolicy::parse(None, Some("+1900")).unwrap();
        assert_eq!(policy.check(&number("+33123456789")), Ok(()));
        assert_eq!(policy.check(&number("+1900")), Err(Refusal::Denied("+1900".into())));
        assert_eq!(policy.check(&number("+190")), Ok(()));
    }

    #[test]
    fn invalid_entries_are_named() {
        for bad in ["1900", "+", "+19a", "+1900,,+1976", "+1234567890123456", "+1 900", "*"] {
            let (variable, problem) = DestinationPolicy::parse(Some(bad), None).unwrap_err();
            assert_eq!(variable, "ALLOWED_PREFIXES");
            assert!(problem.contains("is not an E.164 prefix"), "{bad}: {problem}");
            assert_eq!(DestinationPolicy::parse(None, Some(bad)).unwrap_err().0, "DENIED_PREFIXES");
        }
    }
}
