//! Measures the ticket store on its own, through the library:
//!
//! - `capacity`: fills a store with N live tickets, reports resident memory
//!   and disk bytes per ticket, then reopens it and times the recovery.
//! - `soak`: issues and consumes tickets at a fixed rate for a fixed time with
//!   a short TTL, and prints resident memory and data directory size every
//!   sample interval, to show whether they reach a plateau.
//!
//! - `throughput`: runs issue+consume pairs from many tasks for a fixed time
//!   under `--sync always`, `--sync batched`, and an in-memory baseline (a
//!   moka cache alone, no disk), and prints pairs per second for each.
//!
//! Run with `cargo run --release --example store_bench -- capacity --tickets 1000000`,
//! `cargo run --release --example store_bench -- soak --rate 1000 --duration 10m`
//! or `cargo run --release --example store_bench -- throughput --tasks 64 --duration 10s`.
//! Data goes to a temporary directory that is deleted at the end.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use wsticket::clock::{Clock, SystemClock};
use wsticket::config::SyncMode;
use wsticket::metrics::Metrics;
use wsticket::store::{SledStore, StoreSettings, TicketRecord, TicketState, TicketStore};
use wsticket::ticket;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Capacity {
        #[arg(long, default_value_t = 1_000_000)]
        tickets: u64,
    },
    Soak {
        /// Issue+consume pairs per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        grace: Duration,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        sample: Duration,
    },
    Throughput {
        #[arg(long, default_value_t = 64)]
        tasks: u64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

fn directory_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => directory_bytes(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn settings(path: &Path, grace: Duration) -> StoreSettings {
    settings_with(path, grace, SyncMode::Batched)
}

fn settings_with(path: &Path, grace: Duration, sync: SyncMode) -> StoreSettings {
    StoreSettings {
        path: path.to_owned(),
        grace,
        cache_capacity: 200_000,
        sync,
        sync_interval: Duration::from_millis(10),
    }
}

fn record(number: u64, ttl: Duration) -> TicketRecord {
    let now = SystemClock.now_ms();
    TicketRecord {
        state: TicketState::Issued,
        subject: format!("user-{:08}", number % 100_000),
        session: Some(format!("session-{:08}", number % 100_000)),
        origin: Some("https://app.example.com".into()),
        issued_at_ms: now,
        expires_at_ms: now + ttl.as_millis() as u64,
        token_expires_at: now / 1000 + 3600,
        claims_json: String::new(),
    }
}

fn key(number: u64) -> ticket::TicketKey {
    ticket::key_of(&format!("{number:032}"))
}

async fn capacity(tickets: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let grace = Duration::from_secs(300);
    let ttl = Duration::from_secs(3600);
    let rss_before = rss_bytes();
    {
        let store = Arc::new(
            SledStore::open(
                &settings(dir.path(), grace),
                Arc::new(SystemClock),
                Arc::new(Metrics::new()),
            )
            .expect("open store"),
        );
        let flusher = store.spawn_flusher();
        let started = Instant::now();
        for number in 0..tickets {
            store
                .insert(&key(number), &record(number, ttl))
                .await
                .expect("insert");
        }
        store.flush().await.expect("flush");
        let fill_secs = started.elapsed().as_secs_f64();
        let rss = rss_bytes().saturating_sub(rss_before);
        let disk = directory_bytes(dir.path());
        println!(
            "filled {tickets} tickets in {fill_secs:.1} s ({:.0}/s, --sync batched)",
            tickets as f64 / fill_secs
        );
        println!(
            "resident memory: {} bytes more than before, {:.0} bytes per live ticket",
            rss,
            rss as f64 / tickets as f64
        );
        println!(
            "data directory: {disk} bytes, {:.0} bytes per ticket",
            disk as f64 / tickets as f64
        );
        flusher.abort();
        let _ = flusher.await;
    }
    let rss_before_recovery = rss_bytes();
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let store = SledStore::open(
        &settings(dir.path(), grace),
        Arc::new(SystemClock),
        metrics.clone(),
    )
    .expect("reopen store");
    let recovery = started.elapsed();
    println!(
        "recovery: reopened and loaded {} live tickets in {:.2} s",
        metrics.live_tickets.get(),
        recovery.as_secs_f64()
    );
    println!(
        "resident memory after recovery: {} bytes more than before it ({:.0} per ticket)",
        rss_bytes().saturating_sub(rss_before_recovery),
        rss_bytes().saturating_sub(rss_before_recovery) as f64 / tickets as f64
    );
    drop(store);
}

async fn soak(rate: u64, duration: Duration, ttl: Duration, grace: Duration, sample: Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        SledStore::open(
            &settings(dir.path(), grace),
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
        )
        .expect("open store"),
    );
    let flusher = store.spawn_flusher();
    let maintenance = tokio::spawn(store.clone().run_maintenance(Duration::from_millis(250)));
    let started = Instant::now();
    let mut next_sample = started;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate / 100).max(1);
    let mut number = 0u64;
    println!("elapsed_s,issued,rss_bytes,data_dir_bytes");
    while started.elapsed() < duration {
        ticker.tick().await;
        for _ in 0..per_tick {
            let key = key(number);
            store
                .insert(&key, &record(number, ttl))
                .await
                .expect("insert");
            // Half are consumed at once; the other half expire unused.
            if number.is_multiple_of(2) {
                store
                    .consume(&key, Some("https://app.example.com"))
                    .await
                    .expect("consume");
            }
            number += 1;
        }
        if Instant::now() >= next_sample {
            println!(
                "{:.0},{number},{},{}",
                started.elapsed().as_secs_f64(),
                rss_bytes(),
                directory_bytes(dir.path())
            );
            next_sample += sample;
        }
    }
    maintenance.abort();
    flusher.abort();
}

/// Runs issue+consume pairs from `tasks` tasks for `duration` against the
/// store; returns pairs per second.
async fn store_pairs_per_second(sync: SyncMode, tasks: u64, duration: Duration) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        SledStore::open(
            &settings_with(dir.path(), Duration::from_secs(300), sync),
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
        )
        .expect("open store"),
    );
    let flusher = store.spawn_flusher();
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut pairs = 0u64;
                while started.elapsed() < duration {
                    let number = task << 40 | pairs;
                    let key = key(number);
                    store
                        .insert(&key, &record(number, Duration::from_secs(30)))
                        .await
                        .expect("insert");
                    store
                        .consume(&key, Some("https://app.example.com"))
                        .await
                        .expect("consume");
                    pairs += 1;
                }
                pairs
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("worker");
    }
    flusher.abort();
    total as f64 / started.elapsed().as_secs_f64()
}

/// Runs the same pairs against a moka cache alone, to show the cost of the
/// operations without any disk.
async fn memory_pairs_per_second(tasks: u64, duration: Duration) -> f64 {
    let cache: moka::sync::Cache<ticket::TicketKey, Arc<TicketRecord>> =
        moka::sync::Cache::builder().max_capacity(2_000_000).build();
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut pairs = 0u64;
                while started.elapsed() < duration {
                    let number = task << 40 | pairs;
                    let key = key(number);
                    cache.insert(key, Arc::new(record(number, Duration::from_secs(30))));
                    let removed = cache.remove(&key);
                    assert!(removed.is_some(), "the pair's ticket is present");
                    pairs += 1;
                    if pairs.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                pairs
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn throughput(tasks: u64, duration: Duration) {
    let always = store_pairs_per_second(SyncMode::Always, tasks, duration).await;
    let batched = store_pairs_per_second(SyncMode::Batched, tasks, duration).await;
    let memory = memory_pairs_per_second(tasks, duration).await;
    println!("issue+consume pairs per second, {tasks} tasks, {duration:?} each:");
    println!("--sync always   {always:>10.0}");
    println!("--sync batched  {batched:>10.0}");
    println!("in memory only  {memory:>10.0}");
    println!("always / batched = {:.2}", always / batched);
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Mode::Capacity { tickets } => capacity(tickets).await,
        Mode::Soak {
            rate,
            duration,
            ttl,
            grace,
            sample,
        } => soak(rate, duration, ttl, grace, sample).await,
        Mode::Throughput { tasks, duration } => throughput(tasks, duration).await,
    }
}
