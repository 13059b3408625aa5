//! The durable inbox a pushing vendor's webhook writes to and its connector's poll reads
//! from (WhatsApp). The daemon implements it on its own store and offers it to connectors
//! through [`Host`](crate::contract::Host); connectors never touch storage.
//!
//! Contract:
//! - `append` returns only once the body is durable; the webhook answers Meta 200 after that
//!   and 503 if it fails (Meta then redelivers).
//! - Sequence numbers grow with every append and are never reused, so the poll cursor (the
//!   last sequence number read) stays valid while the daemon deletes entries up to the
//!   saved cursor.
//! - `read_after(after, limit)` returns entries with `seq > after`, oldest first.
//! - Quarantined bodies are kept for the operator and never returned by `read_after`.
//! - `trim(seq)` drops entries up to `seq`, once a page and its cursor are stored.
//!
//! To wake its poll worker after an append, the daemon can either do it inside its own
//! `append` or wait on the connector's [`wake_up`](crate::Connector::wake_up), which the
//! webhook notifies after every successful append.

use bytes::Bytes;

use crate::Timestamp;
use crate::connector::BoxFuture;

/// A storage failure. The message must not contain the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inbox: {0}")]
pub struct InboxError(pub String);

/// One stored webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub seq: u64,
    pub received_at: Timestamp,
    pub body: Bytes,
}

/// Methods return boxed futures so that connectors can hold `Arc<dyn Inbox>`.
pub trait Inbox: Send + Sync + 'static {
    /// Append a verified raw body durably; return only once it is on disk.
    fn append(&self, body: Bytes, received_at: Timestamp) -> BoxFuture<'_, Result<(), InboxError>>;

    /// Keep a signed but unusable body (not JSON, not a WhatsApp envelope) for the operator.
    fn quarantine(
        &self,
        body: Bytes,
        received_at: Timestamp,
        reason: String,
    ) -> BoxFuture<'_, Result<(), InboxError>>;

    /// Entries with sequence number > `after`, oldest first, at most `limit`.
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, InboxError>>;

    /// Drop entries with sequence number <= `seq` (their page is stored).
    fn trim(&self, seq: u64) -> Result<(), InboxError>;
}
