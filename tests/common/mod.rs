//! Shared test harness: a JWKS server, token signing with the fixture keys,
//! the real `wsticket` binary on ephemeral loopback ports, and HTTP and
//! WebSocket clients.
//!
//! Each integration test file includes this module; not every file uses every
//! helper.
#![allow(dead_code)]

pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warp::Filter;

pub const ISSUER: &str = "https://idp.test.invalid/realms/test";
pub const AUDIENCE: &str = "wsticket-tests";

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

pub fn read_fixture(path: &str) -> Vec<u8> {
    std::fs::read(fixture(path)).unwrap_or_else(|err| panic!("fixture {path}: {err}"))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Returns the key with `kid` from a fixture JWKS document.
pub fn fixture_jwk(file: &str, kid: &str) -> Value {
    let document: Value =
        serde_json::from_slice(&read_fixture(&format!("jwks/{file}"))).expect("fixture is JSON");
    document["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .find(|key| key["kid"] == kid)
        .cloned()
        .unwrap_or_else(|| panic!("no kid {kid} in {file}"))
}

/// Returns the default test key set: `rsa-a` (RS256, kid `rsa-a`) and `ec256`
/// (ES256, kid `ec256`).
pub fn default_jwks() -> Value {
    json!({
        "keys": [
            fixture_jwk("rotation-before.jwks.json", "rsa-a"),
            fixture_jwk("ec-okp.jwks.json", "ec256"),
        ]
    })
}

/// Signs tokens with the fixture private keys.
pub struct Signer;

impl Signer {
    pub fn key(name: &str) -> EncodingKey {
        let pem = read_fixture(&format!("jwks/keys/{name}.pem"));
        match name {
            "ec256" | "ec384" => EncodingKey::from_ec_pem(&pem).expect("EC PEM"),
            "ed25519" => EncodingKey::from_ed_pem(&pem).expect("Ed25519 PEM"),
            _ => EncodingKey::from_rsa_pem(&pem).expect("RSA PEM"),
        }
    }

    /// Claims valid for five minutes for `subject`.
    pub fn claims(subject: &str) -> Value {
        let now = now_secs();
        json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "sid": "session-1",
            "iat": now,
            "exp": now + 300,
        })
    }

    pub fn sign(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &Self::key(key)).expect("signing works")
    }

    /// Signs an RS256 token by `rsa-a` with the given claims.
    pub fn token_with(claims: &Value) -> String {
        Self::sign(Algorithm::RS256, "rsa-a", Some("rsa-a"), claims)
    }

    /// Signs an RS256 token with `rsa-a` for `subject`.
    pub fn token(subject: &str) -> String {
        Self::sign(
            Algorithm::RS256,
            "rsa-a",
            Some("rsa-a"),
            &Self::claims(subject),
        )
    }
}

/// A JWKS endpoint on loopback whose document can be changed, and which
/// counts the fetches it served.
pub struct JwksServer {
    pub addr: SocketAddr,
    document: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(document: Value) -> Self {
        Self::start_on(document, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Starts the JWKS server on `ip`, at an ephemeral port.
    pub async fn start_on(document: Value, ip: std::net::IpAddr) -> Self {
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let route = {
            let document = document.clone();
            let fetches = fetches.clone();
            warp::path!("jwks.json").map(move || {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = document.lock().expect("lock").clone();
                warp::reply::json(&body)
            })
        };
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind JWKS server");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(warp::serve(route).incoming(listener).run());
        JwksServer {
            addr,
            document,
            fetches,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    pub fn set(&self, document: Value) {
        *self.document.lock().expect("lock") = document;
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running `wsticket serve` process.
pub struct Server {
    child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    pub data_dir: PathBuf,
}

/// Options for starting a server.
pub struct ServerOptions {
    pub jwks_url: String,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    pub wait_ready: bool,
    /// Shell commands run before the server is started with `exec`, in the
    /// same process (for example `trap '' XFSZ` to see file size limits as
    /// write errors instead of a signal).
    pub shell_prelude: Option<String>,
}

impl ServerOptions {
    pub fn new(jwks_url: String, data_dir: &Path) -> Self {
        ServerOptions {
            jwks_url,
            data_dir: data_dir.to_owned(),
            extra: Vec::new(),
            wait_ready: true,
            shell_prelude: None,
        }
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_owned());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn shell_prelude(mut self, prelude: &str) -> Self {
        self.shell_prelude = Some(prelude.to_owned());
        self
    }

    pub fn not_waiting_for_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }
}

pub fn command(options: &ServerOptions) -> Command {
    let binary = env!("CARGO_BIN_EXE_wsticket");
    let mut command = match &options.shell_prelude {
        None => Command::new(binary),
        Some(prelude) => {
            let mut shell = Command::new("sh");
            shell
                .arg("-c")
                .arg(format!("{prelude}; exec \"$0\" \"$@\""))
                .arg(binary);
            shell
        }
    };
    command.arg("serve");
    for flag in ["--listen", "--admin-listen"] {
        if !options.extra.iter().any(|arg| arg == flag) {
            command.args([flag, "127.0.0.1:0"]);
        }
    }
    command
        .args(["--jwks-url", &options.jwks_url])
        .args(["--issuer", ISSUER, "--audience", AUDIENCE])
        .arg("--data-dir")
        .arg(&options.data_dir)
        .args(&options.extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

impl Server {
    pub async fn start(options: ServerOptions) -> Server {
        let mut child = command(&options).spawn().expect("start wsticket");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("lock").push(line);
                }
            });
        }

        let deadline = Instant::now() + Duration::from_secs(20);
        let (public, admin) = loop {
            let found = {
                let lines = lines.lock().expect("lock");
                (listen_addr(&lines, "public"), listen_addr(&lines, "admin"))
            };
            if let (Some(public), Some(admin)) = found {
                break (public, admin);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "wsticket exited with {status} before listening:\n{}",
                    lines.lock().expect("lock").join("\n")
                );
            }
            assert!(Instant::now() < deadline, "wsticket did not start in 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let server = Server {
            child,
            public,
            admin,
            lines,
            data_dir: options.data_dir.clone(),
        };
        if options.wait_ready {
            server.wait_ready().await;
        }
        server
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = client.get(self.admin_url("/readyz")).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "wsticket not ready in 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.public)
    }

    /// Returns the process id, for signals and /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }

    /// Sends a signal (`HUP`, `TERM`, …) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to 10 s for a log event named `name` and returns it.
    pub async fn wait_event(&self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(event) = self.events(name).pop() {
                return event;
            }
            assert!(Instant::now() < deadline, "no {name} event in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns every line the process printed so far.
    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// Waits until the log has had no new line for 100 ms (at most 2 s), so
    /// that lines the server wrote before its last response have been read.
    pub async fn settle_logs(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = self.lines.lock().expect("lock").len();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now_seen = self.lines.lock().expect("lock").len();
            if now_seen == seen || Instant::now() > deadline {
                return;
            }
            seen = now_seen;
        }
    }

    /// Returns the JSON log events named `name`, once the log has settled.
    pub async fn settled_events(&self, name: &str) -> Vec<Value> {
        self.settle_logs().await;
        self.events(name)
    }

    /// Returns the JSON log events whose `event` field is `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| event["event"] == name)
            .collect()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.wait_exit(Duration::from_secs(40)).await
    }

    /// Sends SIGTERM, waits for the exit, and returns the exit status with
    /// every line the process printed.
    pub async fn terminate_keeping_logs(mut self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(40)).await;
        // The reader threads may still be reading the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (status, self.logs())
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub async fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wsticket did not exit in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scrapes `/metrics` and returns the value of one series, given as it
    /// appears in the text format (for example `wsticket_tickets_issued_total`
    /// or `wsticket_redemptions_total{result="ok",via="upgrade"}`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text");
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds one series in the Prometheus text format.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

fn listen_addr(lines: &[String], listener: &str) -> Option<SocketAddr> {
    lines.iter().find_map(|line| {
        let event: Value = serde_json::from_str(line).ok()?;
        if event["event"] == "listening" && event["listener"] == listener {
            event["addr"].as_str()?.parse().ok()
        } else {
            None
        }
    })
}

/// An HTTP response as a test receives it.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn error_code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

pub async fn answer_of(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// `POST /websocket/ticket` with the given headers.
pub async fn post_ticket(server: &Server, headers: &[(&str, &str)]) -> Answer {
    let client = reqwest::Client::new();
    let mut request = client.post(server.url("/websocket/ticket"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer_of(request.send().await.expect("ticket request")).await
}

/// Requests a ticket with a bearer token and returns it, asserting 200.
pub async fn ticket_for(server: &Server, token: &str) -> String {
    ticket_with_origin(server, token, None).await
}

pub async fn ticket_with_origin(server: &Server, token: &str, origin: Option<&str>) -> String {
    let authorization = format!("Bearer {token}");
    let mut headers = vec![("authorization", authorization.as_str())];
    if let Some(origin) = origin {
        headers.push(("origin", origin));
    }
    let answer = post_ticket(server, &headers).await;
    assert_eq!(
        answer.status,
        200,
        "ticket request failed: {}",
        answer.error_code()
    );
    answer.body["ticket"]
        .as_str()
        .expect("ticket field")
        .to_owned()
}

/// A rejected upgrade: its status, `error` code and headers.
#[derive(Debug)]
pub struct Rejection {
    pub status: u16,
    pub code: String,
    pub connection: Option<String>,
}

/// Builds the client request for `/ws` with a query string and extra
/// headers.
pub fn ws_request(
    server: &Server,
    query: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = server
        .ws_url(query)
        .into_client_request()
        .expect("valid ws URL");
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            name.parse().expect("header name");
        request
            .headers_mut()
            .append(name, HeaderValue::from_str(value).expect("header value"));
    }
    request
}

/// Opens `/ws` with a query string and extra headers.
pub async fn connect(
    server: &Server,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Socket, Rejection> {
    let mut request = server
        .ws_url(query)
        .into_client_request()
        .expect("valid ws URL");
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            name.parse().expect("header name");
        request
            .headers_mut()
            .append(name, HeaderValue::from_str(value).expect("header value"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let code = response
                .body()
                .as_ref()
                .and_then(|body| serde_json::from_slice::<Value>(body).ok())
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let connection = response
                .headers()
                .get("connection")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Err(Rejection {
                status: response.status().as_u16(),
                code,
                connection,
            })
        }
        Err(err) => panic!("WebSocket connect failed: {err}"),
    }
}

pub async fn connect_with_ticket(server: &Server, ticket: &str) -> Result<Socket, Rejection> {
    connect(server, &format!("?ticket={ticket}"), &[]).await
}

/// Reads the next text frame, failing after 5 s.
pub async fn next_text(socket: &mut Socket) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a frame within 5 s");
        match frame {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Returns a loopback address that nothing listens on.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// Returns the log id of a ticket: 12 hex characters of its SHA-256.
pub fn ticket_log_id(ticket: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes());
    hex::encode(&hash.as_ref()[..6])
}
