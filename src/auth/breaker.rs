//! The circuit breaker around calls to an identity provider: JWKS fetches
//! and token introspection.
//!
//! The state machine is the `failsafe` crate's: after `failures` consecutive
//! failures the breaker opens and rejects calls for an open period that
//! doubles from `open_min` up to `open_max`. The first call after that period
//! is a half-open probe; its success closes the breaker, its failure opens it
//! again for the next period. failsafe reports transitions through its
//! `Instrument` trait without saying why, so [`Breaker`] runs each call into
//! the state machine under a lock, picks up the transition that call caused
//! and logs it once with the cause passed in.
//!
//! The open period is measured on the monotonic clock (failsafe uses
//! `Instant`), not on the injected [`crate::clock::Clock`]: it only paces
//! retries and decides no expiry.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe::failure_policy::{consecutive_failures, ConsecutiveFailures};
use failsafe::{Instrument, StateMachine};

/// A breaker state, numbered as the `*_breaker_state` gauges report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }
}

/// Thresholds of a [`Breaker`].
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// First open period; it doubles after every failed probe.
    pub open_min: Duration,
    /// Maximum open period.
    pub open_max: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            open_min: Duration::from_secs(5),
            open_max: Duration::from_secs(300),
        }
    }
}

/// Open periods: `open_min`, doubling up to `open_max`. failsafe's own
/// backoffs count whole seconds only, which would make sub-second periods
/// in tests impossible.
// NOTE: there is no jitter, so a fleet whose provider failed at the same
// moment probes it in step. Adding a random fraction per period would fix it.
#[derive(Debug, Clone)]
struct Doubling {
    next: Duration,
    max: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(self.max);
        Some(current)
    }
}

/// Collects the transition reported by failsafe during one call.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Option<BreakerState>>>);

impl Transitions {
    fn record(&self, state: BreakerState) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(state);
    }

    fn take(&self) -> Option<BreakerState> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl Instrument for Transitions {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.record(BreakerState::Open);
    }

    fn on_half_open(&self) {
        self.record(BreakerState::HalfOpen);
    }

    fn on_closed(&self) {
        self.record(BreakerState::Closed);
    }
}

type Machine = StateMachine<ConsecutiveFailures<Doubling>, Transitions>;

/// Called with the new state after every transition, to keep a gauge current.
pub type StateObserver = Box<dyn Fn(BreakerState) + Send + Sync>;

/// A circuit breaker for one endpoint.
pub struct Breaker {
    /// Kind of endpoint protected, for the log: `jwks` or `introspection`.
    endpoint: &'static str,
    /// Endpoint protected, for the log: the issuer or the introspection URL's host.
    target: String,
    machine: Machine,
    transitions: Transitions,
    /// Serialises calls into the machine so a transition is logged with the
    /// cause of the call that made it.
    serial: Mutex<()>,
    state: AtomicU8,
    observer: StateObserver,
}

impl Breaker {
    pub fn new(
        endpoint: &'static str,
        target: String,
        settings: &BreakerSettings,
        observer: StateObserver,
    ) -> Self {
        let backoff = Doubling {
            next: settings.open_min,
            max: settings.open_max.max(settings.open_min),
        };
        let transitions = Transitions::default();
        let machine = StateMachine::new(
            consecutive_failures(settings.failures.max(1), backoff),
            transitions.clone(),
        );
        // failsafe reports the initial closed state, which is no change.
        transitions.take();
        observer(BreakerState::Closed);
        Breaker {
            endpoint,
            target,
            machine,
            transitions,
            serial: Mutex::new(()),
            state: AtomicU8::new(BreakerState::Closed as u8),
            observer,
        }
    }

    /// Returns the current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Tells whether a call may go out now. After the open period this
    /// moves the breaker to half-open, and the call is the probe.
    pub fn permit(&self) -> bool {
        self.step("open period over, probing", |machine| {
            machine.is_call_permitted()
        })
    }

    /// Records a successful call.
    pub fn record_success(&self) {
        self.step("call succeeded", |machine| machine.on_success());
    }

    /// Records a failed call, with `cause` as the reason logged.
    pub fn record_failure(&self, cause: &str) {
        self.step(cause, |machine| machine.on_error());
    }

    fn step<T>(&self, cause: &str, call: impl FnOnce(&Machine) -> T) -> T {
        let _serial = self
            .serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = call(&self.machine);
        if let Some(state) = self.transitions.take() {
            let previous = BreakerState::from_u8(self.state.swap(state as u8, Ordering::AcqRel));
            if previous != state {
                self.report(previous, state, cause);
            }
        }
        result
    }

    fn report(&self, from: BreakerState, to: BreakerState, cause: &str) {
        (self.observer)(to);
        let (endpoint, target) = (self.endpoint, self.target.as_str());
        let (from, state) = (from.name(), to.name());
        if to == BreakerState::Open {
            tracing::warn!(
                event = "breaker_state",
                endpoint,
                target,
                from,
                state,
                cause,
                "circuit breaker opened; calls stop until a probe succeeds"
            );
        } else {
            tracing::info!(
                event = "breaker_state",
                endpoint,
                target,
                from,
                state,
                cause,
                "circuit breaker changed state"
            );
        }
    }
}
