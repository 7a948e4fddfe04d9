//! The RSA public key inside an `x5c` certificate.
//!
//! Some providers publish RSA keys only as an X.509 certificate chain. Only the
//! first certificate's subject public key is used; the chain is not validated,
//! because the JWKS document itself is the trust anchor (it came over HTTPS from
//! the configured URL).

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// Returns the big-endian modulus and exponent of the certificate's RSA key.
pub fn rsa_public_key_of_certificate(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|_| "not a valid DER X.509 certificate".to_string())?;
    match certificate.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => Ok((rsa.modulus.to_vec(), rsa.exponent.to_vec())),
        Ok(_) => Err("the certificate's key is not an RSA key".into()),
        Err(_) => Err("the certificate's public key cannot be parsed".into()),
    }
}
