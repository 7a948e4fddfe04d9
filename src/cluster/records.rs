//! Ticket states in gossip: each home node publishes, under the SHA-256 of
//! the ticket, whether a ticket it issued is live (with its expiry) or used.
//!
//! Other nodes read these entries to reject used and expired tickets without
//! asking the home node, also while it is down. An entry only ever leads to a
//! rejection: acceptance still needs the home node's yes, so a stale or
//! missing entry can cost a round trip but never a second acceptance. A
//! "used" entry is published only after the home node's consumption is on
//! disk. Subjects, sessions, Origins and claims stay on the home node,
//! because no other node accepts a ticket without the home node's yes, and
//! larger entries lower the rate of states that gossip carries.

use crate::ticket::TicketKey;

/// Prefix of the chitchat keys that carry ticket states.
pub const KEY_PREFIX: &str = "t:";

/// The state of a ticket as its home node published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Issued { expires_at_ms: u64 },
    Used,
}

/// Returns the chitchat key of a ticket: the prefix and its hex SHA-256.
pub fn gossip_key(key: &TicketKey) -> String {
    format!("{KEY_PREFIX}{}", hex::encode(key))
}

impl Published {
    pub fn encode(self) -> String {
        match self {
            Published::Issued { expires_at_ms } => format!("i:{expires_at_ms}"),
            Published::Used => "u".to_owned(),
        }
    }

    pub fn decode(value: &str) -> Option<Self> {
        if value == "u" {
            return Some(Published::Used);
        }
        let expires_at_ms = value.strip_prefix("i:")?.parse().ok()?;
        Some(Published::Issued { expires_at_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_states_round_trip() {
        for state in [
            Published::Used,
            Published::Issued { expires_at_ms: 0 },
            Published::Issued {
                expires_at_ms: u64::MAX,
            },
        ] {
            assert_eq!(Published::decode(&state.encode()), Some(state));
        }
    }

    #[test]
    fn malformed_values_decode_to_none() {
        for value in ["", "i:", "i:x", "used", "x:1"] {
            assert_eq!(Published::decode(value), None, "{value:?}");
        }
    }

    #[test]
    fn gossip_key_is_prefixed_hex() {
        assert_eq!(gossip_key(&[0xab; 32]), format!("t:{}", "ab".repeat(32)));
    }
}
