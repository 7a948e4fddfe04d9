//! Prometheus metrics, served on the admin listener.
//!
//! Each server owns its own [`Registry`], so several servers in one process
//! (the demo, tests) do not share counters. Labels only take values from
//! fixed sets (error codes, results); subjects, tickets, addresses and paths
//! never become labels. Labelled counters are created for every known value
//! at start, so dashboards and alerts see a zero rather than no series.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from 100 µs to 5 s.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Error codes of the ticket endpoint.
pub const TICKET_ERRORS: &[&str] = &[
    "missing_token",
    "invalid_token",
    "token_expired",
    "rate_limited",
    "auth_unavailable",
    "store_unavailable",
    "origin_not_allowed",
    "invalid_request",
];

/// Results of a redemption: `ok` or an error code.
pub const REDEMPTION_RESULTS: &[&str] = &[
    "ok",
    "missing_ticket",
    "invalid_ticket",
    "ticket_already_used",
    "ticket_expired",
    "origin_not_allowed",
    "store_unavailable",
    "upstream_unavailable",
    "rate_limited",
    "too_many_connections",
    "invalid_request",
    "websocket_upgrade_required",
    "method_not_allowed",
];

pub struct Metrics {
    registry: Registry,
    pub tickets_issued: IntCounter,
    pub ticket_requests_rejected: IntCounterVec,
    pub redemptions: IntCounterVec,
    pub jwt_verifications: IntCounterVec,
    pub jwks_fetches: IntCounterVec,
    pub tickets_expired_unused: IntCounter,
    pub replay_attempts: IntCounter,
    pub live_tickets: IntGauge,
    pub open_connections: IntGauge,
    pub jwks_breaker_state: IntGauge,
    pub jwks_last_success_age_seconds: IntGauge,
    pub jwks_max_stale_seconds: IntGauge,
    pub jwks_keys_loaded: IntGauge,
    pub introspection_breaker_state: IntGauge,
    pub issuance_duration: Histogram,
    pub redemption_duration: HistogramVec,
    pub upstream_connect_duration: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            tickets_issued: IntCounter::new("wsticket_tickets_issued_total", "Tickets issued.")
                .expect("valid metric"),
            ticket_requests_rejected: IntCounterVec::new(
                Opts::new(
                    "wsticket_ticket_requests_rejected_total",
                    "Ticket requests rejected, by error code.",
                ),
                &["error"],
            )
            .expect("valid metric"),
            redemptions: IntCounterVec::new(
                Opts::new(
                    "wsticket_redemptions_total",
                    "Ticket redemptions, by result (ok or the error code) and path.",
                ),
                &["result", "via"],
            )
            .expect("valid metric"),
            jwt_verifications: IntCounterVec::new(
                Opts::new(
                    "wsticket_jwt_verifications_total",
                    "JWT verifications, by result and whether the verification cache answered.",
                ),
                &["result", "cached"],
            )
            .expect("valid metric"),
            jwks_fetches: IntCounterVec::new(
                Opts::new("wsticket_jwks_fetches_total", "JWKS fetches, by result."),
                &["result"],
            )
            .expect("valid metric"),
            tickets_expired_unused: IntCounter::new(
                "wsticket_tickets_expired_unused_total",
                "Tickets that expired without being redeemed.",
            )
            .expect("valid metric"),
            replay_attempts: IntCounter::new(
                "wsticket_replay_attempts_total",
                "Redemptions of a ticket that was already used.",
            )
            .expect("valid metric"),
            live_tickets: IntGauge::new(
                "wsticket_live_tickets",
                "Tickets issued, not yet redeemed and not yet expired.",
            )
            .expect("valid metric"),
            open_connections: IntGauge::new(
                "wsticket_open_connections",
                "Open authenticated WebSocket connections.",
            )
            .expect("valid metric"),
            jwks_breaker_state: IntGauge::new(
                "wsticket_jwks_breaker_state",
                "State of the JWKS circuit breaker: 0 closed, 1 half-open, 2 open.",
            )
            .expect("valid metric"),
            jwks_last_success_age_seconds: IntGauge::new(
                "wsticket_jwks_last_success_age_seconds",
                "Seconds since the last successful JWKS fetch (-1 before the first).",
            )
            .expect("valid metric"),
            jwks_max_stale_seconds: IntGauge::new(
                "wsticket_jwks_max_stale_seconds",
                "How long the last good keys keep verifying when fetches fail, in seconds.",
            )
            .expect("valid metric"),
            jwks_keys_loaded: IntGauge::new(
                "wsticket_jwks_keys_loaded",
                "Usable verification keys loaded.",
            )
            .expect("valid metric"),
            introspection_breaker_state: IntGauge::new(
                "wsticket_introspection_breaker_state",
                "State of the token introspection circuit breaker: 0 closed, 1 half-open, 2 open.",
            )
            .expect("valid metric"),
            issuance_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "wsticket_ticket_issuance_duration_seconds",
                    "Time to answer a ticket request, in seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            redemption_duration: HistogramVec::new(
                HistogramOpts::new(
                    "wsticket_redemption_duration_seconds",
                    "Time to redeem a ticket, up to the answer, in seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["via"],
            )
            .expect("valid metric"),
            upstream_connect_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "wsticket_upstream_connect_duration_seconds",
                    "Time to open the WebSocket to the upstream, in seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            registry,
        };
        m.register_all();
        m.initialize_label_values();
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.tickets_issued.clone()),
            Box::new(self.ticket_requests_rejected.clone()),
            Box::new(self.redemptions.clone()),
            Box::new(self.jwt_verifications.clone()),
            Box::new(self.jwks_fetches.clone()),
            Box::new(self.tickets_expired_unused.clone()),
            Box::new(self.replay_attempts.clone()),
            Box::new(self.live_tickets.clone()),
            Box::new(self.open_connections.clone()),
            Box::new(self.jwks_breaker_state.clone()),
            Box::new(self.jwks_last_success_age_seconds.clone()),
            Box::new(self.jwks_max_stale_seconds.clone()),
            Box::new(self.jwks_keys_loaded.clone()),
            Box::new(self.introspection_breaker_state.clone()),
            Box::new(self.issuance_duration.clone()),
            Box::new(self.redemption_duration.clone()),
            Box::new(self.upstream_connect_duration.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
    }

    fn initialize_label_values(&self) {
        for error in TICKET_ERRORS {
            self.ticket_requests_rejected.with_label_values(&[error]);
        }
        for via in ["upgrade", "redeem_api"] {
            self.redemption_duration.with_label_values(&[via]);
            for result in REDEMPTION_RESULTS {
                self.redemptions.with_label_values(&[result, via]);
            }
        }
        for result in ["ok", "invalid_token", "token_expired"] {
            for cached in ["true", "false"] {
                self.jwt_verifications.with_label_values(&[result, cached]);
            }
        }
        for result in ["ok", "error", "timeout"] {
            self.jwks_fetches.with_label_values(&[result]);
        }
        self.jwks_last_success_age_seconds.set(-1);
    }

    pub fn reject_ticket_request(&self, error: &str) {
        self.ticket_requests_rejected
            .with_label_values(&[error])
            .inc();
    }

    pub fn record_redemption(&self, result: &str, via: &str, seconds: f64) {
        self.redemptions.with_label_values(&[result, via]).inc();
        self.redemption_duration
            .with_label_values(&[via])
            .observe(seconds);
    }

    /// Renders every metric in the Prometheus text format.
    /// Registers a collector that only exists in some modes, such as the
    /// cluster metrics.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("each collector registers once");
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec does not fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
