//! The webhook route served on 127.0.0.1 with an in-memory inbox, driven by the Meta-like
//! sender, then drained with `poll`.

use std::time::Duration;

use crate::common::*;
use optout_core::testkit::FakeServer;
use optout_core::{Connector, ConnectorError, Cursor, Identity, Observation, Signal, Status};
use optout_whatsapp::WEBHOOK_PATH;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{WebhookSender, sign};

struct Rig {
    wa: optout_whatsapp::WhatsApp<optout_whatsapp::fake::MemoryInbox>,
    inbox: std::sync::Arc<optout_whatsapp::fake::MemoryInbox>,
    url: String,
    _server: FakeServer,
    _secrets: Secrets,
}

async fn rig(extra: &str) -> Rig {
    let secrets = Secrets::new();
    let (wa, inbox) = connector(config(&secrets, "http://127.0.0.1:9", extra));
    let server = FakeServer::start(wa.router()).await;
    Rig {
        wa,
        inbox,
        url: format!("{}{WEBHOOK_PATH}", server.url()),
        _server: server,
        _secrets: secrets,
    }
}

fn once(url: &str, secret: &str) -> WebhookSender {
    WebhookSender::new(url, secret).with_retries(1, Duration::ZERO)
}

fn events(obs: &[Observation]) -> Vec<optout_core::ConsentEvent> {
    obs.iter()
        .filter_map(|o| match o {
            Observation::Event(e) => Some(e.clone()),
            Observation::IdentityChange(_) | Observation::TemplateCategory(_) => None,
            Observation::Record(_) => panic!("no records from whatsapp"),
        })
        .collect()
}

#[tokio::test]
async fn unsigned_or_badly_signed_bodies_are_refused_and_never_stored() {
    let r = rig("").await;
    let body = envelope::text(&Who::wa("15551230001"), "wamid.1", 1_700_000_000, "STOP");
    let s = once(&r.url, APP_SECRET);

    assert_eq!(
        s.deliver_with(&body, None).await.attempts,
        vec![Ok(401)],
        "missing header"
    );
    assert_eq!(
        s.deliver_with(&body, Some("sha1=abc")).await.attempts,
        vec![Ok(401)],
        "malformed header"
    );
    assert_eq!(
        s.deliver_with(&body, Some("sha256=zz")).await.attempts,
        vec![Ok(401)],
        "not hex"
    );
    let wrong = sign("some-other-secret", &body);
    assert_eq!(
        s.deliver_with(&body, Some(&wrong)).await.attempts,
        vec![Ok(403)],
        "wrong secret"
    );
    let mut tampered = body.clone();
    let at = tampered.len() - 10;
    tampered[at] ^= 1;
    let sig = sign(APP_SECRET, &body);
    assert_eq!(
        s.deliver_with(&tampered, Some(&sig)).await.attempts,
        vec![Ok(403)],
        "tampered body"
    );

    assert!(r.inbox.entries().is_empty());
    assert!(r.inbox.quarantined().is_empty());
    assert!(r.wa.poll(None).await.unwrap().observations.is_empty());

    // The same body properly signed goes through, so the refusals above were about the
    // signature alone.
    assert!(s.deliver(&body).await.delivered);
    assert_eq!(r.inbox.entries().len(), 1);
}

#[tokio::test]
async fn either_rotated_app_secret_verifies() {
    let r = rig("").await;
    let a = envelope::text(&Who::wa("15551230001"), "wamid.a", 1_700_000_000, "hi");
    let b = envelope::text(&Who::wa("15551230002"), "wamid.b", 1_700_000_001, "hi");
    assert!(once(&r.url, APP_SECRET).deliver(&a).await.delivered);
    assert!(once(&r.url, OLD_APP_SECRET).deliver(&b).await.delivered);
    assert_eq!(
        once(&r.url, "retired-secret").deliver(&b).await.attempts,
        vec![Ok(403)]
    );
    let stored: Vec<_> = r
        .inbox
        .entries()
        .into_iter()
        .map(|e| e.body.to_vec())
        .collect();
    assert_eq!(stored, vec![a, b], "raw bytes are stored exactly as signed");
}

#[tokio::test]
async fn oversized_bodies_get_413_and_are_not_stored() {
    let r = rig("max_body_bytes = 2048").await;
    let s = once(&r.url, APP_SECRET);
    let big = envelope::text(&Who::wa("15551230001"), "wamid.big", 1, &"x".repeat(3000));
    assert!(big.len() > 2048);
    assert_eq!(s.deliver(&big).await.attempts, vec![Ok(413)]);
    let small = envelope::text(&Who::wa("15551230001"), "wamid.small", 1, &"x".repeat(1000));
    assert!(small.len() < 2048);
    assert!(s.deliver(&small).await.delivered);
    assert_eq!(r.inbox.entries().len(), 1);
}

#[tokio::test]
async fn signed_garbage_is_quarantined_and_acknowledged() {
    let r = rig("").await;
    let s = once(&r.url, APP_SECRET);
    assert!(s.deliver(b"this is not json").await.delivered);
    assert!(
        s.deliver(br#"{"object":"page","entry":[]}"#)
            .await
            .delivered
    );
    assert!(
        s.deliver(br#"{"object":"whatsapp_business_account"}"#)
            .await
            .delivered
    );
    let q = r.inbox.quarantined();
    assert_eq!(q.len(), 3);
    assert_eq!(&q[0].0[..], b"this is not json");
    assert!(q[0].1.starts_with("not JSON"), "{}", q[0].1);
    assert!(q[1].1.contains("object is"), "{}", q[1].1);
    assert!(
        r.inbox.entries().is_empty(),
        "nothing unusable reaches the poll"
    );
}

#[tokio::test]
async fn storage_failure_answers_503_and_the_redelivery_is_stored() {
    let r = rig("").await;
    let notify = r.wa.webhook().appended();
    r.inbox.fail_next(1);
    let body = envelope::text(&Who::wa("15551230001"), "wamid.1", 1_700_000_000, "STOP");
    let d = WebhookSender::new(&r.url, APP_SECRET)
        .with_retries(3, Duration::from_millis(5))
        .deliver(&body)
        .await;
    assert_eq!(d.attempts, vec![Ok(503), Ok(200)]);
    assert!(d.delivered);
    assert_eq!(r.inbox.entries().len(), 1);
    // The append woke whoever waits for new entries (the permit is kept until awaited).
    tokio::time::timeout(Duration::from_secs(5), notify.notified())
        .await
        .expect("notified");

    // A sender that never gets a 200 gives up after its bounded attempts.
    r.inbox.set_failing(true);
    let d = WebhookSender::new(&r.url, APP_SECRET)
        .with_retries(3, Duration::from_millis(1))
        .deliver(&body)
        .await;
    assert_eq!(d.attempts, vec![Ok(503), Ok(503), Ok(503)]);
    assert!(!d.delivered);
    assert_eq!(r.inbox.entries().len(), 1);
}

#[tokio::test]
async fn verification_handshake() {
    let r = rig("").await;
    let client = reqwest::Client::new();
    let get = |token: &str, mode: &str| {
        client
            .get(&r.url)
            .query(&[
                ("hub.mode", mode),
                ("hub.verify_token", token),
                ("hub.challenge", "1158201444"),
            ])
            .send()
    };
    let ok = get(VERIFY_TOKEN, "subscribe").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(get("wrong", "subscribe").await.unwrap().status(), 403);
    assert_eq!(
        get(&VERIFY_TOKEN[..5], "subscribe").await.unwrap().status(),
        403,
        "a prefix is not the token"
    );
    assert_eq!(
        get(VERIFY_TOKEN, "unsubscribe").await.unwrap().status(),
        403
    );
    let no_challenge = client
        .get(&r.url)
        .query(&[
            ("hub.mode", "subscribe"),
            ("hub.verify_token", VERIFY_TOKEN),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(no_challenge.status(), 400);
}

#[tokio::test]
async fn duplicate_deliveries_poll_as_one_observation() {
    let r = rig("").await;
    let s = once(&r.url, APP_SECRET);
    let stop = envelope::text(
        &Who::wa("15551230001"),
        "wamid.stop",
        1_700_000_000,
        "Stop please",
    );
    let other = envelope::text(
        &Who::wa("15551230002"),
        "wamid.other",
        1_700_000_005,
        "hello",
    );
    for body in [&stop, &stop, &other, &stop] {
        assert!(s.deliver(body).await.delivered);
    }
    assert_eq!(
        r.inbox.entries().len(),
        4,
        "Meta's redeliveries are all stored"
    );

    let page = r.wa.poll(None).await.unwrap();
    let ev = events(&page.observations);
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].message_id.as_deref(), Some("wamid.stop"));
    assert_eq!(ev[0].status, Some(Status::OptedOut));
    assert_eq!(ev[0].signal, Signal::Keyword);
    assert_eq!(ev[0].language.as_deref(), Some("en"));
    assert_eq!(ev[1].message_id.as_deref(), Some("wamid.other"));
    assert_eq!(ev[1].signal, Signal::Inbound);
    assert_eq!(page.cursor, Cursor("4".into()));
    assert!(!page.more);

    // Nothing new after the cursor; the cursor stays put.
    let again = r.wa.poll(Some(&page.cursor)).await.unwrap();
    assert!(again.observations.is_empty());
    assert_eq!(again.cursor, Cursor("4".into()));
}

#[tokio::test]
async fn bsuid_only_stop_then_both_identities() {
    let r = rig("").await;
    let s = once(&r.url, APP_SECRET);
    let bsuid = "US.13491208655302741918";
    assert!(
        s.deliver(&envelope::text(
            &Who::bsuid(bsuid),
            "wamid.s",
            1_700_000_000,
            "STOP"
        ))
        .await
        .delivered
    );
    let first = r.wa.poll(None).await.unwrap();
    let ev = events(&first.observations);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].status, Some(Status::OptedOut));
    assert_eq!(ev[0].identities, vec![Identity::Bsuid(bsuid.into())]);

    let later = envelope::text(
        &Who::both("16315551181", bsuid),
        "wamid.h",
        1_700_000_100,
        "thanks",
    );
    assert!(s.deliver(&later).await.delivered);
    let second = r.wa.poll(Some(&first.cursor)).await.unwrap();
    let ev = events(&second.observations);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].status, None);
    assert_eq!(
        ev[0].identities,
        vec![
            Identity::WaId("16315551181".into()),
            Identity::Bsuid(bsuid.into())
        ],
        "both ids travel together so the core links them"
    );
}

#[tokio::test]
async fn marketing_signals_and_buttons_over_http() {
    let r = rig(r#"[keywords]
        opt_out_payloads = ["MKT_STOP"]"#)
    .await;
    let s = once(&r.url, APP_SECRET);
    let who = Who::both("15551230001", "US.1");
    for body in [
        envelope::user_preference(&who, "stop", 1_700_000_000),
        envelope::user_preference(&who, "resume", 1_700_000_100),
        envelope::failed_status(&who, "wamid.sent1", 1_700_000_200, 131050),
        envelope::failed_status(&who, "wamid.sent2", 1_700_000_300, 131047),
        envelope::button(&who, "wamid.b1", 1_700_000_400, "MKT_STOP", "Not for me"),
        envelope::button_reply(&who, "wamid.b2", 1_700_000_500, "cancel-appt", "Cancel"),
    ] {
        assert!(s.deliver(&body).await.delivered);
    }
    let ev = events(&r.wa.poll(None).await.unwrap().observations);
    let got: Vec<_> = ev.iter().map(|e| (e.status, e.signal)).collect();
    assert_eq!(
        got,
        vec![
            (Some(Status::OptedOut), Signal::MarketingPreference),
            (Some(Status::OptedIn), Signal::MarketingPreference),
            (Some(Status::OptedOut), Signal::MarketingSendFailure),
            (Some(Status::OptedOut), Signal::Button),
            (None, Signal::Inbound),
        ]
    );
    assert_eq!(ev[2].message_id.as_deref(), Some("wamid.sent1:failed"));
    assert!(ev.iter().all(|e| e.identities.len() == 2));
}

#[tokio::test]
async fn poll_pages_through_the_inbox() {
    let r = rig("page_size = 2").await;
    let s = once(&r.url, APP_SECRET);
    for i in 0..5 {
        let body = envelope::text(
            &Who::wa("15551230001"),
            &format!("wamid.{i}"),
            1_700_000_000 + i,
            "hi",
        );
        assert!(s.deliver(&body).await.delivered);
    }
    let mut cursor = None;
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = r.wa.poll(cursor.as_ref()).await.unwrap();
        seen.extend(
            events(&page.observations)
                .into_iter()
                .map(|e| e.message_id.unwrap()),
        );
        pages.push((page.cursor.0.clone(), page.more));
        cursor = Some(page.cursor);
        if !page.more {
            break;
        }
    }
    assert_eq!(
        pages,
        vec![("2".into(), true), ("4".into(), true), ("5".into(), false)]
    );
    assert_eq!(
        seen,
        (0..5).map(|i| format!("wamid.{i}")).collect::<Vec<_>>()
    );

    // The daemon deletes what the saved cursor covers; polling on is unaffected.
    r.inbox.delete_up_to(4);
    let page = r.wa.poll(Some(&Cursor("4".into()))).await.unwrap();
    assert_eq!(events(&page.observations).len(), 1);

    let bad =
        r.wa.poll(Some(&Cursor("not-a-number".into())))
            .await
            .unwrap_err();
    assert!(matches!(bad, ConnectorError::Rejected(_)), "{bad:?}");
}
