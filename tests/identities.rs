//! Identities as the world writes them, end to end: the real daemon (a child process),
//! signed WhatsApp webhooks, and the HubSpot and Salesforce fakes on 127.0.0.1.
//!
//! - a legacy Brazilian WhatsApp id (no ninth digit) and a Mexican `521…` id reach the CRM
//!   records holding the national forms, and the send gate blocks every form;
//! - an Argentine `549…` opt-out reaches a record holding `+54…` (suppress-only), and an
//!   opt-in from `549…` re-enables only the `549…` form;
//! - `+44 (0)…` and `tel:` numbers are matched; a number that cannot be read is counted in
//!   `status` and `/metrics` and listed by `numbers --unreadable`.
//!
//! Waits are bounded polls of observable state, never fixed sleeps.

mod common;

use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_core::Timestamp;
use optout_sync::control::{self, Request};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::{Value, json};

const APP_SECRET: &str = "meta-app-secret-for-identities";
const WITHIN: Duration = Duration::from_secs(30);

struct World {
    dir: tempfile::TempDir,
    hs: optout_hubspot::fake::FakeHandle,
    sf: optout_salesforce::fake::FakeHandle,
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
            sf: optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default())
                .await,
        }
    }

    /// WhatsApp, HubSpot and Salesforce; an opt-in counts 1 s after an opt-out.
    async fn start(&self) -> Daemon {
        let c = Config::new(self.dir.path())
            .shutdown_timeout("5s")
            .set("policy", r#"opt_in_margin = "1s""#)
            .whatsapp(APP_SECRET)
            .hubspot(&self.hs.base_url())
            .salesforce(&self.sf.base_url());
        let d = common::start(self.dir.path(), &c.toml(), &c.env()).await;
        d.until("the first sync of both CRMs", WITHIN, async || {
            d.crms_polled_since(None).await
        })
        .await;
        d
    }

    fn contact(&self, phone: &str) -> String {
        self.hs
            .create_contact(&[("firstname", "Test"), ("phone", phone)])
    }

    fn consent(&self, id: &str) -> Option<String> {
        self.hs.property(id, "whatsapp_consent")
    }

    async fn say(&self, d: &Daemon, wa_id: &str, message_id: &str, at: i64, text: &str) {
        let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
        let body = envelope::text(&Who::wa(wa_id), message_id, at, text);
        let delivery = sender.deliver(&body).await;
        assert!(delivery.delivered, "{:?}", delivery.attempts);
    }

    /// Waits until the HubSpot contact holds `want`.
    async fn until_consent(&self, d: &Daemon, id: &str, want: &str) {
        d.until(&format!("contact {id} holds {want}"), WITHIN, async || {
            self.consent(id).as_deref() == Some(want)
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

async fn assert_gate(d: &Daemon, id: &str, allowed: bool) {
    let g = gate(d, id).await;
    assert_eq!(g.allowed, Some(allowed), "gate for {id}: {g:?}");
}

async fn lookup(d: &Daemon, id: &str) -> Value {
    control::request(&d.socket, &Request::Lookup { id: id.into() }, |_| {})
        .await
        .unwrap()
}

/// `optout-sync numbers --unreadable --connector hubspot --json`, as the real binary.
fn numbers_unreadable(d: &Daemon) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args([
            "numbers",
            "--unreadable",
            "--connector",
            "hubspot",
            "--json",
        ])
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn outboxes_empty(d: &Daemon) -> bool {
    d.status()
        .await
        .connectors
        .iter()
        .all(|c| c.outbox_depth == 0 && c.dead_letters == 0)
}

/// Every outbox empty, then a whole CRM poll that started after that, then empty again:
/// whatever was going to be written has been.
async fn quiet(d: &Daemon) {
    d.until("every outbox empty", WITHIN, async || {
        outboxes_empty(d).await
    })
    .await;
    let mark = Timestamp::now();
    d.until("a CRM poll after the mark", WITHIN, async || {
        d.crms_polled_since(Some(mark)).await
    })
    .await;
    d.until("every outbox empty again", WITHIN, async || {
        outboxes_empty(d).await
    })
    .await;
}

#[tokio::test]
async fn legacy_brazilian_and_mexican_ids_reach_the_national_numbers_and_the_gate_blocks_every_form()
 {
    let w = World::new().await;
    let br_hs = w.contact("+55 41 98888-7777");
    let br_sf = w.sf.insert(
        "Contact",
        json!({"LastName": "Silva", "MobilePhone": "+55 (41) 9 8888 7777"}),
    );
    let mx_hs = w.contact("+52 55 1234 5678");
    // A Brazilian landline in the same area: no ninth digit, never the same person.
    let br_landline = w.contact("+55 41 3888-7777");
    let mut d = w.start().await;

    // The id predates the ninth digit: 55 + 41 + 8 digits.
    w.say(&d, "554188887777", "wamid.BR1", now_s() - 20, "STOP")
        .await;
    w.say(&d, "5215512345678", "wamid.MX1", now_s() - 20, "STOP")
        .await;
    w.until_consent(&d, &br_hs, "opted_out").await;
    w.until_consent(&d, &mx_hs, "opted_out").await;
    d.until("the Salesforce contact suppressed", WITHIN, async || {
        w.sf.get(&br_sf).unwrap()["WhatsApp_Opt_Out__c"] == json!(true)
    })
    .await;
    for form in [
        "+5541988887777",
        "+55 41 8888-7777",
        "wa:554188887777",
        "wa:5541988887777",
        "+525512345678",
        "+52 1 55 1234 5678",
        "wa:5215512345678",
    ] {
        assert_gate(&d, form, false).await;
    }
    assert_gate(&d, "+554138887777", true).await;

    // lookup explains the link between the legacy id and the nine-digit number.
    let l = lookup(&d, "wa:554188887777").await;
    let aliases = l["aliases"].as_array().unwrap();
    assert!(aliases.contains(&json!("p:+5541988887777")), "{l:#}");
    let v = &l["variants"][0];
    assert_eq!(v["alias"], "p:+5541988887777", "{l:#}");
    assert_eq!(v["link"], "same", "{l:#}");
    assert_eq!(v["country"], "Brazil", "{l:#}");

    quiet(&d).await;
    assert_eq!(w.consent(&br_landline), None, "the landline was written");
    d.terminate().await;
}

#[tokio::test]
async fn an_argentine_opt_out_suppresses_the_number_without_9_but_an_opt_in_does_not_re_enable_it()
{
    let w = World::new().await;
    // The same digits as the WhatsApp id without the mobile 9: maybe someone's landline.
    let landline = w.contact("+54 11 2345-6789");
    let mobile = w.contact("+54 9 11 2345-6789");
    let mut d = w.start().await;

    let t_stop = now_s() - 60;
    w.say(&d, "5491123456789", "wamid.AR1", t_stop, "STOP")
        .await;
    w.until_consent(&d, &mobile, "opted_out").await;
    w.until_consent(&d, &landline, "opted_out").await;
    assert_gate(&d, "+541123456789", false).await;
    assert_gate(&d, "wa:5491123456789", false).await;

    let l = lookup(&d, "wa:5491123456789").await;
    let v = l["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["alias"] == "p:+541123456789")
        .unwrap_or_else(|| panic!("no variant in {l:#}"));
    assert_eq!(v["link"], "suppress_only", "{l:#}");
    assert_eq!(v["country"], "Argentina", "{l:#}");
    assert_eq!(v["decision"], "opted_out", "{l:#}");

    // An opt-in from the 549 id, well after the opt-out: only that form is re-enabled.
    w.say(&d, "5491123456789", "wamid.AR2", t_stop + 30, "START")
        .await;
    w.until_consent(&d, &mobile, "opted_in").await;
    quiet(&d).await;
    assert_eq!(w.consent(&landline).as_deref(), Some("opted_out"));
    assert_gate(&d, "+541123456789", false).await;
    assert_gate(&d, "+5491123456789", true).await;
    d.terminate().await;
}

#[tokio::test]
async fn numbers_as_typed_are_matched_and_unreadable_ones_are_shown() {
    let w = World::new().await;
    let trunk = w.contact("+44 (0)7911 123456");
    let tel = w.sf.insert(
        "Contact",
        json!({"LastName": "Tel", "Phone": "tel:+44-7911-123456;ext=12"}),
    );
    // Italy's leading 0 is part of the number: kept, not taken for a trunk prefix.
    let italy = w.contact("+39 06 6988 3113");
    let unreadable = w.contact("call the office");
    let mut d = w.start().await;

    w.say(&d, "447911123456", "wamid.GB1", now_s() - 20, "STOP")
        .await;
    w.say(&d, "390669883113", "wamid.IT1", now_s() - 20, "STOP")
        .await;
    w.until_consent(&d, &trunk, "opted_out").await;
    w.until_consent(&d, &italy, "opted_out").await;
    d.until("the tel: contact suppressed", WITHIN, async || {
        w.sf.get(&tel).unwrap()["WhatsApp_Opt_Out__c"] == json!(true)
    })
    .await;

    // The unreadable number: counted in status and /metrics, listed with record and value.
    let s = d.status().await;
    let hs = s.connector("hubspot").unwrap();
    assert_eq!(hs.unreadable_numbers, 1, "{s:?}");
    assert_eq!(s.connector("salesforce").unwrap().unreadable_numbers, 0);
    let metrics = reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("optout_unreadable_numbers{connector=\"hubspot\"} 1"),
        "{metrics}"
    );
    let listed = numbers_unreadable(&d);
    assert_eq!(listed["count"], 1, "{listed:#}");
    let row = &listed["records"][0];
    assert_eq!(row["record"], unreadable.as_str(), "{listed:#}");
    assert_eq!(row["raw"], "call the office", "{listed:#}");
    assert_eq!(row["field"], "phone 1", "{listed:#}");
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("unreadable numbers: 1"), "{text}");

    // With the daemon stopped, the command reads the store itself.
    d.terminate().await;
    let offline = numbers_unreadable(&d);
    assert_eq!(
        offline["records"][0]["raw"], "call the office",
        "{offline:#}"
    );
    let mut d = w.start().await;

    // Fixed in the CRM: the record is read again and leaves the list.
    w.hs.edit_contact(&unreadable, &[("phone", "+1 415 555 0199")]);
    d.until("the fixed number leaves the count", WITHIN, async || {
        d.status()
            .await
            .connector("hubspot")
            .is_some_and(|c| c.unreadable_numbers == 0)
    })
    .await;
    d.terminate().await;
}
