//! The stored form of a ticket.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketState {
    Issued,
    Consumed,
    /// Expired without being redeemed; kept for the grace window so the
    /// ticket is reported as expired rather than unknown.
    Expired,
}

/// What the store keeps about one ticket. Times are milliseconds since the
/// Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    pub state: TicketState,
    pub subject: String,
    pub session: Option<String>,
    /// `Origin` of the request that obtained the ticket.
    pub origin: Option<String>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// `exp` of the JWT that obtained the ticket, in seconds since the epoch.
    pub token_expires_at: u64,
    /// Claims chosen for forwarding, as a JSON object text; empty when none.
    pub claims_json: String,
}

impl TicketRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a record always serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}
