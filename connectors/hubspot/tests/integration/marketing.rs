//! The marketing-consent property (`marketing_property`): read with every search, written
//! beside the consent properties in the same input, created by `create_properties`, checked
//! by the pre-flight, and a portal without it refuses the whole batch (one request, an
//! alarm naming it).

use crate::common::{connector, item, sync};
use optout_core::{Connector, ConnectorError, PushItem, PushOutcome, Scope, Status, Timestamp};
use optout_hubspot::fake::{self, FakeOptions, Limits, MARKETING_PROPERTY};

fn fast() -> FakeOptions {
    FakeOptions {
        limits: Limits::off(),
        ..FakeOptions::default()
    }
}

fn marketing(record: &str, status: Status) -> PushItem {
    PushItem {
        key: format!("{record}#marketing"),
        scope: Scope::Marketing,
        ..item(record, status, Timestamp::now())
    }
}

fn with_marketing(c: &mut optout_hubspot::Config) {
    c.marketing_property = Some(MARKETING_PROPERTY.into());
}

#[tokio::test]
async fn the_marketing_property_is_read_and_written_in_the_same_input() {
    let fake = fake::start(fast()).await;
    fake.add_consent_enumeration(MARKETING_PROPERTY);
    let a = fake.create_contact(&[("phone", "+15550100001"), (MARKETING_PROPERTY, "opted_out")]);
    let b = fake.create_contact(&[("phone", "+15550100002")]);
    let c = connector(&fake, with_marketing);
    let s = sync(&c, None).await;
    let snap = s.last(&a).unwrap();
    assert_eq!((snap.value, snap.marketing), (None, Some(Status::OptedOut)));
    assert!(
        snap.evidence
            .ends_with("whatsapp_marketing_consent=opted_out"),
        "{}",
        snap.evidence
    );
    assert_eq!(s.last(&b).unwrap().marketing, None);

    fake.reset_counts();
    let batch = [
        item(&b, Status::OptedOut, Timestamp::now()),
        marketing(&b, Status::OptedOut),
        marketing(&a, Status::OptedIn),
    ];
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done; 3]);
    assert_eq!(
        fake.counts().batch_update,
        1,
        "one contact named once, one request"
    );
    assert_eq!(
        fake.property(&b, "whatsapp_consent").as_deref(),
        Some("opted_out")
    );
    assert_eq!(
        fake.property(&b, MARKETING_PROPERTY).as_deref(),
        Some("opted_out")
    );
    assert_eq!(
        fake.property(&a, MARKETING_PROPERTY).as_deref(),
        Some("opted_in")
    );
    assert_eq!(
        (
            fake.property(&a, "whatsapp_consent"),
            fake.property(&a, "whatsapp_consent_source")
        ),
        (None, None),
        "a marketing item leaves the consent properties alone"
    );
    let s = sync(&c, None).await;
    assert_eq!(s.last(&a).unwrap().marketing, Some(Status::OptedIn));
}

#[tokio::test]
async fn without_the_setting_nothing_marketing_is_read() {
    let fake = fake::start(fast()).await;
    fake.add_consent_enumeration(MARKETING_PROPERTY);
    let a = fake.create_contact(&[("phone", "+15550100001"), (MARKETING_PROPERTY, "opted_out")]);
    let s = sync(&connector(&fake, |_| {}), None).await;
    let snap = s.last(&a).unwrap();
    assert_eq!(snap.marketing, None);
    assert_eq!(snap.evidence, "whatsapp_consent=");
}

#[tokio::test]
async fn a_portal_without_the_property_refuses_the_batch_once_and_the_alarm_names_it() {
    let fake = fake::start(fast()).await;
    let ids: Vec<String> = (0..20)
        .map(|i| fake.create_contact(&[("phone", &format!("+1555010{i:04}"))]))
        .collect();
    let c = connector(&fake, with_marketing);
    let batch: Vec<PushItem> = ids
        .iter()
        .map(|id| marketing(id, Status::OptedOut))
        .collect();
    fake.reset_counts();
    let e = c.push(&batch).await.unwrap_err();
    assert_eq!(fake.counts().batch_update, 1, "no split storm");
    assert!(
        matches!(&e, ConnectorError::Config(m) if m.contains("contact property whatsapp_marketing_consent does not exist")
            && m.contains("create contact property whatsapp_marketing_consent as a dropdown select (enumeration) with the options `opted_out` and `opted_in`")),
        "{e}"
    );

    // The pre-flight says the same before any push.
    let findings = c.preflight().await;
    let fails: Vec<String> = (findings.iter())
        .filter(|f| f.is_problem())
        .map(|f| f.to_string())
        .collect();
    assert_eq!(fails.len(), 1, "{findings:#?}");
    assert!(
        fails[0].contains("contact property whatsapp_marketing_consent does not exist"),
        "{}",
        fails[0]
    );

    // create_properties creates it (the consent properties exist already), with the options.
    let creating = connector(&fake, |c| {
        with_marketing(c);
        c.create_properties = true;
    });
    let report = creating.ensure_properties().await.unwrap();
    assert!(
        report.contains(&format!("created property {MARKETING_PROPERTY}")),
        "{report:?}"
    );
    assert!(
        report.contains(&"property whatsapp_consent already exists".to_string()),
        "{report:?}"
    );
    assert!(fake.has_property(MARKETING_PROPERTY));
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done; 20]);
    let findings = c.preflight().await;
    assert!(findings.iter().all(|f| !f.is_problem()), "{findings:#?}");
}
