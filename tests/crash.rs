//! Crash safety of the ticket store under kill -9.
//!
//! Clients issue and redeem tickets against the real binary while it is
//! killed with SIGKILL at random moments; after each restart on the same data
//! directory the record of acknowledged responses is checked:
//!
//! 1. a ticket whose consumption was acknowledged (`101`) is rejected as used;
//! 2. a ticket whose issuance was acknowledged (`200`) and that no client tried
//!    to use is still accepted (under the default `--sync always`).
//!
//! `cargo test` runs 20 kill cycles; `scripts/crash-soak CYCLES` runs more.
//! Set `WSTICKET_CRASH_CYCLES` to change the count.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 8;

/// An acknowledged issuance and when the client received the `200`.
struct Issued {
    ticket: String,
    acknowledged_at: Instant,
}

#[derive(Default)]
struct History {
    /// Acknowledged issuances that no client tried to redeem.
    unused: Vec<Issued>,
    /// Acknowledged consumptions.
    consumed: Vec<String>,
    /// Redemptions attempted without a response: either outcome is correct.
    uncertain: Vec<Issued>,
    issued_total: u64,
    consumed_total: u64,
    /// When the server was killed last.
    killed_at: Option<Instant>,
}

#[derive(Default, Debug)]
struct Violations {
    used_ticket_accepted: u64,
    issued_ticket_lost: u64,
    /// Issuances lost that were acknowledged inside the window the sync mode
    /// allows to lose (only under `--sync batched`).
    issued_ticket_lost_in_window: u64,
    wrong_answers: Vec<String>,
}

impl Violations {
    fn total(&self) -> u64 {
        self.used_ticket_accepted + self.issued_ticket_lost + self.wrong_answers.len() as u64
    }
}

fn cycles_from_env() -> usize {
    std::env::var("WSTICKET_CRASH_CYCLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20)
}

/// A small deterministic generator, so a failing run can be repeated with
/// the same `WSTICKET_CRASH_SEED`.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// Starts the clients and returns once the kill moment has come; the
/// returned tasks end by themselves once the server is gone.
async fn run_clients(
    server: &Server,
    history: Arc<Mutex<History>>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stop = Arc::new(AtomicBool::new(false));
    let server_url = server.url("/websocket/ticket");
    let public = server.public;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (history, stop, url) = (history.clone(), stop.clone(), server_url.clone());
        let token = Signer::token(&format!("crash-client-{client}"));
        let mut rng = Lcg(seed ^ ((client as u64 + 1) * 0x9e37_79b9));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(response) = http.post(&url).bearer_auth(&token).send().await else {
                    return;
                };
                if response.status() != 200 {
                    return;
                }
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    return;
                };
                let ticket = body["ticket"].as_str().expect("ticket").to_owned();
                let issued = Issued {
                    ticket: ticket.clone(),
                    acknowledged_at: Instant::now(),
                };
                history.lock().expect("lock").issued_total += 1;
                if rng.below(2) == 0 {
                    history.lock().expect("lock").unused.push(issued);
                    continue;
                }
                let url = format!("ws://{public}/ws?ticket={ticket}");
                match tokio_tungstenite::connect_async(url).await {
                    Ok(_) => {
                        let mut history = history.lock().expect("lock");
                        history.consumed.push(ticket);
                        history.consumed_total += 1;
                    }
                    Err(_) => {
                        history.lock().expect("lock").uncertain.push(issued);
                        return;
                    }
                }
            }
        }));
    }
    // Kill after a random part of the load has run.
    let mut rng = Lcg(seed);
    tokio::time::sleep(Duration::from_millis(30 + rng.below(250))).await;
    stop.store(true, Ordering::Relaxed);
    tasks
}

/// Records an acknowledged issuance that the restarted server rejects: a
/// violation, unless `loss_window` allows it to be lost.
fn record_lost(
    issued: &Issued,
    killed_at: Option<Instant>,
    loss_window: Option<Duration>,
    violations: &mut Violations,
    answer: String,
) {
    let inside_window = match (killed_at, loss_window) {
        (Some(killed_at), Some(window)) => issued.acknowledged_at + window >= killed_at,
        _ => false,
    };
    if inside_window {
        violations.issued_ticket_lost_in_window += 1;
    } else {
        violations.issued_ticket_lost += 1;
        violations.wrong_answers.push(answer);
    }
}

async fn check(
    server: &Server,
    history: &mut History,
    violations: &mut Violations,
    all: bool,
    loss_window: Option<Duration>,
) {
    let consumed: Vec<String> = if all {
        history.consumed.clone()
    } else {
        let recent = history.consumed.len().saturating_sub(200);
        history.consumed[recent..].to_vec()
    };
    for ticket in &consumed {
        match connect_with_ticket(server, ticket).await {
            Ok(_) => violations.used_ticket_accepted += 1,
            Err(rejection) if rejection.code == "ticket_already_used" => {}
            Err(rejection) => violations.wrong_answers.push(format!(
                "used ticket answered {} {}",
                rejection.status, rejection.code
            )),
        }
    }
    let killed_at = history.killed_at;
    for issued in std::mem::take(&mut history.unused) {
        match connect_with_ticket(server, &issued.ticket).await {
            Ok(_) => history.consumed.push(issued.ticket),
            Err(rejection) => record_lost(
                &issued,
                killed_at,
                loss_window,
                violations,
                format!(
                    "issued ticket answered {} {}",
                    rejection.status, rejection.code
                ),
            ),
        }
    }
    for issued in std::mem::take(&mut history.uncertain) {
        match connect_with_ticket(server, &issued.ticket).await {
            Ok(_) => history.consumed.push(issued.ticket),
            Err(rejection) if rejection.code == "ticket_already_used" => {
                history.consumed.push(issued.ticket)
            }
            Err(rejection) if rejection.code == "invalid_ticket" => record_lost(
                &issued,
                killed_at,
                loss_window,
                violations,
                format!(
                    "ticket with an unanswered redemption answered {} {}",
                    rejection.status, rejection.code
                ),
            ),
            Err(rejection) => violations.wrong_answers.push(format!(
                "ticket with an unanswered redemption answered {} {}",
                rejection.status, rejection.code
            )),
        }
    }
}

async fn crash_cycles(
    cycles: usize,
    sync: &str,
    loss_window: Option<Duration>,
) -> (History, Violations) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let options = || {
        ServerOptions::new(jwks.url(), dir.path()).args(&[
            "--ticket-ttl",
            "10m",
            "--rate-limit",
            "1000000",
            "--sync",
            sync,
        ])
    };
    let seed = std::env::var("WSTICKET_CRASH_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(now_secs);
    let history = Arc::new(Mutex::new(History::default()));
    let mut violations = Violations::default();
    let mut rng = Lcg(seed);

    for cycle in 0..cycles {
        let server = Server::start(options()).await;
        if cycle > 0 {
            let mut taken = std::mem::take(&mut *history.lock().expect("lock"));
            check(&server, &mut taken, &mut violations, false, loss_window).await;
            *history.lock().expect("lock") = taken;
        }
        let clients = run_clients(&server, history.clone(), rng.next()).await;
        history.lock().expect("lock").killed_at = Some(Instant::now());
        server.kill().await;
        for client in clients {
            client.await.expect("client task");
        }
    }
    let server = Server::start(options()).await;
    let mut taken = std::mem::take(&mut *history.lock().expect("lock"));
    check(&server, &mut taken, &mut violations, true, loss_window).await;
    *history.lock().expect("lock") = taken;
    drop(server);
    let history = Arc::try_unwrap(history)
        .ok()
        .expect("clients finished")
        .into_inner()
        .expect("lock");
    println!(
        "crash test (--sync {sync}, seed {seed}): cycles {cycles}, acknowledged issuances {}, acknowledged consumptions {}, violations {}, issuances lost inside the sync window {}",
        history.issued_total,
        history.consumed_total,
        violations.total(),
        violations.issued_ticket_lost_in_window
    );
    (history, violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_answer() {
    let cycles = cycles_from_env();
    let (history, violations) = crash_cycles(cycles, "always", None).await;
    assert!(
        history.issued_total > cycles as u64,
        "the load issued tickets"
    );
    assert!(history.consumed_total > 0, "the load consumed tickets");
    assert_eq!(violations.used_ticket_accepted, 0, "{violations:?}");
    assert_eq!(violations.issued_ticket_lost, 0, "{violations:?}");
    assert!(violations.wrong_answers.is_empty(), "{violations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_revives_used_ticket_when_batched() {
    // The server acknowledges at most --sync-interval (10 ms) before its flush
    // starts. The flush itself and the client's receipt add to that, so the
    // window checked here is wider than the interval.
    let window = Duration::from_millis(10 + 150);
    let cycles = cycles_from_env().min(10);
    let (_history, violations) = crash_cycles(cycles, "batched", Some(window)).await;
    assert_eq!(violations.used_ticket_accepted, 0, "{violations:?}");
    assert_eq!(violations.issued_ticket_lost, 0, "{violations:?}");
    assert!(violations.wrong_answers.is_empty(), "{violations:?}");
}
