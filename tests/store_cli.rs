//! `wsticket store inspect` and `wsticket store compact` on a real data
//! directory written by the server.

mod common;

use std::process::Command;

use common::*;

fn store_command(action: &str, dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wsticket"))
        .args(["store", action, "--data-dir"])
        .arg(dir)
        .output()
        .expect("run wsticket store")
}

/// Reads `name   N` from the inventory output.
fn count(output: &str, name: &str) -> u64 {
    output
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} count in:\n{output}"))
}

#[tokio::test]
async fn inspect_counts_records_without_tickets() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;
    let token = Signer::token("alice");
    let mut tickets = Vec::new();
    for _ in 0..5 {
        tickets.push(ticket_for(&server, &token).await);
    }
    for ticket in &tickets[..2] {
        drop(connect_with_ticket(&server, ticket).await.expect("101"));
    }

    let while_running = store_command("inspect", dir.path());
    assert!(
        !while_running.status.success(),
        "inspect must not open a store in use"
    );
    assert!(String::from_utf8_lossy(&while_running.stderr).contains("in use"));

    assert!(server.terminate().await.success());
    let output = store_command("inspect", dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(count(&text, "live"), 3);
    assert_eq!(count(&text, "consumed"), 2);
    assert_eq!(count(&text, "expired"), 0);
    assert!(count(&text, "disk bytes") > 0);
    for ticket in &tickets {
        assert!(!text.contains(ticket.as_str()), "inspect printed a ticket");
    }
}

#[tokio::test]
async fn compact_keeps_records_and_reopens() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("store");
    let server = Server::start(ServerOptions::new(jwks.url(), &data_dir)).await;
    let token = Signer::token("alice");
    let used = ticket_for(&server, &token).await;
    let unused = ticket_for(&server, &token).await;
    drop(connect_with_ticket(&server, &used).await.expect("101"));
    assert!(server.terminate().await.success());

    let output = store_command("compact", &data_dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("after compaction"), "{text}");

    let server = Server::start(ServerOptions::new(jwks.url(), &data_dir)).await;
    match connect_with_ticket(&server, &used).await {
        Err(rejection) => assert_eq!(rejection.code, "ticket_already_used"),
        Ok(_) => panic!("compaction revived a used ticket"),
    }
    assert!(connect_with_ticket(&server, &unused).await.is_ok());
}

#[tokio::test]
async fn inspect_of_missing_directory_names_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nothing-here");
    let output = store_command("inspect", &missing);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(!missing.exists(), "inspect must not create the directory");
}
