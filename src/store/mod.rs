//! Ticket storage: the [`TicketStore`] trait and the records it keeps.
//!
//! The HTTP code only talks to the trait, so the storage engine can change
//! without touching it. Records are keyed by the SHA-256 of the ticket
//! ([`crate::ticket::TicketKey`]); the ticket value itself is never stored.

pub mod cli;
mod group_commit;
mod record;
mod sled_store;

use async_trait::async_trait;

pub use record::{TicketRecord, TicketState};
pub use sled_store::{OpenError, SledStore, StoreSettings};

use crate::ticket::TicketKey;

/// Reason a ticket cannot be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedeemError {
    /// No record: never issued, or forgotten after its grace window.
    Unknown,
    AlreadyUsed,
    Expired,
    /// The ticket was issued to a page of another Origin. It stays unused.
    OriginMismatch,
    /// The consumption could not be made durable; the ticket is not accepted.
    Store,
    /// Cluster mode only: the ticket's home node, which alone may consume
    /// it, cannot be reached. The ticket is not accepted.
    HomeUnavailable,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine error: {0}")]
    Engine(#[from] sled::Error),
    #[error("stored record cannot be decoded: {0}")]
    Corrupt(#[from] postcard::Error),
    #[error(transparent)]
    Flush(#[from] group_commit::FlushError),
    #[error("the store is out of service after a write failure and is being reopened")]
    Unavailable,
}

/// Counts of what the store holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreCounts {
    pub live: u64,
    pub consumed: u64,
    pub expired: u64,
}

#[async_trait]
pub trait TicketStore: Send + Sync {
    /// Stores a new ticket durably before returning.
    async fn insert(&self, key: &TicketKey, record: &TicketRecord) -> Result<(), StoreError>;

    /// Marks a ticket used, exactly once across all callers, and makes that
    /// durable before returning the record. `origin` is the `Origin` of the
    /// redeeming request; a ticket issued with an `Origin` is only redeemed
    /// from that same `Origin`.
    async fn consume(
        &self,
        key: &TicketKey,
        origin: Option<&str>,
    ) -> Result<TicketRecord, RedeemError>;

    /// Returns the counts of records by state.
    fn counts(&self) -> StoreCounts;
}
