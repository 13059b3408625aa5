//! Template webhooks (`template_category_update`, `message_template_status_update`): the
//! real bodies in `tests/fixtures/templates/` become template categories timed by the
//! entry's `time`, and the connector's poll carries them, signed through the webhook route,
//! after the configured ones.

use std::time::Duration;

use crate::common::*;
use optout_core::testkit::FakeServer;
use optout_core::{Connector, Observation, TemplateCategory, Timestamp};
use optout_whatsapp::Detector;
use optout_whatsapp::WEBHOOK_PATH;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope;
use optout_whatsapp::parse::{Part, Why, parse, parts};

fn fixture(file: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{file}: {e}"))
}

const RECEIVED: Timestamp = Timestamp(1_800_000_000_000);

fn templates(body: &[u8]) -> Vec<TemplateCategory> {
    (parse(body, RECEIVED, &Detector::default())
        .unwrap()
        .into_iter())
    .map(|o| match o {
        Observation::TemplateCategory(t) => t,
        other => panic!("not a template category: {other:?}"),
    })
    .collect()
}

#[test]
fn a_category_update_names_the_template_its_category_and_the_entry_time() {
    let t = templates(&fixture("pywa__template-category-update-marketing.json"));
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].name, "my_message_template");
    assert_eq!(t[0].language, "he");
    assert_eq!(t[0].category, "MARKETING");
    assert_eq!(t[0].upcoming, None);
    assert_eq!(t[0].id.as_deref(), Some("12345678"));
    assert_eq!(
        t[0].at,
        Timestamp::from_secs(1_750_344_882),
        "the entry's time"
    );

    let done = templates(&fixture("derived__template-category-update-done.json"));
    assert_eq!(
        (done[0].category.as_str(), done[0].upcoming.as_deref()),
        ("MARKETING", None)
    );
    assert_eq!(
        done[0].evidence,
        "template_category_update UTILITY → MARKETING"
    );
}

#[test]
fn an_announced_change_keeps_the_current_category_and_carries_the_next() {
    let t = templates(&fixture("derived__template-category-update-impending.json"));
    assert_eq!(t[0].category, "UTILITY", "new_category is the current one");
    assert_eq!(t[0].upcoming.as_deref(), Some("MARKETING"));
    assert_eq!(t[0].at, Timestamp::from_secs(1_750_344_882));
}

#[test]
fn a_status_update_carries_its_category_and_one_without_says_nothing() {
    let t = templates(&fixture(
        "derived__template-status-approved-with-category.json",
    ));
    assert_eq!(
        (
            t[0].name.as_str(),
            t[0].language.as_str(),
            t[0].category.as_str()
        ),
        ("my_message_template", "pt-BR", "UTILITY")
    );
    assert_eq!(t[0].at, Timestamp::from_secs(1_698_268_000));
    assert_eq!(
        t[0].evidence,
        "message_template_status_update APPROVED UTILITY"
    );
    // pywa's body predates `message_template_category`: readable, and nothing to keep.
    let body = fixture("pywa__template-status-approved.json");
    assert!(templates(&body).is_empty());
    let p = parts(&body, RECEIVED, &Detector::default()).unwrap();
    assert_eq!(p, vec![Part::Nothing]);
}

#[test]
fn a_notice_without_a_template_name_is_unreadable_and_without_time_takes_the_receipt() {
    let nameless = envelope::waba_notice(
        "template_category_update",
        1_750_000_000,
        serde_json::json!({"message_template_id": 1, "new_category": "MARKETING"}),
    );
    let p = parts(&nameless, RECEIVED, &Detector::default()).unwrap();
    // Without a category either, it says nothing the daemon keeps.
    let bare = envelope::waba_notice(
        "message_template_status_update",
        1_750_000_000,
        serde_json::json!({"event": "APPROVED", "message_template_id": 1}),
    );
    assert_eq!(
        parts(&bare, RECEIVED, &Detector::default()).unwrap(),
        vec![Part::Nothing]
    );
    assert!(
        matches!(
            &p[..],
            [Part::Unreadable {
                why: Why::Shape,
                ..
            }]
        ),
        "{p:?}"
    );
    let untimed = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
        {"field":"template_category_update","value":{"message_template_name":"a","message_template_language":"en","new_category":"UTILITY"}}]}]}"#;
    assert_eq!(templates(untimed)[0].at, RECEIVED);
}

#[tokio::test]
async fn the_poll_carries_configured_templates_first_then_signed_notices() {
    let secrets = Secrets::new();
    let extra = "[templates]\norder_update = \"utility\"";
    let (wa, _inbox) = connector(config(&secrets, "http://127.0.0.1:9", extra));
    let server = FakeServer::start(wa.router()).await;
    let sender = WebhookSender::new(format!("{}{WEBHOOK_PATH}", server.url()), APP_SECRET)
        .with_retries(1, Duration::ZERO);
    let notice = envelope::template_recategorised(
        278077987957091,
        "order_update",
        "en_US",
        "UTILITY",
        "MARKETING",
        1_746_169_200,
    );
    assert!(sender.deliver(&notice).await.delivered);

    let page = wa.poll(None).await.unwrap();
    let got: Vec<(String, String, Timestamp)> = (page.observations.iter())
        .map(|o| match o {
            Observation::TemplateCategory(t) => (t.language.clone(), t.category.clone(), t.at),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (String::new(), "UTILITY".into(), Timestamp::MIN),
            (
                "en_US".into(),
                "MARKETING".into(),
                Timestamp::from_secs(1_746_169_200)
            ),
        ]
    );
    // Once a page is committed, the configured ones are not sent again.
    wa.committed(&page);
    let next = wa.poll(Some(&page.cursor)).await.unwrap();
    assert!(next.observations.is_empty(), "{:?}", next.observations);
}
