//! Erasure against a real store: what goes, what stays, and a tombstone met again.

use std::collections::BTreeMap;
use std::time::Duration;

use optout_core::{ConsentEvent, Identity, Observation, PushOutcome, RecordSnapshot, Takes};

use super::*;
use crate::identity::Normalizer;
use crate::policy::PolicyConfig;

const TEXT: &str = "STOP sending me these please";

fn engine(dir: &std::path::Path) -> Engine {
    let targets = BTreeMap::from([
        ("hubspot".to_string(), Takes::Records),
        ("whatsapp".to_string(), Takes::Replies),
        ("hook".to_string(), Takes::Events),
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

fn stop(at: i64) -> Observation {
    Observation::Event(ConsentEvent {
        identities: vec![Identity::WaId("14155552671".into())],
        status: Some(Status::OptedOut),
        signal: Signal::Keyword,
        at: t(at),
        inbound: true,
        message_id: Some(format!("wamid.{at}")),
        evidence: TEXT.into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    })
}

fn contact(id: &str, value: Status, modified: i64) -> Observation {
    Observation::Record(RecordSnapshot {
        record: id.into(),
        phones: vec!["+1 (415) 555-2671".into()],
        value: Some(value),
        marketing: None,
        changed_at: None,
        modified_at: t(modified),
        evidence: format!("whatsapp_consent={}", value.as_str()),
    })
}

/// Every audit entry, as JSON text.
fn audit_text(e: &Engine) -> String {
    (e.store().audit_from(0))
        .map(|a| serde_json::to_string(&a.unwrap()).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn done_all(e: &Engine, connector: &str, now: Timestamp) {
    let due = e
        .store()
        .due_pushes(connector, Timestamp(i64::MAX), 100)
        .unwrap();
    let results: Vec<_> = (due.into_iter())
        .map(|(k, en)| (k, en.version, PushOutcome::Done))
        .collect();
    e.complete_pushes(connector, &results, Duration::from_secs(1), now)
        .unwrap();
}

#[test]
fn erasure_removes_the_person_and_keeps_the_suppression() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("hubspot", &[contact("501", Status::OptedIn, 1)], None, t(2))
        .unwrap();
    e.apply_page("whatsapp", &[stop(10)], None, t(11)).unwrap();
    done_all(&e, "hubspot", t(12));
    let before = audit_text(&e);
    // The record id as a JSON string: bare, "501" can occur in a tombstone's hex hash.
    assert!(before.contains(TEXT) && before.contains(r#""501""#));
    let sid = subject_name(
        e.store()
            .subject_by_alias("p:+14155552671")
            .unwrap()
            .unwrap()
            .id,
    );

    let done = e.erase("+1 415 555 2671", "operator", t(20)).unwrap();
    assert!(done.suppressed && !done.already_erased, "{done:?}");
    assert_eq!(done.subject.as_ref(), Some(&sid));
    // w:, p: — one tombstone per identity.
    assert_eq!(done.tombstones.len(), 2);
    assert_eq!(done.records_forgotten, 1);
    assert!(done.pushes_dropped >= 1, "the automation event: {done:?}");
    assert!(
        e.store()
            .subject_by_alias("p:+14155552671")
            .unwrap()
            .is_none()
    );
    assert!(e.store().link("hubspot", "501").unwrap().is_none());
    assert_eq!(e.store().outbox().count(), 0);
    let after = audit_text(&e);
    for trace in [TEXT, r#""501""#, "14155552671", "wamid.10"] {
        assert!(
            !after.contains(trace),
            "`{trace}` left in the audit log:\n{after}"
        );
    }
    // Decisions stay, and the erasure is an entry of its own, without personal data.
    assert!(after.contains(r#""kind":"decision""#));
    let erased: Vec<_> = (e.store().audit_from(0).map(Result::unwrap))
        .filter(|a| a.kind == AuditKind::Erased)
        .collect();
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].subject.as_ref(), Some(&sid));
    assert!(e.store().compaction_pending().unwrap());

    // Erasing again: nothing left, the earlier erasure reported.
    let again = e.erase("wa:14155552671", "operator", t(30)).unwrap();
    assert!(again.already_erased && again.suppressed);
    assert_eq!(again.erased_at, Some(t(20)));
}

#[test]
fn a_record_with_an_erased_number_is_corrected_and_a_later_opt_in_still_counts() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("whatsapp", &[stop(10)], None, t(11)).unwrap();
    e.erase("+14155552671", "operator", t(20)).unwrap();
    // A new CRM record carries the number as opted in: the tombstone suppresses it.
    let r = (e.apply_page(
        "hubspot",
        &[contact("777", Status::OptedIn, 30)],
        None,
        t(31),
    ))
    .unwrap();
    assert_eq!(r.results.get("tombstone"), Some(&1), "{r:?}");
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert_eq!(
        s.consent.decide(Scope::All, Duration::from_secs(5)),
        Decision::OptedOut
    );
    let due = e
        .store()
        .due_pushes("hubspot", Timestamp(i64::MAX), 10)
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1.item.status, Status::OptedOut);
    assert_eq!(due[0].1.item.source, "erasure:erasure");
    // The tombstone's opt-out is as of the erasure: a clearly later opt-in (START) wins.
    let start = Observation::Event(ConsentEvent {
        status: Some(Status::OptedIn),
        evidence: "START".into(),
        message_id: Some("wamid.start".into()),
        ..match stop(60) {
            Observation::Event(ev) => ev,
            _ => unreachable!(),
        }
    });
    e.apply_page("whatsapp", &[start], None, t(61)).unwrap();
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert_eq!(
        s.consent.decide(Scope::All, Duration::from_secs(5)),
        Decision::OptedIn
    );
}

#[test]
fn a_person_never_opted_out_is_erased_without_suppression() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("hubspot", &[contact("501", Status::OptedIn, 1)], None, t(2))
        .unwrap();
    let done = e.erase("4155552671", "operator", t(5)).unwrap();
    assert!(!done.suppressed, "{done:?}");
    e.apply_page(
        "hubspot",
        &[contact("502", Status::OptedIn, 10)],
        None,
        t(11),
    )
    .unwrap();
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert_eq!(
        s.consent.decide(Scope::All, Duration::from_secs(5)),
        Decision::Unknown
    );
    // Unknown ids and bad ids.
    assert_eq!(
        e.erase("+12125550100", "operator", t(20)).unwrap(),
        Erasure::default()
    );
    assert!(matches!(
        e.erase("not a number", "operator", t(20)),
        Err(EraseError::BadId(..))
    ));
}

#[test]
fn erasure_drops_the_persons_held_opt_ins() {
    let dir = tempfile::tempdir().unwrap();
    let policy = PolicyConfig {
        opt_in_guard: Some(crate::policy::OptInGuard {
            max: 1,
            per: Duration::from_secs(3600),
        }),
        ..PolicyConfig::default()
    };
    let e = Engine::new(
        crate::store::testing::open(dir.path()),
        policy,
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        BTreeMap::from([("hubspot".to_string(), Takes::Records)]),
    );
    let other = |at| {
        Observation::Record(RecordSnapshot {
            record: "c2".into(),
            phones: vec!["+1 212 555 0100".into()],
            value: Some(Status::OptedIn),
            marketing: None,
            changed_at: None,
            modified_at: t(at),
            evidence: "whatsapp_consent=opted_in".into(),
        })
    };
    let out = |id: &str, phone: &str| {
        Observation::Record(RecordSnapshot {
            record: id.into(),
            phones: vec![phone.into()],
            value: Some(Status::OptedOut),
            marketing: None,
            changed_at: None,
            modified_at: t(1),
            evidence: "whatsapp_consent=opted_out".into(),
        })
    };
    let seed = [out("c1", "+1 (415) 555-2671"), out("c2", "+1 212 555 0100")];
    e.apply_page("hubspot", &seed, None, t(2)).unwrap();
    // The other person's opt-in passes the guard (max 1); ours is held.
    e.apply_page("hubspot", &[other(50)], None, t(51)).unwrap();
    e.apply_page(
        "hubspot",
        &[contact("c1", Status::OptedIn, 60)],
        None,
        t(61),
    )
    .unwrap();
    let held = e.holds(&crate::holds::HoldSelection::default()).unwrap();
    assert_eq!(held.len(), 1, "{held:?}");

    let done = e.erase("+14155552671", "operator", t(100)).unwrap();
    assert_eq!(done.holds_dropped, 1);
    assert!(
        (e.holds(&crate::holds::HoldSelection::default()).unwrap()).is_empty(),
        "a hold carries the record and its evidence"
    );
}
