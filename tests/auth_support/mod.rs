//! Helpers of the auth tests: a small HTTP server on 127.0.0.1 that serves
//! JWKS documents (or introspection responses) and can fail on request, token
//! signing with the fixture keys, and verifiers built from the library.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use wsticket::auth::breaker::BreakerSettings;
use wsticket::auth::cache::DEFAULT_CACHE_BYTES;
use wsticket::auth::keys::{JwksGauges, KeyStoreSettings};
use wsticket::auth::verify::VerifierSettings;
use wsticket::auth::{IssuerKeys, KeyStore, Verifier};
use wsticket::clock::{ManualClock, SharedClock};
use wsticket::config::{JwksSource, TokenKind};
use wsticket::metrics::Metrics;

pub const AUDIENCE: &str = "app";
pub const ISSUER: &str = "https://idp.example";

/// A request as the test server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// What the server does with the next requests.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with this body and, if set, this `Cache-Control`.
    Serve {
        body: String,
        cache_control: Option<String>,
    },
    /// A bare status with an empty body.
    Status(u16),
    /// Accepts the request and never responds.
    Hang,
}

type Answer = Arc<dyn Fn(&SeenRequest) -> Behaviour + Send + Sync>;

/// An HTTP/1.1 server on 127.0.0.1:0 that responds to every request by
/// `Behaviour`, counts the requests it read and keeps them.
pub struct TestServer {
    pub url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    answer: Arc<Mutex<Option<Answer>>>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let behaviour = Arc::new(Mutex::new(behaviour));
        let answer: Arc<Mutex<Option<Answer>>> = Arc::new(Mutex::new(None));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (behaviour, answer, requests, seen) = (
                behaviour.clone(),
                answer.clone(),
                requests.clone(),
                seen.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (behaviour, answer, requests, seen) = (
                        behaviour.clone(),
                        answer.clone(),
                        requests.clone(),
                        seen.clone(),
                    );
                    tokio::spawn(async move {
                        let _ = handle(stream, behaviour, answer, requests, seen).await;
                    });
                }
            })
        };
        TestServer {
            url: format!("http://{addr}/jwks.json"),
            behaviour,
            answer,
            requests,
            seen,
            task,
        }
    }

    /// Serves a JWKS document with no `Cache-Control`.
    pub async fn serving(body: String) -> TestServer {
        TestServer::start(Behaviour::Serve {
            body,
            cache_control: None,
        })
        .await
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("behaviour lock") = behaviour;
    }

    pub fn serve(&self, body: String) {
        self.set(Behaviour::Serve {
            body,
            cache_control: None,
        });
    }

    /// Answers each request by a function of the request.
    pub fn answer_with(&self, answer: impl Fn(&SeenRequest) -> Behaviour + Send + Sync + 'static) {
        *self.answer.lock().expect("answer lock") = Some(Arc::new(answer));
    }

    /// Requests read so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Stops accepting: new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    mut stream: TcpStream,
    behaviour: Arc<Mutex<Behaviour>>,
    answer: Arc<Mutex<Option<Answer>>>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[header_end..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    let request = SeenRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    };
    requests.fetch_add(1, Ordering::SeqCst);
    seen.lock().expect("seen lock").push(request.clone());

    let custom = answer.lock().expect("answer lock").clone();
    let behaviour = match custom {
        Some(answer) => answer(&request),
        None => behaviour.lock().expect("behaviour lock").clone(),
    };
    let response = match behaviour {
        Behaviour::Serve {
            body,
            cache_control,
        } => {
            let cache = cache_control
                .map(|value| format!("cache-control: {value}\r\n"))
                .unwrap_or_default();
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{cache}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Behaviour::Status(code) => {
            format!("HTTP/1.1 {code} Status\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        }
        Behaviour::Hang => {
            // Bounded: far past any timeout a test sets, then the task ends.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return Ok(());
        }
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Path of a file under tests/fixtures/jwks.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwks")
        .join(name)
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).expect("fixture file")
}

/// The encoding key of a fixture private key: `rsa-a`, `rsa-b`, `rsa-rot`,
/// `ec256`, `ec384` or `ed25519`.
pub fn signing_key(name: &str) -> EncodingKey {
    let pem = std::fs::read(fixture_path(&format!("keys/{name}.pem"))).expect("key file");
    match name {
        "ec256" | "ec384" => EncodingKey::from_ec_pem(&pem).expect("EC key"),
        "ed25519" => EncodingKey::from_ed_pem(&pem).expect("Ed25519 key"),
        _ => EncodingKey::from_rsa_pem(&pem).expect("RSA key"),
    }
}

/// Claims valid for an hour from `now_secs`.
pub fn claims(issuer: &str, now_secs: u64) -> Value {
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now_secs,
        "exp": now_secs + 3600,
    })
}

/// Signs `claims` with the fixture key `key`.
pub fn sign(alg: Algorithm, kid: Option<&str>, key: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &signing_key(key)).expect("signing works")
}

/// Returns a manual clock at the real current time, so tokens look fresh.
pub fn clock() -> ManualClock {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    ManualClock::new(now.as_millis() as u64)
}

/// Key store settings for tests: short intervals, a breaker that opens
/// after two failures for 200 ms.
pub fn store_settings(url: &str, issuer: &str) -> KeyStoreSettings {
    KeyStoreSettings {
        refetch_interval: Duration::from_millis(500),
        refresh_min: Duration::from_secs(1),
        refresh_max: Duration::from_secs(60),
        timeout: Duration::from_millis(500),
        retry_min: Duration::from_millis(100),
        breaker: BreakerSettings {
            failures: 2,
            open_min: Duration::from_millis(200),
            open_max: Duration::from_millis(400),
        },
        ..KeyStoreSettings::new(JwksSource::Url(url.parse().expect("test URL")), issuer)
    }
}

pub fn verifier_settings(algorithms: &[Algorithm]) -> VerifierSettings {
    VerifierSettings {
        audiences: vec![AUDIENCE.to_string()],
        algorithms: algorithms.to_vec(),
        leeway: Duration::from_secs(30),
        token_kind: TokenKind::Jwt,
        cache_max_bytes: DEFAULT_CACHE_BYTES,
    }
}

pub const ALL_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A verifier of one issuer whose keys come from `settings`.
pub struct Setup {
    pub verifier: Verifier,
    pub store: Arc<KeyStore>,
    pub clock: ManualClock,
    pub metrics: Arc<Metrics>,
}

pub fn one_issuer(
    settings: KeyStoreSettings,
    algorithms: &[Algorithm],
    clock: ManualClock,
) -> Setup {
    let metrics = Arc::new(Metrics::new());
    let shared: SharedClock = Arc::new(clock.clone());
    let gauges = JwksGauges::new(metrics.clone());
    let store = Arc::new(KeyStore::new(settings, shared.clone(), gauges));
    let mut issuers = IssuerKeys::new();
    issuers
        .add(vec![ISSUER.to_string()], store.clone())
        .expect("one issuer");
    let verifier = Verifier::new(verifier_settings(algorithms), issuers, None, shared);
    Setup {
        verifier,
        store,
        clock,
        metrics,
    }
}

/// Log lines captured from `tracing` in JSON, one event a line.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Returns the log of this test binary, installing it as the global
    /// subscriber on first use. It is global because a thread-local
    /// subscriber misses events while other tests register the same
    /// callsites on other threads. Tests tell their lines apart by a label
    /// of their own, such as the key store's issuer.
    pub fn global() -> &'static CapturedLogs {
        static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = CapturedLogs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
            logs
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).to_string()
    }

    /// Returns the lines that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
