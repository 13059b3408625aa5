//! Per-part quarantine and bounded pages: one damaged message in a signed body goes to the
//! quarantine alone while the rest of the body is applied, and a body of thousands of
//! messages is read in pages of at most `MAX_PAGE_PARTS`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use optout_core::testkit::FakeServer;
use optout_core::{Connector, Cursor, Observation, Status};
use optout_whatsapp::WEBHOOK_PATH;
use optout_whatsapp::fake::{MemoryInbox, WebhookSender};

const MAX_PAGE_PARTS: usize = optout_whatsapp::parse::MAX_PAGE_PARTS;

async fn rig() -> (
    optout_whatsapp::WhatsApp<MemoryInbox>,
    std::sync::Arc<MemoryInbox>,
    WebhookSender,
    FakeServer,
    Secrets,
) {
    let secrets = Secrets::new();
    let (wa, inbox) = connector(config(&secrets, "http://127.0.0.1:9", ""));
    let server = FakeServer::start(wa.router()).await;
    let sender = WebhookSender::new(format!("{}{WEBHOOK_PATH}", server.url()), APP_SECRET)
        .with_retries(1, Duration::ZERO);
    (wa, inbox, sender, server, secrets)
}

fn message(from: &str, id: &str, text: &str) -> String {
    format!(
        r#"{{"from":"{from}","id":"{id}","timestamp":"1700000000","type":"text","text":{{"body":"{text}"}}}}"#
    )
}

fn body(messages: &[String]) -> Vec<u8> {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","messages":[{}]}}}}]}}]}}"#,
        messages.join(",")
    )
    .into_bytes()
}

fn ids(obs: &[Observation]) -> Vec<String> {
    obs.iter()
        .map(|o| match o {
            Observation::Event(e) => e.message_id.clone().unwrap_or_default(),
            Observation::IdentityChange(c) => c.message_id.clone().unwrap_or_default(),
            Observation::TemplateCategory(t) => t.name.clone(),
            Observation::Record(_) => panic!("no records from whatsapp"),
        })
        .collect()
}

#[tokio::test]
async fn a_damaged_message_is_quarantined_alone_and_the_rest_applied() {
    let (wa, inbox, sender, _server, _secrets) = rig().await;
    let deep = format!(r#"{{"from":{}1{}}}"#, "[".repeat(300), "]".repeat(300));
    let mut raw = body(&[
        message("15550000001", "wamid.ok1", "STOP"),
        // Invalid UTF-8 inside this message's text (patched in below).
        message("15550000777", "wamid.bad", "SECRET-TEXT-@@"),
        deep,
        r#""a message that is a string""#.to_string(),
        message("15550000002", "wamid.ok2", "STOP"),
    ]);
    let at = raw.windows(2).position(|w| w == b"@@").unwrap();
    raw[at] = 0xff;
    raw[at + 1] = 0xfe;
    assert!(std::str::from_utf8(&raw).is_err());
    assert!(sender.deliver(&raw).await.delivered);

    let page = wa.poll(None).await.unwrap();
    assert_eq!(ids(&page.observations), vec!["wamid.ok1", "wamid.ok2"]);
    assert!(page.observations.iter().all(|o| matches!(
        o,
        Observation::Event(e) if e.status == Some(Status::OptedOut)
    )));
    let q = inbox.quarantined();
    assert_eq!(q.len(), 1, "one record for the body's damaged parts: {q:?}");
    let (bytes, reason) = &q[0];
    // The damaged parts are kept as stored (the invalid bytes included), and only they.
    assert!(bytes.windows(2).any(|w| w == [0xff, 0xfe]));
    let text = String::from_utf8_lossy(bytes);
    assert!(text.contains("wamid.bad") && text.contains("\"a message that is a string\""));
    assert!(!text.contains("wamid.ok1") && !text.contains("wamid.ok2"));
    // The reason locates and classifies; it quotes nothing from the body.
    assert!(reason.starts_with("3 unreadable part(s)"), "{reason}");
    assert!(
        reason.contains("entry 0 change 0 message 1: invalid UTF-8"),
        "{reason}"
    );
    assert!(reason.contains("message 2: nested too deep"), "{reason}");
    assert!(
        reason.contains("message 3: not the documented shape"),
        "{reason}"
    );
    for private in ["SECRET-TEXT", "15550000777", "a message that is a string"] {
        assert!(!reason.contains(private), "{reason}");
    }
}

#[tokio::test]
async fn damage_outside_any_message_quarantines_its_change_and_spares_the_next_entry() {
    let (wa, inbox, sender, _server, _secrets) = rig().await;
    // Entry 0: a damaged byte in the change's metadata (no message holds it): the change
    // is the smallest part holding it. Entry 1 is intact.
    let raw = format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"display_phone_number":"@"}},"messages":[{}]}}}}]}},{{"id":"2","changes":[{{"field":"messages","value":{{"messages":[{}]}}}}]}}]}}"#,
        message("15550000003", "wamid.in_damaged_change", "STOP"),
        message("15550000004", "wamid.next_entry", "STOP"),
    );
    let mut raw = raw.into_bytes();
    let at = raw.iter().position(|&b| b == b'@').unwrap();
    raw[at] = 0xc3; // a lead byte without its continuation
    assert!(sender.deliver(&raw).await.delivered);
    let page = wa.poll(None).await.unwrap();
    assert_eq!(ids(&page.observations), vec!["wamid.next_entry"]);
    let q = inbox.quarantined();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].1.contains("entry 0 change 0: invalid UTF-8"),
        "{}",
        q[0].1
    );
    assert!(String::from_utf8_lossy(&q[0].0).contains("wamid.in_damaged_change"));
}

#[tokio::test]
async fn a_body_of_thousands_of_messages_is_read_in_bounded_pages() {
    let (wa, inbox, sender, _server, _secrets) = rig().await;
    let n = 2 * MAX_PAGE_PARTS + 137;
    let big: Vec<String> = (0..n)
        .map(|i| message(&format!("1555{i:07}"), &format!("wamid.{i}"), "STOP"))
        .collect();
    let small = body(&[message("15559999999", "wamid.after", "STOP")]);
    assert!(sender.deliver(&body(&big)).await.delivered);
    assert!(sender.deliver(&small).await.delivered);

    let mut cursor: Option<Cursor> = None;
    let mut seen = Vec::new();
    let mut cursors = Vec::new();
    loop {
        let page = wa.poll(cursor.as_ref()).await.unwrap();
        assert!(
            page.observations.len() <= MAX_PAGE_PARTS,
            "a page of {} observations",
            page.observations.len()
        );
        seen.extend(ids(&page.observations));
        // What the daemon does after saving the cursor: a position inside a body trims
        // nothing, so the body is still there for the next page.
        wa.committed(&page);
        cursors.push(page.cursor.0.clone());
        cursor = Some(page.cursor);
        if !page.more {
            break;
        }
    }
    assert_eq!(
        cursors,
        vec![
            format!("1:{MAX_PAGE_PARTS}"),
            format!("1:{}", 2 * MAX_PAGE_PARTS),
            "2".to_string()
        ]
    );
    let mut want: Vec<String> = (0..n).map(|i| format!("wamid.{i}")).collect();
    want.push("wamid.after".into());
    assert_eq!(seen, want, "every message once, in order, none skipped");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), n + 1);
    assert!(inbox.entries().is_empty(), "trimmed once wholly read");
    assert!(inbox.quarantined().is_empty());

    // Re-reading from a saved position inside a body resumes exactly there.
    let bad = wa.poll(Some(&Cursor("0:5".into()))).await.unwrap_err();
    assert!(
        matches!(bad, optout_core::ConnectorError::Rejected(_)),
        "{bad:?}"
    );
}
