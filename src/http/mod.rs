//! The HTTP surface: the warp filter trees of the public and admin listeners,
//! and the WebSocket upgrade.
//!
//! The upgrade is handled on hyper directly rather than through warp's `ws()`
//! filter, because warp gives every connection tungstenite's default 128 KiB
//! read buffer and offers no way to shrink it; here each connection gets a
//! small buffer sized for idle connections.

pub mod admin;
pub mod client_js;
pub mod cluster;
pub mod error;
pub mod redeem;
pub mod ticket;
pub mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;

use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::app::AppState;
pub use error::ApiError;

/// Builds the filter tree of the public listener, except `/ws`.
pub fn public_routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    ticket::routes(state)
        .or(client_js::routes())
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// Builds the filter tree of the admin listener.
pub fn admin_routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    admin::routes(state.clone())
        .or(redeem::routes(state.clone()))
        .unify()
        .or(cluster::routes(state))
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// Turns warp's rejections (no route, wrong method, CORS) into JSON errors.
async fn handle_rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ApiError::NotFound
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rejection.find::<warp::cors::CorsForbidden>().is_some() {
        ApiError::OriginNotAllowed
    } else {
        tracing::debug!(?rejection, "request rejected by the router");
        ApiError::InvalidRequest("The request is malformed.")
    };
    Ok(error.to_response(None))
}

/// Attaches the request id to a response.
pub fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = http::HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Wraps a value as a JSON reply with a status.
pub fn json_response<T: serde::Serialize>(status: http::StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}
