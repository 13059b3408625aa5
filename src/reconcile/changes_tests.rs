//! Identity changes against a real store in a temporary directory.

use std::collections::BTreeMap;

use optout_core::{
    ChangeKind, ConsentEvent, Identity, IdentityChange, Observation, RecordSnapshot, Scope, Signal,
    Status, Takes, Timestamp,
};

use crate::identity::Normalizer;
use crate::policy::{Decision, PolicyConfig};
use crate::reconcile::Engine;

const WA: &str = "whatsapp";
const CRM: &str = "hubspot";

fn engine(dir: &std::path::Path) -> Engine {
    let targets = BTreeMap::from([
        (CRM.to_string(), Takes::Records),
        (WA.to_string(), Takes::Replies),
    ]);
    Engine::new(
        crate::store::testing::open(dir),
        PolicyConfig::default(),
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        targets,
    )
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_secs(1_700_000_000 + s)
}

fn said(id: &str, who: Identity, status: Status, at: i64) -> Observation {
    Observation::Event(ConsentEvent {
        identities: vec![who],
        status: Some(status),
        signal: Signal::Keyword,
        at: t(at),
        inbound: true,
        message_id: Some(id.into()),
        evidence: "keyword".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    })
}

fn change(id: &str, kind: ChangeKind, from: Vec<Identity>, to: Identity, at: i64) -> Observation {
    Observation::IdentityChange(IdentityChange {
        kind,
        from,
        to: vec![to],
        at: t(at),
        message_id: Some(id.into()),
    })
}

fn decision(e: &Engine, alias: &str) -> Decision {
    match e.store().subject_by_alias(alias).unwrap() {
        Some(s) => s.consent.decide(Scope::All, e.policy().margin),
        None => Decision::Unknown,
    }
}

fn wa(d: &str) -> Identity {
    Identity::WaId(d.into())
}

#[test]
fn a_number_change_copies_the_opt_out_and_the_old_number_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let record = Observation::Record(RecordSnapshot {
        record: "201".into(),
        phones: vec!["+1 212 555 0100".into()],
        value: Some(Status::OptedIn),
        marketing: None,
        changed_at: None,
        modified_at: t(1),
        evidence: "consent=opted_in".into(),
    });
    e.apply_page(CRM, &[record], None, t(2)).unwrap();
    let stop = said("m1", wa("14155552671"), Status::OptedOut, 10);
    e.apply_page(WA, &[stop], None, t(11)).unwrap();
    let moved = change(
        "m2",
        ChangeKind::Number,
        vec![wa("14155552671")],
        wa("12125550100"),
        20,
    );
    let r = e
        .apply_page(WA, std::slice::from_ref(&moved), None, t(21))
        .unwrap();
    assert_eq!(r.results.get("number_changed"), Some(&1));
    assert_eq!(decision(&e, "p:+12125550100"), Decision::OptedOut);
    assert_eq!(decision(&e, "p:+14155552671"), Decision::OptedOut);
    let old = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    let new = e
        .store()
        .subject_by_alias("p:+12125550100")
        .unwrap()
        .unwrap();
    assert_ne!(
        old.id, new.id,
        "the numbers stay separate: the old may be reassigned"
    );
    let due = e.store().due_pushes(CRM, Timestamp(i64::MAX), 10).unwrap();
    assert_eq!(due.len(), 1, "the new number's record is corrected");
    assert_eq!(due[0].1.item.status, Status::OptedOut);
    let again = e.apply_page(WA, &[moved], None, t(22)).unwrap();
    assert_eq!(again.results.get("duplicate"), Some(&1));
}

#[test]
fn a_number_change_does_not_copy_an_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let start = said("m1", wa("14155552671"), Status::OptedIn, 10);
    let moved = change(
        "m2",
        ChangeKind::Number,
        vec![wa("14155552671")],
        wa("12125550100"),
        20,
    );
    e.apply_page(WA, &[start, moved], None, t(21)).unwrap();
    assert_eq!(decision(&e, "p:+14155552671"), Decision::OptedIn);
    assert_eq!(decision(&e, "p:+12125550100"), Decision::Unknown);
}

#[test]
fn a_user_id_change_links_the_old_and_new_ids() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let stop = said("m1", Identity::Bsuid("US.111".into()), Status::OptedOut, 10);
    let renamed = change(
        "m2",
        ChangeKind::UserId,
        vec![Identity::Bsuid("US.111".into())],
        Identity::Bsuid("US.222".into()),
        20,
    );
    e.apply_page(WA, &[stop, renamed], None, t(21)).unwrap();
    assert_eq!(decision(&e, "b:US.222"), Decision::OptedOut);
    let a = e.store().subject_by_alias("b:US.111").unwrap().unwrap();
    let b = e.store().subject_by_alias("b:US.222").unwrap().unwrap();
    assert_eq!(a.id, b.id);
}

#[test]
fn the_business_scoped_id_follows_the_person_to_the_new_number() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let hello = Observation::Event(ConsentEvent {
        identities: vec![wa("14155552671"), Identity::Bsuid("US.9".into())],
        status: Some(Status::OptedOut),
        signal: Signal::Keyword,
        at: t(10),
        inbound: true,
        message_id: Some("m1".into()),
        evidence: "STOP".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    });
    let moved = change(
        "m2",
        ChangeKind::Number,
        vec![wa("14155552671")],
        wa("12125550100"),
        20,
    );
    e.apply_page(WA, &[hello, moved], None, t(21)).unwrap();
    let new = e
        .store()
        .subject_by_alias("p:+12125550100")
        .unwrap()
        .unwrap();
    let by_id = e.store().subject_by_alias("b:US.9").unwrap().unwrap();
    assert_eq!(new.id, by_id.id);
    let old = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert!(!old.aliases.iter().any(|a| a.starts_with("b:")));
}

fn record(id: &str, phone: &str, value: Option<Status>, modified: i64) -> Observation {
    Observation::Record(RecordSnapshot {
        record: id.into(),
        phones: vec![phone.into()],
        value,
        marketing: None,
        changed_at: None,
        modified_at: t(modified),
        evidence: format!("consent={value:?}"),
    })
}

/// A record whose phone field is edited follows its new number: the old number's subject
/// lets go of it, and the new number's decision corrects its value.
#[test]
fn a_crm_phone_edit_relinks_the_record_to_the_new_number() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let start = said("m1", wa("12125550100"), Status::OptedIn, 5);
    let stop = said("m2", wa("14155552671"), Status::OptedOut, 10);
    e.apply_page(WA, &[start, stop], None, t(11)).unwrap();
    e.apply_page(
        CRM,
        &[record("301", "+1 415 555 2671", None, 12)],
        None,
        t(13),
    )
    .unwrap();
    let due = e.store().due_pushes(CRM, Timestamp(i64::MAX), 10).unwrap();
    assert_eq!(due[0].1.item.status, Status::OptedOut);
    let done: Vec<_> = due
        .into_iter()
        .map(|(k, en)| (k, en.version, optout_core::PushOutcome::Done))
        .collect();
    e.complete_pushes(CRM, &done, std::time::Duration::from_secs(1), t(14))
        .unwrap();
    let read = record("301", "+1 415 555 2671", Some(Status::OptedOut), 15);
    e.apply_page(CRM, &[read], None, t(16)).unwrap();
    assert!(
        e.store()
            .due_pushes(CRM, Timestamp(i64::MAX), 10)
            .unwrap()
            .is_empty()
    );

    let edited = record("301", "+1 212 555 0100", Some(Status::OptedOut), 30);
    e.apply_page(CRM, &[edited], None, t(31)).unwrap();
    let due = e.store().due_pushes(CRM, Timestamp(i64::MAX), 10).unwrap();
    assert_eq!(
        due.len(),
        1,
        "the record is corrected to the new number's decision"
    );
    assert_eq!(due[0].1.item.status, Status::OptedIn);
    let old = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert!(
        old.links.is_empty(),
        "the old number no longer drives the record"
    );
    let link = e.store().link(CRM, "301").unwrap().unwrap();
    assert_eq!(link.phones, vec!["+12125550100".to_string()]);
    assert_eq!(decision(&e, "p:+14155552671"), Decision::OptedOut);
}

/// The same business-scoped user id from two portfolios names two people: one's STOP
/// does not reach the other.
#[test]
fn ids_of_two_portfolios_never_merge() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path()).with_id_namespaces(BTreeMap::from([(
        "wa-b".to_string(),
        "brand-b".to_string(),
    )]));
    let id = || Identity::Bsuid("US.777".into());
    e.apply_page(WA, &[said("m1", id(), Status::OptedOut, 10)], None, t(11))
        .unwrap();
    e.apply_page(
        "wa-b",
        &[said("m1", id(), Status::OptedIn, 12)],
        None,
        t(13),
    )
    .unwrap();
    assert_eq!(decision(&e, "b:US.777"), Decision::OptedOut);
    assert_eq!(decision(&e, "b:brand-b/US.777"), Decision::OptedIn);
}
