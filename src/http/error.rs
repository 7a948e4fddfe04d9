//! The one error type of every HTTP response, mapped in one place to a status,
//! an `error` code and a plain message.
//!
//! The codes are a contract that clients and scripts match on; the messages
//! are for people and never contain a token, a ticket or an internal cause.
//! Internal causes go to the log where the error is created.

use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;
use serde::Serialize;
use warp::reply::Response;
use warp::Reply;

use crate::store::RedeemError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    MissingToken,
    InvalidToken,
    TokenExpired,
    RateLimited {
        retry_after: Duration,
    },
    AuthUnavailable {
        retry_after: Duration,
    },
    StoreUnavailable,
    MissingTicket,
    InvalidTicket,
    TicketAlreadyUsed,
    TicketExpired,
    OriginNotAllowed,
    /// A request the server cannot parse. The message states what is wrong.
    InvalidRequest(&'static str),
    UpgradeRequired,
    NotFound,
    MethodNotAllowed,
    /// The upstream could not be reached after the ticket was consumed.
    UpstreamUnavailable,
    /// Too many failed upgrades from one client IP address.
    UpgradesRateLimited {
        retry_after: Duration,
    },
    /// The subject already has `--max-connections-per-subject` connections.
    TooManyConnections,
    /// Cluster mode: the ticket's home node cannot be reached.
    TicketHomeUnavailable {
        retry_after: Duration,
    },
    /// The redeem API was called but no `--admin-token-file` is set.
    RedeemDisabled,
    /// The redeem API was called without the admin token, or with another.
    InvalidAdminToken,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingToken | InvalidToken | TokenExpired | MissingTicket | TicketExpired => {
                StatusCode::UNAUTHORIZED
            }
            InvalidTicket | TicketAlreadyUsed | OriginNotAllowed => StatusCode::FORBIDDEN,
            RateLimited { .. } | UpgradesRateLimited { .. } | TooManyConnections => {
                StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            RedeemDisabled => StatusCode::NOT_FOUND,
            InvalidAdminToken => StatusCode::UNAUTHORIZED,
            AuthUnavailable { .. } | StoreUnavailable | TicketHomeUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            InvalidRequest(_) => StatusCode::BAD_REQUEST,
            UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingToken => "missing_token",
            InvalidToken => "invalid_token",
            TokenExpired => "token_expired",
            RateLimited { .. } => "rate_limited",
            AuthUnavailable { .. } => "auth_unavailable",
            StoreUnavailable => "store_unavailable",
            MissingTicket => "missing_ticket",
            InvalidTicket => "invalid_ticket",
            TicketAlreadyUsed => "ticket_already_used",
            TicketExpired => "ticket_expired",
            OriginNotAllowed => "origin_not_allowed",
            InvalidRequest(_) => "invalid_request",
            UpgradeRequired => "websocket_upgrade_required",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            UpstreamUnavailable => "upstream_unavailable",
            UpgradesRateLimited { .. } => "rate_limited",
            TooManyConnections => "too_many_connections",
            TicketHomeUnavailable { .. } => "ticket_home_unavailable",
            RedeemDisabled => "redeem_api_disabled",
            InvalidAdminToken => "invalid_admin_token",
        }
    }

    pub fn message(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingToken => "Send the access token as 'Authorization: Bearer <token>'.",
            InvalidToken => "The access token was rejected; sign in again to get a new one.",
            TokenExpired => "The access token has expired; refresh it and try again.",
            RateLimited { .. } => "Too many ticket requests for this user; retry after the time in Retry-After.",
            AuthUnavailable { .. } => "Tokens cannot be verified right now because the identity provider's keys are unavailable; retry later.",
            StoreUnavailable => "The ticket store is unavailable; retry later.",
            MissingTicket => "Open the WebSocket with a ticket: /ws?ticket=<ticket>.",
            InvalidTicket => "The ticket is not valid; request a new ticket.",
            TicketAlreadyUsed => "The ticket has already been used; request a new ticket for every connection.",
            TicketExpired => "The ticket has expired; request a new ticket and connect within its lifetime.",
            OriginNotAllowed => "Requests from this Origin are not allowed.",
            InvalidRequest(message) => message,
            UpgradeRequired => "This endpoint only accepts WebSocket upgrade requests (version 13).",
            NotFound => "No such endpoint.",
            MethodNotAllowed => "This endpoint does not accept that HTTP method.",
            UpstreamUnavailable => "The application server could not be reached. The ticket has been used: request a new ticket and try again.",
            UpgradesRateLimited { .. } => "Too many failed upgrades from this address; retry after the time in Retry-After.",
            TooManyConnections => "This user has too many open connections; close one, then request a new ticket.",
            TicketHomeUnavailable { .. } => "The cluster node that issued this ticket cannot be reached; request a new ticket and try again.",
            RedeemDisabled => "The redeem API is disabled; start wsticket with --admin-token-file to enable it.",
            InvalidAdminToken => "Send the token of --admin-token-file as 'Authorization: Bearer <token>'.",
        }
    }

    /// Tells whether the server, not the client, caused the error.
    pub fn is_server_side(&self) -> bool {
        matches!(
            self,
            ApiError::AuthUnavailable { .. }
                | ApiError::StoreUnavailable
                | ApiError::UpstreamUnavailable
                | ApiError::TicketHomeUnavailable { .. }
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after }
            | ApiError::AuthUnavailable { retry_after }
            | ApiError::UpgradesRateLimited { retry_after }
            | ApiError::TicketHomeUnavailable { retry_after } => Some(*retry_after),
            ApiError::StoreUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Builds the JSON response. `realm` is named in `WWW-Authenticate`.
    pub fn to_response(&self, realm: Option<&str>) -> Response {
        let body = ErrorBody {
            error: self.code(),
            message: self.message(),
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_seconds() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.challenge(realm) {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(WWW_AUTHENTICATE, value);
            }
        }
        response
    }

    /// Builds the response to a rejected WebSocket upgrade, which also closes
    /// the connection.
    pub fn to_upgrade_response(&self) -> Response {
        let mut response = self.to_response(None);
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        if *self == ApiError::UpgradeRequired {
            response
                .headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
        }
        response
    }

    /// Returns the close code of `--reject-with close`: 4000 + the HTTP
    /// status of the same rejection.
    pub fn close_code(&self) -> u16 {
        4000 + self.status().as_u16()
    }

    /// Returns the close reason of `--reject-with close`: the JSON object
    /// `{"error":"<code>"}`, plus `"retry_after"` in seconds where the HTTP
    /// response has `Retry-After`. It stays within the 123 bytes a close frame
    /// allows: the longest upgrade code, `ticket_home_unavailable`, has 23
    /// characters, and a test checks every code.
    pub fn close_reason(&self) -> String {
        let mut reason = serde_json::json!({ "error": self.code() });
        if let Some(seconds) = self.retry_after_seconds() {
            reason["retry_after"] = seconds.into();
        }
        reason.to_string()
    }

    fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after()
            .map(|retry_after| retry_after.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Builds the RFC 6750 challenge: plain `Bearer` when no token came, with
    /// `error="invalid_token"` when one was rejected.
    fn challenge(&self, realm: Option<&str>) -> Option<String> {
        let mut params = Vec::new();
        if let Some(realm) = realm.filter(|realm| !realm.contains(['"', '\\'])) {
            params.push(format!("realm=\"{realm}\""));
        }
        match self {
            ApiError::MissingToken => {}
            ApiError::InvalidToken | ApiError::TokenExpired | ApiError::InvalidAdminToken => {
                params.push("error=\"invalid_token\"".to_string());
            }
            _ => return None,
        }
        if params.is_empty() {
            Some("Bearer".to_string())
        } else {
            Some(format!("Bearer {}", params.join(", ")))
        }
    }
}

impl From<RedeemError> for ApiError {
    fn from(err: RedeemError) -> Self {
        match err {
            RedeemError::Unknown => ApiError::InvalidTicket,
            RedeemError::AlreadyUsed => ApiError::TicketAlreadyUsed,
            RedeemError::Expired => ApiError::TicketExpired,
            RedeemError::OriginMismatch => ApiError::OriginNotAllowed,
            RedeemError::Store => ApiError::StoreUnavailable,
            RedeemError::HomeUnavailable => ApiError::TicketHomeUnavailable {
                retry_after: crate::cluster::retry_after_home_unavailable(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns every error an upgrade can end with, as `--reject-with close` sends it.
    fn upgrade_errors() -> Vec<ApiError> {
        let wait = Duration::from_secs(86_400);
        vec![
            ApiError::MissingTicket,
            ApiError::InvalidTicket,
            ApiError::TicketAlreadyUsed,
            ApiError::TicketExpired,
            ApiError::OriginNotAllowed,
            ApiError::InvalidRequest("x"),
            ApiError::StoreUnavailable,
            ApiError::UpstreamUnavailable,
            ApiError::UpgradesRateLimited { retry_after: wait },
            ApiError::TooManyConnections,
            ApiError::TicketHomeUnavailable { retry_after: wait },
        ]
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        for error in upgrade_errors() {
            let reason = error.close_reason();
            assert!(reason.len() <= 123, "{} bytes: {reason}", reason.len());
            let parsed: serde_json::Value = serde_json::from_str(&reason).expect("JSON reason");
            assert_eq!(parsed["error"], error.code());
        }
    }

    #[test]
    fn close_codes_add_4000_to_status() {
        assert_eq!(ApiError::MissingTicket.close_code(), 4401);
        assert_eq!(ApiError::TicketExpired.close_code(), 4401);
        assert_eq!(ApiError::InvalidTicket.close_code(), 4403);
        assert_eq!(ApiError::TicketAlreadyUsed.close_code(), 4403);
        assert_eq!(ApiError::OriginNotAllowed.close_code(), 4403);
        assert_eq!(ApiError::TooManyConnections.close_code(), 4429);
        assert_eq!(ApiError::UpstreamUnavailable.close_code(), 4502);
        assert_eq!(ApiError::StoreUnavailable.close_code(), 4503);
    }

    #[test]
    fn retry_after_is_in_close_reason() {
        let limited = ApiError::UpgradesRateLimited {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(limited.close_code(), 4429);
        assert_eq!(
            limited.close_reason(),
            r#"{"error":"rate_limited","retry_after":2}"#
        );
        assert_eq!(
            ApiError::StoreUnavailable.close_reason(),
            r#"{"error":"store_unavailable","retry_after":1}"#
        );
        assert_eq!(
            ApiError::InvalidTicket.close_reason(),
            r#"{"error":"invalid_ticket"}"#
        );
    }
}
