//! Every real webhook body in `tests/fixtures/` parses, and yields exactly the observations
//! listed here. Only the Meta-spec "Unsubscribe" quick reply, the marketing preference
//! stop/resume and the 131050 failure change consent; everything else is at most an inbound
//! message (it opens the reply window) or nothing.

use std::collections::BTreeSet;
use std::path::PathBuf;

use optout_core::{
    ChangeKind, ConsentEvent, Identity, IdentityChange, Observation, Signal, Status, Timestamp,
};
use optout_whatsapp::Detector;
use optout_whatsapp::parse::parse;

use Signal::{Button, Inbound, MarketingPreference, MarketingSendFailure};
use Status::{OptedIn, OptedOut};

type Expect = &'static [(Option<Status>, Signal)];

const IN: Expect = &[(None, Inbound)];
const NOTHING: Expect = &[];

/// (file, expected observations in order, why).
const TABLE: &[(&str, Expect, &str)] = &[
    (
        "meta-spec__msg-button-unsubscribe.json",
        &[(Some(OptedOut), Button)],
        "quick reply 'Unsubscribe' is an opt-out",
    ),
    ("meta-spec__msg-contacts.json", IN, "shared contact card"),
    ("meta-spec__msg-image.json", IN, "image"),
    (
        "meta-spec__msg-interactive-button-reply.json",
        IN,
        "a 'Cancel' button is the business's own flow, not an opt-out",
    ),
    (
        "meta-spec__msg-interactive-list-reply.json",
        IN,
        "list choice",
    ),
    ("meta-spec__msg-location.json", IN, "location"),
    ("meta-spec__msg-order.json", IN, "order"),
    ("meta-spec__msg-reaction.json", IN, "reaction"),
    ("meta-spec__msg-system.json", NOTHING, "system notice"),
    (
        "meta-spec__msg-text-context-product.json",
        IN,
        "question about a product",
    ),
    (
        "meta-spec__msg-text-ctwa-referral.json",
        IN,
        "text from an ad",
    ),
    ("meta-spec__msg-text.json", IN, "ordinary text"),
    (
        "meta-spec__msg-unsupported.json",
        IN,
        "unsupported type still came from the customer",
    ),
    (
        "netflie__msg-button-quick-reply-no.json",
        IN,
        "quick reply 'No'",
    ),
    (
        "netflie__msg-interactive-button-reply.json",
        IN,
        "button reply without interactive.type",
    ),
    (
        "netflie__msg-interactive-list-reply.json",
        IN,
        "list reply without interactive.type",
    ),
    (
        "netflie__msg-interactive-nfm-reply.json",
        IN,
        "Flow response",
    ),
    ("netflie__msg-system.json", NOTHING, "system notice"),
    (
        "netflie__msg-text-bsuid-only-no-from.json",
        IN,
        "BSUID-only sender, no from",
    ),
    (
        "netflie__msg-text-no-contact-profile.json",
        IN,
        "contact without profile",
    ),
    (
        "netflie__msg-text-two-changes.json",
        &[(None, Inbound), (None, Inbound)],
        "two changes in one entry",
    ),
    (
        "netflie__msg-text-wa-id-and-user-id.json",
        IN,
        "contact with wa_id and user_id",
    ),
    ("netflie__msg-unknown-type.json", IN, "type unknown"),
    (
        "netflie__status-delivered-marketing.json",
        NOTHING,
        "delivered",
    ),
    (
        "netflie__status-delivered-no-expiration.json",
        NOTHING,
        "delivered",
    ),
    (
        "netflie__status-failed-131053.json",
        NOTHING,
        "failure other than 131050",
    ),
    ("netflie__status-read-conversation.json", NOTHING, "read"),
    (
        "pywa__msg-button-quick-reply-no-context.json",
        IN,
        "quick reply 'title'",
    ),
    (
        "pywa__msg-button-quick-reply.json",
        IN,
        "quick reply 'title'",
    ),
    ("pywa__msg-edit.json", IN, "edited image caption"),
    (
        "pywa__msg-interactive-button-reply.json",
        IN,
        "button reply 'title'",
    ),
    (
        "pywa__msg-interactive-list-reply-description.json",
        IN,
        "list reply",
    ),
    ("pywa__msg-interactive-list-reply.json", IN, "list reply"),
    (
        "pywa__msg-interactive-without-body-value-errors.json",
        IN,
        "interactive without body; value-level errors ignored",
    ),
    ("pywa__msg-reaction.json", IN, "reaction"),
    ("pywa__msg-referral.json", IN, "text from an ad"),
    ("pywa__msg-revoke.json", NOTHING, "deleted message"),
    (
        "pywa__msg-system-identity-changed.json",
        NOTHING,
        "system notice",
    ),
    (
        "pywa__msg-system-user-changed-number.json",
        NOTHING,
        "system notice",
    ),
    (
        "derived__msg-system-user-changed-user-id.json",
        NOTHING,
        "system notice",
    ),
    ("pywa__msg-text-forwarded.json", IN, "forwarded text"),
    ("pywa__msg-text-reply-context.json", IN, "reply text"),
    ("pywa__msg-text.json", IN, "text"),
    (
        "pywa__msg-unreaction-empty-emoji.json",
        IN,
        "reaction removed",
    ),
    ("pywa__msg-unreaction-no-emoji.json", IN, "reaction removed"),
    ("pywa__msg-unsupported-with-subtype.json", IN, "unsupported"),
    ("pywa__msg-unsupported.json", IN, "unsupported"),
    ("pywa__status-delivered.json", NOTHING, "delivered"),
    (
        "pywa__status-failed-130472.json",
        NOTHING,
        "failure other than 131050",
    ),
    ("pywa__status-played.json", NOTHING, "played"),
    (
        "pywa__status-read-group-recipient.json",
        NOTHING,
        "read in a group",
    ),
    ("pywa__status-read.json", NOTHING, "read"),
    ("pywa__status-sent.json", NOTHING, "sent"),
    (
        "pywa__status-with-biz-opaque-callback-data.json",
        NOTHING,
        "sent",
    ),
    (
        "pywa__user-preferences-resume.json",
        &[(Some(OptedIn), MarketingPreference)],
        "marketing resume",
    ),
    (
        "pywa__user-preferences-signup.json",
        NOTHING,
        "signup is not stop/resume",
    ),
    (
        "pywa__user-preferences-unknown-category.json",
        NOTHING,
        "unknown category",
    ),
    (
        "wajs__v25-msg-text-bsuid.json",
        IN,
        "text with wa_id and BSUID",
    ),
    ("wajs__v25-status-delivered.json", NOTHING, "delivered"),
    ("wajs__v25-status-read.json", NOTHING, "read"),
    ("wajs__v25-status-sent.json", NOTHING, "sent"),
    (
        "derived__user-preferences-stop.json",
        &[(Some(OptedOut), MarketingPreference)],
        "marketing stop",
    ),
    (
        "derived__status-failed-131050.json",
        &[(Some(OptedOut), MarketingSendFailure)],
        "send failed: marketing stopped",
    ),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn events(file: &str) -> Vec<ConsentEvent> {
    let body = std::fs::read(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let received = Timestamp::from_secs(1_800_000_000);
    parse(&body, received, &Detector::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .into_iter()
        .filter_map(|o| match o {
            Observation::Event(e) => Some(e),
            // Identity changes are checked by `system_notices_yield_identity_changes`.
            Observation::IdentityChange(_) => None,
            Observation::TemplateCategory(t) => panic!("{file}: unexpected template {t:?}"),
            Observation::Record(r) => panic!("{file}: unexpected record {r:?}"),
        })
        .collect()
}

#[test]
fn every_fixture_is_in_the_table() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let listed: BTreeSet<String> = TABLE.iter().map(|(f, _, _)| f.to_string()).collect();
    assert_eq!(on_disk, listed);
    assert_eq!(
        on_disk.len(),
        63,
        "60 third-party bodies and 3 derived ones"
    );
}

#[test]
fn every_fixture_yields_the_expected_observations() {
    let mut failures = Vec::new();
    for (file, expect, why) in TABLE {
        let got: Vec<(Option<Status>, Signal)> =
            events(file).iter().map(|e| (e.status, e.signal)).collect();
        if got != *expect {
            failures.push(format!("{file} ({why}): expected {expect:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn inbound_events_carry_ids_times_and_no_message_text() {
    for (file, _, _) in TABLE {
        for e in events(file) {
            assert!(!e.identities.is_empty(), "{file}: no identity");
            assert!(e.message_id.is_some(), "{file}: no message id");
            assert!(
                e.at.millis() < 1_800_000_000_000,
                "{file}: the body's own time is used"
            );
            if e.signal == Inbound {
                assert!(e.inbound && e.status.is_none());
                assert!(
                    e.evidence.starts_with("inbound") || e.evidence.contains("payload"),
                    "{file}: {}",
                    e.evidence
                );
            }
        }
    }
    let text = events("meta-spec__msg-text.json");
    assert_eq!(
        text[0].evidence, "inbound text",
        "ordinary message bodies stay out of the audit log"
    );
    assert_eq!(text[0].at, Timestamp::from_secs(1749416383));
}

#[test]
fn opt_out_fixtures_carry_the_right_identities_and_keys() {
    let unsub = &events("meta-spec__msg-button-unsubscribe.json")[0];
    assert_eq!(unsub.identities, vec![Identity::WaId("16505551234".into())]);
    assert_eq!(unsub.at, Timestamp::from_secs(1_750_091_045));
    assert_eq!(
        unsub.message_id.as_deref(),
        Some("wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUU0M0MxQzQzMUJCMTMwNUZFOQA=")
    );
    assert!(unsub.inbound, "a tapped button opens the reply window");
    assert!(unsub.evidence.contains("Unsubscribe"), "{}", unsub.evidence);

    let stop = &events("derived__user-preferences-stop.json")[0];
    // The preference names 16505551234; the envelope's contact is someone else and is not
    // linked to it.
    assert_eq!(stop.identities, vec![Identity::WaId("16505551234".into())]);
    assert_eq!(
        stop.message_id.as_deref(),
        Some("pref:16505551234:stop:1731705721")
    );
    assert_eq!(stop.at, Timestamp::from_secs(1_731_705_721));
    assert!(!stop.inbound);

    let failed = &events("derived__status-failed-131050.json")[0];
    assert_eq!(failed.message_id.as_deref(), Some("wamid.xyzxyz:failed"));
    // The status names 972987654321, which the contact shows together with its BSUID.
    assert_eq!(
        failed.identities,
        vec![
            Identity::WaId("972987654321".into()),
            Identity::Bsuid("US.13491208655302741918".into())
        ]
    );
}

#[test]
fn bsuid_fixtures_carry_every_identity() {
    let only = &events("netflie__msg-text-bsuid-only-no-from.json")[0];
    assert_eq!(only.identities, vec![Identity::Bsuid("BSUID_123".into())]);
    let both = &events("wajs__v25-msg-text-bsuid.json")[0];
    assert_eq!(
        both.identities,
        vec![
            Identity::WaId("16315551181".into()),
            Identity::Bsuid("US.13491208655302741918".into())
        ]
    );
    let quick = &events("pywa__msg-button-quick-reply.json")[0];
    assert_eq!(
        quick.identities.len(),
        2,
        "contact shares the wa_id, so its BSUID joins"
    );
}

fn changes(file: &str) -> Vec<IdentityChange> {
    let body = std::fs::read(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    parse(
        &body,
        Timestamp::from_secs(1_800_000_000),
        &Detector::default(),
    )
    .unwrap_or_else(|e| panic!("{file}: {e}"))
    .into_iter()
    .filter_map(|o| match o {
        Observation::IdentityChange(c) => Some(c),
        _ => None,
    })
    .collect()
}

/// Real `system` shapes: a number change names the old number as the sender and the new
/// one in `system.wa_id`; a user id change names the new id in `system.user_id`; a new
/// security code (`customer_identity_changed`) changes no identity.
#[test]
fn system_notices_yield_identity_changes() {
    let meta = changes("meta-spec__msg-system.json");
    assert_eq!(meta.len(), 1);
    assert_eq!(meta[0].kind, ChangeKind::Number);
    assert_eq!(meta[0].from, vec![Identity::WaId("16505551234".into())]);
    assert_eq!(meta[0].to, vec![Identity::WaId("12195555358".into())]);
    assert_eq!(meta[0].at, Timestamp::from_secs(1_750_269_342));
    let pywa = changes("pywa__msg-system-user-changed-number.json");
    assert_eq!(pywa[0].from, vec![Identity::WaId("972987654321".into())]);
    assert_eq!(pywa[0].to, vec![Identity::WaId("972912345678".into())]);
    assert_eq!(pywa[0].message_id.as_deref(), Some("wamid.xyzxyz=="));
    let netflie = changes("netflie__msg-system.json");
    assert_eq!(netflie[0].kind, ChangeKind::Number);
    assert!(changes("pywa__msg-system-identity-changed.json").is_empty());
    let bsuid = changes("derived__msg-system-user-changed-user-id.json");
    assert_eq!(bsuid[0].kind, ChangeKind::UserId);
    assert_eq!(
        bsuid[0].from,
        vec![
            Identity::WaId("16505551234".into()),
            Identity::Bsuid("US.13491208655302741918".into())
        ]
    );
    assert_eq!(
        bsuid[0].to,
        vec![Identity::Bsuid("US.20481133079914355021".into())]
    );
}
