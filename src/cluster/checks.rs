//! Checks that a node runs at intervals, to catch a cluster that looks
//! healthy from inside one node but is not. They look for another live node
//! with the same index ([`super::conflict`]), for no other live node although
//! seeds were given, and for gossip datagrams that fail authentication. Each
//! finding is logged once when it appears, not on every check, and rejected
//! datagrams at most once a minute.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::ChitchatId;

use super::conflict::ConflictTracker;
use super::{node_index, Cluster};

/// Shortest interval between two checks. Each check must see at least one
/// gossip round.
const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a node with seeds may see no other live node before it warns.
const ALONE_WARNING_AFTER: Duration = Duration::from_secs(10);
/// Shortest interval between two warnings about rejected gossip datagrams.
const REJECTED_WARNING_INTERVAL: Duration = Duration::from_secs(60);

impl Cluster {
    /// Runs the checks at intervals until the task is aborted.
    pub async fn run_checks(self: Arc<Self>) {
        let own_index = self.config.node_id;
        let mut tracker = ConflictTracker::new(self.generation);
        let mut reported: Vec<ChitchatId> = Vec::new();
        let mut alone = AloneWatch::new(!self.config.peers.is_empty(), Instant::now());
        let mut rejected = RejectedWatch::new();
        let period = (self.config.gossip_interval * 5).max(MIN_CHECK_INTERVAL);
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let (same_index, others_live) = {
                let chitchat = self.gossip.chitchat();
                let chitchat = chitchat.lock().await;
                let own = chitchat.self_chitchat_id().clone();
                let others: Vec<&ChitchatId> =
                    chitchat.live_nodes().filter(|id| **id != own).collect();
                let same_index: Vec<(ChitchatId, u64)> = others
                    .iter()
                    .filter(|id| node_index(&id.node_id) == Some(own_index))
                    .filter_map(|id| {
                        let state = chitchat.node_state(id)?;
                        Some(((*id).clone(), u64::from(state.heartbeat())))
                    })
                    .collect();
                (same_index, others.len())
            };
            reported = self.check_conflicts(&mut tracker, &same_index, reported);
            let now = Instant::now();
            if alone.observe(others_live, now) {
                tracing::warn!(
                    event = "cluster_alone",
                    node_id = own_index,
                    seeds = self.config.peers.len(),
                    rejected_datagrams = self.metrics.gossip_rejected.get(),
                    "no other cluster node is live after {}s; check the --cluster-peer addresses, the network between the nodes and that every node has the same --cluster-secret-file",
                    ALONE_WARNING_AFTER.as_secs()
                );
            }
            if let Some(count) = rejected.observe(self.metrics.gossip_rejected.get(), now) {
                tracing::warn!(
                    event = "cluster_gossip_rejected",
                    node_id = own_index,
                    rejected_datagrams = count,
                    "gossip datagrams failed authentication; a node may run with another --cluster-secret-file, or something else sends to the gossip port"
                );
            }
        }
    }

    /// Logs new and cleared index conflicts and updates the gauge and the
    /// readiness flag. Returns the conflicts now reported.
    fn check_conflicts(
        &self,
        tracker: &mut ConflictTracker,
        same_index: &[(ChitchatId, u64)],
        reported: Vec<ChitchatId>,
    ) -> Vec<ChitchatId> {
        let own_index = self.config.node_id;
        let conflicts = tracker.observe(same_index);
        for other in conflicts.others.iter().filter(|id| !reported.contains(id)) {
            tracing::error!(
                event = "cluster_node_id_conflict",
                node_id = own_index,
                other = %format!("{}@{}", other.node_id, other.gossip_advertise_addr),
                superseded = other.generation_id > self.generation,
                "another live node runs with this node's --cluster-node-id; give every node its own index"
            );
        }
        for other in reported.iter().filter(|id| !conflicts.others.contains(id)) {
            tracing::info!(
                event = "cluster_node_id_conflict_cleared",
                node_id = own_index,
                other = %format!("{}@{}", other.node_id, other.gossip_advertise_addr),
                "the other node with this node's --cluster-node-id is no longer live"
            );
        }
        self.metrics
            .node_id_conflicts
            .set(i64::try_from(conflicts.others.len()).unwrap_or(i64::MAX));
        self.superseded
            .store(conflicts.superseded, Ordering::Release);
        conflicts.others
    }
}

/// Decides when to warn that a node with seeds has no other live node.
#[derive(Debug)]
struct AloneWatch {
    has_seeds: bool,
    /// Since when no other node has been live, or `None` while one is.
    alone_since: Option<Instant>,
    warned: bool,
}

impl AloneWatch {
    fn new(has_seeds: bool, now: Instant) -> Self {
        AloneWatch {
            has_seeds,
            alone_since: Some(now),
            warned: false,
        }
    }

    /// Takes the number of other live nodes at `now`, and returns whether to
    /// warn: once per stretch alone, after [`ALONE_WARNING_AFTER`].
    fn observe(&mut self, others_live: usize, now: Instant) -> bool {
        if others_live > 0 {
            self.alone_since = None;
            self.warned = false;
            return false;
        }
        let since = *self.alone_since.get_or_insert(now);
        if !self.has_seeds || self.warned || now.duration_since(since) < ALONE_WARNING_AFTER {
            return false;
        }
        self.warned = true;
        true
    }
}

/// Decides when to warn about gossip datagrams that failed authentication.
#[derive(Debug)]
struct RejectedWatch {
    /// The counter's value at the last warning.
    reported: u64,
    last_warning: Option<Instant>,
}

impl RejectedWatch {
    fn new() -> Self {
        RejectedWatch {
            reported: 0,
            last_warning: None,
        }
    }

    /// Takes the counter of rejected datagrams at `now`, and returns how many
    /// were rejected since the last warning when it is time to warn: at the
    /// first rejection, then at most once per [`REJECTED_WARNING_INTERVAL`].
    fn observe(&mut self, rejected: u64, now: Instant) -> Option<u64> {
        if rejected <= self.reported {
            return None;
        }
        if self
            .last_warning
            .is_some_and(|last| now.duration_since(last) < REJECTED_WARNING_INTERVAL)
        {
            return None;
        }
        let count = rejected - self.reported;
        self.reported = rejected;
        self.last_warning = Some(now);
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_node_warns_once_after_the_delay() {
        let start = Instant::now();
        let mut watch = AloneWatch::new(true, start);
        assert!(!watch.observe(0, start + Duration::from_secs(9)));
        assert!(watch.observe(0, start + Duration::from_secs(10)));
        assert!(!watch.observe(0, start + Duration::from_secs(60)));
    }

    #[test]
    fn alone_again_after_peers_left_warns_again() {
        let start = Instant::now();
        let mut watch = AloneWatch::new(true, start);
        assert!(!watch.observe(2, start + Duration::from_secs(1)));
        assert!(!watch.observe(0, start + Duration::from_secs(20)));
        assert!(watch.observe(0, start + Duration::from_secs(30)));
    }

    #[test]
    fn node_without_seeds_never_warns() {
        let start = Instant::now();
        let mut watch = AloneWatch::new(false, start);
        assert!(!watch.observe(0, start + Duration::from_secs(600)));
    }

    #[test]
    fn rejected_datagrams_warn_at_most_once_a_minute() {
        let start = Instant::now();
        let mut watch = RejectedWatch::new();
        assert_eq!(watch.observe(0, start), None);
        assert_eq!(watch.observe(3, start + Duration::from_secs(1)), Some(3));
        assert_eq!(watch.observe(9, start + Duration::from_secs(30)), None);
        assert_eq!(watch.observe(12, start + Duration::from_secs(61)), Some(9));
        assert_eq!(watch.observe(12, start + Duration::from_secs(200)), None);
    }
}
