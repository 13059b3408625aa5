//! The pre-flight checks against the fake portal, seeded with each misconfiguration, and a
//! push refused for configuration: one request, a configuration alarm, no split.

use std::time::Duration;

use crate::common::{connector, item};
use optout_core::testkit::secret_file;
use optout_core::{Connector, ConnectorError, Finding, Status, Timestamp, Verdict};
use optout_hubspot::fake::{self, FakeOAuth, FakeOptions, Limits, NewContact};
use optout_hubspot::{HubSpot, OAuthConfig};

fn fast() -> FakeOptions {
    FakeOptions {
        limits: Limits::off(),
        ..FakeOptions::default()
    }
}

fn failures(findings: &[Finding]) -> Vec<&Finding> {
    findings.iter().filter(|f| f.is_problem()).collect()
}

#[tokio::test]
async fn a_correct_portal_passes_every_check_and_nothing_is_written() {
    let fake = fake::start(fast()).await;
    let id = fake.create_contact(&[("phone", "+15550100001")]);
    let before = fake.contact(&id).unwrap();
    let findings = connector(&fake, |_| {}).preflight().await;
    assert!(failures(&findings).is_empty(), "{findings:#?}");
    let passed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Pass)
        .count();
    assert_eq!(
        passed, 5,
        "credentials, write scope, three properties: {findings:#?}"
    );
    assert_eq!(fake.contact(&id).unwrap(), before, "read-only");
}

#[tokio::test]
async fn each_misconfiguration_is_one_precise_failure_with_its_fix() {
    let fake = fake::start(fast()).await;
    fake.remove_property("whatsapp_consent_source");
    fake.set_property_options("whatsapp_consent", &["optedout", "opted_in"]);
    let findings = connector(&fake, |_| {}).preflight().await;
    let fails = failures(&findings);
    assert_eq!(fails.len(), 2, "{findings:#?}");
    let text: Vec<String> = fails.iter().map(|f| f.to_string()).collect();
    assert!(
        text[0].contains("property whatsapp_consent has no option `opted_out` (opted_out_value); its options: optedout, opted_in")
            && text[0].contains("fix: add the option `opted_out`"),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("contact property whatsapp_consent_source does not exist")
            && text[1].contains("single-line text"),
        "{}",
        text[1]
    );

    // The scope: the token may read but not write.
    fake.set_scopes(&["crm.objects.contacts.read"]);
    let findings = connector(&fake, |_| {}).preflight().await;
    assert!(
        findings.iter().any(|f| f.is_problem()
            && f.what
                .contains("lacks the crm.objects.contacts.write scope")),
        "{findings:#?}"
    );
}

#[tokio::test]
async fn refused_credentials_stop_the_checks_and_print_no_secret() {
    let fake = fake::start(fast()).await;
    let c = HubSpot::with_token(
        "hs",
        optout_hubspot::Config {
            base_url: fake.base_url(),
            ..Default::default()
        },
        optout_core::Secret::new("pat-na1-wrong-secret"),
    )
    .unwrap();
    let findings = c.preflight().await;
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let line = findings[0].to_string();
    assert!(
        line.contains("HubSpot refused the credentials") && line.contains("private-app token"),
        "{line}"
    );
    assert!(!line.contains("pat-na1-wrong-secret"));
}

#[tokio::test]
async fn oauth_scopes_are_read_from_the_token_metadata() {
    let fake = fake::start(FakeOptions {
        token: None,
        scopes: vec![
            "crm.objects.contacts.read".into(),
            "crm.objects.contacts.write".into(),
        ],
        consent_properties: false,
        oauth: Some(FakeOAuth {
            client_id: "client-1".into(),
            client_secret: "client-secret-1".into(),
            refresh_token: "refresh-token-1".into(),
            expires_in: Duration::from_secs(1800),
        }),
        limits: Limits::off(),
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let c = HubSpot::new(
        "hs",
        optout_hubspot::Config {
            base_url: fake.base_url(),
            oauth: Some(OAuthConfig {
                client_id: "client-1".into(),
                client_secret: secret_file(secrets.path(), "client-secret-1"),
                refresh_token: secret_file(secrets.path(), "refresh-token-1"),
            }),
            create_properties: true,
            ..Default::default()
        },
    )
    .unwrap();
    fake.reset_counts();
    let findings = c.preflight().await;
    let fails = failures(&findings);
    assert_eq!(fails.len(), 3, "{findings:#?}");
    assert!(
        fails.iter().all(|f| f
            .what
            .contains("lacks the crm.schemas.contacts.write scope to create it")),
        "{findings:#?}"
    );
    assert_eq!(
        fake.counts().batch_update,
        0,
        "no probe: the metadata tells"
    );
}

#[tokio::test]
async fn a_batch_naming_a_missing_property_is_one_request_and_a_configuration_alarm() {
    let fake = fake::start(fast()).await;
    let ids = fake.create_contacts(
        (0..100).map(|i| NewContact::new().with("phone", &format!("+4915112345{i:03}"))),
    );
    fake.remove_property("whatsapp_consent");
    let c = connector(&fake, |_| {});
    let batch: Vec<_> = ids
        .iter()
        .map(|id| item(id, Status::OptedOut, Timestamp::now()))
        .collect();
    fake.reset_counts();
    let e = c.push(&batch).await.unwrap_err();
    assert_eq!(fake.counts().batch_update, 1, "no split storm");
    assert!(
        matches!(&e, ConnectorError::Config(m) if m.contains("contact property whatsapp_consent does not exist") && m.contains("fix: create contact property whatsapp_consent")),
        "{e}"
    );
    assert!(e.is_alarm() && !e.is_retryable());
    assert_eq!(
        fake.property(&ids[0], "whatsapp_consent_source"),
        None,
        "nothing written"
    );
}
