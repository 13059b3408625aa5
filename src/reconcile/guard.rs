//! The mass re-opt-in guard in the engine: holding opt-ins past a source's allowance
//! (the decision itself is the policy's, [`crate::policy::OptInGuard`]), and an operator
//! releasing or discarding them.
//!
//! A held opt-in never enters the registers: the person stays suppressed everywhere, and a
//! CRM record that carried it is set back like any record that disagrees with the
//! decision. Releasing records it as of its original event time, so an opt-out that is
//! newer still wins; discarding only drops it. Both are audited.

use optout_core::{Status, Timestamp};
use serde::{Deserialize, Serialize};

use crate::holds::HoldSelection;

use super::{Engine, PageTx, fact_audit, subject_name};
use crate::audit::AuditKind;
use crate::policy::{self, Fact, GuardVerdict};
use crate::store::{HoldRecord, StoreError, TxResult};

/// One record push a page enqueued (what `resync --dry-run` lists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordChange {
    pub connector: String,
    pub record: String,
    /// The record's subjects (`s12` or `s12,s40`).
    pub subject: String,
    /// The value last read from the record.
    pub from: Option<Status>,
    pub to: Status,
    /// The deciding fact: `source:signal evidence`.
    pub evidence: String,
    pub event_at: Timestamp,
}

/// Holds resolved per transaction: bounded, so 50,000 of them never make one huge write.
const CHUNK: usize = 500;

impl PageTx<'_, '_, '_> {
    /// Asks the guard about an accepted fact for subject `id`: true if it was held (stored
    /// and audited) rather than to be recorded.
    pub(super) fn held(&mut self, id: u64, fact: &Fact) -> TxResult<bool> {
        let Some(guard) = self.engine.policy.opt_in_guard else {
            return Ok(false);
        };
        let consent = &self.subjects[&id].consent;
        if !policy::lifts_suppression(consent, fact, self.margin()) {
            return Ok(false);
        }
        let before = self.tx.guard_window(&fact.source)?;
        let (verdict, after) = guard.judge(before, self.now);
        self.tx.put_guard_window(&fact.source, &after)?;
        if verdict == GuardVerdict::Apply {
            return Ok(false);
        }
        let hold = HoldRecord {
            id: self.tx.new_id()?,
            subject: id,
            fact: fact.clone(),
            held_at: self.now,
        };
        self.tx.put_hold(&hold)?;
        let mut a = fact_audit(AuditKind::Held, fact, self.now);
        a.subject = Some(subject_name(id));
        a.reason = Some(format!(
            "held by the mass re-opt-in guard (h{}): {} allows {} opt-ins per {} and more came; `optout-sync holds` to review",
            hold.id,
            fact.source,
            guard.max,
            humantime::format_duration(guard.per)
        ));
        self.tx.audit(&a, &[id])?;
        self.tally("held");
        *self.report.held.entry(fact.source.clone()).or_default() += 1;
        if before.held == 0 && !self.report.tripped.contains(&fact.source) {
            self.report.tripped.push(fact.source.clone());
        }
        Ok(true)
    }

    /// Resolves one hold: released ones enter the registers of the person's live subject.
    fn resolve_hold(&mut self, id: u64, release: bool) -> TxResult<bool> {
        let Some(h) = self.tx.remove_hold(id)? else {
            return Ok(false);
        };
        let mut w = self.tx.guard_window(&h.fact.source)?;
        w.held = w.held.saturating_sub(1);
        self.tx.put_guard_window(&h.fact.source, &w)?;
        let mut subject = h.subject;
        for _ in 0..16 {
            match self.load(subject)?.and_then(|s| s.merged_into) {
                Some(next) => subject = next,
                None => break,
            }
        }
        let kind = if release {
            AuditKind::HoldReleased
        } else {
            AuditKind::HoldDiscarded
        };
        let mut a = fact_audit(kind, &h.fact, self.now);
        a.subject = Some(subject_name(subject));
        a.reason = Some(if release {
            format!("h{id} released by an operator: applied as of its event time")
        } else {
            format!("h{id} discarded by an operator: never applied")
        });
        self.tx.audit(&a, &[subject])?;
        if release && let Some(s) = self.load(subject)? {
            s.consent.record(&h.fact);
        }
        Ok(true)
    }
}

impl Engine {
    /// The held opt-ins `selection` names, oldest first.
    pub fn holds(&self, selection: &HoldSelection) -> Result<Vec<HoldRecord>, StoreError> {
        (self.store.holds())
            .filter(|h| h.as_ref().map_or(true, |h| selection.matches(h)))
            .collect()
    }

    /// Releases (applies, as of their event times) or discards the held opt-ins
    /// `selection` names, in transactions of [`CHUNK`]; `progress` hears after each.
    /// Returns how many were resolved and what applying them did.
    pub fn resolve_holds(
        &self,
        selection: &HoldSelection,
        release: bool,
        now: Timestamp,
        mut progress: impl FnMut(usize),
    ) -> Result<(usize, super::ApplyReport), StoreError> {
        let ids: Vec<u64> = self.holds(selection)?.iter().map(|h| h.id).collect();
        let mut total = super::ApplyReport::default();
        let mut done = 0;
        for chunk in ids.chunks(CHUNK) {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let (n, report) = self.store.transaction(true, |tx| {
                let mut page = PageTx::new(self, tx, "operator", now);
                let mut n = 0;
                for &id in chunk {
                    n += usize::from(page.resolve_hold(id, release)?);
                }
                Ok((n, page.finish()?))
            })?;
            done += n;
            total.decisions.extend(report.decisions);
            for (c, k) in report.enqueued {
                *total.enqueued.entry(c).or_default() += k;
            }
            progress(done);
        }
        Ok((done, total))
    }
}

#[cfg(test)]
mod tests;
