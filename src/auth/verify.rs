//! Checks of a bearer token: a JWT against its issuer's keys, or an opaque
//! token by introspection, with a cache of verified tokens in front.
//!
//! The JWS header is parsed here rather than trusted to a library: the
//! algorithm must be in the configured list and fit the chosen key, a `crit`
//! header is rejected (no extension is understood), and `jku`, `x5u`, `jwk`
//! and `kid` are never followed into a fetch or a file. The issuer is read
//! from the still unverified payload only to choose whose keys to try; the
//! signature is checked with those keys, and then every claim, `iss`
//! included, is checked on the signed payload. `jsonwebtoken` only checks the
//! signature.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::auth::cache::{TokenHash, VerifiedBy, VerifiedCache};
use crate::auth::claims::{self, ClaimRules};
use crate::auth::introspection::Introspector;
use crate::auth::issuers::IssuerKeys;
use crate::clock::SharedClock;
use crate::config::{parse_algorithm, TokenKind, MAX_TOKEN_BYTES};

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

/// A successful verification.
#[derive(Debug, Clone)]
pub struct Verified {
    pub identity: Identity,
    /// Whether the result came from the cache of verified tokens.
    pub cached: bool,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The token is malformed, badly signed or has wrong claims. The reason is
    /// for the log; clients only see `invalid_token`.
    Invalid(&'static str),
    Expired,
    /// The token cannot be checked now: its issuer has no usable key, or the
    /// introspection endpoint is failing.
    Unavailable {
        retry_after: Duration,
    },
}

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub token_kind: TokenKind,
    /// Bound of the cache of verified tokens, in bytes (an estimate).
    pub cache_max_bytes: u64,
}

pub struct Verifier {
    settings: VerifierSettings,
    issuers: IssuerKeys,
    introspector: Option<Introspector>,
    cache: VerifiedCache,
    clock: SharedClock,
}

/// Retry-After sent while an issuer has no usable key.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

struct JwsHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    /// Creates a verifier and subscribes its cache to key removals of every
    /// issuer's key store.
    pub fn new(
        settings: VerifierSettings,
        issuers: IssuerKeys,
        introspector: Option<Introspector>,
        clock: SharedClock,
    ) -> Self {
        let cache = VerifiedCache::new(settings.cache_max_bytes, clock.clone());
        for (index, store) in issuers.stores().iter().enumerate() {
            let cache = cache.clone();
            store.on_keys_removed(Box::new(move |thumbprints| {
                cache.drop_keys(index, thumbprints)
            }));
        }
        Verifier {
            settings,
            issuers,
            introspector,
            cache,
            clock,
        }
    }

    /// Returns the issuers' key stores.
    pub fn keys(&self) -> &IssuerKeys {
        &self.issuers
    }

    /// Returns the cache of verified tokens.
    pub fn cache(&self) -> &VerifiedCache {
        &self.cache
    }

    /// Verifies a bearer token and returns the identity it carries.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token larger than 16 KiB"));
        }
        // The token is hashed once: the key serves the lookup and, after a
        // miss, the insert.
        let key = VerifiedCache::key(token);
        if let Some(identity) = self.cached(&key) {
            return Ok(Verified {
                identity,
                cached: true,
            });
        }

        let introspect = match self.settings.token_kind {
            TokenKind::Jwt => false,
            TokenKind::Opaque => true,
            TokenKind::Auto => self.introspector.is_some() && !looks_like_jws(token),
        };
        let (identity, verified_by, expires_at_ms) = if introspect {
            self.verify_opaque(token).await?
        } else {
            self.verify_jwt(token).await?
        };
        self.cache.insert(
            key,
            token.len(),
            identity.clone(),
            verified_by,
            expires_at_ms,
        );
        Ok(Verified {
            identity,
            cached: false,
        })
    }

    /// Returns the cached identity of `token`, if the entry is live and the
    /// key that verified it is still loaded.
    fn cached(&self, key: &TokenHash) -> Option<Identity> {
        let entry = self.cache.get(key)?;
        let key_loaded = match &entry.verified_by {
            VerifiedBy::Key { store, thumbprint } => self
                .issuers
                .store(*store)
                .is_some_and(|store| store.has_key(thumbprint)),
            VerifiedBy::Introspection => true,
        };
        if !key_loaded {
            self.cache.remove(key);
            return None;
        }
        Some(entry.identity.clone())
    }

    fn rules(&self) -> ClaimRules<'_> {
        ClaimRules {
            audiences: &self.settings.audiences,
            leeway: self.settings.leeway,
            now_secs: self.clock.now_secs(),
        }
    }

    async fn verify_opaque(&self, token: &str) -> Result<(Identity, VerifiedBy, u64), AuthError> {
        let Some(introspector) = &self.introspector else {
            return Err(AuthError::Invalid(
                "opaque token but no introspection endpoint",
            ));
        };
        let answer = introspector.introspect(token).await?;
        let identity = claims::check(answer, &self.rules(), |iss| self.issuers.accepts(iss))?;
        let ttl_ms = u64::try_from(introspector.cache_ttl().as_millis()).unwrap_or(u64::MAX);
        let expires_at_ms = identity
            .token_expires_at
            .saturating_mul(1000)
            .min(self.clock.now_ms().saturating_add(ttl_ms));
        Ok((identity, VerifiedBy::Introspection, expires_at_ms))
    }

    async fn verify_jwt(&self, token: &str) -> Result<(Identity, VerifiedBy, u64), AuthError> {
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
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Invalid("payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| AuthError::Invalid("payload is not a JSON object"))?;

        // Unverified: only picks whose keys to try. A forged `iss` can only
        // select keys that will then fail to verify the signature.
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(AuthError::Invalid("iss is missing"))?;
        let (store_index, keys) = self
            .issuers
            .store_for(issuer)
            .ok_or(AuthError::Invalid("iss not accepted"))?;

        if !keys.has_keys() {
            // A request-driven fetch, bounded like unknown-kid refetches, so
            // an issuer that comes back is noticed before the next retry.
            keys.refetch("no usable key").await;
            if !keys.has_keys() {
                return Err(AuthError::Unavailable {
                    retry_after: UNAVAILABLE_RETRY_AFTER,
                });
            }
        }
        let mut candidates = keys.candidates(header.kid.as_deref(), header.alg);
        if candidates.is_empty() {
            match header.kid.as_deref() {
                Some(kid) if !keys.knows_kid(kid) => {
                    keys.refetch("unknown kid").await;
                    candidates = keys.candidates(Some(kid), header.alg);
                    if candidates.is_empty() {
                        return Err(AuthError::Invalid("unknown kid"));
                    }
                }
                Some(_) => {
                    return Err(AuthError::Invalid(
                        "alg does not fit the keys named by kid, or they are unusable",
                    ))
                }
                None => return Err(AuthError::Invalid("no key fits the alg")),
            }
        }

        let signed_part = &token[..header_b64.len() + 1 + payload_b64.len()];
        let verifying_key = candidates.iter().find(|key| {
            jsonwebtoken::crypto::verify(
                signature_b64,
                signed_part.as_bytes(),
                &key.key,
                header.alg,
            )
            .unwrap_or(false)
        });
        let Some(verifying_key) = verifying_key else {
            return Err(AuthError::Invalid("bad signature"));
        };

        let expected_issuer = issuer.to_owned();
        let identity = claims::check(claims, &self.rules(), |iss| iss == expected_issuer)?;
        let verified_by = VerifiedBy::Key {
            store: store_index,
            thumbprint: verifying_key.thumbprint.clone(),
        };
        let expires_at_ms = identity.token_expires_at.saturating_mul(1000);
        Ok((identity, verified_by, expires_at_ms))
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
}

/// Tells whether a token has the shape of a compact JWS: three base64url
/// parts whose first decodes to a JSON object. Anything else (an opaque
/// token, or a five-part JWE) goes to introspection in `auto` mode.
fn looks_like_jws(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return false;
    }
    URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|header| serde_json::from_slice::<Map<String, Value>>(&header).ok())
        .is_some()
}
