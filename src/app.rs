//! The state shared by every request handler of one server.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ring::rand::{SecureRandom, SystemRandom};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::auth::Verifier;
use crate::clock::SharedClock;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::store::TicketStore;

/// What `/readyz` checks.
#[derive(Debug, Default)]
pub struct Readiness {
    pub store_recovered: AtomicBool,
    pub listener_bound: AtomicBool,
}

pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    pub store: Arc<dyn TicketStore>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub rng: SystemRandom,
    /// Ticket requests per subject per minute.
    pub ticket_limiter: DefaultKeyedRateLimiter<String>,
    pub readiness: Readiness,
    /// Cancelled when the server starts shutting down; open WebSockets
    /// watch it to send their close frame.
    pub shutdown: CancellationToken,
    /// Tracks the tasks of open WebSockets, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// The upstream and the upgrade limits.
    pub gateway: Gateway,
    pub audit: Arc<Audit>,
    /// The cluster membership, set once at start in cluster mode only.
    pub cluster: std::sync::OnceLock<Arc<Cluster>>,
    /// Random start of this process's request ids.
    request_id_base: u64,
    /// Request ids handed out so far.
    request_id_count: AtomicU64,
}

/// An odd multiplier, so that `count * REQUEST_ID_STEP` differs for every
/// count below 2^64 and consecutive ids do not look alike.
const REQUEST_ID_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

impl AppState {
    pub fn new(
        config: Config,
        verifier: Verifier,
        store: Arc<dyn TicketStore>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        let per_minute = NonZeroU32::new(config.rate_limit_per_minute).unwrap_or(NonZeroU32::MIN);
        let rng = SystemRandom::new();
        let mut base = [0u8; 8];
        // SystemRandom only fails when the OS has no randomness at all; ids
        // are then still unique within the process, only predictable.
        let _ = rng.fill(&mut base);
        AppState {
            gateway: Gateway::new(&config),
            ticket_limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            config,
            verifier,
            store,
            metrics,
            clock,
            rng,
            readiness: Readiness::default(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            audit: Arc::new(Audit::new()),
            cluster: std::sync::OnceLock::new(),
            request_id_base: u64::from_le_bytes(base),
            request_id_count: AtomicU64::new(0),
        }
    }

    /// Returns a new request id: 16 hex characters, unique within the
    /// process and random across processes. Ids need not be secret, so they
    /// come from a counter rather than from a system call per request.
    pub fn new_request_id(&self) -> String {
        let count = self.request_id_count.fetch_add(1, Ordering::Relaxed);
        request_id_of(self.request_id_base, count)
    }

    /// Returns the client's `X-Request-Id` when it is a sane value (1 to 64
    /// characters of `[A-Za-z0-9._:-]`), otherwise a new one.
    pub fn request_id(&self, headers: &http::HeaderMap) -> String {
        headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| self.new_request_id())
    }

    pub fn is_ready(&self) -> ReadyReport {
        ReadyReport {
            keys_loaded: self.verifier.keys().has_keys(),
            store_recovered: self.readiness.store_recovered.load(Ordering::Acquire),
            listener_bound: self.readiness.listener_bound.load(Ordering::Acquire),
            cluster_node_id_current: self.cluster.get().map(|cluster| !cluster.is_superseded()),
        }
    }

    /// Tells whether an `Origin` may call the server: any Origin when no list
    /// is configured, otherwise only listed ones.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.config.allowed_origins.is_empty()
            || self
                .config
                .allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}

/// The result of the readiness checks.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ReadyReport {
    pub keys_loaded: bool,
    pub store_recovered: bool,
    pub listener_bound: bool,
    /// In cluster mode, false while a newer node runs with the same
    /// `--cluster-node-id`: the other nodes then send this index's tickets
    /// to that node, so this one must leave the load balancer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_node_id_current: Option<bool>,
}

impl ReadyReport {
    pub fn ready(&self) -> bool {
        self.keys_loaded
            && self.store_recovered
            && self.listener_bound
            && self.cluster_node_id_current != Some(false)
    }
}

/// Returns the `count`-th request id of a process whose ids start at `base`.
fn request_id_of(base: u64, count: u64) -> String {
    let id = base.wrapping_add(count.wrapping_mul(REQUEST_ID_STEP));
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_hex() {
        let base = u64::MAX - 5;
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|count| request_id_of(base, count))
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
    }
}
