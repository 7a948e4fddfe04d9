//! `POST /v1/tickets/redeem` on the admin listener: lets an application
//! that terminates WebSockets itself trade a ticket for the identity.
//!
//! The request carries `{"ticket": "…", "origin": "…"}` (origin optional:
//! the `Origin` the application saw on its own upgrade) and
//! `Authorization: Bearer <admin token>`. Redemption goes through the same
//! store `consume` as the upgrade, so a ticket is used once whichever way it
//! comes, and errors have the same codes and statuses as the upgrade. Without
//! `--admin-token-file` the endpoint returns `404 redeem_api_disabled`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL};
use http::{HeaderMap, StatusCode};
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::app::AppState;
use crate::audit::AuditEvent;
use crate::clock::format_rfc3339;
use crate::config::normalize_origin;
use crate::http::upgrade::{consume_ticket, report_failure, Failure};
use crate::http::{json_response, with_request_id, ApiError};
use crate::store::TicketRecord;
use crate::ticket::{log_id, TicketKey};

/// Largest request body accepted, in bytes.
const MAX_BODY_BYTES: u64 = 16 * 1024;
/// Shortest admin token accepted, in characters.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The admin token of `--admin-token-file`. Only its SHA-256 is kept, and
/// tokens are compared by hash in constant time, so neither the comparison's
/// duration nor a memory dump gives the token away.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// Reads the token from `path`; surrounding whitespace is ignored. The
    /// error names the problem, never the file's content.
    pub fn read(path: &Path) -> Result<Self, String> {
        let content = std::fs::read_to_string(path).map_err(|err| err.to_string())?;
        let token = content.trim();
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            return Err(format!(
                "the token must be at least {MIN_ADMIN_TOKEN_LEN} characters"
            ));
        }
        Ok(AdminToken {
            digest: sha256(token),
        })
    }

    /// Tells whether `presented` is the admin token.
    pub fn matches(&self, presented: &str) -> bool {
        sha256(presented).ct_eq(&self.digest).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn sha256(text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, text.as_bytes()).as_ref());
    out
}

#[derive(Deserialize)]
struct RedeemRequest {
    ticket: String,
    #[serde(default)]
    origin: Option<String>,
}

#[derive(Serialize)]
struct RedeemBody {
    subject: String,
    session: Option<String>,
    /// The claims chosen with `--forward-claim`, as a JSON object.
    claims: serde_json::Value,
    /// When the JWT that obtained the ticket expires (RFC 3339).
    expires_at: String,
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || state.clone());
    warp::path!("v1" / "tickets" / "redeem")
        .and(warp::post())
        .and(with_state)
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(MAX_BODY_BYTES))
        .and(warp::body::bytes())
        .then(handle)
}

async fn handle(state: Arc<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let request_id = state.request_id(&headers);
    if let Err(error) = authorize(&state, &headers) {
        tracing::warn!(event = "admin_request_rejected", request_id = %request_id, error_code = error.code(), "redeem API request rejected");
        return with_request_id(error.to_response(Some("wsticket-admin")), &request_id);
    }

    let outcome = redeem(&state, &body).await;
    let latency = started.elapsed().as_secs_f64();
    let response = match outcome {
        Ok((key, record)) => {
            state.metrics.record_redemption("ok", "redeem_api", latency);
            state.audit.record(&AuditEvent {
                event: "ticket_redeemed",
                ticket_id: Some(&log_id(&key)),
                user_id: Some(&record.subject),
                request_id: Some(&request_id),
                result: "ok",
                latency_ms: Some(latency * 1000.0),
                via: Some("redeem_api"),
                message: "ticket redeemed",
                ..AuditEvent::default()
            });
            let claims = if record.claims_json.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_str(&record.claims_json).unwrap_or_else(|_| serde_json::json!({}))
            };
            let body = RedeemBody {
                subject: record.subject,
                session: record.session,
                claims,
                expires_at: format_rfc3339(record.token_expires_at.saturating_mul(1000)),
            };
            let mut response = json_response(StatusCode::OK, &body);
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(failure) => {
            report_failure(&state, &failure, "redeem_api", &request_id, latency, None);
            failure.error.to_response(None)
        }
    };
    with_request_id(response, &request_id)
}

/// Checks that the redeem API is enabled and the admin token was sent.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(admin_token) = state.config.gateway.admin_token.as_ref() else {
        return Err(ApiError::RedeemDisabled);
    };
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let presented = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok(),
        _ => None,
    };
    let token = presented
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match token {
        Some(token) if admin_token.matches(token) => Ok(()),
        _ => Err(ApiError::InvalidAdminToken),
    }
}

async fn redeem(state: &AppState, body: &[u8]) -> Result<(TicketKey, TicketRecord), Failure> {
    let request: RedeemRequest = serde_json::from_slice(body).map_err(|_| {
        Failure::from(ApiError::InvalidRequest(
            "Send a JSON object {\"ticket\": \"…\", \"origin\": \"…\"}; origin is optional.",
        ))
    })?;
    let origin = request
        .origin
        .as_deref()
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(|origin| normalize_origin(origin).unwrap_or_else(|_| origin.to_ascii_lowercase()));
    if let Some(origin) = origin.as_deref() {
        if !state.origin_allowed(origin) {
            return Err(ApiError::OriginNotAllowed.into());
        }
    }
    if request.ticket.is_empty() {
        return Err(ApiError::MissingTicket.into());
    }
    consume_ticket(state, &request.ticket, origin.as_deref()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_matches_only_itself() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "  correct-horse-battery-staple\n").expect("write");
        let token = AdminToken::read(&path).expect("valid token file");
        assert!(token.matches("correct-horse-battery-staple"));
        assert!(!token.matches("correct-horse-battery-stapl"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn short_admin_token_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "short\n").expect("write");
        let err = AdminToken::read(&path).expect_err("too short");
        assert!(err.contains("16"), "{err}");
    }
}
