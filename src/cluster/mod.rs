//! Cluster mode: several nodes act as one, each ticket consumed at most once.
//!
//! Every ticket has a home node, the node that issued it, encoded in the
//! ticket ([`home`]). Membership comes from chitchat's gossip over an
//! encrypted UDP transport ([`transport`]); each node publishes the address
//! of its admin listener there. A node that receives a ticket homed elsewhere
//! forwards the consumption to the home node ([`forward`]) and accepts only on
//! its answer, and the home node runs the same durable compare-and-swap as a
//! single node. Home nodes also publish in gossip whether their tickets are
//! live or used ([`records`]), so other nodes reject used and expired tickets
//! without a round trip. When the home node cannot be reached the upgrade is rejected
//! with `503 ticket_home_unavailable`: without a consensus protocol no node
//! can tell whether an unreachable home has already accepted the ticket.
//!
//! None of this runs without `--cluster-listen`.

mod checks;
pub mod conflict;
pub mod forward;
pub mod home;
pub mod metrics;
pub mod records;
pub mod settings;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use ring::rand::{SecureRandom, SystemRandom};

use crate::metrics::Metrics;
use crate::store::{RedeemError, TicketRecord, TicketStore};
use crate::ticket::{log_id, TicketKey};
use forward::{ConsumeAnswer, ConsumeRequest};
pub use metrics::ClusterMetrics;
use records::Published;
pub use settings::{ClusterArgs, ClusterConfig, ClusterKeys, Consistency};

/// The chitchat cluster id; nodes with another id do not gossip together.
const CLUSTER_ID: &str = "wsticket";
/// The chitchat key under which a node publishes its admin listener.
const ADMIN_ADDR_KEY: &str = "admin_addr";
/// `Retry-After` of `ticket_home_unavailable`. The client is expected to
/// request a new ticket, which a live node issues with itself as home.
const RETRY_AFTER_HOME_UNAVAILABLE: Duration = Duration::from_secs(1);
/// Time after start during which a ticket whose home index this node has
/// never seen in gossip gets `ticket_home_unavailable`, because the home may
/// not have been heard of yet. Later such a ticket gets `invalid_ticket`.
/// At least this many gossip intervals, and at least [`MIN_SETTLE`].
const SETTLE_GOSSIP_ROUNDS: u32 = 20;
const MIN_SETTLE: Duration = Duration::from_secs(2);
/// Upper bound of remembered forwarded-consumption nonces. Only requests with
/// a valid MAC add one, so only a node with the secret can fill it.
const MAX_REMEMBERED_NONCES: u64 = 1_000_000;

/// A failure to start cluster mode.
#[derive(Debug, thiserror::Error)]
#[error("cannot start gossip on {addr} (--cluster-listen): {source}")]
pub struct ClusterStartError {
    addr: SocketAddr,
    source: anyhow::Error,
}

/// A running cluster member.
pub struct Cluster {
    pub config: ClusterConfig,
    pub metrics: ClusterMetrics,
    gossip: ChitchatHandle,
    client: reqwest::Client,
    rng: SystemRandom,
    /// This run's chitchat generation: its start time in Unix milliseconds.
    generation: u64,
    /// Set while a newer live node runs with this node's index.
    superseded: AtomicBool,
    /// When this node joined, for the settle time of unknown home indexes.
    started: Instant,
    /// Nonces of forwarded consumptions already run, kept for twice the
    /// allowed clock skew so that a captured request cannot be replayed.
    seen_nonces: moka::sync::Cache<String, ()>,
}

impl Cluster {
    /// Joins the cluster, publishing `config.advertise` as this node's gossip
    /// address and `admin_addr` as the address peers forward consumptions to.
    ///
    /// `record_lifetime` is how long a published ticket state stays in
    /// gossip: at least the ticket lifetime plus `--expired-grace`.
    pub async fn start(
        config: ClusterConfig,
        admin_addr: SocketAddr,
        record_lifetime: Duration,
        metrics: &Metrics,
    ) -> Result<Self, ClusterStartError> {
        let metrics = ClusterMetrics::new(metrics);
        let chitchat_config = chitchat_config(&config, record_lifetime);
        let generation = chitchat_config.chitchat_id.generation_id;
        let transport =
            transport::SealedTransport::new(config.keys.gossip, metrics.gossip_rejected.clone());
        let initial = vec![(ADMIN_ADDR_KEY.to_owned(), admin_addr.to_string())];
        let gossip = spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .map_err(|source| ClusterStartError {
                addr: config.listen,
                source,
            })?;
        // The proxy settings of the environment must not redirect traffic
        // meant for a peer's admin listener.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(config.forward_timeout)
            .connect_timeout(config.forward_timeout)
            .build()
            .expect("a client without TLS settings builds");
        tracing::info!(event = "cluster_joined", node_id = config.node_id, gossip = %config.listen, gossip_advertised = %config.advertise, admin_advertised = %admin_addr, seeds = config.peers.len(), "cluster gossip started");
        Ok(Cluster {
            config,
            metrics,
            gossip,
            client,
            rng: SystemRandom::new(),
            generation,
            superseded: AtomicBool::new(false),
            started: Instant::now(),
            seen_nonces: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED_NONCES)
                .time_to_live(Duration::from_millis(2 * forward::MAX_CLOCK_SKEW_MS))
                .build(),
        })
    }

    /// Returns the live members, by node index, with their admin addresses.
    ///
    /// Only the newest generation of each index counts: a restarted node may
    /// still look live under its previous generation, whose admin address is
    /// gone, until the failure detector notices.
    pub async fn members(&self) -> BTreeMap<u8, SocketAddr> {
        let chitchat = self.gossip.chitchat();
        let chitchat = chitchat.lock().await;
        let live: Vec<&ChitchatId> = chitchat.live_nodes().collect();
        let mut members = BTreeMap::new();
        for (index, id) in newest_generations(&chitchat) {
            if !live.contains(&id) {
                continue;
            }
            let admin = chitchat
                .node_state(id)
                .and_then(|state| state.get(ADMIN_ADDR_KEY))
                .and_then(|addr| addr.parse().ok());
            if let Some(admin) = admin {
                // When two nodes run with the same --cluster-node-id, the one
                // started last is used here. The other one reports the
                // conflict and turns unready (see `run_checks`).
                members.insert(index, admin);
            }
        }
        members
    }

    /// Watches membership and logs every change, until the gossip stops.
    pub async fn run_membership_log(self: Arc<Self>) {
        let mut watcher = self.gossip.chitchat().lock().await.live_nodes_watcher();
        let mut known: Vec<String> = Vec::new();
        loop {
            let live: Vec<String> = watcher
                .borrow_and_update()
                .keys()
                .map(|id| format!("{}@{}", id.node_id, id.gossip_advertise_addr))
                .collect();
            for joined in live.iter().filter(|name| !known.contains(name)) {
                tracing::info!(event = "cluster_member_up", member = %joined, live_nodes = live.len(), "cluster member is live");
            }
            for left in known.iter().filter(|name| !live.contains(name)) {
                tracing::warn!(event = "cluster_member_down", member = %left, live_nodes = live.len(), "cluster member is no longer live");
            }
            self.metrics
                .live_nodes
                .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
            known = live;
            if watcher.changed().await.is_err() {
                return;
            }
        }
    }

    /// Tells whether a newer live node runs with this node's index, so that
    /// the other nodes send this index's tickets there, not here.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// Records the nonce of a forwarded consumption whose MAC is valid, and
    /// returns whether it is new. A nonce seen before means a replayed request.
    pub fn remember_nonce(&self, nonce: &str) -> bool {
        self.seen_nonces
            .entry(nonce.to_owned())
            .or_insert_with(|| ())
            .is_fresh()
    }

    /// Publishes the state of a ticket this node is home to.
    pub async fn publish(&self, key: &TicketKey, state: Published) {
        let gossip_key = records::gossip_key(key);
        let value = state.encode();
        self.gossip
            .with_chitchat(|chitchat| {
                chitchat
                    .self_node_state()
                    .set_with_ttl(gossip_key.clone(), value.clone());
            })
            .await;
    }

    /// Returns the state of a ticket as its home node `home` published it,
    /// if this node has received it.
    pub async fn published(&self, home: u8, key: &TicketKey) -> Option<Published> {
        let chitchat = self.gossip.chitchat();
        let chitchat = chitchat.lock().await;
        let id = newest_generations(&chitchat).remove(&home)?;
        let value = chitchat
            .node_state(id)?
            .get(&records::gossip_key(key))?
            .to_owned();
        Published::decode(&value)
    }

    /// Returns how many ticket states published by other nodes this node
    /// holds.
    pub async fn published_by_others(&self) -> usize {
        let chitchat = self.gossip.chitchat();
        let chitchat = chitchat.lock().await;
        let own = chitchat.self_chitchat_id().clone();
        chitchat
            .node_states()
            .iter()
            .filter(|(id, _)| **id != own)
            .map(|(_, state)| {
                state
                    .key_values()
                    .filter(|(key, _)| key.starts_with(records::KEY_PREFIX))
                    .count()
            })
            .sum()
    }

    /// Consumes a ticket on its home node: here when this node is the home,
    /// otherwise by forwarding the consumption. A ticket that the home node
    /// published as used, or as expired by `now_ms`, is rejected here
    /// without a round trip.
    pub async fn consume(
        &self,
        store: &dyn TicketStore,
        ticket: &str,
        key: &TicketKey,
        origin: Option<&str>,
        now_ms: u64,
    ) -> Result<TicketRecord, RedeemError> {
        let Some(home) = home::home_of(&self.config.keys.home, ticket) else {
            return Err(RedeemError::Unknown);
        };
        if home == self.config.node_id {
            let result = store.consume(key, origin).await;
            if result.is_ok() {
                self.publish(key, Published::Used).await;
            }
            return result;
        }
        match self.published(home, key).await {
            Some(Published::Used) => {
                self.metrics.answered_from_gossip.inc();
                return Err(RedeemError::AlreadyUsed);
            }
            Some(Published::Issued { expires_at_ms }) if now_ms >= expires_at_ms => {
                self.metrics.answered_from_gossip.inc();
                return Err(RedeemError::Expired);
            }
            _ => {}
        }
        let Some(admin) = self.members().await.get(&home).copied() else {
            if self.started.elapsed() >= self.settle_time() && !self.has_seen(home).await {
                // No node with this index has been in the cluster since this
                // node joined, so no node issued the ticket: most likely a
                // guess. As `invalid_ticket`, it also counts against
                // --max-failed-upgrades-per-minute.
                tracing::debug!(home, "no node with the ticket's home index was ever seen");
                return Err(RedeemError::Unknown);
            }
            self.metrics.home_unavailable.inc();
            self.metrics
                .forwarded
                .with_label_values(&["home_unavailable"])
                .inc();
            tracing::debug!(home, "the ticket's home node is not a live member");
            return Err(RedeemError::HomeUnavailable);
        };
        let started = Instant::now();
        let result = self.forward(admin, key, origin).await;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.forward_duration.observe(seconds);
        let label = match &result {
            Ok(_) => "consumed",
            Err(RedeemError::HomeUnavailable) => {
                self.metrics.home_unavailable.inc();
                "home_unavailable"
            }
            Err(_) => "rejected",
        };
        self.metrics.forwarded.with_label_values(&[label]).inc();
        tracing::info!(
            event = "cluster_forwarded_consume",
            ticket_id = %log_id(key),
            home,
            home_admin = %admin,
            result = label,
            latency_ms = seconds * 1000.0,
            "consumption forwarded to the ticket's home node"
        );
        result
    }

    /// Returns whether the gossip state contains a node with index `home`,
    /// live or not.
    async fn has_seen(&self, home: u8) -> bool {
        let chitchat = self.gossip.chitchat();
        let chitchat = chitchat.lock().await;
        chitchat
            .node_states()
            .keys()
            .any(|id| node_index(&id.node_id) == Some(home))
    }

    /// Returns how long after start an unseen home index still counts as
    /// possibly unreachable rather than unknown.
    fn settle_time(&self) -> Duration {
        (self.config.gossip_interval * SETTLE_GOSSIP_ROUNDS).max(MIN_SETTLE)
    }

    /// Sends one signed consumption to the home node at `admin`.
    async fn forward(
        &self,
        admin: SocketAddr,
        key: &TicketKey,
        origin: Option<&str>,
    ) -> Result<TicketRecord, RedeemError> {
        let body = serde_json::to_vec(&ConsumeRequest {
            key: hex::encode(key),
            origin: origin.map(str::to_owned),
        })
        .expect("a request always serialises");
        let mut nonce = [0u8; 16];
        if self.rng.fill(&mut nonce).is_err() {
            return Err(RedeemError::HomeUnavailable);
        }
        let nonce = hex::encode(nonce);
        let time_ms = unix_ms();
        let mac = forward::request_mac(&self.config.keys.forward, time_ms, &nonce, &body);
        let url = format!("http://{admin}{}", forward::PATH);
        let sent = self
            .client
            .post(&url)
            .header(forward::TIME_HEADER, time_ms.to_string())
            .header(forward::NONCE_HEADER, &nonce)
            .header(forward::MAC_HEADER, mac)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(event = "cluster_forward_failed", home = %admin, error = %err, "forwarding a consumption to the home node failed");
                return Err(RedeemError::HomeUnavailable);
            }
        };
        let status = response.status();
        let answer_mac = response
            .headers()
            .get(forward::MAC_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!(event = "cluster_forward_failed", home = %admin, error = %err, "reading the home node's response failed");
                return Err(RedeemError::HomeUnavailable);
            }
        };
        if !status.is_success() {
            // The body of an error is not signed, so its message is only
            // logged, to tell a clock skew from a wrong secret.
            let message = error_message(&bytes);
            tracing::warn!(event = "cluster_forward_failed", home = %admin, status = status.as_u16(), home_message = %message, "the home node rejected the forwarded consumption");
            return Err(RedeemError::HomeUnavailable);
        }
        let expected = forward::answer_mac(&self.config.keys.forward, &nonce, &bytes);
        if !answer_mac.is_some_and(|presented| forward::mac_matches(&expected, &presented)) {
            tracing::warn!(event = "cluster_forward_failed", home = %admin, status = status.as_u16(), "the home node's response has no valid MAC");
            return Err(RedeemError::HomeUnavailable);
        }
        match serde_json::from_slice::<ConsumeAnswer>(&bytes) {
            Ok(answer) => answer.into_result(),
            Err(err) => {
                tracing::warn!(event = "cluster_forward_failed", home = %admin, error = %err, "the home node's response cannot be decoded");
                Err(RedeemError::HomeUnavailable)
            }
        }
    }

    /// Leaves the gossip.
    pub async fn shutdown(self: Arc<Self>) {
        if let Err(err) = self.gossip.initiate_shutdown() {
            tracing::debug!(error = %err, "cluster gossip had already stopped");
        }
    }
}

/// Builds the chitchat settings of a node from `config`, with a new
/// generation. `record_lifetime` is the grace period of entries published
/// with a TTL, as for [`Cluster::start`].
///
/// Public so that `examples/gossip_capacity.rs` measures gossip with the
/// settings that `wsticket serve` uses.
pub fn chitchat_config(config: &ClusterConfig, record_lifetime: Duration) -> ChitchatConfig {
    // A new generation on every start lets peers tell a restarted node
    // from the one they knew.
    let generation = unix_ms();
    ChitchatConfig {
        chitchat_id: ChitchatId::new(node_name(config.node_id), generation, config.advertise),
        cluster_id: CLUSTER_ID.to_owned(),
        gossip_interval: config.gossip_interval,
        listen_addr: config.listen,
        seed_nodes: config.peers.clone(),
        failure_detector_config: FailureDetectorConfig {
            initial_interval: config.gossip_interval,
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: record_lifetime,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    }
}

/// Returns the `message` of a JSON error body, cut to 200 characters, or an
/// empty string when the body has none.
fn error_message(body: &[u8]) -> String {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let message = body["message"].as_str().unwrap_or_default();
    message.chars().take(200).collect()
}

/// Returns the `Retry-After` of `ticket_home_unavailable`.
pub fn retry_after_home_unavailable() -> Duration {
    RETRY_AFTER_HOME_UNAVAILABLE
}

/// Returns the newest generation of each node index in the gossip state,
/// live or not.
fn newest_generations(chitchat: &chitchat::Chitchat) -> BTreeMap<u8, &ChitchatId> {
    let mut newest: BTreeMap<u8, &ChitchatId> = BTreeMap::new();
    for id in chitchat.node_states().keys() {
        let Some(index) = node_index(&id.node_id) else {
            continue;
        };
        let entry = newest.entry(index).or_insert(id);
        if id.generation_id > entry.generation_id {
            *entry = id;
        }
    }
    newest
}

fn node_name(index: u8) -> String {
    format!("node-{index}")
}

fn node_index(name: &str) -> Option<u8> {
    name.strip_prefix("node-")?.parse().ok()
}

/// Returns the wall-clock time in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
