//! The durable inbox the webhook writes to and the poll reads from. The daemon implements
//! it on its own store; this crate never touches storage.
//!
//! Contract:
//! - `append` returns only once the body is durable; the webhook answers Meta 200 after that
//!   and 503 if it fails (Meta then redelivers).
//! - Sequence numbers grow with every append and are never reused, so the poll cursor (the
//!   last sequence number read) stays valid while the daemon deletes entries up to the
//!   saved cursor.
//! - `read_after(after, limit)` returns entries with `seq > after`, oldest first.
//! - Quarantined bodies are kept for the operator and never returned by `read_after`.
//!
//! To wake its poll worker after an append, the daemon can either do it inside its own
//! `append` or wait on [`crate::WebhookState::appended`], which the webhook notifies after
//! every successful append.

use std::future::Future;

use bytes::Bytes;
use optout_core::Timestamp;

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

pub trait Inbox: Send + Sync + 'static {
    /// Append a verified raw body durably; return only once it is on disk.
    fn append(
        &self,
        body: Bytes,
        received_at: Timestamp,
    ) -> impl Future<Output = Result<(), InboxError>> + Send;

    /// Keep a signed but unusable body (not JSON, not a WhatsApp envelope) for the operator.
    fn quarantine(
        &self,
        body: Bytes,
        received_at: Timestamp,
        reason: String,
    ) -> impl Future<Output = Result<(), InboxError>> + Send;

    /// Entries with sequence number > `after`, oldest first, at most `limit`.
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InboxEntry>, InboxError>> + Send;
}
