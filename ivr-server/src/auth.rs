//! Access tokens: JWT, HS256 only, signed with SECRET_KEY.
//!
//! A token carries `sub`, `iat`, `exp`, and `iss`/`aud` when JWT_ISSUER/JWT_AUDIENCE are set.
//! Checking one verifies the signature with HS256 alone (a token naming any other `alg`,
//! `none` included, is refused before its signature is looked at), `exp` and `nbf` (when
//! present) with a leeway of [`LEEWAY_SECS`], `iat` (present, not in the future beyond the same
//! leeway), and `iss`/`aud` when configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::problem::Problem;
use crate::settings::AuthSettings;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (stated in SECURITY.md).
pub const LEEWAY_SECS: u64 = 30;

/// Signs and checks access tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct OutgoingClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

#[derive(Deserialize)]
struct IncomingClaims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// A minted token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Token)]
pub struct AccessToken {
    pub access_token: String,
    #[schema(value_type = String, pattern = "^bearer$")]
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Why a token was refused; its `Display` is the 401's detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    NotBearer,
    Malformed,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    MissingClaim(String),
    UnknownUser,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Missing => f.write_str("this route needs an Authorization: Bearer <token> header"),
            TokenError::NotBearer => f.write_str("the Authorization header must use the Bearer scheme"),
            TokenError::Malformed => f.write_str("the bearer token is not a well-formed JWT"),
            TokenError::WrongAlgorithm => f.write_str("only HS256 tokens are accepted"),
            TokenError::BadSignature => f.write_str("the token's signature is not valid"),
            TokenError::Expired => f.write_str("the token has expired"),
            TokenError::NotYetValid => f.write_str("the token is not valid yet (its nbf lies in the future)"),
            TokenError::IssuedInFuture => f.write_str("the token's iat lies in the future"),
            TokenError::WrongIssuer => f.write_str("the token's issuer (iss) is not accepted"),
            TokenError::WrongAudience => f.write_str("the token's audience (aud) is not accepted"),
            TokenError::MissingClaim(claim) => write!(f, "the token lacks the {claim} claim"),
            TokenError::UnknownUser => f.write_str("the token's user does not exist or is disabled"),
        }
    }
}

impl From<TokenError> for Problem {
    fn from(e: TokenError) -> Self {
        let invalid_token = e != TokenError::Missing;
        Problem::unauthorized(e.to_string(), invalid_token)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.secret_key.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &settings.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl: settings.token_ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for `sub`, valid from now for the configured lifetime.
    pub fn issue(&self, sub: &str) -> Result<AccessToken, jsonwebtoken::errors::Error> {
        self.issue_at(sub, unix_now())
    }

    /// A token for `sub` issued at `iat` (seconds since the epoch).
    pub fn issue_at(&self, sub: &str, iat: u64) -> Result<AccessToken, jsonwebtoken::errors::Error> {
        let ttl = self.ttl.as_secs();
        let claims =
            OutgoingClaims { sub, iat, exp: iat + ttl, iss: self.issuer.as_deref(), aud: self.audience.as_deref() };
        let access_token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok(AccessToken { access_token, token_type: "bearer", expires_in: ttl })
    }

    /// The subject of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        self.verify_claims(token).map(|(sub, _)| sub)
    }

    /// The subject and `exp` (seconds since the epoch) of a valid token.
    pub fn verify_claims(&self, token: &str) -> Result<(String, u64), TokenError> {
        // Refuse any other algorithm (and `none`) before anything else.
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
            _ => {
                if header_names_other_alg(token) {
                    TokenError::WrongAlgorithm
                } else {
                    TokenError::Malformed
                }
            }
        })?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::WrongAlgorithm);
        }
        let data =
            jsonwebtoken::decode::<IncomingClaims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                    ErrorKind::InvalidAudience => TokenError::WrongAudience,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
                    ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
                    ErrorKind::Json(inner) if inner.to_string().contains("missing field `iat`") => {
                        TokenError::MissingClaim("iat".into())
                    }
                    _ => TokenError::Malformed,
                }
            })?;
        if data.claims.iat > unix_now() + LEEWAY_SECS {
            return Err(TokenError::IssuedInFuture);
        }
        Ok((data.claims.sub, data.claims.exp))
    }
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Result<&str, TokenError> {
    // On bytes, and UTF-8 checked for the token only, rather than `HeaderValue::to_str`'s
    // byte-by-byte check of the whole value: this runs on every request, and the token's
    // signature check refuses any odd byte anyway.
    let value = headers.get(AUTHORIZATION).ok_or(TokenError::Missing)?.as_bytes().trim_ascii();
    let space = value.iter().position(|&b| b == b' ').ok_or(TokenError::NotBearer)?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(TokenError::NotBearer);
    }
    std::str::from_utf8(token.trim_ascii()).map_err(|_| TokenError::Malformed)
}

/// Whether a token's header parses as JSON with an `alg` other than HS256 (e.g. `none`,
/// which jsonwebtoken does not even name).
fn header_names_other_alg(token: &str) -> bool {
    use base64::Engine as _;
    let Some(first) = token.split('.').next() else { return false };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD_INDIFFERENT.decode(first) else { return false };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(|a| a != "HS256"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    fn settings(issuer: Option<&str>, audience: Option<&str>) -> AuthSettings {
        AuthSettings {
            secret_key: Secret::new("k".repeat(32)),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            token_ttl: Duration::from_secs(1800),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let tokens = Tokens::new(&settings(Some("ivr"), Some("ivr-api")));
        let t = tokens.issue("alice").unwrap();
        assert_eq!(t.token_type, "bearer");
        assert_eq!(tokens.verify(&t.access_token).unwrap(), "alice");

        let expired = tokens.issue_at("alice", unix_now() - 7200).unwrap();
        assert_eq!(tokens.verify(&expired.access_token), Err(TokenError::Expired));

        let other_iss = Tokens::new(&settings(Some("someone-else"), Some("ivr-api"))).issue("a").unwrap();
        assert_eq!(tokens.verify(&other_iss.access_token), Err(TokenError::WrongIssuer));
        let other_aud = Tokens::new(&settings(Some("ivr"), Some("other"))).issue("a").unwrap();
        assert_eq!(tokens.verify(&other_aud.access_token), Err(TokenError::WrongAudience));
        let no_iss = Tokens::new(&settings(None, None)).issue("a").unwrap();
        // Both iss and aud are missing; which one is reported first is jsonwebtoken's choice.
        let missing = tokens.verify(&no_iss.access_token);
        assert!(matches!(&missing, Err(TokenError::MissingClaim(c)) if c == "iss" || c == "aud"), "{missing:?}");

        let mut other_key = settings(Some("ivr"), Some("ivr-api"));
        other_key.secret_key = Secret::new("x".repeat(32));
        let forged = Tokens::new(&other_key).issue("alice").unwrap();
        assert_eq!(tokens.verify(&forged.access_token), Err(TokenError::BadSignature));

        // alg: none, with the claims of a valid token and no signature.
        let parts: Vec<&str> = t.access_token.split('.').collect();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert_eq!(tokens.verify(&none), Err(TokenError::WrongAlgorithm));
        assert_eq!(tokens.verify("not-a-jwt"), Err(TokenError::Malformed));
    }

    /// A token signed with `tokens`' key carrying `extra` claims beside valid `sub`/`iat`/`exp`.
    fn signed_with(extra: serde_json::Value) -> String {
        let now = unix_now();
        let mut claims = serde_json::json!({"sub": "alice", "iat": now, "exp": now + 600});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        let key = EncodingKey::from_secret("k".repeat(32).as_bytes());
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    #[test]
    fn nbf_is_checked_with_the_stated_leeway() {
        let tokens = Tokens::new(&settings(None, None));
        let now = unix_now();
        let in_an_hour = signed_with(serde_json::json!({"nbf": now + 3600}));
        assert_eq!(tokens.verify(&in_an_hour), Err(TokenError::NotYetValid));
        assert_eq!(TokenError::NotYetValid.to_string(), "the token is not valid yet (its nbf lies in the future)");
        // Just beyond the leeway is refused; within it, accepted.
        let beyond = signed_with(serde_json::json!({"nbf": now + LEEWAY_SECS + 120}));
        assert_eq!(tokens.verify(&beyond), Err(TokenError::NotYetValid));
        let within = signed_with(serde_json::json!({"nbf": now + LEEWAY_SECS / 2}));
        assert_eq!(tokens.verify(&within).as_deref(), Ok("alice"));
        let past = signed_with(serde_json::json!({"nbf": now - 60}));
        assert_eq!(tokens.verify(&past).as_deref(), Ok("alice"));
        // No nbf at all is still fine: the claim is optional.
        assert_eq!(tokens.verify(&signed_with(serde_json::json!({}))).as_deref(), Ok("alice"));
        // An nbf that is not a number is malformed, not ignored.
        let garbage = signed_with(serde_json::json!({"nbf": "tomorrow"}));
        assert_eq!(tokens.verify(&garbage), Err(TokenError::Malformed));
        // iat in the future beyond the leeway stays refused.
        let future_iat = signed_with(serde_json::json!({"iat": now + 3600}));
        assert_eq!(tokens.verify(&future_iat), Err(TokenError::IssuedInFuture));
    }
}
