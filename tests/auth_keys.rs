//! Key selection against JWKS documents in the shapes real identity
//! providers publish, served over HTTP on 127.0.0.1; rotation, refetch
//! limits, algorithm confusion, issuer namespaces, claims and the cache.

mod auth_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_support::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use wsticket::auth::keys::{JwksGauges, KeyStoreSettings};
use wsticket::auth::{AuthError, IssuerKeys, KeyStore, Verifier};
use wsticket::clock::{Clock, SharedClock};

use Algorithm::*;

/// Serves `file` and loads it into a one-issuer verifier.
async fn load(file: &str, algorithms: &[Algorithm]) -> (TestServer, Setup) {
    let server = TestServer::serving(fixture(file)).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), algorithms, clock());
    setup
        .store
        .refresh_now()
        .await
        .unwrap_or_else(|err| panic!("{file} must load: {err}"));
    (server, setup)
}

fn now(setup: &Setup) -> u64 {
    setup.clock.now_secs()
}

async fn check(setup: &Setup, token: &str) -> Result<(), AuthError> {
    setup.verifier.verify(token).await.map(|_| ())
}

#[tokio::test]
async fn entra_shape_keys_without_alg() {
    let (_server, setup) = load("entra-shape.jwks.json", ALL_ALGORITHMS).await;
    let kid = Some("YbTQhkPpwRNle9_fUmEExEM04Vk");
    let claims = claims(ISSUER, now(&setup));

    assert_eq!(
        check(&setup, &sign(RS256, kid, "rsa-a", &claims)).await,
        Ok(())
    );
    assert_eq!(
        check(&setup, &sign(RS256, kid, "rsa-b", &claims)).await,
        Err(AuthError::Invalid("bad signature"))
    );
    let hs256 = jsonwebtoken::encode(
        &Header {
            kid: kid.map(str::to_owned),
            ..Header::new(HS256)
        },
        &claims,
        &EncodingKey::from_secret(b"any secret"),
    )
    .expect("HS256 signs");
    assert!(matches!(
        check(&setup, &hs256).await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(
        check(&setup, &sign(PS256, kid, "rsa-a", &claims)).await,
        Ok(())
    );
}

#[tokio::test]
async fn entra_shape_ps256_needs_the_algorithm_list() {
    let (_server, setup) = load("entra-shape.jwks.json", &[RS256]).await;
    let kid = Some("YbTQhkPpwRNle9_fUmEExEM04Vk");
    let token = sign(PS256, kid, "rsa-a", &claims(ISSUER, now(&setup)));
    assert_eq!(
        check(&setup, &token).await,
        Err(AuthError::Invalid("alg not allowed"))
    );
}

#[tokio::test]
async fn keycloak_encryption_key_never_verifies() {
    let (_server, setup) = load("keycloak-shape.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    assert_eq!(
        check(&setup, &sign(RS256, Some("kc-sig-1"), "rsa-a", &claims)).await,
        Ok(())
    );
    assert!(matches!(
        check(&setup, &sign(RS256, Some("enc-1"), "rsa-b", &claims)).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn hydra_prefixed_kids_verify() {
    let (_server, setup) = load("hydra-shape.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    let first = sign(
        RS256,
        Some("public:11111111-2222-4333-8444-555555555555"),
        "rsa-a",
        &claims,
    );
    let second = sign(
        RS256,
        Some("public:66666666-7777-4888-8999-000000000000"),
        "rsa-b",
        &claims,
    );
    assert_eq!(check(&setup, &first).await, Ok(()));
    assert_eq!(check(&setup, &second).await, Ok(()));
}

#[tokio::test]
async fn ec_and_okp_keys_verify() {
    let (_server, setup) = load("ec-okp.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    for (alg, kid, key) in [
        (ES256, "ec256", "ec256"),
        (ES384, "ec384", "ec384"),
        (EdDSA, "ed25519", "ed25519"),
    ] {
        let token = sign(alg, Some(kid), key, &claims);
        assert_eq!(
            check(&setup, &token).await,
            Ok(()),
            "{alg:?} with kid {kid}"
        );
    }
    let wrong_kid = sign(ES256, Some("ec384"), "ec256", &claims);
    assert!(matches!(
        check(&setup, &wrong_kid).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn leading_zero_modulus_loads() {
    let (_server, setup) = load("leading-zero.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(RS256, Some("lz-1"), "rsa-a", &claims(ISSUER, now(&setup)));
    assert_eq!(check(&setup, &token).await, Ok(()));
}

#[tokio::test]
async fn duplicate_kid_tries_every_fitting_key() {
    let (_server, setup) = load("duplicate-kid.jwks.json", ALL_ALGORITHMS).await;
    let kid = Some("signer@example.test");
    let claims = claims(ISSUER, now(&setup));
    assert_eq!(
        check(&setup, &sign(RS256, kid, "rsa-a", &claims)).await,
        Ok(())
    );
    assert_eq!(
        check(&setup, &sign(ES256, kid, "ec256", &claims)).await,
        Ok(())
    );
    assert_eq!(
        check(&setup, &sign(RS256, kid, "rsa-rot", &claims)).await,
        Err(AuthError::Invalid("bad signature"))
    );
}

#[tokio::test]
async fn kidless_key_verifies_kidless_token() {
    let (_server, setup) = load("no-kid-single.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(RS256, None, "rsa-a", &claims(ISSUER, now(&setup)));
    assert_eq!(check(&setup, &token).await, Ok(()));
}

#[tokio::test]
async fn named_kid_never_uses_kidless_keys() {
    let (_server, setup) = load("no-kid-two.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    assert_eq!(
        check(&setup, &sign(RS256, None, "rsa-a", &claims)).await,
        Ok(())
    );
    assert_eq!(
        check(&setup, &sign(RS256, Some("nope"), "rsa-a", &claims)).await,
        Err(AuthError::Invalid("unknown kid"))
    );
}

#[tokio::test]
async fn x5c_only_key_verifies() {
    let (_server, setup) = load("x5c-only.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(
        RS256,
        Some("x5c-only"),
        "rsa-a",
        &claims(ISSUER, now(&setup)),
    );
    assert_eq!(check(&setup, &token).await, Ok(()));
}

#[tokio::test]
async fn paypal_set_loads_and_x25519_is_unusable() {
    let (server, setup) = load("paypal-plus-test.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    assert_eq!(
        check(&setup, &sign(RS256, Some("test-rsa-a"), "rsa-a", &claims)).await,
        Ok(())
    );
    let x25519 = sign(
        EdDSA,
        Some("753778214125442a472d4b6150645367"),
        "ed25519",
        &claims,
    );
    assert!(matches!(
        check(&setup, &x25519).await,
        Err(AuthError::Invalid(_))
    ));
    // The kid is known (as unusable), so it triggers no refetch.
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn real_documents_all_load() {
    let mut loaded = 0;
    for entry in std::fs::read_dir(fixture_path("real")).expect("real/ exists") {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let document = std::fs::read_to_string(&path).expect("readable");
        let (_server, setup) = {
            let server = TestServer::serving(document.clone()).await;
            let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
            (server, setup)
        };
        let loaded_ok = setup.store.refresh_now().await;
        assert!(loaded_ok.is_ok(), "{name}: {loaded_ok:?}");
        assert!(setup.store.has_keys(), "{name}: no usable key");

        let parsed: serde_json::Value = serde_json::from_str(&document).expect("JSON");
        let kid = parsed["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find_map(|key| key["kid"].as_str()))
            .expect("a kid");
        let forged = sign(RS256, Some(kid), "rsa-a", &claims(ISSUER, now(&setup)));
        assert!(
            matches!(check(&setup, &forged).await, Err(AuthError::Invalid(_))),
            "{name}: a token signed by rsa-a under kid {kid} must be rejected"
        );
        loaded += 1;
    }
    assert_eq!(loaded, 21);
}

#[tokio::test]
async fn skipped_key_warned_once() {
    let logs = CapturedLogs::global();
    let label = "skip-test-issuer";
    let server = TestServer::serving(fixture("keycloak-shape.jwks.json")).await;
    let setup = one_issuer(store_settings(&server.url, label), ALL_ALGORITHMS, clock());
    setup.store.refresh_now().await.expect("first load");
    setup.store.refresh_now().await.expect("second load");

    let warnings = logs.lines_with(&["jwks_key_skipped", label, "\"kid\":\"enc-1\""]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains("not \\\"sig\\\""), "{}", warnings[0]);
}

#[tokio::test]
async fn rotation_picked_up_by_one_refetch() {
    let (server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    server.serve(fixture("rotation-after.jwks.json"));
    let before = server.requests();

    let token = sign(
        RS256,
        Some("rsa-rot"),
        "rsa-rot",
        &claims(ISSUER, now(&setup)),
    );
    assert_eq!(check(&setup, &token).await, Ok(()));
    assert_eq!(server.requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_storm_fetches_once() {
    let (server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let before = server.requests();
    let token = sign(
        RS256,
        Some("not-published"),
        "rsa-a",
        &claims(ISSUER, now(&setup)),
    );
    let verifier = Arc::new(setup.verifier);

    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (verifier, token) = (verifier.clone(), token.clone());
            tokio::spawn(async move { verifier.verify(&token).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        let result = task.await.expect("task ran");
        assert_eq!(result, Err(AuthError::Invalid("unknown kid")));
    }
    assert_eq!(server.requests() - before, 1);
}

#[tokio::test]
async fn random_kid_burst_respects_interval() {
    let (server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let before = server.requests();
    let interval = Duration::from_millis(500);
    let claims = claims(ISSUER, now(&setup));

    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(1600) && sent < 2000 {
        let token = sign(RS256, Some(&format!("random-{sent}")), "rsa-a", &claims);
        assert!(check(&setup, &token).await.is_err());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let allowed = (elapsed.as_millis() / interval.as_millis()) as usize + 1;
    let fetches = server.requests() - before;
    assert!(sent > 100, "only {sent} tokens sent");
    assert!(fetches >= 1, "no refetch at all");
    assert!(
        fetches <= allowed,
        "{fetches} fetches in {elapsed:?}, at most {allowed} allowed"
    );
}

#[tokio::test]
async fn algorithm_confusion_rejected() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));

    // HS256 with the RSA public key (as published) as the HMAC secret.
    let public_key = fixture("rotation-before.jwks.json");
    let confused = jsonwebtoken::encode(
        &Header {
            kid: Some("rsa-a".into()),
            ..Header::new(HS256)
        },
        &claims,
        &EncodingKey::from_secret(public_key.as_bytes()),
    )
    .expect("HS256 signs");
    assert_eq!(
        check(&setup, &confused).await,
        Err(AuthError::Invalid("alg not supported"))
    );

    let payload = base64_json(&claims);
    let none_header = base64_json(&json!({"alg": "none", "kid": "rsa-a"}));
    let unsigned = format!("{none_header}.{payload}.");
    assert_eq!(
        check(&setup, &unsigned).await,
        Err(AuthError::Invalid("unsigned token"))
    );
    let signed = sign(RS256, Some("rsa-a"), "rsa-a", &claims);
    let signature = signed.rsplit('.').next().expect("three parts");
    let none_with_signature = format!("{none_header}.{payload}.{signature}");
    assert_eq!(
        check(&setup, &none_with_signature).await,
        Err(AuthError::Invalid("alg not supported"))
    );
}

fn base64_json(value: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Re-signs a token whose header is `header`, with the fixture key `key`.
fn sign_with_header(header: serde_json::Value, claims: &serde_json::Value, key: &str) -> String {
    let signing_input = format!("{}.{}", base64_json(&header), base64_json(claims));
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &signing_key(key), RS256)
        .expect("signs");
    format!("{signing_input}.{signature}")
}

#[tokio::test]
async fn crit_header_rejected() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let claims = claims(ISSUER, now(&setup));
    let token = sign_with_header(
        json!({"alg": "RS256", "kid": "rsa-a", "crit": ["exp"], "exp": 1}),
        &claims,
        "rsa-a",
    );
    assert_eq!(
        check(&setup, &token).await,
        Err(AuthError::Invalid(
            "crit header names an unsupported extension"
        ))
    );
}

#[tokio::test]
async fn key_url_headers_never_followed() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let attacker = TestServer::serving(fixture("rotation-after.jwks.json")).await;
    let claims = claims(ISSUER, now(&setup));
    let token = sign_with_header(
        json!({
            "alg": "RS256",
            "kid": "rsa-rot",
            "jku": attacker.url,
            "x5u": attacker.url,
            "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        }),
        &claims,
        "rsa-rot",
    );
    assert!(matches!(
        check(&setup, &token).await,
        Err(AuthError::Invalid(_))
    ));
    let path_kid = sign(RS256, Some("../../../etc/passwd"), "rsa-a", &claims);
    assert!(matches!(
        check(&setup, &path_kid).await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(attacker.requests(), 0);
}

/// Two issuers whose JWKS share the kid `shared`, with different keys.
async fn two_issuers() -> (TestServer, TestServer, Verifier, u64) {
    let key_a = fixture("rotation-before.jwks.json").replace("\"rsa-a\"", "\"shared\"");
    // no-kid-two.jwks.json lists rsa-b first; keep it alone, named `shared`.
    let mut key_b: serde_json::Value =
        serde_json::from_str(&fixture("no-kid-two.jwks.json")).expect("JSON");
    key_b["keys"] = json!([key_b["keys"][0].clone()]);
    key_b["keys"][0]["kid"] = json!("shared");
    let key_b = key_b.to_string();
    let (server_a, server_b) = (
        TestServer::serving(key_a).await,
        TestServer::serving(key_b).await,
    );

    let clock = clock();
    let shared_clock: SharedClock = Arc::new(clock.clone());
    let gauges = JwksGauges::new(Arc::new(wsticket::metrics::Metrics::new()));
    let mut issuers = IssuerKeys::new();
    for (issuer, url) in [
        ("https://a.example", &server_a.url),
        ("https://b.example", &server_b.url),
    ] {
        let settings: KeyStoreSettings = store_settings(url, issuer);
        let store = Arc::new(KeyStore::new(
            settings,
            shared_clock.clone(),
            gauges.clone(),
        ));
        store.refresh_now().await.expect("loads");
        issuers
            .add(vec![issuer.to_string()], store)
            .expect("distinct issuers");
    }
    let verifier = Verifier::new(
        verifier_settings(ALL_ALGORITHMS),
        issuers,
        None,
        shared_clock,
    );
    (server_a, server_b, verifier, clock.now_secs())
}

#[tokio::test]
async fn cross_issuer_kid_collision_rejected() {
    let (_a, _b, verifier, now) = two_issuers().await;
    let as_a = claims("https://a.example", now);
    let as_b = claims("https://b.example", now);

    let genuine_a = sign(RS256, Some("shared"), "rsa-a", &as_a);
    let genuine_b = sign(RS256, Some("shared"), "rsa-b", &as_b);
    let b_key_claiming_a = sign(RS256, Some("shared"), "rsa-b", &as_a);
    let a_key_claiming_b = sign(RS256, Some("shared"), "rsa-a", &as_b);

    assert!(verifier.verify(&genuine_a).await.is_ok());
    assert!(verifier.verify(&genuine_b).await.is_ok());
    assert_eq!(
        verifier.verify(&b_key_claiming_a).await.map(|_| ()),
        Err(AuthError::Invalid("bad signature"))
    );
    assert_eq!(
        verifier.verify(&a_key_claiming_b).await.map(|_| ()),
        Err(AuthError::Invalid("bad signature"))
    );
    let unknown_issuer = sign(
        RS256,
        Some("shared"),
        "rsa-a",
        &claims("https://c.example", now),
    );
    assert_eq!(
        verifier.verify(&unknown_issuer).await.map(|_| ()),
        Err(AuthError::Invalid("iss not accepted"))
    );
}

#[tokio::test]
async fn claims_follow_the_rules() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let now = now(&setup) as f64;
    let base = claims(ISSUER, now as u64);
    let with = |name: &str, value: serde_json::Value| {
        let mut claims = base.clone();
        claims[name] = value;
        sign(RS256, Some("rsa-a"), "rsa-a", &claims)
    };
    let without = |name: &str| {
        let mut claims = base.clone();
        claims.as_object_mut().expect("object").remove(name);
        sign(RS256, Some("rsa-a"), "rsa-a", &claims)
    };
    let invalid = |reason| Err(AuthError::Invalid(reason));

    assert_eq!(check(&setup, &with("exp", json!(now + 60.5))).await, Ok(()));
    assert_eq!(
        check(&setup, &with("exp", json!(now - 10.0))).await,
        Ok(()),
        "within leeway"
    );
    assert_eq!(
        check(&setup, &with("exp", json!(now - 60.0))).await,
        Err(AuthError::Expired)
    );
    assert_eq!(
        check(&setup, &with("exp", json!((now + 60.0).to_string()))).await,
        invalid("numeric date is not a number")
    );
    assert_eq!(
        check(&setup, &without("exp")).await,
        invalid("exp is missing")
    );
    assert_eq!(
        check(&setup, &with("nbf", json!(now + 120.0))).await,
        invalid("token not valid yet (nbf)")
    );
    assert_eq!(check(&setup, &with("nbf", json!(now + 10.0))).await, Ok(()));
    assert_eq!(
        check(&setup, &with("iat", json!(now + 120.0))).await,
        invalid("token issued in the future (iat)")
    );
    assert_eq!(
        check(&setup, &with("iss", json!("https://idp.example/"))).await,
        invalid("iss not accepted")
    );
    assert_eq!(
        check(&setup, &with("aud", json!(["other", AUDIENCE]))).await,
        Ok(())
    );
    assert_eq!(
        check(&setup, &with("aud", json!("other"))).await,
        invalid("aud not accepted")
    );
    assert_eq!(
        check(&setup, &without("aud")).await,
        invalid("aud is missing")
    );
    assert_eq!(
        check(&setup, &with("sub", json!(""))).await,
        invalid("sub is missing or empty")
    );
    assert_eq!(
        check(&setup, &without("sub")).await,
        invalid("sub is missing or empty")
    );
}

#[tokio::test]
async fn verified_token_is_cached() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(RS256, Some("rsa-a"), "rsa-a", &claims(ISSUER, now(&setup)));

    let first = setup.verifier.verify(&token).await.expect("verifies");
    let second = setup.verifier.verify(&token).await.expect("verifies");
    assert!(!first.cached);
    assert!(second.cached);
    assert_eq!(second.identity.subject, "user-1");
}

#[tokio::test]
async fn cached_token_expires_by_the_clock() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(RS256, Some("rsa-a"), "rsa-a", &claims(ISSUER, now(&setup)));
    setup.verifier.verify(&token).await.expect("verifies");

    setup.clock.advance(Duration::from_secs(3600 + 60));
    assert_eq!(check(&setup, &token).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn removed_key_invalidates_cached_token() {
    let (server, setup) = load("rotation-after.jwks.json", ALL_ALGORITHMS).await;
    let token = sign(
        RS256,
        Some("rsa-rot"),
        "rsa-rot",
        &claims(ISSUER, now(&setup)),
    );
    setup.verifier.verify(&token).await.expect("verifies");
    assert!(setup.verifier.verify(&token).await.expect("cached").cached);

    server.serve(fixture("rotation-before.jwks.json"));
    setup.store.refresh_now().await.expect("refresh");
    assert_eq!(setup.verifier.cache().entry_count(), 0);
    assert_eq!(
        check(&setup, &token).await,
        Err(AuthError::Invalid("unknown kid"))
    );
}

/// Prints the verification rate with and without the cache. Run with
/// `cargo test --release --test auth_keys -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn verification_rate() {
    let (_server, setup) = load("rotation-before.jwks.json", ALL_ALGORITHMS).await;
    let rounds = 5_000;
    let tokens: Vec<String> = (0..rounds)
        .map(|i| {
            let mut claims = claims(ISSUER, now(&setup));
            claims["jti"] = json!(i);
            sign(RS256, Some("rsa-a"), "rsa-a", &claims)
        })
        .collect();

    let started = Instant::now();
    for token in &tokens {
        assert!(!setup.verifier.verify(token).await.expect("verifies").cached);
    }
    let uncached = rounds as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    for token in &tokens {
        assert!(setup.verifier.verify(token).await.expect("verifies").cached);
    }
    let cached = rounds as f64 / started.elapsed().as_secs_f64();
    println!(
        "RS256 verifications per second on one task: uncached {uncached:.0}, cached {cached:.0}"
    );
}
