//! Bearer token verification: JWKS keys, their fetching and refresh, and the
//! checks of the JWS header and claims.

pub mod jwks;
pub mod keys;
pub mod verify;
mod x509;

pub use keys::KeyStore;
pub use verify::{AuthError, Identity, Verifier};
