//! The verification keys in use, and how they are fetched and refreshed.
//!
//! The key set is an immutable snapshot behind an `RwLock<Arc<_>>`: verifiers
//! clone the `Arc` and never hold the lock while verifying. Fetches happen in
//! three places: once at start, on a background schedule that follows the
//! response's `Cache-Control: max-age` within configured bounds, and when a
//! token names a `kid` the set does not have. The last kind is single-flight
//! (one fetch serves every request waiting on it) and runs at most once per
//! refetch interval, so a flood of tokens with random `kid`s cannot turn into
//! a flood of fetches. A failed fetch never replaces the keys in use.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use tokio::sync::Mutex as AsyncMutex;

use crate::auth::jwks::{self, SkippedKey, VerifyingKey};
use crate::clock::SharedClock;
use crate::config::JwksSource;
use crate::metrics::Metrics;

/// Largest JWKS document read, in bytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Refresh interval when the response has no usable `Cache-Control: max-age`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// First retry delay after a failed fetch; doubles up to the minimum refresh.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How many keys a token without `kid` is tried against.
pub const MAX_KIDLESS_CANDIDATES: usize = 4;

/// Settings of a [`KeyStore`].
#[derive(Debug, Clone)]
pub struct KeyStoreSettings {
    pub source: JwksSource,
    pub refetch_interval: Duration,
    pub refresh_min: Duration,
    pub refresh_max: Duration,
    pub timeout: Duration,
}

#[derive(Default)]
struct Snapshot {
    keys: Vec<VerifyingKey>,
    /// Milliseconds since the epoch of the fetch that produced these keys.
    fetched_at_ms: Option<u64>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request timed out")]
    Timeout,
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("document larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("cannot read file: {0}")]
    File(String),
    #[error(transparent)]
    Invalid(#[from] jwks::JwksError),
    #[error("no usable signing key in the document")]
    NoUsableKey,
}

impl FetchError {
    fn metric_result(&self) -> &'static str {
        match self {
            FetchError::Timeout => "timeout",
            _ => "error",
        }
    }
}

struct Fetched {
    keys: Vec<VerifyingKey>,
    skipped: Vec<SkippedKey>,
    max_age: Option<Duration>,
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
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl KeyStore {
    pub fn new(settings: KeyStoreSettings, clock: SharedClock, metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A JWKS URL is configured by the operator; a redirect elsewhere is
            // not followed, so the keys always come from that URL.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("wsticket/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a client with these settings builds");
        KeyStore {
            settings,
            http,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            generation: AtomicU64::new(0),
            refetch_gate: AsyncMutex::new(None),
            warned_skips: Mutex::new(HashSet::new()),
            clock,
            metrics,
        }
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Tells whether any usable key is loaded.
    pub fn has_keys(&self) -> bool {
        !self.current().keys.is_empty()
    }

    /// Returns the keys that may verify a token with this `kid` and `alg`.
    ///
    /// A token that names a `kid` is only tried against keys with that `kid`
    /// (several keys may share one). A token without `kid` is tried against
    /// at most [`MAX_KIDLESS_CANDIDATES`] keys whose type fits its `alg`.
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<VerifyingKey> {
        let snapshot = self.current();
        let fitting = snapshot.keys.iter().filter(|key| key.accepts(alg));
        match kid {
            Some(kid) => fitting
                .filter(|key| key.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => fitting.take(MAX_KIDLESS_CANDIDATES).cloned().collect(),
        }
    }

    /// Tells whether any loaded key has this `kid`, whatever its type.
    pub fn knows_kid(&self, kid: &str) -> bool {
        self.current()
            .keys
            .iter()
            .any(|key| key.kid.as_deref() == Some(kid))
    }

    /// Fetches the key set again because a token named an unknown `kid`.
    ///
    /// Returns after a fetch that completed while waiting, or after this
    /// call's own fetch, or at once when the refetch interval has not passed
    /// since the last refetch of this kind.
    pub async fn refetch_for_unknown_kid(&self) {
        let seen_generation = self.generation.load(Ordering::Acquire);
        let mut last_refetch = self.refetch_gate.lock().await;
        if self.generation.load(Ordering::Acquire) != seen_generation {
            return;
        }
        if last_refetch.is_some_and(|at| at.elapsed() < self.settings.refetch_interval) {
            return;
        }
        *last_refetch = Some(Instant::now());
        let _ = self.fetch_and_install("unknown kid").await;
    }

    /// Fetches once and installs the keys; returns the refresh interval the
    /// response asked for.
    async fn fetch_and_install(&self, cause: &str) -> Result<Option<Duration>, FetchError> {
        let result = self.fetch().await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(fetched) => {
                self.metrics.jwks_fetches.with_label_values(&["ok"]).inc();
                self.warn_skipped(&fetched.skipped);
                let count = fetched.keys.len();
                let snapshot = Snapshot {
                    keys: fetched.keys,
                    fetched_at_ms: Some(self.clock.now_ms()),
                };
                *self
                    .snapshot
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(snapshot);
                self.metrics.jwks_keys_loaded.set(count as i64);
                self.metrics.jwks_last_success_age_seconds.set(0);
                tracing::info!(
                    event = "jwks_fetch",
                    result = "ok",
                    cause,
                    keys = count,
                    "JWKS loaded"
                );
                Ok(fetched.max_age)
            }
            Err(err) => {
                self.metrics
                    .jwks_fetches
                    .with_label_values(&[err.metric_result()])
                    .inc();
                tracing::error!(event = "jwks_fetch", result = "error", cause, error = %err, "JWKS fetch failed");
                Err(err)
            }
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
                    kid = key.kid.as_deref().unwrap_or("(none)"),
                    reason = %key.reason,
                    "JWKS key skipped"
                );
            }
        }
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        let (body, max_age) = match &self.settings.source {
            JwksSource::Url(url) => self.fetch_url(url.clone()).await?,
            JwksSource::File(path) => {
                let body = tokio::fs::read(path)
                    .await
                    .map_err(|err| FetchError::File(format!("{}: {err}", path.display())))?;
                if body.len() > MAX_JWKS_BYTES {
                    return Err(FetchError::TooLarge);
                }
                (body, None)
            }
        };
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

    async fn fetch_url(&self, url: url::Url) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let classify = |err: reqwest::Error| {
            if err.is_timeout() {
                FetchError::Timeout
            } else {
                FetchError::Request(without_url(&err))
            }
        };
        let mut response = self.http.get(url).send().await.map_err(classify)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }

    /// Runs the start-up fetch and the background refresh until the task is
    /// dropped. The start-up fetch does not count against the refetch interval.
    pub async fn run_refresh(self: Arc<Self>) {
        let mut retry_delay = FIRST_RETRY;
        loop {
            let wait = match self.fetch_and_install("scheduled").await {
                Ok(max_age) => {
                    retry_delay = FIRST_RETRY;
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
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                self.update_age_gauge();
                let step = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(step.min(Duration::from_secs(1))).await;
            }
        }
    }

    fn update_age_gauge(&self) {
        if let Some(fetched_at) = self.current().fetched_at_ms {
            let age = self.clock.now_ms().saturating_sub(fetched_at) / 1000;
            self.metrics
                .jwks_last_success_age_seconds
                .set(i64::try_from(age).unwrap_or(i64::MAX));
        }
    }
}

/// Formats a reqwest error without the URL, which may carry credentials.
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<jwks url>");
    }
    text
}

/// Reads `max-age` from a `Cache-Control` value.
fn parse_max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if name.trim().eq_ignore_ascii_case("max-age") {
            value
                .trim()
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_max_age;
    use std::time::Duration;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            parse_max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_max_age("Max-Age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=soon"), None);
    }
}
