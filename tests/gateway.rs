//! The gateway against the real binary and a real upstream WebSocket server:
//! frames and close codes both ways, identity headers, subprotocols, an
//! unreachable upstream, ordered events, the connection limits, shutdown,
//! and memory under a client that stops reading.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::upstream::{Behavior, Upstream, FIVE_EVENTS};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn start_gateway(
    upstream_url: &str,
    args: &[&str],
) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(
        ServerOptions::new(jwks.url(), dir.path())
            .args(&["--upstream", upstream_url])
            .args(args),
    )
    .await;
    (jwks, server, dir)
}

/// Opens `/ws` with a query and extra headers, returning the socket and the
/// `101` answer's headers.
async fn open(
    server: &Server,
    query: &str,
    headers: &[(&str, &str)],
) -> (Socket, tokio_tungstenite::tungstenite::http::HeaderMap) {
    let request = ws_request(server, query, headers);
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("101 from the gateway");
    (socket, response.headers().clone())
}

/// Reads the next frame other than a pong, failing after 10 s.
async fn next_frame(socket: &mut Socket) -> Message {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if !matches!(frame, Message::Pong(_)) {
            return frame;
        }
    }
}

/// Reads until a close frame and returns its code and reason.
async fn close_of(socket: &mut Socket) -> (u16, String) {
    loop {
        match next_frame(socket).await {
            Message::Close(Some(frame)) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Message::Close(None) => panic!("close frame without a code"),
            _ => continue,
        }
    }
}

fn close_codes(messages: &[Message]) -> Vec<(u16, String)> {
    messages
        .iter()
        .filter_map(|message| match message {
            Message::Close(Some(frame)) => Some((u16::from(frame.code), frame.reason.to_string())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn text_and_binary_relay_both_ways() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/app"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    socket.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_frame(&mut socket).await, Message::text("hello"));
    let bytes = vec![0u8, 1, 2, 255];
    socket
        .send(Message::binary(bytes.clone()))
        .await
        .expect("send");
    assert_eq!(
        next_frame(&mut socket).await,
        Message::binary(bytes.clone())
    );

    let recorded = upstream.wait_for(0, |r| r.messages.len() >= 2).await;
    assert_eq!(recorded.messages[0], Message::text("hello"));
    assert_eq!(recorded.messages[1], Message::binary(bytes));
    assert_eq!(server.metric("wsticket_open_connections").await, 1.0);
}

#[tokio::test]
async fn ping_and_pong_relay_both_ways() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    // Client ping: reaches the upstream, and the client gets its pong.
    socket
        .send(Message::Ping(b"from-client".to_vec().into()))
        .await
        .expect("send ping");
    let pong = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("pong in time");
    assert!(
        matches!(&pong, Some(Ok(Message::Pong(payload))) if payload.as_ref() == b"from-client"),
        "{pong:?}"
    );
    upstream
        .wait_for(0, |r| {
            r.messages
                .contains(&Message::Ping(b"from-client".to_vec().into()))
        })
        .await;

    // Client pong without a ping: reaches the upstream unchanged.
    socket
        .send(Message::Pong(b"unsolicited".to_vec().into()))
        .await
        .expect("send pong");
    upstream
        .wait_for(0, |r| {
            r.messages
                .contains(&Message::Pong(b"unsolicited".to_vec().into()))
        })
        .await;

    // Upstream ping: reaches the client, and the client's pong goes back.
    socket
        .send(Message::text("ping:from-upstream"))
        .await
        .expect("send command");
    assert_eq!(
        next_frame(&mut socket).await,
        Message::Ping(b"from-upstream".to_vec().into())
    );
    // tungstenite sends the pong with the next write.
    socket.send(Message::text("after")).await.expect("send");
    upstream
        .wait_for(0, |r| {
            r.messages
                .contains(&Message::Pong(b"from-upstream".to_vec().into()))
        })
        .await;
}

#[tokio::test]
async fn client_close_code_reaches_upstream() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    socket
        .close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "client done".into(),
        }))
        .await
        .expect("send close");
    let recorded = upstream
        .wait_for(0, |r| !close_codes(&r.messages).is_empty())
        .await;
    assert_eq!(
        close_codes(&recorded.messages),
        vec![(4000, "client done".to_string())]
    );
    let closed = server.wait_event("connection_closed").await;
    assert_eq!(closed["reason"], "client_closed");
    assert_eq!(closed["close_code"], 4000);
}

#[tokio::test]
async fn upstream_close_code_reaches_client() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    socket
        .send(Message::text("close:4321:upstream done"))
        .await
        .expect("send command");
    assert_eq!(
        close_of(&mut socket).await,
        (4321, "upstream done".to_string())
    );
    let closed = server.wait_event("connection_closed").await;
    assert_eq!(closed["reason"], "upstream_closed");
}

#[tokio::test]
async fn identity_headers_reach_upstream() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(
        &upstream.url("/app"),
        &["--forward-claim", "role", "--forward-claim", "org"],
    )
    .await;
    let mut claims = Signer::claims("alice");
    claims["role"] = json!("editor");
    claims["org"] = json!({"id": 7});
    claims["email"] = json!("alice@example.test");
    let token = Signer::token_with(&claims);
    let ticket = ticket_for(&server, &token).await;
    let spoofed_claims =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"role":"admin"}"#);
    let (_socket, _) = open(
        &server,
        &format!("?room=42&ticket={ticket}&lang=fr"),
        &[
            ("x-auth-subject", "mallory"),
            ("x-auth-session", "stolen"),
            ("x-auth-claims", &spoofed_claims),
            ("x-auth-role", "admin"),
            ("x-request-id", "req-gateway-1"),
            ("cookie", "theme=dark"),
        ],
    )
    .await;

    let recorded = upstream.wait_for(0, |r| !r.headers.is_empty()).await;
    let header = |name: &str| -> Vec<String> {
        recorded
            .headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().expect("ASCII header").to_owned())
            .collect()
    };
    assert_eq!(header("x-auth-subject"), vec!["alice"]);
    assert_eq!(header("x-auth-session"), vec!["session-1"]);
    assert_eq!(header("x-auth-role"), Vec::<String>::new());
    assert_eq!(header("x-request-id"), vec!["req-gateway-1"]);
    assert_eq!(header("cookie"), vec!["theme=dark"]);
    let claims_header = header("x-auth-claims");
    assert_eq!(claims_header.len(), 1);
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&claims_header[0])
        .expect("base64url");
    let forwarded: Value = serde_json::from_slice(&decoded).expect("JSON claims");
    assert_eq!(forwarded, json!({"role": "editor", "org": {"id": 7}}));

    assert_eq!(recorded.path, "/app");
    assert_eq!(recorded.query.as_deref(), Some("room=42&lang=fr"));
    assert!(
        server.logs().iter().all(|line| !line.contains(&ticket)),
        "a log line contains the ticket"
    );
}

#[tokio::test]
async fn subprotocol_is_negotiated_end_to_end() {
    let upstream = Upstream::start(Behavior::Echo, Some("chat.v2")).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, headers) = open(
        &server,
        &format!("?ticket={ticket}"),
        &[("sec-websocket-protocol", "chat.v1, chat.v2")],
    )
    .await;
    assert_eq!(
        headers
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat.v2")
    );
    let recorded = upstream.wait_for(0, |r| !r.headers.is_empty()).await;
    let offered: Vec<&str> = recorded
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    assert_eq!(offered, vec!["chat.v1, chat.v2"]);
    socket.send(Message::text("works")).await.expect("send");
    assert_eq!(next_frame(&mut socket).await, Message::text("works"));
}

#[tokio::test]
async fn unreachable_upstream_gives_502_and_uses_ticket() {
    let closed = closed_port();
    let (_jwks, server, _dir) = start_gateway(&format!("ws://{closed}/app"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;

    let request = server
        .ws_url(&format!("?ticket={ticket}"))
        .into_client_request()
        .expect("valid ws URL");
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 502);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON body");
            assert_eq!(body["error"], "upstream_unavailable");
            let message = body["message"].as_str().expect("message");
            assert!(message.contains("new ticket"), "{message}");
            assert_eq!(
                response
                    .headers()
                    .get("connection")
                    .and_then(|v| v.to_str().ok()),
                Some("close")
            );
        }
        other => panic!("expected 502, got {other:?}"),
    }

    let again = connect_with_ticket(&server, &ticket).await;
    let rejection = again.expect_err("the ticket is used");
    assert_eq!(rejection.status, 403);
    assert_eq!(rejection.code, "ticket_already_used");

    let failures: Vec<Value> = server
        .settled_events("ticket_rejected")
        .await
        .into_iter()
        .filter(|event| event["error_code"] == "upstream_unavailable")
        .collect();
    assert_eq!(failures.len(), 1, "one log line per rejection");
    assert_eq!(failures[0]["level"], "ERROR");
    assert!(server.settled_events("ticket_redeemed").await.is_empty());
    assert_eq!(
        server
            .metric(r#"wsticket_redemptions_total{result="upstream_unavailable",via="upgrade"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn five_events_arrive_in_order() {
    let upstream = Upstream::start(Behavior::FiveEvents, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/agent"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    let mut received = Vec::new();
    for _ in 0..FIVE_EVENTS.len() {
        received.push(next_frame(&mut socket).await);
    }
    let expected: Vec<Message> = FIVE_EVENTS.iter().map(|e| Message::text(*e)).collect();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) =
        start_gateway(&upstream.url("/"), &["--max-message-size", "1024"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    socket
        .send(Message::text("x".repeat(2048)))
        .await
        .expect("send");
    assert_eq!(close_of(&mut socket).await.0, 1009);
    let recorded = upstream
        .wait_for(0, |r| !close_codes(&r.messages).is_empty())
        .await;
    assert_eq!(close_codes(&recorded.messages)[0].0, 1001);
}

#[tokio::test]
async fn token_expiry_closes_with_4401() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) =
        start_gateway(&upstream.url("/"), &["--close-on-token-expiry"]).await;
    let mut claims = Signer::claims("alice");
    claims["exp"] = json!(now_secs() + 3);
    let token = Signer::token_with(&claims);
    let ticket = ticket_for(&server, &token).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    socket.send(Message::text("before")).await.expect("send");
    assert_eq!(next_frame(&mut socket).await, Message::text("before"));
    assert_eq!(
        close_of(&mut socket).await,
        (4401, "token_expired".to_string())
    );
    let recorded = upstream
        .wait_for(0, |r| !close_codes(&r.messages).is_empty())
        .await;
    assert_eq!(
        close_codes(&recorded.messages),
        vec![(1001, "token_expired".to_string())]
    );
}

#[tokio::test]
async fn idle_connection_is_closed() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &["--idle-timeout", "1s"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;

    // Frames every 300 ms keep the connection open past the 1 s timeout.
    let active_until = Instant::now() + Duration::from_millis(2000);
    while Instant::now() < active_until {
        socket.send(Message::text("tick")).await.expect("send");
        assert_eq!(next_frame(&mut socket).await, Message::text("tick"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        close_of(&mut socket).await,
        (1000, "idle_timeout".to_string())
    );
    let closed = server.wait_event("connection_closed").await;
    assert_eq!(closed["reason"], "idle_timeout");
}

#[tokio::test]
async fn shutdown_closes_both_sides_with_1001() {
    let upstream = Upstream::start(Behavior::Echo, None).await;
    let (_jwks, server, _dir) =
        start_gateway(&upstream.url("/"), &["--shutdown-timeout", "5s"]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;
    socket.send(Message::text("up")).await.expect("send");
    assert_eq!(next_frame(&mut socket).await, Message::text("up"));

    let reader = tokio::spawn(async move { close_of(&mut socket).await });
    let status = server.terminate().await;
    assert!(status.success(), "exit status {status}");
    assert_eq!(reader.await.expect("reader").0, 1001);
    let recorded = upstream
        .wait_for(0, |r| !close_codes(&r.messages).is_empty())
        .await;
    assert_eq!(close_codes(&recorded.messages)[0].0, 1001);
}

#[tokio::test]
async fn slow_reader_keeps_memory_bounded() {
    const FRAME: usize = 64 * 1024;
    const FRAMES: usize = 2048;
    let upstream = Upstream::start(
        Behavior::Flood {
            frames: FRAMES,
            size: FRAME,
        },
        None,
    )
    .await;
    let (_jwks, server, _dir) = start_gateway(&upstream.url("/"), &[]).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let before_kib = server.rss_kib();

    // The client connects and reads nothing until the upstream is held back.
    let (mut socket, _) = open(&server, &format!("?ticket={ticket}"), &[]).await;
    let recorded = upstream
        .wait_for(0, |r| r.flood_blocked || r.flood_sent == FRAMES)
        .await;
    let during_kib = server.rss_kib();
    assert!(
        recorded.flood_blocked,
        "the upstream sent all {FRAMES} frames without being held back"
    );
    let sent_bytes = recorded.flood_sent * FRAME;
    assert!(
        sent_bytes < 64 * 1024 * 1024,
        "{sent_bytes} bytes went out before the upstream was held back"
    );
    let growth_kib = during_kib.saturating_sub(before_kib);
    eprintln!("flood: {sent_bytes} bytes sent before the upstream was held back; server RSS {before_kib} KiB -> {during_kib} KiB");
    assert!(
        growth_kib < 24 * 1024,
        "server memory grew by {growth_kib} KiB while the client did not read"
    );

    // Nothing was lost: the client reads every frame the upstream sent.
    let mut received = 0;
    while received < recorded.flood_sent {
        match next_frame(&mut socket).await {
            Message::Binary(data) => {
                assert_eq!(data.len(), FRAME);
                received += 1;
            }
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}
