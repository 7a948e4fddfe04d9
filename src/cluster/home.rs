//! The home node of a ticket, encoded in the ticket itself.
//!
//! A cluster ticket keeps the 32-character `[A-Za-z0-9]` format: 31 random
//! characters (31 × log2(62) ≈ 184.6 bits) and one home character. The home
//! character is `(home index + pad) mod 62`, where the pad is an HMAC-SHA256
//! of the 31 random characters keyed with a key derived from the cluster
//! secret. Without the secret the pad is indistinguishable from random, so the
//! home character is uniform and reveals nothing about the node that issued
//! the ticket. With the secret, any node recovers the home index from the ticket alone.

use ring::hmac;
use ring::rand::SystemRandom;

use crate::ticket::{self, ALPHABET, TICKET_LEN};

/// Number of distinct home indexes one character can encode.
pub const MAX_NODES: u8 = 62;
const RANDOM_LEN: usize = TICKET_LEN - 1;

/// Generates a ticket whose home is `home`, which must be below [`MAX_NODES`].
pub fn generate(
    rng: &SystemRandom,
    key: &hmac::Key,
    home: u8,
) -> Result<String, ring::error::Unspecified> {
    assert!(home < MAX_NODES, "home index {home} is out of range");
    // The last character of a fresh ticket is replaced, so the random part is
    // the first 31 characters of an ordinary ticket.
    let mut value = ticket::generate(rng)?;
    value.truncate(RANDOM_LEN);
    let offset = (u32::from(home) + pad(key, &value)) % u32::from(MAX_NODES);
    value.push(char::from(ALPHABET[offset as usize]));
    Ok(value)
}

/// Returns the home index of a well-formed ticket, or `None` for a value that
/// is not a well-formed ticket.
pub fn home_of(key: &hmac::Key, value: &str) -> Option<u8> {
    if !ticket::is_well_formed(value) {
        return None;
    }
    let (random, last) = value.split_at(RANDOM_LEN);
    let position = ALPHABET.iter().position(|&c| c == last.as_bytes()[0])?;
    let position = u32::try_from(position).expect("alphabet has 62 characters");
    let modulus = u32::from(MAX_NODES);
    let home = (position + modulus - pad(key, random)) % modulus;
    Some(u8::try_from(home).expect("a value below 62 fits in u8"))
}

/// Computes the keyed pad of the random part, in `0..62`. The first 8 bytes of the MAC
/// are reduced modulo 62, whose bias (below 2^-58) is negligible.
fn pad(key: &hmac::Key, random: &str) -> u32 {
    let tag = hmac::sign(key, random.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&tag.as_ref()[..8]);
    let reduced = u64::from_be_bytes(first) % u64::from(MAX_NODES);
    u32::try_from(reduced).expect("a value below 62 fits in u32")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &[u8]) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, secret)
    }

    #[test]
    fn home_round_trips_for_every_index() {
        let rng = SystemRandom::new();
        let key = key(b"a cluster secret of enough length!!");
        for home in 0..MAX_NODES {
            for _ in 0..20 {
                let value = generate(&rng, &key, home).expect("system random works");
                assert!(ticket::is_well_formed(&value), "bad format: {value}");
                assert_eq!(home_of(&key, &value), Some(home));
            }
        }
    }

    #[test]
    fn home_character_is_uniform_without_secret() {
        // All tickets share home 3. Without the key the last character must
        // still spread over the alphabet: 62,000 draws, about 1,000 each.
        let rng = SystemRandom::new();
        let key = key(b"another secret that nobody else has");
        let mut counts = [0u32; 128];
        for _ in 0..62_000 {
            let value = generate(&rng, &key, 3).expect("system random works");
            counts[usize::from(value.as_bytes()[TICKET_LEN - 1])] += 1;
        }
        for &c in ALPHABET {
            let seen = counts[usize::from(c)];
            assert!(
                (800..1200).contains(&seen),
                "home character {} seen {seen} times, expected about 1000",
                c as char
            );
        }
    }

    #[test]
    fn other_secret_decodes_other_home() {
        let rng = SystemRandom::new();
        let ours = key(b"the secret of this cluster, 32+ bytes");
        let theirs = key(b"the secret of another cluster, 32+ b");
        let differing = (0..200)
            .map(|_| generate(&rng, &ours, 5).expect("system random works"))
            .filter(|value| home_of(&theirs, value) != Some(5))
            .count();
        assert!(
            differing > 150,
            "only {differing} of 200 decoded differently"
        );
    }

    #[test]
    fn malformed_ticket_has_no_home() {
        let key = key(b"a cluster secret of enough length!!");
        assert_eq!(home_of(&key, "short"), None);
        assert_eq!(home_of(&key, &"-".repeat(TICKET_LEN)), None);
    }
}
