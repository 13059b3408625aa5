//! Erasure: removes one person's personal data (numbers, ids, message texts, record ids)
//! from the store and the audit log, keeping their suppression as tombstones; and, while
//! applying pages, brings a tombstone's suppression back when an erased identity is seen
//! again from any system.
//!
//! The rule: a person opted out of any scope when erased stays opted out of **all**
//! messages, as of the time of the erasure (the evidence that told the scopes apart is
//! gone, so the stricter reading holds). As for any opt-out, only an accepted opt-in
//! clearly later than that undoes it. A person not opted out leaves a tombstone that only
//! records the erasure.

use optout_core::{Scope, Signal, Status, Timestamp};
use serde::Serialize;

use super::{Engine, PEOPLE, PageTx, fact_audit, subject_ids, subject_name};
use crate::audit::{AuditEntry, AuditKind};
use crate::identity::Alias;
use crate::policy::{Decision, Fact};
use crate::store::{StoreError, SubjectRecord, Tombstone, TxResult, Txn};

/// The source name of the facts tombstones bring back.
pub const ERASURE_SOURCE: &str = "erasure";

#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("`{0}`: {1}")]
    BadId(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an erasure did (the answer of `erase`, the control socket and the write API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Erasure {
    /// The erased subject (`s12`); none if the id named nobody the store knows.
    pub subject: Option<String>,
    pub erased_at: Option<Timestamp>,
    /// Whether the person stays suppressed (opted out of all messages).
    pub suppressed: bool,
    /// The tombstones kept (hex HMAC of each identity).
    pub tombstones: Vec<String>,
    /// Nothing was left to erase: the id was erased before and not seen since.
    pub already_erased: bool,
    /// Audit entries whose evidence and record ids were removed.
    pub audit_entries_scrubbed: usize,
    /// Records forgotten (linked to this person only).
    pub records_forgotten: usize,
    /// Pending or rejected automation events and replies about the person, dropped.
    pub pushes_dropped: usize,
    /// Held opt-ins of the person, dropped (they stay suppressed).
    pub holds_dropped: usize,
    /// Quarantined webhook bodies that named the person, removed.
    pub bodies_removed: usize,
    /// Old copies remain in the store's files until the next start's compaction.
    pub compaction_pending: bool,
}

/// What is read before the erasure's transaction.
struct Plan {
    subject: SubjectRecord,
    seqs: Vec<u64>,
    /// (dead letter?, connector, key) of pushes about the person.
    pushes: Vec<(bool, String, String)>,
    /// Opt-ins of the person held by the mass re-opt-in guard: they carry the record and
    /// the evidence, and the person stays suppressed, so they are dropped.
    holds: Vec<u64>,
}

impl Engine {
    /// Erases the person `id` names (a number in any format, `wa:<digits>`, a BSUID):
    /// durable when it returns. Blocking: call it off the async threads.
    pub fn erase(&self, id: &str, source: &str, now: Timestamp) -> Result<Erasure, EraseError> {
        let aliases =
            (self.normalizer.parse_query(id)).map_err(|e| EraseError::BadId(id.to_string(), e))?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut subject = None;
        for a in &aliases {
            if let Some(s) = self.store.subject_by_alias(a.as_str())? {
                subject = Some(s);
                break;
            }
        }
        let Some(subject) = subject else {
            return Ok(match self.tombstone_of(&aliases)? {
                Some((hash, t)) => Erasure {
                    subject: Some(subject_name(t.subject)),
                    erased_at: Some(t.erased_at),
                    suppressed: t.suppressed,
                    tombstones: vec![hash],
                    already_erased: true,
                    ..Erasure::default()
                },
                None => Erasure::default(),
            });
        };
        self.store.erasure_key()?;
        let plan = self.plan(subject)?;
        let mut done =
            (self.store).transaction(true, |tx| self.erase_in(tx, &plan, source, now))?;
        let needles: Vec<String> = (plan.subject.aliases.iter())
            .map(|a| a.split_once(':').map_or(a.as_str(), |(_, v)| v))
            .map(|v| v.trim_start_matches('+').to_string())
            .collect();
        done.bodies_removed = self.store.forget_bodies_with(&needles)?;
        Ok(done)
    }

    /// The first tombstone among these aliases.
    pub fn tombstone_of(
        &self,
        aliases: &[Alias],
    ) -> Result<Option<(String, Tombstone)>, StoreError> {
        for a in aliases {
            if let Some(t) = self.store.tombstone(a.as_str())? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    fn plan(&self, subject: SubjectRecord) -> Result<Plan, StoreError> {
        let mut ids = vec![subject.id];
        ids.extend(subject.merged_from.iter().copied());
        let seqs = self.store.audit_seqs_of(&ids)?;
        let about = |s: &str| subject_ids(s).iter().any(|i| ids.contains(i));
        let mut pushes = Vec::new();
        for r in self.store.outbox() {
            let (c, k, e) = r?;
            if about(&e.item.subject) {
                pushes.push((false, c, k));
            }
        }
        for r in self.store.dead_letters() {
            let (c, k, d) = r?;
            if about(&d.item.subject) {
                pushes.push((true, c, k));
            }
        }
        let mut holds = Vec::new();
        for h in self.store.holds() {
            let h = h?;
            if ids.contains(&h.subject) {
                holds.push(h.id);
            }
        }
        Ok(Plan {
            subject,
            seqs,
            pushes,
            holds,
        })
    }

    /// The erasure's transaction: tombstones, then everything that names the person.
    fn erase_in(
        &self,
        tx: &Txn<'_>,
        plan: &Plan,
        source: &str,
        now: Timestamp,
    ) -> TxResult<Erasure> {
        let s = &plan.subject;
        let decisions = s.consent.decisions(self.policy.margin);
        let mut suppressed = decisions.iter().any(|(_, d)| *d == Decision::OptedOut);
        for a in &s.aliases {
            suppressed |= tx.tombstone(a)?.is_some_and(|(_, t)| t.suppressed);
        }
        let stone = Tombstone {
            erased_at: now,
            subject: s.id,
            suppressed,
        };
        let mut tombstones = Vec::new();
        for a in &s.aliases {
            tombstones.push(tx.put_tombstone(a, &stone)?);
            tx.remove_alias(a)?;
        }
        for id in std::iter::once(s.id).chain(s.merged_from.iter().copied()) {
            tx.remove_subject(id)?;
        }
        for (scope, d) in decisions {
            if d != Decision::Unknown {
                tx.count(&format!("{}:{}", scope.as_str(), d.as_str()), -1)?;
            }
        }
        tx.count(PEOPLE, -1)?;
        let records_forgotten = forget_links(tx, s)?;
        let pushes_dropped = scrub_pushes(tx, s, &plan.pushes)?;
        for &seq in &plan.seqs {
            tx.scrub_audit(seq)?;
        }
        for &id in &plan.holds {
            tx.remove_hold(id)?;
        }
        let mut a = AuditEntry::new(AuditKind::Erased, source, now);
        a.subject = Some(subject_name(s.id));
        a.status = suppressed.then_some(Status::OptedOut);
        a.scope = suppressed.then_some(Scope::All);
        a.reason = Some(format!(
            "personal data erased ({} audit entries scrubbed); {}",
            plan.seqs.len(),
            if suppressed {
                "stays opted out of all messages under its tombstones"
            } else {
                "was not opted out; the tombstones only record the erasure"
            }
        ));
        a.evidence = Some(format!("tombstones {}", short_hashes(&tombstones)));
        tx.audit(&a, &[s.id])?;
        tx.request_compaction()?;
        Ok(Erasure {
            subject: Some(subject_name(s.id)),
            erased_at: Some(now),
            suppressed,
            tombstones,
            audit_entries_scrubbed: plan.seqs.len(),
            records_forgotten,
            pushes_dropped,
            holds_dropped: plan.holds.len(),
            compaction_pending: true,
            ..Erasure::default()
        })
    }
}

/// The first 16 hex digits of each hash: enough to tell tombstones apart in the log.
fn short_hashes(hashes: &[String]) -> String {
    let short: Vec<&str> = hashes.iter().map(|h| &h[..16.min(h.len())]).collect();
    short.join(", ")
}

/// Unlinks the person's records: a record of theirs alone is forgotten (read again, it is
/// a new record); a shared one loses their numbers. Returns how many were forgotten.
fn forget_links(tx: &Txn<'_>, s: &SubjectRecord) -> TxResult<usize> {
    let mut forgotten = 0;
    for (c, r) in &s.links {
        let Some(mut link) = tx.link(c, r)? else {
            continue;
        };
        link.subjects.retain(|&i| i != s.id);
        if link.subjects.is_empty() {
            tx.remove_link(c, r)?;
            forgotten += 1;
        } else {
            link.phones
                .retain(|p| !s.aliases.contains(&format!("p:{p}")));
            tx.put_link(c, r, &link)?;
        }
    }
    Ok(forgotten)
}

/// Pushes about the person: a CRM record's write keeps going without the person's
/// numbers (CRMs are written by record id); automation events and replies, which exist
/// only to carry the person's identities, are dropped. Returns how many were dropped.
fn scrub_pushes(
    tx: &Txn<'_>,
    s: &SubjectRecord,
    pushes: &[(bool, String, String)],
) -> TxResult<usize> {
    let mut dropped = 0;
    for (dead, c, k) in pushes {
        let item = if *dead {
            tx.remove_dead(c, k)?.map(|d| (d.item.clone(), Some(d)))
        } else {
            tx.outbox(c, k)?.map(|e| (e.item.clone(), None))
        };
        let Some((item, dead_letter)) = item else {
            continue;
        };
        let record_write = item.reply.is_none() && s.links.contains(&(c.clone(), item.record));
        match (record_write, dead_letter) {
            (true, Some(mut d)) => {
                d.item.identities.clear();
                tx.put_dead(c, k, &d)?;
            }
            (true, None) => {
                if let Some(mut e) = tx.outbox(c, k)? {
                    e.item.identities.clear();
                    tx.put_outbox(c, k, &e)?;
                }
            }
            (false, Some(_)) => dropped += 1,
            (false, None) => {
                tx.remove_outbox(c, k)?;
                dropped += 1;
            }
        }
    }
    Ok(dropped)
}

impl PageTx<'_, '_, '_> {
    /// An erased identity seen again: its tombstone's suppression becomes an opt-out of the
    /// subject that now holds it (as of the erasure), audited once.
    pub(super) fn tombstones(&mut self, id: u64, aliases: &[Alias]) -> TxResult<()> {
        for alias in aliases {
            let Some((hash, t)) = self.tx.tombstone(alias.as_str())? else {
                continue;
            };
            if !t.suppressed {
                continue;
            }
            let fact = tombstone_fact(&hash, &t);
            let s = self.subjects.get_mut(&id).expect("resolved");
            if s.consent.record(&fact) {
                let mut a = fact_audit(AuditKind::Accepted, &fact, self.now);
                a.subject = Some(subject_name(id));
                a.reason =
                    Some("an erased person's identity was seen again: their opt-out stands".into());
                self.tx.audit(&a, &[id])?;
                self.tally("tombstone");
            }
        }
        Ok(())
    }
}

/// The opt-out a suppressing tombstone stands for.
fn tombstone_fact(hash: &str, t: &Tombstone) -> Fact {
    Fact {
        status: Status::OptedOut,
        scope: Scope::All,
        at: t.erased_at,
        source: ERASURE_SOURCE.to_string(),
        record: String::new(),
        signal: Signal::Erasure,
        evidence: format!("tombstone {}", &hash[..16.min(hash.len())]),
    }
}

#[cfg(test)]
mod tests;
