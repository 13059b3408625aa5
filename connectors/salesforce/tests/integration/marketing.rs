//! The marketing-consent checkbox (`objects[].marketing_field`): selected and read with
//! every query, written in the same record entry as the consent field, nothing written for
//! an object without one, and an org lacking the field refuses the query and the request
//! as a whole (a configuration error naming it), as the pre-flight says beforehand.

use optout_core::testkit::{poll_to_end, push_item, records};
use optout_core::{Connector, ConnectorError, PushItem, PushOutcome, Scope, Status, Timestamp};
use optout_salesforce::config::EXAMPLE_MARKETING_FIELD as FIELD;
use optout_salesforce::fake::FakeOptions;
use optout_salesforce::{Config, SalesforceConnector};
use serde_json::json;

use crate::against_fake::{Org, connector};

fn marketing(record: &str, status: Status) -> PushItem {
    PushItem {
        key: format!("{record}#marketing"),
        scope: Scope::Marketing,
        ..push_item(record, status, Timestamp::now())
    }
}

/// Contact with the marketing field, Lead without.
fn configured(org: &Org) -> SalesforceConnector {
    let mut config: Config = org.client_credentials();
    config.objects[0].marketing_field = Some(FIELD.into());
    assert_eq!(config.objects[1].name, "Lead");
    connector(config)
}

#[tokio::test]
async fn the_checkbox_is_read_and_written_beside_the_consent_field() {
    let org = Org::start(FakeOptions::default()).await;
    let f = &org.fake;
    let a = f.insert(
        "Contact",
        json!({"LastName": "A", "MobilePhone": "+15550100001", FIELD: true}),
    );
    let b = f.insert(
        "Contact",
        json!({"LastName": "B", "MobilePhone": "+15550100002"}),
    );
    let lead = f.insert(
        "Lead",
        json!({"LastName": "L", "Company": "X", "MobilePhone": "+15550100003"}),
    );
    let c = configured(&org);
    let (obs, _, _) = poll_to_end(&c, None).await;
    let snaps = records(obs);
    let snap = |id: &str| {
        snaps
            .iter()
            .find(|s| s.record.ends_with(id))
            .unwrap()
            .clone()
    };
    assert_eq!(
        (snap(&a).value, snap(&a).marketing),
        (Some(Status::OptedIn), Some(Status::OptedOut))
    );
    assert_eq!(
        snap(&b).marketing,
        Some(Status::OptedIn),
        "an unticked checkbox"
    );
    assert_eq!(
        snap(&lead).marketing,
        None,
        "Lead has no marketing field configured"
    );

    f.reset_counters();
    let batch = [
        push_item(&format!("Contact/{b}"), Status::OptedOut, Timestamp::now()),
        marketing(&format!("Contact/{b}"), Status::OptedOut),
        marketing(&format!("Contact/{a}"), Status::OptedIn),
        marketing(&format!("Lead/{lead}"), Status::OptedOut),
    ];
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done; 4]);
    let counters = f.counters();
    assert_eq!(
        (counters.collections, counters.collection_records),
        (1, 2),
        "one request, one entry per Contact, nothing for the Lead"
    );
    let row = |id: &str| f.get(id).unwrap();
    assert_eq!(
        (
            row(&b)["WhatsApp_Opt_Out__c"].clone(),
            row(&b)[FIELD].clone()
        ),
        (json!(true), json!(true))
    );
    assert_eq!(
        (
            row(&a)["WhatsApp_Opt_Out__c"].clone(),
            row(&a)[FIELD].clone()
        ),
        (json!(false), json!(false))
    );
    assert_eq!(
        row(&lead)[FIELD],
        json!(false),
        "the Lead's own checkbox is not configured"
    );
}

#[tokio::test]
async fn an_org_without_the_field_is_a_configuration_error_named_in_advance() {
    let org = Org::start(FakeOptions::default()).await;
    let a = org.fake.insert(
        "Contact",
        json!({"LastName": "A", "MobilePhone": "+15550100001"}),
    );
    org.fake.remove_field("Contact", FIELD);
    let c = configured(&org);

    let fails: Vec<String> = (c.preflight().await.iter())
        .filter(|f| f.is_problem())
        .map(|f| f.to_string())
        .collect();
    assert_eq!(fails.len(), 1, "{fails:#?}");
    assert!(
        fails[0].contains(&format!("field {FIELD} does not exist on Contact"))
            && fails[0].contains(&format!("fix: create {FIELD} on Contact")),
        "{}",
        fails[0]
    );

    let err = c.poll(None).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config(m) if m.contains("INVALID_FIELD") && m.contains(FIELD)),
        "{err}"
    );
    let out = c
        .push(&[marketing(&format!("Contact/{a}"), Status::OptedOut)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], PushOutcome::RetryLater { after: Some(d), reason } if *d == optout_salesforce::CONFIG_RETRY && reason.contains("INVALID_FIELD")),
        "{out:?}"
    );
    let alarm = c.config_alarm().expect("a configuration alarm");
    assert!(
        alarm.contains("Contact") && alarm.contains(FIELD),
        "{alarm}"
    );
}
