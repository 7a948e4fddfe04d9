//! Opaque tokens checked by RFC 7662 token introspection against an
//! endpoint served by the test on 127.0.0.1: the request's form and client
//! authentication, the checks of the response, its cache, the breaker, and
//! the secret kept out of logs and `Debug` output.

mod auth_support;

use std::sync::Arc;
use std::time::Duration;

use auth_support::*;
use base64::Engine;
use jsonwebtoken::Algorithm::RS256;
use serde_json::{json, Value};
use wsticket::auth::breaker::BreakerSettings;
use wsticket::auth::introspection::{IntrospectionSettings, Introspector};
use wsticket::auth::keys::JwksGauges;
use wsticket::auth::{AuthError, IssuerKeys, KeyStore, Verifier};
use wsticket::clock::{Clock, ManualClock, SharedClock};
use wsticket::config::{Secret, TokenKind};
use wsticket::metrics::Metrics;

const CLIENT_ID: &str = "wsticket client";
const CLIENT_SECRET: &str = "s3cret:with&symbols";
const OPAQUE: &str = "opaque-token-0123456789";

struct Fixture {
    introspection: TestServer,
    jwks: TestServer,
    verifier: Verifier,
    clock: ManualClock,
    metrics: Arc<Metrics>,
}

fn active_answer(now: u64) -> Value {
    json!({
        "active": true,
        "sub": "user-7",
        "exp": now + 3600,
        "aud": ["other", AUDIENCE],
        "iss": ISSUER,
        "client_id": "web",
    })
}

fn serve_json(value: Value) -> Behaviour {
    Behaviour::Serve {
        body: value.to_string(),
        cache_control: None,
    }
}

async fn fixture(kind: TokenKind, answer: Value) -> Fixture {
    let clock = clock();
    let shared: SharedClock = Arc::new(clock.clone());
    let metrics = Arc::new(Metrics::new());
    let introspection = TestServer::start(serve_json(answer)).await;
    let jwks = TestServer::serving(auth_support::fixture("rotation-before.jwks.json")).await;

    let store = Arc::new(KeyStore::new(
        store_settings(&jwks.url, ISSUER),
        shared.clone(),
        JwksGauges::new(metrics.clone()),
    ));
    store.refresh_now().await.expect("JWKS loads");
    let mut issuers = IssuerKeys::new();
    issuers
        .add(vec![ISSUER.to_string()], store)
        .expect("one issuer");

    let introspector = Introspector::new(
        IntrospectionSettings {
            url: introspection.url.parse().expect("URL"),
            client_id: CLIENT_ID.to_string(),
            client_secret: Secret::new(CLIENT_SECRET.to_string()),
            timeout: Duration::from_millis(500),
            cache_ttl: Duration::from_secs(60),
            breaker: BreakerSettings {
                failures: 2,
                open_min: Duration::from_millis(200),
                open_max: Duration::from_millis(400),
            },
        },
        metrics.clone(),
    );
    let mut settings = verifier_settings(ALL_ALGORITHMS);
    settings.token_kind = kind;
    let verifier = Verifier::new(settings, issuers, Some(introspector), shared);
    Fixture {
        introspection,
        jwks,
        verifier,
        clock,
        metrics,
    }
}

fn form_value(body: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(body.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[tokio::test]
async fn opaque_token_introspected() {
    let now = clock().now_secs();
    let fx = fixture(TokenKind::Auto, active_answer(now)).await;

    let verified = fx.verifier.verify(OPAQUE).await.expect("active token");
    assert_eq!(verified.identity.subject, "user-7");
    assert!(!verified.cached);

    let seen = fx.introspection.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(form_value(&request.body, "token").as_deref(), Some(OPAQUE));
    let basic = request
        .header("authorization")
        .and_then(|value| value.strip_prefix("Basic "))
        .expect("HTTP Basic client authentication");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic)
        .expect("base64");
    let decoded = String::from_utf8(decoded).expect("UTF-8");
    let (id, secret) = decoded.split_once(':').expect("id:secret");
    assert_eq!(form_decode(id), CLIENT_ID);
    assert_eq!(form_decode(secret), CLIENT_SECRET);
}

fn form_decode(value: &str) -> String {
    url::form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .expect("one pair")
}

#[tokio::test]
async fn introspection_answer_is_cached() {
    let now = clock().now_secs();
    let fx = fixture(TokenKind::Auto, active_answer(now)).await;

    assert!(!fx.verifier.verify(OPAQUE).await.expect("first").cached);
    assert!(fx.verifier.verify(OPAQUE).await.expect("second").cached);
    assert_eq!(fx.introspection.requests(), 1);

    // The cache TTL (60 s) ends the entry before the token's exp.
    fx.clock.advance(Duration::from_secs(61));
    assert!(!fx.verifier.verify(OPAQUE).await.expect("third").cached);
    assert_eq!(fx.introspection.requests(), 2);
}

#[tokio::test]
async fn exp_ends_cache_before_ttl() {
    let now = clock().now_secs();
    let mut answer = active_answer(now);
    answer["exp"] = json!(now + 10);
    let fx = fixture(TokenKind::Auto, answer).await;

    assert!(fx.verifier.verify(OPAQUE).await.is_ok());
    fx.clock.advance(Duration::from_secs(11));
    fx.introspection.set(serve_json(json!({"active": false})));
    assert_eq!(
        fx.verifier.verify(OPAQUE).await.map(|_| ()),
        Err(AuthError::Invalid("introspection: token is not active"))
    );
    assert_eq!(fx.introspection.requests(), 2);
}

#[tokio::test]
async fn introspection_answer_checked() {
    let now = clock().now_secs();
    let cases: Vec<(&str, Value, Result<(), AuthError>)> = vec![
        (
            "inactive",
            json!({"active": false, "sub": "user-7"}),
            Err(AuthError::Invalid("introspection: token is not active")),
        ),
        (
            "active as a string",
            json!({"active": "true", "sub": "user-7", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}),
            Err(AuthError::Invalid("introspection: token is not active")),
        ),
        (
            "no sub",
            json!({"active": true, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}),
            Err(AuthError::Invalid("sub is missing or empty")),
        ),
        (
            "no exp",
            json!({"active": true, "sub": "u", "aud": AUDIENCE, "iss": ISSUER}),
            Err(AuthError::Invalid("exp is missing")),
        ),
        (
            "expired",
            json!({"active": true, "sub": "u", "exp": now - 120, "aud": AUDIENCE, "iss": ISSUER}),
            Err(AuthError::Expired),
        ),
        (
            "other aud",
            json!({"active": true, "sub": "u", "exp": now + 60, "aud": "other", "iss": ISSUER}),
            Err(AuthError::Invalid("aud not accepted")),
        ),
        (
            "other iss",
            json!({"active": true, "sub": "u", "exp": now + 60, "aud": AUDIENCE, "iss": "https://evil.example"}),
            Err(AuthError::Invalid("iss not accepted")),
        ),
        (
            "valid",
            json!({"active": true, "sub": "u", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}),
            Ok(()),
        ),
    ];
    let fx = fixture(TokenKind::Auto, json!({})).await;
    for (index, (case, answer, expected)) in cases.into_iter().enumerate() {
        fx.introspection.set(serve_json(answer));
        let token = format!("{OPAQUE}-{index}");
        let outcome = fx.verifier.verify(&token).await.map(|_| ());
        assert_eq!(outcome, expected, "{case}");
    }
}

#[tokio::test]
async fn introspection_outage_is_unavailable() {
    let fx = fixture(TokenKind::Auto, json!({})).await;
    for (index, behaviour) in [Behaviour::Status(500), Behaviour::Hang]
        .into_iter()
        .enumerate()
    {
        fx.introspection.set(behaviour);
        let outcome = fx.verifier.verify(&format!("{OPAQUE}-{index}")).await;
        assert!(
            matches!(outcome, Err(AuthError::Unavailable { .. })),
            "{outcome:?}"
        );
    }
    // Two failures opened the breaker: no further request goes out.
    assert_eq!(fx.metrics.introspection_breaker_state.get(), 2);
    let outcome = fx.verifier.verify(&format!("{OPAQUE}-x")).await;
    assert!(
        matches!(outcome, Err(AuthError::Unavailable { .. })),
        "{outcome:?}"
    );
    assert_eq!(fx.introspection.requests(), 2);

    fx.introspection
        .set(serve_json(active_answer(fx.clock.now_secs())));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(fx.verifier.verify(&format!("{OPAQUE}-y")).await.is_ok());
    assert_eq!(fx.metrics.introspection_breaker_state.get(), 0);
}

#[tokio::test]
async fn invalid_json_answer_is_unavailable() {
    let fx = fixture(TokenKind::Auto, json!({})).await;
    fx.introspection.set(Behaviour::Serve {
        body: "not json".into(),
        cache_control: None,
    });
    let outcome = fx.verifier.verify(OPAQUE).await;
    assert!(
        matches!(outcome, Err(AuthError::Unavailable { .. })),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn auto_mode_sends_jwts_to_jwks() {
    let now = clock().now_secs();
    let fx = fixture(TokenKind::Auto, active_answer(now)).await;
    let jwt = sign(RS256, Some("rsa-a"), "rsa-a", &claims(ISSUER, now));
    assert!(fx.verifier.verify(&jwt).await.is_ok());
    assert_eq!(fx.introspection.requests(), 0);
    assert_eq!(fx.jwks.requests(), 1);
}

#[tokio::test]
async fn opaque_mode_introspects_jwts() {
    let now = clock().now_secs();
    let fx = fixture(TokenKind::Opaque, active_answer(now)).await;
    let jwt = sign(RS256, Some("rsa-a"), "rsa-a", &claims(ISSUER, now));
    let verified = fx.verifier.verify(&jwt).await.expect("introspected");
    assert_eq!(verified.identity.subject, "user-7");
    assert_eq!(fx.introspection.requests(), 1);
}

#[tokio::test]
async fn jwt_mode_rejects_opaque_tokens() {
    let fx = fixture(TokenKind::Jwt, json!({})).await;
    assert!(matches!(
        fx.verifier.verify(OPAQUE).await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(fx.introspection.requests(), 0);
}

#[tokio::test]
async fn secret_stays_out_of_logs() {
    let logs = CapturedLogs::global();
    let fx = fixture(TokenKind::Auto, json!({})).await;
    fx.introspection.set(Behaviour::Status(401));
    let _ = fx.verifier.verify(OPAQUE).await;
    fx.introspection.stop();
    let _ = fx.verifier.verify(&format!("{OPAQUE}-2")).await;

    let text = logs.text();
    assert!(
        text.contains("introspection_failed"),
        "the failures are logged"
    );
    assert!(!text.contains(CLIENT_SECRET));
    assert!(!text.contains(OPAQUE));
    let debug = format!("{:?}", Secret::new(CLIENT_SECRET.to_string()));
    assert!(!debug.contains(CLIENT_SECRET));
}
