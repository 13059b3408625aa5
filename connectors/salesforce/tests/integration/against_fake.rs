//! The real connector over real HTTP against the fake org on 127.0.0.1.

use std::collections::HashSet;
use std::time::Duration;

use optout_core::testkit::{poll_to_end, push_item, records, secret_file};
use optout_core::{
    Connector, ConnectorError, Cursor, PushItem, PushOutcome, RecordSnapshot, SecretRef, Status,
    Timestamp,
};
use optout_salesforce::fake::{self, FakeHandle, FakeOptions, Faults, JwtTrust};
use optout_salesforce::{AuthConfig, Config, ObjectConfig, SalesforceConnector, soql};
use serde_json::json;
use tempfile::TempDir;

const TEST_KEY: &str = include_str!("../fixtures/jwt-test-key.pem");
const TEST_PUB: &str = include_str!("../fixtures/jwt-test-pub.pem");
const OTHER_KEY: &str = include_str!("../fixtures/jwt-other-key.pem");
const JWT_USER: &str = "integration@acme.example";

/// A fake org and a private directory for secret files (removed on drop).
pub(crate) struct Org {
    pub(crate) fake: FakeHandle,
    dir: TempDir,
}

impl Org {
    pub(crate) async fn start(opts: FakeOptions) -> Org {
        Org {
            fake: fake::start(opts).await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A secret file readable only by its owner, as `SecretRef::File` demands.
    fn secret(&self, value: &str) -> SecretRef {
        secret_file(self.dir.path(), value)
    }

    pub(crate) fn client_credentials(&self) -> Config {
        let opts = self.fake.options();
        let auth = AuthConfig::ClientCredentials {
            client_id: opts.client_id.clone(),
            client_secret: self.secret(&opts.client_secret),
        };
        Config::new(Some(self.fake.base_url()), auth)
    }

    fn jwt(&self, key_pem: &str, username: &str) -> Config {
        let auth = AuthConfig::JwtBearer {
            client_id: "jwt-consumer-key".into(),
            username: username.into(),
            private_key: self.secret(key_pem),
            audience: "https://login.salesforce.com".into(),
        };
        Config::new(Some(self.fake.base_url()), auth)
    }
}

fn jwt_options() -> FakeOptions {
    FakeOptions {
        jwt: Some(JwtTrust {
            public_key_pem: TEST_PUB.into(),
            client_id: "jwt-consumer-key".into(),
            username: JWT_USER.into(),
            audience: "https://login.salesforce.com".into(),
        }),
        ..FakeOptions::default()
    }
}

pub(crate) fn connector(config: Config) -> SalesforceConnector {
    SalesforceConnector::new("salesforce-test", config).unwrap()
}

pub(crate) fn only(objects: &[&str], mut config: Config) -> Config {
    config.objects = objects.iter().map(|o| ObjectConfig::named(o)).collect();
    config
}

/// Polls until `more` is false: (records in order, the final cursor, pages).
async fn drain(
    conn: &SalesforceConnector,
    cursor: Option<Cursor>,
) -> (Vec<RecordSnapshot>, Cursor, usize) {
    let (observations, cursor, pages) = poll_to_end(conn, cursor).await;
    (records(observations), cursor, pages)
}

fn unique(records: &[RecordSnapshot]) -> HashSet<&str> {
    records.iter().map(|r| r.record.as_str()).collect()
}

fn item(record: &str, status: Status) -> PushItem {
    push_item(
        record,
        status,
        Timestamp::parse("2026-05-06T07:08:09.123Z").unwrap(),
    )
}

fn contact(i: usize) -> serde_json::Value {
    json!({"LastName": format!("Person {i}"), "MobilePhone": format!("+1555{i:07}")})
}

// ---------------------------------------------------------------------------------------
// Sessions

/// Shared by both flows: 1,000 rows in pages of 200, every token revoked after page 1.
async fn token_expiry_mid_sync(org: &Org, config: Config) {
    for i in 0..1000 {
        org.fake.insert("Contact", contact(i));
    }
    let mut config = only(&["Contact"], config);
    config.page_size = 200;
    let conn = connector(config);
    let first = conn.poll(None).await.unwrap();
    assert_eq!(first.observations.len(), 200);
    assert!(first.more);
    org.fake.expire_tokens();
    let (rest, _, pages) = drain(&conn, Some(first.cursor)).await;
    assert_eq!(rest.len(), 800, "no page lost or repeated");
    let mut all = records(first.observations);
    all.extend(rest);
    assert_eq!(unique(&all).len(), 1000);
    assert_eq!(pages, 4);
    let c = org.fake.counters();
    assert_eq!(c.token, 2, "one login, one renewal");
    assert_eq!(c.unauthorized, 1);
    assert_eq!(
        (c.query, c.query_more),
        (1, 5),
        "the refused page was fetched again"
    );
}

#[tokio::test]
async fn expired_session_is_renewed_mid_sync_client_credentials() {
    let org = Org::start(FakeOptions::default()).await;
    token_expiry_mid_sync(&org, org.client_credentials()).await;
}

#[tokio::test]
async fn expired_session_is_renewed_mid_sync_jwt_bearer() {
    let org = Org::start(jwt_options()).await;
    token_expiry_mid_sync(&org, org.jwt(TEST_KEY, JWT_USER)).await;
}

#[tokio::test]
async fn refused_logins_are_unauthorized_and_name_no_secret() {
    let org = Org::start(jwt_options()).await;
    let mut bad = org.client_credentials();
    if let AuthConfig::ClientCredentials { client_secret, .. } = &mut bad.auth {
        *client_secret = org.secret("sekrit-wrong-value");
    }
    let conn = connector(bad);
    assert!(!format!("{conn:?}").contains("sekrit"));
    let err = conn.poll(None).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConnectorError::Unauthorized(_)), "{msg}");
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(!msg.contains("sekrit"), "{msg}");

    let err = connector(org.jwt(OTHER_KEY, JWT_USER))
        .poll(None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Unauthorized(m) if m.contains("invalid_grant: invalid assertion")),
        "a signature by an unknown key is refused: {err}"
    );
    let err = connector(org.jwt(TEST_KEY, "someone@else.example"))
        .poll(None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("user hasn't approved this consumer"),
        "{err}"
    );
    assert!(err.is_alarm());
    assert_eq!(
        org.fake.counters().query,
        0,
        "no data call without a session"
    );

    let health = connector(org.jwt(OTHER_KEY, JWT_USER)).health().await;
    assert!(!health.ok);
    assert!(health.detail.contains("unauthorized"), "{}", health.detail);
}

#[tokio::test]
async fn a_session_refused_after_renewal_is_unauthorized_without_a_loop() {
    let org = Org::start(FakeOptions::default()).await;
    org.fake.refuse_sessions(true);
    let conn = connector(org.client_credentials());
    let err = conn.poll(None).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unauthorized(_)), "{err}");
    let c = org.fake.counters();
    assert_eq!((c.token, c.unauthorized, c.query), (2, 2, 2));

    // Tokens that expire at once (a zero session timeout) end the same way.
    org.fake.refuse_sessions(false);
    org.fake.set_token_ttl(Duration::ZERO);
    org.fake.reset_counters();
    let err = conn.poll(None).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unauthorized(_)), "{err}");
    assert_eq!(org.fake.counters().token, 2);
    org.fake.set_token_ttl(Duration::from_secs(3600));
    assert!(conn.poll(None).await.is_ok(), "a working session again");
}

// ---------------------------------------------------------------------------------------
// Polling

#[tokio::test]
async fn rows_committed_late_with_an_older_modstamp_are_read_within_the_overlap() {
    let org = Org::start(FakeOptions::default()).await;
    let base = Timestamp::now().minus(Duration::from_secs(3600));
    org.fake.insert_at("Contact", contact(1), base);
    let newest = org
        .fake
        .insert_at("Contact", contact(2), base.plus(Duration::from_secs(600)));
    // A transaction that started two minutes before `newest` and commits after the sync.
    let late =
        org.fake
            .insert_uncommitted("Contact", contact(3), base.plus(Duration::from_secs(480)));

    let mut config = only(&["Contact"], org.client_credentials());
    config.overlap = Duration::from_secs(300);
    let conn = connector(config.clone());
    let (first, cursor, _) = drain(&conn, None).await;
    assert_eq!(first.len(), 2);
    assert!(!unique(&first).contains(format!("Contact/{late}").as_str()));
    org.fake.commit(&late);

    let (next, _, _) = drain(&conn, Some(cursor.clone())).await;
    let seen = unique(&next);
    assert!(
        seen.contains(format!("Contact/{late}").as_str()),
        "{seen:?}"
    );
    assert!(
        seen.contains(format!("Contact/{newest}").as_str()),
        "the overlap re-reads"
    );
    assert_eq!(next.len(), 2, "rows older than the overlap are not re-read");

    // Without the overlap the late row would be lost: the window is what reads it.
    config.overlap = Duration::ZERO;
    let (without, _, _) = drain(&connector(config), Some(cursor)).await;
    assert!(without.is_empty(), "{without:?}");
}

#[tokio::test]
async fn five_thousand_rows_with_one_modstamp_are_read_exactly_once() {
    let org = Org::start(FakeOptions::default()).await;
    let t = Timestamp::parse("2026-02-03T04:05:06Z").unwrap();
    for i in 0..5000 {
        org.fake.insert_at("Contact", contact(i), t);
    }
    let mut config = org.client_credentials(); // Contact and Lead
    config.page_size = 200;
    let conn = connector(config);
    let mut cursor = None;
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let page = conn.poll(cursor.as_ref()).await.unwrap();
        pages += 1;
        all.extend(records(page.observations));
        if let Some(p) = page.progress {
            assert_eq!(p.done as usize, all.len());
        }
        cursor = Some(page.cursor);
        if !page.more {
            break;
        }
    }
    assert_eq!(all.len(), 5000);
    assert_eq!(unique(&all).len(), 5000);
    assert!(all.iter().all(|r| r.modified_at == t));
    assert_eq!(pages, 26, "25 Contact pages and one (empty) Lead page");
    let c = org.fake.counters();
    assert_eq!((c.query, c.query_more), (2, 24));

    // The next pass starts over from the position (minus the overlap): the tie group again,
    // but nothing newer, and `more` ends it.
    org.fake.reset_counters();
    let (again, _, _) = drain(&conn, cursor).await;
    assert_eq!(unique(&again).len(), 5000);
}

/// Like Salesforce, the fake stamps `SystemModstamp` in whole seconds, so rows written
/// together share a stamp; the queries carry whole-second literals (the fake refuses a
/// fraction, as Salesforce documents none). Read in pages across an expired locator, every
/// row comes once; a row edited afterwards within the same second, with the smallest Id,
/// is still read by the next pass.
#[tokio::test]
async fn rows_stamped_in_one_second_are_read_once_and_a_same_second_edit_is_not_skipped() {
    let org = Org::start(FakeOptions::default()).await;
    let ids: Vec<String> = (0..600)
        .map(|i| org.fake.insert("Contact", contact(i)))
        .collect();
    let stamps: HashSet<String> = ids
        .iter()
        .map(|id| {
            org.fake.get(id).unwrap()["SystemModstamp"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        stamps.iter().all(|s| s.contains(".000+")),
        "whole seconds: {stamps:?}"
    );
    assert!(
        stamps.len() <= 3,
        "600 rows written at once share their second: {stamps:?}"
    );

    let mut config = only(&["Contact"], org.client_credentials());
    config.page_size = 200;
    let conn = connector(config);
    let first = conn.poll(None).await.unwrap();
    let mut all = records(first.observations);
    org.fake.expire_locators();
    let (rest, cursor, _) = drain(&conn, Some(first.cursor)).await;
    all.extend(rest);
    assert_eq!(all.len(), 600, "nothing re-read, nothing skipped");
    assert_eq!(unique(&all).len(), 600);

    // The edit lands in the newest position's second (or the next), with the smallest Id.
    org.fake
        .update(&ids[0], json!({"WhatsApp_Opt_Out__c": true}));
    let (again, _, pages) = drain(&conn, Some(cursor)).await;
    let edited = again
        .iter()
        .find(|r| r.record == format!("Contact/{}", ids[0]))
        .expect("the same-second edit is read");
    assert_eq!(edited.value, Some(Status::OptedOut));
    assert!(pages <= 5, "the pass ends: {pages} pages");
}

#[tokio::test]
async fn an_expired_query_locator_resumes_exactly_after_the_last_row() {
    let org = Org::start(FakeOptions::default()).await;
    let t = Timestamp::parse("2026-02-03T04:05:06Z").unwrap();
    for i in 0..5000 {
        org.fake.insert_at("Contact", contact(i), t);
    }
    let mut config = only(&["Contact"], org.client_credentials());
    config.page_size = 200;
    let conn = connector(config);
    let mut cursor = None;
    let mut all = Vec::new();
    for _ in 0..3 {
        let page = conn.poll(cursor.as_ref()).await.unwrap();
        all.extend(records(page.observations));
        cursor = Some(page.cursor);
    }
    org.fake.expire_locators();
    let (rest, cursor, _) = drain(&conn, cursor).await;
    all.extend(rest);
    assert_eq!(all.len(), 5000, "nothing re-read, nothing skipped");
    assert_eq!(unique(&all).len(), 5000);
    let c = org.fake.counters();
    assert_eq!(c.query, 2, "one fresh query after the locator expired");

    // A new pass reaches back by the overlap, below the newest position; a locator that
    // expires there resumes after the last row of this pass, not after the position.
    let first = conn.poll(Some(&cursor)).await.unwrap();
    assert_eq!(first.observations.len(), 200);
    org.fake.expire_locators();
    let (rest, _, _) = drain(&conn, Some(first.cursor)).await;
    assert_eq!(rest.len(), 4800);
}

#[tokio::test]
async fn soql_built_from_data_is_escaped() {
    let org = Org::start(FakeOptions::default()).await;
    // Ids are data too: the resumed query carries the last one as a literal.
    let t = Timestamp::parse("2026-02-03T04:05:06Z").unwrap();
    let hostile = |i: usize| format!("{i:03}' OR Id != '\\{i}\"\\'");
    for i in 0..250 {
        org.fake
            .insert_with_id("Contact", &hostile(i), contact(i), t);
    }
    let mut config = only(&["Contact"], org.client_credentials());
    config.page_size = 200;
    let conn = connector(config);
    let first = conn.poll(None).await.unwrap();
    let mut all = records(first.observations);
    assert_eq!(
        all.last().unwrap().record,
        format!("Contact/{}", hostile(199))
    );
    org.fake.expire_locators();
    let (rest, _, _) = drain(&conn, Some(first.cursor)).await;
    all.extend(rest);
    assert_eq!(all.len(), 250, "the resumed query kept its meaning");
    assert_eq!(unique(&all).len(), 250);

    // And a value with quotes and backslashes finds exactly its own row through the parser.
    let names = [
        "O'Brien",
        "O\\'Brien",
        "O\\",
        "O\\\\'",
        "x' OR LastName != 'y",
        "Obrien",
    ];
    for n in names {
        org.fake.insert("Contact", json!({"LastName": n}));
    }
    let http = reqwest::Client::new();
    let opts = org.fake.options();
    let token: serde_json::Value = http
        .post(format!("{}/services/oauth2/token", org.fake.base_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &opts.client_id),
            ("client_secret", &opts.client_secret),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = |q: String| {
        let http = http.clone();
        let url = format!("{}/services/data/v62.0/query", org.fake.base_url());
        let token = token["access_token"].as_str().unwrap().to_string();
        async move {
            let r = http
                .get(url)
                .bearer_auth(token)
                .query(&[("q", q)])
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    for n in names {
        let (status, body) = run(format!(
            "SELECT Id, LastName FROM Contact WHERE LastName = {}",
            soql::string_literal(n)
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["totalSize"], 1, "{n}: {body}");
        assert_eq!(body["records"][0]["LastName"], n);
    }
    let (status, body) = run(format!(
        "SELECT Id FROM Contact WHERE LastName = '{}'",
        "O'Brien"
    ))
    .await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (400, Some("MALFORMED_QUERY"))
    );
}

#[tokio::test]
async fn a_missing_field_is_a_configuration_error() {
    let org = Org::start(FakeOptions::default()).await;
    let mut config = only(&["Contact"], org.client_credentials());
    config.objects[0].consent_field = "No_Such_Field__c".into();
    let err = connector(config).poll(None).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config(m) if m.contains("INVALID_FIELD") && m.contains("No_Such_Field__c")),
        "{err}"
    );
    assert!(err.is_alarm() && !err.is_retryable());
}

// ---------------------------------------------------------------------------------------
// Pushing

#[tokio::test]
async fn an_opt_out_reaches_every_contact_lead_and_messaging_end_user_with_the_number() {
    let org = Org::start(FakeOptions::default()).await;
    let f = &org.fake;
    let c1 = f.insert(
        "Contact",
        json!({"LastName": "A", "MobilePhone": "+1 (555) 010-0001"}),
    );
    let c2 = f.insert(
        "Contact",
        json!({"LastName": "B", "Phone": "555-010-0001", "MobilePhone": "+15550109999"}),
    );
    let l1 = f.insert(
        "Lead",
        json!({"LastName": "C", "Company": "X", "Phone": "15550100001"}),
    );
    let m1 = f.insert("MessagingEndUser", json!({"Name": "wa", "MessageType": "WhatsApp",
        "MessagingPlatformKey": "whatsapp:+15550100001", "MessagingConsentStatus": "ImplicitlyOptedIn"}));
    // The same number on SMS is another channel: not read, not written.
    let sms = f.insert(
        "MessagingEndUser",
        json!({"Name": "sms", "MessageType": "Text",
        "MessagingPlatformKey": "+15550100001", "MessagingConsentStatus": "ExplicitlyOptedIn"}),
    );
    let other = f.insert(
        "Contact",
        json!({"LastName": "D", "MobilePhone": "+15550100002"}),
    );

    let mut config = org.client_credentials();
    config.messaging_end_user = true;
    for o in &mut config.objects {
        o.source_field = Some("WhatsApp_Consent_Source__c".into());
    }
    let conn = connector(config);
    let (records, cursor, _) = drain(&conn, None).await;
    assert_eq!(records.len(), 5, "the SMS row is not read");
    let mut by_record = std::collections::HashMap::new();
    for r in &records {
        by_record.insert(r.record.clone(), r.clone());
    }
    let meu = &by_record[&format!("MessagingEndUser/{m1}")];
    assert_eq!(meu.phones, ["+15550100001"]);
    assert_eq!(meu.value, None, "implicit opt-in is no decision");
    assert_eq!(
        by_record[&format!("Contact/{c1}")].value,
        Some(Status::OptedIn)
    );
    assert_eq!(
        by_record[&format!("Contact/{c2}")].phones,
        ["+15550109999", "555-010-0001"]
    );

    // The core's job, reduced: every record with the number's last ten digits.
    let digits = |p: &str| p.chars().filter(char::is_ascii_digit).collect::<String>();
    let targets: Vec<&RecordSnapshot> = records
        .iter()
        .filter(|r| r.phones.iter().any(|p| digits(p).ends_with("5550100001")))
        .collect();
    assert_eq!(targets.len(), 4);
    let batch: Vec<PushItem> = targets
        .iter()
        .map(|r| item(&r.record, Status::OptedOut))
        .collect();
    let outcomes = conn.push(&batch).await.unwrap();
    assert_eq!(outcomes, vec![PushOutcome::Done; 4]);
    assert_eq!(org.fake.counters().collections, 1);

    for id in [&c1, &c2, &l1] {
        let row = f.get(id).unwrap();
        assert_eq!(row["WhatsApp_Opt_Out__c"], true, "{row}");
        assert_eq!(
            row["WhatsApp_Consent_Changed_At__c"],
            "2026-05-06T07:08:09.123Z"
        );
        assert_eq!(row["WhatsApp_Consent_Source__c"], "whatsapp:keyword");
    }
    assert_eq!(f.get(&m1).unwrap()["MessagingConsentStatus"], "OptedOut");
    assert_eq!(
        f.get(&sms).unwrap()["MessagingConsentStatus"],
        "ExplicitlyOptedIn"
    );
    assert_eq!(f.get(&other).unwrap()["WhatsApp_Opt_Out__c"], false);

    // Read back: the writes bumped SystemModstamp, so the next pass shows them.
    let (after, _, _) = drain(&conn, Some(cursor)).await;
    let out: HashSet<&str> = after
        .iter()
        .filter(|r| r.value == Some(Status::OptedOut))
        .map(|r| r.record.as_str())
        .collect();
    assert_eq!(out, targets.iter().map(|r| r.record.as_str()).collect());
    let c1_after = after
        .iter()
        .find(|r| r.record == format!("Contact/{c1}"))
        .unwrap();
    assert_eq!(
        c1_after.changed_at,
        Timestamp::parse("2026-05-06T07:08:09.123Z")
    );
    assert_eq!(c1_after.evidence, "WhatsApp_Opt_Out__c=true");

    // An opt-in writes the other value on each kind of record.
    let back = conn
        .push(&[
            item(&format!("MessagingEndUser/{m1}"), Status::OptedIn),
            item(&format!("Contact/{c1}"), Status::OptedIn),
        ])
        .await
        .unwrap();
    assert_eq!(back, vec![PushOutcome::Done; 2]);
    assert_eq!(
        f.get(&m1).unwrap()["MessagingConsentStatus"],
        "ExplicitlyOptedIn"
    );
    assert_eq!(f.get(&c1).unwrap()["WhatsApp_Opt_Out__c"], false);
}

#[tokio::test]
async fn per_record_failures_are_reported_per_item_without_blocking_the_batch() {
    let org = Org::start(FakeOptions::default()).await;
    let f = &org.fake;
    let ok = f.insert("Contact", contact(1));
    let deleted = f.insert("Contact", contact(2));
    let locked = f.insert("Contact", contact(3));
    let lead = f.insert("Lead", json!({"LastName": "L", "Company": "X"}));
    let twice = f.insert("Contact", contact(4));
    let torn = f.insert("Contact", contact(5));
    f.delete(&deleted);
    f.lock(&[&locked]);
    // This org's Lead has no source field: Salesforce refuses any request writing it to a
    // Lead as a whole (INVALID_FIELD); the connector sends the rest again without the Lead.
    f.remove_field("Lead", "WhatsApp_Consent_Source__c");

    let mut config = org.client_credentials();
    for o in &mut config.objects {
        o.source_field = Some("WhatsApp_Consent_Source__c".into());
    }
    let conn = connector(config);
    let c = |id: &str| format!("Contact/{id}");
    let batch = vec![
        item(&c(&deleted), Status::OptedOut),
        item(&c(&ok), Status::OptedOut),
        item(&format!("Lead/{lead}"), Status::OptedOut),
        item(&c(&locked), Status::OptedOut),
        item(&c(&twice), Status::OptedOut),
        item("Contact/not-an-id", Status::OptedOut),
        item(&c(&twice), Status::OptedOut),
        item(&c(&torn), Status::OptedIn),
        item(&c(&torn), Status::OptedOut),
        item("Account/001xx0000000001AAA", Status::OptedOut),
    ];
    let out = conn.push(&batch).await.unwrap();
    assert_eq!(out.len(), batch.len());
    let reason = |o: &PushOutcome| match o {
        PushOutcome::Rejected { reason } => format!("rejected {reason}"),
        PushOutcome::RetryLater { reason, .. } => format!("retry {reason}"),
        PushOutcome::Done => "done".into(),
    };
    let got: Vec<String> = out.iter().map(reason).collect();
    assert!(got[0].starts_with("rejected ENTITY_IS_DELETED"), "{got:?}");
    assert_eq!(got[1], "done");
    assert!(
        got[2].starts_with("retry Salesforce refused every write to Lead (INVALID_FIELD)")
            && got[2].contains("WhatsApp_Consent_Source__c"),
        "{got:?}"
    );
    assert!(
        matches!(&out[2], PushOutcome::RetryLater { after: Some(a), .. } if *a == optout_salesforce::CONFIG_RETRY)
    );
    let alarm = conn.config_alarm().expect("a configuration alarm");
    assert!(
        alarm.contains("Lead") && alarm.contains("WhatsApp_Consent_Source__c"),
        "{alarm}"
    );
    assert!(got[3].starts_with("retry UNABLE_TO_LOCK_ROW"), "{got:?}");
    assert_eq!((got[4].as_str(), got[6].as_str()), ("done", "done"));
    assert!(got[5].starts_with("rejected MALFORMED_ID"), "{got:?}");
    assert!(got[7].starts_with("rejected another item"), "{got:?}");
    assert_eq!(got[8], "done", "the opt-out wins a conflict");
    assert!(got[9].starts_with("rejected"), "{got:?}");
    let counters = org.fake.counters();
    assert_eq!(
        counters.collections, 2,
        "once refused for the Lead, once without it"
    );
    assert_eq!(
        counters.collection_records, 5,
        "duplicates and local rejects not sent; the refused request wrote nothing"
    );

    assert_eq!(f.get(&ok).unwrap()["WhatsApp_Opt_Out__c"], true);
    assert_eq!(f.get(&twice).unwrap()["WhatsApp_Opt_Out__c"], true);
    assert_eq!(f.get(&torn).unwrap()["WhatsApp_Opt_Out__c"], true);
    assert_eq!(f.get(&locked).unwrap()["WhatsApp_Opt_Out__c"], false);

    // The lock clears; the retried item goes through.
    f.unlock_all();
    let retried = conn
        .push(&[item(&c(&locked), Status::OptedOut)])
        .await
        .unwrap();
    assert_eq!(retried, [PushOutcome::Done]);
}

#[tokio::test]
async fn ten_thousand_suppressions_take_at_most_53_collection_requests() {
    let org = Org::start(FakeOptions::default()).await;
    let mut records = Vec::new();
    for i in 0..5000 {
        records.push(format!(
            "Contact/{}",
            org.fake.insert("Contact", contact(i))
        ));
        let lead = org
            .fake
            .insert("Lead", json!({"LastName": format!("L{i}"), "Company": "X"}));
        records.push(format!("Lead/{lead}"));
    }
    // One row in a hundred is locked on the first attempt.
    let locked: Vec<&str> = records
        .iter()
        .step_by(100)
        .map(|r| r.split_once('/').unwrap().1)
        .collect();
    org.fake.lock(&locked);
    let conn = connector(org.client_credentials());
    assert_eq!(conn.max_batch(), 200);
    let items: Vec<PushItem> = records.iter().map(|r| item(r, Status::OptedOut)).collect();
    let mut retry = Vec::new();
    for chunk in items.chunks(conn.max_batch()) {
        for (it, o) in chunk.iter().zip(conn.push(chunk).await.unwrap()) {
            match o {
                PushOutcome::Done => {}
                PushOutcome::RetryLater { .. } => retry.push(it.clone()),
                PushOutcome::Rejected { reason } => panic!("{reason}"),
            }
        }
    }
    assert_eq!(retry.len(), 100);
    org.fake.unlock_all();
    for chunk in retry.chunks(conn.max_batch()) {
        assert!(
            conn.push(chunk)
                .await
                .unwrap()
                .iter()
                .all(|o| *o == PushOutcome::Done)
        );
    }
    let c = org.fake.counters();
    println!(
        "10,000 suppressions (100 locked once): {} collection requests, {} records sent",
        c.collections, c.collection_records
    );
    assert!(c.collections <= 53, "{c:?}");
    assert_eq!(c.collections, 51);
    assert!(
        org.fake
            .ids("Contact")
            .iter()
            .all(|id| org.fake.get(id).unwrap()["WhatsApp_Opt_Out__c"] == true)
    );
}

// ---------------------------------------------------------------------------------------
// Limits and faults

#[tokio::test]
async fn request_limit_exceeded_is_quota_exhausted_without_a_retry_storm() {
    let org = Org::start(FakeOptions::default()).await;
    let id = org.fake.insert("Contact", contact(1));
    org.fake.set_api_usage(1000, 1000);
    let mut config = org.client_credentials();
    config.api_share = 1.0;
    let conn = connector(config);
    let err = conn.poll(None).await.unwrap_err();
    let ConnectorError::QuotaExhausted { retry_after, .. } = &err else {
        panic!("{err}")
    };
    assert!(*retry_after >= Duration::from_secs(3600));
    assert!(err.is_alarm() && err.is_retryable());
    // Calls during the pause fail locally: nothing reaches Salesforce.
    for _ in 0..5 {
        assert!(matches!(
            conn.poll(None).await,
            Err(ConnectorError::QuotaExhausted { .. })
        ));
        assert!(matches!(
            conn.push(&[item(&format!("Contact/{id}"), Status::OptedOut)])
                .await,
            Err(ConnectorError::QuotaExhausted { .. })
        ));
    }
    let c = org.fake.counters();
    assert_eq!((c.query, c.collections, c.limit_exceeded), (1, 0, 1));
}

#[tokio::test]
async fn api_share_stops_the_connector_before_the_org_limit() {
    let org = Org::start(FakeOptions::default()).await;
    let id = org.fake.insert("Contact", contact(1));
    org.fake.set_api_usage(440, 1000);
    let mut config = org.client_credentials();
    config.api_share = 0.45;
    config.quota_pause = Duration::from_millis(200);
    let conn = connector(config);
    let one = [item(&format!("Contact/{id}"), Status::OptedOut)];
    let mut sent = 0;
    let err = loop {
        match conn.push(&one).await {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "never slowed down");
    };
    assert!(
        matches!(err, ConnectorError::QuotaExhausted { .. }),
        "{err}"
    );
    assert!(err.retry_after().unwrap() <= Duration::from_millis(200));
    assert_eq!(sent, 10, "stopped once the org reached 450 of 1000");
    assert_eq!(org.fake.api_usage(), (450, 1000));
    assert_eq!(
        org.fake.counters().limit_exceeded,
        0,
        "the org never ran out"
    );
    assert_eq!(conn.api_usage(), Some((450, 1000)));

    // After the pause one probe goes out; usage has fallen (the window rolled), so work resumes.
    org.fake.set_api_usage(300, 1000);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(conn.push(&one).await.unwrap(), [PushOutcome::Done]);
    let health = conn.health().await;
    assert!(health.ok, "{}", health.detail);
    assert!(health.detail.contains("302/1000"), "{}", health.detail);
}

#[tokio::test]
async fn faults_are_transient_and_the_cursor_holds() {
    let org = Org::start(FakeOptions::default()).await;
    for i in 0..600 {
        org.fake.insert("Contact", contact(i));
    }
    let mut config = only(&["Contact"], org.client_credentials());
    config.page_size = 200;
    config.timeout = Duration::from_millis(500);
    let conn = connector(config);
    let first = conn.poll(None).await.unwrap();
    let mut all = records(first.observations);
    let cursor = first.cursor;
    let faults = [
        Faults {
            server_error_rate: 1.0,
            ..Faults::default()
        },
        Faults {
            drop_rate: 1.0,
            ..Faults::default()
        },
        Faults {
            malformed_rate: 1.0,
            ..Faults::default()
        },
        Faults {
            slow_rate: 1.0,
            slow_delay: Duration::from_secs(2),
            ..Faults::default()
        },
    ];
    for f in faults {
        org.fake.set_faults(f.clone());
        let err = conn.poll(Some(&cursor)).await.unwrap_err();
        assert!(matches!(err, ConnectorError::Transient(_)), "{f:?}: {err}");
        assert!(err.is_retryable() && !err.is_alarm());
    }
    org.fake.set_faults(Faults::default());
    let (rest, _, _) = drain(&conn, Some(cursor)).await;
    all.extend(rest);
    assert_eq!(all.len(), 600);
    assert_eq!(unique(&all).len(), 600);

    // A push whose answer is lost may have been applied; the retry is harmless.
    let id = org.fake.ids("Contact")[0].clone();
    org.fake.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let batch = [item(&format!("Contact/{id}"), Status::OptedOut)];
    assert!(matches!(
        conn.push(&batch).await,
        Err(ConnectorError::Transient(_))
    ));
    org.fake.set_faults(Faults::default());
    assert_eq!(conn.push(&batch).await.unwrap(), [PushOutcome::Done]);
    assert_eq!(org.fake.get(&id).unwrap()["WhatsApp_Opt_Out__c"], true);
}

#[tokio::test]
async fn health_reports_the_orgs_api_usage() {
    let org = Org::start(FakeOptions::default()).await;
    org.fake.set_api_usage(1234, 100_000);
    let health = connector(org.client_credentials()).health().await;
    assert!(health.ok);
    assert!(health.detail.contains("1235/100000"), "{}", health.detail);
    assert_eq!(org.fake.counters().limits, 1);
}

// ---------------------------------------------------------------------------------------
// The fake's own fidelity, over raw HTTP

async fn raw_token(org: &Org) -> String {
    let opts = org.fake.options();
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/services/oauth2/token", org.fake.base_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &opts.client_id),
            ("client_secret", &opts.client_secret),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["instance_url"], org.fake.base_url());
    v["access_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn fake_pages_and_updates_like_salesforce() {
    let org = Org::start(FakeOptions::default()).await;
    for i in 0..2100 {
        org.fake.insert("Contact", contact(i));
    }
    let meu = org.fake.insert(
        "MessagingEndUser",
        json!({"MessageType": "WhatsApp", "MessagingPlatformKey": "+1"}),
    );
    let token = raw_token(&org).await;
    let http = reqwest::Client::new();
    let base = org.fake.base_url();
    let page = |batch: Option<&'static str>| {
        let mut r = http
            .get(format!("{base}/services/data/v62.0/query"))
            .bearer_auth(&token)
            .query(&[("q", "SELECT Id FROM Contact ORDER BY Id")]);
        if let Some(b) = batch {
            r = r.header("Sforce-Query-Options", b);
        }
        async move {
            let resp = r.send().await.unwrap();
            assert!(
                resp.headers()["sforce-limit-info"]
                    .to_str()
                    .unwrap()
                    .starts_with("api-usage=")
            );
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let sizes = [
        (None, 2000),
        (Some("batchSize=50"), 200),
        (Some("batchSize=700"), 700),
        (Some("batchSize=5000"), 2000),
    ];
    for (header, expected) in sizes {
        let v = page(header).await;
        assert_eq!(
            v["records"].as_array().unwrap().len(),
            expected,
            "{header:?}"
        );
        assert_eq!(
            (v["totalSize"].as_u64(), v["done"].as_bool()),
            (Some(2100), Some(false))
        );
    }

    let patch = |body: serde_json::Value| {
        let r = http
            .patch(format!("{base}/services/data/v62.0/composite/sobjects"))
            .bearer_auth(&token)
            .json(&body);
        async move {
            let resp = r.send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let ids = org.fake.ids("Contact");
    let rec = |id: &str| json!({"attributes": {"type": "Contact"}, "id": id, "WhatsApp_Opt_Out__c": true});
    let too_many: Vec<_> = ids.iter().take(201).map(|id| rec(id)).collect();
    let (status, body) = patch(json!({"allOrNone": false, "records": too_many})).await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (400, Some("EXCEEDED_ID_LIMIT"))
    );

    // A field the object lacks: the whole request is refused, with a request-level error.
    let unknown = json!({"attributes": {"type": "Contact"}, "id": ids[1], "Nope__c": 1});
    let (status, body) = patch(json!({"records": [rec(&ids[0]), unknown]})).await;
    assert_eq!(
        (
            status,
            body[0]["errorCode"].as_str(),
            body[0]["fields"][0].as_str()
        ),
        (400, Some("INVALID_FIELD"), Some("Nope__c"))
    );
    assert_eq!(org.fake.get(&ids[0]).unwrap()["WhatsApp_Opt_Out__c"], false);

    // allOrNone: one bad record rolls back the good one.
    let bad =
        json!({"attributes": {"type": "Contact"}, "id": ids[1], "WhatsApp_Opt_Out__c": "yes"});
    let (status, body) = patch(json!({"allOrNone": true, "records": [rec(&ids[0]), bad]})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(
        body[1]["errors"][0]["statusCode"],
        "INVALID_TYPE_ON_FIELD_IN_RECORD"
    );
    assert_eq!(org.fake.get(&ids[0]).unwrap()["WhatsApp_Opt_Out__c"], false);

    // MessagingEndUser: the platform key is create-only, the consent picklist restricted.
    let m = |field: &str, value: &str| json!({"attributes": {"type": "MessagingEndUser"}, "id": meu, field: value});
    let (_, body) = patch(
        json!({"records": [m("MessagingPlatformKey", "+2"), m("MessagingConsentStatus", "Maybe"),
        m("MessagingConsentStatus", "OptedOut")]}),
    )
    .await;
    assert_eq!(
        body[0]["errors"][0]["statusCode"],
        "INVALID_FIELD_FOR_INSERT_UPDATE"
    );
    assert_eq!(
        body[1]["errors"][0]["statusCode"],
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    );
    assert_eq!(body[2]["success"], true);
    assert_eq!(
        org.fake.get(&meu).unwrap()["MessagingConsentStatus"],
        "OptedOut"
    );
}

#[tokio::test]
async fn demo_seed_links_one_number_across_three_objects() {
    let org = Org::start(FakeOptions::default()).await;
    let holders = org.fake.seed_demo();
    let mut config = org.client_credentials();
    config.messaging_end_user = true;
    let (records, _, _) = drain(&connector(config), None).await;
    assert_eq!(records.len(), 5);
    let digits = |p: &str| p.chars().filter(char::is_ascii_digit).collect::<String>();
    let mut with_number: Vec<String> = records
        .iter()
        .filter(|r| r.phones.iter().any(|p| digits(p) == "15550100001"))
        .map(|r| r.record.split_once('/').unwrap().1.to_string())
        .collect();
    with_number.sort();
    let mut holders = holders;
    holders.sort();
    assert_eq!(with_number, holders);
}
