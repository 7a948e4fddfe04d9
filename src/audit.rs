//! The audit log: one JSON line per authentication event, with flood control.
//!
//! Every rejection is reported exactly once, either as its own line or inside
//! the count of a flood summary. A flood is a run of events with the same
//! `event`, `error_code` and client IP: the first [`FLOOD_BURST`] in a
//! [`FLOOD_WINDOW`] are logged one by one, the rest only counted, and when
//! the window ends one summary line says how many were suppressed. Successes
//! (INFO) are never suppressed. Lines carry `ticket_id` (the hashed ticket,
//! never the ticket), `user_id` (the JWT subject) and the request's ids.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events of one kind from one source logged one by one in each window.
pub const FLOOD_BURST: u64 = 5;
/// Length of a flood window.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Lifecycle and successes.
    Info,
    /// Rejections the client caused.
    Warn,
    /// Failures on the server's side.
    Error,
}

/// One authentication event. Absent ids are logged as empty strings, so every
/// line has the same fields.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent<'a> {
    pub event: &'static str,
    pub severity: Option<Severity>,
    pub ticket_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub connection_id: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub result: &'static str,
    pub error_code: Option<&'static str>,
    pub latency_ms: Option<f64>,
    /// `upgrade` or `redeem_api` for redemptions.
    pub via: Option<&'static str>,
    pub client_ip: Option<IpAddr>,
    /// Reason a token was rejected, for operators. It never contains the token.
    pub reason: Option<&'a str>,
    pub message: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FloodKey {
    event: &'static str,
    error_code: &'static str,
    client_ip: Option<IpAddr>,
}

#[derive(Debug)]
struct FloodWindow {
    started: Instant,
    logged: u64,
    suppressed: u64,
    severity: Severity,
}

/// The audit logger with its flood windows.
#[derive(Debug, Default)]
pub struct Audit {
    windows: Mutex<HashMap<FloodKey, FloodWindow>>,
}

impl Audit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs an event, or counts it into a flood summary.
    pub fn record(&self, event: &AuditEvent<'_>) {
        self.record_at(event, Instant::now());
    }

    /// Like [`Self::record`], at a given time; returns whether the event got
    /// its own line.
    pub fn record_at(&self, event: &AuditEvent<'_>, now: Instant) -> bool {
        let severity = event.severity.unwrap_or(Severity::Info);
        let Some(error_code) = event.error_code.filter(|_| severity != Severity::Info) else {
            emit(event);
            return true;
        };
        let key = FloodKey {
            event: event.event,
            error_code,
            client_ip: event.client_ip,
        };
        let mut windows = self.lock();
        let window = windows.entry(key.clone()).or_insert(FloodWindow {
            started: now,
            logged: 0,
            suppressed: 0,
            severity,
        });
        if now.duration_since(window.started) >= FLOOD_WINDOW {
            summarize(&key, window);
            *window = FloodWindow {
                started: now,
                logged: 0,
                suppressed: 0,
                severity,
            };
        }
        if window.logged < FLOOD_BURST {
            window.logged += 1;
            drop(windows);
            emit(event);
            true
        } else {
            window.suppressed += 1;
            false
        }
    }

    /// Writes the summaries of windows that have ended and removes them.
    pub fn flush_ended(&self, now: Instant) {
        let mut windows = self.lock();
        windows.retain(|key, window| {
            if now.duration_since(window.started) < FLOOD_WINDOW {
                return true;
            }
            summarize(key, window);
            false
        });
    }

    /// Writes every pending summary, for shutdown.
    pub fn flush_all(&self) {
        let mut windows = self.lock();
        for (key, window) in windows.drain() {
            summarize(&key, &window);
        }
    }

    /// Runs [`Self::flush_ended`] every second until dropped.
    pub async fn run_flusher(self: std::sync::Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticker.tick().await;
            self.flush_ended(Instant::now());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FloodKey, FloodWindow>> {
        self.windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn summarize(key: &FloodKey, window: &FloodWindow) {
    if window.suppressed == 0 {
        return;
    }
    let client_ip = key.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let window_secs = FLOOD_WINDOW.as_secs();
    let suppressed = window.suppressed;
    let (event, error_code) = (key.event, key.error_code);
    match window.severity {
        Severity::Error => tracing::error!(
            event,
            error_code,
            client_ip,
            result = "rejected",
            suppressed,
            window_secs,
            flood_summary = true,
            "similar events suppressed"
        ),
        _ => tracing::warn!(
            event,
            error_code,
            client_ip,
            result = "rejected",
            suppressed,
            window_secs,
            flood_summary = true,
            "similar events suppressed"
        ),
    }
}

fn emit(event: &AuditEvent<'_>) {
    let ticket_id = event.ticket_id.unwrap_or("");
    let user_id = event.user_id.unwrap_or("");
    let connection_id = event.connection_id.unwrap_or("");
    let request_id = event.request_id.unwrap_or("");
    let error_code = event.error_code.unwrap_or("");
    let latency_ms = event.latency_ms.unwrap_or(0.0);
    let via = event.via.unwrap_or("");
    let reason = event.reason.unwrap_or("");
    let client_ip = event.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let name = event.event;
    let result = event.result;
    let message = event.message;
    // `subject` repeats `user_id` under the name the ticket endpoint's
    // log contract uses, so both kinds of log query keep working.
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                event = name,
                ticket_id,
                user_id,
                subject = user_id,
                connection_id,
                request_id,
                result,
                error_code,
                latency_ms,
                via,
                client_ip,
                reason,
                "{message}"
            )
        };
    }
    match event.severity.unwrap_or(Severity::Info) {
        Severity::Info => line!(info),
        Severity::Warn => line!(warn),
        Severity::Error => line!(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(ip: &str) -> AuditEvent<'static> {
        AuditEvent {
            event: "ticket_rejected",
            severity: Some(Severity::Warn),
            result: "rejected",
            error_code: Some("invalid_ticket"),
            client_ip: ip.parse().ok(),
            message: "upgrade rejected",
            ..AuditEvent::default()
        }
    }

    #[test]
    fn flood_logs_burst_then_counts() {
        let audit = Audit::new();
        let start = Instant::now();
        let logged = (0..50)
            .filter(|_| audit.record_at(&rejection("10.9.9.9"), start))
            .count() as u64;
        assert_eq!(logged, FLOOD_BURST);
        let windows = audit.lock();
        let window = windows.values().next().expect("one window");
        assert_eq!(window.suppressed, 50 - FLOOD_BURST);
    }

    #[test]
    fn sources_have_separate_windows() {
        let audit = Audit::new();
        let start = Instant::now();
        for _ in 0..FLOOD_BURST {
            assert!(audit.record_at(&rejection("10.0.0.1"), start));
        }
        assert!(audit.record_at(&rejection("10.0.0.2"), start));
        assert!(!audit.record_at(&rejection("10.0.0.1"), start));
    }

    #[test]
    fn new_window_logs_again() {
        let audit = Audit::new();
        let start = Instant::now();
        for _ in 0..FLOOD_BURST + 3 {
            audit.record_at(&rejection("10.0.0.1"), start);
        }
        assert!(audit.record_at(&rejection("10.0.0.1"), start + FLOOD_WINDOW));
        audit.flush_ended(start + FLOOD_WINDOW * 3);
        assert!(audit.lock().is_empty());
    }

    #[test]
    fn successes_are_never_suppressed() {
        let audit = Audit::new();
        let start = Instant::now();
        let issued = AuditEvent {
            event: "ticket_issued",
            result: "ok",
            client_ip: "10.0.0.1".parse().ok(),
            message: "ticket issued",
            ..AuditEvent::default()
        };
        assert!((0..100).all(|_| audit.record_at(&issued, start)));
    }
}
