//! `GET /ws?ticket=…` against the real binary: the upgrade, the echo, every
//! rejection of the contract, single use under races, and Origin rules.

mod common;

use std::sync::Arc;

use common::*;
use futures_util::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn start_with(args: &[&str]) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path()).args(args)).await;
    (jwks, server, dir)
}

fn expect_rejection(outcome: Result<Socket, Rejection>, status: u16, code: &str) {
    match outcome {
        Ok(_) => panic!("expected {status} {code}, got 101"),
        Err(rejection) => {
            assert_eq!(rejection.status, status, "status for {code}");
            assert_eq!(rejection.code, code);
            assert_eq!(
                rejection.connection.as_deref(),
                Some("close"),
                "{code} closes"
            );
        }
    }
}

#[tokio::test]
async fn upgrade_authenticates_then_echoes() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let mut socket = connect_with_ticket(&server, &ticket).await.expect("101");

    let greeting: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
    assert_eq!(greeting["type"], "authenticated");
    assert_eq!(greeting["subject"], "alice");
    assert_eq!(greeting["session"], "session-1");
    assert!(greeting["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    socket
        .send(Message::text("hello"))
        .await
        .expect("send text");
    assert_eq!(next_text(&mut socket).await, "hello");

    socket
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send binary");
    use futures_util::StreamExt;
    let echoed = tokio::time::timeout(std::time::Duration::from_secs(5), socket.next())
        .await
        .expect("frame in time");
    match echoed {
        Some(Ok(Message::Binary(data))) => assert_eq!(data.as_ref(), &[0u8, 1, 2, 255]),
        other => panic!("expected binary echo, got {other:?}"),
    }
    assert_eq!(server.metric("wsticket_open_connections").await, 1.0);
}

#[tokio::test]
async fn session_is_null_without_sid() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let mut claims = Signer::claims("carol");
    claims.as_object_mut().expect("object").remove("sid");
    let token = Signer::sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-a",
        Some("rsa-a"),
        &claims,
    );
    let ticket = ticket_for(&server, &token).await;
    let mut socket = connect_with_ticket(&server, &ticket).await.expect("101");
    let greeting: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
    assert_eq!(greeting["session"], Value::Null);
}

#[tokio::test]
async fn ticket_errors_have_contract_statuses() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    expect_rejection(connect(&server, "", &[]).await, 401, "missing_ticket");
    expect_rejection(
        connect(&server, "?ticket=", &[]).await,
        401,
        "missing_ticket",
    );
    expect_rejection(
        connect(&server, "?ticket=short", &[]).await,
        403,
        "invalid_ticket",
    );
    let unknown = "A".repeat(32);
    expect_rejection(
        connect_with_ticket(&server, &unknown).await,
        403,
        "invalid_ticket",
    );
    expect_rejection(
        connect(&server, "?ticket=a&ticket=b", &[]).await,
        400,
        "invalid_request",
    );
    expect_rejection(
        connect(&server, "?ticket=%FF%FE", &[]).await,
        400,
        "invalid_request",
    );
}

#[tokio::test]
async fn replayed_ticket_is_rejected() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let first = connect_with_ticket(&server, &ticket).await;
    assert!(first.is_ok(), "first use is accepted");
    expect_rejection(
        connect_with_ticket(&server, &ticket).await,
        403,
        "ticket_already_used",
    );
    assert_eq!(server.metric("wsticket_replay_attempts_total").await, 1.0);
    assert_eq!(
        server.settled_events("replay_attempt").await.len(),
        1,
        "one WARN event per replay"
    );
    assert_eq!(
        server.settled_events("replay_attempt").await[0]["level"],
        "WARN"
    );
}

#[tokio::test]
async fn expired_ticket_is_rejected_as_expired() {
    let (_jwks, server, _dir) = start_with(&["--ticket-ttl", "1s"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    expect_rejection(
        connect_with_ticket(&server, &ticket).await,
        401,
        "ticket_expired",
    );
    assert_eq!(
        server.metric("wsticket_tickets_expired_unused_total").await,
        1.0
    );
}

#[tokio::test]
async fn concurrent_upgrades_accept_exactly_one() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let server = Arc::new(server);
    for _round in 0..3 {
        let ticket = Arc::new(ticket_for(&server, &Signer::token("racer")).await);
        let attempts: Vec<_> = (0..32)
            .map(|_| {
                let (server, ticket) = (server.clone(), ticket.clone());
                tokio::spawn(async move { connect_with_ticket(&server, &ticket).await })
            })
            .collect();
        let mut accepted = 0;
        let mut replays = 0;
        for attempt in attempts {
            match attempt.await.expect("task") {
                Ok(_) => accepted += 1,
                Err(rejection) if rejection.code == "ticket_already_used" => replays += 1,
                Err(rejection) => panic!("unexpected rejection {rejection:?}"),
            }
        }
        assert_eq!(accepted, 1, "exactly one 101 among 32 racing upgrades");
        assert_eq!(replays, 31);
    }
}

#[tokio::test]
async fn jwt_never_authenticates_upgrade() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let token = Signer::token("alice");
    let bearer = format!("Bearer {token}");
    let cookie = format!("token={token}; access_token={token}");
    let attempts: Vec<(String, Vec<(&str, &str)>)> = vec![
        (String::new(), vec![("authorization", bearer.as_str())]),
        (format!("?token={token}"), vec![]),
        (format!("?access_token={token}"), vec![]),
        (String::new(), vec![("cookie", cookie.as_str())]),
        (
            String::new(),
            vec![("sec-websocket-protocol", token.as_str())],
        ),
    ];
    for (query, headers) in attempts {
        expect_rejection(
            connect(&server, &query, &headers).await,
            401,
            "missing_ticket",
        );
    }
}

#[tokio::test]
async fn disallowed_origin_cannot_upgrade() {
    let (_jwks, server, _dir) = start_with(&["--allowed-origin", "https://app.example"]).await;
    let ticket = ticket_with_origin(
        &server,
        &Signer::token("alice"),
        Some("https://app.example"),
    )
    .await;
    let query = format!("?ticket={ticket}");
    expect_rejection(
        connect(&server, &query, &[("origin", "https://evil.example")]).await,
        403,
        "origin_not_allowed",
    );
    let accepted = connect(&server, &query, &[("origin", "https://app.example")]).await;
    assert!(
        accepted.is_ok(),
        "the rejected attempt did not consume the ticket"
    );
}

#[tokio::test]
async fn ticket_is_bound_to_issuing_origin() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket =
        ticket_with_origin(&server, &Signer::token("alice"), Some("https://a.example")).await;
    let query = format!("?ticket={ticket}");
    expect_rejection(
        connect(&server, &query, &[("origin", "https://b.example")]).await,
        403,
        "origin_not_allowed",
    );
    expect_rejection(
        connect(&server, &query, &[]).await,
        403,
        "origin_not_allowed",
    );
    let accepted = connect(&server, &query, &[("origin", "https://a.example")]).await;
    assert!(
        accepted.is_ok(),
        "the issuing origin can still use the ticket"
    );
}

#[tokio::test]
async fn ticket_without_origin_opens_from_anywhere() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let query = format!("?ticket={ticket}");
    let accepted = connect(&server, &query, &[("origin", "https://b.example")]).await;
    assert!(accepted.is_ok());
}

#[tokio::test]
async fn redemptions_are_counted_by_result() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let _socket = connect_with_ticket(&server, &ticket).await.expect("101");
    let _ = connect_with_ticket(&server, &ticket).await;
    let _ = connect(&server, "", &[]).await;
    let series =
        |result: &str| format!("wsticket_redemptions_total{{result=\"{result}\",via=\"upgrade\"}}");
    assert_eq!(server.metric(&series("ok")).await, 1.0);
    assert_eq!(server.metric(&series("ticket_already_used")).await, 1.0);
    assert_eq!(server.metric(&series("missing_ticket")).await, 1.0);
    assert_eq!(server.metric("wsticket_tickets_issued_total").await, 1.0);
}

#[tokio::test]
async fn far_future_token_expiry_is_shown_clamped() {
    let (_jwks, server, _dir) = start_with(&["--close-on-token-expiry"]).await;
    let mut claims = Signer::claims("forever");
    claims["exp"] = serde_json::json!(253_402_300_800u64 * 10);
    let token = Signer::sign(
        jsonwebtoken::Algorithm::RS256,
        "rsa-a",
        Some("rsa-a"),
        &claims,
    );
    let ticket = ticket_for(&server, &token).await;
    let mut socket = connect_with_ticket(&server, &ticket).await.expect("101");
    let greeting: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
    assert_eq!(greeting["expires_at"], "9999-12-31T23:59:59Z");
    socket
        .send(Message::text("still alive"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut socket).await, "still alive");
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    use futures_util::StreamExt;
    let (_jwks, server, _dir) = start_with(&["--max-message-size", "2048"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let mut socket = connect_with_ticket(&server, &ticket).await.expect("101");
    let _greeting = next_text(&mut socket).await;
    socket
        .send(Message::text("x".repeat(4096)))
        .await
        .expect("send");
    let close = loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), socket.next())
            .await
            .expect("a close frame within 5 s");
        match frame {
            Some(Ok(Message::Close(close))) => break close,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.expect("close code").code), 1009);
}
