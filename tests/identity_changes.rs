//! Identity changes end to end: the real daemon (a child process) against the WhatsApp
//! (signed webhooks) and HubSpot fakes on 127.0.0.1. A customer who changes number takes
//! their opt-out along (the old number keeps its own); a new business-scoped user id is
//! linked to the old one; a CRM record whose phone field is edited follows the new
//! number's decision. Waits are bounded polls of observable state.

mod common;

use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_core::Timestamp;
use optout_sync::report::GateReply;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};

const APP_SECRET: &str = "meta-app-secret-for-identity-changes";
const OLD_WA: &str = "14155552671";
const NEW_WA: &str = "12125550100";
const WITHIN: Duration = Duration::from_secs(30);

struct World {
    dir: tempfile::TempDir,
    hs: optout_hubspot::fake::FakeHandle,
}

impl World {
    async fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            hs: optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
                limits: optout_hubspot::fake::Limits::off(),
                ..Default::default()
            })
            .await,
        }
    }

    async fn start(&self) -> Daemon {
        let config = Config::new(self.dir.path())
            .shutdown_timeout("5s")
            .set("policy", r#"opt_in_margin = "1s""#)
            .whatsapp(APP_SECRET)
            .hubspot(&self.hs.base_url());
        let d = common::start(self.dir.path(), &config.toml(), &config.env()).await;
        d.until("the first HubSpot sync", WITHIN, async || {
            d.crms_polled_since(None).await
        })
        .await;
        d
    }

    async fn deliver(&self, d: &Daemon, body: &[u8]) {
        let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
        let delivery = sender.deliver(body).await;
        assert!(delivery.delivered, "{:?}", delivery.attempts);
    }

    /// Waits until the HubSpot contact holds `value`.
    async fn until_consent(&self, d: &Daemon, id: &str, value: &str) {
        d.until(&format!("contact {id} holds {value}"), WITHIN, async || {
            self.hs.property(id, "whatsapp_consent").as_deref() == Some(value)
        })
        .await;
    }
}

fn now_s() -> i64 {
    Timestamp::now().millis() / 1000
}

async fn gate(d: &Daemon, id: &str) -> GateReply {
    let mut url = reqwest::Url::parse(&d.url("/v1/consent")).unwrap();
    url.path_segments_mut().unwrap().push(id);
    url.query_pairs_mut().append_pair("category", "marketing");
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "gate for {id}");
    r.json().await.unwrap()
}

async fn stop(mut d: Daemon) {
    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
}

/// STOP from the old number, then Meta's `user_changed_number`: the new number's CRM
/// record is suppressed and the gate blocks both numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_change_moves_the_opt_out() {
    let w = World::new().await;
    let old = w.hs.create_contact(&[("phone", "+1 (415) 555-2671")]);
    let new = w.hs.create_contact(&[("phone", "+1 212-555-0100")]);
    let d = w.start().await;
    let t = now_s();
    let stop_body = envelope::text(&Who::wa(OLD_WA), "wamid.stop", t, "STOP");
    w.deliver(&d, &stop_body).await;
    w.until_consent(&d, &old, "opted_out").await;
    assert_eq!(gate(&d, &format!("+{NEW_WA}")).await.allowed, Some(true));

    let change = envelope::number_change(OLD_WA, NEW_WA, "wamid.moved", t + 1);
    w.deliver(&d, &change).await;
    w.until_consent(&d, &new, "opted_out").await;
    for n in [OLD_WA, NEW_WA] {
        let g = gate(&d, &format!("+{n}")).await;
        assert_eq!(g.allowed, Some(false), "{n}: {g:?}");
    }
    assert_eq!(
        w.hs.property(&old, "whatsapp_consent").as_deref(),
        Some("opted_out")
    );
    stop(d).await;
}

/// STOP under one business-scoped user id, then `user_changed_user_id`: the new id is
/// blocked by the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_change_keeps_the_opt_out() {
    let w = World::new().await;
    let d = w.start().await;
    let t = now_s();
    let who = Who::bsuid("US.13491208655302741918");
    w.deliver(&d, &envelope::text(&who, "wamid.stop", t, "STOP"))
        .await;
    d.until("the old id is blocked", WITHIN, async || {
        gate(&d, "US.13491208655302741918").await.allowed == Some(false)
    })
    .await;
    let renamed = envelope::user_id_change(&who, "US.20481133079914355021", "wamid.renamed", t + 1);
    w.deliver(&d, &renamed).await;
    d.until("the new id is blocked", WITHIN, async || {
        gate(&d, "US.20481133079914355021").await.allowed == Some(false)
    })
    .await;
    stop(d).await;
}

/// A contact suppressed through its number is edited to hold another number, one that
/// opted in: the daemon re-links it and writes the new number's decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_phone_edit_relinks_the_record() {
    let w = World::new().await;
    let contact = w.hs.create_contact(&[("phone", "+1 (415) 555-2671")]);
    let d = w.start().await;
    let t = now_s();
    w.deliver(
        &d,
        &envelope::text(&Who::wa(NEW_WA), "wamid.start", t - 5, "START"),
    )
    .await;
    w.deliver(
        &d,
        &envelope::text(&Who::wa(OLD_WA), "wamid.stop", t, "STOP"),
    )
    .await;
    w.until_consent(&d, &contact, "opted_out").await;

    assert!(w.hs.edit_contact(&contact, &[("phone", "+1 212 555 0100")]));
    w.until_consent(&d, &contact, "opted_in").await;
    let g = gate(&d, &format!("+{OLD_WA}")).await;
    assert_eq!(
        g.allowed,
        Some(false),
        "the old number keeps its opt-out: {g:?}"
    );
    stop(d).await;
}

/// Two WhatsApp Business Accounts on one daemon, each with its own app secret and route:
/// a body signed for one account is refused on the other's route, each account's STOP is
/// applied once (its own connector reads it, the other does not), and the unnamed route
/// no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_whatsapp_accounts_with_separate_secrets() {
    let w = World::new().await;
    let brand_a = w.hs.create_contact(&[("phone", "+1 (415) 555-2671")]);
    let brand_b = w.hs.create_contact(&[("phone", "+1 212-555-0100")]);
    let config = Config::new(w.dir.path())
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .set("wa-brand-b", r#"kind = "whatsapp""#)
        .set("wa-brand-b", r#"app_secrets = [{ env = "WA_B_SECRET" }]"#)
        .set("wa-brand-b", r#"verify_token = { env = "WA_B_VERIFY" }"#)
        .env_var("WA_B_SECRET", "the-other-meta-app-secret")
        .env_var("WA_B_VERIFY", "verify-b")
        .hubspot(&w.hs.base_url());
    let d = common::start(w.dir.path(), &config.toml(), &config.env()).await;
    d.until("the first HubSpot sync", WITHIN, async || {
        d.crms_polled_since(None).await
    })
    .await;
    let t = now_s();
    let a = envelope::text(&Who::wa(OLD_WA), "wamid.a", t, "STOP");
    let b = envelope::text(&Who::wa(NEW_WA), "wamid.b", t, "STOP");

    let wrong = WebhookSender::new(d.url("/webhooks/whatsapp/wa-brand-b"), APP_SECRET)
        .deliver(&a)
        .await;
    assert!(
        !wrong.delivered,
        "brand A's secret must not open brand B's route"
    );
    let unnamed = reqwest::Client::new()
        .post(d.url("/webhooks/whatsapp"))
        .header(
            "X-Hub-Signature-256",
            optout_whatsapp::fake::sign(APP_SECRET, &a),
        )
        .body(a.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unnamed.status(), 404, "two accounts: no unnamed route");

    for (route, secret, body) in [
        ("whatsapp", APP_SECRET, &a),
        ("wa-brand-b", "the-other-meta-app-secret", &b),
    ] {
        let sender = WebhookSender::new(d.url(&format!("/webhooks/whatsapp/{route}")), secret);
        let delivery = sender.deliver(body).await;
        assert!(delivery.delivered, "{route}: {:?}", delivery.attempts);
    }
    w.until_consent(&d, &brand_a, "opted_out").await;
    w.until_consent(&d, &brand_b, "opted_out").await;
    d.until(
        "each body applied by its own connector only",
        WITHIN,
        async || {
            let s = d.status().await;
            let wa: Vec<_> = s
                .connectors
                .iter()
                .filter(|c| c.kind == "whatsapp")
                .collect();
            wa.len() == 2 && wa.iter().all(|c| c.cursor.is_some())
        },
    )
    .await;
    let l = optout_sync::control::request(
        &d.socket,
        &optout_sync::control::Request::Lookup {
            id: format!("+{OLD_WA}"),
        },
        |_| {},
    )
    .await
    .unwrap();
    let sources: Vec<String> = l["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "accepted")
        .filter_map(|a| a["source"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sources, ["whatsapp"], "{l}");
    stop(d).await;
}
