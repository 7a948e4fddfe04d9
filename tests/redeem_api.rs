//! `POST /v1/tickets/redeem` on the admin listener: the identity for a
//! ticket, the admin token, and single use shared with the upgrade.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

async fn start_with(args: &[&str]) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
    let token_path = token_file.to_str().expect("UTF-8 path").to_owned();
    let server = Server::start(
        ServerOptions::new(jwks.url(), &dir.path().join("data"))
            .args(&["--admin-token-file", &token_path])
            .args(args),
    )
    .await;
    (jwks, server, dir)
}

async fn redeem(server: &Server, authorization: Option<&str>, body: Value) -> Answer {
    let mut request = reqwest::Client::new()
        .post(server.admin_url("/v1/tickets/redeem"))
        .json(&body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    answer_of(request.send().await.expect("redeem request")).await
}

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

#[tokio::test]
async fn redeem_returns_identity_and_claims() {
    let (_jwks, server, _dir) = start_with(&["--forward-claim", "role"]).await;
    let mut claims = Signer::claims("alice");
    claims["role"] = json!("editor");
    claims["email"] = json!("alice@example.test");
    let token = Signer::token_with(&claims);
    let ticket = ticket_for(&server, &token).await;

    let answer = redeem(&server, Some(&bearer()), json!({ "ticket": ticket })).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["subject"], "alice");
    assert_eq!(answer.body["session"], "session-1");
    assert_eq!(answer.body["claims"], json!({ "role": "editor" }));
    assert!(answer.body["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert_eq!(
        server
            .metric(r#"wsticket_redemptions_total{result="ok",via="redeem_api"}"#)
            .await,
        1.0
    );
    let redeemed = server.settled_events("ticket_redeemed").await;
    assert_eq!(redeemed.len(), 1);
    assert_eq!(redeemed[0]["via"], "redeem_api");
    assert!(server.logs().iter().all(|line| !line.contains(&ticket)
        && !line.contains(ADMIN_TOKEN)
        && !line.contains(&token)));
}

#[tokio::test]
async fn ticket_is_used_once_whichever_way() {
    let (_jwks, server, _dir) = start_with(&[]).await;

    // Redeemed over HTTP: neither the API nor an upgrade takes it again.
    let redeemed = ticket_for(&server, &Signer::token("alice")).await;
    let first = redeem(&server, Some(&bearer()), json!({ "ticket": redeemed })).await;
    assert_eq!(first.status, 200);
    let again = redeem(&server, Some(&bearer()), json!({ "ticket": redeemed })).await;
    assert_eq!(again.status, 403);
    assert_eq!(again.error_code(), "ticket_already_used");
    let upgrade = connect_with_ticket(&server, &redeemed)
        .await
        .expect_err("redeemed ticket");
    assert_eq!(upgrade.code, "ticket_already_used");

    // Used for an upgrade: the API does not take it.
    let upgraded = ticket_for(&server, &Signer::token("alice")).await;
    let _socket = connect_with_ticket(&server, &upgraded).await.expect("101");
    let after = redeem(&server, Some(&bearer()), json!({ "ticket": upgraded })).await;
    assert_eq!(after.status, 403);
    assert_eq!(after.error_code(), "ticket_already_used");
    assert_eq!(server.metric("wsticket_replay_attempts_total").await, 3.0);
}

#[tokio::test]
async fn redeem_requires_admin_token() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let body = json!({ "ticket": ticket });

    let missing = redeem(&server, None, body.clone()).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error_code(), "invalid_admin_token");
    assert!(missing
        .header("www-authenticate")
        .is_some_and(|value| value.starts_with("Bearer")));
    let wrong = redeem(
        &server,
        Some("Bearer not-the-admin-token-at-all"),
        body.clone(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let basic = redeem(&server, Some(&format!("Basic {ADMIN_TOKEN}")), body.clone()).await;
    assert_eq!(basic.status, 401);

    // The rejected calls did not consume the ticket.
    let accepted = redeem(&server, Some(&bearer()), body).await;
    assert_eq!(accepted.status, 200);
}

#[tokio::test]
async fn redeem_is_disabled_without_token_file() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let answer = redeem(&server, Some(&bearer()), json!({ "ticket": ticket })).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_code(), "redeem_api_disabled");
    let message = answer.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("--admin-token-file"), "{message}");
    connect_with_ticket(&server, &ticket)
        .await
        .expect("the ticket is still unused");
}

#[tokio::test]
async fn redeem_enforces_origin_binding() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket =
        ticket_with_origin(&server, &Signer::token("alice"), Some("https://a.example")).await;

    let other = redeem(
        &server,
        Some(&bearer()),
        json!({ "ticket": ticket, "origin": "https://b.example" }),
    )
    .await;
    assert_eq!(other.status, 403);
    assert_eq!(other.error_code(), "origin_not_allowed");
    let none = redeem(&server, Some(&bearer()), json!({ "ticket": ticket })).await;
    assert_eq!(none.status, 403);
    assert_eq!(none.error_code(), "origin_not_allowed");
    let same = redeem(
        &server,
        Some(&bearer()),
        json!({ "ticket": ticket, "origin": "https://a.example" }),
    )
    .await;
    assert_eq!(same.status, 200);
}

#[tokio::test]
async fn redeem_reports_contract_errors() {
    let (_jwks, server, _dir) = start_with(&["--ticket-ttl", "1s"]).await;

    let not_json = answer_of(
        reqwest::Client::new()
            .post(server.admin_url("/v1/tickets/redeem"))
            .header("authorization", bearer())
            .body("ticket=abc")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(not_json.status, 400);
    assert_eq!(not_json.error_code(), "invalid_request");

    let cases = [
        (json!({ "ticket": "" }), 401, "missing_ticket"),
        (json!({ "ticket": "short" }), 403, "invalid_ticket"),
        (json!({ "ticket": "D".repeat(32) }), 403, "invalid_ticket"),
    ];
    for (body, status, code) in cases {
        let answer = redeem(&server, Some(&bearer()), body).await;
        assert_eq!(answer.status, status, "status for {code}");
        assert_eq!(answer.error_code(), code);
    }

    let late = ticket_for(&server, &Signer::token("alice")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = redeem(&server, Some(&bearer()), json!({ "ticket": late })).await;
    assert_eq!(expired.status, 401);
    assert_eq!(expired.error_code(), "ticket_expired");
}
