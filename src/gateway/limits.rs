//! Limits against abuse of the upgrade: failed upgrades per client IP
//! address, and open connections per subject.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Most client addresses remembered as blocked at once.
const MAX_BLOCKED_ADDRESSES: u64 = 100_000;

/// Failed upgrades per client IP address, with governor's GCRA: each failure
/// takes one cell of a bucket of `per_minute` cells that refills at
/// `per_minute` cells a minute.
///
/// The failure that finds the bucket empty blocks the address until a cell
/// is free again, and every upgrade from a blocked address gets
/// `rate_limited` without touching the store. governor cannot look at a
/// bucket without taking a cell, so the blocked addresses are kept beside it.
pub struct FailedUpgrades {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Blocked addresses and when their block ends.
    blocked: moka::sync::Cache<IpAddr, Instant>,
}

impl FailedUpgrades {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        FailedUpgrades {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            blocked: moka::sync::Cache::builder()
                .max_capacity(MAX_BLOCKED_ADDRESSES)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }
    }

    /// Returns how long `ip` stays blocked, or `None` when it is not.
    pub fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        let until = self.blocked.get(&ip)?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts a failed upgrade from `ip`. Returns the time until the next
    /// attempt is allowed when this failure went over the limit.
    pub fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        let not_until = self.limiter.check_key(&ip).err()?;
        let wait = not_until
            .wait_time_from(DefaultClock::default().now())
            .max(Duration::from_secs(1));
        self.blocked.insert(ip, Instant::now() + wait);
        Some(wait)
    }

    /// Drops the state of addresses without recent failures.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Open connections per subject, capped by `--max-connections-per-subject`.
pub struct SubjectConnections {
    limit: Option<u32>,
    open: Mutex<HashMap<String, u32>>,
}

/// One open connection of a subject; dropping it frees the slot.
pub struct SubjectSlot {
    owner: Option<(Arc<SubjectConnections>, String)>,
}

impl SubjectConnections {
    pub fn new(limit: Option<u32>) -> Self {
        SubjectConnections {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a connection slot for `subject`, or returns `None` when the
    /// subject already has the maximum. Without a limit nothing is counted.
    pub fn try_acquire(self: &Arc<Self>, subject: &str) -> Option<SubjectSlot> {
        let Some(limit) = self.limit else {
            return Some(SubjectSlot { owner: None });
        };
        let mut open = self
            .open
            .lock()
            .expect("no code panics while holding this lock");
        let count = open.entry(subject.to_owned()).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(SubjectSlot {
            owner: Some((self.clone(), subject.to_owned())),
        })
    }

    /// Returns the open connections of `subject` that are counted.
    pub fn open(&self, subject: &str) -> u32 {
        let open = self
            .open
            .lock()
            .expect("no code panics while holding this lock");
        open.get(subject).copied().unwrap_or(0)
    }
}

impl Drop for SubjectSlot {
    fn drop(&mut self) {
        let Some((connections, subject)) = self.owner.take() else {
            return;
        };
        let mut open = connections
            .open
            .lock()
            .expect("no code panics while holding this lock");
        if let Some(count) = open.get_mut(&subject) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_slots_are_capped_and_freed() {
        let connections = Arc::new(SubjectConnections::new(Some(2)));
        let first = connections.try_acquire("alice").expect("first slot");
        let _second = connections.try_acquire("alice").expect("second slot");
        assert!(connections.try_acquire("alice").is_none(), "third slot");
        assert!(connections.try_acquire("bob").is_some(), "other subject");
        drop(first);
        assert_eq!(connections.open("alice"), 1);
        assert!(connections.try_acquire("alice").is_some(), "freed slot");
    }

    #[test]
    fn unlimited_subjects_are_not_counted() {
        let connections = Arc::new(SubjectConnections::new(None));
        let slots: Vec<_> = (0..100)
            .map(|_| connections.try_acquire("alice").expect("no limit"))
            .collect();
        assert_eq!(slots.len(), 100);
        assert_eq!(connections.open("alice"), 0);
    }

    #[test]
    fn failures_over_limit_block_address() {
        let limits = FailedUpgrades::new(3);
        let ip: IpAddr = "127.0.0.9".parse().expect("address");
        for _ in 0..3 {
            assert_eq!(limits.record_failure(ip), None);
            assert_eq!(limits.blocked_for(ip), None);
        }
        let wait = limits.record_failure(ip).expect("fourth failure is over");
        assert!(wait >= Duration::from_secs(1), "{wait:?}");
        assert!(limits.blocked_for(ip).is_some());
        let other: IpAddr = "127.0.0.10".parse().expect("address");
        assert_eq!(limits.blocked_for(other), None);
    }
}
