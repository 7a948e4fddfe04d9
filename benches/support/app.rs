//! A wsticket application state for in-process benchmarks: the verifier
//! loaded with the fixture JWKS, and a sled store in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use wsticket::app::AppState;
use wsticket::auth::Verifier;
use wsticket::clock::{SharedClock, SystemClock};
use wsticket::config::{Cli, Command, Config, SyncMode};
use wsticket::metrics::Metrics;
use wsticket::store::{SledStore, StoreSettings};

/// Everything a benchmark needs; the temporary directory lives as long as it.
pub struct Bench {
    pub state: Arc<AppState>,
    pub store: Arc<SledStore>,
    flusher: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

/// Parses serve flags the way the binary does.
pub fn config(jwks_file: &std::path::Path, data_dir: &std::path::Path, sync: &str) -> Config {
    let argv = [
        "wsticket",
        "serve",
        "--jwks-file",
        jwks_file.to_str().expect("UTF-8 temporary path"),
        "--issuer",
        super::ISSUER,
        "--audience",
        super::AUDIENCE,
        "--data-dir",
        data_dir.to_str().expect("UTF-8 temporary path"),
        "--rate-limit",
        "1000000000",
        "--sync",
        sync,
    ];
    let cli = Cli::try_parse_from(argv).expect("benchmark flags parse");
    let Command::Serve(args) = cli.command else {
        unreachable!("the argv names serve");
    };
    Config::from_args(*args).expect("benchmark configuration is valid")
}

/// Opens a sled store in `dir` with its group-commit flusher running; call
/// inside a tokio runtime.
pub fn open_store(
    dir: &std::path::Path,
    sync: SyncMode,
    clock: SharedClock,
    metrics: Arc<Metrics>,
) -> (Arc<SledStore>, tokio::task::JoinHandle<()>) {
    let settings = StoreSettings {
        path: dir.to_owned(),
        grace: Duration::from_secs(300),
        cache_capacity: 2_000_000,
        sync,
        sync_interval: Duration::from_millis(10),
    };
    let store = Arc::new(SledStore::open(&settings, clock, metrics).expect("the store opens"));
    let flusher = store.spawn_flusher();
    (store, flusher)
}

/// Builds a verifier for the fixture JWKS and loads its keys.
pub async fn verifier(config: &Config, clock: SharedClock, metrics: Arc<Metrics>) -> Verifier {
    let verifier = wsticket::auth::verifier_from_config(config, clock, metrics);
    for store in verifier.keys().stores() {
        store.refresh_now().await.expect("the fixture JWKS loads");
    }
    verifier
}

/// Builds the application state with `--sync sync`; call inside a tokio
/// runtime.
pub async fn bench_state(sync: &str) -> Bench {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let jwks_file = dir.path().join("jwks.json");
    let jwks = super::jwks(&super::default_fixtures());
    std::fs::write(&jwks_file, jwks.to_string()).expect("write the JWKS");
    let config = config(&jwks_file, &dir.path().join("data"), sync);
    let clock: SharedClock = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let (store, flusher) = open_store(
        &config.data_dir,
        config.sync,
        clock.clone(),
        metrics.clone(),
    );
    let verifier = verifier(&config, clock.clone(), metrics.clone()).await;
    let state = Arc::new(AppState::new(
        config,
        verifier,
        store.clone(),
        metrics,
        clock,
    ));
    Bench {
        state,
        store,
        flusher,
        _dir: dir,
    }
}
