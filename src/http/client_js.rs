//! `GET /client.js`: the browser client module, embedded in the binary.
//!
//! A page imports it with no build step. Browsers fetch module scripts in CORS
//! mode, so a page on another origin can only import it when the response allows
//! any origin. That is safe here: the file is public and the request carries
//! no credentials. The ETag is the first 128 bits of the file's SHA-256, so a
//! page revalidates cheaply after the short max-age.

use std::sync::OnceLock;

use http::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_ORIGIN, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

/// The module as built into this binary.
pub const CLIENT_JS: &str = include_str!("../../clients/js/wsticket-client.js");

/// Five minutes: a new binary's module reaches pages soon, and the ETag makes
/// a revalidation cost one 304.
const CACHE_CONTROL_VALUE: &str = "public, max-age=300";

/// Builds the `GET /client.js` route.
pub fn routes() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("client.js")
        .and(warp::get())
        .and(warp::header::optional::<String>(IF_NONE_MATCH.as_str()))
        .map(|if_none_match: Option<String>| serve(if_none_match.as_deref()))
}

fn etag() -> &'static str {
    static ETAG_VALUE: OnceLock<String> = OnceLock::new();
    ETAG_VALUE.get_or_init(|| {
        let digest = ring::digest::digest(&ring::digest::SHA256, CLIENT_JS.as_bytes());
        format!("\"{}\"", hex::encode(&digest.as_ref()[..16]))
    })
}

/// Tells whether an `If-None-Match` value names the current ETag (RFC 9110
/// section 13.1.2: a list of tags, weak ones compared by their opaque part).
fn matches_etag(if_none_match: &str, current: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == current)
}

fn serve(if_none_match: Option<&str>) -> Response {
    let etag = etag();
    let mut response = if if_none_match.is_some_and(|value| matches_etag(value, etag)) {
        let mut response = Response::default();
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(CLIENT_JS.into());
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        response
    };
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL_VALUE));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(ETAG, value);
    }
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;

    // NOTE: warp's `test` feature is not enabled in Cargo.toml, so these tests
    // call the filter through `warp::service` instead of `warp::test::request()`.
    async fn call(method: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = http::Request::builder().method(method).uri("/client.js");
        if let Some(value) = if_none_match {
            request = request.header(IF_NONE_MATCH, value);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let response = warp::service(routes())
            .call(request)
            .await
            .expect("warp's service is infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    #[tokio::test]
    async fn client_js_is_served_with_headers() {
        let (status, headers, body) = call("GET", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(headers[CACHE_CONTROL], CACHE_CONTROL_VALUE);
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[ETAG], etag());
        assert_eq!(body.as_ref(), CLIENT_JS.as_bytes());
        assert!(CLIENT_JS.contains("export function connect("));
    }

    #[tokio::test]
    async fn client_js_revalidates_with_etag() {
        let if_none_match = format!("W/{}, \"other\"", etag());
        let (status, headers, body) = call("GET", Some(&if_none_match)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(headers[ETAG], etag());
    }

    #[tokio::test]
    async fn client_js_stale_etag_gets_body() {
        let (status, _, body) = call("GET", Some("\"stale\"")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), CLIENT_JS.len());
    }

    #[tokio::test]
    async fn client_js_rejects_post() {
        let (status, _, _) = call("POST", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
