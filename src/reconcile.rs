//! Reconciliation: applies a page of observations to the store in one transaction.
//!
//! For each observation it resolves identities to subjects (creating, linking and merging
//! them), asks the policy for a judgement, records facts, and then computes the effects:
//! decision changes (audited and counted), outbox entries for every linked record whose
//! known value differs from the decision, at most one confirmation reply, and events for
//! automation webhooks. The page's cursor is saved in the same transaction, so a crash
//! either keeps the whole page and its cursor or neither.
//!
//! Push results come back through [`Engine::complete_pushes`], also one transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use optout_core::{
    ConsentEvent, Identity, Observation, PushItem, PushOutcome, RecordSnapshot, Reply, Scope,
    Status, Timestamp,
};

use crate::audit::{AuditEntry, AuditKind};
use crate::identity::{Alias, Normalizer};
use crate::policy::{self, Consent, Decision, Fact, Judgement, PolicyConfig, RecordMemory};
use crate::store::{
    DeadLetter, LinkRecord, OutboxEntry, Store, StoreError, SubjectRecord, TxResult, Txn,
    UnreadableNumber,
};

/// The WhatsApp customer service window: free-form replies only within it.
pub const REPLY_WINDOW: Duration = Duration::from_secs(24 * 3600);

pub use optout_core::Takes;

/// The counter of live subjects (people), kept with the decision totals so `status` need
/// not scan the store.
pub const PEOPLE: &str = "people";

/// The counter of possible opt-outs recorded (messages that may be an opt-out, never
/// decided on), shown by `status`.
pub const POSSIBLE_OPT_OUTS: &str = "possible_opt_outs";

/// Displayed subject id.
pub fn subject_name(id: u64) -> String {
    format!("s{id}")
}

/// One decision change, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionChange {
    pub subject: String,
    pub scope: Scope,
    pub from: Decision,
    pub to: Decision,
    pub source: String,
    pub event_at: Option<Timestamp>,
}

/// What applying a page did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub observations: usize,
    /// Counts by result (`accepted`, `echo`, `ignored`, `unchanged`, …).
    pub results: BTreeMap<&'static str, u64>,
    pub decisions: Vec<DecisionChange>,
    /// Outbox entries written, per connector.
    pub enqueued: BTreeMap<String, u64>,
    /// Pushes confirmed by a read-back: (connector, record, delay since the push).
    pub verified: Vec<(String, String, Duration)>,
    /// Templates whose gated category changed: (from, to), e.g. (`utility`, `marketing`).
    pub recategorised: Vec<(String, String)>,
    /// Opt-ins held by the mass re-opt-in guard, per source; `tripped`: the sources whose
    /// guard this page tripped (none of their opt-ins was held before).
    pub held: BTreeMap<String, u64>,
    pub tripped: Vec<String>,
    /// Every record push enqueued, as `resync --dry-run` lists it.
    pub changes: Vec<guard::RecordChange>,
}

/// What completing a batch of pushes did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    pub done: u64,
    pub rejected: Vec<(String, String)>,
    pub retried: u64,
    /// Time from enqueue to done, per completed item.
    pub latencies: Vec<Duration>,
}

pub struct Engine {
    store: Store,
    policy: PolicyConfig,
    normalizer: Normalizer,
    targets: BTreeMap<String, Takes>,
    /// Connector → namespace of its business-scoped user ids (see [`Engine::with_id_namespaces`]).
    id_namespaces: BTreeMap<String, String>,
    /// Connectors whose records carry a marketing-consent field (`marketing.rs`).
    marketing_fields: BTreeSet<String>,
    /// One writer at a time: pages from different connectors touch the same subjects,
    /// and sled would only make them retry each other.
    lock: Mutex<()>,
}

impl Engine {
    pub fn new(
        store: Store,
        policy: PolicyConfig,
        normalizer: Normalizer,
        targets: BTreeMap<String, Takes>,
    ) -> Self {
        Engine {
            store,
            policy,
            normalizer,
            targets,
            id_namespaces: BTreeMap::new(),
            marketing_fields: BTreeSet::new(),
            lock: Mutex::new(()),
        }
    }

    /// Business-scoped user ids are unique only within a business portfolio: ids a
    /// connector listed here reports are keyed `b:{namespace}/{id}`, so two portfolios'
    /// ids never name one person by accident. Unlisted connectors' ids stay `b:{id}`.
    pub fn with_id_namespaces(mut self, namespaces: BTreeMap<String, String>) -> Self {
        self.id_namespaces = namespaces;
        self
    }

    /// The connectors whose records carry a marketing-consent field: they are also pushed
    /// the `marketing` decision, and their reads of it are `marketing` facts.
    pub fn with_marketing_fields(mut self, connectors: BTreeSet<String>) -> Self {
        self.marketing_fields = connectors;
        self
    }

    /// Whether `connector`'s records carry a marketing-consent field.
    pub fn has_marketing_field(&self, connector: &str) -> bool {
        self.marketing_fields.contains(connector)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// Applies a page read from `connector` and saves `cursor` with it, atomically and
    /// durably.
    pub fn apply_page(
        &self,
        connector: &str,
        observations: &[Observation],
        cursor: Option<&str>,
        now: Timestamp,
    ) -> Result<ApplyReport, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.transaction(true, |tx| {
            let mut page = PageTx::new(self, tx, connector, now);
            page.observe_all(observations)?;
            let report = page.finish()?;
            if let Some(c) = cursor {
                tx.set_cursor(connector, c)?;
            }
            Ok(report)
        })
    }

    /// Marks entries as in flight before a push that must never be repeated (confirmation
    /// replies): after a crash they are abandoned rather than sent twice.
    pub fn mark_in_flight(
        &self,
        connector: &str,
        keys: &[(String, u64)],
    ) -> Result<(), StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.transaction(true, |tx| {
            for (key, version) in keys {
                if let Some(mut e) = tx.outbox(connector, key)?
                    && e.version == *version
                {
                    e.in_flight = true;
                    tx.put_outbox(connector, key, &e)?;
                }
            }
            Ok(())
        })
    }

    /// At start-up: entries left in flight by a crash have an unknown outcome. They are
    /// removed and audited, never re-sent (at most one confirmation per message).
    pub fn abandon_in_flight(&self, now: Timestamp) -> Result<usize, StoreError> {
        let stuck: Vec<(String, String)> = self
            .store
            .outbox()
            .filter_map(|r| r.ok())
            .filter(|(_, _, e)| e.in_flight)
            .map(|(c, k, _)| (c, k))
            .collect();
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.transaction(true, |tx| {
            for (c, k) in &stuck {
                if let Some(e) = tx.outbox(c, k)?
                    && e.in_flight
                {
                    tx.remove_outbox(c, k)?;
                    let mut a = AuditEntry::new(AuditKind::PushAbandoned, c, now);
                    a.subject = Some(e.item.subject.clone());
                    a.record = Some(e.item.record.clone());
                    a.status = Some(e.item.status);
                    a.reason = Some(
                        "interrupted while sending; not re-sent (at most one reply per message)"
                            .into(),
                    );
                    tx.audit(&a, &subject_ids(&e.item.subject))?;
                }
            }
            Ok(stuck.len())
        })
    }

    /// Records the outcomes of a push batch: done entries leave the outbox (only if not
    /// replaced by a newer value meanwhile), rejected ones become dead letters, the rest
    /// wait `retry_delay`.
    pub fn complete_pushes(
        &self,
        connector: &str,
        results: &[(String, u64, PushOutcome)],
        retry_delay: Duration,
        now: Timestamp,
    ) -> Result<PushReport, StoreError> {
        self.complete_pushes_sent(connector, results, retry_delay, now, now)
    }

    /// [`Engine::complete_pushes`] for a batch sent at `sent_at`: a record's push time is
    /// when the request left, not when its answer was recorded, so that a read of the
    /// record modified by it counts as its read-back however long recording took.
    pub fn complete_pushes_sent(
        &self,
        connector: &str,
        results: &[(String, u64, PushOutcome)],
        retry_delay: Duration,
        now: Timestamp,
        sent_at: Timestamp,
    ) -> Result<PushReport, StoreError> {
        let takes_records = self.targets.get(connector) == Some(&Takes::Records);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.transaction(true, |tx| {
            let mut report = PushReport::default();
            for (key, version, outcome) in results {
                let Some(mut entry) = tx.outbox(connector, key)? else {
                    continue;
                };
                let current = entry.version == *version;
                let item = entry.item.clone();
                let subjects = subject_ids(&item.subject);
                let mut audit = AuditEntry::new(AuditKind::PushDone, connector, now);
                audit.subject = Some(item.subject.clone());
                audit.record = Some(item.record.clone());
                audit.scope = Some(item.scope);
                audit.status = Some(item.status);
                audit.event_at = Some(item.changed_at);
                match outcome {
                    PushOutcome::Done => {
                        if takes_records {
                            note_pushed(tx, connector, &item, sent_at)?;
                        }
                        if current {
                            tx.remove_outbox(connector, key)?;
                            report.latencies.push(now.since(entry.enqueued_at));
                        }
                        report.done += 1;
                        tx.audit(&audit, &subjects)?;
                    }
                    PushOutcome::Rejected { reason } => {
                        if current {
                            tx.remove_outbox(connector, key)?;
                            let dead = DeadLetter {
                                item: item.clone(),
                                reason: reason.clone(),
                                at: now,
                                attempts: entry.attempts + 1,
                            };
                            tx.put_dead(connector, key, &dead)?;
                            report.rejected.push((item.record.clone(), reason.clone()));
                        }
                        audit.kind = AuditKind::PushRejected;
                        audit.reason = Some(reason.clone());
                        tx.audit(&audit, &subjects)?;
                    }
                    PushOutcome::RetryLater { after, reason } => {
                        if current {
                            entry.attempts += 1;
                            entry.in_flight = false;
                            entry.last_error = Some(reason.clone());
                            entry.not_before =
                                now.plus(after.unwrap_or(retry_delay).max(retry_delay));
                            tx.put_outbox(connector, key, &entry)?;
                        }
                        report.retried += 1;
                    }
                }
            }
            Ok(report)
        })
    }

    /// Records a failure of a whole batch: every entry waits `delay` before the next try.
    pub fn defer_pushes(
        &self,
        connector: &str,
        keys: &[(String, u64)],
        error: &str,
        delay: Duration,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let results: Vec<_> = keys
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    *v,
                    PushOutcome::RetryLater {
                        after: Some(delay),
                        reason: error.to_string(),
                    },
                )
            })
            .collect();
        self.complete_pushes(connector, &results, delay, now)
            .map(|_| ())
    }

    /// Moves dead letters back to the outbox (all, or one connector's) for another try.
    pub fn retry_dead_letters(
        &self,
        connector: Option<&str>,
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        let dead: Vec<(String, String)> = self
            .store
            .dead_letters()
            .filter_map(|r| r.ok())
            .filter(|(c, _, _)| connector.is_none_or(|want| want == c))
            .map(|(c, k, _)| (c, k))
            .collect();
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.transaction(true, |tx| {
            let mut n = 0;
            for (c, k) in &dead {
                if let Some(d) = tx.remove_dead(c, k)? {
                    if tx.outbox(c, k)?.is_none() {
                        let entry = OutboxEntry {
                            item: d.item.clone(),
                            version: tx.new_id()?,
                            enqueued_at: now,
                            not_before: now,
                            attempts: 0,
                            last_error: Some(format!("retrying after: {}", d.reason)),
                            in_flight: false,
                        };
                        tx.put_outbox(c, k, &entry)?;
                    }
                    let mut a = AuditEntry::new(AuditKind::Operator, c, now);
                    a.record = Some(d.item.record.clone());
                    a.subject = Some(d.item.subject.clone());
                    a.reason = Some("dead letter re-queued by resync".into());
                    tx.audit(&a, &subject_ids(&d.item.subject))?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }
}

/// A done record push: the record's link remembers the value written (in the field the
/// item's scope names) and awaits its read-back.
fn note_pushed(tx: &Txn<'_>, connector: &str, item: &PushItem, now: Timestamp) -> TxResult<()> {
    let Some(mut link) = tx.link(connector, &item.record)? else {
        return Ok(());
    };
    if item.scope == Scope::Marketing {
        marketing::pushed(tx, connector, &mut link, item, now)?;
    } else {
        link.memory.last_pushed = Some((item.status, item.changed_at));
        link.pushed_at = Some(now);
        link.awaiting_readback = true;
        tx.set_unverified(connector, &item.record, Some(now))?;
    }
    tx.put_link(connector, &item.record, &link)
}

/// Subject ids from a push item's `subject` field (`s12` or `s12,s40`).
fn subject_ids(s: &str) -> Vec<u64> {
    s.split(',')
        .filter_map(|p| p.trim().strip_prefix('s')?.parse().ok())
        .collect()
}

/// A record's readable numbers (E.164), their subjects, and its unreadable values.
type RecordNumbers = (Vec<String>, Vec<u64>, Vec<UnreadableNumber>);

/// The working state of one page's transaction.
struct PageTx<'e, 't, 'tx> {
    engine: &'e Engine,
    tx: &'t Txn<'tx>,
    connector: &'e str,
    now: Timestamp,
    /// Working copies of subjects, written back in `finish`.
    subjects: BTreeMap<u64, SubjectRecord>,
    /// Decisions of each touched subject before the page.
    before: HashMap<u64, [(Scope, Decision); 2]>,
    /// Records read in this page (their values may disagree with the decision).
    touched_records: BTreeSet<(String, String)>,
    /// Subjects that gained identities in this page (automation tools must learn them).
    new_aliases: BTreeSet<u64>,
    /// Accepted keyword/button facts of this page that may earn a confirmation:
    /// message id → (subject, recipient, language).
    confirmable: HashMap<String, (u64, Identity, Option<String>)>,
    report: ApplyReport,
}

impl<'e, 't, 'tx> PageTx<'e, 't, 'tx> {
    /// Judges every observation of a page, in order.
    fn observe_all(&mut self, observations: &[Observation]) -> TxResult<()> {
        for obs in observations {
            match obs {
                Observation::Event(ev) => self.event(ev)?,
                Observation::Record(snap) => self.record(snap)?,
                Observation::IdentityChange(c) => self.identity_change(c)?,
                Observation::TemplateCategory(t) => self.template_category(t)?,
            }
        }
        Ok(())
    }

    fn new(engine: &'e Engine, tx: &'t Txn<'tx>, connector: &'e str, now: Timestamp) -> Self {
        PageTx {
            engine,
            tx,
            connector,
            now,
            subjects: BTreeMap::new(),
            before: HashMap::new(),
            touched_records: BTreeSet::new(),
            new_aliases: BTreeSet::new(),
            confirmable: HashMap::new(),
            report: ApplyReport::default(),
        }
    }

    fn margin(&self) -> Duration {
        self.engine.policy.margin
    }

    fn tally(&mut self, what: &'static str) {
        *self.report.results.entry(what).or_default() += 1;
    }

    /// Loads a subject into the working set, remembering its decisions before the page.
    fn load(&mut self, id: u64) -> TxResult<Option<&mut SubjectRecord>> {
        if !self.subjects.contains_key(&id) {
            let Some(s) = self.tx.subject(id)? else {
                return Ok(None);
            };
            self.before
                .insert(id, s.consent.decisions(self.engine.policy.margin));
            self.subjects.insert(id, s);
        }
        Ok(self.subjects.get_mut(&id))
    }

    /// The live subject id for an alias, following merges.
    fn live(&mut self, alias: &str) -> TxResult<Option<u64>> {
        let Some(mut id) = self.tx.alias(alias)? else {
            return Ok(None);
        };
        for _ in 0..16 {
            match self.load(id)? {
                Some(s) => match s.merged_into {
                    Some(next) => id = next,
                    None => return Ok(Some(id)),
                },
                None => return Ok(None),
            }
        }
        Ok(Some(id))
    }

    /// Finds or creates the one subject these aliases belong to, merging subjects when
    /// the aliases were known under different ones.
    fn resolve(&mut self, aliases: &[Alias]) -> TxResult<u64> {
        let mut ids = Vec::new();
        for a in aliases {
            if let Some(id) = self.live(a.as_str())?
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let target = match ids.first() {
            Some(&id) => id,
            None => {
                let id = self.tx.new_id()?;
                self.tx.count(PEOPLE, 1)?;
                let s = SubjectRecord {
                    id,
                    created_at: self.now,
                    ..SubjectRecord::default()
                };
                self.before.insert(id, s.consent.decisions(self.margin()));
                self.subjects.insert(id, s);
                id
            }
        };
        for &other in ids.iter().skip(1) {
            self.merge(target, other)?;
        }
        let subject = self.subjects.get_mut(&target).expect("loaded");
        let known_before = !subject.aliases.is_empty();
        for a in aliases {
            if !subject.aliases.iter().any(|x| x == a.as_str()) {
                subject.aliases.push(a.as_str().to_string());
                self.tx.put_alias(a.as_str(), target)?;
                if known_before {
                    self.new_aliases.insert(target);
                }
            }
        }
        if ids.len() > 1 {
            self.new_aliases.insert(target);
        }
        self.tombstones(target, aliases)?;
        Ok(target)
    }

    fn merge(&mut self, target: u64, other: u64) -> TxResult<()> {
        let Some(o) = self.load(other)?.cloned() else {
            return Ok(());
        };
        for alias in &o.aliases {
            self.tx.put_alias(alias, target)?;
        }
        for (c, r) in &o.links {
            if let Some(mut link) = self.tx.link(c, r)? {
                for s in link.subjects.iter_mut() {
                    if *s == other {
                        *s = target;
                    }
                }
                link.subjects.sort_unstable();
                link.subjects.dedup();
                self.tx.put_link(c, r, &link)?;
            }
            self.touched_records.insert((c.clone(), r.clone()));
        }
        let t = self.subjects.get_mut(&target).expect("loaded");
        t.consent.merge(&o.consent);
        for a in &o.aliases {
            if !t.aliases.contains(a) {
                t.aliases.push(a.clone());
            }
        }
        for l in &o.links {
            if !t.links.contains(l) {
                t.links.push(l.clone());
            }
        }
        t.last_inbound = t.last_inbound.max(o.last_inbound);
        t.merged_from.push(other);
        t.merged_from.extend(o.merged_from.iter().copied());
        let o_mut = self.subjects.get_mut(&other).expect("loaded");
        o_mut.merged_into = Some(target);
        o_mut.aliases.clear();
        o_mut.links.clear();
        // The absorbed subject's decisions leave the totals with it.
        if let Some(before) = self.before.get(&other).copied() {
            for (scope, d) in before {
                count(self.tx, scope, d, -1)?;
            }
            self.before.insert(
                other,
                [
                    (Scope::All, Decision::Unknown),
                    (Scope::Marketing, Decision::Unknown),
                ],
            );
        }
        self.tx.count(PEOPLE, -1)?;
        let mut a = AuditEntry::new(AuditKind::Merged, self.connector, self.now);
        a.subject = Some(subject_name(target));
        a.reason = Some(format!(
            "{} merged into {}: one source showed both identities",
            subject_name(other),
            subject_name(target)
        ));
        self.tx.audit(&a, &[target, other])?;
        Ok(())
    }

    /// The aliases one identity yields for this page's connector.
    fn aliases_of(&self, identity: &Identity) -> Result<Vec<Alias>, String> {
        let aliases = self.engine.normalizer.aliases(identity)?;
        let Some(ns) = self.engine.id_namespaces.get(self.connector) else {
            return Ok(aliases);
        };
        Ok(aliases
            .into_iter()
            .map(|a| match a.as_str().strip_prefix("b:") {
                Some(id) => Alias::from_stored(format!("b:{ns}/{id}")),
                None => a,
            })
            .collect())
    }

    fn reject_identity(&mut self, what: &str, reason: &str, record: Option<&str>) -> TxResult<()> {
        let mut a = AuditEntry::new(AuditKind::IdentityRejected, self.connector, self.now);
        a.record = record.map(str::to_string);
        a.evidence = Some(bounded(what, 64));
        a.reason = Some(reason.to_string());
        self.tx.audit(&a, &[])?;
        self.tally("identity_rejected");
        Ok(())
    }

    fn event(&mut self, ev: &ConsentEvent) -> TxResult<()> {
        self.report.observations += 1;
        if let Some(id) = &ev.message_id
            && !self.tx.first_sight(self.connector, id, self.now)?
        {
            self.tally("duplicate");
            return Ok(());
        }
        let mut aliases = Vec::new();
        for identity in &ev.identities {
            match self.aliases_of(identity) {
                Ok(a) => aliases.extend(a),
                Err(why) => {
                    self.reject_identity(identity_text(identity), &why, ev.message_id.as_deref())?
                }
            }
        }
        if aliases.is_empty() {
            return Ok(());
        }
        let id = self.resolve(&aliases)?;
        if ev.inbound {
            let s = self.subjects.get_mut(&id).expect("resolved");
            s.last_inbound = s.last_inbound.max(Some(ev.at.min(self.now)));
        }
        if ev.possible_opt_out {
            return self.possible_opt_out(id, ev);
        }
        match policy::judge_event(ev, self.connector, self.now, &self.engine.policy) {
            Judgement::Fact(fact) => {
                let consent = &self.subjects[&id].consent;
                if policy::repeats_preference(consent, &fact, self.margin()) {
                    self.accept_repeat(id, &fact)?;
                } else {
                    self.accept(id, &fact, ev.at)?;
                }
                self.reach_variants(&aliases, &[id], &fact)?;
                if policy::wants_confirmation(&fact)
                    && let Some(mid) = &ev.message_id
                    && let Some(to) = reply_identity(ev)
                {
                    self.confirmable
                        .insert(mid.clone(), (id, to, ev.language.clone()));
                }
            }
            Judgement::NotAccepted(fact, why) => self.ignore(&[id], &fact, &why)?,
            Judgement::Refused(fact, why) => self.refuse(&[id], &fact, &why)?,
            _ => self.tally("no_consent_value"),
        }
        Ok(())
    }

    fn accept(&mut self, id: u64, fact: &Fact, reported_at: Timestamp) -> TxResult<()> {
        if self.held(id, fact)? {
            return Ok(());
        }
        let s = self.subjects.get_mut(&id).expect("loaded");
        s.consent.record(fact);
        let mut a = fact_audit(AuditKind::Accepted, fact, self.now);
        a.subject = Some(subject_name(id));
        let policy = &self.engine.policy;
        if reported_at != fact.at && reported_at > self.now.plus(policy.future_tolerance) {
            a.reason = Some(format!(
                "event time {reported_at} lies in the future; clamped"
            ));
        } else if reported_at < policy.event_time_floor {
            a.reason = Some(format!(
                "change time {reported_at} lies before the floor {}; the record's modification time stands in",
                policy.event_time_floor
            ));
        }
        self.tx.audit(&a, &[id])?;
        self.tally("accepted");
        Ok(())
    }

    /// A marketing preference that repeats the current decision (Meta's `stop` while
    /// stopped): kept in the registers, so a late, older act is still judged against it,
    /// but it changes no decision and nothing is pushed, confirmed or announced.
    fn accept_repeat(&mut self, id: u64, fact: &Fact) -> TxResult<()> {
        let s = self.subjects.get_mut(&id).expect("loaded");
        s.consent.record(fact);
        let mut a = fact_audit(AuditKind::Accepted, fact, self.now);
        a.subject = Some(subject_name(id));
        a.reason = Some("repeats the current decision: nothing changes".into());
        self.tx.audit(&a, &[id])?;
        self.tally("repeated");
        Ok(())
    }

    /// A message that may be an opt-out: audited and counted for an operator's review,
    /// never decided on either way. The customer is asked once, in the keyword's language,
    /// through the confirmation path (sent only when confirmations are on).
    fn possible_opt_out(&mut self, id: u64, ev: &ConsentEvent) -> TxResult<()> {
        let mut a = AuditEntry::new(AuditKind::PossibleOptOut, self.connector, self.now);
        a.subject = Some(subject_name(id));
        a.record = ev.message_id.clone();
        a.event_at = Some(ev.at);
        a.evidence = Some(bounded(&ev.evidence, 200));
        a.reason = Some("may be an opt-out: not applied; an operator should review it".into());
        self.tx.audit(&a, &[id])?;
        self.tx.count(POSSIBLE_OPT_OUTS, 1)?;
        self.tally("possible_opt_out");
        let (Some(mid), Some(to)) = (&ev.message_id, reply_identity(ev)) else {
            return Ok(());
        };
        // Nothing but one confirmation goes to a person who stopped every message.
        let stopped = self.subjects[&id].consent.decide(Scope::All, self.margin());
        if stopped == Decision::OptedOut
            || self.engine.targets.get(self.connector) != Some(&Takes::Replies)
        {
            return Ok(());
        }
        let item = PushItem {
            key: format!("confirm:{mid}"),
            record: mid.clone(),
            status: Status::OptedOut,
            scope: Scope::All,
            changed_at: ev.at,
            source: format!("{}:possible_opt_out", self.connector),
            subject: subject_name(id),
            identities: vec![to.clone()],
            reply: Some(Reply {
                to,
                in_reply_to: mid.clone(),
                window_ends: ev.at.min(self.now).plus(REPLY_WINDOW),
                language: ev.language.clone(),
                clarify: true,
            }),
        };
        let connector = self.connector.to_string();
        self.enqueue(&connector, item)
    }

    /// An opt-out reaches the suppress-only variants of the aliases it was observed for
    /// (Argentina's `549…` and `54…`): each variant's subject records it too, so its
    /// records are suppressed and the send gate blocks it. An opt-in stays where it came
    /// from: the variant may be someone else, whose opt-out it must not undo.
    fn reach_variants(&mut self, aliases: &[Alias], observed: &[u64], fact: &Fact) -> TxResult<()> {
        if fact.status != Status::OptedOut {
            return Ok(());
        }
        for v in self.engine.normalizer.suppress_only(aliases) {
            let vid = self.resolve(std::slice::from_ref(&v.alias))?;
            if observed.contains(&vid) {
                continue;
            }
            let s = self.subjects.get_mut(&vid).expect("resolved");
            s.consent.record(fact);
            let mut a = fact_audit(AuditKind::Accepted, fact, self.now);
            a.subject = Some(subject_name(vid));
            a.reason = Some(format!(
                "opt-out reaches a suppress-only variant: {}",
                v.rule.why
            ));
            self.tx.audit(&a, &[vid])?;
            self.tally("accepted_variant");
        }
        Ok(())
    }

    fn ignore(&mut self, ids: &[u64], fact: &Fact, why: &str) -> TxResult<()> {
        self.set_aside(ids, fact, why, "ignored")
    }

    /// An act dated before the event-time floor: kept in the audit log with the time as
    /// reported, never decided on.
    fn refuse(&mut self, ids: &[u64], fact: &Fact, why: &str) -> TxResult<()> {
        self.set_aside(ids, fact, why, "refused")
    }

    /// Audits a fact that does not enter the registers.
    fn set_aside(
        &mut self,
        ids: &[u64],
        fact: &Fact,
        why: &str,
        result: &'static str,
    ) -> TxResult<()> {
        let mut a = fact_audit(AuditKind::Ignored, fact, self.now);
        a.subject = Some(
            ids.iter()
                .map(|&i| subject_name(i))
                .collect::<Vec<_>>()
                .join(","),
        );
        a.reason = Some(why.to_string());
        self.tx.audit(&a, ids)?;
        self.tally(result);
        Ok(())
    }

    /// A CRM record as read: link it to the subjects of its numbers, judge its consent value,
    /// and settle a push of ours it reflects.
    fn record(&mut self, snap: &RecordSnapshot) -> TxResult<()> {
        self.report.observations += 1;
        let connector = self.connector;
        let (phones, ids, unreadable) = self.record_subjects(snap)?;
        self.tx
            .set_unreadable(connector, &snap.record, &unreadable)?;
        let existing = self.tx.link(connector, &snap.record)?;
        let mut link = existing.clone().unwrap_or(LinkRecord {
            first_seen: self.now,
            ..LinkRecord::default()
        });
        let key = (connector.to_string(), snap.record.clone());
        self.relink(&key, &link.subjects, &ids)?;
        link.subjects = ids.clone();
        link.phones = phones.clone();
        let memory = self.record_memory(existing.as_ref(), &snap.record)?;
        let judgement = policy::judge_record(
            memory.as_ref(),
            snap,
            connector,
            self.now,
            &self.engine.policy,
        );
        if let Judgement::Fact(fact) = &judgement {
            let aliases: Vec<Alias> = phones
                .iter()
                .map(|p| Alias::from_stored(format!("p:{p}")))
                .collect();
            self.reach_variants(&aliases, &ids, fact)?;
        }
        self.apply_record_judgement(judgement, snap, &ids)?;
        self.settle_readback(snap, &mut link)?;
        self.marketing_record(snap, &ids, &mut link, existing.is_some())?;
        link.memory.last_seen = snap.value;
        link.last_read = self.now;
        self.tx.put_link(connector, &snap.record, &link)?;
        self.touched_records.insert(key);
        Ok(())
    }

    /// The record's distinct E.164 numbers and the subjects they resolve to (sorted);
    /// numbers that do not parse are rejected in the audit log and returned, to be kept
    /// where `status` and `numbers --unreadable` show them.
    fn record_subjects(&mut self, snap: &RecordSnapshot) -> TxResult<RecordNumbers> {
        let mut phones = Vec::new();
        let mut ids = Vec::new();
        let mut unreadable = Vec::new();
        for (i, raw) in snap.phones.iter().enumerate() {
            match self.engine.normalizer.phone(raw) {
                Ok(e164) => {
                    if phones.contains(&e164) {
                        continue;
                    }
                    let id = self.resolve(&[Alias::from_stored(format!("p:{e164}"))])?;
                    phones.push(e164);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                Err(why) => {
                    self.reject_identity(raw, &why, Some(&snap.record))?;
                    unreadable.push(UnreadableNumber {
                        field: format!("phone {}", i + 1),
                        raw: bounded(raw, 64),
                        reason: why,
                        at: self.now,
                    });
                }
            }
        }
        ids.sort_unstable();
        Ok((phones, ids, unreadable))
    }

    /// Re-link: a record whose numbers changed moves from its old subjects to its new ones.
    fn relink(&mut self, key: &(String, String), old: &[u64], ids: &[u64]) -> TxResult<()> {
        for &old in old {
            if !ids.contains(&old)
                && let Some(s) = self.load(old)?
            {
                s.links.retain(|l| l != key);
            }
        }
        for &id in ids {
            let s = self.load(id)?.expect("resolved");
            if !s.links.contains(key) {
                s.links.push(key.clone());
            }
        }
        Ok(())
    }

    /// What we remember of the record, with the value of a push still in the outbox: a push
    /// of ours may have reached the record before its outcome was recorded.
    fn record_memory(
        &self,
        existing: Option<&LinkRecord>,
        record: &str,
    ) -> TxResult<Option<RecordMemory>> {
        let pending = self
            .tx
            .outbox(self.connector, record)?
            .map(|e| e.item.status);
        Ok(match (existing, pending) {
            (Some(l), _) => Some(RecordMemory {
                pending,
                ..l.memory
            }),
            (None, Some(_)) => Some(RecordMemory {
                pending,
                ..RecordMemory::default()
            }),
            (None, None) => None,
        })
    }

    /// Acts on what the policy made of a record's value, for the record's subjects `ids`.
    fn apply_record_judgement(
        &mut self,
        judgement: Judgement,
        snap: &RecordSnapshot,
        ids: &[u64],
    ) -> TxResult<()> {
        match judgement {
            Judgement::Fact(fact) => {
                for &id in ids {
                    self.accept(id, &fact, snap.changed_at.unwrap_or(snap.modified_at))?;
                }
                if ids.is_empty() {
                    self.ignore(&[], &fact, "record holds no usable phone number")?;
                }
            }
            Judgement::NotAccepted(fact, why) => self.ignore(ids, &fact, &why)?,
            Judgement::Refused(fact, why) => self.refuse(ids, &fact, &why)?,
            Judgement::Echo(status) => self.echo(snap, ids, status)?,
            Judgement::InitialOptIn => {
                let fact = Fact {
                    status: Status::OptedIn,
                    scope: Scope::All,
                    at: snap.modified_at,
                    source: self.connector.to_string(),
                    record: snap.record.clone(),
                    signal: optout_core::Signal::CrmField,
                    evidence: snap.evidence.clone(),
                };
                self.ignore(
                    ids,
                    &fact,
                    "first value seen on the record is an opt-in: not a change",
                )?;
            }
            Judgement::Unchanged => self.tally("unchanged"),
            Judgement::NoConsentValue => self.tally("no_consent_value"),
        }
        Ok(())
    }

    /// The record holds the value the daemon wrote: audited, not a new fact.
    fn echo(&mut self, snap: &RecordSnapshot, ids: &[u64], status: Status) -> TxResult<()> {
        let mut a = AuditEntry::new(AuditKind::Echo, self.connector, self.now);
        a.subject = Some(
            ids.iter()
                .map(|&i| subject_name(i))
                .collect::<Vec<_>>()
                .join(","),
        );
        a.record = Some(snap.record.clone());
        a.status = Some(status);
        a.evidence = Some(bounded(&snap.evidence, 200));
        a.reason = Some("read back the value the daemon wrote: push verified".into());
        self.tx.audit(&a, ids)?;
        self.tally("echo");
        Ok(())
    }

    /// Verification: a read that reflects the record after our push settles it.
    fn settle_readback(&mut self, snap: &RecordSnapshot, link: &mut LinkRecord) -> TxResult<()> {
        let after_push = link
            .pushed_at
            .is_none_or(|p| snap.modified_at >= p.minus(Duration::from_secs(1)));
        if !(link.awaiting_readback && after_push) {
            return Ok(());
        }
        if snap.value == link.memory.last_pushed.map(|(s, _)| s)
            && let Some(p) = link.pushed_at
        {
            self.report.verified.push((
                self.connector.to_string(),
                snap.record.clone(),
                self.now.since(p),
            ));
        }
        link.awaiting_readback = false;
        self.tx.set_unverified(self.connector, &snap.record, None)?;
        Ok(())
    }

    /// Effects: decision changes, record pushes, confirmations, webhook events.
    fn finish(mut self) -> TxResult<ApplyReport> {
        let margin = self.margin();
        let mut candidates = std::mem::take(&mut self.touched_records);
        // Either scope's change may change a marketing field.
        let mut marketing_candidates = candidates.clone();
        let ids: Vec<u64> = self.subjects.keys().copied().collect();
        for id in ids {
            let s = self.subjects[&id].clone();
            if s.merged_into.is_some() {
                self.tx.put_subject(&s)?;
                continue;
            }
            let after = s.consent.decisions(margin);
            let before = self.before.get(&id).copied().unwrap_or(after);
            for ((scope, from), (_, to)) in before.into_iter().zip(after) {
                if from == to {
                    continue;
                }
                let deciding = s.consent.registers(scope).deciding(margin).cloned();
                count(self.tx, scope, from, -1)?;
                count(self.tx, scope, to, 1)?;
                let mut a = AuditEntry::new(AuditKind::Decision, self.connector, self.now);
                a.subject = Some(subject_name(id));
                a.scope = Some(scope);
                a.status = to.status();
                a.event_at = deciding.as_ref().map(|f| f.at);
                a.reason = Some(format!("{} → {}", from.as_str(), to.as_str()));
                a.evidence = deciding
                    .as_ref()
                    .map(|f| format!("{} {}", f.origin(), bounded(&f.evidence, 200)));
                self.tx.audit(&a, &[id])?;
                self.report.decisions.push(DecisionChange {
                    subject: subject_name(id),
                    scope,
                    from,
                    to,
                    source: deciding.as_ref().map(|f| f.origin()).unwrap_or_default(),
                    event_at: deciding.as_ref().map(|f| f.at),
                });
                if scope == Scope::All {
                    candidates.extend(s.links.iter().cloned());
                }
                marketing_candidates.extend(s.links.iter().cloned());
                if let Some(f) = &deciding {
                    self.event_pushes(&s, scope, to, f)?;
                    if let Some((sid, to_id, lang)) = self.confirmable.get(&f.record).cloned()
                        && sid == id
                        && f.source == self.connector
                    {
                        self.confirmation(id, f, to_id, lang)?;
                    }
                }
            }
            // A person already decided on who gained identities (a BSUID linked to a
            // number): automation tools hear the decision again, under every identity.
            if self.new_aliases.contains(&id) {
                for (scope, d) in after {
                    let changed = before.iter().any(|(sc, b)| *sc == scope && *b != d);
                    if !changed
                        && let Some(f) = s.consent.registers(scope).deciding(margin).cloned()
                    {
                        self.event_pushes(&s, scope, d, &f)?;
                    }
                }
            }
            self.tx.put_subject(&self.subjects[&id])?;
        }
        for (connector, record) in candidates {
            if self.engine.targets.get(&connector) == Some(&Takes::Records) {
                self.record_push(&connector, &record)?;
            }
        }
        for (connector, record) in marketing_candidates {
            self.marketing_push(&connector, &record)?;
        }
        Ok(self.report)
    }

    /// A record's link and the consent registers of every subject it holds, `None` for a
    /// record not known.
    fn record_consents(
        &mut self,
        connector: &str,
        record: &str,
    ) -> TxResult<Option<(LinkRecord, Vec<Consent>)>> {
        let Some(link) = self.tx.link(connector, record)? else {
            return Ok(None);
        };
        let mut consents = Vec::new();
        for &id in &link.subjects {
            if let Some(s) = self.load(id)? {
                consents.push(s.consent.clone());
            }
        }
        Ok(Some((link, consents)))
    }

    /// Enqueues a push if the record's known value differs from what its subjects'
    /// decisions require.
    fn record_push(&mut self, connector: &str, record: &str) -> TxResult<()> {
        let Some((link, consents)) = self.record_consents(connector, record)? else {
            return Ok(());
        };
        let Some(fact) = policy::desired_record_value(consents.iter(), self.margin()) else {
            return Ok(());
        };
        let pending = self.tx.outbox(connector, record)?;
        if let Some(p) = &pending
            && p.item.status == fact.status
        {
            return Ok(());
        }
        if pending.is_none() {
            if link.memory.last_seen == Some(fact.status) {
                return Ok(());
            }
            if link.awaiting_readback
                && link.memory.last_pushed.map(|(s, _)| s) == Some(fact.status)
            {
                return Ok(());
            }
        }
        let identities = link
            .phones
            .iter()
            .map(|p| Identity::Phone(p.clone()))
            .collect();
        let item = PushItem {
            key: record.to_string(),
            record: record.to_string(),
            status: fact.status,
            scope: Scope::All,
            changed_at: fact.at,
            source: fact.origin(),
            subject: link
                .subjects
                .iter()
                .map(|&i| subject_name(i))
                .collect::<Vec<_>>()
                .join(","),
            identities,
            reply: None,
        };
        self.report.changes.push(guard::RecordChange {
            connector: connector.to_string(),
            record: record.to_string(),
            subject: item.subject.clone(),
            from: link.memory.last_seen,
            to: fact.status,
            evidence: format!("{} {}", fact.origin(), bounded(&fact.evidence, 200)),
            event_at: fact.at,
        });
        self.enqueue(connector, item)
    }

    fn enqueue(&mut self, connector: &str, item: PushItem) -> TxResult<()> {
        let entry = OutboxEntry {
            version: self.tx.new_id()?,
            enqueued_at: self.now,
            not_before: self.now,
            attempts: 0,
            last_error: None,
            in_flight: false,
            item,
        };
        self.tx.put_outbox(connector, &entry.item.key, &entry)?;
        *self
            .report
            .enqueued
            .entry(connector.to_string())
            .or_default() += 1;
        Ok(())
    }

    fn event_pushes(
        &mut self,
        s: &SubjectRecord,
        scope: Scope,
        to: Decision,
        f: &Fact,
    ) -> TxResult<()> {
        let Some(status) = to.status() else {
            return Ok(());
        };
        let hooks: Vec<String> = self
            .engine
            .targets
            .iter()
            .filter(|(_, t)| **t == Takes::Events)
            .map(|(n, _)| n.clone())
            .collect();
        for hook in hooks {
            let item = PushItem {
                key: format!("{}:{}", subject_name(s.id), scope.as_str()),
                record: subject_name(s.id),
                status,
                scope,
                changed_at: f.at,
                source: f.origin(),
                subject: subject_name(s.id),
                identities: s
                    .aliases
                    .iter()
                    .map(|a| Alias::from_stored(a.clone()).to_identity())
                    .collect(),
                reply: None,
            };
            self.enqueue(&hook, item)?;
        }
        Ok(())
    }

    fn confirmation(
        &mut self,
        id: u64,
        f: &Fact,
        to: Identity,
        language: Option<String>,
    ) -> TxResult<()> {
        if self.engine.targets.get(self.connector) != Some(&Takes::Replies) {
            return Ok(());
        }
        let s = &self.subjects[&id];
        let window_ends = s.last_inbound.unwrap_or(f.at).plus(REPLY_WINDOW);
        let item = PushItem {
            key: format!("confirm:{}", f.record),
            record: f.record.clone(),
            status: f.status,
            scope: f.scope,
            changed_at: f.at,
            source: f.origin(),
            subject: subject_name(id),
            identities: vec![to.clone()],
            reply: Some(Reply {
                to,
                in_reply_to: f.record.clone(),
                window_ends,
                language,
                clarify: false,
            }),
        };
        let connector = self.connector.to_string();
        self.enqueue(&connector, item)
    }
}

fn count(tx: &Txn<'_>, scope: Scope, d: Decision, delta: i64) -> TxResult<()> {
    if d == Decision::Unknown {
        return Ok(());
    }
    tx.count(&format!("{}:{}", scope.as_str(), d.as_str()), delta)
}

fn fact_audit(kind: AuditKind, fact: &Fact, now: Timestamp) -> AuditEntry {
    let mut a = AuditEntry::new(kind, &fact.source, now);
    a.record = Some(fact.record.clone()).filter(|r| !r.is_empty());
    a.scope = Some(fact.scope);
    a.status = Some(fact.status);
    a.event_at = Some(fact.at);
    a.evidence = Some(format!(
        "{}: {}",
        fact.signal.as_str(),
        bounded(&fact.evidence, 500)
    ));
    a
}

/// The identity WhatsApp can deliver a reply to: the `wa_id`, else the BSUID.
fn reply_identity(ev: &ConsentEvent) -> Option<Identity> {
    let find = |f: fn(&Identity) -> bool| ev.identities.iter().find(|i| f(i)).cloned();
    find(|i| matches!(i, Identity::WaId(_))).or_else(|| find(|i| matches!(i, Identity::Bsuid(_))))
}

fn identity_text(i: &Identity) -> &str {
    match i {
        Identity::Phone(s) | Identity::WaId(s) | Identity::Bsuid(s) => s,
    }
}

/// Bounds untrusted text kept in the audit log (1 MB message bodies stay out of it).
fn bounded(s: &str, max_chars: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

mod changes;
mod marketing;
pub use marketing::outbox_key as marketing_key;
pub mod dry_run;
mod erasure;
pub mod guard;
pub mod templates;
pub use erasure::{ERASURE_SOURCE, EraseError, Erasure};
#[cfg(test)]
mod tests;
#[cfg(test)]
mod variant_tests;
#[cfg(test)]
mod words_tests;
