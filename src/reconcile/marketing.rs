//! The marketing-consent field a CRM record may carry beside its consent field (HubSpot's
//! `marketing_property`, Salesforce's `marketing_field`): it holds the `marketing`
//! decision, and an `all` opt-out sets it too.
//!
//! It is kept exactly like the consent field, only apart from it: its own memory in the
//! link (`LinkRecord::marketing`: last seen, last pushed, read-back), its own outbox key
//! ([`outbox_key`]) so the two fields' pushes never replace each other, its own
//! unverified entry, and its own judgement. An agent's edit of it is a `marketing`-scope
//! fact; the value the daemon wrote is an echo. Only connectors whose settings declare the
//! field (`Settings::marketing_field`) are pushed marketing items.

use std::time::Duration;

use optout_core::{Identity, PushItem, RecordSnapshot, Scope, Timestamp};

use super::{PageTx, subject_name};
use crate::policy::{self, Judgement, RecordMemory};
use crate::store::{LinkRecord, TxResult, Txn};

/// The outbox (and unverified) key of a record's marketing field: distinct from the
/// record's own key, so a pending consent push and a pending marketing push coexist.
pub fn outbox_key(record: &str) -> String {
    format!("{record}#marketing")
}

/// Records a done marketing push in the link, as a done consent push is recorded.
pub(super) fn pushed(
    tx: &Txn<'_>,
    connector: &str,
    link: &mut LinkRecord,
    item: &PushItem,
    now: Timestamp,
) -> TxResult<()> {
    link.marketing.memory.last_pushed = Some((item.status, item.changed_at));
    link.marketing.pushed_at = Some(now);
    link.marketing.awaiting_readback = true;
    tx.set_unverified(connector, &outbox_key(&item.record), Some(now))
}

impl PageTx<'_, '_, '_> {
    /// Whether this page's connector keeps a marketing field on its records.
    fn has_marketing_field(&self, connector: &str) -> bool {
        self.engine.marketing_fields.contains(connector)
    }

    /// Judges a read record's marketing field for its subjects `ids`, and settles a
    /// marketing push of ours the read reflects. `link` is written back by the caller.
    pub(super) fn marketing_record(
        &mut self,
        snap: &RecordSnapshot,
        ids: &[u64],
        link: &mut LinkRecord,
        known: bool,
    ) -> TxResult<()> {
        if !self.has_marketing_field(self.connector) {
            return Ok(());
        }
        let pending = (self.tx)
            .outbox(self.connector, &outbox_key(&snap.record))?
            .map(|e| e.item.status);
        let memory = (known || pending.is_some()).then_some(RecordMemory {
            pending,
            ..link.marketing.memory
        });
        // The field has no change-time companion: the record's modification time dates an
        // edit of it.
        let view = RecordSnapshot {
            value: snap.marketing,
            changed_at: None,
            ..snap.clone()
        };
        let judgement = policy::judge_record(
            memory.as_ref(),
            &view,
            self.connector,
            self.now,
            &self.engine.policy,
        );
        match as_marketing(judgement) {
            Judgement::Fact(fact) => {
                let aliases: Vec<_> = (link.phones.iter())
                    .map(|p| crate::identity::Alias::from_stored(format!("p:{p}")))
                    .collect();
                self.reach_variants(&aliases, ids, &fact)?;
                self.apply_record_judgement(Judgement::Fact(fact), &view, ids)?;
            }
            // Not an act, and already counted for the consent field's read.
            Judgement::InitialOptIn | Judgement::Unchanged | Judgement::NoConsentValue => {}
            other => self.apply_record_judgement(other, &view, ids)?,
        }
        self.settle_marketing_readback(snap, link)?;
        link.marketing.memory.last_seen = snap.marketing;
        Ok(())
    }

    /// Verification of a marketing push, as `settle_readback` does for the consent field.
    fn settle_marketing_readback(
        &mut self,
        snap: &RecordSnapshot,
        link: &mut LinkRecord,
    ) -> TxResult<()> {
        let m = &mut link.marketing;
        let after_push = m
            .pushed_at
            .is_none_or(|p| snap.modified_at >= p.minus(Duration::from_secs(1)));
        if !(m.awaiting_readback && after_push) {
            return Ok(());
        }
        if snap.marketing == m.memory.last_pushed.map(|(s, _)| s)
            && let Some(p) = m.pushed_at
        {
            (self.report.verified).push((
                self.connector.to_string(),
                snap.record.clone(),
                self.now.since(p),
            ));
        }
        m.awaiting_readback = false;
        (self.tx).set_unverified(self.connector, &outbox_key(&snap.record), None)
    }

    /// Enqueues a marketing push if the record's known marketing value differs from what
    /// its subjects' decisions require.
    pub(super) fn marketing_push(&mut self, connector: &str, record: &str) -> TxResult<()> {
        if !self.has_marketing_field(connector) {
            return Ok(());
        }
        let Some((link, consents)) = self.record_consents(connector, record)? else {
            return Ok(());
        };
        let Some(fact) = policy::desired_marketing_value(consents.iter(), self.margin()) else {
            return Ok(());
        };
        let key = outbox_key(record);
        let pending = self.tx.outbox(connector, &key)?;
        if pending
            .as_ref()
            .is_some_and(|p| p.item.status == fact.status)
        {
            return Ok(());
        }
        let m = &link.marketing;
        let last_pushed = m.memory.last_pushed.map(|(s, _)| s);
        // A record that shows no value after we wrote this one (an object without the
        // field) would only be written again and again.
        let settled = m.memory.last_seen == Some(fact.status)
            || (last_pushed == Some(fact.status)
                && (m.awaiting_readback || m.memory.last_seen.is_none()));
        if pending.is_none() && settled {
            return Ok(());
        }
        let item = PushItem {
            key,
            record: record.to_string(),
            status: fact.status,
            scope: Scope::Marketing,
            changed_at: fact.at,
            source: fact.origin(),
            subject: (link.subjects.iter())
                .map(|&i| subject_name(i))
                .collect::<Vec<_>>()
                .join(","),
            identities: (link.phones.iter())
                .map(|p| Identity::Phone(p.clone()))
                .collect(),
            reply: None,
        };
        self.enqueue(connector, item)
    }
}

/// A judgement of the marketing field: its facts are of scope `marketing`, whatever scope
/// the consent field's reads are configured to.
fn as_marketing(j: Judgement) -> Judgement {
    let scoped = |mut f: policy::Fact| {
        f.scope = Scope::Marketing;
        f
    };
    match j {
        Judgement::Fact(f) => Judgement::Fact(scoped(f)),
        Judgement::NotAccepted(f, why) => Judgement::NotAccepted(scoped(f), why),
        Judgement::Refused(f, why) => Judgement::Refused(scoped(f), why),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use optout_core::{ConsentEvent, Observation, PushOutcome, Signal, Status, Takes, Timestamp};

    use super::*;
    use crate::identity::Normalizer;
    use crate::policy::{Decision, PolicyConfig};
    use crate::reconcile::Engine;

    const HUBSPOT: &str = "hubspot";
    const SALESFORCE: &str = "salesforce";
    const WHATSAPP: &str = "whatsapp";

    /// HubSpot keeps a marketing field, Salesforce does not.
    fn engine(dir: &std::path::Path) -> Engine {
        let targets = BTreeMap::from([
            (HUBSPOT.to_string(), Takes::Records),
            (SALESFORCE.to_string(), Takes::Records),
            (WHATSAPP.to_string(), Takes::Nothing),
        ]);
        Engine::new(
            crate::store::testing::open(dir),
            PolicyConfig::default(),
            Normalizer::new(Normalizer::parse_region("US").unwrap()),
            targets,
        )
        .with_marketing_fields(BTreeSet::from([HUBSPOT.to_string()]))
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs(1_700_000_000 + s)
    }

    fn event(id: &str, status: Status, signal: Signal, at: i64) -> Observation {
        Observation::Event(ConsentEvent {
            identities: vec![optout_core::Identity::WaId("14155552671".into())],
            status: Some(status),
            signal,
            at: t(at),
            inbound: signal == Signal::Keyword,
            message_id: Some(id.into()),
            evidence: signal.as_str().into(),
            language: None,
            scope: None,
            possible_opt_out: false,
        })
    }

    fn contact(id: &str, value: Option<Status>, marketing: Option<Status>, at: i64) -> Observation {
        Observation::Record(RecordSnapshot {
            record: id.into(),
            phones: vec!["+1 415 555 2671".into()],
            value,
            marketing,
            changed_at: None,
            modified_at: t(at),
            evidence: format!("consent={value:?} marketing={marketing:?}"),
        })
    }

    fn pending(e: &Engine, c: &str) -> Vec<(String, Scope, Status)> {
        (e.store().due_pushes(c, Timestamp(i64::MAX), 100).unwrap())
            .into_iter()
            .map(|(k, en)| (k, en.item.scope, en.item.status))
            .collect()
    }

    fn all_done(e: &Engine, c: &str, now: Timestamp) {
        let results: Vec<_> = (e.store().due_pushes(c, Timestamp(i64::MAX), 100).unwrap())
            .into_iter()
            .map(|(k, en)| (k, en.version, PushOutcome::Done))
            .collect();
        e.complete_pushes(c, &results, Duration::from_secs(1), now)
            .unwrap();
    }

    fn decisions(e: &Engine) -> [(Scope, Decision); 2] {
        let s = (e.store().subject_by_alias("p:+14155552671").unwrap()).unwrap();
        s.consent.decisions(Duration::from_secs(5))
    }

    #[test]
    fn a_marketing_stop_sets_the_marketing_field_only_and_its_echo_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.apply_page(HUBSPOT, &[contact("101", None, None, 1)], None, t(2))
            .unwrap();
        e.apply_page(
            SALESFORCE,
            &[contact("Contact/003A", None, None, 1)],
            None,
            t(2),
        )
        .unwrap();
        let stop = event("wamid.1", Status::OptedOut, Signal::MarketingPreference, 10);
        e.apply_page(WHATSAPP, &[stop], None, t(11)).unwrap();
        assert_eq!(
            pending(&e, HUBSPOT),
            [("101#marketing".into(), Scope::Marketing, Status::OptedOut)]
        );
        assert!(
            pending(&e, SALESFORCE).is_empty(),
            "no marketing field there"
        );
        all_done(&e, HUBSPOT, t(12));
        assert_eq!(e.store().unverified().count(), 1);
        let r = e
            .apply_page(
                HUBSPOT,
                &[contact("101", None, Some(Status::OptedOut), 12)],
                None,
                t(13),
            )
            .unwrap();
        assert_eq!(r.results.get("echo"), Some(&1), "{:?}", r.results);
        assert!(r.decisions.is_empty());
        assert_eq!(r.verified.len(), 1);
        assert_eq!(e.store().unverified().count(), 0);
        assert!(pending(&e, HUBSPOT).is_empty());
        assert_eq!(decisions(&e)[0], (Scope::All, Decision::Unknown));
    }

    #[test]
    fn an_agents_edit_of_the_marketing_field_is_a_marketing_fact() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let first = contact("101", Some(Status::OptedIn), Some(Status::OptedIn), 1);
        let r = e.apply_page(HUBSPOT, &[first], None, t(2)).unwrap();
        assert!(r.decisions.is_empty(), "a first opt-in is no act");
        let edited = contact("101", Some(Status::OptedIn), Some(Status::OptedOut), 20);
        let r = e.apply_page(HUBSPOT, &[edited], None, t(21)).unwrap();
        assert_eq!(r.decisions.len(), 1);
        assert_eq!(
            (r.decisions[0].scope, r.decisions[0].to),
            (Scope::Marketing, Decision::OptedOut)
        );
        assert_eq!(
            decisions(&e),
            [
                (Scope::All, Decision::Unknown),
                (Scope::Marketing, Decision::OptedOut)
            ]
        );
        assert!(
            pending(&e, HUBSPOT).is_empty(),
            "the field holds the decision already; the consent field is left alone"
        );
    }

    #[test]
    fn stop_all_sets_both_fields_and_start_gives_marketing_back() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.apply_page(HUBSPOT, &[contact("101", None, None, 1)], None, t(2))
            .unwrap();
        let stop = event("wamid.1", Status::OptedOut, Signal::Keyword, 10);
        e.apply_page(WHATSAPP, &[stop], None, t(11)).unwrap();
        assert_eq!(
            pending(&e, HUBSPOT),
            [
                ("101".into(), Scope::All, Status::OptedOut),
                ("101#marketing".into(), Scope::Marketing, Status::OptedOut)
            ]
        );
        all_done(&e, HUBSPOT, t(12));
        let out = Some(Status::OptedOut);
        e.apply_page(HUBSPOT, &[contact("101", out, out, 12)], None, t(13))
            .unwrap();
        let start = event("wamid.2", Status::OptedIn, Signal::Keyword, 100);
        e.apply_page(WHATSAPP, &[start], None, t(101)).unwrap();
        assert_eq!(
            pending(&e, HUBSPOT),
            [
                ("101".into(), Scope::All, Status::OptedIn),
                ("101#marketing".into(), Scope::Marketing, Status::OptedIn)
            ]
        );
    }

    #[test]
    fn a_rejected_marketing_push_is_its_own_dead_letter_and_leaves_the_consent_push() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.apply_page(HUBSPOT, &[contact("101", None, None, 1)], None, t(2))
            .unwrap();
        let stop = event("wamid.1", Status::OptedOut, Signal::Keyword, 10);
        e.apply_page(WHATSAPP, &[stop], None, t(11)).unwrap();
        let key = outbox_key("101");
        let version = (e.store().outbox_entry(HUBSPOT, &key).unwrap())
            .unwrap()
            .version;
        let refused = PushOutcome::Rejected {
            reason: "VALIDATION_ERROR".into(),
        };
        let r = e
            .complete_pushes(
                HUBSPOT,
                &[(key.clone(), version, refused)],
                Duration::from_secs(1),
                t(12),
            )
            .unwrap();
        assert_eq!(r.rejected.len(), 1);
        assert!(e.store().dead_letter(HUBSPOT, &key).unwrap().is_some());
        assert!(e.store().dead_letter(HUBSPOT, "101").unwrap().is_none());
        assert_eq!(
            pending(&e, HUBSPOT),
            [("101".into(), Scope::All, Status::OptedOut)],
            "the consent push is still due"
        );
        assert_eq!(e.retry_dead_letters(Some(HUBSPOT), t(13)).unwrap(), 1);
        assert_eq!(pending(&e, HUBSPOT).len(), 2);
    }

    #[test]
    fn an_object_that_shows_no_marketing_value_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.apply_page(HUBSPOT, &[contact("101", None, None, 1)], None, t(2))
            .unwrap();
        let stop = event(
            "wamid.1",
            Status::OptedOut,
            Signal::MarketingSendFailure,
            10,
        );
        e.apply_page(WHATSAPP, &[stop], None, t(11)).unwrap();
        all_done(&e, HUBSPOT, t(12));
        for at in [12, 40] {
            e.apply_page(HUBSPOT, &[contact("101", None, None, at)], None, t(at + 1))
                .unwrap();
            assert!(pending(&e, HUBSPOT).is_empty());
        }
    }
}
