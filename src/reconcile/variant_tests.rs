//! Country rules in reconciliation: suppress-only variants and unreadable numbers.

use super::*;

const HUBSPOT: &str = "hubspot";

fn engine(dir: &std::path::Path) -> Engine {
    let targets = BTreeMap::from([(HUBSPOT.to_string(), Takes::Records)]);
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

fn contact(id: &str, phones: &[&str], value: Option<Status>, changed: i64) -> Observation {
    Observation::Record(RecordSnapshot {
        record: id.into(),
        phones: phones.iter().map(|p| p.to_string()).collect(),
        value,
        marketing: None,
        changed_at: Some(t(changed)),
        modified_at: t(changed),
        evidence: format!("consent={value:?}"),
    })
}

fn pushed(e: &Engine) -> BTreeMap<String, Status> {
    e.store()
        .due_pushes(HUBSPOT, Timestamp(i64::MAX), 100)
        .unwrap()
        .into_iter()
        .map(|(k, en)| (k, en.item.status))
        .collect()
}

#[test]
fn a_crm_opt_out_reaches_the_suppress_only_variant_and_an_opt_in_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let first = [
        contact("mobile", &["+54 9 11 2345-6789"], None, 1),
        contact("landline", &["+54 11 2345-6789"], None, 1),
    ];
    e.apply_page(HUBSPOT, &first, None, t(2)).unwrap();
    assert!(pushed(&e).is_empty());

    // An agent opts the landline form out: the mobile form is suppressed too.
    let out = [contact(
        "landline",
        &["+54 11 2345-6789"],
        Some(Status::OptedOut),
        10,
    )];
    let r = e.apply_page(HUBSPOT, &out, None, t(11)).unwrap();
    assert_eq!(r.results.get("accepted_variant"), Some(&1), "{r:?}");
    assert_eq!(
        pushed(&e),
        BTreeMap::from([("mobile".to_string(), Status::OptedOut)])
    );
    let ok: Vec<_> = (e
        .store()
        .due_pushes(HUBSPOT, Timestamp(i64::MAX), 100)
        .unwrap())
    .into_iter()
    .map(|(k, en)| (k, en.version, PushOutcome::Done))
    .collect();
    e.complete_pushes(HUBSPOT, &ok, Duration::from_secs(1), t(12))
        .unwrap();
    let echo = [contact(
        "mobile",
        &["+54 9 11 2345-6789"],
        Some(Status::OptedOut),
        12,
    )];
    e.apply_page(HUBSPOT, &echo, None, t(13)).unwrap();

    // Much later the mobile's owner opts in on the mobile record: the landline stays out.
    let back = [contact(
        "mobile",
        &["+54 9 11 2345-6789"],
        Some(Status::OptedIn),
        100,
    )];
    let r = e.apply_page(HUBSPOT, &back, None, t(101)).unwrap();
    assert_eq!(r.results.get("accepted_variant"), None, "{r:?}");
    assert!(pushed(&e).is_empty(), "{:?}", pushed(&e));
    let landline = e
        .store()
        .subject_by_alias("p:+541123456789")
        .unwrap()
        .unwrap();
    let mobile = e
        .store()
        .subject_by_alias("p:+5491123456789")
        .unwrap()
        .unwrap();
    assert_ne!(landline.id, mobile.id, "suppress-only forms never merge");
    let m = e.policy().margin;
    assert_eq!(
        landline.consent.registers(Scope::All).decide(m),
        Decision::OptedOut
    );
    assert_eq!(
        mobile.consent.registers(Scope::All).decide(m),
        Decision::OptedIn
    );
}

#[test]
fn unreadable_numbers_are_kept_per_record_until_read_again_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let page = [
        contact("1", &["+1 415 555 2671", "ask reception"], None, 1),
        contact("2", &["n/a"], None, 1),
    ];
    e.apply_page(HUBSPOT, &page, None, t(2)).unwrap();
    assert_eq!(
        e.store().unreadable_counts(),
        BTreeMap::from([(HUBSPOT.to_string(), 2)])
    );
    let rows: Vec<_> = e
        .store()
        .unreadable(Some(HUBSPOT))
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows[0].1, "1");
    assert_eq!(
        (rows[0].2[0].field.as_str(), rows[0].2[0].raw.as_str()),
        ("phone 2", "ask reception")
    );
    assert!(
        e.store().unreadable(Some("hub")).next().is_none(),
        "prefix only"
    );

    e.apply_page(
        HUBSPOT,
        &[contact("2", &["+1 212 555 0100"], None, 5)],
        None,
        t(6),
    )
    .unwrap();
    assert_eq!(
        e.store().unreadable_counts(),
        BTreeMap::from([(HUBSPOT.to_string(), 1)])
    );
}
