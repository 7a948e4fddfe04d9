//! TLS of the public listener, with rustls, and its reload on SIGHUP.
//!
//! warp 0.4 has no TLS of its own, so the accept loop in [`crate::server`]
//! wraps each accepted TCP stream with the acceptor from here before handing
//! it to hyper. rustls asks a resolver for the certificate at every new
//! handshake, so a reload swaps it for new connections while open
//! connections keep the session they negotiated. A reload that fails keeps
//! the previous certificate.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::gateway::settings::TlsFiles;

/// Maximum time a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure to load the certificate or the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path} (--tls-cert): {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read the private key {path} (--tls-key): {reason}")]
    Key { path: String, reason: String },
    #[error("the key {key} does not fit the certificate {cert}: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
}

/// The public listener's TLS: the acceptor and the reloadable certificate.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    resolver: Arc<CurrentCertificate>,
    acceptor: TlsAcceptor,
}

/// The certificate handed to every new handshake.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(current.clone())
    }
}

impl Tls {
    /// Loads the certificate and key of `files`.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certified = load_certified_key(files, &provider)?;
        let resolver = Arc::new(CurrentCertificate(RwLock::new(Arc::new(certified))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // Only HTTP/1.1: the WebSocket upgrade needs it (RFC 8441 WebSockets
        // over HTTP/2 are not supported).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            files: files.clone(),
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the certificate and key files again and uses them for new
    /// handshakes. On error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let certified = load_certified_key(&self.files, &self.provider)?;
        let mut current = self
            .resolver
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = Arc::new(certified);
        Ok(())
    }

    /// Runs the TLS handshake on an accepted connection.
    pub async fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

fn load_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_path = display(&files.cert);
    let key_path = display(&files.key);
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|err| TlsError::Certificate {
            path: cert_path.clone(),
            reason: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_path,
            reason: "the file has no PEM certificate".into(),
        });
    }
    // The error names the path only: a key's content never goes to a log.
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|err| TlsError::Key {
        path: key_path.clone(),
        reason: err.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|err| TlsError::Mismatch {
        cert: cert_path,
        key: key_path,
        reason: err.to_string(),
    })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Reloads `tls` on every SIGHUP until the process ends.
#[cfg(unix)]
pub async fn reload_on_sighup(tls: Arc<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::error!(event = "tls_reload_unavailable", error = %err, "cannot listen for SIGHUP; the certificate will not be reloaded");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => {
                tracing::info!(event = "tls_reloaded", cert = %tls.files.cert.display(), "TLS certificate reloaded")
            }
            Err(err) => {
                tracing::error!(event = "tls_reload_failed", error = %err, "TLS certificate reload failed; the previous certificate stays in use")
            }
        }
    }
}
