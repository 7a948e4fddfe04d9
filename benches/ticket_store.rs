//! Ticket generation and the ticket store.
//!
//! `store/cache_only` times a moka cache built like the store's in-memory
//! layer (`SledStore` keeps its cache private), so it is the floor of what an
//! in-memory store costs. The `sled_*` benchmarks time `SledStore` itself:
//! with `--sync batched` an insert is the sled write alone, with `--sync
//! always` it also waits for its flush; a consumption always waits for its
//! flush. A lone writer pays a whole flush; the load generator measures how
//! concurrent writers share them.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use moka::sync::Cache;
use ring::rand::SystemRandom;
use wsticket::clock::{Clock, SharedClock, SystemClock};
use wsticket::config::SyncMode;
use wsticket::metrics::Metrics;
use wsticket::store::{TicketRecord, TicketState, TicketStore};
use wsticket::ticket::{self, TicketKey};

fn record(clock: &dyn Clock) -> TicketRecord {
    let now = clock.now_ms();
    TicketRecord {
        state: TicketState::Issued,
        subject: "bench-user".into(),
        session: Some("bench-session".into()),
        origin: None,
        issued_at_ms: now,
        expires_at_ms: now + 600_000,
        token_expires_at: now / 1000 + 3600,
        claims_json: String::new(),
    }
}

fn fresh_keys(count: u64, rng: &SystemRandom) -> Vec<TicketKey> {
    (0..count)
        .map(|_| ticket::key_of(&ticket::generate(rng).expect("system random works")))
        .collect()
}

fn tickets(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let mut group = c.benchmark_group("ticket");
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("generate", |b| {
        b.iter(|| ticket::generate(&rng).expect("system random works"))
    });
    let value = ticket::generate(&rng).expect("system random works");
    group.bench_function("key_of", |b| b.iter(|| ticket::key_of(&value)));
    group.finish();
}

fn cache_only(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let clock = SystemClock;
    let cache: Cache<TicketKey, Arc<TicketRecord>> =
        Cache::builder().max_capacity(2_000_000).build();
    let mut group = c.benchmark_group("store");
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("cache_only_insert_consume", |b| {
        b.iter_batched(
            || fresh_keys(1, &rng)[0],
            |key| {
                cache.insert(key, Arc::new(record(&clock)));
                let found = cache.get(&key).expect("just inserted");
                let consumed = TicketRecord {
                    state: TicketState::Consumed,
                    ..(*found).clone()
                };
                cache.insert(key, Arc::new(consumed));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn sled(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let rng = SystemRandom::new();
    let clock: SharedClock = Arc::new(SystemClock);
    let mut group = c.benchmark_group("store");
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    for (name, sync) in [("batched", SyncMode::Batched), ("always", SyncMode::Always)] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (store, flusher) = runtime.block_on(async {
            support::app::open_store(dir.path(), sync, clock.clone(), Arc::new(Metrics::new()))
        });
        group.bench_function(format!("sled_{name}_insert"), |b| {
            b.iter_custom(|iters| {
                let keys = fresh_keys(iters, &rng);
                let record = record(clock.as_ref());
                runtime.block_on(async {
                    let started = Instant::now();
                    for key in &keys {
                        store.insert(key, &record).await.expect("insert");
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_function(format!("sled_{name}_consume"), |b| {
            b.iter_custom(|iters| {
                let keys = fresh_keys(iters, &rng);
                let record = record(clock.as_ref());
                runtime.block_on(async {
                    for key in &keys {
                        store.insert(key, &record).await.expect("insert");
                    }
                    let started = Instant::now();
                    for key in &keys {
                        store.consume(key, None).await.expect("consume");
                    }
                    started.elapsed()
                })
            })
        });
        flusher.abort();
    }
    group.finish();
}

criterion_group!(benches, tickets, cache_only, sled);
criterion_main!(benches);
