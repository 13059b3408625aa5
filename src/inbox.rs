//! The WhatsApp webhook inbox on the store: the WhatsApp connector appends verified bodies
//! (durably, before Meta gets its 200) and its poll reads them back.

use std::sync::Arc;

use bytes::Bytes;
use optout_core::Timestamp;
use optout_whatsapp::{Inbox, InboxEntry, InboxError};

use crate::metrics::{Metrics, SourceResult};
use crate::store::Store;

pub struct StoreInbox {
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl StoreInbox {
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
    async fn append(&self, body: Bytes, received_at: Timestamp) -> Result<(), InboxError> {
        match self.store.inbox_append(received_at, &body).await {
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
    }

    async fn quarantine(
        &self,
        body: Bytes,
        received_at: Timestamp,
        reason: String,
    ) -> Result<(), InboxError> {
        self.count("quarantined");
        tracing::warn!(reason = %reason, bytes = body.len(), "signed webhook body quarantined");
        self.store
            .quarantine(received_at, &body, &reason)
            .await
            .map_err(|e| InboxError(e.to_string()))
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<InboxEntry>, InboxError> {
        let entries = self
            .store
            .inbox_after(after, limit)
            .map_err(|e| InboxError(e.to_string()))?;
        Ok(entries
            .into_iter()
            .map(|(seq, rec)| InboxEntry {
                seq,
                received_at: rec.received_at,
                body: Bytes::from(rec.body),
            })
            .collect())
    }
}
