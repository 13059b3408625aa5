//! Holding, releasing and discarding opt-ins, against a real store.

use std::collections::BTreeMap;
use std::time::Duration;

use optout_core::{Observation, RecordSnapshot, Status, Takes, Timestamp};

use crate::holds::HoldSelection;
use crate::identity::Normalizer;
use crate::policy::{Decision, OptInGuard, PolicyConfig};
use crate::reconcile::Engine;

fn engine(dir: &std::path::Path) -> Engine {
    let policy = PolicyConfig {
        opt_in_guard: Some(OptInGuard {
            max: 2,
            per: Duration::from_secs(3600),
        }),
        ..PolicyConfig::default()
    };
    Engine::new(
        crate::store::testing::open(dir),
        policy,
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        BTreeMap::from([("hubspot".to_string(), Takes::Records)]),
    )
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_secs(1_700_000_000 + s)
}

fn phone(i: usize) -> String {
    format!("+1415555{:04}", 2600 + i)
}

fn page(n: usize, value: Status, at: i64) -> Vec<Observation> {
    (0..n)
        .map(|i| {
            Observation::Record(RecordSnapshot {
                record: format!("c{i}"),
                phones: vec![phone(i)],
                value: Some(value),
                marketing: None,
                changed_at: None,
                modified_at: t(at),
                evidence: format!("consent={value:?}"),
            })
        })
        .collect()
}

fn decision(e: &Engine, i: usize) -> Decision {
    let s = e.store().subject_by_alias(&format!("p:{}", phone(i)));
    s.unwrap().unwrap().consent.all.decide(e.policy().margin)
}

fn outbox(e: &Engine) -> BTreeMap<String, Status> {
    (e.store().outbox().flatten())
        .map(|(_, k, en)| (k, en.item.status))
        .collect()
}

#[test]
fn past_the_allowance_opt_ins_are_held_kept_across_a_restart_then_released_or_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("hubspot", &page(5, Status::OptedOut, 0), None, t(10))
        .unwrap();
    // A bulk edit re-enables all five: two pass, three are held, and their records are
    // set back to opted_out.
    let r = e
        .apply_page("hubspot", &page(5, Status::OptedIn, 100), None, t(110))
        .unwrap();
    assert_eq!(r.held.get("hubspot"), Some(&3), "{r:?}");
    assert_eq!(r.tripped, ["hubspot"]);
    let states: Vec<Decision> = (0..5).map(|i| decision(&e, i)).collect();
    use Decision::*;
    assert_eq!(states, [OptedIn, OptedIn, OptedOut, OptedOut, OptedOut]);
    let corrections = BTreeMap::from([
        ("c2".to_string(), Status::OptedOut),
        ("c3".to_string(), Status::OptedOut),
        ("c4".to_string(), Status::OptedOut),
    ]);
    assert_eq!(outbox(&e), corrections);

    // A restart forgets nothing: the held count keeps the source held.
    drop(e);
    let e = engine(dir.path());
    let holds = e.holds(&HoldSelection::default()).unwrap();
    assert_eq!(holds.len(), 3);
    let w = e.store().guard_windows().unwrap();
    assert_eq!((w[0].1.current, w[0].1.held), (2, 3), "{w:?}");

    // Release one (applied as of its event time), discard the rest.
    let one = HoldSelection {
        source: None,
        ids: vec![format!("h{}", holds[0].id)],
    };
    let (n, report) = e.resolve_holds(&one, true, t(200), |_| {}).unwrap();
    assert_eq!((n, report.decisions.len()), (1, 1));
    assert_eq!(decision(&e, 2), OptedIn);
    assert_eq!(outbox(&e).get("c2"), Some(&Status::OptedIn));
    let all = HoldSelection {
        source: Some("hubspot".into()),
        ids: Vec::new(),
    };
    let (n, report) = e.resolve_holds(&all, false, t(210), |_| {}).unwrap();
    assert_eq!((n, report.decisions.len()), (2, 0));
    assert_eq!((decision(&e, 3), decision(&e, 4)), (OptedOut, OptedOut));
    assert!(e.holds(&HoldSelection::default()).unwrap().is_empty());
    assert_eq!(e.store().guard_windows().unwrap()[0].1.held, 0);
}

#[test]
fn a_released_opt_in_loses_to_a_newer_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("hubspot", &page(3, Status::OptedOut, 0), None, t(10))
        .unwrap();
    e.apply_page("hubspot", &page(3, Status::OptedIn, 100), None, t(110))
        .unwrap();
    assert_eq!(decision(&e, 2), Decision::OptedOut);
    // The person says STOP again after the bad edit.
    let stop = Observation::Event(optout_core::ConsentEvent {
        identities: vec![optout_core::Identity::Phone(phone(2))],
        status: Some(Status::OptedOut),
        signal: optout_core::Signal::Keyword,
        at: t(300),
        inbound: true,
        message_id: Some("wamid.1".into()),
        evidence: "STOP".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    });
    e.apply_page("whatsapp", &[stop], None, t(310)).unwrap();
    let (n, _) = e
        .resolve_holds(&HoldSelection::default(), true, t(400), |_| {})
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(decision(&e, 2), Decision::OptedOut);
}

#[test]
fn a_dry_run_decides_a_page_and_keeps_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page("hubspot", &page(2, Status::OptedOut, 0), None, t(10))
        .unwrap();
    let audit_before = e.store().audit_from(0).count();
    let r = e
        .rehearse_page("hubspot", &page(4, Status::OptedIn, 100), t(110))
        .unwrap();
    assert_eq!(r.decisions.len(), 2, "{r:?}");
    assert_eq!(e.store().audit_from(0).count(), audit_before);
    assert!(outbox(&e).is_empty());
    assert_eq!(decision(&e, 0), Decision::OptedOut);
    assert!(
        e.store()
            .subject_by_alias(&format!("p:{}", phone(3)))
            .unwrap()
            .is_none()
    );
    assert!(e.store().guard_windows().unwrap().is_empty());
}
