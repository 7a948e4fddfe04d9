//! Ticket values and the ids they are logged and stored under.
//!
//! A ticket is 32 characters from `[A-Za-z0-9]`, drawn from the operating
//! system's CSPRNG through `ring` with rejection sampling, so every character
//! carries log2(62) bits (about 190 bits in all) and none is more likely than
//! another. The ticket itself is never stored or logged: the store keys records
//! by its SHA-256, and logs name it by the first 12 hex characters of that hash.

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

pub const TICKET_LEN: usize = 32;
pub(crate) const ALPHABET: &[u8; 62] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// The largest multiple of 62 that fits in a byte: bytes at or above it are
/// drawn again so that `byte % 62` is uniform.
const UNBIASED_LIMIT: u8 = 248;

/// SHA-256 of a ticket: the key of its record in the store.
pub type TicketKey = [u8; 32];

/// Generates a new random ticket.
pub fn generate(rng: &SystemRandom) -> Result<String, ring::error::Unspecified> {
    let mut out = String::with_capacity(TICKET_LEN);
    let mut pool = [0u8; 48];
    while out.len() < TICKET_LEN {
        rng.fill(&mut pool)?;
        for &byte in &pool {
            if byte < UNBIASED_LIMIT && out.len() < TICKET_LEN {
                out.push(ALPHABET[usize::from(byte % 62)] as char);
            }
        }
    }
    Ok(out)
}

/// Checks the ticket format without looking it up.
pub fn is_well_formed(ticket: &str) -> bool {
    ticket.len() == TICKET_LEN && ticket.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Returns the store key of a ticket.
pub fn key_of(ticket: &str) -> TicketKey {
    let hash = digest(&SHA256, ticket.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(hash.as_ref());
    key
}

/// Returns the id a ticket is logged under: 12 hex characters of its SHA-256.
pub fn log_id(key: &TicketKey) -> String {
    hex::encode(&key[..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_ticket_has_contract_format() {
        let rng = SystemRandom::new();
        for _ in 0..1000 {
            let ticket = generate(&rng).expect("system random works");
            assert_eq!(ticket.len(), TICKET_LEN);
            assert!(is_well_formed(&ticket), "bad ticket format");
        }
    }

    #[test]
    fn generated_tickets_are_distinct() {
        let rng = SystemRandom::new();
        let tickets: HashSet<String> = (0..10_000)
            .map(|_| generate(&rng).expect("system random works"))
            .collect();
        assert_eq!(tickets.len(), 10_000);
    }

    #[test]
    fn character_frequencies_are_uniform() {
        // 62 characters over 640,000 draws: each expected 10,322 times. A
        // modulo bias (256 % 62 = 8 characters favoured) would put the first
        // eight about 25% above the rest, far outside this 5% band.
        let rng = SystemRandom::new();
        let mut counts = [0u32; 128];
        for _ in 0..20_000 {
            for b in generate(&rng).expect("system random works").bytes() {
                counts[usize::from(b)] += 1;
            }
        }
        let expected = 640_000.0 / 62.0;
        for &c in ALPHABET {
            let seen = f64::from(counts[usize::from(c)]);
            assert!(
                (seen - expected).abs() / expected < 0.05,
                "character {} seen {seen} times, expected about {expected}",
                c as char
            );
        }
    }

    #[test]
    fn malformed_tickets_are_detected() {
        assert!(!is_well_formed(""));
        assert!(!is_well_formed("short"));
        assert!(!is_well_formed(&"a".repeat(33)));
        assert!(!is_well_formed(&format!("{}-", "a".repeat(31))));
        assert!(!is_well_formed(&format!("{}é", "a".repeat(30))));
        assert!(is_well_formed(&"aZ09".repeat(8)));
    }

    #[test]
    fn log_id_is_12_hex_of_sha256() {
        // SHA-256("abc") starts with ba7816bf8f01.
        assert_eq!(log_id(&key_of("abc")), "ba7816bf8f01");
    }
}
