//! `wsticket demo`: the whole flow on this machine, with nothing installed.
//!
//! It creates a throwaway Ed25519 key pair, serves its JWKS on a loopback
//! port, starts a real server with a store in a temporary directory, and walks
//! a client through JWT → ticket → WebSocket → echo → replay rejected →
//! expired ticket rejected. The demo key exists only inside this function:
//! `serve` has no built-in issuer and no way to skip verification. Tickets are
//! printed by their hashed id, never in full.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use warp::Filter;

use crate::clock::{Clock, SystemClock};
use clap::Parser;

use crate::config::{Cli, Command, Config, DemoArgs, LogFormat};
use crate::server;
use crate::ticket;

const ISSUER: &str = "https://demo-issuer.wsticket.invalid";
const AUDIENCE: &str = "wsticket-demo";
const KID: &str = "demo-key-1";
/// Short enough that the expiry step only waits a moment.
const DEMO_TICKET_TTL: Duration = Duration::from_secs(2);

/// A demo step that did not go as expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DemoError(String);

pub(crate) fn fail(message: impl Into<String>) -> DemoError {
    DemoError(message.into())
}

pub async fn run(args: DemoArgs) -> ExitCode {
    if args.verbose {
        crate::logging::init(LogFormat::Text);
    }
    if args.browser {
        return crate::demo_browser::run().await;
    }
    match run_steps().await {
        Ok(()) => {
            println!("\nDemo finished: every step behaved as expected.");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("\nDemo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) struct DemoIssuer {
    key_pair_pkcs8: Vec<u8>,
    pub(crate) jwks: serde_json::Value,
}

impl DemoIssuer {
    pub(crate) fn generate() -> Result<Self, DemoError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| fail("cannot generate an Ed25519 key pair"))?;
        let key_pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| fail("cannot load the generated key pair"))?;
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "use": "sig",
                "alg": "EdDSA",
                "kid": KID,
                "x": URL_SAFE_NO_PAD.encode(key_pair.public_key().as_ref()),
            }]
        });
        Ok(DemoIssuer {
            key_pair_pkcs8: pkcs8.as_ref().to_vec(),
            jwks,
        })
    }

    pub(crate) fn sign(&self, subject: &str, lifetime: Duration) -> Result<String, DemoError> {
        let now = SystemClock.now_secs();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "sid": "demo-session",
            "iat": now,
            "exp": now + lifetime.as_secs(),
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_string());
        let key = EncodingKey::from_ed_der(&self.key_pair_pkcs8);
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|err| fail(format!("signing failed: {err}")))
    }
}

async fn serve_jwks(jwks: serde_json::Value) -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|err| fail(format!("cannot bind the JWKS server: {err}")))?;
    let addr = listener
        .local_addr()
        .map_err(|err| fail(format!("JWKS server address: {err}")))?;
    let route = warp::path!(".well-known" / "jwks.json").map(move || warp::reply::json(&jwks));
    tokio::spawn(warp::serve(route).incoming(listener).run());
    Ok(addr)
}

async fn run_steps() -> Result<(), DemoError> {
    println!("wsticket demo: the ticket flow end to end, on loopback only.\n");

    let issuer = DemoIssuer::generate()?;
    let jwks_addr = serve_jwks(issuer.jwks.clone()).await?;
    let jwks_url = format!("http://{jwks_addr}/.well-known/jwks.json");
    println!("[setup] generated an Ed25519 key pair; its JWKS is served at {jwks_url}");

    let data_dir =
        tempfile::tempdir().map_err(|err| fail(format!("temporary directory: {err}")))?;
    let store_dir = data_dir.path().join("store");
    let argv = server_argv(&jwks_url, DEMO_TICKET_TTL, &store_dir)?;
    let server = DemoServer::start(demo_config(&argv)?).await?;
    let (public, admin) = (server.public, server.admin);
    println!(
        "[setup] server listening on http://{public} (admin http://{admin}), store in a temporary directory, ticket TTL {}s",
        DEMO_TICKET_TTL.as_secs()
    );

    let http = reqwest::Client::new();
    wait_ready(&http, admin).await?;
    println!("[setup] GET /readyz -> 200: keys loaded, store recovered\n");

    let result = walk_client(&http, &issuer, public).await;

    server.stop().await;
    result
}

/// A wsticket server running inside the demo process.
pub(crate) struct DemoServer {
    pub(crate) public: SocketAddr,
    pub(crate) admin: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), server::StartError>>,
}

impl DemoServer {
    /// Binds the listeners of `config` and starts serving in a task.
    pub(crate) async fn start(config: Config) -> Result<Self, DemoError> {
        let listeners = server::bind(&config)
            .await
            .map_err(|err| fail(err.to_string()))?;
        let public = listeners
            .public
            .local_addr()
            .map_err(|err| fail(err.to_string()))?;
        let admin = listeners
            .admin
            .local_addr()
            .map_err(|err| fail(err.to_string()))?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(config, listeners, async {
            let _ = stop_rx.await;
        }));
        Ok(DemoServer {
            public,
            admin,
            stop,
            task,
        })
    }

    /// Shuts the server down and waits for it: open WebSockets get 1001.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Builds the `wsticket serve` flags of a demo server on loopback ephemeral
/// ports, verifying tokens of the demo issuer.
pub(crate) fn server_argv(
    jwks_url: &str,
    ticket_ttl: Duration,
    store_dir: &std::path::Path,
) -> Result<Vec<String>, DemoError> {
    let store_dir = store_dir
        .to_str()
        .ok_or_else(|| fail("temporary directory path is not UTF-8"))?;
    let argv = [
        "wsticket",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--jwks-url",
        jwks_url,
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        "--algorithms",
        "EdDSA",
        "--ticket-ttl",
        &format!("{}s", ticket_ttl.as_secs()),
        "--data-dir",
        store_dir,
    ];
    Ok(argv.iter().map(|arg| arg.to_string()).collect())
}

/// Builds the demo server's configuration through the same flag parsing as
/// `wsticket serve`, so the demo runs exactly what a user would configure.
pub(crate) fn demo_config(argv: &[String]) -> Result<Config, DemoError> {
    let cli = Cli::try_parse_from(argv).map_err(|err| fail(format!("demo flags: {err}")))?;
    let Command::Serve(args) = cli.command else {
        return Err(fail("demo flags do not name serve"));
    };
    Config::from_args(*args).map_err(|err| fail(err.to_string()))
}

pub(crate) async fn wait_ready(http: &reqwest::Client, admin: SocketAddr) -> Result<(), DemoError> {
    for _ in 0..100 {
        if let Ok(response) = http.get(format!("http://{admin}/readyz")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(fail("the server did not become ready within 5 s"))
}

async fn request_ticket(
    http: &reqwest::Client,
    public: SocketAddr,
    token: Option<&str>,
) -> Result<(u16, serde_json::Value), DemoError> {
    let mut request = http.post(format!("http://{public}/websocket/ticket"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|err| fail(format!("ticket request failed: {err}")))?;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

fn ticket_of(body: &serde_json::Value) -> Result<String, DemoError> {
    body.get("ticket")
        .and_then(|ticket| ticket.as_str())
        .map(str::to_owned)
        .ok_or_else(|| fail("the 200 answer has no ticket"))
}

/// Opens `/ws` with a ticket; returns the socket or the rejection's status and error code.
async fn open_socket(
    public: SocketAddr,
    ticket: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    (u16, String),
> {
    match tokio_tungstenite::connect_async(format!("ws://{public}/ws?ticket={ticket}")).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let code = response
                .body()
                .as_ref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .and_then(|body| {
                    body.get("error")
                        .and_then(|e| e.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            Err((response.status().as_u16(), code))
        }
        Err(err) => Err((0, err.to_string())),
    }
}

fn expect_rejection(
    step: &str,
    outcome: Result<impl Sized, (u16, String)>,
    status: u16,
    code: &str,
) -> Result<(), DemoError> {
    match outcome {
        Err((got_status, got_code)) if got_status == status && got_code == code => {
            println!("{step} -> {status} {code}");
            Ok(())
        }
        Err((got_status, got_code)) => Err(fail(format!(
            "{step}: expected {status} {code}, got {got_status} {got_code}"
        ))),
        Ok(_) => Err(fail(format!("{step}: expected {status} {code}, got 101"))),
    }
}

async fn walk_client(
    http: &reqwest::Client,
    issuer: &DemoIssuer,
    public: SocketAddr,
) -> Result<(), DemoError> {
    let (status, body) = request_ticket(http, public, None).await?;
    let code = body.get("error").and_then(|e| e.as_str()).unwrap_or("");
    println!("[1] POST /websocket/ticket without a token -> {status} {code}");
    if status != 401 {
        return Err(fail("a request without a token must get 401"));
    }

    let token = issuer.sign("demo-user", Duration::from_secs(300))?;
    println!("[2] signed a JWT for subject demo-user (EdDSA, kid {KID}, valid 5 min)");

    let (status, body) = request_ticket(http, public, Some(&token)).await?;
    if status != 200 {
        return Err(fail(format!(
            "ticket request with a valid JWT got {status}: {body}"
        )));
    }
    let first = ticket_of(&body)?;
    println!(
        "[3] POST /websocket/ticket with the JWT -> 200: ticket id {} (SHA-256 prefix; the ticket itself is not printed), expires_in {}s",
        ticket::log_id(&ticket::key_of(&first)),
        body.get("expires_in").and_then(|v| v.as_u64()).unwrap_or(0)
    );

    let mut socket = open_socket(public, &first)
        .await
        .map_err(|(status, code)| {
            fail(format!("upgrade with a fresh ticket got {status} {code}"))
        })?;
    println!("[4] GET /ws?ticket=… -> 101 Switching Protocols");
    let greeting = next_text(&mut socket).await?;
    println!("    server says: {greeting}");
    socket
        .send(Message::text("hello over an authenticated WebSocket"))
        .await
        .map_err(|err| fail(format!("send failed: {err}")))?;
    let echo = next_text(&mut socket).await?;
    println!("    sent a message, echoed back: {echo}");
    let _ = socket.close(None).await;

    expect_rejection(
        "[5] GET /ws with the same ticket again (replay)",
        open_socket(public, &first).await,
        403,
        "ticket_already_used",
    )?;

    let (status, body) = request_ticket(http, public, Some(&token)).await?;
    if status != 200 {
        return Err(fail(format!("second ticket request got {status}")));
    }
    let second = ticket_of(&body)?;
    println!(
        "[6] POST /websocket/ticket -> 200: a new ticket; waiting {}s for it to expire unused",
        DEMO_TICKET_TTL.as_secs() + 1
    );
    tokio::time::sleep(DEMO_TICKET_TTL + Duration::from_secs(1)).await;
    expect_rejection(
        "[7] GET /ws with the expired ticket",
        open_socket(public, &second).await,
        401,
        "ticket_expired",
    )?;
    Ok(())
}

async fn next_text<S>(
    socket: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Result<String, DemoError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let next = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .map_err(|_| fail("no frame from the server within 5 s"))?;
    match next {
        Some(Ok(Message::Text(text))) => Ok(text.to_string()),
        other => Err(fail(format!("expected a text frame, got {other:?}"))),
    }
}
