//! `POST /internal/cluster/consume` on the admin listener: the home node's
//! side of a forwarded consumption. It returns `404` unless cluster mode is
//! on, and `401` to a request without a valid, fresh MAC.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::app::AppState;
use crate::cluster::forward::{self, ConsumeAnswer, ConsumeRequest};
use crate::cluster::records::Published;
use crate::cluster::unix_ms;
use crate::http::ApiError;
use crate::store::RedeemError;
use crate::ticket::log_id;

/// Largest body of a forwarded consumption, in bytes: a hex key and an Origin.
const MAX_BODY_BYTES: u64 = 8 * 1024;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || state.clone());
    // The cluster check comes before the method check, so that without
    // cluster mode every request to the path is a plain 404.
    warp::path!("internal" / "cluster" / "consume")
        .and(with_state)
        .and_then(|state: Arc<AppState>| async move {
            if state.cluster.get().is_none() {
                return Err(warp::reject::not_found());
            }
            Ok(state)
        })
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(MAX_BODY_BYTES))
        .and(warp::body::bytes())
        .then(handle)
}

async fn handle(state: Arc<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let cluster = state
        .cluster
        .get()
        .expect("the route filter only passes in cluster mode");
    let keys = &cluster.config.keys;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let (Some(time), Some(nonce), Some(mac)) = (
        header(forward::TIME_HEADER).and_then(|time| time.parse::<u64>().ok()),
        header(forward::NONCE_HEADER),
        header(forward::MAC_HEADER),
    ) else {
        return unauthenticated(&state, "missing MAC headers", SIGN_MESSAGE);
    };
    if unix_ms().abs_diff(time) > forward::MAX_CLOCK_SKEW_MS {
        return unauthenticated(
            &state,
            "timestamp outside the allowed clock skew",
            "The request's timestamp is more than 30 s away from this node's clock; keep the nodes' clocks in sync.",
        );
    }
    let expected = forward::request_mac(&keys.forward, time, nonce, &body);
    if !forward::mac_matches(&expected, mac) {
        return unauthenticated(&state, "wrong MAC", SIGN_MESSAGE);
    }
    // A request with a valid MAC is run once: a copy sent again within the
    // clock skew window is rejected here.
    if !cluster.remember_nonce(nonce) {
        return unauthenticated(
            &state,
            "replayed nonce",
            "This request was already received; sign each request with a new nonce.",
        );
    }

    let request: ConsumeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(_) => {
            return ApiError::InvalidRequest("The body is not a consume request.").to_response(None)
        }
    };
    let Some(key) = forward::parse_key(&request.key) else {
        return ApiError::InvalidRequest("The key is not 64 hex characters.").to_response(None);
    };
    // The consumption runs in its own task, so that it completes, is
    // published and is counted even when the forwarding node gives up and
    // closes the connection meanwhile, which makes hyper drop this future.
    // Without the task, a ticket could end up used on disk but never
    // published as used.
    let consumption = tokio::spawn({
        let store = state.store.clone();
        let cluster = cluster.clone();
        async move {
            let result = store.consume(&key, request.origin.as_deref()).await;
            if result.is_ok() {
                cluster.publish(&key, Published::Used).await;
            }
            let label = if result.is_ok() {
                "consumed"
            } else {
                "rejected"
            };
            cluster.metrics.served.with_label_values(&[label]).inc();
            tracing::debug!(ticket_id = %log_id(&key), result = label, "ran a forwarded consumption");
            result
        }
    });
    let result = match consumption.await {
        Ok(result) => result,
        Err(err) => {
            tracing::error!(event = "cluster_consume_failed", error = %err, "a forwarded consumption task failed");
            Err(RedeemError::Store)
        }
    };

    let answer = ConsumeAnswer::from_result(result);
    let body = serde_json::to_vec(&answer).expect("an answer always serialises");
    let mac = forward::answer_mac(&keys.forward, nonce, &body);
    let mut response = warp::reply::with_status(body, StatusCode::OK).into_response();
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = http::HeaderValue::from_str(&mac) {
        headers.insert(forward::MAC_HEADER, value);
    }
    response
}

/// Message of a request without a valid MAC.
const SIGN_MESSAGE: &str = "Sign the request with the cluster secret.";

fn unauthenticated(state: &AppState, reason: &'static str, message: &'static str) -> Response {
    if let Some(cluster) = state.cluster.get() {
        cluster.metrics.forward_unauthenticated.inc();
    }
    tracing::warn!(
        event = "cluster_forward_unauthenticated",
        reason,
        "rejected a forwarded consumption without a valid MAC"
    );
    let body = serde_json::json!({
        "error": "invalid_cluster_mac",
        "message": message,
    });
    crate::http::json_response(StatusCode::UNAUTHORIZED, &body)
}
