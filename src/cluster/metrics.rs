//! The Prometheus metrics of cluster mode, registered only when it is on.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::{Metrics, LATENCY_BUCKETS};

/// The metrics of cluster mode, registered only when it is on.
pub struct ClusterMetrics {
    pub live_nodes: IntGauge,
    /// Consumptions forwarded to a home node, by result.
    pub forwarded: IntCounterVec,
    pub forward_duration: Histogram,
    /// Upgrades rejected because the ticket's home node was unreachable.
    pub home_unavailable: IntCounter,
    /// Consumptions this node ran for other nodes, by result.
    pub served: IntCounterVec,
    /// Gossip datagrams dropped because they do not open with the key.
    pub gossip_rejected: IntCounter,
    /// Forwarded consumptions rejected for a missing or wrong MAC.
    pub forward_unauthenticated: IntCounter,
    /// Redemptions rejected from the home node's published ticket state.
    pub answered_from_gossip: IntCounter,
    /// Other live nodes that run with this node's index.
    pub node_id_conflicts: IntGauge,
}

impl ClusterMetrics {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        let cluster = ClusterMetrics {
            live_nodes: IntGauge::new(
                "wsticket_cluster_live_nodes",
                "Cluster nodes this node sees as live, itself included.",
            )
            .expect("valid metric"),
            forwarded: IntCounterVec::new(
                Opts::new(
                    "wsticket_cluster_forwarded_consumes_total",
                    "Consumptions forwarded to the ticket's home node, by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            forward_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "wsticket_cluster_forward_duration_seconds",
                    "Time from forwarding a consumption to the home node's answer.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            home_unavailable: IntCounter::new(
                "wsticket_cluster_home_unavailable_total",
                "Redemptions rejected because the ticket's home node was unreachable.",
            )
            .expect("valid metric"),
            served: IntCounterVec::new(
                Opts::new(
                    "wsticket_cluster_served_consumes_total",
                    "Consumptions run for other nodes as the ticket's home, by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            gossip_rejected: IntCounter::new(
                "wsticket_cluster_gossip_rejected_datagrams_total",
                "Gossip datagrams dropped because they do not open with the cluster key.",
            )
            .expect("valid metric"),
            forward_unauthenticated: IntCounter::new(
                "wsticket_cluster_forward_unauthenticated_total",
                "Forwarded consumptions rejected for a missing, stale or wrong MAC.",
            )
            .expect("valid metric"),
            answered_from_gossip: IntCounter::new(
                "wsticket_cluster_answered_from_gossip_total",
                "Redemptions of used or expired tickets rejected from gossip, without asking the home node.",
            )
            .expect("valid metric"),
            node_id_conflicts: IntGauge::new(
                "wsticket_cluster_node_id_conflicts",
                "Other live cluster nodes that run with this node's --cluster-node-id.",
            )
            .expect("valid metric"),
        };
        metrics.register(Box::new(cluster.node_id_conflicts.clone()));
        metrics.register(Box::new(cluster.answered_from_gossip.clone()));
        metrics.register(Box::new(cluster.live_nodes.clone()));
        metrics.register(Box::new(cluster.forwarded.clone()));
        metrics.register(Box::new(cluster.forward_duration.clone()));
        metrics.register(Box::new(cluster.home_unavailable.clone()));
        metrics.register(Box::new(cluster.served.clone()));
        metrics.register(Box::new(cluster.gossip_rejected.clone()));
        metrics.register(Box::new(cluster.forward_unauthenticated.clone()));
        for result in ["consumed", "rejected", "home_unavailable"] {
            cluster.forwarded.with_label_values(&[result]);
        }
        for result in ["consumed", "rejected"] {
            cluster.served.with_label_values(&[result]);
        }
        cluster
    }
}
