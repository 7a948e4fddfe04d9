//! The flags of the gateway, the redeem API, TLS and the upgrade limits,
//! flattened into `wsticket serve` and validated into [`GatewayConfig`].
//!
//! Like every `serve` flag, each one can also be set as `WSTICKET_<FLAG>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use url::Url;

use crate::config::ConfigError;
use crate::http::redeem::AdminToken;

/// How a failing upgrade is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RejectWith {
    /// An HTTP error status with a JSON body, before any `101`.
    Http,
    /// A `101`, then at once a close frame with code 4000 + the HTTP status
    /// and a JSON reason, because browsers cannot read a rejected upgrade's
    /// status.
    Close,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// WebSocket URL (ws:// or wss://) that authenticated connections are
    /// relayed to. Unset: the server echoes frames, for development.
    #[arg(long, env = "WSTICKET_UPSTREAM")]
    pub upstream: Option<String>,

    /// PEM file of the CA certificates that verify a wss:// upstream, in
    /// place of the built-in Mozilla root set.
    #[arg(long, env = "WSTICKET_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// JWT claim copied into the upstream's X-Auth-Claims header; repeat for
    /// several.
    #[arg(
        long = "forward-claim",
        env = "WSTICKET_FORWARD_CLAIM",
        value_delimiter = ','
    )]
    pub forward_claims: Vec<String>,

    /// Time without a frame from the client or the upstream after which a
    /// connection is closed. The server's own keepalive pings do not count.
    #[arg(long, env = "WSTICKET_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Close a connection with 4401 token_expired when the JWT that obtained
    /// its ticket expires.
    #[arg(long, env = "WSTICKET_CLOSE_ON_TOKEN_EXPIRY")]
    pub close_on_token_expiry: bool,

    /// How long shutdown waits for open connections after sending them close
    /// 1001.
    #[arg(long, env = "WSTICKET_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// How a failing upgrade is rejected: an HTTP status, or a 101 followed
    /// by a close frame with code 4000 + that status.
    #[arg(long, env = "WSTICKET_REJECT_WITH", value_enum, default_value_t = RejectWith::Http)]
    pub reject_with: RejectWith,

    /// File holding the bearer token of the redeem API on the admin listener;
    /// surrounding whitespace is ignored. Unset: the redeem API is disabled.
    #[arg(long, env = "WSTICKET_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain of the public listener; with --tls-key it
    /// serves TLS only. Reloaded on SIGHUP.
    #[arg(long, env = "WSTICKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert. Reloaded on SIGHUP.
    #[arg(long, env = "WSTICKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Failed upgrades allowed per client IP address per minute before
    /// further upgrades from it get 429 rate_limited; 0 turns the limit off.
    #[arg(
        long,
        env = "WSTICKET_MAX_FAILED_UPGRADES_PER_MINUTE",
        default_value_t = 60
    )]
    pub max_failed_upgrades_per_minute: u32,

    /// Open connections allowed per subject (JWT sub); unset means no limit.
    #[arg(long, env = "WSTICKET_MAX_CONNECTIONS_PER_SUBJECT")]
    pub max_connections_per_subject: Option<u32>,
}

/// The certificate and key files of the public listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated values of [`GatewayArgs`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub upstream: Option<Url>,
    /// The certificates of `--upstream-ca`, read at start.
    pub upstream_ca: Option<Vec<CertificateDer<'static>>>,
    pub forward_claims: Vec<String>,
    pub idle_timeout: Duration,
    pub close_on_token_expiry: bool,
    pub shutdown_timeout: Duration,
    pub reject_with: RejectWith,
    pub admin_token: Option<AdminToken>,
    pub tls: Option<TlsFiles>,
    /// `None` when the limit is off.
    pub max_failed_upgrades_per_minute: Option<u32>,
    pub max_connections_per_subject: Option<u32>,
}

fn invalid(flag: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        value: value.into(),
        reason: reason.into(),
    }
}

impl GatewayConfig {
    pub fn from_args(args: GatewayArgs) -> Result<Self, ConfigError> {
        let upstream = args.upstream.as_deref().map(parse_upstream).transpose()?;
        if args.upstream_ca.is_some() && upstream.is_none() {
            return Err(invalid(
                "upstream-ca",
                "",
                "only applies with --upstream wss://…",
            ));
        }
        let upstream_ca = args.upstream_ca.as_deref().map(read_ca).transpose()?;
        let forward_claims: Vec<String> = args
            .forward_claims
            .into_iter()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        if args.idle_timeout.is_zero() {
            return Err(invalid("idle-timeout", "0s", "must be longer than zero"));
        }
        if args.max_connections_per_subject == Some(0) {
            return Err(invalid(
                "max-connections-per-subject",
                "0",
                "must be at least 1; leave it unset for no limit",
            ));
        }
        let admin_token = args
            .admin_token_file
            .as_deref()
            .map(|path| {
                AdminToken::read(path).map_err(|reason| {
                    invalid("admin-token-file", path.display().to_string(), reason)
                })
            })
            .transpose()?;
        let tls = match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "tls-cert",
                    "",
                    "give both --tls-cert and --tls-key",
                ))
            }
        };
        Ok(GatewayConfig {
            upstream,
            upstream_ca,
            forward_claims,
            idle_timeout: args.idle_timeout,
            close_on_token_expiry: args.close_on_token_expiry,
            shutdown_timeout: args.shutdown_timeout,
            reject_with: args.reject_with,
            admin_token,
            tls,
            max_failed_upgrades_per_minute: Some(args.max_failed_upgrades_per_minute)
                .filter(|&limit| limit > 0),
            max_connections_per_subject: args.max_connections_per_subject,
        })
    }
}

/// Reads the PEM certificates of `--upstream-ca`.
fn read_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let shown = path.display().to_string();
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|err| invalid("upstream-ca", &shown, err.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &certificates {
        roots
            .add(certificate.clone())
            .map_err(|err| invalid("upstream-ca", &shown, err.to_string()))?;
    }
    if certificates.is_empty() {
        return Err(invalid(
            "upstream-ca",
            shown,
            "the file has no PEM certificate",
        ));
    }
    Ok(certificates)
}

/// Parses `--upstream`: a ws:// or wss:// URL with a host and no fragment.
fn parse_upstream(raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|err| invalid("upstream", raw, err.to_string()))?;
    if !matches!(url.scheme(), "ws" | "wss") {
        return Err(invalid(
            "upstream",
            raw,
            format!("the scheme must be ws or wss, not {}", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("upstream", raw, "the URL has no host"));
    }
    if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "upstream",
            raw,
            "the URL must have no fragment and no user name or password",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_scheme_must_be_websocket() {
        assert!(parse_upstream("ws://127.0.0.1:9000/app").is_ok());
        assert!(parse_upstream("wss://app.example/socket?x=1").is_ok());
        let err = parse_upstream("http://127.0.0.1:9000/").expect_err("http");
        assert!(err.to_string().contains("ws or wss"), "{err}");
        assert!(parse_upstream("ws://user:pw@127.0.0.1/").is_err());
        assert!(parse_upstream("not a url").is_err());
    }
}
