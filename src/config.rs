//! Command-line flags and environment variables, turned into one validated
//! [`Config`].
//!
//! Every `serve` flag can also be set as `WSTICKET_<FLAG>` (for example
//! `WSTICKET_JWKS_URL`); repeatable flags take a comma-separated list there.
//! Validation happens once, here, so the rest of the server works with typed
//! values and a bad value is reported at start naming the flag and the value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use jsonwebtoken::Algorithm;
use url::Url;

use crate::cluster::{ClusterArgs, ClusterConfig};
use crate::gateway::settings::{GatewayArgs, GatewayConfig};

/// Largest bearer token accepted, in bytes. Keycloak and Entra ID tokens that
/// carry many roles reach 16 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `--ticket-ttl` accepted.
const MAX_TICKET_TTL: Duration = Duration::from_secs(3600);
/// Longest `--expired-grace` accepted.
const MAX_EXPIRED_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Parser)]
#[command(
    name = "wsticket",
    version,
    about = "Trades JWTs for single-use WebSocket tickets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ticket server.
    Serve(Box<ServeArgs>),
    /// Walk a client through JWT -> ticket -> WebSocket on this machine, with a
    /// throwaway key pair and a temporary data directory.
    Demo(DemoArgs),
    /// Inspect or compact a stopped server's ticket store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Print how many records the store holds, by state, and its size on disk.
    /// Ticket values are never printed (the store does not contain them).
    Inspect(StoreArgs),
    /// Drop records past their grace window and rewrite the store into a new
    /// directory, which gives the space of deleted records back to the disk.
    Compact(StoreArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory of the ticket store. The server must not be running on it.
    #[arg(long, env = "WSTICKET_DATA_DIR", default_value = "./wsticket-data")]
    pub data_dir: PathBuf,

    /// How long expired records are kept, as for `serve`.
    #[arg(long, env = "WSTICKET_EXPIRED_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub expired_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    Dev,
    Staging,
    Prod,
}

impl Profile {
    pub fn default_ticket_ttl(self) -> Duration {
        match self {
            Profile::Dev => Duration::from_secs(60),
            Profile::Staging | Profile::Prod => Duration::from_secs(30),
        }
    }
}

/// Kind of bearer token, which decides how it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenKind {
    /// Every token is a JWT verified against its issuer's JWKS.
    Jwt,
    /// Every token is checked with token introspection.
    Opaque,
    /// JWTs are verified against the JWKS; other tokens go to introspection
    /// when an introspection URL is set, and are rejected otherwise.
    Auto,
}

/// When writes to the ticket store reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// Every issuance and consumption is flushed before the response;
    /// concurrent requests share one flush.
    Always,
    /// Consumptions are flushed before the response, issuances at most
    /// `--sync-interval` later: a kill -9 can lose tickets issued in that window.
    Batched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

const DEFAULT_ALGORITHMS: &str = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA";

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("jwks").args(["jwks_url", "jwks_file"]).requires("issuers")))]
#[command(group(
    clap::ArgGroup::new("key_source")
        .required(true)
        .multiple(true)
        .args(["jwks_url", "jwks_file", "trusted_issuers"])
))]
pub struct ServeArgs {
    /// Address of the public listener (ticket endpoint and WebSocket upgrade).
    #[arg(long, env = "WSTICKET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "WSTICKET_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// URL of the identity provider's JWKS, fetched at start and refreshed.
    #[arg(long, env = "WSTICKET_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Path of a JWKS file, read at start and reread on the refresh schedule.
    #[arg(long, env = "WSTICKET_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Accepted `iss` claim verified with --jwks-url or --jwks-file; repeat
    /// for several issuers sharing that JWKS. A token must match one.
    #[arg(
        long = "issuer",
        env = "WSTICKET_ISSUER",
        requires = "jwks",
        value_delimiter = ','
    )]
    pub issuers: Vec<String>,

    /// A trusted issuer and its own JWKS URL, as ISSUER=JWKS_URL (split at
    /// the first '='); repeat for several. A token is only verified with the
    /// keys of the issuer its `iss` names.
    #[arg(
        long = "trusted-issuer",
        env = "WSTICKET_TRUSTED_ISSUER",
        value_delimiter = ','
    )]
    pub trusted_issuers: Vec<String>,

    /// Accepted `aud` value; repeat for several. A token must contain one.
    #[arg(
        long = "audience",
        env = "WSTICKET_AUDIENCE",
        required = true,
        value_delimiter = ','
    )]
    pub audiences: Vec<String>,

    /// Allowed JWS algorithms, comma-separated.
    #[arg(long, env = "WSTICKET_ALGORITHMS", default_value = DEFAULT_ALGORITHMS, value_delimiter = ',')]
    pub algorithms: Vec<String>,

    /// Clock skew allowed on exp, nbf and iat (for example 30s).
    #[arg(long, env = "WSTICKET_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub leeway: Duration,

    /// Deployment profile; sets defaults such as the ticket TTL.
    #[arg(long, env = "WSTICKET_PROFILE", value_enum, default_value_t = Profile::Prod)]
    pub profile: Profile,

    /// Ticket lifetime (for example 30s or 2m); overrides the profile's.
    #[arg(long, env = "WSTICKET_TICKET_TTL", value_parser = humantime::parse_duration)]
    pub ticket_ttl: Option<Duration>,

    /// How long an expired ticket is remembered, so it is reported as
    /// ticket_expired rather than invalid_ticket.
    #[arg(long, env = "WSTICKET_EXPIRED_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub expired_grace: Duration,

    /// Directory of the embedded ticket store.
    #[arg(long, env = "WSTICKET_DATA_DIR", default_value = "./wsticket-data")]
    pub data_dir: PathBuf,

    /// When store writes reach the disk: always (before the response) or batched.
    #[arg(long, env = "WSTICKET_SYNC", value_enum, default_value_t = SyncMode::Always)]
    pub sync: SyncMode,

    /// Maximum delay before an issuance is flushed under --sync batched.
    #[arg(long, env = "WSTICKET_SYNC_INTERVAL", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub sync_interval: Duration,

    /// Tickets per user (JWT sub) per minute.
    #[arg(long, env = "WSTICKET_RATE_LIMIT", default_value_t = 60)]
    pub rate_limit: u32,

    /// Origin allowed to call the ticket endpoint (CORS) and to open WebSockets;
    /// repeat for several. Unset: no CORS, and any Origin may upgrade.
    #[arg(
        long = "allowed-origin",
        env = "WSTICKET_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Log output format.
    #[arg(long, env = "WSTICKET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Realm named in WWW-Authenticate challenges.
    #[arg(long, env = "WSTICKET_REALM")]
    pub realm: Option<String>,

    /// Minimum time between two JWKS fetches caused by unknown key ids.
    #[arg(long, env = "WSTICKET_JWKS_REFETCH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwks_refetch_interval: Duration,

    /// Minimum background refresh interval, whatever Cache-Control sets.
    #[arg(long, env = "WSTICKET_JWKS_REFRESH_MIN", default_value = "1m", value_parser = humantime::parse_duration)]
    pub jwks_refresh_min: Duration,

    /// Maximum background refresh interval, whatever Cache-Control sets.
    #[arg(long, env = "WSTICKET_JWKS_REFRESH_MAX", default_value = "1h", value_parser = humantime::parse_duration)]
    pub jwks_refresh_max: Duration,

    /// Timeout of one JWKS fetch or introspection request, connection
    /// included.
    #[arg(long, env = "WSTICKET_JWKS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwks_timeout: Duration,

    /// How long the last good keys keep verifying after the last successful
    /// JWKS fetch; after that the issuer's tokens get auth_unavailable.
    #[arg(long, env = "WSTICKET_JWKS_MAX_STALE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub jwks_max_stale: Duration,

    /// Kind of bearer token: jwt (JWKS only), opaque (introspection only) or
    /// auto (JWTs to the JWKS, other tokens to introspection when configured).
    #[arg(long, env = "WSTICKET_TOKEN_KIND", value_enum, default_value_t = TokenKind::Auto)]
    pub token_kind: TokenKind,

    /// URL of the RFC 7662 token introspection endpoint for opaque tokens.
    #[arg(
        long,
        env = "WSTICKET_INTROSPECTION_URL",
        requires_all = ["introspection_client_id", "introspection_client_secret_file"]
    )]
    pub introspection_url: Option<String>,

    /// Client id sent to the introspection endpoint (HTTP Basic).
    #[arg(
        long,
        env = "WSTICKET_INTROSPECTION_CLIENT_ID",
        requires = "introspection_url"
    )]
    pub introspection_client_id: Option<String>,

    /// File holding the client secret for the introspection endpoint;
    /// surrounding whitespace is ignored.
    #[arg(
        long,
        env = "WSTICKET_INTROSPECTION_CLIENT_SECRET_FILE",
        requires = "introspection_url"
    )]
    pub introspection_client_secret_file: Option<PathBuf>,

    /// Maximum time an introspection response is reused; the token's exp may
    /// end it sooner.
    #[arg(long, env = "WSTICKET_INTROSPECTION_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub introspection_cache_ttl: Duration,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long, env = "WSTICKET_MAX_MESSAGE_SIZE", default_value_t = 1024 * 1024)]
    pub max_message_size: usize,

    /// Time a client has from connecting to the end of its request headers
    /// (and for the TLS handshake); slower connections are closed.
    #[arg(long, env = "WSTICKET_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Interval of the server's keepalive pings on open WebSockets.
    #[arg(long, env = "WSTICKET_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// The gateway, redeem API, TLS and upgrade limit flags.
    #[command(flatten)]
    pub gateway: GatewayArgs,

    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Log format of the embedded server's output (hidden unless --verbose).
    #[arg(long)]
    pub verbose: bool,

    /// Serve a page on loopback that logs in with the demo issuer and keeps a
    /// live WebSocket through the browser client, until Ctrl-C.
    #[arg(long)]
    pub browser: bool,
}

/// Where the verification keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    Url(Url),
    File(PathBuf),
}

/// An issuer with its own JWKS.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub jwks: JwksSource,
}

/// A secret read from a file, kept out of `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// Returns the secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Introspection endpoint and client credentials for opaque tokens.
#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    pub url: Url,
    pub client_id: String,
    pub client_secret: Secret,
    pub cache_ttl: Duration,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The JWKS of the one-issuer short form, shared by every `issuers`
    /// entry.
    pub jwks: Option<JwksSource>,
    pub issuers: Vec<String>,
    pub trusted_issuers: Vec<TrustedIssuer>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub ticket_ttl: Duration,
    pub expired_grace: Duration,
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    pub sync_interval: Duration,
    pub rate_limit_per_minute: u32,
    pub allowed_origins: Vec<String>,
    pub log_format: LogFormat,
    pub realm: Option<String>,
    pub jwks_refetch_interval: Duration,
    pub jwks_refresh_min: Duration,
    pub jwks_refresh_max: Duration,
    pub jwks_timeout: Duration,
    pub jwks_max_stale: Duration,
    pub token_kind: TokenKind,
    pub introspection: Option<IntrospectionConfig>,
    pub max_message_size: usize,
    pub header_timeout: Duration,
    pub ping_interval: Duration,
    pub gateway: GatewayConfig,
    /// `None` unless `--cluster-listen` is given.
    pub cluster: Option<ClusterConfig>,
}

/// A flag value that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for --{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

pub(crate) fn invalid(
    flag: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError {
        flag,
        value: value.into(),
        reason: reason.into(),
    }
}

impl Config {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let jwks = match (args.jwks_url, args.jwks_file) {
            (Some(raw), None) => Some(JwksSource::Url(parse_url("jwks-url", &raw)?)),
            (None, Some(path)) => Some(JwksSource::File(path)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwks-url",
                    "",
                    "give exactly one of --jwks-url and --jwks-file",
                ))
            }
        };
        let trusted_issuers = args
            .trusted_issuers
            .iter()
            .map(|raw| parse_trusted_issuer(raw))
            .collect::<Result<Vec<_>, _>>()?;
        let issuers = match jwks {
            Some(_) => non_empty_list("issuer", args.issuers)?,
            None if trusted_issuers.is_empty() => {
                return Err(invalid(
                    "trusted-issuer",
                    "",
                    "give --trusted-issuer, or --issuer with --jwks-url or --jwks-file",
                ))
            }
            None => Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        for issuer in issuers
            .iter()
            .chain(trusted_issuers.iter().map(|trusted| &trusted.issuer))
        {
            if !seen.insert(issuer.as_str()) {
                return Err(invalid(
                    "trusted-issuer",
                    issuer.as_str(),
                    "the issuer is given twice; each issuer has one JWKS",
                ));
            }
        }
        let introspection = introspection_config(
            args.introspection_url,
            args.introspection_client_id,
            args.introspection_client_secret_file,
            args.introspection_cache_ttl,
        )?;
        if args.token_kind == TokenKind::Opaque && introspection.is_none() {
            return Err(invalid(
                "token-kind",
                "opaque",
                "opaque tokens need --introspection-url",
            ));
        }
        let audiences = non_empty_list("audience", args.audiences)?;
        let algorithms = args
            .algorithms
            .iter()
            .map(|name| parse_algorithm(name))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(invalid("algorithms", "", "name at least one algorithm"));
        }

        let ticket_ttl = args
            .ticket_ttl
            .unwrap_or_else(|| args.profile.default_ticket_ttl());
        if ticket_ttl > MAX_TICKET_TTL {
            return Err(invalid(
                "ticket-ttl",
                humantime::format_duration(ticket_ttl).to_string(),
                "a ticket lives at most 1h; tickets are meant to open a WebSocket right away",
            ));
        }
        if args.expired_grace > MAX_EXPIRED_GRACE {
            return Err(invalid(
                "expired-grace",
                humantime::format_duration(args.expired_grace).to_string(),
                "must be at most 7d",
            ));
        }
        if ticket_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "ticket-ttl",
                humantime::format_duration(ticket_ttl).to_string(),
                "the ticket lifetime must be at least 1s",
            ));
        }
        if args.sync_interval.is_zero() || args.sync_interval > Duration::from_secs(1) {
            return Err(invalid(
                "sync-interval",
                humantime::format_duration(args.sync_interval).to_string(),
                "must be between 1ms and 1s",
            ));
        }
        if args.rate_limit == 0 {
            return Err(invalid(
                "rate-limit",
                "0",
                "must be at least 1 ticket per minute",
            ));
        }
        if args.jwks_refresh_min > args.jwks_refresh_max {
            return Err(invalid(
                "jwks-refresh-min",
                humantime::format_duration(args.jwks_refresh_min).to_string(),
                "must not exceed --jwks-refresh-max",
            ));
        }
        if args.jwks_max_stale < args.jwks_refresh_max {
            return Err(invalid(
                "jwks-max-stale",
                humantime::format_duration(args.jwks_max_stale).to_string(),
                "must be at least --jwks-refresh-max, or keys expire between two refreshes",
            ));
        }
        if args.jwks_timeout.is_zero() {
            return Err(invalid("jwks-timeout", "0s", "must be longer than zero"));
        }
        if args.listen == args.admin_listen && args.listen.port() != 0 {
            return Err(invalid(
                "admin-listen",
                args.admin_listen.to_string(),
                "must differ from --listen",
            ));
        }
        if args.header_timeout.is_zero() {
            return Err(invalid("header-timeout", "0s", "must be longer than zero"));
        }
        if args.ping_interval.is_zero() {
            return Err(invalid("ping-interval", "0s", "must be longer than zero"));
        }
        if args.max_message_size < 1024 {
            return Err(invalid(
                "max-message-size",
                args.max_message_size.to_string(),
                "must be at least 1024 bytes",
            ));
        }

        let allowed_origins = args
            .allowed_origins
            .iter()
            .map(|origin| normalize_origin(origin))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Config {
            listen: args.listen,
            admin_listen: args.admin_listen,
            jwks,
            issuers,
            trusted_issuers,
            audiences,
            algorithms,
            leeway: args.leeway,
            ticket_ttl,
            expired_grace: args.expired_grace,
            data_dir: args.data_dir,
            sync: args.sync,
            sync_interval: args.sync_interval,
            rate_limit_per_minute: args.rate_limit,
            allowed_origins,
            log_format: args.log_format,
            realm: args.realm,
            jwks_refetch_interval: args.jwks_refetch_interval,
            jwks_refresh_min: args.jwks_refresh_min,
            jwks_refresh_max: args.jwks_refresh_max,
            jwks_timeout: args.jwks_timeout,
            jwks_max_stale: args.jwks_max_stale,
            token_kind: args.token_kind,
            introspection,
            max_message_size: args.max_message_size,
            header_timeout: args.header_timeout,
            ping_interval: args.ping_interval,
            gateway: GatewayConfig::from_args(args.gateway)?,
            cluster: ClusterConfig::from_args(args.cluster)?,
        })
    }
}

fn parse_url(flag: &'static str, raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|err| invalid(flag, raw, err.to_string()))?;
    match url.scheme() {
        "https" | "http" => Ok(url),
        other => Err(invalid(
            flag,
            raw,
            format!("the scheme must be https or http, not {other}"),
        )),
    }
}

/// Parses `ISSUER=JWKS_URL`, split at the first `=` because JWKS URLs may
/// carry `=` in their query.
fn parse_trusted_issuer(raw: &str) -> Result<TrustedIssuer, ConfigError> {
    let (issuer, url) = raw.split_once('=').ok_or_else(|| {
        invalid(
            "trusted-issuer",
            raw,
            "expected ISSUER=JWKS_URL, for example https://idp.example=https://idp.example/jwks",
        )
    })?;
    if issuer.trim().is_empty() {
        return Err(invalid("trusted-issuer", raw, "the issuer is empty"));
    }
    Ok(TrustedIssuer {
        issuer: issuer.trim().to_string(),
        jwks: JwksSource::Url(parse_url("trusted-issuer", url.trim())?),
    })
}

fn introspection_config(
    url: Option<String>,
    client_id: Option<String>,
    secret_file: Option<PathBuf>,
    cache_ttl: Duration,
) -> Result<Option<IntrospectionConfig>, ConfigError> {
    let Some(raw_url) = url else {
        return Ok(None);
    };
    let url = parse_url("introspection-url", &raw_url)?;
    let client_id = client_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| invalid("introspection-client-id", "", "give a non-empty client id"))?;
    let secret_file = secret_file.ok_or_else(|| {
        invalid(
            "introspection-client-secret-file",
            "",
            "give the path of the client secret file",
        )
    })?;
    let path = secret_file.display().to_string();
    // Only the path and the I/O error are reported, never the file's content.
    let content = std::fs::read_to_string(&secret_file)
        .map_err(|err| invalid("introspection-client-secret-file", &path, err.to_string()))?;
    let secret = content.trim();
    if secret.is_empty() {
        return Err(invalid(
            "introspection-client-secret-file",
            path,
            "the file is empty",
        ));
    }
    Ok(Some(IntrospectionConfig {
        url,
        client_id,
        client_secret: Secret::new(secret.to_string()),
        cache_ttl,
    }))
}

fn non_empty_list(flag: &'static str, values: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
    if values.is_empty() {
        return Err(invalid(flag, "", "give at least one non-empty value"));
    }
    Ok(values)
}

/// Parses one JWS algorithm name. Symmetric (HS*) algorithms are rejected:
/// the server only verifies with public keys from a JWKS, and accepting HS256
/// would let a token signed with a public key as the HMAC secret pass.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, ConfigError> {
    let algorithm = match name.trim() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "HS256" | "HS384" | "HS512" => {
            return Err(invalid(
                "algorithms",
                name,
                "symmetric algorithms are not supported; keys come from a JWKS of public keys",
            ))
        }
        _ => {
            return Err(invalid(
                "algorithms",
                name,
                format!("unknown algorithm; choose from {DEFAULT_ALGORITHMS}"),
            ))
        }
    };
    Ok(algorithm)
}

/// Normalises an origin to `scheme://host[:port]`, the form browsers send.
pub fn normalize_origin(raw: &str) -> Result<String, ConfigError> {
    let url = Url::parse(raw).map_err(|err| invalid("allowed-origin", raw, err.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(
            "allowed-origin",
            raw,
            "an origin is scheme://host[:port] with scheme http or https",
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "allowed-origin",
            raw,
            "an origin has no path, query or fragment",
        ));
    }
    Ok(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec![
            "wsticket",
            "serve",
            "--jwks-file",
            "keys.json",
            "--issuer",
            "https://idp.example",
            "--audience",
            "app",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else {
            return Err("not serve".into());
        };
        Config::from_args(*args).map_err(|e| e.to_string())
    }

    #[test]
    fn profile_sets_ticket_ttl() {
        let dev = parse(&["--profile", "dev"]).expect("valid flags");
        assert_eq!(dev.ticket_ttl, Duration::from_secs(60));
        let prod = parse(&[]).expect("valid flags");
        assert_eq!(prod.ticket_ttl, Duration::from_secs(30));
        let explicit = parse(&["--profile", "dev", "--ticket-ttl", "2m"]).expect("valid flags");
        assert_eq!(explicit.ticket_ttl, Duration::from_secs(120));
    }

    #[test]
    fn symmetric_algorithm_is_rejected() {
        let err = parse(&["--algorithms", "RS256,HS256"]).expect_err("HS256 must fail");
        assert!(err.contains("HS256"), "{err}");
    }

    #[test]
    fn origin_is_normalized() {
        let config = parse(&["--allowed-origin", "HTTPS://App.Example:443"]).expect("valid flags");
        assert_eq!(
            config.allowed_origins,
            vec!["https://app.example".to_string()]
        );
        let err = parse(&["--allowed-origin", "https://app.example/path"]).expect_err("path");
        assert!(err.contains("allowed-origin"), "{err}");
    }

    #[test]
    fn both_jwks_sources_are_rejected() {
        let err = parse(&["--jwks-url", "https://idp.example/jwks"]).expect_err("two sources");
        assert!(err.contains("jwks"), "{err}");
    }

    #[test]
    fn shared_listen_address_is_rejected() {
        let err = parse(&[
            "--listen",
            "127.0.0.1:7000",
            "--admin-listen",
            "127.0.0.1:7000",
        ])
        .expect_err("same address");
        assert!(err.contains("admin-listen"), "{err}");
    }

    #[test]
    fn zero_rate_limit_is_rejected() {
        let err = parse(&["--rate-limit", "0"]).expect_err("zero");
        assert!(err.contains("rate-limit"), "{err}");
    }
}
