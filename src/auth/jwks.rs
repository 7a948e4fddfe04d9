//! JWKS documents turned into verification keys.
//!
//! Providers publish key sets with encryption keys mixed in, keys without
//! `alg` or `kid`, curves and key types that cannot verify a JWS, and RSA
//! moduli with a leading zero byte. Each key is judged on its own: a key the
//! server cannot use is returned in the skipped list with the reason, and the
//! rest of the set keeps working. Only RSA (2048 bits or more), EC P-256 and
//! P-384, and Ed25519 keys meant for signatures are kept; symmetric (`oct`)
//! keys are never used, whatever the token's header asks for.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// The kind of public key, which fixes the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Tells whether a key of this kind can verify a signature made with `alg`.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

/// One usable verification key.
#[derive(Clone)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The `alg` the JWK pins, if it names one.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
    /// RFC 7638 JWK thumbprint (SHA-256, base64url): the key's identity
    /// independent of its `kid`, so a `kid` reused for a new key is noticed.
    pub thumbprint: String,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint)
            .finish()
    }
}

impl VerifyingKey {
    /// Tells whether this key may verify a token signed with `alg`: the key
    /// type must fit, and a pinned `alg` must be the same.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

/// A key left out of the set, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SkippedKey {
    pub kid: Option<String>,
    pub reason: String,
}

/// The usable keys of one JWKS document and the keys that were skipped.
#[derive(Debug, Default, Clone)]
pub struct ParsedJwks {
    pub keys: Vec<VerifyingKey>,
    pub skipped: Vec<SkippedKey>,
}

/// A document that is not a JWKS at all.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the JWKS has no \"keys\" array")]
    NoKeysArray,
}

/// Parses a JWKS document, keeping each key the server can use.
pub fn parse(document: &[u8]) -> Result<ParsedJwks, JwksError> {
    let value: Value = serde_json::from_slice(document)?;
    let entries = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeysArray)?;

    let mut parsed = ParsedJwks::default();
    for entry in entries {
        let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
        match parse_key(entry) {
            Ok(key) => parsed.keys.push(VerifyingKey { kid, ..key }),
            Err(reason) => parsed.skipped.push(SkippedKey { kid, reason }),
        }
    }
    Ok(parsed)
}

fn parse_key(jwk: &Value) -> Result<VerifyingKey, String> {
    if !jwk.is_object() {
        return Err("the entry is not a JSON object".into());
    }
    if let Some(usage) = jwk.get("use") {
        if usage.as_str() != Some("sig") {
            return Err(format!("\"use\" is {usage}, not \"sig\""));
        }
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("\"key_ops\" does not include \"verify\"".into());
        }
    }

    let kty = string_member(jwk, "kty")?;
    let alg = match jwk.get("alg") {
        None => None,
        Some(value) => {
            let name = value.as_str().ok_or("\"alg\" is not a string")?;
            Some(
                signing_algorithm(name)
                    .ok_or_else(|| format!("\"alg\" {name} is not a JWS signing algorithm"))?,
            )
        }
    };

    let PublicKey {
        kind,
        key,
        thumbprint,
    } = match kty {
        "RSA" => rsa_key(jwk)?,
        "EC" => ec_key(jwk)?,
        "OKP" => okp_key(jwk)?,
        "oct" => return Err("symmetric (oct) keys are never used to verify".into()),
        other => return Err(format!("unsupported key type {other:?}")),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err(format!("\"alg\" {alg:?} does not fit a {kind:?} key"));
        }
    }
    Ok(VerifyingKey {
        kid: None,
        kind,
        alg,
        key,
        thumbprint,
    })
}

/// A decoded public key and its RFC 7638 thumbprint.
struct PublicKey {
    kind: KeyKind,
    key: DecodingKey,
    thumbprint: String,
}

/// Computes the RFC 7638 thumbprint from the required members, given in
/// lexicographic order as the RFC requires. The values are base64url strings
/// or curve names, which need no JSON escaping.
fn thumbprint(members: &[(&str, &str)]) -> String {
    let body: Vec<String> = members
        .iter()
        .map(|(name, value)| format!("\"{name}\":\"{value}\""))
        .collect();
    let canonical = format!("{{{}}}", body.join(","));
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn string_member<'a>(jwk: &'a Value, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{name}\" is missing or not a string"))
}

fn base64url_member(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let encoded = string_member(jwk, name)?;
    // Some providers pad their base64url, and some (Battle.net) publish the
    // standard alphabet with `+` and `/`. Neither changes the value, so both
    // are read as base64url.
    let normalized: String = encoded
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            other => other,
        })
        .collect();
    URL_SAFE_NO_PAD
        .decode(normalized)
        .map_err(|_| format!("\"{name}\" is not valid base64url"))
}

fn signing_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

fn rsa_key(jwk: &Value) -> Result<PublicKey, String> {
    if jwk.get("n").is_none() && jwk.get("x5c").is_some() {
        return rsa_key_from_x5c(jwk);
    }
    let modulus = base64url_member(jwk, "n")?;
    let exponent = base64url_member(jwk, "e")?;
    rsa_from_components(&modulus, &exponent)
}

/// Builds an RSA key from big-endian components. Leading zero bytes are
/// stripped: some providers publish them, and aws-lc-rs rejects a modulus
/// that has one.
fn rsa_from_components(modulus: &[u8], exponent: &[u8]) -> Result<PublicKey, String> {
    let modulus = strip_leading_zeros(modulus);
    let exponent = strip_leading_zeros(exponent);
    let bits = bit_length(modulus);
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus of {bits} bits is under {MIN_RSA_BITS}"
        ));
    }
    if exponent.is_empty() || exponent.len() > 8 {
        return Err("RSA exponent is empty or too large".into());
    }
    let (n, e) = (
        URL_SAFE_NO_PAD.encode(modulus),
        URL_SAFE_NO_PAD.encode(exponent),
    );
    Ok(PublicKey {
        kind: KeyKind::Rsa,
        key: DecodingKey::from_rsa_raw_components(modulus, exponent),
        thumbprint: thumbprint(&[("e", &e), ("kty", "RSA"), ("n", &n)]),
    })
}

fn rsa_key_from_x5c(jwk: &Value) -> Result<PublicKey, String> {
    let first = jwk
        .get("x5c")
        .and_then(Value::as_array)
        .and_then(|chain| chain.first())
        .and_then(Value::as_str)
        .ok_or("\"x5c\" is not an array of base64 certificates")?;
    // x5c uses standard base64 with padding (RFC 7517 section 4.7).
    let der = base64::engine::general_purpose::STANDARD
        .decode(first)
        .map_err(|_| "\"x5c\" certificate is not valid base64")?;
    let (modulus, exponent) = crate::auth::x509::rsa_public_key_of_certificate(&der)
        .map_err(|reason| format!("\"x5c\" certificate: {reason}"))?;
    rsa_from_components(&modulus, &exponent)
}

fn ec_key(jwk: &Value) -> Result<PublicKey, String> {
    let (kind, size) = match string_member(jwk, "crv")? {
        "P-256" => (KeyKind::EcP256, 32),
        "P-384" => (KeyKind::EcP384, 48),
        other => {
            return Err(format!(
                "EC curve {other} is not supported (ES256 and ES384 are)"
            ))
        }
    };
    let x = base64url_member(jwk, "x")?;
    let y = base64url_member(jwk, "y")?;
    if x.len() != size || y.len() != size {
        return Err(format!("EC coordinates must be {size} bytes each"));
    }
    let (x, y) = (URL_SAFE_NO_PAD.encode(&x), URL_SAFE_NO_PAD.encode(&y));
    let key =
        DecodingKey::from_ec_components(&x, &y).map_err(|err| format!("EC key rejected: {err}"))?;
    let curve = if kind == KeyKind::EcP256 {
        "P-256"
    } else {
        "P-384"
    };
    Ok(PublicKey {
        kind,
        key,
        thumbprint: thumbprint(&[("crv", curve), ("kty", "EC"), ("x", &x), ("y", &y)]),
    })
}

fn okp_key(jwk: &Value) -> Result<PublicKey, String> {
    match string_member(jwk, "crv")? {
        "Ed25519" => {}
        "X25519" | "X448" => {
            return Err(
                "X25519 and X448 keys are for key agreement and cannot verify signatures".into(),
            )
        }
        other => return Err(format!("OKP curve {other} is not supported (Ed25519 is)")),
    }
    let x = base64url_member(jwk, "x")?;
    if x.len() != 32 {
        return Err("an Ed25519 public key is 32 bytes".into());
    }
    let x = URL_SAFE_NO_PAD.encode(&x);
    let key = DecodingKey::from_ed_components(&x)
        .map_err(|err| format!("Ed25519 key rejected: {err}"))?;
    Ok(PublicKey {
        kind: KeyKind::Ed25519,
        key,
        thumbprint: thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]),
    })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

fn bit_length(big_endian: &[u8]) -> usize {
    match big_endian.first() {
        None => 0,
        Some(&top) => big_endian.len() * 8 - top.leading_zeros() as usize,
    }
}
