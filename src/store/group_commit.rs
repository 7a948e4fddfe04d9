//! Group commit: many writers, one flush.
//!
//! A writer that needs its write on disk takes a ticket number and waits until
//! a flush that started after its write has finished. One flusher task runs
//! the flushes back to back; every writer that arrived while a flush was
//! running is served by the next one. Under load, hundreds of issuances and
//! consumptions share each `fsync`-class call instead of paying one each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// The outcome of the latest flush.
#[derive(Debug, Clone, Copy, Default)]
struct Flushed {
    /// Every write request numbered up to this one is covered.
    generation: u64,
    failed: bool,
}

/// Why a write did not reach the disk.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum FlushError {
    #[error("flushing the store to disk failed")]
    Failed,
    #[error("the store's flusher has stopped")]
    Stopped,
}

pub struct GroupCommit {
    requested: AtomicU64,
    wake: Notify,
    flushed: watch::Sender<Flushed>,
}

impl GroupCommit {
    pub fn new() -> Self {
        GroupCommit {
            requested: AtomicU64::new(0),
            wake: Notify::new(),
            flushed: watch::Sender::new(Flushed::default()),
        }
    }

    /// Waits until everything written before this call is on disk.
    pub async fn wait_durable(&self) -> Result<(), FlushError> {
        let generation = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut flushed = self.flushed.subscribe();
        self.wake.notify_one();
        let state = flushed
            .wait_for(|state| state.generation >= generation)
            .await
            .map_err(|_| FlushError::Stopped)?;
        if state.failed {
            Err(FlushError::Failed)
        } else {
            Ok(())
        }
    }

    /// Runs flushes until the task is dropped. `flush` runs on a blocking
    /// thread. With `interval`, the flusher also flushes that often without
    /// being asked, which bounds how long an unawaited write stays in memory.
    pub async fn run<F>(self: Arc<Self>, flush: F, interval: Option<Duration>)
    where
        F: Fn() -> bool + Send + Sync + Clone + 'static,
    {
        let mut ticker = interval.map(|period| {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            match ticker.as_mut() {
                Some(ticker) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = ticker.tick() => {}
                    }
                }
                None => self.wake.notified().await,
            }
            // Writes numbered up to here were made before this flush starts.
            let generation = self.requested.load(Ordering::Acquire);
            let flush = flush.clone();
            let ok = tokio::task::spawn_blocking(flush).await.unwrap_or(false);
            self.flushed.send_replace(Flushed {
                generation,
                failed: !ok,
            });
        }
    }
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let group = Arc::new(GroupCommit::new());
        let flushes = Arc::new(AtomicUsize::new(0));
        let counter = flushes.clone();
        let flush = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            true
        };
        let flusher = tokio::spawn(group.clone().run(flush, None));

        let writers: Vec<_> = (0..200)
            .map(|_| {
                let group = group.clone();
                tokio::spawn(async move { group.wait_durable().await })
            })
            .collect();
        for writer in writers {
            assert!(writer.await.expect("join").is_ok());
        }
        let count = flushes.load(Ordering::SeqCst);
        assert!(count >= 1, "at least one flush ran");
        assert!(count < 100, "200 concurrent writers needed {count} flushes");
        flusher.abort();
    }

    #[tokio::test]
    async fn failed_flush_fails_waiting_writers() {
        let group = Arc::new(GroupCommit::new());
        let flusher = tokio::spawn(group.clone().run(|| false, None));
        assert!(matches!(
            group.wait_durable().await,
            Err(FlushError::Failed)
        ));
        flusher.abort();
    }
}
