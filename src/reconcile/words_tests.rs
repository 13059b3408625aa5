//! Scopes carried by a keyword, possible opt-outs and repeated marketing preferences,
//! against a real store in a temporary directory.

use super::*;
use optout_core::Signal;

const WHATSAPP: &str = "whatsapp";
const HOOK: &str = "hook";
const HUBSPOT: &str = "hubspot";

fn engine(dir: &std::path::Path) -> Engine {
    let targets = BTreeMap::from([
        (HUBSPOT.to_string(), Takes::Records),
        (WHATSAPP.to_string(), Takes::Replies),
        (HOOK.to_string(), Takes::Events),
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

fn event(id: &str, status: Option<Status>, signal: Signal, at: i64) -> ConsentEvent {
    ConsentEvent {
        identities: vec![Identity::WaId("14155552671".into())],
        status,
        signal,
        at: t(at),
        inbound: signal != Signal::MarketingPreference,
        message_id: Some(id.into()),
        evidence: "test".into(),
        language: Some("es".into()),
        scope: None,
        possible_opt_out: false,
    }
}

fn apply(e: &Engine, ev: ConsentEvent, now: i64) -> ApplyReport {
    e.apply_page(WHATSAPP, &[Observation::Event(ev)], None, t(now))
        .unwrap()
}

fn outbox(e: &Engine, connector: &str) -> Vec<OutboxEntry> {
    let due = e.store().due_pushes(connector, Timestamp(i64::MAX), 1000);
    due.unwrap().into_iter().map(|(_, en)| en).collect()
}

fn consent(e: &Engine) -> crate::policy::Consent {
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    s.consent
}

#[test]
fn a_keyword_scoped_marketing_stops_marketing_only() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let ev = ConsentEvent {
        scope: Some(Scope::Marketing),
        ..event("wamid.1", Some(Status::OptedOut), Signal::Button, 0)
    };
    let r = apply(&e, ev, 1);
    assert_eq!(r.decisions.len(), 1, "{r:?}");
    assert_eq!(r.decisions[0].scope, Scope::Marketing);
    let margin = e.policy().margin;
    assert_eq!(consent(&e).decide(Scope::All, margin), Decision::Unknown);
    let confirm = outbox(&e, WHATSAPP);
    assert_eq!(confirm.len(), 1);
    assert_eq!(confirm[0].item.scope, Scope::Marketing);
    assert!(!confirm[0].item.reply.as_ref().unwrap().clarify);
    let hook = outbox(&e, HOOK);
    assert_eq!(hook.len(), 1);
    assert_eq!(hook[0].item.scope, Scope::Marketing);
}

#[test]
fn a_possible_opt_out_is_counted_and_asked_once_unless_everything_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let possible = |id: &str, at: i64| ConsentEvent {
        possible_opt_out: true,
        ..event(id, None, Signal::Inbound, at)
    };
    let r = apply(&e, possible("wamid.P1", 0), 1);
    assert_eq!(r.results.get("possible_opt_out"), Some(&1), "{r:?}");
    assert!(r.decisions.is_empty());
    let margin = e.policy().margin;
    assert_eq!(consent(&e).decide(Scope::All, margin), Decision::Unknown);
    let asked = outbox(&e, WHATSAPP);
    assert_eq!(asked.len(), 1);
    let reply = asked[0].item.reply.clone().unwrap();
    assert!(reply.clarify);
    assert_eq!(reply.language.as_deref(), Some("es"));
    assert_eq!(asked[0].item.key, "confirm:wamid.P1");
    assert!(outbox(&e, HOOK).is_empty());
    // A redelivery is a duplicate: neither counted nor asked again.
    let r = apply(&e, possible("wamid.P1", 0), 2);
    assert_eq!(r.results.get("duplicate"), Some(&1), "{r:?}");
    // Stopped everything: recorded, but nothing is sent.
    let stop = event("wamid.S", Some(Status::OptedOut), Signal::Keyword, 10);
    apply(&e, stop, 11);
    let before = outbox(&e, WHATSAPP).len();
    apply(&e, possible("wamid.P2", 20), 21);
    assert_eq!(outbox(&e, WHATSAPP).len(), before);
    let counts = e.store().counts().unwrap();
    let n = counts
        .iter()
        .find(|(k, _)| k == POSSIBLE_OPT_OUTS)
        .map(|(_, v)| *v);
    assert_eq!(n, Some(2), "{counts:?}");
    let s = e
        .store()
        .subject_by_alias("p:+14155552671")
        .unwrap()
        .unwrap();
    let audit = e.store().subject_audit(&s).unwrap();
    let kinds = audit
        .iter()
        .filter(|a| a.kind == AuditKind::PossibleOptOut)
        .count();
    assert_eq!(kinds, 2);
}

#[test]
fn a_repeated_preference_changes_nothing_and_still_orders_late_acts() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let pref = |id: &str, st, at| event(id, Some(st), Signal::MarketingPreference, at);
    let r = apply(&e, pref("pref:1", Status::OptedOut, 0), 1);
    assert_eq!(r.decisions.len(), 1);
    let hook_before = outbox(&e, HOOK).len();
    let r = apply(&e, pref("pref:2", Status::OptedOut, 100), 101);
    assert_eq!(r.results.get("repeated"), Some(&1), "{r:?}");
    assert!(r.decisions.is_empty() && r.enqueued.is_empty(), "{r:?}");
    assert_eq!(outbox(&e, HOOK).len(), hook_before);
    // A resume from between the two stops, delivered late, loses to the later stop.
    let r = apply(&e, pref("pref:3", Status::OptedIn, 50), 102);
    assert!(r.decisions.is_empty(), "{r:?}");
    let margin = e.policy().margin;
    assert_eq!(
        consent(&e).decide(Scope::Marketing, margin),
        Decision::OptedOut
    );
}
