//! The admin listener: metrics, liveness and readiness.

use std::convert::Infallible;
use std::sync::Arc;

use http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::app::AppState;
use crate::http::json_response;

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || state.clone());

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<AppState>| {
            warp::reply::with_header(
                state.metrics.render(),
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .into_response()
        });

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" })));

    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state)
        .and_then(|state: Arc<AppState>| async move {
            let report = state.is_ready();
            let status = if report.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::json!({ "ready": report.ready(), "checks": report });
            if let Some(cluster) = state.cluster.get() {
                let members: serde_json::Map<String, serde_json::Value> = cluster
                    .members()
                    .await
                    .into_iter()
                    .map(|(index, admin)| (index.to_string(), admin.to_string().into()))
                    .collect();
                body["cluster"] = serde_json::json!({
                    "node_id": cluster.config.node_id,
                    "live_nodes": members,
                    "tickets_published_by_others": cluster.published_by_others().await,
                });
            }
            Ok::<_, Infallible>(json_response(status, &body))
        });

    metrics.or(healthz).unify().or(readyz).unify()
}
