//! JWT verification per algorithm: the signature check alone
//! (`jsonwebtoken` on its `aws_lc_rs` backend), and wsticket's `Verifier`
//! with and without a hit in its cache of verified tokens.
//!
//! The uncached case drops the token's cache entry before each call (outside
//! the timing, one call per batch so that no call finds the entry of the
//! previous one), so every call parses, checks the signature and claims, and
//! inserts the result into the cache again, as a first request does.

mod support;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::Algorithm;
use wsticket::auth::cache::VerifiedCache;
use wsticket::clock::{SharedClock, SystemClock};
use wsticket::metrics::Metrics;

const ALGORITHMS: [(&str, Algorithm); 3] = [
    ("RS256", Algorithm::RS256),
    ("ES256", Algorithm::ES256),
    ("EdDSA", Algorithm::EdDSA),
];

fn verification(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let fixtures = support::default_fixtures();
    let dir = tempfile::tempdir().expect("temporary directory");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, support::jwks(&fixtures).to_string()).expect("write the JWKS");
    let config = support::app::config(&jwks_file, &dir.path().join("data"), "batched");
    let clock: SharedClock = Arc::new(SystemClock);
    let verifier = runtime.block_on(support::app::verifier(
        &config,
        clock,
        Arc::new(Metrics::new()),
    ));

    let mut group = c.benchmark_group("jwt");
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(30);
    for (name, alg) in ALGORITHMS {
        let key = support::signing_key(&fixtures, alg);
        let token = support::sign(&key, alg, "bench-user", 1, 3600);

        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(support::public_jwk(&fixtures, alg)).expect("fixture JWK");
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("usable fixture JWK");
        let (signed, signature) = token.rsplit_once('.').expect("a compact JWS");
        group.bench_function(format!("{name}/signature_only"), |b| {
            b.iter(|| {
                jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &decoding, alg)
                    .expect("verification runs")
            })
        });

        group.bench_function(format!("{name}/uncached"), |b| {
            b.iter_batched(
                || verifier.cache().remove(&VerifiedCache::key(&token)),
                |()| {
                    runtime
                        .block_on(verifier.verify(&token))
                        .expect("valid token")
                },
                BatchSize::PerIteration,
            )
        });

        runtime
            .block_on(verifier.verify(&token))
            .expect("valid token");
        group.bench_function(format!("{name}/cached"), |b| {
            b.iter(|| {
                let verified = runtime
                    .block_on(verifier.verify(&token))
                    .expect("valid token");
                assert!(verified.cached, "the second verification is a cache hit");
                verified
            })
        });
    }
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
