//! The embedded store: a moka cache in front of a sled tree.
//!
//! sled is the source of truth. A consumption is a `compare_and_swap` of the
//! record from `Issued` to `Consumed`, so exactly one of any number of racing
//! redemptions wins, and it is flushed to disk before the caller answers: a
//! crash after the answer can never bring the ticket back. An issuance is
//! flushed before the ticket is handed out, so a ticket a client holds
//! survives a crash. The moka cache holds recent records to answer repeated
//! redemptions of used tickets without decoding from sled; moka can return an
//! entry whose TTL has passed, so every decision checks the expiry stored in
//! the record against the injected clock.
//!
//! Expired records are not left to grow: a schedule ordered by due time marks
//! unredeemed tickets `Expired` when their lifetime ends (counted as expired
//! unused) and removes every record once the grace window after expiry ends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;

use super::{RedeemError, StoreCounts, StoreError, TicketRecord, TicketState, TicketStore};
use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::ticket::{log_id, TicketKey};

/// Settings of a [`SledStore`].
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub path: PathBuf,
    /// How long a record is kept after its expiry.
    pub grace: Duration,
    /// Most records held in the cache.
    pub cache_capacity: u64,
}

/// A failure to open the data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {path} is in use by another wsticket process (its lock is held)")]
    Locked { path: PathBuf },
    #[error("cannot open data directory {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot recover tickets from data directory {path}: {source}")]
    Recover { path: PathBuf, source: StoreError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// The ticket's lifetime ends.
    Expiry,
    /// The grace window after expiry ends; the record can go.
    Purge,
}

type Schedule = BinaryHeap<Reverse<(u64, Due, TicketKey)>>;

/// Lets moka drop an entry once the record's grace window has passed. The
/// record's own expiry, checked against the injected clock, still decides.
struct RecordExpiry {
    grace_ms: u64,
    clock: SharedClock,
}

impl Expiry<TicketKey, Arc<TicketRecord>> for RecordExpiry {
    fn expire_after_create(
        &self,
        _key: &TicketKey,
        record: &Arc<TicketRecord>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let until = record.expires_at_ms + self.grace_ms;
        Some(Duration::from_millis(
            until.saturating_sub(self.clock.now_ms()),
        ))
    }

    fn expire_after_update(
        &self,
        key: &TicketKey,
        record: &Arc<TicketRecord>,
        updated_at: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, record, updated_at)
    }
}

pub struct SledStore {
    db: sled::Db,
    cache: Cache<TicketKey, Arc<TicketRecord>>,
    schedule: Mutex<Schedule>,
    grace_ms: u64,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl SledStore {
    /// Opens (or creates) the store and loads every record still inside its
    /// grace window; records past it are deleted.
    pub fn open(
        settings: &StoreSettings,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, OpenError> {
        let db = open_db(&settings.path)?;
        let grace_ms = u64::try_from(settings.grace.as_millis()).unwrap_or(u64::MAX);
        let cache = Cache::builder()
            .max_capacity(settings.cache_capacity)
            .expire_after(RecordExpiry {
                grace_ms,
                clock: clock.clone(),
            })
            .build();
        let store = SledStore {
            db,
            cache,
            schedule: Mutex::new(BinaryHeap::new()),
            grace_ms,
            clock,
            metrics,
        };
        store.recover().map_err(|source| OpenError::Recover {
            path: settings.path.clone(),
            source,
        })?;
        Ok(store)
    }

    fn recover(&self) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let mut live = 0i64;
        let mut schedule = self.lock_schedule();
        for entry in self.db.iter() {
            let (raw_key, bytes) = entry?;
            let Ok(key) = TicketKey::try_from(raw_key.as_ref()) else {
                // Not a ticket record; nothing else is written to this tree.
                self.db.remove(raw_key)?;
                continue;
            };
            let record = TicketRecord::decode(&bytes)?;
            if now >= record.expires_at_ms.saturating_add(self.grace_ms) {
                self.db.remove(key)?;
                continue;
            }
            if record.state == TicketState::Issued && !record.is_expired_at(now) {
                live += 1;
            }
            let due = if record.state == TicketState::Issued {
                (record.expires_at_ms, Due::Expiry)
            } else {
                (
                    record.expires_at_ms.saturating_add(self.grace_ms),
                    Due::Purge,
                )
            };
            schedule.push(Reverse((due.0, due.1, key)));
            self.cache.insert(key, Arc::new(record));
        }
        drop(schedule);
        self.metrics.live_tickets.set(live);
        Ok(())
    }

    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Flushes sled's buffers to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Size of the store's files on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Handles every schedule entry that is due: marks tickets expired and
    /// removes records whose grace window has ended. Returns how many
    /// entries were handled.
    pub fn run_due(&self) -> usize {
        let now = self.clock.now_ms();
        let mut handled = 0;
        loop {
            let next = {
                let mut schedule = self.lock_schedule();
                match schedule.peek() {
                    Some(Reverse((due, _, _))) if *due <= now => schedule.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((_, due, key))) = next else {
                return handled;
            };
            handled += 1;
            let outcome = match due {
                Due::Expiry => self.expire(&key, now),
                Due::Purge => self.purge(&key, now),
            };
            if let Err(err) = outcome {
                tracing::error!(event = "store_maintenance", ticket_id = %log_id(&key), error = %err, "expiring a ticket record failed");
            }
        }
    }

    fn expire(&self, key: &TicketKey, now: u64) -> Result<(), StoreError> {
        loop {
            let Some(bytes) = self.db.get(key)? else {
                return Ok(());
            };
            let record = TicketRecord::decode(&bytes)?;
            if record.state == TicketState::Issued {
                if !record.is_expired_at(now) {
                    // Only happens if the clock moved back; look again later.
                    self.lock_schedule()
                        .push(Reverse((record.expires_at_ms, Due::Expiry, *key)));
                    return Ok(());
                }
                let expired = TicketRecord {
                    state: TicketState::Expired,
                    ..record.clone()
                };
                if self
                    .db
                    .compare_and_swap(key, Some(bytes), Some(expired.encode()))?
                    .is_err()
                {
                    continue;
                }
                self.cache.insert(*key, Arc::new(expired));
                self.metrics.live_tickets.dec();
                self.metrics.tickets_expired_unused.inc();
                tracing::info!(
                    event = "ticket_expired_unused",
                    ticket_id = %log_id(key),
                    subject = %record.subject,
                    result = "expired",
                    "ticket expired without being redeemed"
                );
            }
            let purge_at = record.expires_at_ms.saturating_add(self.grace_ms);
            self.lock_schedule()
                .push(Reverse((purge_at, Due::Purge, *key)));
            return Ok(());
        }
    }

    fn purge(&self, key: &TicketKey, now: u64) -> Result<(), StoreError> {
        if let Some(bytes) = self.db.get(key)? {
            let record = TicketRecord::decode(&bytes)?;
            if now < record.expires_at_ms.saturating_add(self.grace_ms) {
                return Ok(());
            }
            if record.state == TicketState::Issued {
                // Purged without passing through expiry (the clock jumped).
                self.metrics.live_tickets.dec();
            }
            self.db
                .compare_and_swap(key, Some(bytes), None::<&[u8]>)?
                .ok();
        }
        self.cache.invalidate(key);
        Ok(())
    }

    /// Runs [`Self::run_due`] every `interval` until the task is dropped.
    pub async fn run_maintenance(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let store = self.clone();
            // Expiry work touches sled synchronously; keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || store.run_due()).await;
        }
    }

    fn read_record(
        &self,
        key: &TicketKey,
    ) -> Result<Option<(sled::IVec, TicketRecord)>, StoreError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                let record = TicketRecord::decode(&bytes)?;
                Ok(Some((bytes, record)))
            }
        }
    }
}

fn open_db(path: &Path) -> Result<sled::Db, OpenError> {
    match sled::Config::new().path(path).open() {
        Ok(db) => Ok(db),
        Err(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
            Err(OpenError::Locked {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            if source.to_string().contains("could not acquire lock") {
                return Err(OpenError::Locked {
                    path: path.to_owned(),
                });
            }
            Err(OpenError::Open {
                path: path.to_owned(),
                source,
            })
        }
    }
}

#[async_trait]
impl TicketStore for SledStore {
    async fn insert(&self, key: &TicketKey, record: &TicketRecord) -> Result<(), StoreError> {
        self.db.insert(key, record.encode())?;
        self.flush().await?;
        self.cache.insert(*key, Arc::new(record.clone()));
        self.lock_schedule()
            .push(Reverse((record.expires_at_ms, Due::Expiry, *key)));
        self.metrics.live_tickets.inc();
        Ok(())
    }

    async fn consume(
        &self,
        key: &TicketKey,
        origin: Option<&str>,
    ) -> Result<TicketRecord, RedeemError> {
        let now = self.clock.now_ms();
        if let Some(cached) = self.cache.get(key) {
            if cached.state == TicketState::Consumed {
                return Err(RedeemError::AlreadyUsed);
            }
        }
        let consumed = loop {
            let (bytes, record) = match self.read_record(key) {
                Ok(Some(found)) => found,
                Ok(None) => return Err(RedeemError::Unknown),
                Err(err) => {
                    tracing::error!(event = "store_error", ticket_id = %log_id(key), error = %err, "reading a ticket record failed");
                    return Err(RedeemError::Store);
                }
            };
            match record.state {
                TicketState::Consumed => return Err(RedeemError::AlreadyUsed),
                TicketState::Expired => return Err(RedeemError::Expired),
                TicketState::Issued => {}
            }
            if record.is_expired_at(now) {
                return Err(RedeemError::Expired);
            }
            if record.origin.is_some() && record.origin.as_deref() != origin {
                return Err(RedeemError::OriginMismatch);
            }
            let consumed = TicketRecord {
                state: TicketState::Consumed,
                ..record
            };
            match self
                .db
                .compare_and_swap(key, Some(bytes), Some(consumed.encode()))
            {
                Ok(Ok(())) => break consumed,
                // Another redemption or the expiry schedule changed the record
                // first; read it again to report what it is now.
                Ok(Err(_)) => continue,
                Err(err) => {
                    tracing::error!(event = "store_error", ticket_id = %log_id(key), error = %err, "writing a consumption failed");
                    return Err(RedeemError::Store);
                }
            }
        };
        self.cache.insert(*key, Arc::new(consumed.clone()));
        self.metrics.live_tickets.dec();
        if let Err(err) = self.flush().await {
            // The record already says consumed, so the ticket stays unusable;
            // the client is told the store failed rather than accepted.
            tracing::error!(event = "store_error", ticket_id = %log_id(key), error = %err, "flushing a consumption failed");
            return Err(RedeemError::Store);
        }
        Ok(consumed)
    }

    fn counts(&self) -> StoreCounts {
        let now = self.clock.now_ms();
        let mut counts = StoreCounts::default();
        for entry in self.db.iter().values() {
            let Ok(bytes) = entry else { continue };
            let Ok(record) = TicketRecord::decode(&bytes) else {
                continue;
            };
            match record.state {
                TicketState::Consumed => counts.consumed += 1,
                TicketState::Issued if !record.is_expired_at(now) => counts.live += 1,
                TicketState::Issued | TicketState::Expired => counts.expired += 1,
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const START_MS: u64 = 1_700_000_000_000;

    fn record(expires_in: Duration, origin: Option<&str>) -> TicketRecord {
        TicketRecord {
            state: TicketState::Issued,
            subject: "user-1".into(),
            session: None,
            origin: origin.map(str::to_owned),
            issued_at_ms: START_MS,
            expires_at_ms: START_MS + expires_in.as_millis() as u64,
            token_expires_at: START_MS / 1000 + 3600,
            claims_json: String::new(),
        }
    }

    fn open(dir: &Path, clock: &ManualClock) -> SledStore {
        let settings = StoreSettings {
            path: dir.to_owned(),
            grace: Duration::from_secs(300),
            cache_capacity: 10_000,
        };
        SledStore::open(&settings, Arc::new(clock.clone()), Arc::new(Metrics::new()))
            .expect("store opens")
    }

    #[tokio::test]
    async fn ticket_is_consumed_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let store = open(dir.path(), &clock);
        let key = [1u8; 32];
        store
            .insert(&key, &record(Duration::from_secs(30), None))
            .await
            .expect("insert");
        assert!(store.consume(&key, None).await.is_ok());
        assert_eq!(
            store.consume(&key, None).await,
            Err(RedeemError::AlreadyUsed)
        );
    }

    #[tokio::test]
    async fn expiry_follows_the_injected_clock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let store = open(dir.path(), &clock);
        let key = [2u8; 32];
        store
            .insert(&key, &record(Duration::from_secs(30), None))
            .await
            .expect("insert");

        clock.advance(Duration::from_secs(30));
        assert_eq!(store.consume(&key, None).await, Err(RedeemError::Expired));

        // The schedule marks it expired unused, then forgets it after the grace window.
        assert_eq!(store.run_due(), 1);
        assert_eq!(store.metrics.tickets_expired_unused.get(), 1);
        assert_eq!(store.consume(&key, None).await, Err(RedeemError::Expired));
        clock.advance(Duration::from_secs(300));
        assert_eq!(store.run_due(), 1);
        assert_eq!(store.consume(&key, None).await, Err(RedeemError::Unknown));
        assert_eq!(store.counts(), StoreCounts::default());
    }

    #[tokio::test]
    async fn ticket_just_before_expiry_is_accepted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let store = open(dir.path(), &clock);
        let key = [3u8; 32];
        store
            .insert(&key, &record(Duration::from_secs(30), None))
            .await
            .expect("insert");
        clock.advance(Duration::from_millis(29_999));
        assert!(store.consume(&key, None).await.is_ok());
    }

    #[tokio::test]
    async fn origin_mismatch_leaves_ticket_unused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let store = open(dir.path(), &clock);
        let key = [4u8; 32];
        store
            .insert(
                &key,
                &record(Duration::from_secs(30), Some("https://app.example")),
            )
            .await
            .expect("insert");
        assert_eq!(
            store.consume(&key, Some("https://evil.example")).await,
            Err(RedeemError::OriginMismatch)
        );
        assert_eq!(
            store.consume(&key, None).await,
            Err(RedeemError::OriginMismatch)
        );
        assert!(store
            .consume(&key, Some("https://app.example"))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let (used, unused) = ([5u8; 32], [6u8; 32]);
        {
            let store = open(dir.path(), &clock);
            for key in [&used, &unused] {
                store
                    .insert(key, &record(Duration::from_secs(30), None))
                    .await
                    .expect("insert");
            }
            store.consume(&used, None).await.expect("first use");
        }
        let store = open(dir.path(), &clock);
        assert_eq!(
            store.consume(&used, None).await,
            Err(RedeemError::AlreadyUsed)
        );
        assert!(store.consume(&unused, None).await.is_ok());
    }

    #[tokio::test]
    async fn reopen_drops_records_past_grace() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let key = [7u8; 32];
        {
            let store = open(dir.path(), &clock);
            store
                .insert(&key, &record(Duration::from_secs(30), None))
                .await
                .expect("insert");
        }
        clock.advance(Duration::from_secs(30 + 300));
        let store = open(dir.path(), &clock);
        assert_eq!(store.counts(), StoreCounts::default());
        assert_eq!(store.consume(&key, None).await, Err(RedeemError::Unknown));
    }

    #[tokio::test]
    async fn second_open_of_directory_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let _first = open(dir.path(), &clock);
        let settings = StoreSettings {
            path: dir.path().to_owned(),
            grace: Duration::from_secs(300),
            cache_capacity: 100,
        };
        let second = SledStore::open(&settings, Arc::new(clock), Arc::new(Metrics::new()));
        assert!(
            matches!(second, Err(OpenError::Locked { .. })),
            "{:?}",
            second.err()
        );
    }
}
