//! The pre-flight checks against the fake org (login with both flows, describe of every
//! configured object), and a write Salesforce refuses for one object's missing field: a
//! configuration alarm naming object and field, the other objects still written.

use optout_core::testkit::push_item;
use optout_core::{Connector, Finding, PushOutcome, Status, Timestamp, Verdict};
use optout_salesforce::fake::FakeOptions;
use serde_json::json;

use crate::against_fake::{Org, connector};

fn failures(findings: &[Finding]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.is_problem())
        .map(|f| f.to_string())
        .collect()
}

#[tokio::test]
async fn a_correct_org_passes_and_the_session_lifetime_is_unchecked() {
    let org = Org::start(FakeOptions::default()).await;
    let mut config = org.client_credentials();
    config.messaging_end_user = true;
    let findings = connector(config).preflight().await;
    assert!(failures(&findings).is_empty(), "{findings:#?}");
    let passed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Pass)
        .count();
    assert_eq!(
        passed, 4,
        "login, Contact, Lead, MessagingEndUser: {findings:#?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.verdict == Verdict::Unchecked && f.what.contains("expires"))
    );
    assert_eq!(org.fake.counters().describe, 3);
    assert_eq!(org.fake.counters().collections, 0, "read-only");
}

#[tokio::test]
async fn missing_and_read_only_fields_and_a_refused_login_are_named_with_their_fix() {
    let org = Org::start(FakeOptions::default()).await;
    org.fake.remove_field("Lead", "WhatsApp_Opt_Out__c");
    org.fake
        .set_field_updateable("Contact", "WhatsApp_Consent_Changed_At__c", false);
    let fails = failures(&connector(org.client_credentials()).preflight().await);
    assert_eq!(fails.len(), 2, "{fails:#?}");
    assert!(
        fails[0].contains("field Contact.WhatsApp_Consent_Changed_At__c is not editable")
            && fails[0].contains("fix: give the integration user Edit"),
        "{}",
        fails[0]
    );
    assert!(
        fails[1].contains("field WhatsApp_Opt_Out__c does not exist on Lead")
            && fails[1].contains("fix: create WhatsApp_Opt_Out__c on Lead"),
        "{}",
        fails[1]
    );

    let mut wrong = org.client_credentials();
    if let optout_salesforce::AuthConfig::ClientCredentials { client_id, .. } = &mut wrong.auth {
        *client_id = "someone-else".into();
    }
    let fails = failures(&connector(wrong).preflight().await);
    assert_eq!(fails.len(), 1, "{fails:#?}");
    assert!(
        fails[0].contains("invalid_client") && fails[0].contains("client credentials flow"),
        "{}",
        fails[0]
    );
    assert!(!fails[0].contains(&org.fake.options().client_secret));
}

#[tokio::test]
async fn a_field_missing_on_one_object_holds_back_that_object_only() {
    let org = Org::start(FakeOptions::default()).await;
    let f = &org.fake;
    let contacts: Vec<String> = (0..3)
        .map(|i| f.insert("Contact", json!({"LastName": format!("C{i}")})))
        .collect();
    let lead = f.insert("Lead", json!({"LastName": "L", "Company": "X"}));
    f.remove_field("Lead", "WhatsApp_Opt_Out__c");
    let conn = connector(org.client_credentials());
    let mut batch: Vec<_> = (contacts.iter())
        .map(|id| push_item(&format!("Contact/{id}"), Status::OptedOut, Timestamp::now()))
        .collect();
    batch.push(push_item(
        &format!("Lead/{lead}"),
        Status::OptedOut,
        Timestamp::now(),
    ));
    let out = conn.push(&batch).await.unwrap();
    assert_eq!(
        &out[..3],
        &[PushOutcome::Done, PushOutcome::Done, PushOutcome::Done]
    );
    assert!(
        matches!(&out[3], PushOutcome::RetryLater { reason, .. } if reason.contains("Lead")),
        "{out:?}"
    );
    for id in &contacts {
        assert_eq!(f.get(id).unwrap()["WhatsApp_Opt_Out__c"], true);
    }
    assert_eq!(
        f.counters().collections,
        2,
        "bounded: one refused request, one without the Lead"
    );
    let alarm = conn.config_alarm().unwrap();
    assert!(
        alarm.contains("Lead")
            && alarm.contains("WhatsApp_Opt_Out__c")
            && alarm.contains("INVALID_FIELD"),
        "{alarm}"
    );

    // Only Contacts next time: nothing refused, but the Lead is still unfixed.
    let c = push_item(
        &format!("Contact/{}", contacts[0]),
        Status::OptedIn,
        Timestamp::now(),
    );
    assert_eq!(conn.push(&[c]).await.unwrap(), vec![PushOutcome::Done]);
    assert!(conn.config_alarm().is_some(), "the Lead is not written yet");
}
