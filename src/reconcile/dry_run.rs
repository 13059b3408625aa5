//! `resync --full --dry-run`: a page decided by the same code as a real one, inside a
//! transaction whose writes are then discarded. Nothing is pushed, no record, subject or
//! cursor changes, and the audit log gains nothing.
//!
//! Each page is judged against the store as it is: a change a real run would make only
//! because an earlier page of the same run changed a decision (two records of one person
//! that disagree, read in different pages) is not shown.

use optout_core::{Observation, Status, Timestamp};

use super::{ApplyReport, Engine, PageTx};
use crate::report::{DryRunChange, DryRunConnector};
use crate::store::StoreError;

impl Engine {
    /// What applying this page would do, with every write discarded.
    pub fn rehearse_page(
        &self,
        connector: &str,
        observations: &[Observation],
        now: Timestamp,
    ) -> Result<ApplyReport, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.rehearse(|tx| {
            let mut page = PageTx::new(self, tx, connector, now);
            page.observe_all(observations)?;
            page.finish()
        })
    }
}

/// Adds a rehearsed page of `read` observations to the connector's dry-run report.
pub fn fold(into: &mut DryRunConnector, read: usize, page: ApplyReport) {
    into.records += read as u64;
    into.held += page.held.values().sum::<u64>();
    let mut touched = 0;
    for c in page.changes {
        if c.connector == into.name {
            touched += 1;
            match c.to {
                Status::OptedOut => into.suppressed += 1,
                Status::OptedIn => into.re_enabled += 1,
            }
        }
        into.changes.push(DryRunChange {
            connector: c.connector,
            record: c.record,
            subject: c.subject,
            from: c.from.map(|s| s.as_str().to_string()),
            to: c.to.as_str().to_string(),
            evidence: c.evidence,
            event_at: c.event_at.to_rfc3339(),
        });
    }
    into.left_alone += (read as u64).saturating_sub(touched);
}
