//! `POST /websocket/ticket` against the real binary: success, every error
//! status of the contract, CORS and bad input.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

async fn start() -> (JwksServer, Server, tempfile::TempDir) {
    start_with(&[]).await
}

async fn start_with(args: &[&str]) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path()).args(args)).await;
    (jwks, server, dir)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn valid_token_gets_ticket() {
    let (_jwks, server, _dir) = start().await;
    let answer = post_ticket(
        &server,
        &[("authorization", &bearer(&Signer::token("alice")))],
    )
    .await;

    assert_eq!(answer.status, 200);
    let ticket = answer.body["ticket"].as_str().expect("ticket");
    assert_eq!(ticket.len(), 32, "ticket length");
    assert!(
        ticket.bytes().all(|b| b.is_ascii_alphanumeric()),
        "ticket alphabet"
    );
    let expires_in = answer.body["expires_in"].as_u64().expect("expires_in");
    assert!((29..=30).contains(&expires_in), "expires_in {expires_in}");
    let expires_at = answer.body["expires_at"].as_str().expect("expires_at");
    assert!(
        humantime::parse_rfc3339(expires_at).is_ok(),
        "RFC 3339: {expires_at}"
    );
    assert!(expires_at.ends_with('Z'), "UTC: {expires_at}");
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert!(answer.header("x-request-id").is_some());
}

#[tokio::test]
async fn es256_token_gets_ticket() {
    let (_jwks, server, _dir) = start().await;
    let token = Signer::sign(
        Algorithm::ES256,
        "ec256",
        Some("ec256"),
        &Signer::claims("bob"),
    );
    let answer = post_ticket(&server, &[("authorization", &bearer(&token))]).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn missing_token_gets_plain_challenge() {
    let (_jwks, server, _dir) = start_with(&["--realm", "chat"]).await;
    for headers in [vec![], vec![("authorization", "Basic dXNlcjpwYXNz")]] {
        let answer = post_ticket(&server, &headers).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.error_code(), "missing_token");
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Bearer realm=\"chat\"")
        );
        assert!(answer.body["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn rejected_tokens_get_invalid_token() {
    let (_jwks, server, _dir) = start().await;
    let claims = Signer::claims("mallory");
    let mut wrong_issuer = claims.clone();
    wrong_issuer["iss"] = json!("https://other.invalid");
    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = json!("someone-else");
    let mut no_subject = claims.clone();
    no_subject.as_object_mut().expect("object").remove("sub");
    let rsa_a_public_pem = b"-----BEGIN PUBLIC KEY-----\nnot really\n-----END PUBLIC KEY-----\n";
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("rsa-a".into()),
            ..jsonwebtoken::Header::new(Algorithm::HS256)
        },
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(rsa_a_public_pem),
    )
    .expect("HS256");
    let header_none = base64_url(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64_url(&claims.to_string());
    let alg_none = format!("{header_none}.{payload}.");
    let valid = Signer::token("mallory");
    let (head, _) = valid.rsplit_once('.').expect("three parts");
    let bad_signature = format!("{head}.{}", base64_url("not a signature"));

    let cases = [
        (
            "signed by another key",
            Signer::sign(Algorithm::RS256, "rsa-b", Some("rsa-a"), &claims),
        ),
        (
            "unknown kid",
            Signer::sign(Algorithm::RS256, "rsa-a", Some("nope"), &claims),
        ),
        (
            "wrong iss",
            Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &wrong_issuer),
        ),
        (
            "wrong aud",
            Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &wrong_audience),
        ),
        (
            "no sub",
            Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &no_subject),
        ),
        ("HS256", hs256),
        ("alg none", alg_none),
        ("bad signature", bad_signature),
        ("not a JWT", "abc.def".to_string()),
        (
            "oversized",
            format!("{}.{}.{}", "a".repeat(9000), "b".repeat(9000), "c"),
        ),
    ];
    for (case, token) in cases {
        let answer = post_ticket(&server, &[("authorization", &bearer(&token))]).await;
        assert_eq!(answer.status, 401, "{case}");
        assert_eq!(answer.error_code(), "invalid_token", "{case}");
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{case}"
        );
    }
}

#[tokio::test]
async fn token_up_to_16_kib_is_accepted() {
    let (_jwks, server, _dir) = start().await;
    let mut claims = Signer::claims("many-roles");
    let roles: Vec<String> = (0..400)
        .map(|i| format!("role-with-a-long-name-{i:04}"))
        .collect();
    claims["roles"] = json!(roles);
    let token = Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &claims);
    assert!(
        token.len() > 12 * 1024 && token.len() <= 16 * 1024,
        "token of {} bytes",
        token.len()
    );
    let answer = post_ticket(&server, &[("authorization", &bearer(&token))]).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn several_authorization_headers_are_rejected() {
    let (_jwks, server, _dir) = start().await;
    let value = bearer(&Signer::token("alice"));
    let answer = post_ticket(
        &server,
        &[("authorization", &value), ("authorization", &value)],
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.error_code(), "invalid_token");
}

#[tokio::test]
async fn expired_token_gets_token_expired() {
    let (_jwks, server, _dir) = start().await;
    let mut claims = Signer::claims("late");
    claims["exp"] = json!(now_secs() - 120);
    claims["iat"] = json!(now_secs() - 600);
    let token = Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &claims);
    let answer = post_ticket(&server, &[("authorization", &bearer(&token))]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.error_code(), "token_expired");
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
}

#[tokio::test]
async fn token_expired_within_leeway_is_accepted() {
    let (_jwks, server, _dir) = start().await;
    let mut claims = Signer::claims("almost");
    claims["exp"] = json!(now_secs() - 10);
    let token = Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &claims);
    let answer = post_ticket(&server, &[("authorization", &bearer(&token))]).await;
    assert_eq!(
        answer.status, 200,
        "10 s past exp is inside the default 30 s leeway"
    );
}

#[tokio::test]
async fn rate_limit_applies_per_subject() {
    let (_jwks, server, _dir) = start_with(&["--rate-limit", "2"]).await;
    let alice = bearer(&Signer::token("alice"));
    for _ in 0..2 {
        assert_eq!(
            post_ticket(&server, &[("authorization", &alice)])
                .await
                .status,
            200
        );
    }
    let limited = post_ticket(&server, &[("authorization", &alice)]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error_code(), "rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");

    let bob = bearer(&Signer::token("bob"));
    assert_eq!(
        post_ticket(&server, &[("authorization", &bob)])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn unreachable_jwks_gives_auth_unavailable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("http://{}/jwks.json", closed_port());
    let server = Server::start(ServerOptions::new(url, dir.path()).not_waiting_for_ready()).await;

    let ready = answer_of(
        reqwest::get(server.admin_url("/readyz"))
            .await
            .expect("readyz"),
    )
    .await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["checks"]["keys_loaded"], false);

    let answer = post_ticket(
        &server,
        &[("authorization", &bearer(&Signer::token("alice")))],
    )
    .await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_code(), "auth_unavailable");
    assert!(answer.header("retry-after").is_some());
}

#[tokio::test]
async fn preflight_answers_allowed_origin_only() {
    let (_jwks, server, _dir) = start_with(&["--allowed-origin", "https://app.example"]).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/websocket/ticket"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };

    let allowed = answer_of(preflight("https://app.example").await.expect("preflight")).await;
    assert_eq!(allowed.status, 204);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(allowed
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization")));

    let other = answer_of(preflight("https://evil.example").await.expect("preflight")).await;
    assert_eq!(other.status, 403);
    assert_eq!(other.error_code(), "origin_not_allowed");
    assert!(other.header("access-control-allow-origin").is_none());

    let token = bearer(&Signer::token("alice"));
    let post = post_ticket(
        &server,
        &[
            ("authorization", &token),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(post.status, 403);
    assert_eq!(post.error_code(), "origin_not_allowed");
    let post = post_ticket(
        &server,
        &[("authorization", &token), ("origin", "https://app.example")],
    )
    .await;
    assert_eq!(post.status, 200);
    assert_eq!(
        post.header("access-control-allow-origin"),
        Some("https://app.example")
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let (_jwks, server, _dir) = start().await;
    let client = reqwest::Client::new();

    let unknown = answer_of(client.get(server.url("/nope")).send().await.expect("get")).await;
    assert_eq!((unknown.status, unknown.error_code()), (404, "not_found"));

    let wrong_method = answer_of(
        client
            .get(server.url("/websocket/ticket"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(
        (wrong_method.status, wrong_method.error_code()),
        (405, "method_not_allowed")
    );

    let not_upgrade = answer_of(
        client
            .get(server.url("/ws?ticket=x"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(not_upgrade.status, 426);
    assert_eq!(not_upgrade.error_code(), "websocket_upgrade_required");

    let request_id = post_ticket(&server, &[("x-request-id", "trace-42")]).await;
    assert_eq!(request_id.header("x-request-id"), Some("trace-42"));
    let odd_id = post_ticket(&server, &[("x-request-id", "has spaces and {braces}")]).await;
    assert_ne!(
        odd_id.header("x-request-id"),
        Some("has spaces and {braces}")
    );
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn several_origin_headers_are_rejected() {
    let (_jwks, server, _dir) = start().await;
    let token = bearer(&Signer::token("alice"));
    let answer = post_ticket(
        &server,
        &[
            ("authorization", &token),
            ("origin", "https://a.example"),
            ("origin", "https://b.example"),
        ],
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), "invalid_request");
}
