//! Rejections as a browser receives them with `--reject-with close`, and the
//! upgrade limits: failed upgrades per client address and connections per
//! subject.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

async fn start_with(args: &[&str]) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path()).args(args)).await;
    (jwks, server, dir)
}

/// How an upgrade ended, as a client sees it.
#[derive(Debug)]
enum Outcome {
    /// A `101` and an open connection, which sent a text frame first (the
    /// greeting in echo mode).
    Open,
    /// A `101`, then at once a close frame with this code and JSON reason.
    Closed { code: u16, reason: Value },
    /// An HTTP error response.
    Http {
        status: u16,
        code: String,
        retry_after: Option<u64>,
    },
}

/// Opens `/ws` from the client address `source` (a 127.0.0.x address) with
/// a query and extra headers, and reads the first frame when it is a close.
async fn attempt_from(
    server: &Server,
    source: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> Outcome {
    let request = ws_request(server, query, headers);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let source: SocketAddr = format!("{source}:0").parse().expect("source address");
    socket.bind(source).expect("bind the client address");
    let stream = socket.connect(server.public).await.expect("TCP connect");
    let connected = tokio_tungstenite::client_async(request, stream).await;
    let mut socket = match connected {
        Ok((socket, _)) => socket,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: Value = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice(body).ok())
                .unwrap_or(Value::Null);
            return Outcome::Http {
                status: response.status().as_u16(),
                code: body["error"].as_str().unwrap_or_default().to_owned(),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse().ok()),
            };
        }
        Err(err) => panic!("WebSocket connect failed: {err}"),
    };
    let first = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("a first frame within 5 s");
    match first {
        Some(Ok(Message::Close(Some(frame)))) => {
            let reason = frame.reason.to_string();
            assert!(reason.len() <= 123, "reason of {} bytes", reason.len());
            Outcome::Closed {
                code: u16::from(frame.code),
                reason: serde_json::from_str(&reason).expect("JSON close reason"),
            }
        }
        Some(Ok(Message::Text(_))) => Outcome::Open,
        other => panic!("expected a close frame or the greeting, got {other:?}"),
    }
}

async fn attempt(server: &Server, query: &str, headers: &[(&str, &str)]) -> Outcome {
    attempt_from(server, "127.0.0.1", query, headers).await
}

fn expect_close(outcome: Outcome, code: u16, error: &str) -> Value {
    match outcome {
        Outcome::Closed { code: got, reason } => {
            assert_eq!(got, code, "close code for {error}");
            assert_eq!(reason["error"], error);
            reason
        }
        other => panic!("expected close {code} {error}, got {other:?}"),
    }
}

fn expect_http(outcome: Outcome, status: u16, error: &str) -> Option<u64> {
    match outcome {
        Outcome::Http {
            status: got,
            code,
            retry_after,
        } => {
            assert_eq!(got, status, "status for {error}");
            assert_eq!(code, error);
            retry_after
        }
        other => panic!("expected HTTP {status} {error}, got {other:?}"),
    }
}

/// Checks that an upgrade was accepted.
fn expect_accepted(outcome: Outcome) {
    match outcome {
        Outcome::Open => {}
        other => panic!("expected an accepted upgrade, got {other:?}"),
    }
}

#[tokio::test]
async fn close_mode_reports_ticket_errors() {
    let (_jwks, server, _dir) = start_with(&[
        "--reject-with",
        "close",
        "--ticket-ttl",
        "1s",
        "--allowed-origin",
        "https://app.example",
    ])
    .await;

    expect_close(attempt(&server, "", &[]).await, 4401, "missing_ticket");
    let unknown = format!("?ticket={}", "A".repeat(32));
    expect_close(
        attempt(&server, &unknown, &[]).await,
        4403,
        "invalid_ticket",
    );

    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let query = format!("?ticket={ticket}");
    let evil = [("origin", "https://evil.example")];
    expect_close(
        attempt(&server, &query, &evil).await,
        4403,
        "origin_not_allowed",
    );
    expect_accepted(attempt(&server, &query, &[]).await);
    expect_close(
        attempt(&server, &query, &[]).await,
        4403,
        "ticket_already_used",
    );

    let late = ticket_for(&server, &Signer::token("alice")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect_close(
        attempt(&server, &format!("?ticket={late}"), &[]).await,
        4401,
        "ticket_expired",
    );

    // Each rejection is logged once, at WARN, without the ticket.
    let rejected = server.settled_events("ticket_rejected").await;
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert!(rejected.iter().all(|event| event["level"] == "WARN"));
    assert_eq!(server.settled_events("replay_attempt").await.len(), 1);
    assert!(server
        .logs()
        .iter()
        .all(|line| !line.contains(&ticket) && !line.contains(&late)));
}

#[tokio::test]
async fn close_mode_answers_offered_subprotocol() {
    let (_jwks, server, _dir) = start_with(&["--reject-with", "close"]).await;
    let request = {
        let mut request = server
            .ws_url("")
            .into_client_request()
            .expect("valid ws URL");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("app.v1, app.v2"),
        );
        request
    };
    let (mut socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("101 so the browser can read the close code");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("app.v1")
    );
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("close in time");
    match frame {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4401),
        other => panic!("expected close 4401, got {other:?}"),
    }
}

#[tokio::test]
async fn close_mode_keeps_http_for_non_upgrades() {
    let (_jwks, server, _dir) = start_with(&["--reject-with", "close"]).await;
    let response = reqwest::get(server.url("/ws?ticket=x"))
        .await
        .expect("plain GET");
    assert_eq!(response.status().as_u16(), 426);
}

#[tokio::test]
async fn close_mode_reports_upstream_down_as_4502() {
    let closed = closed_port();
    let upstream = format!("ws://{closed}/");
    let (_jwks, server, _dir) =
        start_with(&["--reject-with", "close", "--upstream", &upstream]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let query = format!("?ticket={ticket}");
    expect_close(
        attempt(&server, &query, &[]).await,
        4502,
        "upstream_unavailable",
    );
    expect_close(
        attempt(&server, &query, &[]).await,
        4403,
        "ticket_already_used",
    );
}

#[tokio::test]
async fn close_mode_reports_rate_limit_with_retry_after() {
    let (_jwks, server, _dir) = start_with(&[
        "--reject-with",
        "close",
        "--max-failed-upgrades-per-minute",
        "2",
    ])
    .await;
    let unknown = format!("?ticket={}", "B".repeat(32));
    expect_close(
        attempt(&server, &unknown, &[]).await,
        4403,
        "invalid_ticket",
    );
    expect_close(
        attempt(&server, &unknown, &[]).await,
        4403,
        "invalid_ticket",
    );
    let reason = expect_close(attempt(&server, &unknown, &[]).await, 4429, "rate_limited");
    let retry_after = reason["retry_after"].as_u64().expect("retry_after seconds");
    assert!((1..=60).contains(&retry_after), "retry_after {retry_after}");
}

#[tokio::test]
async fn failed_upgrades_are_limited_per_address() {
    let (_jwks, server, _dir) = start_with(&["--max-failed-upgrades-per-minute", "3"]).await;
    let unknown = format!("?ticket={}", "C".repeat(32));
    for _ in 0..3 {
        expect_http(
            attempt_from(&server, "127.0.0.3", &unknown, &[]).await,
            403,
            "invalid_ticket",
        );
    }
    let retry_after = expect_http(
        attempt_from(&server, "127.0.0.3", &unknown, &[]).await,
        429,
        "rate_limited",
    )
    .expect("Retry-After header");
    assert!(retry_after >= 1);

    // A blocked address is refused even with a valid ticket, which stays
    // unused; another address is not affected.
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let query = format!("?ticket={ticket}");
    expect_http(
        attempt_from(&server, "127.0.0.3", &query, &[]).await,
        429,
        "rate_limited",
    );
    expect_accepted(attempt_from(&server, "127.0.0.4", &query, &[]).await);
    assert_eq!(
        server
            .metric(r#"wsticket_redemptions_total{result="rate_limited",via="upgrade"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn replays_do_not_count_as_failed_upgrades() {
    let (_jwks, server, _dir) = start_with(&["--max-failed-upgrades-per-minute", "1"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let query = format!("?ticket={ticket}");
    let _socket = connect(&server, &query, &[]).await.expect("101");
    for _ in 0..3 {
        let rejection = connect(&server, &query, &[]).await.expect_err("replay");
        assert_eq!(rejection.code, "ticket_already_used");
    }
}

#[tokio::test]
async fn connections_per_subject_are_capped() {
    let (_jwks, server, _dir) = start_with(&["--max-connections-per-subject", "2"]).await;
    let token = Signer::token("alice");
    let first = connect_with_ticket(&server, &ticket_for(&server, &token).await)
        .await
        .expect("first connection");
    let _second = connect_with_ticket(&server, &ticket_for(&server, &token).await)
        .await
        .expect("second connection");
    let third = connect_with_ticket(&server, &ticket_for(&server, &token).await)
        .await
        .expect_err("third connection");
    assert_eq!(third.status, 429);
    assert_eq!(third.code, "too_many_connections");

    let bob = ticket_for(&server, &Signer::token("bob")).await;
    connect_with_ticket(&server, &bob)
        .await
        .expect("another subject");

    drop(first);
    server.wait_event("connection_closed").await;
    connect_with_ticket(&server, &ticket_for(&server, &token).await)
        .await
        .expect("a freed slot");
}
