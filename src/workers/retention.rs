//! The retention worker: forgets what the store need not keep for ever, every hour.
//!
//! - Delivery keys (`seen`: WhatsApp message ids already applied) older than
//!   `daemon.dedup_retention`. Meta redelivers a webhook for up to 7 days, so the
//!   configuration refuses a retention shorter than that.
//! - Quarantined webhook bodies older than `daemon.quarantine_retention`: they hold
//!   message texts and numbers, kept only for an operator to look at.
//! - Evidence text of audit entries older than `audit.retention` (when set): the entries
//!   and their decisions stay; each run that drops some is audited as an entry of its own.

use std::time::Duration;

use optout_core::Timestamp;

use super::blocking;
use super::runner::{Failure, Next, Step, StepCx, Worker};
use crate::audit::{AuditEntry, AuditKind};
use crate::store::Store;

/// How often the retention worker runs (and how long after start it first does).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
const FIRST_RUN: Duration = Duration::from_secs(60);

/// Prunes expired entries on an interval.
pub struct Retention {
    store: Store,
    dedup: Duration,
    quarantine: Duration,
    audit: Option<Duration>,
}

impl Retention {
    pub fn new(store: Store, dedup: Duration, quarantine: Duration) -> Self {
        Retention {
            store,
            dedup,
            quarantine,
            audit: None,
        }
    }

    /// Also drops audit evidence text older than `retention`.
    pub fn with_audit_retention(mut self, retention: Option<Duration>) -> Self {
        self.audit = retention;
        self
    }
}

/// Drops audit evidence stored before `now - retention` and audits that it did; returns
/// how many entries lost their text.
pub fn audit_retention(
    store: &Store,
    retention: Duration,
    now: Timestamp,
) -> Result<usize, crate::store::StoreError> {
    let cutoff = now.minus(retention);
    let dropped = store.drop_audit_evidence(cutoff)?;
    if dropped > 0 {
        let mut a = AuditEntry::new(AuditKind::Retention, "operator", now);
        a.reason = Some(format!(
            "evidence text dropped from {dropped} entries stored before {cutoff} (audit.retention); their decisions are kept"
        ));
        store.transaction(true, |tx| tx.audit(&a, &[]))?;
    }
    Ok(dropped)
}

impl Worker for Retention {
    fn name(&self) -> &str {
        "store"
    }

    fn what(&self) -> &'static str {
        "retention"
    }

    fn start(&self) -> Next {
        Next::After(FIRST_RUN)
    }

    async fn step(&mut self, _cx: &mut StepCx) -> Result<Step, Failure> {
        let (store, dedup, quarantine) = (self.store.clone(), self.dedup, self.quarantine);
        let audit = self.audit;
        let now = Timestamp::now();
        let pruned = blocking(move || {
            let seen = store.prune_seen(now.minus(dedup))?;
            let bodies = store.prune_quarantine(now.minus(quarantine))?;
            if let Some(retention) = audit {
                let dropped = audit_retention(&store, retention, now)?;
                if dropped > 0 {
                    tracing::info!(
                        entries = dropped,
                        "dropped audit evidence past audit.retention"
                    );
                }
            }
            Ok((seen, bodies))
        })
        .await
        .map_err(|error| Failure::Store {
            doing: "could not prune expired entries; will try again",
            error,
        })?;
        if pruned != (0, 0) {
            tracing::info!(
                delivery_keys = pruned.0,
                quarantined = pruned.1,
                "pruned entries past their retention"
            );
        }
        Ok(Step::from(Next::After(RETENTION_INTERVAL)))
    }

    /// Never idle: each step says when the next runs.
    async fn wait(&mut self) -> Next {
        Next::Now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_retention_drops_old_evidence_once_and_audits_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let day = Duration::from_secs(24 * 3600);
        let now = Timestamp::now();
        for age in [400, 200, 10] {
            let mut a = AuditEntry::new(AuditKind::Accepted, "whatsapp", now.minus(day * age));
            a.evidence = Some("keyword: STOP".into());
            store.transaction(true, |tx| tx.audit(&a, &[1])).unwrap();
        }
        assert_eq!(audit_retention(&store, day * 365, now).unwrap(), 1);
        assert_eq!(audit_retention(&store, day * 365, now).unwrap(), 0);
        let entries: Vec<AuditEntry> = store.audit_from(0).map(Result::unwrap).collect();
        let texts: Vec<bool> = entries.iter().map(|e| e.evidence.is_some()).collect();
        assert_eq!(texts, [false, true, true, false], "{entries:?}");
        let own = &entries[3];
        assert_eq!(own.kind, AuditKind::Retention);
        assert!(
            own.reason.as_deref().unwrap().contains("from 1 entries"),
            "{own:?}"
        );
    }
}
