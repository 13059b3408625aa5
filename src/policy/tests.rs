//! Properties and named cases of the consent policy.

use super::*;
use proptest::prelude::*;

const MARGIN: Duration = Duration::from_secs(5);

fn fact(status: Status, scope: Scope, at_s: i64, source: &str, record: &str) -> Fact {
    Fact {
        status,
        scope,
        at: Timestamp::from_secs(at_s),
        source: source.into(),
        record: record.into(),
        signal: Signal::Keyword,
        evidence: format!("{status} at {at_s}"),
    }
}

fn consent_of(facts: &[Fact]) -> Consent {
    let mut c = Consent::default();
    for f in facts {
        c.record(f);
    }
    c
}

fn arb_fact() -> impl Strategy<Value = Fact> {
    (
        prop_oneof![Just(Status::OptedOut), Just(Status::OptedIn)],
        prop_oneof![Just(Scope::All), Just(Scope::Marketing)],
        // A narrow time range makes ties and near-ties (within the margin) common.
        0i64..40,
        prop_oneof![Just("whatsapp"), Just("hubspot"), Just("salesforce")],
        prop_oneof![Just("r1"), Just("r2")],
    )
        .prop_map(|(st, sc, at, src, rec)| fact(st, sc, at, src, rec))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The decision is the same for any order and any duplication of the observations.
    #[test]
    fn order_and_duplication_do_not_matter(
        facts in prop::collection::vec(arb_fact(), 0..12),
        perm_seed in any::<u64>(),
        dups in prop::collection::vec(0usize..12, 0..6),
    ) {
        let base = consent_of(&facts);
        let mut shuffled = facts.clone();
        // A deterministic shuffle from the seed (Fisher–Yates with an LCG).
        let mut s = perm_seed | 1;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        for d in dups {
            if let Some(f) = facts.get(d) { shuffled.push(f.clone()); }
        }
        let other = consent_of(&shuffled);
        prop_assert_eq!(&base, &other);
        for scope in Scope::EVERY {
            prop_assert_eq!(base.decide(scope, MARGIN), other.decide(scope, MARGIN));
        }
    }

    /// Applying an observation twice changes nothing the second time.
    #[test]
    fn idempotent(facts in prop::collection::vec(arb_fact(), 1..10)) {
        let mut c = consent_of(&facts);
        let before = c.clone();
        for f in &facts {
            prop_assert!(!c.record(f), "re-recording {f:?} changed the registers");
        }
        prop_assert_eq!(c, before);
    }

    /// An opt-out is never undone except by an accepted opt-in strictly later than every
    /// opt-out of the scope by more than the margin.
    #[test]
    fn opt_out_only_undone_by_a_clearly_later_opt_in(facts in prop::collection::vec(arb_fact(), 1..12)) {
        let c = consent_of(&facts);
        for scope in Scope::EVERY {
            let outs: Vec<_> = facts.iter().filter(|f| f.scope == scope && f.status == Status::OptedOut).collect();
            let ins: Vec<_> = facts.iter().filter(|f| f.scope == scope && f.status == Status::OptedIn).collect();
            let decision = c.decide(scope, MARGIN);
            if let Some(latest_out) = outs.iter().map(|f| f.at).max() {
                let clearly_later = ins.iter().any(|f| f.at > latest_out.plus(MARGIN));
                prop_assert_eq!(decision == Decision::OptedIn, clearly_later);
                prop_assert_ne!(decision, Decision::Unknown);
            } else if ins.is_empty() {
                prop_assert_eq!(decision, Decision::Unknown);
            } else {
                prop_assert_eq!(decision, Decision::OptedIn);
            }
        }
    }

    /// Merging two subjects' consent equals recording all their facts in one.
    #[test]
    fn merge_is_union(a in prop::collection::vec(arb_fact(), 0..8), b in prop::collection::vec(arb_fact(), 0..8)) {
        let mut merged = consent_of(&a);
        merged.merge(&consent_of(&b));
        let all: Vec<Fact> = a.iter().chain(b.iter()).cloned().collect();
        prop_assert_eq!(merged, consent_of(&all));
    }
}

#[test]
fn tie_and_near_tie_go_to_opt_out() {
    let out = fact(Status::OptedOut, Scope::All, 100, "whatsapp", "m1");
    for (in_at, expect) in [
        (100, Decision::OptedOut), // exact tie
        (103, Decision::OptedOut), // near tie, within the margin
        (105, Decision::OptedOut), // exactly at the margin: not *later than* it
        (106, Decision::OptedIn),  // clearly later
        (50, Decision::OptedOut),  // earlier
    ] {
        let inn = fact(Status::OptedIn, Scope::All, in_at, "hubspot", "c1");
        assert_eq!(
            consent_of(&[out.clone(), inn.clone()]).decide(Scope::All, MARGIN),
            expect,
            "opt-in at {in_at}"
        );
        assert_eq!(
            consent_of(&[inn, out.clone()]).decide(Scope::All, MARGIN),
            expect,
            "reversed, opt-in at {in_at}"
        );
    }
}

/// The named cases use small numbers for times; the floor has cases of its own.
fn cfg() -> PolicyConfig {
    PolicyConfig {
        event_time_floor: Timestamp::MIN,
        ..PolicyConfig::default()
    }
}

fn snap(value: Option<Status>, changed_at: Option<i64>, modified: i64) -> RecordSnapshot {
    RecordSnapshot {
        record: "c1".into(),
        phones: vec!["+14155552671".into()],
        value,
        marketing: None,
        changed_at: changed_at.map(Timestamp::from_secs),
        modified_at: Timestamp::from_secs(modified),
        evidence: "whatsapp_consent=…".into(),
    }
}

#[test]
fn record_changes_echoes_and_first_sight() {
    let now = Timestamp::from_secs(1_000);
    // First sight of an opt-out counts (an existing suppression in the CRM).
    match judge_record(
        None,
        &snap(Some(Status::OptedOut), None, 10),
        "hubspot",
        now,
        &cfg(),
    ) {
        Judgement::Fact(f) => assert_eq!(
            (f.status, f.at, f.scope),
            (Status::OptedOut, Timestamp::from_secs(10), Scope::All)
        ),
        other => panic!("{other:?}"),
    }
    // First sight of an opt-in is not a change.
    assert_eq!(
        judge_record(
            None,
            &snap(Some(Status::OptedIn), None, 10),
            "hubspot",
            now,
            &cfg()
        ),
        Judgement::InitialOptIn
    );
    // Same value as last seen: unchanged.
    let seen_out = RecordMemory {
        last_seen: Some(Status::OptedOut),
        ..Default::default()
    };
    assert_eq!(
        judge_record(
            Some(&seen_out),
            &snap(Some(Status::OptedOut), None, 20),
            "hubspot",
            now,
            &cfg()
        ),
        Judgement::Unchanged
    );
    // Reading back what we pushed: an echo.
    let pushed = RecordMemory {
        last_seen: Some(Status::OptedIn),
        last_pushed: Some((Status::OptedOut, Timestamp::from_secs(30))),
        ..Default::default()
    };
    assert_eq!(
        judge_record(
            Some(&pushed),
            &snap(Some(Status::OptedOut), Some(30), 31),
            "hubspot",
            now,
            &cfg()
        ),
        Judgement::Echo(Status::OptedOut)
    );
    // A change away from our value, with our old stamp left in the change-time field:
    // the modification time is the event time.
    let ours = RecordMemory {
        last_seen: Some(Status::OptedOut),
        last_pushed: Some((Status::OptedOut, Timestamp::from_secs(30))),
        ..Default::default()
    };
    match judge_record(
        Some(&ours),
        &snap(Some(Status::OptedIn), Some(30), 500),
        "hubspot",
        now,
        &cfg(),
    ) {
        Judgement::Fact(f) => assert_eq!(f.at, Timestamp::from_secs(500)),
        other => panic!("{other:?}"),
    }
    // ...but a change-time someone else wrote (a stale import) is believed.
    match judge_record(
        Some(&ours),
        &snap(Some(Status::OptedIn), Some(20), 500),
        "hubspot",
        now,
        &cfg(),
    ) {
        Judgement::Fact(f) => assert_eq!(f.at, Timestamp::from_secs(20)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        judge_record(None, &snap(None, None, 10), "hubspot", now, &cfg()),
        Judgement::NoConsentValue
    );
}

#[test]
fn future_times_are_clamped_and_opt_ins_can_be_refused() {
    let now = Timestamp::from_secs(1_000);
    let seen_out = RecordMemory {
        last_seen: Some(Status::OptedOut),
        ..Default::default()
    };
    match judge_record(
        Some(&seen_out),
        &snap(Some(Status::OptedIn), Some(999_999), 10),
        "hubspot",
        now,
        &cfg(),
    ) {
        Judgement::Fact(f) => assert_eq!(f.at, now),
        other => panic!("{other:?}"),
    }
    let strict = PolicyConfig {
        accept_opt_ins_from: Some(["whatsapp".to_string()].into()),
        ..cfg()
    };
    assert!(matches!(
        judge_record(Some(&seen_out), &snap(Some(Status::OptedIn), None, 10), "hubspot", now, &strict),
        Judgement::NotAccepted(_, why) if why.contains("hubspot")
    ));
}

#[test]
fn times_before_the_floor_are_refused_as_evidence() {
    let real = PolicyConfig::default();
    let now = Timestamp::from_secs(1_800_000_000);
    let year_one = Timestamp::parse("0001-01-01T00:00:00Z").unwrap();
    for at in [
        Timestamp(0),
        Timestamp(-1000),
        year_one,
        Timestamp::from_secs(1_230_767_999),
    ] {
        let mut ev = event(Some(Status::OptedOut), Signal::Keyword, 0);
        ev.at = at;
        match judge_event(&ev, "whatsapp", now, &real) {
            Judgement::Refused(f, why) => {
                assert_eq!(f.at, at, "kept as reported, not re-dated");
                assert!(why.contains("before the floor 2009-01-01"), "{why}");
            }
            other => panic!("{at}: {other:?}"),
        }
        // An opt-in dated before the floor cannot outrank anything either.
        ev.status = Some(Status::OptedIn);
        assert!(matches!(
            judge_event(&ev, "whatsapp", now, &real),
            Judgement::Refused(..)
        ));
    }
    let mut ev = event(Some(Status::OptedOut), Signal::Keyword, 0);
    ev.at = EVENT_TIME_FLOOR;
    assert!(matches!(
        judge_event(&ev, "whatsapp", now, &real),
        Judgement::Fact(_)
    ));

    // A CRM change-time field before the floor is no witness: the record's modification
    // time stands in; a record whose modification time is before it too is refused.
    let seen_in = RecordMemory {
        last_seen: Some(Status::OptedIn),
        ..Default::default()
    };
    let modified = 1_700_000_000;
    match judge_record(
        Some(&seen_in),
        &snap(Some(Status::OptedOut), Some(0), modified),
        "hubspot",
        now,
        &real,
    ) {
        Judgement::Fact(f) => assert_eq!(f.at, Timestamp::from_secs(modified)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        judge_record(
            Some(&seen_in),
            &snap(Some(Status::OptedOut), Some(0), -1),
            "hubspot",
            now,
            &real
        ),
        Judgement::Refused(..)
    ));
    // The floor is a setting.
    let lower = PolicyConfig {
        event_time_floor: Timestamp::from_secs(-1),
        ..PolicyConfig::default()
    };
    let mut ev = event(Some(Status::OptedOut), Signal::Import, 0);
    ev.at = Timestamp(0);
    assert!(matches!(
        judge_event(&ev, "import", now, &lower),
        Judgement::Fact(_)
    ));
}

fn event(status: Option<Status>, signal: Signal, at: i64) -> ConsentEvent {
    ConsentEvent {
        identities: vec![optout_core::Identity::WaId("14155552671".into())],
        status,
        signal,
        at: Timestamp::from_secs(at),
        inbound: true,
        message_id: Some(format!("wamid.{at}")),
        evidence: "text".into(),
        language: None,
        scope: None,
        possible_opt_out: false,
    }
}

/// The airline case: flight updates flow; the customer replies STOP; every system is
/// suppressed and nothing is sent, of any category, until the customer opts in again.
#[test]
fn airline_case() {
    let c0 = Consent::default();
    let now = Timestamp::from_secs(10_000);
    // Flight updates (utility) flow to a customer with no opt-out.
    assert!(gate(&c0, Category::Utility, MARGIN).allowed);
    // An ordinary reply ("thanks!") decides nothing.
    assert_eq!(
        judge_event(&event(None, Signal::Inbound, 100), "whatsapp", now, &cfg()),
        Judgement::NoConsentValue
    );
    // STOP.
    let Judgement::Fact(stop) = judge_event(
        &event(Some(Status::OptedOut), Signal::Keyword, 200),
        "whatsapp",
        now,
        &cfg(),
    ) else {
        panic!()
    };
    assert!(wants_confirmation(&stop));
    let c1 = consent_of(std::slice::from_ref(&stop));
    for (name, category) in Category::NAMES {
        let g = gate(&c1, category, MARGIN);
        assert!(!g.allowed, "{name} allowed after STOP");
        assert_eq!(g.evidence.as_ref(), Some(&stop));
    }
    // Every CRM record holding the number must be suppressed.
    assert_eq!(
        desired_record_value([&c1], MARGIN).map(|f| f.status),
        Some(Status::OptedOut)
    );
    // A CRM automation re-setting opt-in a moment later does not undo it.
    let crm_in = fact(Status::OptedIn, Scope::All, 202, "hubspot", "c1");
    let c2 = consent_of(&[stop.clone(), crm_in]);
    assert!(!gate(&c2, Category::Utility, MARGIN).allowed);
    // START an hour later restores everything.
    let Judgement::Fact(start) = judge_event(
        &event(Some(Status::OptedIn), Signal::Keyword, 3_800),
        "whatsapp",
        now,
        &cfg(),
    ) else {
        panic!()
    };
    let c3 = consent_of(&[stop, start]);
    assert!(gate(&c3, Category::Utility, MARGIN).allowed);
    assert!(gate(&c3, Category::Marketing, MARGIN).allowed);
    assert_eq!(
        desired_record_value([&c3], MARGIN).map(|f| f.status),
        Some(Status::OptedIn)
    );
}

#[test]
fn marketing_stop_then_stop_all() {
    let now = Timestamp::from_secs(10_000);
    let Judgement::Fact(pref) = judge_event(
        &event(Some(Status::OptedOut), Signal::MarketingPreference, 100),
        "whatsapp",
        now,
        &cfg(),
    ) else {
        panic!()
    };
    assert_eq!(pref.scope, Scope::Marketing);
    assert!(!wants_confirmation(&pref));
    let c1 = consent_of(std::slice::from_ref(&pref));
    assert!(!gate(&c1, Category::Marketing, MARGIN).allowed);
    // Meta's own name for the category is the same category.
    let meta = Category::parse("MARKETING_MESSAGES").unwrap();
    assert!(!gate(&c1, meta, MARGIN).allowed);
    assert!(gate(&c1, Category::Utility, MARGIN).allowed);
    // A marketing stop alone does not change what CRM records hold.
    assert_eq!(desired_record_value([&c1], MARGIN), None);
    let Judgement::Fact(all) = judge_event(
        &event(Some(Status::OptedOut), Signal::Keyword, 200),
        "whatsapp",
        now,
        &cfg(),
    ) else {
        panic!()
    };
    let c2 = consent_of(&[pref, all]);
    assert!(!gate(&c2, Category::Utility, MARGIN).allowed);
    assert_eq!(
        gate(&c2, Category::Marketing, MARGIN).blocked_by,
        Some(Scope::All)
    );
}

#[test]
fn any_opted_out_subject_suppresses_a_shared_record() {
    let out = consent_of(&[fact(Status::OptedOut, Scope::All, 10, "whatsapp", "m")]);
    let inn = consent_of(&[fact(Status::OptedIn, Scope::All, 50, "whatsapp", "m2")]);
    assert_eq!(
        desired_record_value([&inn, &out], MARGIN).unwrap().status,
        Status::OptedOut
    );
    assert_eq!(
        desired_record_value([&inn], MARGIN).unwrap().status,
        Status::OptedIn
    );
    assert_eq!(desired_record_value([&Consent::default()], MARGIN), None);
}

#[test]
fn a_read_back_of_a_write_in_flight_is_an_echo() {
    // The daemon is writing opted_out (outbox entry pending); the record already shows it,
    // with no change-time field: that is our own write, not a CRM opt-out dated now.
    let now = Timestamp::from_secs(1_000);
    let writing = RecordMemory {
        last_seen: Some(Status::OptedIn),
        pending: Some(Status::OptedOut),
        ..Default::default()
    };
    assert_eq!(
        judge_record(
            Some(&writing),
            &snap(Some(Status::OptedOut), None, 999),
            "salesforce",
            now,
            &cfg()
        ),
        Judgement::Echo(Status::OptedOut)
    );
    // A value other than the one being written is still a change.
    let writing_in = RecordMemory {
        pending: Some(Status::OptedIn),
        ..writing
    };
    assert!(matches!(
        judge_record(
            Some(&writing_in),
            &snap(Some(Status::OptedOut), None, 999),
            "salesforce",
            now,
            &cfg()
        ),
        Judgement::Fact(_)
    ));
}

#[test]
fn an_opt_in_after_our_write_on_a_never_read_record_is_a_change() {
    // Read blank, then suppressed by the daemon, then set to opted_in by an agent before
    // any read showed our value: the earlier value is known, so this is an act.
    let now = Timestamp::from_secs(1_000);
    let written = RecordMemory {
        last_pushed: Some((Status::OptedOut, Timestamp::from_secs(10))),
        ..Default::default()
    };
    match judge_record(
        Some(&written),
        &snap(Some(Status::OptedIn), Some(500), 501),
        "hubspot",
        now,
        &cfg(),
    ) {
        Judgement::Fact(f) => assert_eq!(
            (f.status, f.at),
            (Status::OptedIn, Timestamp::from_secs(500))
        ),
        other => panic!("{other:?}"),
    }
}

/// The gate's categories are a closed set: a name it does not know is no category at all
/// (the HTTP layer answers 400), so a typo can never read as "allowed".
#[test]
fn categories_are_a_closed_set() {
    for (name, c) in Category::NAMES {
        assert_eq!(Category::parse(name), Some(c));
        assert_eq!(Category::parse(&name.to_uppercase()), Some(c));
    }
    assert_eq!(Category::parse("Utility"), Some(Category::Utility));
    for bad in [
        "",
        " ",
        "promotional",
        "marketting",
        "marketing ",
        " marketing",
        "market",
        "all",
    ] {
        assert_eq!(Category::parse(bad), None, "{bad:?}");
    }
}
