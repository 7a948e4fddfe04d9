//! Fixture keys and tokens shared by the benchmarks and `examples/load.rs`
//! (included there with `#[path]`).
//!
//! Tokens are signed with the private keys in `tests/fixtures/jwks/keys`, and
//! the JWKS is assembled from the public keys of the fixture documents, so a
//! server verifying with that JWKS accepts the tokens.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const ISSUER: &str = "https://idp.bench.invalid/";
pub const AUDIENCE: &str = "wsticket-bench";

/// The fixture directory of this checkout.
pub fn default_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks")
}

/// The fixture key, and its kid in the JWKS, that signs tokens of `alg`.
pub fn key_for(alg: Algorithm) -> (&'static str, &'static str) {
    match alg {
        Algorithm::ES256 => ("ec256", "ec256"),
        Algorithm::EdDSA => ("ed25519", "ed25519"),
        _ => ("rsa-a", "rsa-a"),
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|err| panic!("cannot read fixture {}: {err}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|err| panic!("fixture {} is not JSON: {err}", path.display()))
}

fn fixture_jwk(fixtures: &Path, file: &str, kid: &str) -> Value {
    let path = fixtures.join(file);
    read_json(&path)["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|key| key["kid"] == kid).cloned())
        .unwrap_or_else(|| panic!("no key with kid {kid} in {}", path.display()))
}

/// Builds a JWKS with the public keys of `rsa-a` (RS256), `ec256` (ES256) and
/// `ed25519` (EdDSA), each under its own name as kid.
pub fn jwks(fixtures: &Path) -> Value {
    json!({
        "keys": [
            fixture_jwk(fixtures, "rotation-before.jwks.json", "rsa-a"),
            fixture_jwk(fixtures, "ec-okp.jwks.json", "ec256"),
            fixture_jwk(fixtures, "ec-okp.jwks.json", "ed25519"),
        ]
    })
}

/// Returns the JWK that verifies tokens of `alg`.
pub fn public_jwk(fixtures: &Path, alg: Algorithm) -> Value {
    let (_, kid) = key_for(alg);
    jwks(fixtures)["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|key| key["kid"] == kid).cloned())
        .expect("jwks() contains every key of key_for()")
}

/// Loads the private key that signs tokens of `alg`.
pub fn signing_key(fixtures: &Path, alg: Algorithm) -> EncodingKey {
    let (name, _) = key_for(alg);
    let path = fixtures.join("keys").join(format!("{name}.pem"));
    let pem = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("cannot read key {}: {err}", path.display()));
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    };
    key.unwrap_or_else(|err| panic!("key {} is not a usable PEM: {err}", path.display()))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Signs a token for `subject`, valid for `lifetime_secs`; `jti` makes
/// tokens of the same subject distinct, so none is a verification cache hit.
pub fn sign(
    key: &EncodingKey,
    alg: Algorithm,
    subject: &str,
    jti: u64,
    lifetime_secs: u64,
) -> String {
    let now = now_secs();
    let claims = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "sid": "bench-session",
        "jti": jti.to_string(),
        "iat": now,
        "exp": now + lifetime_secs,
    });
    let mut header = Header::new(alg);
    header.kid = Some(key_for(alg).1.to_owned());
    jsonwebtoken::encode(&header, &claims, key).expect("signing with a fixture key works")
}

pub mod app;
