//! Verified tokens, so that the repeated ticket requests of a long session
//! skip the signature check or the introspection call.
//!
//! Entries are keyed by the SHA-256 of the token; the token itself is never
//! stored. An entry lives until the token's `exp` (or, for introspection
//! responses, the introspection cache TTL if that comes first). Expiry is
//! decided against the injected clock on every read; moka's own expiry,
//! which runs on moka's clock, only frees memory. The cache is bounded by an
//! estimate of its size in bytes. Entries verified with a key that leaves
//! the JWKS are dropped, and a read also checks that the key is still loaded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use crate::auth::verify::Identity;
use crate::clock::SharedClock;

/// Default bound of the cache: 64 MiB by the size estimate.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Estimated bookkeeping bytes of one entry beyond its claims.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// Source of a cached verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifiedBy {
    /// A JWKS key: the index of the issuer's key store and the key's RFC 7638
    /// thumbprint.
    Key {
        store: usize,
        thumbprint: String,
    },
    Introspection,
}

/// A cached verification result.
#[derive(Debug)]
pub struct CachedVerification {
    pub identity: Identity,
    pub verified_by: VerifiedBy,
    /// Milliseconds since the epoch after which the entry is not used.
    pub expires_at_ms: u64,
    /// Size estimate in bytes, for the cache bound.
    weight: u32,
}

/// The SHA-256 of a token: the cache key, computed once per request with
/// [`VerifiedCache::key`].
pub type TokenHash = [u8; 32];

struct UntilExpiry(SharedClock);

impl Expiry<TokenHash, Arc<CachedVerification>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &Arc<CachedVerification>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left_ms = value.expires_at_ms.saturating_sub(self.0.now_ms());
        Some(Duration::from_millis(left_ms))
    }
}

/// The cache of verified tokens.
#[derive(Clone)]
pub struct VerifiedCache {
    entries: Cache<TokenHash, Arc<CachedVerification>>,
    clock: SharedClock,
}

impl VerifiedCache {
    /// Creates a cache bounded to about `max_bytes` of entries.
    pub fn new(max_bytes: u64, clock: SharedClock) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, value: &Arc<CachedVerification>| value.weight)
            .expire_after(UntilExpiry(clock.clone()))
            .support_invalidation_closures()
            .build();
        VerifiedCache { entries, clock }
    }

    /// Returns the cache key of a token.
    pub fn key(token: &str) -> TokenHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        hash
    }

    /// Returns the entry under `key` if it has not expired by the clock.
    pub fn get(&self, key: &TokenHash) -> Option<Arc<CachedVerification>> {
        let entry = self.entries.get(key)?;
        if self.clock.now_ms() >= entry.expires_at_ms {
            self.entries.invalidate(key);
            return None;
        }
        Some(entry)
    }

    /// Stores a verified token, of `token_len` bytes, under `key` until
    /// `expires_at_ms`.
    pub fn insert(
        &self,
        key: TokenHash,
        token_len: usize,
        identity: Identity,
        verified_by: VerifiedBy,
        expires_at_ms: u64,
    ) {
        if expires_at_ms <= self.clock.now_ms() {
            return;
        }
        let weight = token_len + ENTRY_OVERHEAD_BYTES;
        let entry = CachedVerification {
            identity,
            verified_by,
            expires_at_ms,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
        };
        self.entries.insert(key, Arc::new(entry));
    }

    /// Drops the entry under `key`.
    pub fn remove(&self, key: &TokenHash) {
        self.entries.invalidate(key);
    }

    /// Drops every entry verified by one of these keys of key store `store`.
    pub fn drop_keys(&self, store: usize, thumbprints: &HashSet<String>) {
        let thumbprints = thumbprints.clone();
        let result = self.entries.invalidate_entries_if(move |_, entry| {
            matches!(&entry.verified_by, VerifiedBy::Key { store: s, thumbprint } if *s == store && thumbprints.contains(thumbprint))
        });
        if let Err(err) = result {
            // Only happens when the builder lacks invalidation closures; the
            // read-time key check still keeps such entries from being used.
            tracing::error!(event = "cache_error", error = %err, "dropping cached verifications failed");
        }
    }

    /// Returns the number of entries, after pending maintenance.
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}
