//! Process lifecycle of the real binary: restarts on the same data
//! directory, the data directory lock, graceful shutdown, health endpoints,
//! and what the logs may contain.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn tickets_survive_graceful_restart() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let used = ticket_for(&server, &Signer::token("alice")).await;
    let unused = ticket_for(&server, &Signer::token("alice")).await;
    drop(
        connect_with_ticket(&server, &used)
            .await
            .expect("first use"),
    );
    let status = server.terminate().await;
    assert!(status.success(), "graceful stop exits 0, got {status}");

    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    match connect_with_ticket(&server, &used).await {
        Err(rejection) => assert_eq!(rejection.code, "ticket_already_used"),
        Ok(_) => panic!("a used ticket was accepted after restart"),
    }
    assert!(
        connect_with_ticket(&server, &unused).await.is_ok(),
        "an unused ticket is still accepted after restart"
    );
    assert_eq!(server.metric("wsticket_live_tickets").await, 0.0);
}

#[tokio::test]
async fn second_process_on_data_dir_exits() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;

    let output = command(&ServerOptions::new(jwks.url(), dir.path()))
        .output()
        .expect("run second process");
    assert!(!output.status.success(), "second process must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another wsticket process"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("--data-dir"), "names the flag: {stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "names the path: {stderr}"
    );
}

#[tokio::test]
async fn invalid_flag_value_is_named_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wsticket"))
        .args([
            "serve",
            "--jwks-file",
            "x.json",
            "--issuer",
            "i",
            "--audience",
            "a",
        ])
        .args(["--algorithms", "RS256,HS256"])
        .output()
        .expect("run wsticket");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--algorithms") && stderr.contains("HS256"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn occupied_listen_address_is_named_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = JwksServer::start(default_jwks()).await;
    let output = command(&ServerOptions::new(jwks.url(), dir.path()).args(&["--listen", &addr]))
        .output()
        .expect("run wsticket");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("--listen"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let ticket = ticket_for(&server, &Signer::token("alice")).await;
    let mut socket = connect_with_ticket(&server, &ticket).await.expect("101");
    let _greeting = next_text(&mut socket).await;

    let stopping = tokio::spawn(server.terminate());
    let close = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("close frame within 10 s");
        match frame {
            Some(Ok(Message::Close(close))) => break close,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.expect("close frame has a code").code, CloseCode::Away);
    drop(socket);
    let status = stopping.await.expect("join");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn health_endpoints_report_checks() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let health = answer_of(
        reqwest::get(server.admin_url("/healthz"))
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = answer_of(
        reqwest::get(server.admin_url("/readyz"))
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(ready.status, 200);
    for check in ["keys_loaded", "store_recovered", "listener_bound"] {
        assert_eq!(ready.body["checks"][check], true, "{check}");
    }
    let metrics = reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "process metrics exported"
    );
    assert!(
        metrics.contains("wsticket_jwks_keys_loaded 2"),
        "two keys loaded"
    );
}

#[tokio::test]
async fn logs_never_contain_tickets_or_tokens() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server =
        Server::start(ServerOptions::new(jwks.url(), dir.path()).args(&["--ticket-ttl", "1s"]))
            .await;
    let token = Signer::token("alice");
    let used = ticket_for(&server, &token).await;
    let expiring = ticket_for(&server, &token).await;
    drop(connect_with_ticket(&server, &used).await.expect("101"));
    let _ = connect_with_ticket(&server, &used).await;
    let _ = connect(&server, &format!("?access_token={token}"), &[]).await;
    let bad_token = format!("{token}x");
    let _ = post_ticket(
        &server,
        &[("authorization", &format!("Bearer {bad_token}"))],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = connect_with_ticket(&server, &expiring).await;
    let logs = server.logs().join("\n");

    let signature = token.rsplit('.').next().expect("signature part");
    for (what, secret) in [
        ("used ticket", used.as_str()),
        ("expired ticket", expiring.as_str()),
        ("JWT", token.as_str()),
        ("JWT signature", signature),
    ] {
        assert!(!logs.contains(secret), "the logs contain a {what}");
    }

    let issued = server.events("ticket_issued");
    assert_eq!(issued.len(), 2);
    assert_eq!(issued[0]["ticket_id"], ticket_log_id(&used));
    assert_eq!(issued[0]["level"], "INFO");
    for field in ["subject", "request_id", "result", "latency_ms"] {
        assert!(issued[0].get(field).is_some(), "ticket_issued has {field}");
    }
    let redeemed = server.events("ticket_redeemed");
    assert_eq!(redeemed.len(), 1);
    assert_eq!(redeemed[0]["ticket_id"], ticket_log_id(&used));
    let expired = server.events("ticket_expired_unused");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["ticket_id"], ticket_log_id(&expiring));
    let rejected = server.events("ticket_rejected");
    assert!(
        rejected
            .iter()
            .any(|e| e["error_code"] == "ticket_expired" && e["level"] == "WARN"),
        "expired ticket rejection logged at WARN"
    );
    let token_rejections = server.events("token_rejected");
    assert_eq!(token_rejections.len(), 1);
    assert_eq!(token_rejections[0]["error_code"], "invalid_token");
}

#[tokio::test]
async fn silent_connection_is_closed_after_header_timeout() {
    use tokio::io::AsyncReadExt;
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server =
        Server::start(ServerOptions::new(jwks.url(), dir.path()).args(&["--header-timeout", "1s"]))
            .await;
    for addr in [server.public, server.admin] {
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buffer))
            .await
            .expect("the server closes a silent connection within 5 s");
        assert_eq!(read.expect("read"), 0, "closed without a response");
    }
}

#[tokio::test]
async fn oversized_durations_are_rejected_at_start() {
    for (flag, value) in [("--ticket-ttl", "1000000000y"), ("--expired-grace", "30d")] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_wsticket"))
            .args([
                "serve",
                "--jwks-file",
                "x.json",
                "--issuer",
                "i",
                "--audience",
                "a",
            ])
            .args([flag, value])
            .output()
            .expect("run wsticket");
        assert_eq!(output.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}
