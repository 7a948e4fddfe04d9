//! Opening the WebSocket to the upstream for one authenticated client.
//!
//! The upstream request carries the identity as headers (`X-Auth-Subject`,
//! `X-Auth-Session`, `X-Auth-Claims`, `X-Request-Id`), the client's query
//! parameters except `ticket`, the client's offered subprotocols and its other
//! end-to-end headers. Every client header whose name starts with `x-auth-`
//! is removed first, so an upstream can trust those names.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{HeaderName, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use http::HeaderMap;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::store::TicketRecord;
use crate::ws::websocket_config;

/// A WebSocket to the upstream.
pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Maximum time to open the upstream connection, TLS and handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Client headers never passed upstream. Hop-by-hop headers and the client's
/// handshake headers belong to the client's connection only. `Authorization`
/// is dropped because wsticket has authenticated the client and the identity
/// headers replace it, and `X-Request-Id` is replaced by the id wsticket logs.
const DROPPED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "authorization",
    "x-request-id",
];

/// The upstream of `--upstream` and how to reach it.
pub struct Upstream {
    url: Url,
    /// The TLS settings of a `wss://` upstream; `None` for `ws://`.
    connector: Option<Connector>,
    max_message_size: usize,
}

/// The inputs of one upstream request.
pub struct UpstreamRequest<'a> {
    pub client_headers: &'a HeaderMap,
    pub client_query: Option<&'a str>,
    pub record: &'a TicketRecord,
    pub request_id: &'a str,
}

/// An open upstream connection and the subprotocol the upstream chose.
pub struct Connected {
    pub socket: UpstreamSocket,
    pub protocol: Option<HeaderValue>,
    pub elapsed: Duration,
}

/// A failure to open the upstream connection. The text goes to the log, so it
/// names the upstream's host, never the query or the identity.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the {0} header cannot carry this identity value")]
    InvalidIdentity(&'static str),
    #[error("connecting to the upstream timed out after {0:?}")]
    Timeout(Duration),
    #[error("the upstream handshake failed: {0}")]
    Handshake(Box<tokio_tungstenite::tungstenite::Error>),
}

impl From<tokio_tungstenite::tungstenite::Error> for UpstreamError {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        UpstreamError::Handshake(Box::new(err))
    }
}

impl Upstream {
    /// Creates the upstream of `url`. A `wss://` upstream is verified with
    /// `ca` when given, otherwise with the Mozilla root set of webpki-roots.
    pub fn new(url: Url, ca: Option<&[CertificateDer<'static>]>, max_message_size: usize) -> Self {
        let connector =
            (url.scheme() == "wss").then(|| Connector::Rustls(Arc::new(client_tls_config(ca))));
        Upstream {
            url,
            connector,
            max_message_size,
        }
    }

    /// Returns `host[:port]` of the upstream, for logs.
    pub fn authority(&self) -> String {
        match (self.url.host_str(), self.url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => String::new(),
        }
    }

    /// Opens the upstream WebSocket for one client.
    pub async fn connect(&self, request: UpstreamRequest<'_>) -> Result<Connected, UpstreamError> {
        let request = self.build_request(&request)?;
        let started = Instant::now();
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(websocket_config(self.max_message_size)),
            true,
            self.connector.clone(),
        );
        let (socket, response) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| UpstreamError::Timeout(CONNECT_TIMEOUT))??;
        Ok(Connected {
            socket,
            protocol: response.headers().get(SEC_WEBSOCKET_PROTOCOL).cloned(),
            elapsed: started.elapsed(),
        })
    }

    fn build_request(
        &self,
        request: &UpstreamRequest<'_>,
    ) -> Result<http::Request<()>, UpstreamError> {
        let url = upstream_url(&self.url, request.client_query);
        let mut upstream_request = url
            .as_str()
            .into_client_request()
            .map_err(UpstreamError::from)?;
        let headers = upstream_request.headers_mut();
        for (name, value) in request.client_headers {
            if is_forwarded(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        for value in request.client_headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, value.clone());
        }
        for (name, value) in identity_headers(request.record, request.request_id)? {
            headers.insert(name, value);
        }
        Ok(upstream_request)
    }
}

/// Tells whether a client header goes upstream.
fn is_forwarded(name: &HeaderName) -> bool {
    let name = name.as_str();
    !name.starts_with("x-auth-") && !DROPPED_HEADERS.contains(&name)
}

/// Returns the identity headers of a connection. `X-Auth-Claims` is always
/// sent, as `e30` (the base64url of `{}`) when no claim is forwarded.
fn identity_headers(
    record: &TicketRecord,
    request_id: &str,
) -> Result<Vec<(HeaderName, HeaderValue)>, UpstreamError> {
    let claims = if record.claims_json.is_empty() {
        "{}"
    } else {
        record.claims_json.as_str()
    };
    let mut headers = vec![
        (
            HeaderName::from_static("x-auth-subject"),
            header_value("X-Auth-Subject", &record.subject)?,
        ),
        (
            HeaderName::from_static("x-auth-claims"),
            header_value("X-Auth-Claims", &URL_SAFE_NO_PAD.encode(claims))?,
        ),
        (
            HeaderName::from_static("x-request-id"),
            header_value("X-Request-Id", request_id)?,
        ),
    ];
    if let Some(session) = &record.session {
        headers.push((
            HeaderName::from_static("x-auth-session"),
            header_value("X-Auth-Session", session)?,
        ));
    }
    Ok(headers)
}

/// Converts an identity value to a header value. Control characters cannot
/// travel in a header; UTF-8 text goes as its bytes.
fn header_value(name: &'static str, value: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_bytes(value.as_bytes()).map_err(|_| UpstreamError::InvalidIdentity(name))
}

/// Returns the upstream URL with the client's query parameters appended,
/// except `ticket`. Parameters keep their original encoding.
fn upstream_url(base: &Url, client_query: Option<&str>) -> Url {
    let kept: Vec<&str> = client_query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && !is_ticket_pair(pair))
        .collect();
    let mut url = base.clone();
    if kept.is_empty() {
        return url;
    }
    let query = match base.query() {
        Some(existing) if !existing.is_empty() => format!("{existing}&{}", kept.join("&")),
        _ => kept.join("&"),
    };
    url.set_query(Some(&query));
    url
}

fn is_ticket_pair(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    url::form_urlencoded::parse(format!("{name}=").as_bytes())
        .next()
        .is_some_and(|(decoded, _)| decoded == "ticket")
}

fn client_tls_config(ca: Option<&[CertificateDer<'static>]>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certificates) => {
            // `--upstream-ca` validation has already rejected a file with a
            // certificate that rustls cannot use, so none is skipped here.
            roots.add_parsable_certificates(certificates.iter().cloned());
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the aws-lc-rs provider supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TicketState;

    fn record(claims_json: &str, session: Option<&str>) -> TicketRecord {
        TicketRecord {
            state: TicketState::Consumed,
            subject: "alice".into(),
            session: session.map(str::to_owned),
            origin: None,
            issued_at_ms: 0,
            expires_at_ms: 0,
            token_expires_at: 0,
            claims_json: claims_json.into(),
        }
    }

    #[test]
    fn ticket_is_removed_from_query() {
        let base = Url::parse("ws://127.0.0.1:9000/app").expect("URL");
        let url = upstream_url(&base, Some("room=a%20b&ticket=abc&t%69cket=x&lang=fr"));
        assert_eq!(url.query(), Some("room=a%20b&lang=fr"));
        assert_eq!(upstream_url(&base, Some("ticket=abc")).query(), None);
    }

    #[test]
    fn query_is_appended_to_upstream_query() {
        let base = Url::parse("ws://127.0.0.1:9000/app?v=2").expect("URL");
        let url = upstream_url(&base, Some("ticket=abc&room=1"));
        assert_eq!(url.query(), Some("v=2&room=1"));
    }

    #[test]
    fn spoofed_identity_headers_are_not_forwarded() {
        for name in [
            "x-auth-subject",
            "x-auth-claims",
            "x-auth-role",
            "x-request-id",
        ] {
            assert!(!is_forwarded(&HeaderName::from_static(name)), "{name}");
        }
        assert!(is_forwarded(&HeaderName::from_static("cookie")));
        assert!(is_forwarded(&HeaderName::from_static("origin")));
    }

    #[test]
    fn claims_are_base64url_json() {
        let headers =
            identity_headers(&record(r#"{"role":"admin"}"#, Some("s1")), "req-1").expect("valid");
        let claims = headers
            .iter()
            .find(|(name, _)| name == "x-auth-claims")
            .map(|(_, value)| value.to_str().expect("ASCII").to_owned())
            .expect("claims header");
        let decoded = URL_SAFE_NO_PAD.decode(claims).expect("base64url");
        assert_eq!(decoded, br#"{"role":"admin"}"#);
        assert!(headers.iter().any(|(name, _)| name == "x-auth-session"));

        let without = identity_headers(&record("", None), "req-1").expect("valid");
        assert!(without
            .iter()
            .any(|(name, value)| name == "x-auth-claims" && value == "e30"));
        assert!(!without.iter().any(|(name, _)| name == "x-auth-session"));
    }
}
