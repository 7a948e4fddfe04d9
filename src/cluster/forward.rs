//! Forwarded consumption: the internal HTTP call by which a node asks a
//! ticket's home node to consume it, on the home node's admin listener at
//! `POST /internal/cluster/consume`.
//!
//! The request and the answer are both signed with HMAC-SHA256 under a key
//! derived from the cluster secret. The request's MAC covers a timestamp and
//! a random nonce, and the answer's MAC covers that nonce, so an answer cannot
//! be replayed onto another request. Requests whose timestamp is more than
//! [`MAX_CLOCK_SKEW_MS`] off the home node's clock are rejected, and the home
//! node remembers the nonce of every request it ran for twice that long, so
//! a copy of a request is rejected too. Neither body is encrypted, and the
//! response carries the ticket's record, so the admin listeners belong on a
//! private network.

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::store::{RedeemError, TicketRecord};
use crate::ticket::TicketKey;

pub const PATH: &str = "/internal/cluster/consume";
pub const TIME_HEADER: &str = "x-wsticket-cluster-time";
pub const NONCE_HEADER: &str = "x-wsticket-cluster-nonce";
pub const MAC_HEADER: &str = "x-wsticket-cluster-mac";
/// Largest difference between the request's timestamp and the home node's
/// clock, in milliseconds.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// The body of a forwarded consumption.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsumeRequest {
    /// The ticket's store key (SHA-256 of the ticket), in hex. The ticket
    /// itself never leaves the node that received it.
    pub key: String,
    pub origin: Option<String>,
}

/// The outcome of a consumption on the home node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Consumed,
    Unknown,
    AlreadyUsed,
    Expired,
    OriginMismatch,
    StoreUnavailable,
}

/// The body of the home node's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsumeAnswer {
    pub outcome: Outcome,
    /// The consumed ticket's record, with `outcome` `consumed` only.
    pub record: Option<TicketRecord>,
}

impl ConsumeAnswer {
    pub fn from_result(result: Result<TicketRecord, RedeemError>) -> Self {
        let outcome = match &result {
            Ok(_) => Outcome::Consumed,
            Err(RedeemError::Unknown) => Outcome::Unknown,
            Err(RedeemError::AlreadyUsed) => Outcome::AlreadyUsed,
            Err(RedeemError::Expired) => Outcome::Expired,
            Err(RedeemError::OriginMismatch) => Outcome::OriginMismatch,
            Err(RedeemError::Store | RedeemError::HomeUnavailable) => Outcome::StoreUnavailable,
        };
        ConsumeAnswer {
            outcome,
            record: result.ok(),
        }
    }

    /// Turns the answer back into the result of a local consumption. A
    /// `consumed` answer without a record is treated as a failure, because
    /// the upgrade cannot proceed without it.
    pub fn into_result(self) -> Result<TicketRecord, RedeemError> {
        match self.outcome {
            Outcome::Consumed => self.record.ok_or(RedeemError::Store),
            Outcome::Unknown => Err(RedeemError::Unknown),
            Outcome::AlreadyUsed => Err(RedeemError::AlreadyUsed),
            Outcome::Expired => Err(RedeemError::Expired),
            Outcome::OriginMismatch => Err(RedeemError::OriginMismatch),
            Outcome::StoreUnavailable => Err(RedeemError::Store),
        }
    }
}

/// Returns the MAC of a request, in hex.
pub fn request_mac(key: &hmac::Key, time_ms: u64, nonce: &str, body: &[u8]) -> String {
    let mut context = hmac::Context::with_key(key);
    context.update(format!("request\n{time_ms}\n{nonce}\n").as_bytes());
    context.update(body);
    hex::encode(context.sign().as_ref())
}

/// Returns the MAC of an answer to the request with `nonce`, in hex.
pub fn answer_mac(key: &hmac::Key, nonce: &str, body: &[u8]) -> String {
    let mut context = hmac::Context::with_key(key);
    context.update(format!("answer\n{nonce}\n").as_bytes());
    context.update(body);
    hex::encode(context.sign().as_ref())
}

/// Checks a MAC in constant time.
pub fn mac_matches(expected_hex: &str, presented_hex: &str) -> bool {
    use subtle::ConstantTimeEq;
    expected_hex.len() == presented_hex.len()
        && bool::from(expected_hex.as_bytes().ct_eq(presented_hex.as_bytes()))
}

/// Parses a hex store key.
pub fn parse_key(hex_key: &str) -> Option<TicketKey> {
    let bytes = hex::decode(hex_key).ok()?;
    TicketKey::try_from(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"forward key for the tests")
    }

    #[test]
    fn request_mac_covers_time_nonce_and_body() {
        let key = key();
        let mac = request_mac(&key, 1000, "n1", b"{}");
        assert!(mac_matches(&mac, &request_mac(&key, 1000, "n1", b"{}")));
        assert!(!mac_matches(&mac, &request_mac(&key, 1001, "n1", b"{}")));
        assert!(!mac_matches(&mac, &request_mac(&key, 1000, "n2", b"{}")));
        assert!(!mac_matches(&mac, &request_mac(&key, 1000, "n1", b"{ }")));
    }

    #[test]
    fn answer_mac_differs_from_request_mac() {
        let key = key();
        assert!(!mac_matches(
            &answer_mac(&key, "n1", b"{}"),
            &request_mac(&key, 0, "n1", b"{}")
        ));
    }

    #[test]
    fn consumed_answer_without_record_fails() {
        let answer = ConsumeAnswer {
            outcome: Outcome::Consumed,
            record: None,
        };
        assert_eq!(answer.into_result(), Err(RedeemError::Store));
    }
}
