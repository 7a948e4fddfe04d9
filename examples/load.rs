//! Load generator for wsticket, on loopback only.
//!
//! Modes:
//! - `issue`: `POST /websocket/ticket` at a fixed concurrency, or at a fixed
//!   rate with `--rate` (open loop: latency counts from each request's
//!   scheduled time, so a stalled server cannot hide its queue).
//! - `upgrade`: tickets are issued first, outside the measurement; then each
//!   one is redeemed by a `GET /ws?ticket=…` upgrade on a new connection, at
//!   a fixed rate. Latency runs from the scheduled time to the `101`, which
//!   the server only sends after the consumption is on disk.
//! - `hold`: open `--connections` WebSockets with fresh tickets and hold them
//!   for `--hold`, then report the server's RSS per connection.
//! - `verify-cost`: CPU time of one JWT signature check in this process, the
//!   yardstick of the issuance targets.
//!
//! Every run is bounded by `--duration` and by a request count, and a
//! watchdog ends the process if a phase overruns. The generator either starts
//! wsticket itself (`--server-bin`), with a JWKS of the fixture keys that it
//! serves on loopback, or attaches to a running server (`--addr`, `--pid`).
//! It reads the server's CPU time (utime + stime of `/proc/PID/stat`) and RSS
//! (`VmRSS` of `/proc/PID/status`) before and after, and prints a summary and
//! one `RESULT {json}` line for scripts.
//!
//! ```text
//! cargo build --release --bin wsticket --example load
//! target/release/examples/load issue --server-bin target/release/wsticket \
//!     --concurrency 64 --tokens unique --requests 20000
//! ```

#[path = "../benches/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use warp::Filter;

#[derive(Parser)]
#[command(about = "Drives a wsticket server on loopback and reports its cost")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Issue tickets at a fixed concurrency or rate.
    Issue {
        #[command(flatten)]
        common: Common,
        /// Requests per second; unset, each connection sends its next
        /// request as soon as the previous response arrives.
        #[arg(long)]
        rate: Option<f64>,
        /// Connections, each with at most one request in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// `unique`: a distinct token per request, so no request is a
        /// verification cache hit; `shared`: one token for all.
        #[arg(long, value_enum, default_value_t = Tokens::Unique)]
        tokens: Tokens,
        /// Unique tokens signed ahead by `load sign`; the run stops when
        /// they run out.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Redeem fresh tickets with WebSocket upgrades at a fixed rate.
    Upgrade {
        #[command(flatten)]
        common: Common,
        /// Upgrades per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Maximum upgrades in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Open WebSockets and hold them.
    Hold {
        #[command(flatten)]
        common: Common,
        /// WebSockets to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// New WebSockets per second while opening.
        #[arg(long, default_value_t = 2000.0)]
        open_rate: f64,
        /// How long to hold them once open.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
    /// Start the server (on `--data-dir`, if given) and report how long it
    /// took to become ready, with its RSS: the store's recovery time.
    Startup {
        #[command(flatten)]
        common: Common,
    },
    /// Write the JWKS of the fixture keys to a file, for a peer server, and
    /// print the issuer and audience its tokens carry.
    Jwks {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_os_t = support::default_fixtures())]
        fixtures: PathBuf,
    },
    /// Sign distinct tokens into a file (one a line) for `--token-file`, so
    /// several runs share the signing time.
    Sign {
        #[arg(long, value_enum, default_value_t = Alg::Rs256)]
        alg: Alg,
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_os_t = support::default_fixtures())]
        fixtures: PathBuf,
    },
    /// Measure the CPU time of one JWT signature check in this process.
    VerifyCost {
        #[arg(long, value_enum, default_value_t = Alg::Rs256)]
        alg: Alg,
        /// Signature checks to time.
        #[arg(long, default_value_t = 5000)]
        iterations: u32,
        #[arg(long, default_value_os_t = support::default_fixtures())]
        fixtures: PathBuf,
        /// Label copied into the RESULT line.
        #[arg(long, default_value = "")]
        label: String,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// wsticket binary to start with a JWKS of the fixture keys. Without
    /// it, attach to a running server with --addr and --pid.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra flag for the started server; repeat, e.g.
    /// `--server-arg=--sync --server-arg=batched`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Public address of a running server (loopback only).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Process id of a running server; repeat to add up several processes.
    #[arg(long)]
    pid: Vec<u32>,
    /// Maximum duration of the measured phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Maximum requests (or upgrades) of the measured phase.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Spread client sockets over this many source addresses in 127.0.0.0/8
    /// (from 127.0.1.1), to get past the ephemeral port limit; 1 lets the
    /// kernel choose.
    #[arg(long, default_value_t = 1)]
    source_ips: u32,
    /// Signature algorithm of the tokens.
    #[arg(long, value_enum, default_value_t = Alg::Rs256)]
    alg: Alg,
    /// Directory with the fixture JWKS documents and `keys/*.pem`.
    #[arg(long, default_value_os_t = support::default_fixtures())]
    fixtures: PathBuf,
    /// Data directory of the started server, kept after the run; by default
    /// a temporary directory that is deleted.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Label copied into the RESULT line.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Tokens {
    Unique,
    Shared,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl Alg {
    fn jwt(self) -> Algorithm {
        match self {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
            Alg::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// Lifetime of the generated tokens.
const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Ticket requests in flight while tickets are issued ahead of a measurement.
const PREISSUE_CONCURRENCY: usize = 32;
/// Time the process may take beyond `--duration` (and `--hold`) for signing,
/// issuing ahead and start-up before the watchdog ends it.
const WATCHDOG_SLACK: Duration = Duration::from_secs(240);

fn main() {
    let cli = Cli::parse();
    if let Mode::VerifyCost {
        alg,
        iterations,
        fixtures,
        label,
    } = &cli.mode
    {
        verify_cost(*alg, *iterations, fixtures, label);
        return;
    }
    if let Mode::Jwks { out, fixtures } = &cli.mode {
        std::fs::write(out, support::jwks(fixtures).to_string())
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", out.display()));
        println!("{} {}", support::ISSUER, support::AUDIENCE);
        return;
    }
    if let Mode::Sign {
        alg,
        count,
        out,
        fixtures,
    } = &cli.mode
    {
        let tokens = sign_tokens(fixtures, *alg, Tokens::Unique, *count);
        let mut text = tokens.join("\n");
        text.push('\n');
        std::fs::write(out, text)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", out.display()));
        return;
    }
    let bound = match &cli.mode {
        Mode::Hold { common, hold, .. } => common.duration + *hold,
        Mode::Issue { common, .. } | Mode::Upgrade { common, .. } | Mode::Startup { common } => {
            common.duration
        }
        Mode::VerifyCost { .. } | Mode::Sign { .. } | Mode::Jwks { .. } => {
            unreachable!("handled above")
        }
    };
    std::thread::spawn(move || {
        std::thread::sleep(bound + WATCHDOG_SLACK);
        eprintln!("load: watchdog: the run took longer than its bound; stopping");
        std::process::exit(3);
    });
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    runtime.block_on(run(cli.mode));
}

async fn run(mode: Mode) {
    let common = match &mode {
        Mode::Issue { common, .. }
        | Mode::Upgrade { common, .. }
        | Mode::Hold { common, .. }
        | Mode::Startup { common } => common.clone(),
        Mode::VerifyCost { .. } | Mode::Sign { .. } | Mode::Jwks { .. } => {
            unreachable!("handled in main")
        }
    };
    let target = Target::open(&common).await;
    let mut result = match mode {
        Mode::Issue {
            rate,
            concurrency,
            tokens,
            token_file,
            ..
        } => {
            let tokens_list = match token_file {
                Some(path) => read_tokens(&path, common.requests),
                None => sign_tokens(&common.fixtures, common.alg, tokens, common.requests),
            };
            run_issue(&common, &target, rate, concurrency, tokens, tokens_list).await
        }
        Mode::Upgrade {
            rate, concurrency, ..
        } => run_upgrade(&common, &target, rate, concurrency).await,
        Mode::Hold {
            connections,
            open_rate,
            hold,
            ..
        } => run_hold(&common, &target, connections, open_rate, hold).await,
        Mode::Startup { .. } => {
            let sample = target.sample();
            let ready_s = target.ready_after.as_secs_f64();
            println!(
                "startup: ready after {ready_s:.3} s, RSS {} KiB",
                sample.rss_kib
            );
            json!({"mode": "startup", "ready_s": ready_s, "rss_kib": sample.rss_kib})
        }
        Mode::VerifyCost { .. } | Mode::Sign { .. } | Mode::Jwks { .. } => {
            unreachable!("handled in main")
        }
    };
    result["label"] = json!(common.label);
    println!("RESULT {result}");
    target.stop();
}

// ---------------------------------------------------------------------------
// The server under test

/// The server: started here, or attached to.
struct Target {
    addr: SocketAddr,
    pids: Vec<u32>,
    child: Mutex<Option<Child>>,
    /// Time from spawning the started server to its first ready `/readyz`.
    ready_after: Duration,
    /// The started server's data directory and log; deleted on drop.
    _workdir: Option<tempfile::TempDir>,
}

impl Target {
    async fn open(common: &Common) -> Target {
        match &common.server_bin {
            Some(bin) => Self::start(bin, common).await,
            None => {
                let addr = common
                    .addr
                    .expect("give --server-bin to start a server, or --addr and --pid to attach");
                assert!(
                    addr.ip().is_loopback(),
                    "--addr {addr} is not a loopback address; this generator only targets 127.0.0.0/8"
                );
                assert!(
                    !common.pid.is_empty(),
                    "--pid is required with --addr, to read the server's CPU and RSS"
                );
                Target {
                    addr,
                    pids: common.pid.clone(),
                    child: Mutex::new(None),
                    ready_after: Duration::ZERO,
                    _workdir: None,
                }
            }
        }
    }

    async fn start(bin: &PathBuf, common: &Common) -> Target {
        let jwks = support::jwks(&common.fixtures);
        let jwks_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the JWKS server");
        let jwks_addr = jwks_listener.local_addr().expect("JWKS server address");
        let route = warp::path!(".well-known" / "jwks.json").map(move || warp::reply::json(&jwks));
        tokio::spawn(warp::serve(route).incoming(jwks_listener).run());

        let workdir = tempfile::tempdir().expect("create a temporary directory");
        let public = free_port();
        let admin = free_port();
        let data_dir = common
            .data_dir
            .clone()
            .unwrap_or_else(|| workdir.path().join("data"));
        let log = std::fs::File::create(workdir.path().join("server.log")).expect("create log");
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .args(["--listen", &public.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args([
                "--jwks-url",
                &format!("http://{jwks_addr}/.well-known/jwks.json"),
            ])
            .args(["--issuer", support::ISSUER, "--audience", support::AUDIENCE])
            .arg("--data-dir")
            .arg(&data_dir)
            // Load comes from a handful of subjects, far above the per-user
            // quota; the limiter still runs on every request.
            .args(["--rate-limit", "1000000000", "--ticket-ttl", "10m"])
            .args(["--max-failed-upgrades-per-minute", "1000000"])
            .args(&common.server_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let spawned = Instant::now();
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", bin.display()));
        let pid = child.id();
        let mut target = Target {
            addr: public,
            pids: vec![pid],
            child: Mutex::new(Some(child)),
            ready_after: Duration::ZERO,
            _workdir: Some(workdir),
        };
        target.wait_ready(admin).await;
        target.ready_after = spawned.elapsed();
        eprintln!("load: started {} (pid {pid}) on {public}", bin.display());
        target
    }

    async fn wait_ready(&self, admin: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(stream) = TcpStream::connect(admin).await {
                let mut conn = HttpConn::new(stream);
                let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\n\r\n");
                if let Ok((200, _)) = conn.exchange(request.as_bytes()).await {
                    return;
                }
            }
            if let Some(child) = self.child.lock().expect("lock").as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the server exited with {status} before it was ready; see its log");
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server was not ready in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn sample(&self) -> ProcSample {
        ProcSample::read(&self.pids)
    }

    /// Stops a started server with SIGTERM, so it flushes its store, and
    /// with SIGKILL if it has not exited after 10 s.
    fn stop(&self) {
        let Some(mut child) = self.child.lock().expect("lock").take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("bound address")
}

/// CPU time and RSS of the server's processes at one moment.
#[derive(Clone, Copy)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kib: u64,
}

impl ProcSample {
    fn read(pids: &[u32]) -> ProcSample {
        let mut sample = ProcSample {
            cpu_ticks: 0,
            rss_kib: 0,
        };
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|err| panic!("cannot read /proc/{pid}/stat: {err}"));
            // Fields after the command name, which is in parentheses and may
            // contain spaces: state is field 3, utime 14 and stime 15.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let field =
                |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
            sample.cpu_ticks += field(14) + field(15);
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            sample.rss_kib += status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0);
        }
        sample
    }
}

/// Clock ticks per second of utime and stime.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------
// Client connections

/// Returns the source address of the `index`-th client socket.
fn source_ip(index: u64, spread: u32) -> Option<IpAddr> {
    if spread <= 1 {
        return None;
    }
    let slot = u32::try_from(index % u64::from(spread)).expect("below spread, a u32");
    let [_, _, b, c] = (u32::from(Ipv4Addr::new(127, 0, 1, 1)) + slot).to_be_bytes();
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, b, c)))
}

async fn connect(addr: SocketAddr, index: u64, spread: u32) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source_ip(index, spread) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A keep-alive HTTP/1.1 connection for requests whose responses carry a
/// `Content-Length`, which is all this generator sends.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    fn new(stream: TcpStream) -> Self {
        HttpConn {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and reads its response: status and body.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let header_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..header_end])
            .map_err(|_| std::io::Error::other("response head is not UTF-8"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status code in the response"))?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(|| std::io::Error::other("response has no Content-Length"))?;
        while self.buf.len() < header_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, self.buf[header_end..header_end + length].to_vec()))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn ticket_request(addr: SocketAddr, token: &str) -> Vec<u8> {
    format!(
        "POST /websocket/ticket HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// Names a failed response by status and `error` code, e.g. `401 invalid_token`.
fn error_name(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    format!("{status} {code}").trim_end().to_owned()
}

// ---------------------------------------------------------------------------
// Tokens

/// Signs `count` tokens on every core; with `Tokens::Shared` one token.
fn sign_tokens(
    fixtures: &std::path::Path,
    alg: Alg,
    tokens: Tokens,
    count: u64,
) -> Arc<Vec<String>> {
    let key = Arc::new(support::signing_key(fixtures, alg.jwt()));
    if tokens == Tokens::Shared {
        return Arc::new(vec![support::sign(
            &key,
            alg.jwt(),
            "load-shared",
            0,
            TOKEN_LIFETIME_SECS,
        )]);
    }
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let key: Arc<EncodingKey> = key.clone();
            std::thread::spawn(move || {
                (thread..count)
                    .step_by(threads as usize)
                    .map(|i| {
                        (
                            i,
                            support::sign(
                                &key,
                                alg.jwt(),
                                &format!("load-{i}"),
                                i,
                                TOKEN_LIFETIME_SECS,
                            ),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut signed: Vec<(u64, String)> = handles
        .into_iter()
        .flat_map(|handle| handle.join().expect("signing thread"))
        .collect();
    signed.sort_unstable_by_key(|(i, _)| *i);
    eprintln!(
        "load: signed {count} distinct tokens in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Arc::new(signed.into_iter().map(|(_, token)| token).collect())
}

/// Reads at most `limit` tokens written by `load sign`.
fn read_tokens(path: &std::path::Path, limit: u64) -> Arc<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read tokens from {}: {err}", path.display()));
    let tokens: Vec<String> = text
        .lines()
        .filter(|line| !line.is_empty())
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(str::to_owned)
        .collect();
    assert!(!tokens.is_empty(), "{} holds no tokens", path.display());
    Arc::new(tokens)
}

// ---------------------------------------------------------------------------
// Recording

#[derive(Default)]
struct Recorder {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        for (name, count) in other.errors {
            *self.errors.entry(name).or_default() += count;
        }
    }

    fn error(&mut self, name: String) {
        *self.errors.entry(name).or_default() += 1;
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// Prints the summary of a measured phase and returns it as JSON.
fn report(
    what: &str,
    recorder: &mut Recorder,
    before: ProcSample,
    after: ProcSample,
    elapsed: Duration,
) -> Value {
    let ok = recorder.latencies_us.len() as u64;
    let failed: u64 = recorder.errors.values().sum();
    recorder.latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        let sorted = &recorder.latencies_us;
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    };
    let seconds = elapsed.as_secs_f64();
    let cpu_seconds = (after.cpu_ticks - before.cpu_ticks) as f64 / clock_ticks_per_second();
    let cpu_us_per_ok = if ok > 0 {
        cpu_seconds * 1e6 / ok as f64
    } else {
        0.0
    };
    let throughput = ok as f64 / seconds;
    println!("{what}: {ok} ok, {failed} failed in {seconds:.2} s: {throughput:.0}/s");
    println!(
        "latency (µs): p50 {} p90 {} p99 {} max {}",
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(100.0)
    );
    if recorder.errors.is_empty() {
        println!("errors: none");
    } else {
        for (name, count) in &recorder.errors {
            println!("errors: {name}: {count}");
        }
    }
    println!(
        "server: {cpu_seconds:.2} s CPU ({:.0}% of one core), {cpu_us_per_ok:.1} µs CPU per ok; RSS {} KiB -> {} KiB",
        cpu_seconds / seconds * 100.0,
        before.rss_kib,
        after.rss_kib
    );
    json!({
        "ok": ok,
        "failed": failed,
        "errors": recorder.errors,
        "seconds": seconds,
        "throughput": throughput,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "max_us": pct(100.0),
        "server_cpu_s": cpu_seconds,
        "server_cpu_us_per_ok": cpu_us_per_ok,
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
    })
}

/// Hands out request indexes and, with a rate, their scheduled start times.
struct Schedule {
    next: AtomicU64,
    limit: u64,
    start: Instant,
    end: Instant,
    interval: Option<Duration>,
}

impl Schedule {
    fn new(limit: u64, duration: Duration, rate: Option<f64>) -> Schedule {
        let start = Instant::now();
        Schedule {
            next: AtomicU64::new(0),
            limit,
            start,
            end: start + duration,
            interval: rate.map(|rate| Duration::from_secs_f64(1.0 / rate)),
        }
    }

    /// Returns the next index and the time it starts at, waiting until then
    /// under a rate; `None` once the count or the duration is used up.
    async fn next(&self) -> Option<(u64, Instant)> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.limit {
            return None;
        }
        let at = match self.interval {
            Some(interval) => self.start + interval.mul_f64(index as f64),
            None => Instant::now(),
        };
        if at >= self.end || Instant::now() >= self.end {
            return None;
        }
        tokio::time::sleep_until(at.into()).await;
        Some((index, at))
    }
}

// ---------------------------------------------------------------------------
// Modes

async fn run_issue(
    common: &Common,
    target: &Target,
    rate: Option<f64>,
    concurrency: usize,
    tokens: Tokens,
    tokens_list: Arc<Vec<String>>,
) -> Value {
    let limit = match tokens {
        Tokens::Unique => common.requests.min(tokens_list.len() as u64),
        Tokens::Shared => common.requests,
    };
    let schedule = Arc::new(Schedule::new(limit, common.duration, rate));
    let before = target.sample();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let schedule = schedule.clone();
            let tokens_list = tokens_list.clone();
            let (addr, spread) = (target.addr, common.source_ips);
            tokio::spawn(async move {
                let mut recorder = Recorder::default();
                let mut conn: Option<HttpConn> = None;
                while let Some((index, at)) = schedule.next().await {
                    let token = &tokens_list[(index as usize) % tokens_list.len()];
                    if conn.is_none() {
                        match connect(addr, worker as u64, spread).await {
                            Ok(stream) => conn = Some(HttpConn::new(stream)),
                            Err(err) => {
                                recorder.error(format!("connect: {}", err.kind()));
                                continue;
                            }
                        }
                    }
                    let http = conn.as_mut().expect("connected above");
                    match http.exchange(&ticket_request(addr, token)).await {
                        Ok((200, _)) => recorder.latencies_us.push(micros(at.elapsed())),
                        Ok((status, body)) => recorder.error(error_name(status, &body)),
                        Err(err) => {
                            recorder.error(format!("io: {}", err.kind()));
                            conn = None;
                        }
                    }
                }
                recorder
            })
        })
        .collect();
    let mut recorder = Recorder::default();
    for worker in workers {
        recorder.merge(worker.await.expect("worker task"));
    }
    let elapsed = schedule.start.elapsed();
    let after = target.sample();
    let what = format!(
        "issue ({} tokens, {}, {})",
        if tokens == Tokens::Unique {
            "unique"
        } else {
            "shared"
        },
        algorithm_name(common.alg),
        match rate {
            Some(rate) => format!("{rate} requests/s over {concurrency} connections"),
            None => format!("{concurrency} connections"),
        }
    );
    let mut result = report(&what, &mut recorder, before, after, elapsed);
    result["mode"] = json!("issue");
    result["concurrency"] = json!(concurrency);
    result["tokens"] = json!(if tokens == Tokens::Unique {
        "unique"
    } else {
        "shared"
    });
    result
}

fn algorithm_name(alg: Alg) -> &'static str {
    match alg {
        Alg::Rs256 => "RS256",
        Alg::Es256 => "ES256",
        Alg::EdDsa => "EdDSA",
    }
}

/// Issues `count` tickets with one shared token, outside any measurement.
async fn preissue(common: &Common, target: &Target, count: u64) -> Arc<Vec<String>> {
    let started = Instant::now();
    let token = sign_tokens(&common.fixtures, common.alg, Tokens::Shared, 1)[0].clone();
    let request = Arc::new(ticket_request(target.addr, &token));
    let next = Arc::new(AtomicU64::new(0));
    let tickets = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let deadline = Instant::now() + Duration::from_secs(120);
    let workers: Vec<_> = (0..PREISSUE_CONCURRENCY)
        .map(|worker| {
            let (request, next, tickets) = (request.clone(), next.clone(), tickets.clone());
            let (addr, spread) = (target.addr, common.source_ips);
            tokio::spawn(async move {
                let mut conn = HttpConn::new(
                    connect(addr, worker as u64, spread)
                        .await
                        .expect("connect to the server to issue tickets"),
                );
                while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                    let (status, body) = conn.exchange(&request).await.expect("ticket request");
                    assert_eq!(
                        status,
                        200,
                        "ticket request failed: {}",
                        error_name(status, &body)
                    );
                    let value: Value = serde_json::from_slice(&body).expect("ticket JSON");
                    let ticket = value["ticket"].as_str().expect("ticket field").to_owned();
                    tickets.lock().expect("lock").push(ticket);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("issuing task");
    }
    let tickets = std::mem::take(&mut *tickets.lock().expect("lock"));
    eprintln!(
        "load: issued {} tickets ahead in {:.1} s",
        tickets.len(),
        started.elapsed().as_secs_f64()
    );
    Arc::new(tickets)
}

fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket with `ticket`; on an HTTP rejection, returns its name.
async fn open_websocket(
    addr: SocketAddr,
    ticket: &str,
    index: u64,
    spread: u32,
) -> Result<Socket, String> {
    let stream = connect(addr, index, spread)
        .await
        .map_err(|err| format!("connect: {}", err.kind()))?;
    let url = format!("ws://{addr}/ws?ticket={ticket}");
    match tokio_tungstenite::client_async_with_config(url, stream, Some(client_ws_config())).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(error_name(
            response.status().as_u16(),
            response.body().as_deref().unwrap_or_default(),
        )),
        Err(err) => Err(format!("websocket: {err}")),
    }
}

/// Opens one WebSocket per scheduled ticket over `concurrency` workers,
/// records each handshake's latency from its scheduled time, and hands the
/// open socket to `on_open`.
async fn open_on_schedule<F>(
    schedule: &Arc<Schedule>,
    tickets: &Arc<Vec<String>>,
    target: &Target,
    common: &Common,
    concurrency: usize,
    on_open: F,
) -> Recorder
where
    F: Fn(Socket) + Clone + Send + 'static,
{
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (schedule, tickets, on_open) = (schedule.clone(), tickets.clone(), on_open.clone());
            let (addr, spread) = (target.addr, common.source_ips);
            tokio::spawn(async move {
                let mut recorder = Recorder::default();
                while let Some((index, at)) = schedule.next().await {
                    match open_websocket(addr, &tickets[index as usize], index, spread).await {
                        Ok(socket) => {
                            recorder.latencies_us.push(micros(at.elapsed()));
                            on_open(socket);
                        }
                        Err(name) => recorder.error(name),
                    }
                }
                recorder
            })
        })
        .collect();
    let mut recorder = Recorder::default();
    for worker in workers {
        recorder.merge(worker.await.expect("worker task"));
    }
    recorder
}

async fn run_upgrade(common: &Common, target: &Target, rate: f64, concurrency: usize) -> Value {
    let count = common
        .requests
        .min((rate * common.duration.as_secs_f64()).ceil() as u64);
    let tickets = preissue(common, target, count).await;
    let schedule = Arc::new(Schedule::new(
        tickets.len() as u64,
        common.duration,
        Some(rate),
    ));
    let before = target.sample();
    let mut recorder = open_on_schedule(
        &schedule,
        &tickets,
        target,
        common,
        concurrency,
        |mut socket| {
            tokio::spawn(async move {
                let close = socket.close(None);
                let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
            });
        },
    )
    .await;
    let elapsed = schedule.start.elapsed();
    let after = target.sample();
    let what = format!("upgrade ({rate} upgrades/s, fresh tickets)");
    let mut result = report(&what, &mut recorder, before, after, elapsed);
    result["mode"] = json!("upgrade");
    result["rate"] = json!(rate);
    result
}

async fn run_hold(
    common: &Common,
    target: &Target,
    connections: usize,
    open_rate: f64,
    hold: Duration,
) -> Value {
    let count = common.requests.min(connections as u64);
    let tickets = preissue(common, target, count).await;
    // Let the issuance settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = target.sample();
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(0));
    let schedule = Arc::new(Schedule::new(
        tickets.len() as u64,
        common.duration,
        Some(open_rate),
    ));
    let mut recorder = open_on_schedule(&schedule, &tickets, target, common, 256, {
        let (stop, open) = (stop.clone(), open.clone());
        move |socket| {
            open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(hold_socket(socket, stop.clone(), open.clone()));
        }
    })
    .await;
    let elapsed = schedule.start.elapsed();
    // Let the server finish the greetings before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let opened = target.sample();
    let mut result = report(
        &format!("hold: opening {count} WebSockets at {open_rate}/s"),
        &mut recorder,
        before,
        opened,
        elapsed,
    );
    let open_after_opening = open.load(Ordering::Relaxed);
    tokio::time::sleep(hold).await;
    let held = target.sample();
    let still_open = open.load(Ordering::Relaxed);
    let per_connection = |sample: ProcSample| -> f64 {
        if open_after_opening == 0 {
            return 0.0;
        }
        (sample.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / open_after_opening as f64
    };
    let hold_cpu = (held.cpu_ticks - opened.cpu_ticks) as f64 / clock_ticks_per_second();
    println!(
        "hold: {open_after_opening} open after opening, {still_open} still open after {:.0} s; \
         server RSS {} KiB -> {} KiB: {:.0} bytes per connection (after holding: {:.0}); \
         {hold_cpu:.2} s server CPU while holding",
        hold.as_secs_f64(),
        before.rss_kib,
        held.rss_kib,
        per_connection(opened),
        per_connection(held),
    );
    stop.cancel();
    result["mode"] = json!("hold");
    result["open_after_opening"] = json!(open_after_opening);
    result["still_open"] = json!(still_open);
    result["rss_held_kib"] = json!(held.rss_kib);
    result["rss_bytes_per_connection"] = json!(per_connection(opened));
    result["rss_bytes_per_connection_after_hold"] = json!(per_connection(held));
    result["hold_cpu_s"] = json!(hold_cpu);
    result
}

/// Reads a held WebSocket (answering pings) until `stop` or the server
/// closes it.
async fn hold_socket(mut socket: Socket, stop: CancellationToken, open: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                break;
            }
            message = socket.next() => match message {
                Some(Ok(tungstenite::Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
    let _ = socket.flush().await;
}

/// Times `iterations` signature checks on this thread with its CPU clock
/// (`/proc/thread-self/schedstat`, nanoseconds on CPU).
fn verify_cost(alg: Alg, iterations: u32, fixtures: &std::path::Path, label: &str) {
    let key = support::signing_key(fixtures, alg.jwt());
    let token = support::sign(&key, alg.jwt(), "verify-cost", 0, TOKEN_LIFETIME_SECS);
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(support::public_jwk(fixtures, alg.jwt())).expect("fixture JWK");
    let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("usable fixture JWK");
    let (signed, signature) = token.rsplit_once('.').expect("a compact JWS");
    let check = || {
        let ok = jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &decoding, alg.jwt())
            .expect("verification runs");
        assert!(ok, "the fixture signature verifies");
    };
    for _ in 0..iterations.min(500) {
        check();
    }
    let cpu_before = thread_cpu_ns();
    let wall = Instant::now();
    for _ in 0..iterations {
        check();
    }
    let cpu_us = (thread_cpu_ns() - cpu_before) as f64 / 1000.0 / f64::from(iterations);
    let wall_us = wall.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
    let name = algorithm_name(alg);
    println!("verify-cost: {name}: {cpu_us:.1} µs CPU per verification ({wall_us:.1} µs wall), {iterations} iterations");
    println!(
        "RESULT {}",
        json!({"mode": "verify-cost", "alg": name, "cpu_us": cpu_us, "wall_us": wall_us, "label": label})
    );
}

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat is readable")
}
