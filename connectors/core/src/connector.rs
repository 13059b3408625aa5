//! The connector trait: how the core reads from and writes to one system.
//!
//! Connectors implement it with `async fn`; the daemon holds them as
//! [`DynConnector`](crate::contract::DynConnector), which every `Connector` is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Cursor, Page, PushItem, PushOutcome};

/// A boxed future, for the object-safe traits (`DynConnector`, `Inbox`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `health` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

pub trait Connector: Send + Sync + 'static {
    /// Reads the next page of changes after `cursor`. `None` means from the beginning:
    /// a full sync that reads every record. The returned cursor is saved only together
    /// with the page's effects, so a crash re-reads the page rather than losing it.
    fn poll(
        &self,
        cursor: Option<&Cursor>,
    ) -> impl Future<Output = Result<Page, ConnectorError>> + Send;

    /// Writes a batch (at most [`Connector::max_batch`] items). On `Ok` the outcomes
    /// are one per item, in order. `Err` means the whole batch failed and nothing can be
    /// assumed applied; pushes are idempotent, so the batch is simply retried.
    fn push(
        &self,
        batch: &[PushItem],
    ) -> impl Future<Output = Result<Vec<PushOutcome>, ConnectorError>> + Send;

    /// Checks the connector can reach and authenticate to its system, using only what
    /// it needs itself.
    fn health(&self) -> impl Future<Output = Health> + Send;

    /// The most items one `push` call takes (the vendor's batch limit).
    fn max_batch(&self) -> usize;

    /// Called once a page and its cursor are durably stored: what the page carried may be
    /// dropped now (WhatsApp trims its inbox).
    fn committed(&self, _page: &Page) {}

    /// Notified when new input is waiting (a stored webhook), so that it is polled at once
    /// rather than at the next tick.
    fn wake_up(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// HTTP routes the daemon mounts on its listener (a vendor that pushes to us).
    fn routes(&self) -> Option<axum::Router> {
        None
    }
}
