//! `wsticket demo --browser`: the ticket flow in a real browser page.
//!
//! It starts the same in-process server as `wsticket demo`, plus a second
//! loopback warp server that serves the demo issuer's JWKS, a demo page and a
//! `POST /login` that signs a short-lived demo JWT. The page imports the
//! browser client from the wsticket listener's `/client.js`, so it runs on
//! another origin, which the server allows with `--allowed-origin`. The demo
//! key exists only inside this process: `serve` has no built-in issuer.
//! Nothing here prints a token or a ticket.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL};
use tokio::net::TcpListener;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::demo::{demo_config, fail, server_argv, wait_ready, DemoError, DemoIssuer, DemoServer};
use crate::server;

/// Lifetime of a JWT from `POST /login`. The page logs in again when its JWT
/// has less than 10 s left.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Ticket lifetime of the demo server: the client uses a ticket within
/// milliseconds, so the `dev` profile's default is plenty.
const TICKET_TTL: Duration = Duration::from_secs(60);
const SUBJECT: &str = "demo-user";
const PAGE_TEMPLATE: &str = include_str!("demo_browser.html");

/// Runs the browser demo until SIGINT or SIGTERM.
pub async fn run() -> ExitCode {
    match serve_page().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nDemo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_page() -> Result<(), DemoError> {
    let issuer = Arc::new(DemoIssuer::generate()?);
    let page_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|err| fail(format!("cannot bind the page server: {err}")))?;
    let page_addr = page_listener
        .local_addr()
        .map_err(|err| fail(format!("page server address: {err}")))?;
    let page_origin = format!("http://{page_addr}");
    let jwks_url = format!("{page_origin}/.well-known/jwks.json");

    let data_dir =
        tempfile::tempdir().map_err(|err| fail(format!("temporary directory: {err}")))?;
    let mut argv = server_argv(&jwks_url, TICKET_TTL, &data_dir.path().join("store"))?;
    argv.extend(["--allowed-origin".to_string(), page_origin.clone()]);
    // The wsticket server starts fetching the JWKS at once. The page listener
    // is already bound, so that request waits in its backlog until the page
    // server below accepts it.
    let server = DemoServer::start(demo_config(&argv)?).await?;
    let (public, admin) = (server.public, server.admin);

    let page = render_page(public);
    tokio::spawn(
        warp::serve(page_routes(issuer, page))
            .incoming(page_listener)
            .run(),
    );
    wait_ready(&reqwest::Client::new(), admin).await?;

    println!("wsticket demo --browser: the ticket flow in a browser page, on loopback only.\n");
    println!(
        "  wsticket server   http://{public} (admin http://{admin}), allows Origin {page_origin}"
    );
    println!("  demo issuer       JWKS at {jwks_url}; POST {page_origin}/login signs a JWT for {SUBJECT}");
    println!("\nOpen {page_origin}/ in a browser. Press Ctrl-C to stop.");

    server::shutdown_signal().await;
    println!("\nStopping: open WebSockets are closed with 1001.");
    server.stop().await;
    Ok(())
}

/// Fills the page template with the wsticket listener's address.
fn render_page(public: SocketAddr) -> String {
    PAGE_TEMPLATE.replace("{{WSTICKET_ORIGIN}}", &format!("http://{public}"))
}

fn page_routes(
    issuer: Arc<DemoIssuer>,
    page: String,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let jwks = issuer.jwks.clone();
    let jwks_route = warp::path!(".well-known" / "jwks.json")
        .and(warp::get())
        .map(move || warp::reply::json(&jwks).into_response());
    let page_route = warp::path::end()
        .and(warp::get())
        .map(move || warp::reply::html(page.clone()).into_response());
    let login_route = warp::path!("login")
        .and(warp::post())
        .map(move || login(&issuer));
    jwks_route.or(page_route).unify().or(login_route).unify()
}

/// Signs a demo JWT for the page. Anyone on this machine can call it, which
/// is harmless: the key and the server it unlocks live only as long as the demo.
fn login(issuer: &DemoIssuer) -> Response {
    let mut response = match issuer.sign(SUBJECT, TOKEN_LIFETIME) {
        Ok(token) => warp::reply::json(&serde_json::json!({
            "token": token,
            "subject": SUBJECT,
            "expires_in": TOKEN_LIFETIME.as_secs(),
        }))
        .into_response(),
        Err(err) => {
            eprintln!("[login] signing a demo JWT failed: {err}");
            warp::reply::with_status(
                warp::reply::json(&serde_json::json!({"error": "login_failed"})),
                http::StatusCode::INTERNAL_SERVER_ERROR,
            )
            .into_response()
        }
    };
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;

    async fn call(method: &str, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
        let issuer = Arc::new(DemoIssuer::generate().expect("key pair"));
        let routes = page_routes(issuer, String::from("<p>page</p>"));
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let response = warp::service(routes)
            .call(request)
            .await
            .expect("warp's service is infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    #[test]
    fn page_imports_client_from_server() {
        let page = render_page("127.0.0.1:4321".parse().expect("address"));
        assert!(page.contains("const wsticketOrigin = 'http://127.0.0.1:4321';"));
        assert!(!page.contains("{{"));
    }

    #[tokio::test]
    async fn login_signs_jwt_for_demo_user() {
        let (status, headers, body) = call("POST", "/login").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["subject"], SUBJECT);
        let segments = body["token"].as_str().map(|token| token.split('.').count());
        assert_eq!(segments, Some(3));
    }

    #[tokio::test]
    async fn page_and_jwks_are_served() {
        let (status, _, body) = call("GET", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"<p>page</p>");

        let (status, _, body) = call("GET", "/.well-known/jwks.json").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["keys"][0]["alg"], "EdDSA");
    }
}
