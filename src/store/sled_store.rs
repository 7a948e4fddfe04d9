//! The embedded store: a moka cache in front of a sled tree.
//!
//! sled is the source of truth. A consumption is a `compare_and_swap` of the
//! record from `Issued` to `Consumed`, so exactly one of any number of racing
//! redemptions wins, and it is flushed to disk before the caller responds: a
//! crash after the response can never bring the ticket back. An issuance is
//! flushed before the ticket is handed out, so a ticket a client holds
//! survives a crash. The moka cache holds tombstones (used and expired
//! records), so replays of used tickets are rejected without a disk read.
//! Live tickets are not cached: measured with `examples/store_bench.rs` at
//! 1,000,000 live tickets, caching them took 910 bytes of resident memory per
//! ticket and 3.4 s to recover, against 236 bytes and 1.6 s without. moka
//! can return an entry whose TTL has passed, so every decision checks the
//! expiry saved in the record against the injected clock.
//!
//! Expired records are not left to grow: a schedule ordered by due time marks
//! unredeemed tickets `Expired` when their lifetime ends (counted as expired
//! unused) and removes every record once the grace window after expiry ends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;

use super::group_commit::GroupCommit;
use super::{RedeemError, StoreCounts, StoreError, TicketRecord, TicketState, TicketStore};
use crate::clock::SharedClock;
use crate::config::SyncMode;
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
    pub sync: SyncMode,
    /// Flush period of `SyncMode::Batched`.
    pub sync_interval: Duration,
}

/// Memory sled may use for its page cache. sled's default (1 GiB) would
/// dominate the process's memory; records are small, and each live ticket is
/// read about once.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// A failure to open the data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--data-dir {path} is in use by another wsticket process (its lock is held)")]
    Locked { path: PathBuf },
    #[error("cannot open --data-dir {path}: {source}")]
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
        let until = record.expires_at_ms.saturating_add(self.grace_ms);
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
    path: PathBuf,
    /// The open database, or `None` while it is being reopened after a
    /// write failure.
    db: RwLock<Option<sled::Db>>,
    /// False from a failed write until the database has been reopened.
    healthy: AtomicBool,
    group_commit: Arc<GroupCommit>,
    sync: SyncMode,
    sync_interval: Duration,
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
            path: settings.path.clone(),
            db: RwLock::new(Some(db)),
            healthy: AtomicBool::new(true),
            group_commit: Arc::new(GroupCommit::new()),
            sync: settings.sync,
            sync_interval: settings.sync_interval,
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
        let db = self.db()?;
        let now = self.clock.now_ms();
        let mut live = 0i64;
        self.cache.invalidate_all();
        let mut schedule = self.lock_schedule();
        schedule.clear();
        for entry in db.iter() {
            let (raw_key, bytes) = entry?;
            let Ok(key) = TicketKey::try_from(raw_key.as_ref()) else {
                // Nothing but ticket records is written to this tree, so a
                // key of another length is damage: stop rather than guess.
                return Err(StoreError::Corrupt(
                    postcard::Error::DeserializeUnexpectedEnd,
                ));
            };
            let record = TicketRecord::decode(&bytes)?;
            if now >= record.expires_at_ms.saturating_add(self.grace_ms) {
                db.remove(key)?;
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
            if record.state != TicketState::Issued {
                self.cache.insert(key, Arc::new(record));
            }
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

    /// Returns the open database, or `Unavailable` while it is being
    /// reopened after a write failure.
    fn db(&self) -> Result<sled::Db, StoreError> {
        if !self.healthy.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        self.db
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Takes the store out of service after a failed write. sled keeps
    /// returning the first I/O error once it has seen one, so the database is
    /// reopened by [`Self::run_repair`] before writes are tried again.
    fn mark_failed(&self, err: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(event = "store_error", path = %self.path.display(), error = %err, "ticket store write failed; responding with store_unavailable until the store is reopened");
        }
    }

    /// Tells whether the store accepts writes.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Reopens the database after a write failure, every `interval`, until
    /// it succeeds; then loads the records again. Runs until dropped.
    pub async fn run_repair(self: Arc<Self>, interval: Duration) {
        let mut attempts: u64 = 0;
        loop {
            tokio::time::sleep(interval).await;
            if self.is_healthy() {
                attempts = 0;
                continue;
            }
            attempts += 1;
            let store = self.clone();
            let result = tokio::task::spawn_blocking(move || store.reopen()).await;
            match result {
                Ok(Ok(())) => {
                    tracing::info!(event = "store_recovered", path = %self.path.display(), attempts, "ticket store reopened after a write failure");
                }
                Ok(Err(err)) if attempts == 1 || attempts.is_multiple_of(30) => {
                    tracing::error!(event = "store_error", path = %self.path.display(), attempts, error = %err, "reopening the ticket store failed; retrying");
                }
                _ => {}
            }
        }
    }

    fn reopen(&self) -> Result<(), String> {
        let mut slot = self
            .db
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Dropping the failed handle releases the directory lock once the
        // last clone held by a request in flight is gone.
        slot.take();
        let db = open_db(&self.path).map_err(|err| err.to_string())?;
        *slot = Some(db);
        drop(slot);
        self.healthy.store(true, Ordering::Release);
        if let Err(err) = self.recover() {
            self.healthy.store(false, Ordering::Release);
            return Err(err.to_string());
        }
        Ok(())
    }

    /// Waits until every write made so far is on disk, sharing the flush
    /// with concurrent callers. Needs [`Self::spawn_flusher`] to be running.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.group_commit.wait_durable().await?;
        Ok(())
    }

    /// Flushes at once, without the flusher task; for shutdown.
    pub async fn flush_now(&self) -> Result<(), StoreError> {
        self.db()?.flush_async().await?;
        Ok(())
    }

    /// Flushes on the calling thread; returns false and takes the store out
    /// of service when the flush fails.
    fn flush_blocking(&self) -> bool {
        let result = self
            .db()
            .and_then(|db| db.flush().map_err(StoreError::from));
        match result {
            Ok(_) => true,
            Err(StoreError::Unavailable) => false,
            Err(err) => {
                self.mark_failed(&err);
                false
            }
        }
    }

    /// Starts the task that runs the group-commit flushes. The task stops
    /// when the returned handle is aborted.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let flush = move || store.upgrade().is_some_and(|store| store.flush_blocking());
        let interval = match self.sync {
            SyncMode::Always => None,
            SyncMode::Batched => Some(self.sync_interval),
        };
        tokio::spawn(self.group_commit.clone().run(flush, interval))
    }

    /// Size of the store's files on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db().and_then(|db| Ok(db.size_on_disk()?)).unwrap_or(0)
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
        let db = self.db()?;
        loop {
            let Some(bytes) = db.get(key)? else {
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
                if db
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
        let db = self.db()?;
        if let Some(bytes) = db.get(key)? {
            let record = TicketRecord::decode(&bytes)?;
            if now < record.expires_at_ms.saturating_add(self.grace_ms) {
                return Ok(());
            }
            if record.state == TicketState::Issued {
                // Purged without passing through expiry (the clock jumped).
                self.metrics.live_tickets.dec();
            }
            db.compare_and_swap(key, Some(bytes), None::<&[u8]>)?.ok();
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
        match self.db()?.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                let record = TicketRecord::decode(&bytes)?;
                Ok(Some((bytes, record)))
            }
        }
    }
}

pub(super) fn open_db(path: &Path) -> Result<sled::Db, OpenError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(SLED_CACHE_BYTES)
        .flush_every_ms(None);
    match config.open() {
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
        let db = self.db()?;
        if let Err(err) = db.insert(key, record.encode()) {
            self.mark_failed(&err);
            return Err(err.into());
        }
        drop(db);
        if self.sync == SyncMode::Always {
            self.flush().await?;
        }
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
            let db = match self.db() {
                Ok(db) => db,
                Err(_) => return Err(RedeemError::Store),
            };
            match db.compare_and_swap(key, Some(bytes), Some(consumed.encode())) {
                Ok(Ok(())) => break consumed,
                // Another redemption or the expiry schedule changed the record
                // first; read it again to report what it is now.
                Ok(Err(_)) => continue,
                Err(err) => {
                    self.mark_failed(&err);
                    return Err(RedeemError::Store);
                }
            }
        };
        self.cache.insert(*key, Arc::new(consumed.clone()));
        self.metrics.live_tickets.dec();
        if let Err(err) = self.flush().await {
            // The record is already marked consumed, so the ticket stays unusable and
            // the client receives store_unavailable instead of an acceptance.
            tracing::error!(event = "store_error", ticket_id = %log_id(key), error = %err, "flushing a consumption failed");
            return Err(RedeemError::Store);
        }
        Ok(consumed)
    }

    fn counts(&self) -> StoreCounts {
        let now = self.clock.now_ms();
        let mut counts = StoreCounts::default();
        let Ok(db) = self.db() else {
            return counts;
        };
        for entry in db.iter().values() {
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

    /// A store with its flusher; dropping it stops the flusher, which
    /// releases the data directory.
    struct TestStore {
        store: Arc<SledStore>,
        flusher: tokio::task::JoinHandle<()>,
    }

    impl std::ops::Deref for TestStore {
        type Target = SledStore;
        fn deref(&self) -> &SledStore {
            &self.store
        }
    }

    impl TestStore {
        async fn close(self) {
            self.flusher.abort();
            let _ = self.flusher.await;
        }
    }

    fn open(dir: &Path, clock: &ManualClock) -> TestStore {
        let store = SledStore::open(
            &settings(dir),
            Arc::new(clock.clone()),
            Arc::new(Metrics::new()),
        )
        .expect("store opens");
        let store = Arc::new(store);
        let flusher = store.spawn_flusher();
        TestStore { store, flusher }
    }

    fn settings(dir: &Path) -> StoreSettings {
        StoreSettings {
            path: dir.to_owned(),
            grace: Duration::from_secs(300),
            cache_capacity: 10_000,
            sync: SyncMode::Always,
            sync_interval: Duration::from_millis(10),
        }
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

        // The schedule marks it expired unused, then removes it after the grace window.
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
            store.close().await;
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
            store.close().await;
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
        let second = SledStore::open(
            &settings(dir.path()),
            Arc::new(clock),
            Arc::new(Metrics::new()),
        );
        assert!(
            matches!(second, Err(OpenError::Locked { .. })),
            "{:?}",
            second.err()
        );
    }
}
