//! Reconciliation against a real store in a temporary directory.

use super::*;
use optout_core::Signal;

const HUBSPOT: &str = "hubspot";
const SALESFORCE: &str = "salesforce";
const WHATSAPP: &str = "whatsapp";
const HOOK: &str = "hook";

fn engine(dir: &std::path::Path) -> Engine {
    let store = crate::store::testing::open(dir);
    let targets = BTreeMap::from([
        (HUBSPOT.to_string(), Takes::Records),
        (SALESFORCE.to_string(), Takes::Records),
        (WHATSAPP.to_string(), Takes::Replies),
        (HOOK.to_string(), Takes::Events),
    ]);
    Engine::new(
        store,
        PolicyConfig::default(),
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        targets,
    )
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_secs(1_700_000_000 + s)
}

fn stop(id: &str, wa: Option<&str>, bsuid: Option<&str>, at: i64) -> Observation {
    let mut identities = Vec::new();
    if let Some(w) = wa {
        identities.push(Identity::WaId(w.into()));
    }
    if let Some(b) = bsuid {
        identities.push(Identity::Bsuid(b.into()));
    }
    Observation::Event(ConsentEvent {
        identities,
        status: Some(Status::OptedOut),
        signal: Signal::Keyword,
        at: t(at),
        inbound: true,
        message_id: Some(id.into()),
        evidence: "STOP".into(),
        language: Some("en".into()),
        scope: None,
        possible_opt_out: false,
    })
}

fn contact(id: &str, phone: &str, value: Option<Status>, modified: i64) -> Observation {
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

fn pending(e: &Engine, connector: &str) -> Vec<(String, OutboxEntry)> {
    e.store()
        .due_pushes(connector, Timestamp(i64::MAX), 1000)
        .unwrap()
}

fn push_all_done(e: &Engine, connector: &str, now: Timestamp) -> PushReport {
    let results: Vec<_> = pending(e, connector)
        .into_iter()
        .map(|(k, en)| (k, en.version, PushOutcome::Done))
        .collect();
    e.complete_pushes(connector, &results, Duration::from_secs(1), now)
        .unwrap()
}

#[test]
fn stop_suppresses_every_record_holding_the_number_and_echo_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    // The CRMs hold the number in three records, in different formats.
    e.apply_page(
        HUBSPOT,
        &[
            contact("101", "(415) 555-2671", None, 1),
            contact("102", "+1 415 555 2671", Some(Status::OptedIn), 1),
            contact("103", "+1 212 555 0100", None, 1),
        ],
        Some("c1"),
        t(2),
    )
    .unwrap();
    e.apply_page(
        SALESFORCE,
        &[contact(
            "Contact/003A",
            "4155552671",
            Some(Status::OptedIn),
            1,
        )],
        Some("s1"),
        t(2),
    )
    .unwrap();
    assert!(
        pending(&e, HUBSPOT).is_empty(),
        "nothing decided yet, nothing to push"
    );

    let r = e
        .apply_page(
            WHATSAPP,
            &[stop("wamid.1", Some("14155552671"), None, 10)],
            Some("7"),
            t(11),
        )
        .unwrap();
    assert_eq!(r.decisions.len(), 1);
    assert_eq!(
        (r.decisions[0].scope, r.decisions[0].to),
        (Scope::All, Decision::OptedOut)
    );
    let hs: Vec<_> = pending(&e, HUBSPOT)
        .into_iter()
        .map(|(k, en)| (k, en.item.status))
        .collect();
    assert_eq!(
        hs,
        [
            ("101".to_string(), Status::OptedOut),
            ("102".to_string(), Status::OptedOut)
        ]
    );
    assert_eq!(pending(&e, SALESFORCE).len(), 1);
    // One confirmation for the keyword, one event for the automation webhook.
    let wa = pending(&e, WHATSAPP);
    assert_eq!(wa.len(), 1);
    let reply = wa[0].1.item.reply.clone().unwrap();
    assert_eq!(reply.to, Identity::WaId("14155552671".into()));
    assert_eq!(reply.window_ends, t(10).plus(REPLY_WINDOW));
    assert_eq!(pending(&e, HOOK).len(), 1);
    assert_eq!(e.store().cursor(WHATSAPP).unwrap().as_deref(), Some("7"));

    let done = push_all_done(&e, HUBSPOT, t(12));
    assert_eq!(done.done, 2);
    assert!(pending(&e, HUBSPOT).is_empty());
    assert_eq!(e.store().unverified().count(), 2);
    // Reading our own write back is an echo: verified, no new decision, no new push.
    let r = e
        .apply_page(
            HUBSPOT,
            &[contact(
                "102",
                "+1 415 555 2671",
                Some(Status::OptedOut),
                13,
            )],
            Some("c2"),
            t(14),
        )
        .unwrap();
    assert_eq!(r.results.get("echo"), Some(&1));
    assert!(r.decisions.is_empty());
    assert_eq!(r.verified.len(), 1);
    assert!(pending(&e, HUBSPOT).is_empty());
    assert_eq!(e.store().unverified().count(), 1);
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    assert_eq!(
        s.consent.decide(Scope::All, e.policy().margin),
        Decision::OptedOut
    );
    assert_eq!(s.links.len(), 3);
}

#[test]
fn duplicates_count_once_and_stale_crm_opt_in_is_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page(
        HUBSPOT,
        &[contact("101", "4155552671", None, 1)],
        None,
        t(2),
    )
    .unwrap();
    let r = e
        .apply_page(
            WHATSAPP,
            &[
                stop("wamid.1", Some("14155552671"), None, 10),
                stop("wamid.1", Some("14155552671"), None, 10),
            ],
            None,
            t(11),
        )
        .unwrap();
    assert_eq!(r.results.get("accepted"), Some(&1));
    assert_eq!(r.results.get("duplicate"), Some(&1));
    let r = e
        .apply_page(
            WHATSAPP,
            &[stop("wamid.1", Some("14155552671"), None, 10)],
            None,
            t(20),
        )
        .unwrap();
    assert_eq!(
        r.results.get("duplicate"),
        Some(&1),
        "redelivery on a later poll"
    );
    push_all_done(&e, HUBSPOT, t(12));
    e.apply_page(
        HUBSPOT,
        &[contact("101", "4155552671", Some(Status::OptedOut), 12)],
        None,
        t(13),
    )
    .unwrap();
    // A CRM workflow sets opt-in 2 s after the STOP: within the margin, STOP stands and the
    // record is set back.
    let r = e
        .apply_page(
            HUBSPOT,
            &[Observation::Record(RecordSnapshot {
                record: "101".into(),
                phones: vec!["4155552671".into()],
                value: Some(Status::OptedIn),
                marketing: None,
                changed_at: Some(t(12)),
                modified_at: t(14),
                evidence: "consent=opted_in".into(),
            })],
            None,
            t(15),
        )
        .unwrap();
    assert_eq!(r.results.get("accepted"), Some(&1));
    assert!(r.decisions.is_empty());
    let p = pending(&e, HUBSPOT);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1.item.status, Status::OptedOut);
    // A clearly later opt-in in the CRM is the customer's new wish: it wins everywhere.
    push_all_done(&e, HUBSPOT, t(16));
    e.apply_page(
        HUBSPOT,
        &[contact("101", "4155552671", Some(Status::OptedOut), 16)],
        None,
        t(17),
    )
    .unwrap();
    let r = e
        .apply_page(
            HUBSPOT,
            &[contact("101", "4155552671", Some(Status::OptedIn), 500)],
            None,
            t(501),
        )
        .unwrap();
    assert_eq!(r.decisions.len(), 1);
    assert_eq!(r.decisions[0].to, Decision::OptedIn);
    assert!(
        pending(&e, HUBSPOT).is_empty(),
        "the record already holds opted_in"
    );
}

#[test]
fn bsuid_only_stop_links_to_phone_later_and_new_contacts_are_suppressed_on_first_sight() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page(
        WHATSAPP,
        &[stop("wamid.b1", None, Some("US.999888777"), 10)],
        None,
        t(11),
    )
    .unwrap();
    let s = e
        .store()
        .subject_by_alias("b:US.999888777")
        .unwrap()
        .unwrap();
    assert_eq!(
        s.consent.decide(Scope::All, e.policy().margin),
        Decision::OptedOut
    );
    // A CRM contact with the number is not yet known to be that person.
    e.apply_page(
        HUBSPOT,
        &[contact("101", "4155552671", None, 1)],
        None,
        t(12),
    )
    .unwrap();
    assert!(pending(&e, HUBSPOT).is_empty());
    // A later payload shows both ids: one person. The contact is suppressed.
    let hello = Observation::Event(ConsentEvent {
        identities: vec![
            Identity::WaId("14155552671".into()),
            Identity::Bsuid("US.999888777".into()),
        ],
        status: None,
        signal: Signal::Inbound,
        at: t(20),
        inbound: true,
        message_id: Some("wamid.b2".into()),
        evidence: "text".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    });
    let r = e.apply_page(WHATSAPP, &[hello], None, t(21)).unwrap();
    assert!(
        r.decisions.is_empty(),
        "merging keeps the decision; the phone subject had none"
    );
    assert_eq!(pending(&e, HUBSPOT).len(), 1);
    let people = e
        .store()
        .counts()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == PEOPLE)
        .unwrap()
        .1;
    assert_eq!(people, 1, "two subjects merged into one person");
    let by_phone = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    let by_bsuid = e
        .store()
        .subject_by_alias("b:US.999888777")
        .unwrap()
        .unwrap();
    assert_eq!(by_phone.id, by_bsuid.id);
    assert!(
        e.store()
            .subject_audit(&by_phone)
            .unwrap()
            .iter()
            .any(|a| a.kind == AuditKind::Merged)
    );
    // A contact created later with the opted-out number is suppressed on first sight.
    e.apply_page(
        SALESFORCE,
        &[contact("Lead/00Q1", "+1-415-555-2671", None, 30)],
        None,
        t(31),
    )
    .unwrap();
    assert_eq!(pending(&e, SALESFORCE).len(), 1);
}

#[test]
fn newer_value_replaces_pending_and_old_push_result_does_not_remove_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page(
        HUBSPOT,
        &[contact("101", "4155552671", Some(Status::OptedIn), 1)],
        None,
        t(2),
    )
    .unwrap();
    e.apply_page(
        WHATSAPP,
        &[stop("wamid.1", Some("14155552671"), None, 10)],
        None,
        t(11),
    )
    .unwrap();
    let first = pending(&e, HUBSPOT).remove(0);
    let start = Observation::Event(ConsentEvent {
        identities: vec![Identity::WaId("14155552671".into())],
        status: Some(Status::OptedIn),
        signal: Signal::Keyword,
        at: t(100),
        inbound: true,
        message_id: Some("wamid.2".into()),
        evidence: "START".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    });
    e.apply_page(WHATSAPP, &[start], None, t(101)).unwrap();
    // The opt-out push (in flight when START arrived) completes: the newer opt-in stays.
    e.complete_pushes(
        HUBSPOT,
        &[(first.0.clone(), first.1.version, PushOutcome::Done)],
        Duration::from_secs(1),
        t(102),
    )
    .unwrap();
    let now = pending(&e, HUBSPOT);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].1.item.status, Status::OptedIn);
    // Rejections become dead letters and can be re-queued.
    let (k, en) = now[0].clone();
    let r = e
        .complete_pushes(
            HUBSPOT,
            &[(
                k.clone(),
                en.version,
                PushOutcome::Rejected {
                    reason: "contact deleted".into(),
                },
            )],
            Duration::from_secs(1),
            t(103),
        )
        .unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert!(pending(&e, HUBSPOT).is_empty());
    assert_eq!(
        e.store().dead_letter(HUBSPOT, &k).unwrap().unwrap().reason,
        "contact deleted"
    );
    assert_eq!(e.retry_dead_letters(Some(HUBSPOT), t(104)).unwrap(), 1);
    assert_eq!(pending(&e, HUBSPOT).len(), 1);
    assert!(e.store().dead_letter(HUBSPOT, &k).unwrap().is_none());
}

#[test]
fn retry_later_waits_and_in_flight_replies_are_abandoned_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.apply_page(
        WHATSAPP,
        &[stop("wamid.1", Some("14155552671"), None, 10)],
        None,
        t(11),
    )
    .unwrap();
    let (k, en) = pending(&e, WHATSAPP).remove(0);
    e.complete_pushes(
        WHATSAPP,
        &[(
            k.clone(),
            en.version,
            PushOutcome::RetryLater {
                after: Some(Duration::from_secs(30)),
                reason: "130429".into(),
            },
        )],
        Duration::from_secs(1),
        t(12),
    )
    .unwrap();
    assert!(
        e.store()
            .due_pushes(WHATSAPP, t(20), 10)
            .unwrap()
            .is_empty()
    );
    let due = e.store().due_pushes(WHATSAPP, t(43), 10).unwrap();
    assert_eq!(due.len(), 1);
    e.mark_in_flight(WHATSAPP, &[(k.clone(), due[0].1.version)])
        .unwrap();
    assert!(
        e.store()
            .due_pushes(WHATSAPP, t(50), 10)
            .unwrap()
            .is_empty()
    );
    // Crash and restart: the in-flight reply is abandoned and audited.
    drop(e);
    let e = engine(dir.path());
    assert_eq!(e.abandon_in_flight(t(60)).unwrap(), 1);
    assert_eq!(
        e.store().outbox_len(),
        1,
        "only the automation event remains"
    );
    assert!(
        e.store()
            .audit_from(0)
            .any(|a| a.unwrap().kind == AuditKind::PushAbandoned)
    );
}

#[test]
fn invalid_numbers_are_audited_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let r = e
        .apply_page(
            HUBSPOT,
            &[
                contact("1", "not a phone", Some(Status::OptedOut), 1),
                contact("2", &"9".repeat(100_000), None, 1),
                contact("3", "4155552671", None, 1),
            ],
            Some("x"),
            t(2),
        )
        .unwrap();
    assert_eq!(r.results.get("identity_rejected"), Some(&2));
    assert_eq!(e.store().subject_count(), 1);
    let rejected: Vec<_> = e
        .store()
        .audit_from(0)
        .map(|a| a.unwrap())
        .filter(|a| a.kind == AuditKind::IdentityRejected)
        .collect();
    assert_eq!(rejected.len(), 2);
    assert!(
        rejected
            .iter()
            .all(|a| a.evidence.as_ref().unwrap().chars().count() <= 65)
    );
}
