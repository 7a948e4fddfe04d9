//! Binds nothing itself: runs the public and admin listeners it is given until
//! a shutdown future resolves, then shuts down in order.
//!
//! The public listener routes `/ws` to the hand-written upgrade and every other
//! path to the warp filter tree, on one hyper connection builder; the admin
//! listener serves only the warp admin routes. On shutdown the server stops
//! accepting, closes every WebSocket with 1001, waits for them up to the
//! shutdown timeout, and flushes the store.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use warp::reply::Response;

use crate::app::AppState;
use crate::auth;
use crate::clock::{SharedClock, SystemClock};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::http::upgrade::ClientAddr;
use crate::http::{self as routes, upgrade};
use crate::metrics::Metrics;
use crate::store::OpenError;
use crate::store::{SledStore, StoreSettings};
use crate::tls::{Tls, TlsError};

/// Most tombstones (used or expired tickets) kept in the in-memory cache in
/// front of the store; older ones are read from disk.
const CACHE_CAPACITY: u64 = 200_000;
/// How often expired tickets are marked and purged.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);
/// How often a store taken out of service by a write failure is reopened.
const STORE_REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// The two bound listeners of a server.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

/// A failure that stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (--{flag}): {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error("opening the store did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterStartError),
}

/// Binds both listeners of `config`.
pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let public = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            flag: "listen",
            addr: config.listen,
            source,
        })?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            flag: "admin-listen",
            addr: config.admin_listen,
            source,
        })?;
    Ok(Listeners { public, admin })
}

/// Runs a server on `listeners` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let tls = match &config.gateway.tls {
        Some(files) => Some(Arc::new(Tls::load(files)?)),
        None => None,
    };
    if tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(event = "tls_disabled", listen = %config.listen, "the public listener is not on loopback and has no TLS; tickets and tokens travel in clear text unless a TLS proxy is in front");
    }
    let clock: SharedClock = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    metrics
        .jwks_max_stale_seconds
        .set(i64::try_from(config.jwks_max_stale.as_secs()).unwrap_or(i64::MAX));

    let store_settings = StoreSettings {
        path: config.data_dir.clone(),
        grace: config.expired_grace,
        cache_capacity: CACHE_CAPACITY,
        sync: config.sync,
        sync_interval: config.sync_interval,
    };
    let store = {
        let (clock, metrics) = (clock.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || SledStore::open(&store_settings, clock, metrics))
            .await??
    };
    let store = Arc::new(store);
    let flusher_task = store.spawn_flusher();
    let repair_task = tokio::spawn(store.clone().run_repair(STORE_REPAIR_INTERVAL));
    tracing::info!(event = "store_opened", path = %config.data_dir.display(), live_tickets = metrics.live_tickets.get(), "ticket store recovered");

    let verifier = auth::verifier_from_config(&config, clock.clone(), metrics.clone());
    let key_stores = verifier.keys().stores().to_vec();

    let state = Arc::new(AppState::new(
        config,
        verifier,
        store.clone(),
        metrics,
        clock,
    ));
    state
        .readiness
        .store_recovered
        .store(true, Ordering::Release);

    let refresh_tasks: Vec<_> = key_stores
        .into_iter()
        .map(|store| tokio::spawn(store.run_refresh()))
        .collect();
    let maintenance_task = tokio::spawn(store.clone().run_maintenance(MAINTENANCE_INTERVAL));
    let limiter_task = tokio::spawn(prune_rate_limiter(state.clone()));
    let audit_task = tokio::spawn(state.audit.clone().run_flusher());

    let cluster = match (state.config.cluster.clone(), admin_addr_of(&listeners)) {
        (Some(config), Some(admin_addr)) => {
            let admin_addr = config
                .admin_advertise
                .unwrap_or_else(|| advertised_admin_addr(admin_addr, config.advertise));
            let record_lifetime = state.config.ticket_ttl + state.config.expired_grace;
            let cluster = Arc::new(
                Cluster::start(config, admin_addr, record_lifetime, &state.metrics).await?,
            );
            let _ = state.cluster.set(cluster.clone());
            tokio::spawn(cluster.clone().run_membership_log());
            tokio::spawn(cluster.clone().run_checks());
            Some(cluster)
        }
        _ => None,
    };

    let stop_accepting = CancellationToken::new();
    let graceful = Arc::new(GracefulShutdown::new());
    let public_addr = listeners.public.local_addr().ok();
    let admin_addr = listeners.admin.local_addr().ok();
    let reload_task = tls
        .clone()
        .map(|tls| tokio::spawn(crate::tls::reload_on_sighup(tls)));
    let public_task = tokio::spawn(accept_public(
        listeners.public,
        tls,
        state.clone(),
        stop_accepting.clone(),
        graceful.clone(),
    ));
    let admin_task = tokio::spawn(accept_admin(
        listeners.admin,
        state.clone(),
        stop_accepting.clone(),
        graceful.clone(),
    ));
    state
        .readiness
        .listener_bound
        .store(true, Ordering::Release);
    if let Some(addr) = public_addr {
        tracing::info!(event = "listening", listener = "public", addr = %addr, "public listener ready");
    }
    if let Some(addr) = admin_addr {
        tracing::info!(event = "listening", listener = "admin", addr = %addr, "admin listener ready");
    }

    shutdown.await;
    tracing::info!(
        event = "shutdown_started",
        open_connections = state.metrics.open_connections.get(),
        "shutting down"
    );
    stop_accepting.cancel();
    let _ = tokio::join!(public_task, admin_task);
    state.shutdown.cancel();
    state.connections.close();
    let drained = tokio::time::timeout(state.config.gateway.shutdown_timeout, async {
        // The accept tasks have ended, so this is the last reference.
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            graceful.shutdown().await;
        }
        state.connections.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            event = "shutdown_timeout",
            "connections still open after the shutdown timeout"
        );
    }
    for task in &refresh_tasks {
        task.abort();
    }
    maintenance_task.abort();
    limiter_task.abort();
    audit_task.abort();
    state.audit.flush_all();
    if let Some(task) = reload_task {
        task.abort();
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    flusher_task.abort();
    repair_task.abort();
    if let Err(err) = store.flush_now().await {
        tracing::error!(event = "store_error", error = %err, "final flush of the store failed");
    }
    tracing::info!(event = "shutdown_finished", "server stopped");
    Ok(())
}

fn admin_addr_of(listeners: &Listeners) -> Option<SocketAddr> {
    listeners.admin.local_addr().ok()
}

/// Returns the admin address peers can reach when `--cluster-admin-advertise`
/// is not given: an unspecified admin IP (`0.0.0.0` or `::`) is replaced by
/// the advertised gossip IP.
fn advertised_admin_addr(admin: SocketAddr, gossip: SocketAddr) -> SocketAddr {
    if admin.ip().is_unspecified() {
        SocketAddr::new(gossip.ip(), admin.port())
    } else {
        admin
    }
}

/// Drops rate-limiter state of subjects not seen for a while, so the
/// limiter's memory follows the number of active users.
async fn prune_rate_limiter(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        state.ticket_limiter.retain_recent();
        state.ticket_limiter.shrink_to_fit();
        state.gateway.prune();
    }
}

fn connection_builder(header_timeout: Duration) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
}

async fn accept_public(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    state: Arc<AppState>,
    stop: CancellationToken,
    graceful: Arc<GracefulShutdown>,
) {
    let header_timeout = state.config.header_timeout;
    let routes = warp::service(routes::public_routes(state.clone()));
    loop {
        let Some(stream) = accept(&listener, &stop).await else {
            return;
        };
        let state = state.clone();
        let routes = routes.clone();
        let client_addr = stream.peer_addr().ok().map(ClientAddr);
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let state = state.clone();
            let mut routes = routes.clone();
            if let Some(client_addr) = client_addr {
                request.extensions_mut().insert(client_addr);
            }
            async move {
                if request.uri().path() == "/ws" {
                    Ok::<Response, Infallible>(upgrade::handle(state, request).await)
                } else {
                    routes.call(request).await
                }
            }
        });
        let Some(tls) = tls.clone() else {
            spawn_plain_connection(stream, service, header_timeout, &graceful, &stop, "HTTP");
            continue;
        };
        // The handshake runs in the connection's task, so a slow client
        // cannot hold up the accept loop. The task gives up its reference to
        // `graceful` as soon as it can, because shutdown needs the last one.
        let graceful = graceful.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(header_timeout, tls.accept(stream)) => handshake,
                () = stop.cancelled() => return,
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
            let connection = connection_builder(header_timeout)
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            drop(graceful);
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HTTPS connection ended with an error");
            }
        });
    }
}

async fn accept_admin(
    listener: TcpListener,
    state: Arc<AppState>,
    stop: CancellationToken,
    graceful: Arc<GracefulShutdown>,
) {
    let header_timeout = state.config.header_timeout;
    let routes = warp::service(routes::admin_routes(state));
    loop {
        let Some(stream) = accept(&listener, &stop).await else {
            return;
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        spawn_plain_connection(stream, service, header_timeout, &graceful, &stop, "admin");
    }
}

/// Serves one plain-TCP connection in its own task, once its first byte has
/// arrived. The task gives up its reference to `graceful` as soon as the
/// connection is watched, because shutdown needs the last one.
fn spawn_plain_connection<S, B>(
    stream: tokio::net::TcpStream,
    service: S,
    header_timeout: Duration,
    graceful: &Arc<GracefulShutdown>,
    stop: &CancellationToken,
    listener: &'static str,
) where
    S: hyper::service::Service<Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = graceful.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        if !first_byte_arrives(&stream, header_timeout, &stop).await {
            return;
        }
        let connection = connection_builder(header_timeout)
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        drop(graceful);
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, listener, "connection ended with an error");
        }
    });
}

/// Accepts the next connection, or returns `None` once `stop` is cancelled.
/// Accept errors (such as running out of file descriptors) are retried after
/// a short pause instead of ending the server, and logged at most once a
/// second with the number of failures since the last line.
async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<tokio::net::TcpStream> {
    let mut last_logged: Option<std::time::Instant> = None;
    let mut unlogged_failures: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some(stream);
                }
                Err(err) => {
                    unlogged_failures += 1;
                    if last_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::error!(event = "accept_failed", error = %err, failures = unlogged_failures, "accepting connections failed");
                        last_logged = Some(std::time::Instant::now());
                        unlogged_failures = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Waits up to the header timeout for a new connection's first byte, so a
/// client that connects and sends nothing does not hold a file descriptor.
/// hyper's header timeout only starts once a request has begun.
/// Returns false as well once the server starts shutting down.
async fn first_byte_arrives(
    stream: &tokio::net::TcpStream,
    timeout: Duration,
    stop: &CancellationToken,
) -> bool {
    let mut byte = [0u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout(timeout, stream.peek(&mut byte)) => {
            matches!(peeked, Ok(Ok(read)) if read > 0)
        }
        () = stop.cancelled() => false,
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
