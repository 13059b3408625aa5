//! The template-aware send gate end to end: the real daemon, signed template webhooks from
//! the WhatsApp fake, and `GET /v1/consent/{id}?template=` (and the batch form) judged by
//! each template's current category.

mod common;

use std::path::Path;
use std::time::Duration;

use common::GATE_TOKEN;
use common::config::Config;
use optout_sync::report::{GateBatchReply, GateReply};
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::{Value, json};

const APP_SECRET: &str = "meta-app-secret-for-tests";
/// Stopped marketing messages only.
const MARKETING_STOPPED: &str = "14155552671";
/// Stopped every message.
const ALL_STOPPED: &str = "14155552672";
/// Never opted out.
const NEVER: &str = "14155552673";
const WAIT: Duration = Duration::from_secs(30);

fn config(dir: &Path) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        // Approved before the daemon started, so no webhook announced it.
        .set("whatsapp", r#"templates.order_update = "utility""#)
        .set("whatsapp", r#"templates.login_code = "AUTHENTICATION""#)
}

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

/// The gate's status code and JSON body for `query` (`template=…`, `category=…`).
async fn ask(d: &common::Daemon, id: &str, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/%2B{id}?{query}")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn gate(d: &common::Daemon, id: &str, template: &str) -> GateReply {
    let (code, body) = ask(d, id, &format!("template={template}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

async fn batch(d: &common::Daemon, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(d.url("/v1/consent/batch"))
        .bearer_auth(GATE_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn metrics(d: &common::Daemon) -> String {
    reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Delivers `body`, then a STOP from `marker` behind it, and waits until the marker is
/// applied: the inbox is applied in order, so `body` has been applied too.
async fn deliver_and_settle(d: &common::Daemon, sender: &WebhookSender, body: &[u8], marker: &str) {
    assert!(sender.deliver(body).await.delivered);
    let stop = envelope::text(
        &Who::wa(marker),
        &format!("wamid.{marker}"),
        now_s(),
        "STOP",
    );
    assert!(sender.deliver(&stop).await.delivered);
    d.until("the marker STOP is applied", WAIT, async || {
        ask(d, marker, "category=utility").await.1["allowed"] == json!(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_categorised_template_is_gated_by_its_new_category_and_an_older_notice_does_not_win() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    let t0 = now_s();

    // A marketing-scope opt-out (Meta's "Offers and announcements" stop) and a STOP.
    let pref = envelope::user_preference(&Who::wa(MARKETING_STOPPED), "stop", t0);
    assert!(sender.deliver(&pref).await.delivered);
    let stop = envelope::text(&Who::wa(ALL_STOPPED), "wamid.ALL", t0, "STOP");
    assert!(sender.deliver(&stop).await.delivered);
    d.until("both opt-outs are applied", WAIT, async || {
        ask(&d, MARKETING_STOPPED, "category=marketing").await.1["allowed"] == json!(false)
            && ask(&d, ALL_STOPPED, "category=utility").await.1["allowed"] == json!(false)
    })
    .await;

    // Known as utility (configured): a marketing stop does not block it, a STOP does.
    let g = gate(&d, MARKETING_STOPPED, "order_update").await;
    assert_eq!(g.allowed, Some(true), "{g:?}");
    assert_eq!(g.category.as_deref(), Some("utility"));
    assert_eq!(g.template.as_deref(), Some("order_update"));
    let g = gate(&d, ALL_STOPPED, "order_update").await;
    assert_eq!(
        (g.allowed, g.blocked_by.as_deref()),
        (Some(false), Some("all"))
    );
    let g = gate(&d, MARKETING_STOPPED, "login_code").await;
    assert_eq!(
        (g.allowed, g.category.as_deref()),
        (Some(true), Some("authentication"))
    );

    // Meta re-categorises it as marketing: from then on a marketing stop blocks it.
    let to_marketing = envelope::template_recategorised(
        278077987957091,
        "order_update",
        "en_US",
        "UTILITY",
        "MARKETING",
        t0 + 10,
    );
    assert!(sender.deliver(&to_marketing).await.delivered);
    d.until("the template is gated as marketing", WAIT, async || {
        gate(&d, MARKETING_STOPPED, "order_update").await.allowed == Some(false)
    })
    .await;
    let g = gate(&d, MARKETING_STOPPED, "order_update").await;
    assert_eq!(g.category.as_deref(), Some("marketing"));
    assert_eq!(g.blocked_by.as_deref(), Some("marketing"));
    assert_eq!(gate(&d, NEVER, "order_update").await.allowed, Some(true));

    // An older notice (still utility) arriving late changes nothing.
    let late = envelope::template_status(
        278077987957091,
        "order_update",
        "en_US",
        "APPROVED",
        "UTILITY",
        t0 + 5,
    );
    deliver_and_settle(&d, &sender, &late, "14155550001").await;
    let g = gate(&d, MARKETING_STOPPED, "order_update").await;
    assert_eq!(
        (g.allowed, g.category.as_deref()),
        (Some(false), Some("marketing"))
    );

    // The batch form asks the same question.
    let (code, body) = batch(
        &d,
        json!({"template": "order_update", "ids": [format!("+{MARKETING_STOPPED}"), format!("+{NEVER}")]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let r: GateBatchReply = serde_json::from_value(body).unwrap();
    let allowed: Vec<_> = r.results.iter().map(|g| g.allowed).collect();
    assert_eq!(allowed, [Some(false), Some(true)]);
    assert!(
        r.results
            .iter()
            .all(|g| g.category.as_deref() == Some("marketing"))
    );

    let m = metrics(&d).await;
    assert!(
        m.contains(r#"optout_template_recategorisations_total{from="utility",to="marketing"} 1"#),
        "{m}"
    );
    let status = d.status().await;
    assert_eq!(status.templates_known, 2, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_template_is_an_error_never_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);

    let (code, body) = ask(&d, NEVER, "template=spring_sale").await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["unknown_template"], "spring_sale");
    assert!(
        body["error"].as_str().unwrap().contains("spring_sale"),
        "{body}"
    );
    assert!(body.get("allowed").is_none(), "{body}");
    let (code, body) = batch(
        &d,
        json!({"template": "spring_sale", "ids": [format!("+{NEVER}")]}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["unknown_template"], "spring_sale");

    // Both a category and a template, or an empty name: refused.
    let (code, body) = ask(&d, NEVER, "template=order_update&category=utility").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not both"),
        "{body}"
    );
    let (code, _) = batch(
        &d,
        json!({"template": "order_update", "category": "utility", "ids": []}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(ask(&d, NEVER, "template=").await.0, 400);

    // An announced move to marketing makes a new template known, gated as marketing at
    // once (Meta warns a day ahead; a day early is the safe error).
    let t = now_s();
    let announced = envelope::template_recategorisation_announced(
        1,
        "spring_sale",
        "es",
        "UTILITY",
        "MARKETING",
        t,
        t + 86_400,
    );
    let pref = envelope::user_preference(&Who::wa(MARKETING_STOPPED), "stop", t);
    assert!(sender.deliver(&pref).await.delivered);
    deliver_and_settle(&d, &sender, &announced, "14155550002").await;
    let g = gate(&d, MARKETING_STOPPED, "spring_sale").await;
    assert_eq!(
        (g.allowed, g.category.as_deref()),
        (Some(false), Some("marketing")),
        "{g:?}"
    );
}

#[test]
fn check_config_locates_a_bad_template_name_and_category() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path())
        .set("whatsapp", r#"templates.Order_Update = "utility""#)
        .set("whatsapp", r#"templates.spring_sale = "promotional""#);
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, c.toml()).unwrap();
    let check = |path: &Path| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"));
        cmd.arg("check-config")
            .arg(path)
            .env("OPTOUT_GATE_TOKEN", GATE_TOKEN);
        for (k, v) in c.env() {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    };
    let (code, text) = check(&path);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("templates.Order_Update: a template name is lowercase"),
        "{text}"
    );
    assert!(
        text.contains(r#"templates.spring_sale: unknown category "promotional""#),
        "{text}"
    );
    assert!(text.contains("2 problems found"), "{text}");

    std::fs::write(&path, config(dir.path()).toml()).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, Some(0), "{text}");
}
