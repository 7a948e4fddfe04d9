//! The trusted issuers and the key store each of them uses.
//!
//! Keys are namespaced per issuer: the `iss` of a token picks one key store,
//! and only that store's keys are tried. So a token claiming issuer A is
//! never verified with a key from B's JWKS, even when both publish the same
//! `kid`. In the one-issuer short form (`--issuer` with `--jwks-url`) every
//! `--issuer` value shares one store.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::keys::KeyStore;

/// Issuer → key store.
#[derive(Default)]
pub struct IssuerKeys {
    stores: Vec<Arc<KeyStore>>,
    by_issuer: HashMap<String, usize>,
}

impl IssuerKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key store used by `issuers`. An issuer that already has a
    /// store keeps it, and is returned as the error.
    pub fn add(
        &mut self,
        issuers: impl IntoIterator<Item = String>,
        store: Arc<KeyStore>,
    ) -> Result<(), String> {
        let index = self.stores.len();
        let issuers: Vec<String> = issuers.into_iter().collect();
        if let Some(taken) = issuers.iter().find(|iss| self.by_issuer.contains_key(*iss)) {
            return Err(taken.clone());
        }
        for issuer in issuers {
            self.by_issuer.insert(issuer, index);
        }
        self.stores.push(store);
        Ok(())
    }

    /// Returns the index and store of an issuer's keys.
    pub fn store_for(&self, issuer: &str) -> Option<(usize, &Arc<KeyStore>)> {
        let index = *self.by_issuer.get(issuer)?;
        Some((index, &self.stores[index]))
    }

    pub fn store(&self, index: usize) -> Option<&Arc<KeyStore>> {
        self.stores.get(index)
    }

    pub fn stores(&self) -> &[Arc<KeyStore>] {
        &self.stores
    }

    /// Tells whether `issuer` is trusted.
    pub fn accepts(&self, issuer: &str) -> bool {
        self.by_issuer.contains_key(issuer)
    }

    /// Tells whether any issuer has usable keys. Readiness uses this: with
    /// one issuer's JWKS down, the others' users still get tickets, and only
    /// that issuer's tokens get `auth_unavailable`.
    pub fn has_keys(&self) -> bool {
        self.stores.iter().any(|store| store.has_keys())
    }
}
