//! Checks of the claims of a verified JWT or of an introspection response.
//!
//! The same rules apply to both: `exp` is required, `nbf` and `iat` are
//! honoured, all with the leeway; numeric dates may be floats (RFC 7519
//! allows fractions) but never strings; `iss` must be accepted, `aud` is a
//! string or an array that must contain an accepted audience, and `sub` is
//! required and non-empty.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::auth::verify::{AuthError, Identity};

/// Expected values for the claims checks.
pub struct ClaimRules<'a> {
    pub audiences: &'a [String],
    pub leeway: Duration,
    /// The current time, in seconds since the epoch.
    pub now_secs: u64,
}

/// Checks `claims` and returns the identity they carry. `accept_issuer`
/// decides whether an `iss` value is accepted.
pub fn check(
    claims: Map<String, Value>,
    rules: &ClaimRules<'_>,
    accept_issuer: impl Fn(&str) -> bool,
) -> Result<Identity, AuthError> {
    let now = rules.now_secs as f64;
    let leeway = rules.leeway.as_secs_f64();

    let exp = numeric_date(&claims, "exp")?.ok_or(AuthError::Invalid("exp is missing"))?;
    if now > exp + leeway {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")? {
        if now + leeway < nbf {
            return Err(AuthError::Invalid("token not valid yet (nbf)"));
        }
    }
    if let Some(iat) = numeric_date(&claims, "iat")? {
        if now + leeway < iat {
            return Err(AuthError::Invalid("token issued in the future (iat)"));
        }
    }

    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(AuthError::Invalid("iss is missing"))?;
    if !accept_issuer(iss) {
        return Err(AuthError::Invalid("iss not accepted"));
    }

    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => rules.audiences.contains(aud),
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .any(|aud| rules.audiences.iter().any(|allowed| allowed == aud)),
        _ => return Err(AuthError::Invalid("aud is missing")),
    };
    if !audience_ok {
        return Err(AuthError::Invalid("aud not accepted"));
    }

    let subject = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => return Err(AuthError::Invalid("sub is missing or empty")),
    };
    let session = claims.get("sid").and_then(Value::as_str).map(str::to_owned);

    Ok(Identity {
        subject,
        session,
        token_expires_at: exp.max(0.0) as u64,
        claims,
    })
}

/// Reads a NumericDate claim: a JSON number, integer or not (RFC 7519 allows
/// fractions). A string or any other type is rejected.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(number)) => number
            .as_f64()
            .filter(|value| value.is_finite())
            .map(Some)
            .ok_or(AuthError::Invalid("numeric date out of range")),
        Some(_) => Err(AuthError::Invalid("numeric date is not a number")),
    }
}
