//! The whole `POST /websocket/ticket` handler through `warp::test`, without a
//! socket: bearer parsing, verification, the rate limiter, ticket generation,
//! the store insert and the JSON response. No tracing subscriber is installed,
//! so the per-ticket log line costs next to nothing here; the load generator
//! measures the server with its logging.
//!
//! `uncached` drops the token's verification cache entry before each request
//! (outside the timing); `cached` reuses one verified token. Each is run
//! with `--sync batched` and `--sync always`; under `always` a lone client
//! waits for one flush per ticket.

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::Algorithm;
use wsticket::auth::cache::VerifiedCache;

fn issuance(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let fixtures = support::default_fixtures();
    let key = support::signing_key(&fixtures, Algorithm::RS256);
    let token = support::sign(&key, Algorithm::RS256, "bench-user", 1, 3600);
    let authorization = format!("Bearer {token}");

    let mut group = c.benchmark_group("issuance");
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    for sync in ["batched", "always"] {
        let bench = runtime.block_on(support::app::bench_state(sync));
        let routes = wsticket::http::public_routes(bench.state.clone());
        let request = || {
            warp::test::request()
                .method("POST")
                .path("/websocket/ticket")
                .header("authorization", &authorization)
        };
        let issue = || {
            let response = runtime.block_on(request().reply(&routes));
            assert_eq!(response.status(), 200, "ticket issued");
            response
        };

        group.bench_function(format!("RS256_uncached/sync_{sync}"), |b| {
            b.iter_batched(
                || {
                    bench
                        .state
                        .verifier
                        .cache()
                        .remove(&VerifiedCache::key(&token))
                },
                |()| issue(),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("RS256_cached/sync_{sync}"), |b| b.iter(issue));
        drop(bench);
    }
    group.finish();
}

criterion_group!(benches, issuance);
criterion_main!(benches);
