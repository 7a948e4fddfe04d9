//! Bearer token verification: JWKS keys per issuer, their fetching and
//! refresh behind a circuit breaker, the checks of the JWS header and
//! claims, token introspection for opaque tokens, and the cache of verified
//! tokens.

pub mod breaker;
pub mod cache;
pub mod claims;
pub mod fetch;
pub mod introspection;
pub mod issuers;
pub mod jwks;
pub mod keys;
pub mod verify;
mod x509;

use std::sync::Arc;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;

pub use issuers::IssuerKeys;
pub use keys::KeyStore;
pub use verify::{AuthError, Identity, Verified, Verifier};

/// Builds the verifier of a server: one key store for the short form's
/// JWKS, one per trusted issuer, and the introspection client if set. The
/// stores fetch nothing until their `run_refresh` tasks run.
pub fn verifier_from_config(
    config: &Config,
    clock: SharedClock,
    metrics: Arc<Metrics>,
) -> Verifier {
    let gauges = keys::JwksGauges::new(metrics.clone());
    let store_settings =
        |source: &crate::config::JwksSource, issuer: String| keys::KeyStoreSettings {
            refetch_interval: config.jwks_refetch_interval,
            refresh_min: config.jwks_refresh_min,
            refresh_max: config.jwks_refresh_max,
            timeout: config.jwks_timeout,
            max_stale: config.jwks_max_stale,
            ..keys::KeyStoreSettings::new(source.clone(), issuer)
        };

    let mut issuers = IssuerKeys::new();
    let mut add = |names: Vec<String>, source: &crate::config::JwksSource| {
        let settings = store_settings(source, names.join(", "));
        let store = Arc::new(KeyStore::new(settings, clock.clone(), gauges.clone()));
        if let Err(issuer) = issuers.add(names, store) {
            // Config validation rejects an issuer given twice.
            tracing::warn!(issuer, "issuer given twice; its first JWKS is used");
        }
    };
    if let Some(source) = &config.jwks {
        add(config.issuers.clone(), source);
    }
    for trusted in &config.trusted_issuers {
        add(vec![trusted.issuer.clone()], &trusted.jwks);
    }

    let introspector = config.introspection.as_ref().map(|introspection| {
        introspection::Introspector::new(
            introspection::IntrospectionSettings {
                url: introspection.url.clone(),
                client_id: introspection.client_id.clone(),
                client_secret: introspection.client_secret.clone(),
                timeout: config.jwks_timeout,
                cache_ttl: introspection.cache_ttl,
                breaker: breaker::BreakerSettings::default(),
            },
            metrics,
        )
    });
    Verifier::new(
        verify::VerifierSettings {
            audiences: config.audiences.clone(),
            algorithms: config.algorithms.clone(),
            leeway: config.leeway,
            token_kind: config.token_kind,
            cache_max_bytes: cache::DEFAULT_CACHE_BYTES,
        },
        issuers,
        introspector,
        clock,
    )
}
