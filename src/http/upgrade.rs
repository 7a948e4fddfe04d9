//! `GET /ws?ticket=…`: consumes the ticket and upgrades to a WebSocket.
//!
//! Every check runs before the `101` is answered, and the consumption is
//! durable by then: the store flushes it before `consume` returns, so a crash
//! right after the answer cannot make the ticket valid again. With
//! `--upstream`, the upstream connection is open by then too. A JWT offered in
//! any other way (an `Authorization` header, a `token` or `access_token`
//! parameter, a cookie, a subprotocol) is ignored: only a ticket authenticates
//! an upgrade.
//!
//! A rejection is answered with its HTTP status and `Connection: close`, or,
//! with `--reject-with close`, with a `101` and at once a close frame whose
//! code is 4000 + that status, because browsers cannot read the status of a
//! rejected upgrade.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONNECTION, ORIGIN, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::app::AppState;
use crate::audit::{AuditEvent, Severity};
use crate::gateway::limits::SubjectSlot;
use crate::gateway::settings::RejectWith;
use crate::gateway::upstream::{UpstreamRequest, UpstreamSocket};
use crate::http::ticket::request_origin;
use crate::http::{with_request_id, ApiError};
use crate::store::TicketRecord;
use crate::ticket::{self, log_id, TicketKey};
use crate::ws;
use warp::reply::Response;

/// The peer address of a connection, put into each request's extensions by
/// the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Handles one request to `/ws`.
pub async fn handle<B>(state: Arc<AppState>, mut request: Request<B>) -> Response {
    let started = Instant::now();
    let request_id = state.request_id(request.headers());
    let on_upgrade = request.extensions_mut().remove::<OnUpgrade>();
    let client_ip = request
        .extensions()
        .get::<ClientAddr>()
        .map(|addr| addr.0.ip());

    let blocked_for = client_ip.and_then(|ip| {
        let failed_upgrades = state.gateway.failed_upgrades.as_ref()?;
        failed_upgrades.blocked_for(ip)
    });
    let outcome = match blocked_for {
        Some(retry_after) => Err(ApiError::UpgradesRateLimited { retry_after }.into()),
        None => accept(&state, &request, on_upgrade.is_some(), &request_id).await,
    };
    let latency = started.elapsed().as_secs_f64();

    let response = match outcome {
        Ok(accepted) => {
            state.metrics.record_redemption("ok", "upgrade", latency);
            let connection_id = state.new_request_id();
            state.audit.record(&AuditEvent {
                event: "ticket_redeemed",
                ticket_id: Some(&log_id(&accepted.key)),
                user_id: Some(&accepted.record.subject),
                connection_id: Some(&connection_id),
                request_id: Some(&request_id),
                result: "ok",
                latency_ms: Some(latency * 1000.0),
                via: Some("upgrade"),
                client_ip,
                message: "ticket redeemed",
                ..AuditEvent::default()
            });
            let accept_key = request
                .headers()
                .get("sec-websocket-key")
                .map(|key| derive_accept_key(key.as_bytes()))
                .unwrap_or_default();
            let protocol = accepted.protocol.clone();
            if let Some(on_upgrade) = on_upgrade {
                let connection = ws::Connection {
                    state: state.clone(),
                    record: accepted.record,
                    ticket_id: log_id(&accepted.key),
                    request_id: request_id.clone(),
                    connection_id,
                    upstream: accepted.upstream,
                    subject_slot: accepted.subject_slot,
                };
                state.connections.spawn(connection.run(on_upgrade));
            }
            switching_protocols(&accept_key, protocol)
        }
        Err(mut failure) => {
            if let Some(ip) = client_ip {
                limit_failures(&state, ip, &mut failure);
            }
            report_failure(&state, &failure, "upgrade", &request_id, latency, client_ip);
            reject(&state, &request, on_upgrade, failure.error)
        }
    };
    with_request_id(response, &request_id)
}

/// Counts a failed upgrade against its client address, and turns the
/// failure that goes over the limit into `rate_limited`.
///
/// `ticket_already_used` and `ticket_expired` are not counted: they need a
/// ticket that was once valid, which guessing cannot produce, and clients
/// that retry or reconnect late cause them without any abuse. Server-side
/// failures are not the client's doing and are not counted either.
fn limit_failures(state: &AppState, ip: IpAddr, failure: &mut Failure) {
    let Some(failed_upgrades) = state.gateway.failed_upgrades.as_ref() else {
        return;
    };
    let counted = !failure.error.is_server_side()
        && !matches!(
            failure.error,
            ApiError::TicketAlreadyUsed
                | ApiError::TicketExpired
                | ApiError::UpgradesRateLimited { .. }
                | ApiError::TooManyConnections
        );
    if !counted {
        return;
    }
    if let Some(retry_after) = failed_upgrades.record_failure(ip) {
        failure.detail = Some(format!(
            "over --max-failed-upgrades-per-minute; the upgrade failed with {}",
            failure.error.code()
        ));
        failure.error = ApiError::UpgradesRateLimited { retry_after };
    }
}

/// Builds the response to a failed upgrade as `--reject-with` sets it.
/// Requests that are no WebSocket upgrade at all always get the HTTP error.
fn reject<B>(
    state: &Arc<AppState>,
    request: &Request<B>,
    on_upgrade: Option<OnUpgrade>,
    error: ApiError,
) -> Response {
    let can_close = state.config.gateway.reject_with == RejectWith::Close
        && request.method() == Method::GET
        && is_websocket_upgrade(request.headers())
        && !matches!(
            error,
            ApiError::MethodNotAllowed | ApiError::UpgradeRequired
        );
    let Some(on_upgrade) = on_upgrade.filter(|_| can_close) else {
        return error.to_upgrade_response();
    };
    let accept_key = request
        .headers()
        .get("sec-websocket-key")
        .map(|key| derive_accept_key(key.as_bytes()))
        .unwrap_or_default();
    state.connections.spawn(ws::close_rejected(
        on_upgrade,
        error,
        state.config.max_message_size,
    ));
    // Browsers fail a connection whose 101 names no subprotocol when they
    // offered some, and would then report 1006 instead of the close code.
    switching_protocols(&accept_key, first_offered_protocol(request.headers()))
}

/// Logs and counts a failed redemption, once.
pub(crate) fn report_failure(
    state: &AppState,
    failure: &Failure,
    via: &'static str,
    request_id: &str,
    latency: f64,
    client_ip: Option<IpAddr>,
) {
    let error = &failure.error;
    let code = error.code();
    state.metrics.record_redemption(code, via, latency);
    let ticket_id = failure.key.as_ref().map(log_id);
    let replay = *error == ApiError::TicketAlreadyUsed;
    if replay {
        state.metrics.replay_attempts.inc();
    }
    let (event, severity, message) = if replay {
        (
            "replay_attempt",
            Severity::Warn,
            "used ticket presented again",
        )
    } else if error.is_server_side() {
        (
            "ticket_rejected",
            Severity::Error,
            "redemption failed on the server side",
        )
    } else {
        ("ticket_rejected", Severity::Warn, "redemption rejected")
    };
    state.audit.record(&AuditEvent {
        event,
        severity: Some(severity),
        ticket_id: ticket_id.as_deref(),
        user_id: failure.subject.as_deref(),
        request_id: Some(request_id),
        result: "rejected",
        error_code: Some(code),
        latency_ms: Some(latency * 1000.0),
        via: Some(via),
        client_ip,
        reason: failure.detail.as_deref(),
        message,
        ..AuditEvent::default()
    });
}

/// An accepted upgrade, with everything the connection needs.
struct Accepted {
    key: TicketKey,
    record: TicketRecord,
    upstream: Option<UpstreamSocket>,
    /// The subprotocol the upstream chose, for the `101`.
    protocol: Option<HeaderValue>,
    subject_slot: SubjectSlot,
}

/// A failed redemption, with what the log needs to know about it.
pub(crate) struct Failure {
    pub error: ApiError,
    pub key: Option<TicketKey>,
    pub subject: Option<String>,
    /// The internal cause, for the log only.
    pub detail: Option<String>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure {
            error,
            key: None,
            subject: None,
            detail: None,
        }
    }
}

/// Checks the request, consumes the ticket, takes a connection slot for the
/// subject and opens the upstream connection.
async fn accept<B>(
    state: &AppState,
    request: &Request<B>,
    can_upgrade: bool,
    request_id: &str,
) -> Result<Accepted, Failure> {
    let (key, record) = redeem(state, request, can_upgrade).await?;
    let failure = |error: ApiError, detail: Option<String>| Failure {
        error,
        key: Some(key),
        subject: Some(record.subject.clone()),
        detail,
    };

    let Some(subject_slot) = state.gateway.subjects.try_acquire(&record.subject) else {
        return Err(failure(ApiError::TooManyConnections, None));
    };

    let Some(upstream) = state.gateway.upstream.as_ref() else {
        return Ok(Accepted {
            key,
            record,
            upstream: None,
            protocol: None,
            subject_slot,
        });
    };
    let connected = upstream
        .connect(UpstreamRequest {
            client_headers: request.headers(),
            client_query: request.uri().query(),
            record: &record,
            request_id,
        })
        .await;
    match connected {
        Ok(connected) => {
            state
                .metrics
                .upstream_connect_duration
                .observe(connected.elapsed.as_secs_f64());
            Ok(Accepted {
                key,
                record,
                upstream: Some(connected.socket),
                protocol: connected.protocol,
                subject_slot,
            })
        }
        Err(err) => {
            let detail = format!("upstream {}: {err}", upstream.authority());
            Err(failure(ApiError::UpstreamUnavailable, Some(detail)))
        }
    }
}

async fn redeem<B>(
    state: &AppState,
    request: &Request<B>,
    can_upgrade: bool,
) -> Result<(TicketKey, TicketRecord), Failure> {
    if request.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed.into());
    }
    if !can_upgrade || !is_websocket_upgrade(request.headers()) {
        return Err(ApiError::UpgradeRequired.into());
    }
    let origin = request_origin(request.headers());
    if request.headers().get_all(ORIGIN).iter().count() > 1 {
        return Err(ApiError::InvalidRequest("Send at most one Origin header.").into());
    }
    if let Some(origin) = origin.as_deref() {
        if !state.origin_allowed(origin) {
            return Err(ApiError::OriginNotAllowed.into());
        }
    }

    let ticket = ticket_parameter(request.uri().query())?;
    consume_ticket(state, &ticket, origin.as_deref()).await
}

/// Consumes a ticket, checking its format first. The upgrade and the redeem
/// API both come through here, so a ticket is used once whichever way.
pub(crate) async fn consume_ticket(
    state: &AppState,
    ticket: &str,
    origin: Option<&str>,
) -> Result<(TicketKey, TicketRecord), Failure> {
    if !ticket::is_well_formed(ticket) {
        return Err(ApiError::InvalidTicket.into());
    }
    let key = ticket::key_of(ticket);
    let consumed = match state.cluster.get() {
        Some(cluster) => {
            let now_ms = state.clock.now_ms();
            cluster
                .consume(state.store.as_ref(), ticket, &key, origin, now_ms)
                .await
        }
        None => state.store.consume(&key, origin).await,
    };
    match consumed {
        Ok(record) => Ok((key, record)),
        Err(err) => Err(Failure {
            error: err.into(),
            key: Some(key),
            subject: None,
            detail: None,
        }),
    }
}

/// Returns the single `ticket` query parameter.
///
/// The query must be valid UTF-8 once percent-decoded; a missing or empty
/// ticket is `missing_ticket`, a repeated one is rejected as ambiguous.
fn ticket_parameter(query: Option<&str>) -> Result<String, Failure> {
    let query = query.unwrap_or("");
    let decoded_is_utf8 = percent_encoding::percent_decode_str(&query.replace('+', " "))
        .decode_utf8()
        .is_ok();
    if !decoded_is_utf8 {
        return Err(ApiError::InvalidRequest("The query string is not valid UTF-8.").into());
    }
    let mut tickets = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| name == "ticket")
        .map(|(_, value)| value.into_owned());
    let first = tickets.next();
    if tickets.next().is_some() {
        return Err(ApiError::InvalidRequest("Send exactly one ticket parameter.").into());
    }
    match first {
        Some(ticket) if !ticket.is_empty() => Ok(ticket),
        _ => Err(ApiError::MissingTicket.into()),
    }
}

fn header_has_token(headers: &HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|text| {
            text.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    header_has_token(headers, CONNECTION, "upgrade")
        && header_has_token(headers, UPGRADE, "websocket")
        && headers
            .get("sec-websocket-version")
            .is_some_and(|version| version == "13")
        && headers
            .get("sec-websocket-key")
            .is_some_and(|key| key.len() == 24)
}

/// Returns the first subprotocol the client offered.
fn first_offered_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let offered = headers.get(SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let first = offered.split(',').map(str::trim).find(|p| !p.is_empty())?;
    HeaderValue::from_str(first).ok()
}

fn switching_protocols(accept_key: &str, protocol: Option<HeaderValue>) -> Response {
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(accept_key) {
        headers.insert("sec-websocket-accept", value);
    }
    if let Some(protocol) = protocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(query: Option<&str>) -> Option<ApiError> {
        ticket_parameter(query).err().map(|failure| failure.error)
    }

    #[test]
    fn ticket_parameter_is_read() {
        assert_eq!(
            ticket_parameter(Some("a=1&ticket=abc")).ok().as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn missing_ticket_parameter_is_reported() {
        assert_eq!(error_of(None), Some(ApiError::MissingTicket));
        assert_eq!(error_of(Some("ticket=")), Some(ApiError::MissingTicket));
        assert_eq!(error_of(Some("token=abc")), Some(ApiError::MissingTicket));
    }

    #[test]
    fn duplicate_ticket_parameter_is_rejected() {
        assert!(matches!(
            error_of(Some("ticket=a&ticket=a")),
            Some(ApiError::InvalidRequest(_))
        ));
    }

    #[test]
    fn non_utf8_query_is_rejected() {
        assert!(matches!(
            error_of(Some("ticket=%FF%FE")),
            Some(ApiError::InvalidRequest(_))
        ));
    }
}
