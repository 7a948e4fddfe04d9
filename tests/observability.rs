//! Metrics and the audit log of the real binary, read after driving each
//! outcome. The dashboard's and the alerts' metric names are checked against
//! a live scrape too.

mod common;

use std::collections::BTreeSet;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

async fn start_with(args: &[&str]) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path()).args(args)).await;
    (jwks, server, dir)
}

async fn scrape(server: &Server) -> String {
    reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text")
}

/// Reads several series from one scrape.
fn values(text: &str, series: &[&str]) -> Vec<f64> {
    series
        .iter()
        .map(|name| metric_value(text, name).unwrap_or_else(|| panic!("no series {name}")))
        .collect()
}

fn rejected(error: &str) -> String {
    format!("wsticket_ticket_requests_rejected_total{{error=\"{error}\"}}")
}

fn redeemed(result: &str) -> String {
    format!("wsticket_redemptions_total{{result=\"{result}\",via=\"upgrade\"}}")
}

fn verified(result: &str, cached: &str) -> String {
    format!("wsticket_jwt_verifications_total{{cached=\"{cached}\",result=\"{result}\"}}")
}

#[tokio::test]
async fn each_outcome_moves_its_counters() {
    let (_jwks, server, _dir) = start_with(&["--ticket-ttl", "1s"]).await;
    let watched = [
        "wsticket_tickets_issued_total".to_string(),
        rejected("missing_token"),
        rejected("invalid_token"),
        rejected("token_expired"),
        redeemed("ok"),
        redeemed("ticket_already_used"),
        redeemed("invalid_ticket"),
        redeemed("missing_ticket"),
        redeemed("ticket_expired"),
        "wsticket_replay_attempts_total".to_string(),
        "wsticket_tickets_expired_unused_total".to_string(),
        verified("ok", "false"),
        verified("ok", "true"),
        "wsticket_ticket_issuance_duration_seconds_count".to_string(),
        "wsticket_redemption_duration_seconds_count{via=\"upgrade\"}".to_string(),
    ];
    let names: Vec<&str> = watched.iter().map(String::as_str).collect();
    let before = values(&scrape(&server).await, &names);

    let token = Signer::token("alice");
    let used = ticket_for(&server, &token).await;
    let expiring = ticket_for(&server, &token).await;
    let _ = post_ticket(&server, &[]).await;
    let _ = post_ticket(&server, &[("authorization", "Bearer not.a.jwt")]).await;
    let mut late = Signer::claims("late");
    late["exp"] = json!(now_secs() - 600);
    let late = Signer::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), &late);
    let _ = post_ticket(&server, &[("authorization", &format!("Bearer {late}"))]).await;
    let _socket = connect_with_ticket(&server, &used).await.expect("101");
    let _ = connect_with_ticket(&server, &used).await;
    let _ = connect_with_ticket(&server, &"Z".repeat(32)).await;
    let _ = connect(&server, "", &[]).await;
    tokio::time::sleep(std::time::Duration::from_millis(1400)).await;
    let _ = connect_with_ticket(&server, &expiring).await;

    let after = values(&scrape(&server).await, &names);
    let expected = [
        2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0,
    ];
    for ((name, (b, a)), want) in names.iter().zip(before.iter().zip(&after)).zip(expected) {
        assert_eq!(a - b, want, "change of {name}");
    }
    let text = scrape(&server).await;
    assert_eq!(metric_value(&text, "wsticket_live_tickets"), Some(0.0));
    assert_eq!(metric_value(&text, "wsticket_open_connections"), Some(1.0));
}

#[tokio::test]
async fn jwks_failure_is_counted() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let fetch_errors = "wsticket_jwks_fetches_total{result=\"error\"}";
    let before = server.metric(fetch_errors).await;
    assert_eq!(
        server
            .metric("wsticket_jwks_fetches_total{result=\"ok\"}")
            .await,
        1.0
    );

    // The provider starts serving something that is not a JWKS.
    jwks.set(json!({"error": "maintenance"}));
    let token = Signer::sign(
        Algorithm::RS256,
        "rsa-a",
        Some("unknown-kid"),
        &Signer::claims("a"),
    );
    let answer = post_ticket(&server, &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(answer.error_code(), "invalid_token");
    assert_eq!(server.metric(fetch_errors).await - before, 1.0);
    assert_eq!(
        server.metric("wsticket_jwks_keys_loaded").await,
        2.0,
        "old keys kept"
    );
}

/// Counts rejections in the log: one per line, plus each flood summary's count.
fn rejections_logged(server: &Server) -> u64 {
    server
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["result"] == "rejected")
        .map(|event| event["suppressed"].as_u64().unwrap_or(1))
        .sum()
}

#[tokio::test]
async fn every_rejection_is_logged_once() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let token = Signer::token("alice");
    let ticket = ticket_for(&server, &token).await;
    drop(connect_with_ticket(&server, &ticket).await.expect("101"));

    let _ = post_ticket(&server, &[]).await;
    let _ = post_ticket(&server, &[("authorization", "Bearer x.y.z")]).await;
    let _ = connect_with_ticket(&server, &ticket).await;
    let _ = connect(&server, "", &[]).await;
    let _ = connect(&server, "?ticket=bad", &[]).await;
    // The log is read by a thread; give it a moment to catch up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rejections_logged(&server) < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(rejections_logged(&server), 5);

    // A flood from one client: logged in part, the rest counted in a summary.
    for _ in 0..40 {
        let _ = connect_with_ticket(&server, &"Q".repeat(32)).await;
    }
    let server_logs = {
        let status = server.terminate_keeping_logs().await;
        assert!(status.0.success());
        status.1
    };
    let lines: Vec<Value> = server_logs
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["result"] == "rejected")
        .collect();
    let total: u64 = lines
        .iter()
        .map(|event| event["suppressed"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(total, 45, "every rejection counted exactly once");
    let flood_lines = lines
        .iter()
        .filter(|event| {
            event["error_code"] == "invalid_ticket" && event.get("suppressed").is_none()
        })
        .count();
    assert!(
        flood_lines < 10,
        "the flood was not logged line by line ({flood_lines} lines)"
    );
    let summary = lines
        .iter()
        .find(|event| event["flood_summary"] == true)
        .expect("a flood summary");
    assert_eq!(summary["level"], "WARN");
    assert!(summary["suppressed"].as_u64().expect("count") >= 30);
    for line in &lines {
        assert_eq!(line["level"], "WARN", "client rejections are WARN: {line}");
    }
}

#[tokio::test]
async fn audit_lines_carry_contract_fields() {
    let (_jwks, server, _dir) = start_with(&[]).await;
    let token = Signer::token("alice");
    let answer = post_ticket(
        &server,
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-request-id", "req-123"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    let event = server.wait_event("ticket_issued").await;
    let event = &event;
    for field in [
        "timestamp",
        "level",
        "event",
        "ticket_id",
        "user_id",
        "connection_id",
        "request_id",
        "result",
        "error_code",
        "latency_ms",
    ] {
        assert!(event.get(field).is_some(), "field {field} in {event}");
    }
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["request_id"], "req-123");
    assert_eq!(event["ticket_id"].as_str().map(str::len), Some(12));
}

/// Collects every `wsticket_*` name in a text, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut index = 0;
    while let Some(found) = text[index..].find("wsticket_") {
        let start = index + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_string());
        index = end;
    }
    names
}

/// The server runs in cluster mode, alone, because some alerts use cluster
/// series, which only a node in cluster mode exports.
#[tokio::test]
async fn dashboard_and_alerts_use_exported_metrics() {
    let secret_dir = tempfile::tempdir().expect("temp dir");
    let secret_file = secret_dir.path().join("cluster-secret");
    std::fs::write(&secret_file, "a test cluster secret of 32 bytes or more\n")
        .expect("write secret");
    let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("free UDP port")
        .to_string();
    let (_jwks, server, _dir) = start_with(&[
        "--cluster-listen",
        &gossip,
        "--cluster-node-id",
        "0",
        "--cluster-secret-file",
        secret_file.to_str().expect("UTF-8 path"),
    ])
    .await;
    let exported = metric_names(&scrape(&server).await);
    let dashboard: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/wsticket-dashboard.json"
        ))
        .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut expressions = Vec::new();
    collect_exprs(&dashboard, &mut expressions);
    assert!(expressions.len() >= 10, "the dashboard has queries");
    let used = metric_names(&expressions.join("\n"));
    let alerts = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/wsticket-alerts.yml"
    ))
    .expect("alert rules");
    let used: BTreeSet<String> = used.union(&metric_names(&alerts)).cloned().collect();
    assert!(!used.is_empty());
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                if key == "expr" {
                    if let Some(expr) = item.as_str() {
                        out.push(expr.to_string());
                    }
                } else {
                    collect_exprs(item, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}
