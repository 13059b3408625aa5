//! Value formats: every stored type round-trips through the compact encoding (2) and
//! JSON (1), values the JSON-writing builds left behind still read, and a store holding
//! them opens, answers the gate and lookups, and rewrites a value compactly when it next
//! writes it.

use super::*;
use crate::audit::AuditKind;
use crate::policy::{Fact, Registers};
use crate::store::erasure::Tombstone;
use optout_core::{Identity, PushItem, Reply, Scope, Signal, Status};
use std::fmt::Debug;

on_both!(a_store_of_json_values_opens_answers_and_rewrites_compactly);

fn fact(status: Status, scope: Scope, at: i64) -> Fact {
    Fact {
        status,
        scope,
        at: Timestamp(at),
        source: "hubspot".into(),
        record: "c-17".into(),
        signal: Signal::CrmField,
        evidence: "whatsapp_consent=opted_out".into(),
    }
}

fn subject() -> SubjectRecord {
    SubjectRecord {
        id: 1_000_017,
        aliases: vec!["p:+14152010007".into(), "w:14152010007".into()],
        consent: Consent {
            all: Registers {
                opt_out: Some(fact(Status::OptedOut, Scope::All, 1_764_000_000_000)),
                opt_in: Some(fact(Status::OptedIn, Scope::All, 1_763_000_000_000)),
            },
            marketing: Registers {
                opt_out: Some(fact(Status::OptedOut, Scope::Marketing, -5)),
                opt_in: None,
            },
        },
        links: vec![
            ("hubspot".into(), "c-17".into()),
            ("sf".into(), "003x".into()),
        ],
        last_inbound: Some(Timestamp(1_764_000_000_001)),
        created_at: Timestamp(1_700_000_000_000),
        merged_into: Some(9),
        merged_from: vec![3, 4],
    }
}

fn link() -> LinkRecord {
    LinkRecord {
        subjects: vec![1_000_017, 2],
        phones: vec!["+14152010007".into()],
        memory: RecordMemory {
            last_seen: Some(Status::OptedIn),
            last_pushed: Some((Status::OptedOut, Timestamp(1_764_000_000_000))),
            pending: None,
        },
        pushed_at: Some(Timestamp(1_764_000_000_500)),
        awaiting_readback: true,
        first_seen: Timestamp(1_700_000_000_000),
        last_read: Timestamp(1_764_000_001_000),
        marketing: MarketingField {
            memory: RecordMemory {
                last_seen: Some(Status::OptedOut),
                last_pushed: None,
                pending: None,
            },
            pushed_at: None,
            awaiting_readback: false,
        },
    }
}

fn audit_entry() -> AuditEntry {
    AuditEntry {
        seq: 0,
        kind: AuditKind::Accepted,
        subject: Some("1000017".into()),
        source: "hubspot".into(),
        record: Some("c-17".into()),
        scope: Some(Scope::All),
        status: Some(Status::OptedOut),
        event_at: Some(Timestamp(1_764_000_000_000)),
        observed_at: Timestamp(1_764_000_000_100),
        stored_at: Timestamp(1_764_000_000_200),
        evidence: Some("whatsapp_consent=opted_out".into()),
        reason: Some("newer".into()),
    }
}

fn push_item(reply: bool) -> PushItem {
    PushItem {
        key: "c-17".into(),
        record: "c-17".into(),
        status: Status::OptedOut,
        scope: Scope::Marketing,
        changed_at: Timestamp(1_764_000_000_000),
        source: "whatsapp:keyword".into(),
        subject: "1000017".into(),
        identities: vec![
            Identity::Phone("+14152010007".into()),
            Identity::Bsuid("US.1".into()),
        ],
        reply: reply.then(|| Reply {
            to: Identity::WaId("14152010007".into()),
            in_reply_to: "wamid.1".into(),
            window_ends: Timestamp(1_764_086_400_000),
            language: None,
            clarify: true,
        }),
    }
}

/// `v` and its defaults survive the compact encoding and JSON, and each is marked with
/// its format byte.
fn both_ways<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let compact = encode(v);
    assert_eq!(compact[0], FORMAT_COMPACT);
    assert_eq!(&decode::<T>("t", &compact).unwrap(), v);
    json_way(v);
}

fn json_way<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let json = encode_json(v);
    assert_eq!(json[0], FORMAT_JSON);
    assert_eq!(&decode::<T>("t", &json).unwrap(), v);
}

#[test]
fn every_compact_type_round_trips_in_both_formats() {
    both_ways(&subject());
    both_ways(&SubjectRecord::default());
    both_ways(&link());
    both_ways(&LinkRecord::default());
    both_ways(&audit_entry());
    both_ways(&AuditEntry::new(
        AuditKind::Retention,
        "operator",
        Timestamp(0),
    ));
    both_ways(&vec![UnreadableNumber {
        field: "phone 1".into(),
        raw: "call me".into(),
        reason: "not a number".into(),
        at: Timestamp(1),
    }]);
    both_ways(&HoldRecord {
        id: 4,
        subject: 1_000_017,
        fact: fact(Status::OptedIn, Scope::All, 1_764_000_000_000),
        held_at: Timestamp(1_764_000_000_001),
    });
    both_ways(&GuardWindow {
        bucket: -3,
        current: 1,
        previous: u64::MAX,
        held: 0,
    });
    both_ways(&ApiKeyRecord {
        content: "ab12".into(),
        recorded_at: Timestamp(5),
        receipt: "r-1".into(),
    });
    both_ways(&Tombstone {
        erased_at: Timestamp(6),
        subject: 7,
        suppressed: true,
    });
}

/// The types postcard cannot carry (optional fields left out of JSON, tagged enums) stay
/// JSON, and their encodings round-trip with those fields both set and not.
#[test]
fn json_only_types_round_trip() {
    for (reply, error) in [(true, Some("429".to_string())), (false, None)] {
        let e = OutboxEntry {
            item: push_item(reply),
            version: 12,
            enqueued_at: Timestamp(1),
            not_before: Timestamp(2),
            attempts: 3,
            last_error: error,
            in_flight: reply,
        };
        json_way(&e);
        json_way(&DeadLetter {
            item: e.item,
            reason: "gone".into(),
            at: Timestamp(4),
            attempts: 5,
        });
    }
    for (body, connector) in [
        (b"{\"a\":1}".to_vec(), Some("wa".into())),
        (vec![0xff, 0], None),
    ] {
        json_way(&InboxRecord {
            received_at: Timestamp(1),
            body,
            reason: Some("bad signature".into()),
            connector,
        });
    }
    json_way(&vec![TemplateRecord {
        name: "promo".into(),
        language: "en_US".into(),
        category: "MARKETING".into(),
        upcoming: Some("UTILITY".into()),
        at: Timestamp::MIN,
        id: None,
        source: "config".into(),
        evidence: "configured".into(),
        stored_at: Timestamp(9),
    }]);
}

/// The compact encoding is what it is for: a subject, a link and an audit entry each take
/// well under half their JSON.
#[test]
fn the_compact_encoding_is_less_than_half_the_json() {
    for (compact, json) in [
        (encode(&subject()), encode_json(&subject())),
        (encode(&link()), encode_json(&link())),
        (encode(&audit_entry()), encode_json(&audit_entry())),
    ] {
        assert!(
            compact.len() * 2 < json.len(),
            "{} against {}",
            compact.len(),
            json.len()
        );
    }
}

/// The gate's lean read agrees with the whole subject in both formats, merged or not.
#[test]
fn the_gate_view_reads_both_formats() {
    let mut live = subject();
    live.merged_into = None;
    for s in [subject(), live, SubjectRecord::default()] {
        for bytes in [encode(&s), encode_json(&s)] {
            let v = ConsentView::decode(&bytes).unwrap();
            assert_eq!(
                (v.consent, v.merged_into),
                (s.consent.clone(), s.merged_into)
            );
        }
    }
    let mut cut = encode(&subject());
    cut.truncate(20);
    assert!(matches!(
        ConsentView::decode(&cut),
        Err(StoreError::Corrupt(_))
    ));
}

/// A compact value with bytes past its end, or cut short, is corrupt, not misread.
#[test]
fn damaged_compact_values_are_corrupt() {
    let mut long = encode(&link());
    long.push(0);
    let err = decode::<LinkRecord>("link", &long).unwrap_err().to_string();
    assert!(err.contains("1 bytes past the value"), "{err}");
    let short = &encode(&link())[..10];
    assert!(matches!(
        decode::<LinkRecord>("link", short),
        Err(StoreError::Corrupt(_))
    ));
}

/// A subject, a link and an audit entry as the JSON-writing builds stored them (format 1):
/// the values of [`subject`] (not merged), [`link`] and [`audit_entry`].
const OLD_SUBJECT: &str = r#"{"id":1000017,"aliases":["p:+14152010007","w:14152010007"],"consent":{"all":{"opt_out":{"status":"opted_out","scope":"all","at":1764000000000,"source":"hubspot","record":"c-17","signal":"crm_field","evidence":"whatsapp_consent=opted_out"},"opt_in":{"status":"opted_in","scope":"all","at":1763000000000,"source":"hubspot","record":"c-17","signal":"crm_field","evidence":"whatsapp_consent=opted_out"}},"marketing":{"opt_out":{"status":"opted_out","scope":"marketing","at":-5,"source":"hubspot","record":"c-17","signal":"crm_field","evidence":"whatsapp_consent=opted_out"},"opt_in":null}},"links":[["hubspot","c-17"],["sf","003x"]],"last_inbound":1764000000001,"created_at":1700000000000,"merged_into":null,"merged_from":[3,4]}"#;
const OLD_LINK: &str = r#"{"subjects":[1000017,2],"phones":["+14152010007"],"memory":{"last_seen":"opted_in","last_pushed":["opted_out",1764000000000]},"pushed_at":1764000000500,"awaiting_readback":true,"first_seen":1700000000000,"last_read":1764000001000,"marketing":{"memory":{"last_seen":"opted_out","last_pushed":null},"pushed_at":null,"awaiting_readback":false}}"#;
const OLD_AUDIT: &str = r#"{"seq":0,"kind":"accepted","subject":"1000017","source":"hubspot","record":"c-17","scope":"all","status":"opted_out","event_at":1764000000000,"observed_at":1764000000100,"stored_at":1764000000200,"evidence":"whatsapp_consent=opted_out","reason":"newer"}"#;

fn format_1(json: &str) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(json.as_bytes());
    v
}

/// Every read a lookup and the gate make of one person.
fn assert_reads(s: &Store, want: &SubjectRecord) {
    let alias = "p:+14152010007";
    assert_eq!(s.subject_by_alias(alias).unwrap().as_ref(), Some(want));
    assert_eq!(s.subject(want.id).unwrap().as_ref(), Some(want));
    let gate = Some((want.id, want.consent.clone()));
    assert_eq!(s.consent_by_alias(alias).unwrap(), gate);
    assert_eq!(
        s.consent_reads(|r| r.consent_by_alias(alias).unwrap())
            .unwrap(),
        gate
    );
    assert_eq!(s.link("hubspot", "c-17").unwrap(), Some(link()));
    let entry = AuditEntry {
        seq: 5,
        ..audit_entry()
    };
    assert_eq!(s.subject_audit(want).unwrap(), vec![entry.clone()]);
    let all: Vec<AuditEntry> = s.audit_from(0).collect::<Result<_, _>>().unwrap();
    assert_eq!(all, vec![entry]);
}

fn a_store_of_json_values_opens_answers_and_rewrites_compactly(o: &Opener) {
    let want = SubjectRecord {
        merged_into: None,
        ..subject()
    };
    let id = want.id.to_be_bytes();
    {
        let s = o.open();
        s.tree(SUBJECTS, |t| t.insert(id, format_1(OLD_SUBJECT)))
            .unwrap();
        s.tree(ALIASES, |t| t.insert("p:+14152010007", id)).unwrap();
        s.tree(LINKS, |t| {
            t.insert(link_key("hubspot", "c-17"), format_1(OLD_LINK))
        })
        .unwrap();
        s.tree(AUDIT, |t| t.insert(5u64.to_be_bytes(), format_1(OLD_AUDIT)))
            .unwrap();
        let index = [id, 5u64.to_be_bytes()].concat();
        s.tree(SUBJECT_AUDIT, |t| t.insert(index, [])).unwrap();
        s.flush_blocking().unwrap();
    }
    let s = o.open();
    assert_reads(&s, &want);
    // The next write of a value is compact.
    s.transaction(true, |tx| {
        tx.put_subject(&tx.subject(want.id)?.expect("the subject"))?;
        tx.put_link(
            "hubspot",
            "c-17",
            &tx.link("hubspot", "c-17")?.expect("the link"),
        )
    })
    .unwrap();
    let format = |tree, key: &[u8]| s.tree(tree, |t| t.get(key)).unwrap().expect("stored")[0];
    assert_eq!(format(SUBJECTS, &id), FORMAT_COMPACT);
    assert_eq!(format(LINKS, &link_key("hubspot", "c-17")), FORMAT_COMPACT);
    assert_eq!(format(AUDIT, &5u64.to_be_bytes()), FORMAT_JSON);
    drop(s);
    assert_reads(&o.open(), &want);
}
