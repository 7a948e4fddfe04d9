//! TLS with certificates made in the test: the public listener with
//! `--tls-cert`/`--tls-key`, its reload on SIGHUP, and a `wss://` upstream
//! verified with `--upstream-ca`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// A self-signed certificate for 127.0.0.1 and localhost.
struct TestCertificate {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl TestCertificate {
    fn new() -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .expect("generate a certificate");
        TestCertificate {
            cert_pem: certified.cert.pem(),
            key_pem: certified.key_pair.serialize_pem(),
            der: certified.cert.der().clone(),
        }
    }

    /// Writes the PEM files into `dir` and returns their paths.
    fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).expect("write certificate");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }

    /// Returns a client TLS configuration that trusts only this certificate.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("add root");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

async fn start_tls(certificate: &TestCertificate) -> (JwksServer, Server, tempfile::TempDir) {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = certificate.write(dir.path());
    let server = Server::start(
        ServerOptions::new(jwks.url(), &dir.path().join("data")).args(&[
            "--tls-cert",
            path_arg(&cert),
            "--tls-key",
            path_arg(&key),
        ]),
    )
    .await;
    (jwks, server, dir)
}

/// Requests a ticket over HTTPS, trusting only `certificate`.
async fn https_ticket(server: &Server, certificate: &TestCertificate) -> String {
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certificate.cert_pem.as_bytes()).expect("PEM"),
        )
        .build()
        .expect("HTTPS client");
    let response = client
        .post(format!("https://{}/websocket/ticket", server.public))
        .bearer_auth(Signer::token("alice"))
        .send()
        .await
        .expect("HTTPS ticket request");
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["ticket"].as_str().expect("ticket").to_owned()
}

type TlsSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `wss://…/ws?ticket=…`, trusting only `certificate`.
async fn wss_connect(
    server: &Server,
    ticket: &str,
    certificate: &TestCertificate,
) -> Result<TlsSocket, tokio_tungstenite::tungstenite::Error> {
    let url = format!("wss://{}/ws?ticket={ticket}", server.public);
    let connector = Connector::Rustls(certificate.client_config());
    tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
        .await
        .map(|(socket, _)| socket)
}

async fn next_text_tls(socket: &mut TlsSocket) -> String {
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

#[tokio::test]
async fn tls_listener_serves_tickets_and_wss() {
    let certificate = TestCertificate::new();
    let (_jwks, server, _dir) = start_tls(&certificate).await;

    let ticket = https_ticket(&server, &certificate).await;
    let mut socket = wss_connect(&server, &ticket, &certificate)
        .await
        .expect("wss upgrade");
    let greeting = next_text_tls(&mut socket).await;
    assert!(greeting.contains("\"subject\":\"alice\""), "{greeting}");
    socket.send(Message::text("over tls")).await.expect("send");
    assert_eq!(next_text_tls(&mut socket).await, "over tls");

    let plain = reqwest::Client::new()
        .post(server.url("/websocket/ticket"))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP must not be served on a TLS port"
    );
    assert!(server.events("tls_disabled").is_empty());
}

#[tokio::test]
async fn sighup_reloads_certificate_keeping_connections() {
    let first = TestCertificate::new();
    let (_jwks, server, dir) = start_tls(&first).await;
    let ticket = https_ticket(&server, &first).await;
    let mut open = wss_connect(&server, &ticket, &first)
        .await
        .expect("wss upgrade");
    next_text_tls(&mut open).await;

    let second = TestCertificate::new();
    second.write(dir.path());
    server.signal("HUP");
    server.wait_event("tls_reloaded").await;

    // New handshakes get the new certificate.
    let ticket = https_ticket(&server, &second).await;
    let mut renewed = wss_connect(&server, &ticket, &second)
        .await
        .expect("wss with the new certificate");
    next_text_tls(&mut renewed).await;
    let stale = wss_connect(&server, &ticket, &first).await;
    assert!(stale.is_err(), "the old certificate is no longer served");

    // The connection opened before the reload still works.
    open.send(Message::text("still here"))
        .await
        .expect("send on the old connection");
    assert_eq!(next_text_tls(&mut open).await, "still here");
}

#[tokio::test]
async fn failed_reload_keeps_certificate() {
    let certificate = TestCertificate::new();
    let (_jwks, server, dir) = start_tls(&certificate).await;
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("break the key");
    server.signal("HUP");
    let failed = server.wait_event("tls_reload_failed").await;
    assert_eq!(failed["level"], "ERROR");
    let ticket = https_ticket(&server, &certificate).await;
    wss_connect(&server, &ticket, &certificate)
        .await
        .expect("the previous certificate is still served");
}

/// Starts a `wss://` upstream on 127.0.0.1:0 that echoes text frames.
async fn start_tls_upstream(certificate: &TestCertificate) -> std::net::SocketAddr {
    let key = PrivateKeyDer::from_pem_slice(certificate.key_pem.as_bytes()).expect("private key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![certificate.der.clone()], key)
    .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind TLS upstream");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn wss_upstream_is_verified_with_upstream_ca() {
    let upstream_certificate = TestCertificate::new();
    let upstream = start_tls_upstream(&upstream_certificate).await;
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, &upstream_certificate.cert_pem).expect("write CA");
    let url = format!("wss://{upstream}/");

    let trusting = Server::start(
        ServerOptions::new(jwks.url(), &dir.path().join("trusting")).args(&[
            "--upstream",
            &url,
            "--upstream-ca",
            path_arg(&ca),
        ]),
    )
    .await;
    let ticket = ticket_for(&trusting, &Signer::token("alice")).await;
    let mut socket = connect_with_ticket(&trusting, &ticket)
        .await
        .expect("relayed to the wss upstream");
    socket.send(Message::text("secure")).await.expect("send");
    assert_eq!(next_text(&mut socket).await, "secure");

    // Without --upstream-ca the self-signed upstream is not trusted.
    let default_roots = Server::start(
        ServerOptions::new(jwks.url(), &dir.path().join("default")).args(&["--upstream", &url]),
    )
    .await;
    let ticket = ticket_for(&default_roots, &Signer::token("alice")).await;
    let rejection = connect_with_ticket(&default_roots, &ticket)
        .await
        .expect_err("untrusted upstream");
    assert_eq!(rejection.status, 502);
    assert_eq!(rejection.code, "upstream_unavailable");
}
