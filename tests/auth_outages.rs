//! JWKS outages: the circuit breaker, stale keys, the max stale time,
//! timeouts, invalid documents, a stopped server, and a start while the
//! JWKS is down. Time-dependent expiry runs on a manual clock; the breaker's
//! open period is 200 ms of real time.

mod auth_support;

use std::time::{Duration, Instant};

use auth_support::*;
use jsonwebtoken::Algorithm::RS256;
use wsticket::auth::breaker::BreakerState;
use wsticket::auth::fetch::FetchError;
use wsticket::auth::AuthError;
use wsticket::clock::Clock;

/// Polls `condition` every 20 ms for up to `limit`.
async fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

fn fresh_token(setup: &Setup, jti: u32) -> String {
    let mut claims = claims(ISSUER, setup.clock.now_secs());
    claims["jti"] = serde_json::json!(jti);
    sign(RS256, Some("rsa-a"), "rsa-a", &claims)
}

#[tokio::test]
async fn breaker_stale_keys_expiry_and_recovery() {
    let logs = CapturedLogs::global();
    let label = "breaker-test-issuer";
    let server = TestServer::serving(fixture("rotation-before.jwks.json")).await;
    let mut settings = store_settings(&server.url, label);
    settings.max_stale = Duration::from_secs(3600);
    let setup = one_issuer(settings, ALL_ALGORITHMS, clock());
    setup.store.refresh_now().await.expect("first load");
    assert!(setup.verifier.verify(&fresh_token(&setup, 1)).await.is_ok());

    // Two failures open the breaker; then no request goes out.
    server.set(Behaviour::Status(500));
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::Status(500))
    ));
    assert_eq!(setup.store.breaker_state(), BreakerState::Closed);
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::Status(500))
    ));
    assert_eq!(setup.store.breaker_state(), BreakerState::Open);
    assert_eq!(setup.metrics.jwks_breaker_state.get(), 2);
    let requests = server.requests();
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::BreakerOpen)
    ));
    assert_eq!(server.requests(), requests);

    // Stale keys keep verifying within the max stale time.
    setup.clock.advance(Duration::from_secs(3000));
    assert!(setup.verifier.verify(&fresh_token(&setup, 2)).await.is_ok());
    assert!(setup.store.has_keys());

    // Past it, the keys are dropped: unavailable, not invalid.
    setup.clock.advance(Duration::from_secs(700));
    let outcome = setup.verifier.verify(&fresh_token(&setup, 3)).await;
    assert!(
        matches!(outcome, Err(AuthError::Unavailable { .. })),
        "{outcome:?}"
    );
    assert!(!setup.store.has_keys());
    assert_eq!(setup.metrics.jwks_keys_loaded.get(), 0);
    assert_eq!(logs.lines_with(&["jwks_keys_expired", label]).len(), 1);

    // After the open period, a successful probe closes the breaker.
    server.serve(fixture("rotation-before.jwks.json"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    setup.store.refresh_now().await.expect("probe succeeds");
    assert_eq!(setup.store.breaker_state(), BreakerState::Closed);
    assert_eq!(setup.metrics.jwks_breaker_state.get(), 0);
    assert!(setup.verifier.verify(&fresh_token(&setup, 4)).await.is_ok());

    for state in [
        "\"state\":\"open\"",
        "\"state\":\"half_open\"",
        "\"state\":\"closed\"",
    ] {
        let lines = logs.lines_with(&["breaker_state", label, state]);
        assert_eq!(lines.len(), 1, "{state}: {lines:?}");
    }
    let opened = logs.lines_with(&["breaker_state", label, "\"state\":\"open\""]);
    assert!(opened[0].contains("HTTP status 500"), "{}", opened[0]);
}

#[tokio::test]
async fn failed_probe_reopens_breaker() {
    let server = TestServer::start(Behaviour::Status(503)).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    for _ in 0..2 {
        assert!(setup.store.refresh_now().await.is_err());
    }
    assert_eq!(setup.store.breaker_state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::Status(503))
    ));
    assert_eq!(setup.store.breaker_state(), BreakerState::Open);
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn hanging_jwks_times_out() {
    let server = TestServer::serving(fixture("rotation-before.jwks.json")).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    setup.store.refresh_now().await.expect("first load");

    server.set(Behaviour::Hang);
    let started = Instant::now();
    let outcome = setup.store.refresh_now().await;
    assert!(matches!(outcome, Err(FetchError::Timeout)), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        setup
            .metrics
            .jwks_fetches
            .with_label_values(&["timeout"])
            .get(),
        1
    );
    assert!(setup.verifier.verify(&fresh_token(&setup, 1)).await.is_ok());
}

#[tokio::test]
async fn invalid_json_keeps_keys() {
    let server = TestServer::serving(fixture("rotation-before.jwks.json")).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    setup.store.refresh_now().await.expect("first load");

    server.serve("{\"keys\": [".to_string());
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::Invalid(_))
    ));
    server.serve("{\"keys\": []}".to_string());
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::NoUsableKey)
    ));
    assert!(setup.verifier.verify(&fresh_token(&setup, 1)).await.is_ok());
    assert_eq!(setup.metrics.jwks_keys_loaded.get(), 1);
}

#[tokio::test]
async fn stopped_server_keeps_keys() {
    let server = TestServer::serving(fixture("rotation-before.jwks.json")).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    setup.store.refresh_now().await.expect("first load");

    server.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(
        setup.store.refresh_now().await,
        Err(FetchError::Request(_))
    ));
    assert!(setup.verifier.verify(&fresh_token(&setup, 1)).await.is_ok());
}

#[tokio::test]
async fn start_while_jwks_down_then_ready() {
    let server = TestServer::start(Behaviour::Status(500)).await;
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    let refresh = tokio::spawn(setup.store.clone().run_refresh());

    assert!(wait_for(Duration::from_secs(2), || server.requests() >= 1).await);
    assert!(!setup.verifier.keys().has_keys());
    let outcome = setup.verifier.verify(&fresh_token(&setup, 1)).await;
    assert!(
        matches!(outcome, Err(AuthError::Unavailable { .. })),
        "{outcome:?}"
    );

    server.serve(fixture("rotation-before.jwks.json"));
    // The background retry (at most `refresh_min`, 1 s here, once the
    // breaker's 200 ms open period is over) loads the keys.
    assert!(wait_for(Duration::from_secs(5), || setup.store.has_keys()).await);
    assert!(setup.verifier.verify(&fresh_token(&setup, 2)).await.is_ok());
    refresh.abort();
}

#[tokio::test]
async fn start_fetch_leaves_refetch_available() {
    let server = TestServer::serving(fixture("rotation-before.jwks.json")).await;
    let mut settings = store_settings(&server.url, ISSUER);
    settings.refetch_interval = Duration::from_secs(60);
    let setup = one_issuer(settings, ALL_ALGORITHMS, clock());
    let refresh = tokio::spawn(setup.store.clone().run_refresh());
    assert!(wait_for(Duration::from_secs(2), || setup.store.has_keys()).await);

    server.serve(fixture("rotation-after.jwks.json"));
    let token = sign(
        RS256,
        Some("rsa-rot"),
        "rsa-rot",
        &claims(ISSUER, setup.clock.now_secs()),
    );
    assert!(setup.verifier.verify(&token).await.is_ok());
    assert_eq!(server.requests(), 2);
    refresh.abort();
}

#[tokio::test]
async fn refresh_follows_cache_control() {
    let server = TestServer::start(Behaviour::Serve {
        body: fixture("rotation-before.jwks.json"),
        cache_control: Some("public, max-age=0".into()),
    })
    .await;
    // max-age=0 is raised to refresh_min (1 s here).
    let setup = one_issuer(store_settings(&server.url, ISSUER), ALL_ALGORITHMS, clock());
    let refresh = tokio::spawn(setup.store.clone().run_refresh());
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let requests = server.requests();
    refresh.abort();
    assert!((2..=4).contains(&requests), "{requests} fetches in 2.3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_unready_until_jwks_recovers() {
    use clap::Parser;
    use wsticket::config::{Cli, Command, Config};
    use wsticket::server;

    let jwks = TestServer::start(Behaviour::Status(500)).await;
    let data_dir = tempfile::tempdir().expect("temp dir");
    let data_path = data_dir.path().join("store");
    let argv = [
        "wsticket",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--jwks-url",
        &jwks.url,
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        "--data-dir",
        data_path.to_str().expect("UTF-8 path"),
        "--jwks-refetch-interval",
        "100ms",
        "--jwks-refresh-min",
        "1s",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("flags").command else {
        panic!("serve command");
    };
    let config = Config::from_args(*args).expect("valid config");
    let listeners = server::bind(&config).await.expect("binds loopback");
    let public = listeners.public.local_addr().expect("address");
    let admin = listeners.admin.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server::serve(config, listeners, async {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::new();
    let now = wsticket::clock::SystemClock.now_secs();
    let token = sign(RS256, Some("rsa-a"), "rsa-a", &claims(ISSUER, now));
    let request_ticket = || {
        http.post(format!("http://{public}/websocket/ticket"))
            .bearer_auth(&token)
            .send()
    };
    let readyz = || http.get(format!("http://{admin}/readyz")).send();

    assert!(wait_for(Duration::from_secs(2), || jwks.requests() >= 1).await);
    let response = request_ticket().await.expect("answered");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.expect("JSON body");
    assert_eq!(body["error"], "auth_unavailable");
    assert_eq!(readyz().await.expect("answered").status().as_u16(), 503);

    jwks.serve(fixture("rotation-before.jwks.json"));
    // Bounded by the retry delay (1 s) plus one breaker open period (5 s).
    let started = Instant::now();
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(12) && !ready {
        ready = readyz()
            .await
            .is_ok_and(|response| response.status().is_success());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready 12 s after the JWKS recovered");
    assert_eq!(
        request_ticket().await.expect("answered").status().as_u16(),
        200
    );

    let _ = stop.send(());
    let _ = server_task.await;
}
