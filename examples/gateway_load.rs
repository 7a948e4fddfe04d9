//! Load test of the gateway on loopback: keeps many authenticated connections
//! open through wsticket to a local upstream, and reports wsticket's memory per
//! connection and the handshake latency while connecting at a fixed rate.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example gateway_load -- --connections 9000 --rate 1000
//! ```
//!
//! Three processes share the work, because each holds its own share of file
//! descriptors: wsticket (two sockets per connection), the upstream (this
//! program started again with `upstream`) and the clients (this process).
//! Every socket is on loopback; client sockets are bound to source
//! addresses spread over 127.0.0.0/8. The run is bounded by `--connections`
//! and by `--deadline`, and stops wsticket and the upstream at the end.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

const ISSUER: &str = "https://idp.load.invalid/";
const AUDIENCE: &str = "wsticket-load";
/// Distinct subjects the tickets are issued to.
const SUBJECTS: usize = 100;
/// Ticket requests in flight at once during the issuing phase.
const ISSUE_CONCURRENCY: usize = 32;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 9000)]
    connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Path of the wsticket binary.
    #[arg(long, default_value = "target/release/wsticket")]
    wsticket: PathBuf,
    /// Time after which the run stops, whatever it reached.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the upstream: accept WebSockets on 127.0.0.1 and keep them open.
    Upstream,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.mode {
        Some(Mode::Upstream) => runtime.block_on(run_upstream()),
        None => runtime.block_on(run_load(cli)),
    }
}

/// Accepts WebSockets and reads each until it closes. Prints the port first.
async fn run_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    println!("{}", listener.local_addr().expect("address").port());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(_)) = socket.next().await {}
        });
    }
}

struct Processes {
    upstream: Child,
    wsticket: Child,
}

impl Drop for Processes {
    fn drop(&mut self) {
        let _ = self.upstream.kill();
        let _ = self.wsticket.kill();
        let _ = self.upstream.wait();
        let _ = self.wsticket.wait();
    }
}

async fn run_load(cli: Cli) {
    let started = Instant::now();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks");
    let data_dir = tempfile::tempdir().expect("temp dir");

    let mut upstream = Command::new(std::env::current_exe().expect("own path"))
        .arg("upstream")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the upstream");
    let mut port_line = String::new();
    BufReader::new(upstream.stdout.take().expect("stdout"))
        .read_line(&mut port_line)
        .expect("upstream port");
    let upstream_port: u16 = port_line.trim().parse().expect("port number");

    let mut wsticket = Command::new(&cli.wsticket)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--jwks-file")
        .arg(fixtures.join("rotation-before.jwks.json"))
        .args(["--issuer", ISSUER, "--audience", AUDIENCE])
        .args(["--rate-limit", "1000000", "--ticket-ttl", "10m"])
        .args(["--max-failed-upgrades-per-minute", "0"])
        .args(["--upstream", &format!("ws://127.0.0.1:{upstream_port}/")])
        .arg("--data-dir")
        .arg(data_dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("start {}: {err}", cli.wsticket.display()));
    let (public, admin) = listening_addresses(wsticket.stdout.take().expect("stdout"));
    let wsticket_pid = wsticket.id();
    let _processes = Processes { upstream, wsticket };
    wait_ready(admin).await;

    let tickets = issue_tickets(public, cli.connections).await;
    println!(
        "issued {} tickets in {:.1} s",
        tickets.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(wsticket_pid);

    let deadline = started + cli.deadline;
    let (latencies, sockets, failures, connect_seconds) =
        connect_all(public, tickets, cli.rate, deadline).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(wsticket_pid);
    let open = open_connections(admin).await;

    report(Report {
        connections: cli.connections,
        rate: cli.rate,
        latencies,
        failures,
        connect_seconds,
        rss_before,
        rss_after,
        open,
        connected: sockets.len(),
    });
    drop(sockets);
}

/// Reads wsticket's JSON log until both listeners are announced, then keeps
/// draining it on a thread so the pipe never fills.
fn listening_addresses(stdout: std::process::ChildStdout) -> (SocketAddr, SocketAddr) {
    let mut lines = BufReader::new(stdout).lines();
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("wsticket exited before listening")
            .expect("log line");
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["event"] != "listening" {
            continue;
        }
        let addr: Option<SocketAddr> = event["addr"].as_str().and_then(|a| a.parse().ok());
        match event["listener"].as_str() {
            Some("public") => public = addr,
            Some("admin") => admin = addr,
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (
        public.expect("public address"),
        admin.expect("admin address"),
    )
}

async fn wait_ready(admin: SocketAddr) {
    let url = format!("http://{admin}/readyz");
    for _ in 0..200 {
        if let Ok(response) = reqwest::get(&url).await {
            if response.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("wsticket was not ready within 10 s");
}

fn signed_token(subject: &str) -> String {
    let key_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks/keys/rsa-a.pem");
    let pem = std::fs::read(key_path).expect("fixture key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": subject,
        "iat": now, "exp": now + 3600,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    jsonwebtoken::encode(&header, &claims, &key).expect("signing works")
}

/// Requests `count` tickets, spread over [`SUBJECTS`] subjects.
async fn issue_tickets(public: SocketAddr, count: usize) -> Vec<String> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..SUBJECTS)
            .map(|i| signed_token(&format!("load-user-{i}")))
            .collect(),
    );
    let client = reqwest::Client::new();
    let url = format!("http://{public}/websocket/ticket");
    let limit = Arc::new(Semaphore::new(ISSUE_CONCURRENCY));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let response = client
                .post(&url)
                .bearer_auth(&tokens[i % SUBJECTS])
                .send()
                .await
                .expect("ticket request");
            let body: Value = response.json().await.expect("ticket JSON");
            body["ticket"].as_str().expect("ticket").to_owned()
        }));
    }
    let mut tickets = Vec::with_capacity(count);
    for task in tasks {
        tickets.push(task.await.expect("ticket task"));
    }
    tickets
}

/// Returns the source address of connection `index`: 127.x.y.z, never
/// 127.0.0.1, cycling through 250 × 250 addresses of 127.0.0.0/8.
fn source_address(index: usize) -> SocketAddr {
    let third = 1 + (index / 250) % 250;
    let fourth = 1 + index % 250;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 1, third as u8, fourth as u8),
        0,
    ))
}

type ClientSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one connection per ticket at `rate` per second. Returns the
/// handshake latencies (TCP connect to `101`), the open sockets, the
/// failures and the seconds the connecting took.
async fn connect_all(
    public: SocketAddr,
    tickets: Vec<String>,
    rate: u32,
    deadline: Instant,
) -> (Vec<Duration>, Vec<ClientSocket>, usize, f64) {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(tickets.len())));
    let sockets = Arc::new(Mutex::new(Vec::with_capacity(tickets.len())));
    let failures = Arc::new(Mutex::new(0usize));
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(tickets.len());
    for (index, ticket) in tickets.into_iter().enumerate() {
        ticker.tick().await;
        if Instant::now() > deadline {
            break;
        }
        let (latencies, sockets, failures) = (latencies.clone(), sockets.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            match connect_one(public, &ticket, source_address(index)).await {
                Ok(socket) => {
                    latencies.lock().expect("lock").push(begun.elapsed());
                    sockets.lock().expect("lock").push(socket);
                }
                Err(err) => {
                    eprintln!("connection {index} failed: {err}");
                    *failures.lock().expect("lock") += 1;
                }
            }
        }));
    }
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, task).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
    let sockets = std::mem::take(&mut *sockets.lock().expect("lock"));
    let failures = *failures.lock().expect("lock");
    (latencies, sockets, failures, connect_seconds)
}

async fn connect_one(
    public: SocketAddr,
    ticket: &str,
    source: SocketAddr,
) -> Result<ClientSocket, String> {
    let socket = TcpSocket::new_v4().map_err(|err| err.to_string())?;
    socket
        .bind(source)
        .map_err(|err| format!("bind {source}: {err}"))?;
    let stream = socket
        .connect(public)
        .await
        .map_err(|err| err.to_string())?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{public}/ws?ticket={ticket}");
    let (socket, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .map_err(|err| err.to_string())?;
    Ok(socket)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

async fn open_connections(admin: SocketAddr) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("wsticket_open_connections "))
        .and_then(|value| value.trim().parse().ok())
}

struct Report {
    connections: usize,
    rate: u32,
    latencies: Vec<Duration>,
    failures: usize,
    connect_seconds: f64,
    rss_before: u64,
    rss_after: u64,
    open: Option<f64>,
    connected: usize,
}

fn report(mut report: Report) {
    report.latencies.sort();
    let percentile = |p: f64| -> f64 {
        if report.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((report.latencies.len() as f64 - 1.0) * p).round() as usize;
        report.latencies[index].as_secs_f64() * 1000.0
    };
    let connected = report.connected.max(1) as f64;
    let per_connection = (report.rss_after.saturating_sub(report.rss_before)) as f64 / connected;
    println!("connections requested: {}", report.connections);
    println!("connections open:      {}", report.connected);
    println!("failures:              {}", report.failures);
    println!(
        "open (server metric):  {}",
        report.open.map_or("n/a".into(), |v| v.to_string())
    );
    println!(
        "connect phase:         {:.2} s at a target of {}/s ({:.0}/s achieved)",
        report.connect_seconds,
        report.rate,
        report.connected as f64 / report.connect_seconds
    );
    println!(
        "handshake latency:     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(0.50),
        percentile(0.99),
        percentile(1.0)
    );
    println!(
        "wsticket RSS:          {} KiB before, {} KiB after ({:.1} KiB per connection)",
        report.rss_before, report.rss_after, per_connection
    );
}
