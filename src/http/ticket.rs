//! `POST /websocket/ticket`: trades a bearer JWT for a single-use ticket.
//!
//! CORS is handled here rather than with `warp::cors()` so that a request
//! from a disallowed Origin is rejected, counted and logged like every other
//! rejection.

use crate::cluster::records::Published;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, ORIGIN};
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::app::AppState;
use crate::audit::{AuditEvent, Severity};
use crate::auth::AuthError;
use crate::clock::format_rfc3339;
use crate::config::{normalize_origin, MAX_TOKEN_BYTES};
use crate::gateway::forwarded_claims;
use crate::http::upgrade::ClientAddr;
use crate::http::{json_response, with_request_id, ApiError};
use crate::store::{TicketRecord, TicketState};
use crate::ticket::{self, log_id};

const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || state.clone());
    let path = warp::path!("websocket" / "ticket");

    let issue = path
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ClientAddr>())
        .then(handle_issue);
    let preflight = path
        .and(warp::options())
        .and(with_state)
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ClientAddr>())
        .map(handle_preflight);
    issue.or(preflight).unify()
}

#[derive(Serialize)]
struct TicketBody {
    ticket: String,
    expires_at: String,
    expires_in: u64,
}

/// A rejected ticket request, with what the log needs to know about it.
struct Rejected {
    error: ApiError,
    subject: Option<String>,
    /// Reason the token was rejected, for the log only.
    reason: Option<&'static str>,
}

impl From<ApiError> for Rejected {
    fn from(error: ApiError) -> Self {
        Rejected {
            error,
            subject: None,
            reason: None,
        }
    }
}

async fn handle_issue(
    state: Arc<AppState>,
    headers: HeaderMap,
    client: Option<ClientAddr>,
) -> Response {
    let client_ip = client.map(|client| client.0.ip());
    let started = Instant::now();
    let request_id = state.request_id(&headers);
    let origin = request_origin(&headers);

    let outcome = issue(&state, &headers, origin.as_deref()).await;
    let latency = started.elapsed();
    state
        .metrics
        .issuance_duration
        .observe(latency.as_secs_f64());
    let latency_ms = latency.as_secs_f64() * 1000.0;

    let response = match outcome {
        Ok((ticket, record)) => {
            let key = ticket::key_of(&ticket);
            state.metrics.tickets_issued.inc();
            state.audit.record(&AuditEvent {
                event: "ticket_issued",
                ticket_id: Some(&log_id(&key)),
                user_id: Some(&record.subject),
                request_id: Some(&request_id),
                result: "ok",
                latency_ms: Some(latency_ms),
                client_ip,
                message: "ticket issued",
                ..AuditEvent::default()
            });
            let now_ms = state.clock.now_ms();
            let body = TicketBody {
                ticket,
                expires_at: format_rfc3339(record.expires_at_ms),
                expires_in: record.expires_at_ms.saturating_sub(now_ms).div_ceil(1000),
            };
            let mut response = json_response(StatusCode::OK, &body);
            // The body is a bearer credential: never cache it anywhere.
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(rejected) => {
            let code = rejected.error.code();
            state.metrics.reject_ticket_request(code);
            let server_side = rejected.error.is_server_side();
            state.audit.record(&AuditEvent {
                event: "token_rejected",
                severity: Some(if server_side {
                    Severity::Error
                } else {
                    Severity::Warn
                }),
                user_id: rejected.subject.as_deref(),
                request_id: Some(&request_id),
                result: "rejected",
                error_code: Some(code),
                latency_ms: Some(latency_ms),
                client_ip,
                reason: rejected.reason,
                message: if server_side {
                    "ticket request failed on the server side"
                } else {
                    "ticket request rejected"
                },
                ..AuditEvent::default()
            });
            rejected.error.to_response(state.config.realm.as_deref())
        }
    };
    let response = with_cors(&state, origin.as_deref(), response);
    with_request_id(response, &request_id)
}

async fn issue(
    state: &AppState,
    headers: &HeaderMap,
    origin: Option<&str>,
) -> Result<(String, TicketRecord), Rejected> {
    if headers.get_all(ORIGIN).iter().count() > 1 {
        return Err(ApiError::InvalidRequest("Send at most one Origin header.").into());
    }
    if let Some(origin) = origin {
        if !state.origin_allowed(origin) {
            return Err(ApiError::OriginNotAllowed.into());
        }
    }
    let token = bearer_token(headers)?;
    let identity = match state.verifier.verify(token).await {
        Ok(verified) => {
            let cached = if verified.cached { "true" } else { "false" };
            state
                .metrics
                .jwt_verifications
                .with_label_values(&["ok", cached])
                .inc();
            verified.identity
        }
        Err(err) => {
            let (error, reason) = match err {
                AuthError::Invalid(reason) => (ApiError::InvalidToken, Some(reason)),
                AuthError::Expired => (ApiError::TokenExpired, None),
                AuthError::Unavailable { retry_after } => (
                    ApiError::AuthUnavailable { retry_after },
                    Some("no usable keys"),
                ),
            };
            if !error.is_server_side() {
                state
                    .metrics
                    .jwt_verifications
                    .with_label_values(&[error.code(), "false"])
                    .inc();
            }
            return Err(Rejected {
                error,
                subject: None,
                reason,
            });
        }
    };

    if let Err(not_until) = state.ticket_limiter.check_key(&identity.subject) {
        let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
        let retry_after = not_until.wait_time_from(now).max(Duration::from_secs(1));
        return Err(Rejected {
            error: ApiError::RateLimited { retry_after },
            subject: Some(identity.subject),
            reason: None,
        });
    }

    let generated = match state.cluster.get() {
        Some(cluster) => {
            let config = &cluster.config;
            crate::cluster::home::generate(&state.rng, &config.keys.home, config.node_id)
        }
        None => ticket::generate(&state.rng),
    };
    let ticket = generated.map_err(|_| Rejected {
        error: ApiError::StoreUnavailable,
        subject: Some(identity.subject.clone()),
        reason: Some("no system randomness"),
    })?;
    let now_ms = state.clock.now_ms();
    let ttl_ms = u64::try_from(state.config.ticket_ttl.as_millis()).unwrap_or(u64::MAX);
    let record = TicketRecord {
        state: TicketState::Issued,
        subject: identity.subject,
        session: identity.session,
        origin: origin.map(str::to_owned),
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        token_expires_at: identity.token_expires_at,
        claims_json: forwarded_claims(&identity.claims, &state.config.gateway.forward_claims),
    };
    let key = ticket::key_of(&ticket);
    if let Err(err) = state.store.insert(&key, &record).await {
        tracing::error!(event = "store_error", ticket_id = %log_id(&key), error = %err, "storing a new ticket failed");
        return Err(Rejected {
            error: ApiError::StoreUnavailable,
            subject: Some(record.subject),
            reason: Some("store write failed"),
        });
    }
    if let Some(cluster) = state.cluster.get() {
        let expires_at_ms = record.expires_at_ms;
        cluster
            .publish(&key, Published::Issued { expires_at_ms })
            .await;
    }
    Ok((ticket, record))
}

/// Extracts the bearer token (RFC 6750 section 2.1).
///
/// No `Authorization` header, or one with another scheme, is `missing_token`.
/// Several headers (even identical ones), a value that is not visible ASCII, a
/// token with spaces inside, or one over 16 KiB is `invalid_token`.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(ApiError::MissingToken);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidToken);
    }
    let value = value.to_str().map_err(|_| ApiError::InvalidToken)?.trim();
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::MissingToken);
    }
    let token = credentials.trim_start_matches(' ');
    if token.is_empty() {
        return Err(ApiError::MissingToken);
    }
    if token.len() > MAX_TOKEN_BYTES || !is_token68(token) {
        return Err(ApiError::InvalidToken);
    }
    Ok(token)
}

/// Checks the `b64token` syntax of RFC 6750: `[A-Za-z0-9-._~+/]+` then `=`*.
fn is_token68(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Returns the request's `Origin`, normalised the way origins are configured.
pub fn request_origin(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(ORIGIN)?.to_str().ok()?.trim();
    if raw.is_empty() {
        return None;
    }
    Some(normalize_origin(raw).unwrap_or_else(|_| raw.to_ascii_lowercase()))
}

fn with_cors(state: &AppState, origin: Option<&str>, mut response: Response) -> Response {
    let Some(origin) = origin else {
        return response;
    };
    if state.config.allowed_origins.is_empty() || !state.origin_allowed(origin) {
        return response;
    }
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", value);
    }
    headers.insert("vary", HeaderValue::from_static("Origin"));
    headers.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("x-request-id, retry-after, www-authenticate"),
    );
    response
}

fn handle_preflight(
    state: Arc<AppState>,
    headers: HeaderMap,
    client: Option<ClientAddr>,
) -> Response {
    let origin = request_origin(&headers);
    let allowed = match origin.as_deref() {
        Some(origin) => !state.config.allowed_origins.is_empty() && state.origin_allowed(origin),
        None => false,
    };
    let method_ok = headers
        .get("access-control-request-method")
        .is_some_and(|method| method.as_bytes().eq_ignore_ascii_case(b"POST"));
    if !allowed || !method_ok {
        state.metrics.reject_ticket_request("origin_not_allowed");
        state.audit.record(&AuditEvent {
            event: "token_rejected",
            severity: Some(Severity::Warn),
            result: "rejected",
            error_code: Some("origin_not_allowed"),
            client_ip: client.map(|client| client.0.ip()),
            message: "CORS preflight rejected",
            ..AuditEvent::default()
        });
        return ApiError::OriginNotAllowed.to_response(None);
    }
    let mut response = Response::default();
    *response.status_mut() = StatusCode::NO_CONTENT;
    let response_headers = response.headers_mut();
    if let Some(Ok(value)) = origin.map(|origin| HeaderValue::from_str(&origin)) {
        response_headers.insert("access-control-allow-origin", value);
    }
    response_headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST"),
    );
    response_headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("authorization, content-type, x-request-id"),
    );
    response_headers.insert(
        "access-control-max-age",
        HeaderValue::from(PREFLIGHT_MAX_AGE_SECS),
    );
    response_headers.insert("vary", HeaderValue::from_static("Origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(AUTHORIZATION, HeaderValue::from_str(value).expect("ascii"));
        }
        map
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(
            bearer_token(&headers(&["bearer abc.def.ghi"])),
            Ok("abc.def.ghi")
        );
        assert_eq!(
            bearer_token(&headers(&["BEARER abc.def.ghi"])),
            Ok("abc.def.ghi")
        );
    }

    #[test]
    fn missing_or_other_scheme_is_missing_token() {
        assert_eq!(bearer_token(&headers(&[])), Err(ApiError::MissingToken));
        assert_eq!(
            bearer_token(&headers(&["Basic dXNlcjpwYXNz"])),
            Err(ApiError::MissingToken)
        );
        assert_eq!(
            bearer_token(&headers(&["Bearer"])),
            Err(ApiError::MissingToken)
        );
        assert_eq!(
            bearer_token(&headers(&["Bearer   "])),
            Err(ApiError::MissingToken)
        );
    }

    #[test]
    fn malformed_bearer_is_invalid_token() {
        assert_eq!(
            bearer_token(&headers(&["Bearer a b"])),
            Err(ApiError::InvalidToken)
        );
        assert_eq!(
            bearer_token(&headers(&["Bearer a,b"])),
            Err(ApiError::InvalidToken)
        );
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(
            bearer_token(&headers(&[&huge])),
            Err(ApiError::InvalidToken)
        );
    }

    #[test]
    fn several_authorization_headers_are_rejected() {
        let same = "Bearer abc.def.ghi";
        assert_eq!(
            bearer_token(&headers(&[same, same])),
            Err(ApiError::InvalidToken)
        );
    }
}
