//! The one error type of every HTTP answer, mapped in one place to a status,
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
    /// A request the server cannot parse; the message says what is wrong.
    InvalidRequest(&'static str),
    UpgradeRequired,
    NotFound,
    MethodNotAllowed,
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
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AuthUnavailable { .. } | StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
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
        }
    }

    /// Tells whether the server, not the client, caused the error.
    pub fn is_server_side(&self) -> bool {
        matches!(
            self,
            ApiError::AuthUnavailable { .. } | ApiError::StoreUnavailable
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::AuthUnavailable { retry_after } => {
                Some(*retry_after)
            }
            ApiError::StoreUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Builds the JSON answer. `realm` is named in `WWW-Authenticate`.
    pub fn to_response(&self, realm: Option<&str>) -> Response {
        let body = ErrorBody {
            error: self.code(),
            message: self.message(),
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        let headers = response.headers_mut();
        if let Some(retry_after) = self.retry_after() {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.challenge(realm) {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(WWW_AUTHENTICATE, value);
            }
        }
        response
    }

    /// Builds the answer to a rejected WebSocket upgrade, which also closes
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

    /// The RFC 6750 challenge: plain `Bearer` when no token came, with
    /// `error="invalid_token"` when one was rejected.
    fn challenge(&self, realm: Option<&str>) -> Option<String> {
        let mut params = Vec::new();
        if let Some(realm) = realm.filter(|realm| !realm.contains(['"', '\\'])) {
            params.push(format!("realm=\"{realm}\""));
        }
        match self {
            ApiError::MissingToken => {}
            ApiError::InvalidToken | ApiError::TokenExpired => {
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
