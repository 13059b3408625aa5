//! The WhatsApp webhook inbox on the store: the WhatsApp connector appends verified bodies
//! (durably, before Meta gets its 200) and its poll reads them back. Every store call runs
//! off the async threads, so a slow or failing disk never stalls the HTTP listener.

use std::sync::Arc;

use bytes::Bytes;
use optout_core::Timestamp;
use optout_core::contract::BoxFuture;
use optout_core::{Inbox, InboxEntry, InboxError};

use crate::metrics::{Metrics, SourceResult};
use crate::store::Store;

pub struct StoreInbox {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// The connector instance this inbox serves: several WhatsApp accounts share the
    /// store's inbox, each reading and trimming only the bodies its own route received.
    pub owner: String,
    /// Whether it also owns entries written before entries named their connector (the
    /// first WhatsApp connector in the configuration).
    pub legacy: bool,
}

impl StoreInbox {
    fn mine(owner: &str, legacy: bool, tag: Option<&str>) -> bool {
        tag.map_or(legacy, |t| t == owner)
    }

    fn count(&self, result: &str) {
        self.metrics
            .webhooks
            .get_or_create(&SourceResult {
                source: "whatsapp".into(),
                result: result.into(),
            })
            .inc();
    }
}

impl Inbox for StoreInbox {
    fn append(&self, body: Bytes, received_at: Timestamp) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            match (self.store)
                .inbox_append_for(Some(&self.owner), received_at, &body)
                .await
            {
                Ok(_) => {
                    self.count("stored");
                    Ok(())
                }
                Err(e) => {
                    self.count("store_failed");
                    tracing::error!(error = %e, "cannot store a webhook; answering 503 so Meta retries");
                    Err(InboxError(e.to_string()))
                }
            }
        })
    }

    fn quarantine(
        &self,
        body: Bytes,
        received_at: Timestamp,
        reason: String,
    ) -> BoxFuture<'_, Result<(), InboxError>> {
        Box::pin(async move {
            self.count("quarantined");
            tracing::warn!(reason = %reason, bytes = body.len(), "signed webhook body quarantined");
            self.store
                .quarantine(received_at, &body, &reason)
                .await
                .map_err(|e| InboxError(e.to_string()))
        })
    }

    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, InboxError>> {
        let store = self.store.clone();
        let (owner, legacy) = (self.owner.clone(), self.legacy);
        Box::pin(async move {
            let entries = tokio::task::spawn_blocking(move || {
                store.inbox_after_where(after, limit, |t| Self::mine(&owner, legacy, t))
            })
            .await
            .map_err(|e| InboxError(e.to_string()))?
            .map_err(|e| InboxError(e.to_string()))?;
            Ok(entries
                .into_iter()
                .map(|(seq, rec)| InboxEntry {
                    seq,
                    received_at: rec.received_at,
                    body: Bytes::from(rec.body),
                })
                .collect())
        })
    }

    /// Trimming is housekeeping (safe to skip or repeat: polls read after the cursor), so
    /// on the runtime it is handed to a blocking thread and not awaited.
    fn trim(&self, seq: u64) -> Result<(), InboxError> {
        let store = self.store.clone();
        let (owner, legacy) = (self.owner.clone(), self.legacy);
        let trim = move || {
            if let Err(e) = store.inbox_trim_where(seq, |t| Self::mine(&owner, legacy, t)) {
                tracing::warn!(error = %e, "cannot trim the webhook inbox; will try again after the next poll");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(trim)),
            Err(_) => trim(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(store: &Store, owner: &str, legacy: bool) -> StoreInbox {
        StoreInbox {
            store: store.clone(),
            metrics: Arc::new(Metrics::new()),
            owner: owner.into(),
            legacy,
        }
    }

    async fn bodies(i: &StoreInbox) -> Vec<Bytes> {
        let entries = i.read_after(0, 100).await.unwrap();
        entries.into_iter().map(|e| e.body).collect()
    }

    /// Two accounts share the store's inbox: each reads and trims only what its own route
    /// received; entries from before entries were named belong to the first account.
    #[tokio::test]
    async fn each_account_reads_and_trims_only_its_own_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let old = store.inbox_append(Timestamp(1), b"old").await.unwrap();
        let (a, b) = (inbox(&store, "wa-a", true), inbox(&store, "wa-b", false));
        a.append(Bytes::from_static(b"for a"), Timestamp(2))
            .await
            .unwrap();
        b.append(Bytes::from_static(b"for b"), Timestamp(3))
            .await
            .unwrap();
        assert_eq!(bodies(&a).await, ["old", "for a"]);
        assert_eq!(bodies(&b).await, ["for b"]);
        assert!(old >= 1);
        let last_a = a.read_after(0, 100).await.unwrap().last().unwrap().seq;
        store
            .inbox_trim_where(last_a + 10, |t| StoreInbox::mine("wa-a", true, t))
            .unwrap();
        assert!(bodies(&a).await.is_empty());
        assert_eq!(bodies(&b).await, ["for b"], "b's body waits for b");
    }
}
