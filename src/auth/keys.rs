//! The verification keys of one JWKS, and how they are fetched and refreshed.
//!
//! The key set is an immutable snapshot behind an `RwLock<Arc<_>>`: verifiers
//! clone the `Arc` and never hold the lock while verifying. Fetches happen in
//! three places: at start, on a background schedule that follows the
//! response's `Cache-Control: max-age` within configured bounds, and when a
//! token names a `kid` the set does not have (or arrives while no key is
//! loaded). The last kind is single-flight (one fetch serves every request
//! waiting on it) and runs at most once per refetch interval, so a flood of
//! tokens with random `kid`s cannot turn into a flood of fetches. The start-up
//! fetch does not count against that interval.
//!
//! Every fetch goes through a circuit breaker. A failed fetch never replaces
//! the keys in use: the last good keys keep verifying until `max_stale` after
//! the last successful fetch, measured on the injected clock, and are dropped
//! then, so tokens get `auth_unavailable` rather than being checked against
//! keys that may have been revoked long ago.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use tokio::sync::Mutex as AsyncMutex;

use crate::auth::breaker::{Breaker, BreakerSettings, BreakerState};
use crate::auth::fetch::{self, FetchError};
use crate::auth::jwks::{self, SkippedKey, VerifyingKey};
use crate::clock::SharedClock;
use crate::config::JwksSource;
use crate::metrics::Metrics;

/// Refresh interval when the response has no usable `Cache-Control: max-age`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// How many keys a token without `kid` is tried against.
pub const MAX_KIDLESS_CANDIDATES: usize = 4;

/// Settings of a [`KeyStore`].
#[derive(Debug, Clone)]
pub struct KeyStoreSettings {
    pub source: JwksSource,
    /// The issuer or issuers this JWKS serves, for logs.
    pub issuer: String,
    pub refetch_interval: Duration,
    pub refresh_min: Duration,
    pub refresh_max: Duration,
    pub timeout: Duration,
    /// How long the last good keys keep verifying after the last successful
    /// fetch.
    pub max_stale: Duration,
    /// First retry delay of the background refresh after a failed fetch; it
    /// doubles up to `refresh_min`.
    pub retry_min: Duration,
    pub breaker: BreakerSettings,
}

impl KeyStoreSettings {
    /// Returns settings with the defaults of the command-line flags.
    pub fn new(source: JwksSource, issuer: impl Into<String>) -> Self {
        KeyStoreSettings {
            source,
            issuer: issuer.into(),
            refetch_interval: Duration::from_secs(30),
            refresh_min: Duration::from_secs(60),
            refresh_max: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            max_stale: Duration::from_secs(24 * 3600),
            retry_min: Duration::from_secs(1),
            breaker: BreakerSettings::default(),
        }
    }
}

#[derive(Default)]
struct Snapshot {
    keys: Vec<VerifyingKey>,
    /// Every `kid` in the document, skipped keys included, so a token naming
    /// an unusable key does not trigger a refetch.
    known_kids: HashSet<String>,
    /// Milliseconds since the epoch of the fetch that produced these keys.
    fetched_at_ms: Option<u64>,
}

struct Fetched {
    keys: Vec<VerifyingKey>,
    skipped: Vec<SkippedKey>,
    max_age: Option<Duration>,
}

/// Called with the thumbprints of keys that left the set.
pub type RemovalListener = Box<dyn Fn(&HashSet<String>) + Send + Sync>;

/// The JWKS gauges of one server, which may have a key store per issuer:
/// keys loaded are summed, the breaker state is the worst one, and the age of
/// the last success is the oldest one.
pub struct JwksGauges {
    metrics: Arc<Metrics>,
    sources: Mutex<Vec<SourceStatus>>,
}

#[derive(Clone, Copy)]
struct SourceStatus {
    keys: usize,
    fetched_at_ms: Option<u64>,
    breaker: BreakerState,
}

impl JwksGauges {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(JwksGauges {
            metrics,
            sources: Mutex::new(Vec::new()),
        })
    }

    fn register(&self) -> usize {
        let mut sources = self.lock();
        sources.push(SourceStatus {
            keys: 0,
            fetched_at_ms: None,
            breaker: BreakerState::Closed,
        });
        sources.len() - 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SourceStatus>> {
        self.sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, slot: usize, now_ms: u64, change: impl FnOnce(&mut SourceStatus)) {
        let mut sources = self.lock();
        if let Some(status) = sources.get_mut(slot) {
            change(status);
        }
        let keys: usize = sources.iter().map(|status| status.keys).sum();
        let breaker = sources
            .iter()
            .map(|status| status.breaker)
            .max()
            .unwrap_or(BreakerState::Closed);
        let oldest_success_ms = sources
            .iter()
            .filter_map(|status| status.fetched_at_ms)
            .min();
        drop(sources);

        self.metrics.jwks_keys_loaded.set(keys as i64);
        self.metrics.jwks_breaker_state.set(breaker as i64);
        let age = match oldest_success_ms {
            Some(at) => i64::try_from(now_ms.saturating_sub(at) / 1000).unwrap_or(i64::MAX),
            None => -1,
        };
        self.metrics.jwks_last_success_age_seconds.set(age);
    }
}

pub struct KeyStore {
    settings: KeyStoreSettings,
    http: reqwest::Client,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Counts completed fetches, so a request that waited on the single-flight
    /// lock can tell whether a fetch finished while it waited.
    generation: AtomicU64,
    refetch_gate: AsyncMutex<Option<Instant>>,
    warned_skips: Mutex<HashSet<SkippedKey>>,
    breaker: Breaker,
    removal_listeners: Mutex<Vec<RemovalListener>>,
    clock: SharedClock,
    gauges: Arc<JwksGauges>,
    gauge_slot: usize,
}

impl KeyStore {
    pub fn new(settings: KeyStoreSettings, clock: SharedClock, gauges: Arc<JwksGauges>) -> Self {
        let gauge_slot = gauges.register();
        let breaker = {
            let (gauges, clock) = (gauges.clone(), clock.clone());
            Breaker::new(
                "jwks",
                settings.issuer.clone(),
                &settings.breaker,
                Box::new(move |state| {
                    gauges.update(gauge_slot, clock.now_ms(), |status| status.breaker = state)
                }),
            )
        };
        KeyStore {
            http: fetch::http_client(settings.timeout),
            settings,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            generation: AtomicU64::new(0),
            refetch_gate: AsyncMutex::new(None),
            warned_skips: Mutex::new(HashSet::new()),
            breaker,
            removal_listeners: Mutex::new(Vec::new()),
            clock,
            gauges,
            gauge_slot,
        }
    }

    /// Returns the issuer or issuers this JWKS serves.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Returns the state of this JWKS's circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Registers a function called with the thumbprints of keys that
    /// disappear at a refresh or are dropped for being too stale.
    pub fn on_keys_removed(&self, listener: RemovalListener) {
        self.removal_listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(listener);
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Returns the snapshot if it has keys younger than `max_stale`. Keys
    /// past that age are dropped here, the first time anyone looks.
    fn usable(&self) -> Option<Arc<Snapshot>> {
        let snapshot = self.current();
        let fetched_at = snapshot.fetched_at_ms?;
        let age_ms = self.clock.now_ms().saturating_sub(fetched_at);
        let max_stale_ms = u64::try_from(self.settings.max_stale.as_millis()).unwrap_or(u64::MAX);
        if age_ms <= max_stale_ms {
            return Some(snapshot);
        }
        self.drop_stale(&snapshot);
        None
    }

    fn drop_stale(&self, stale: &Arc<Snapshot>) {
        {
            let mut slot = self
                .snapshot
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // A fetch may have installed fresh keys since `stale` was read.
            if !Arc::ptr_eq(&slot, stale) {
                return;
            }
            *slot = Arc::new(Snapshot::default());
        }
        let removed = stale
            .keys
            .iter()
            .map(|key| key.thumbprint.clone())
            .collect();
        self.notify_removed(&removed);
        self.gauges
            .update(self.gauge_slot, self.clock.now_ms(), |status| {
                status.keys = 0
            });
        tracing::error!(
            event = "jwks_keys_expired",
            issuer = %self.settings.issuer,
            max_stale_seconds = self.settings.max_stale.as_secs(),
            "JWKS keys dropped: no successful fetch within the max stale time; tokens of this issuer get auth_unavailable until a fetch succeeds"
        );
    }

    /// Tells whether any usable key is loaded and not too stale.
    pub fn has_keys(&self) -> bool {
        self.usable().is_some()
    }

    /// Tells whether a key with this RFC 7638 thumbprint is loaded and not
    /// too stale.
    pub fn has_key(&self, thumbprint: &str) -> bool {
        self.usable()
            .is_some_and(|snapshot| snapshot.keys.iter().any(|key| key.thumbprint == thumbprint))
    }

    /// Returns the keys that may verify a token with this `kid` and `alg`.
    ///
    /// A token that names a `kid` is only tried against keys with that `kid`
    /// (several keys may share one), never against keys without `kid`. A
    /// token without `kid` is tried against at most
    /// [`MAX_KIDLESS_CANDIDATES`] keys whose type fits its `alg`.
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<VerifyingKey> {
        let Some(snapshot) = self.usable() else {
            return Vec::new();
        };
        let fitting = snapshot.keys.iter().filter(|key| key.accepts(alg));
        match kid {
            Some(kid) => fitting
                .filter(|key| key.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => fitting.take(MAX_KIDLESS_CANDIDATES).cloned().collect(),
        }
    }

    /// Tells whether the document named this `kid`, usable or not.
    pub fn knows_kid(&self, kid: &str) -> bool {
        self.usable()
            .is_some_and(|snapshot| snapshot.known_kids.contains(kid))
    }

    /// Fetches the key set again because a token named an unknown `kid` or
    /// came while no key was loaded; `cause` is logged.
    ///
    /// Returns after a fetch that completed while waiting, or after this
    /// call's own fetch, or at once when the refetch interval has not passed
    /// since the last refetch of this kind or the breaker is open.
    pub async fn refetch(&self, cause: &'static str) {
        let seen_generation = self.generation.load(Ordering::Acquire);
        let mut last_refetch = self.refetch_gate.lock().await;
        if self.generation.load(Ordering::Acquire) != seen_generation {
            return;
        }
        if last_refetch.is_some_and(|at| at.elapsed() < self.settings.refetch_interval) {
            return;
        }
        *last_refetch = Some(Instant::now());
        let _ = self.fetch_and_install(cause).await;
    }

    /// Fetches the key set now, through the breaker but outside the refetch
    /// interval, for operators' tools and tests.
    pub async fn refresh_now(&self) -> Result<(), FetchError> {
        self.fetch_and_install("manual").await.map(|_| ())
    }

    /// Fetches once and installs the keys; returns the refresh interval the
    /// response asked for.
    async fn fetch_and_install(&self, cause: &'static str) -> Result<Option<Duration>, FetchError> {
        if !self.breaker.permit() {
            tracing::debug!(event = "jwks_fetch", result = "skipped", cause, issuer = %self.settings.issuer, "JWKS fetch skipped: circuit breaker open");
            return Err(FetchError::BreakerOpen);
        }
        let result = self.fetch().await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(fetched) => {
                self.breaker.record_success();
                self.gauges
                    .metrics
                    .jwks_fetches
                    .with_label_values(&["ok"])
                    .inc();
                self.warn_skipped(&fetched.skipped);
                let count = fetched.keys.len();
                self.install(fetched.keys, &fetched.skipped);
                tracing::info!(
                    event = "jwks_fetch",
                    result = "ok",
                    cause,
                    issuer = %self.settings.issuer,
                    keys = count,
                    "JWKS loaded"
                );
                Ok(fetched.max_age)
            }
            Err(err) => {
                self.breaker.record_failure(&err.to_string());
                self.gauges
                    .metrics
                    .jwks_fetches
                    .with_label_values(&[err.metric_result()])
                    .inc();
                tracing::error!(event = "jwks_fetch", result = "error", cause, issuer = %self.settings.issuer, error = %err, "JWKS fetch failed; keys loaded before, if any, stay in use");
                Err(err)
            }
        }
    }

    fn install(&self, keys: Vec<VerifyingKey>, skipped: &[SkippedKey]) {
        let now_ms = self.clock.now_ms();
        let known_kids = keys
            .iter()
            .filter_map(|key| key.kid.clone())
            .chain(skipped.iter().filter_map(|key| key.kid.clone()))
            .collect();
        let count = keys.len();
        let fresh = Arc::new(Snapshot {
            keys,
            known_kids,
            fetched_at_ms: Some(now_ms),
        });
        let previous = std::mem::replace(
            &mut *self
                .snapshot
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            fresh.clone(),
        );
        let kept: HashSet<&str> = fresh
            .keys
            .iter()
            .map(|key| key.thumbprint.as_str())
            .collect();
        let removed: HashSet<String> = previous
            .keys
            .iter()
            .filter(|key| !kept.contains(key.thumbprint.as_str()))
            .map(|key| key.thumbprint.clone())
            .collect();
        if !removed.is_empty() {
            self.notify_removed(&removed);
        }
        self.gauges.update(self.gauge_slot, now_ms, |status| {
            status.keys = count;
            status.fetched_at_ms = Some(now_ms);
        });
    }

    fn notify_removed(&self, thumbprints: &HashSet<String>) {
        let listeners = self
            .removal_listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for listener in listeners.iter() {
            listener(thumbprints);
        }
    }

    fn warn_skipped(&self, skipped: &[SkippedKey]) {
        let mut warned = self
            .warned_skips
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for key in skipped {
            if warned.insert(key.clone()) {
                tracing::warn!(
                    event = "jwks_key_skipped",
                    issuer = %self.settings.issuer,
                    kid = key.kid.as_deref().unwrap_or("(none)"),
                    reason = %key.reason,
                    "JWKS key skipped"
                );
            }
        }
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        let (body, max_age) = fetch::fetch_document(&self.http, &self.settings.source).await?;
        let parsed = jwks::parse(&body)?;
        if parsed.keys.is_empty() {
            self.warn_skipped(&parsed.skipped);
            return Err(FetchError::NoUsableKey);
        }
        Ok(Fetched {
            keys: parsed.keys,
            skipped: parsed.skipped,
            max_age,
        })
    }

    /// Runs the start-up fetch and the background refresh until the task is
    /// dropped. A failed fetch is retried after `retry_min`, doubling up to
    /// `refresh_min`.
    pub async fn run_refresh(self: Arc<Self>) {
        let mut retry_delay = self.settings.retry_min;
        let mut cause = "start";
        loop {
            let wait = match self.fetch_and_install(cause).await {
                Ok(max_age) => {
                    retry_delay = self.settings.retry_min;
                    max_age
                        .unwrap_or(DEFAULT_REFRESH)
                        .clamp(self.settings.refresh_min, self.settings.refresh_max)
                }
                Err(_) => {
                    let wait = retry_delay;
                    retry_delay = (retry_delay * 2).min(self.settings.refresh_min);
                    wait
                }
            };
            cause = "scheduled";
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                // Looking at the keys drops them once they are too stale.
                let _ = self.usable();
                self.gauges
                    .update(self.gauge_slot, self.clock.now_ms(), |_| {});
                let step = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(step.min(Duration::from_secs(1))).await;
            }
        }
    }
}
