//! `GET /ws?ticket=…`: consumes the ticket and upgrades to a WebSocket.
//!
//! Every check runs before the `101` is answered, and the consumption is
//! durable by then: the store flushes it before `consume` returns, so a crash
//! right after the answer cannot make the ticket valid again. A JWT offered in
//! any other way (an `Authorization` header, a `token` or `access_token`
//! parameter, a cookie, a subprotocol) is ignored: only a ticket authenticates
//! an upgrade. Rejections close the connection (`Connection: close`).

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONNECTION, ORIGIN, UPGRADE};
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::app::AppState;
use crate::http::ticket::request_origin;
use crate::http::{with_request_id, ApiError};
use crate::store::{RedeemError, TicketRecord};
use crate::ticket::{self, log_id, TicketKey};
use crate::ws;
use warp::reply::Response;

/// Handles one request to `/ws`.
pub async fn handle<B>(state: Arc<AppState>, mut request: Request<B>) -> Response {
    let started = Instant::now();
    let request_id = state.request_id(request.headers());
    let on_upgrade = request.extensions_mut().remove::<OnUpgrade>();

    let outcome = redeem(&state, &request, on_upgrade.is_some()).await;
    let latency = started.elapsed().as_secs_f64();
    let latency_ms = latency * 1000.0;

    let response = match outcome {
        Ok(Redeemed { key, record }) => {
            state.metrics.record_redemption("ok", "upgrade", latency);
            tracing::info!(
                event = "ticket_redeemed",
                ticket_id = %log_id(&key),
                subject = %record.subject,
                request_id = %request_id,
                result = "ok",
                via = "upgrade",
                latency_ms,
                "ticket redeemed"
            );
            let accept_key = request
                .headers()
                .get("sec-websocket-key")
                .map(|key| derive_accept_key(key.as_bytes()))
                .unwrap_or_default();
            if let Some(on_upgrade) = on_upgrade {
                let connection = ws::Connection {
                    state: state.clone(),
                    record,
                    ticket_id: log_id(&key),
                    request_id: request_id.clone(),
                };
                state.connections.spawn(connection.run(on_upgrade));
            }
            switching_protocols(&accept_key)
        }
        Err(Failure {
            error,
            key,
            subject,
        }) => {
            let code = error.code();
            state.metrics.record_redemption(code, "upgrade", latency);
            let ticket_id = key.as_ref().map(log_id).unwrap_or_default();
            let subject = subject.unwrap_or_default();
            if error == ApiError::TicketAlreadyUsed {
                state.metrics.replay_attempts.inc();
                tracing::warn!(event = "replay_attempt", ticket_id, subject, request_id = %request_id, result = "rejected", error_code = code, via = "upgrade", latency_ms, "used ticket presented again");
            } else if error.is_server_side() {
                tracing::error!(event = "ticket_rejected", ticket_id, subject, request_id = %request_id, result = "rejected", error_code = code, via = "upgrade", latency_ms, "upgrade failed on the server side");
            } else {
                tracing::warn!(event = "ticket_rejected", ticket_id, subject, request_id = %request_id, result = "rejected", error_code = code, via = "upgrade", latency_ms, "upgrade rejected");
            }
            error.to_upgrade_response()
        }
    };
    with_request_id(response, &request_id)
}

struct Redeemed {
    key: TicketKey,
    record: TicketRecord,
}

struct Failure {
    error: ApiError,
    key: Option<TicketKey>,
    subject: Option<String>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure {
            error,
            key: None,
            subject: None,
        }
    }
}

async fn redeem<B>(
    state: &AppState,
    request: &Request<B>,
    can_upgrade: bool,
) -> Result<Redeemed, Failure> {
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
    if !ticket::is_well_formed(&ticket) {
        return Err(ApiError::InvalidTicket.into());
    }
    let key = ticket::key_of(&ticket);
    match state.store.consume(&key, origin.as_deref()).await {
        Ok(record) => Ok(Redeemed { key, record }),
        Err(err) => {
            let error = match err {
                RedeemError::Unknown => ApiError::InvalidTicket,
                RedeemError::AlreadyUsed => ApiError::TicketAlreadyUsed,
                RedeemError::Expired => ApiError::TicketExpired,
                RedeemError::OriginMismatch => ApiError::OriginNotAllowed,
                RedeemError::Store => ApiError::StoreUnavailable,
            };
            Err(Failure {
                error,
                key: Some(key),
                subject: None,
            })
        }
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

fn switching_protocols(accept_key: &str) -> Response {
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(accept_key) {
        headers.insert("sec-websocket-accept", value);
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
