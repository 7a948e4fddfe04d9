//! Checks of a bearer JWT: header, signature and claims.
//!
//! The JWS header is parsed here rather than trusted to a library: the
//! algorithm must be in the configured list and fit the chosen key, a `crit`
//! header is rejected (no extension is understood), and `jku`, `x5u`, `jwk`
//! and `kid` are never followed into a fetch or a file. `jsonwebtoken` only
//! checks the signature; the claims are checked here so that numeric dates
//! given as floats are accepted, dates given as strings are rejected, and
//! `iss`, `aud`, `exp` and `sub` are always required.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::auth::keys::KeyStore;
use crate::clock::SharedClock;
use crate::config::{parse_algorithm, MAX_TOKEN_BYTES};

/// The authenticated identity carried by a verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    /// The `sid` claim, when the provider sets one.
    pub session: Option<String>,
    /// The token's `exp`, in seconds since the epoch.
    pub token_expires_at: u64,
    pub claims: Map<String, Value>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The token is malformed, badly signed or has wrong claims. The reason is
    /// for the log; clients only see `invalid_token`.
    Invalid(&'static str),
    Expired,
    /// No usable key is loaded, because the JWKS could not be fetched.
    Unavailable {
        retry_after: Duration,
    },
}

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
}

pub struct Verifier {
    settings: VerifierSettings,
    keys: Arc<KeyStore>,
    clock: SharedClock,
}

/// Retry-After sent while no key is loaded.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

struct JwsHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    pub fn new(settings: VerifierSettings, keys: Arc<KeyStore>, clock: SharedClock) -> Self {
        Verifier {
            settings,
            keys,
            clock,
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Verifies a compact JWS and returns the identity it carries.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token larger than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Invalid("not a compact JWS of three parts"));
        };
        if signature_b64.is_empty() {
            return Err(AuthError::Invalid("unsigned token"));
        }
        let header = self.parse_header(header_b64)?;

        if !self.keys.has_keys() {
            return Err(AuthError::Unavailable {
                retry_after: UNAVAILABLE_RETRY_AFTER,
            });
        }
        let mut candidates = self.keys.candidates(header.kid.as_deref(), header.alg);
        if candidates.is_empty() {
            match header.kid.as_deref() {
                Some(kid) if !self.keys.knows_kid(kid) => {
                    self.keys.refetch_for_unknown_kid().await;
                    candidates = self.keys.candidates(Some(kid), header.alg);
                    if candidates.is_empty() {
                        return Err(AuthError::Invalid("unknown kid"));
                    }
                }
                Some(_) => return Err(AuthError::Invalid("alg does not fit the key named by kid")),
                None => return Err(AuthError::Invalid("no key fits the alg")),
            }
        }

        let signed_part = &token[..header_b64.len() + 1 + payload_b64.len()];
        let signature_ok = candidates.iter().any(|key| {
            jsonwebtoken::crypto::verify(
                signature_b64,
                signed_part.as_bytes(),
                &key.key,
                header.alg,
            )
            .unwrap_or(false)
        });
        if !signature_ok {
            return Err(AuthError::Invalid("bad signature"));
        }

        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Invalid("payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| AuthError::Invalid("payload is not a JSON object"))?;
        self.check_claims(claims)
    }

    fn parse_header(&self, header_b64: &str) -> Result<JwsHeader, AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Invalid("header is not base64url"))?;
        let header: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Invalid("header is not a JSON object"))?;
        if header.contains_key("crit") {
            return Err(AuthError::Invalid(
                "crit header names an unsupported extension",
            ));
        }
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(AuthError::Invalid("header has no alg"))?;
        let alg = parse_algorithm(alg_name).map_err(|_| AuthError::Invalid("alg not supported"))?;
        if !self.settings.algorithms.contains(&alg) {
            return Err(AuthError::Invalid("alg not allowed"));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(AuthError::Invalid("kid is not a string")),
        };
        Ok(JwsHeader { alg, kid })
    }

    fn check_claims(&self, claims: Map<String, Value>) -> Result<Identity, AuthError> {
        let now = self.clock.now_secs() as f64;
        let leeway = self.settings.leeway.as_secs_f64();

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
        if !self.settings.issuers.iter().any(|allowed| allowed == iss) {
            return Err(AuthError::Invalid("iss not accepted"));
        }

        let audience_ok = match claims.get("aud") {
            Some(Value::String(aud)) => self.settings.audiences.contains(aud),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| self.settings.audiences.iter().any(|allowed| allowed == aud)),
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
