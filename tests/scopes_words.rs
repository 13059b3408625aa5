//! Scopes per keyword and the words of a revocation, end to end: signed WhatsApp webhooks
//! into the real daemon, answers from the send gate, `status`, `lookup`, `/metrics`, the
//! Graph fake's sent replies and the automation fake's events.
//!
//! - Meta's "Stop promotions" button (by payload or by label, in English, Spanish and
//!   Portuguese) and the same words typed stop `marketing` only; STOP ALL afterwards stops
//!   everything.
//! - A revocation in a plain sentence stops everything; look-alikes stop nothing.
//! - A possible opt-out is recorded, shown and counted, asked about once, and never applied.
//! - A repeated `user_preferences` webhook changes nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{FakeGraph, GraphOptions, WebhookSender, start_graph};
use serde_json::Value;

const APP_SECRET: &str = "meta-app-secret-for-scope-tests";
const WITHIN: Duration = Duration::from_secs(30);

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

/// A daemon with the WhatsApp connector (confirmations on, sent to the Graph fake) and,
/// when given, the automation webhook.
async fn daemon(dir: &Path, graph: &FakeGraph, hook: Option<&str>) -> (Daemon, WebhookSender) {
    let mut c = Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .graph(&graph.base_url())
        .set("whatsapp", "confirmations.enabled = true");
    if let Some(url) = hook {
        c = c.automations(url);
    }
    let d = common::start(dir, &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    (d, sender)
}

async fn deliver(sender: &WebhookSender, body: &[u8]) {
    let delivery = sender.deliver(body).await;
    assert!(delivery.delivered, "{:?}", delivery.attempts);
}

async fn gate(d: &Daemon, id: &str, category: &str) -> GateReply {
    reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/{id}?category={category}")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn blocked(d: &Daemon, id: &str, category: &str) -> bool {
    gate(d, id, category).await.allowed == Some(false)
}

async fn lookup(d: &Daemon, id: &str) -> Value {
    let req = optout_sync::control::Request::Lookup { id: id.into() };
    optout_sync::control::request(&d.socket, &req, |_| {})
        .await
        .unwrap()
}

async fn metrics(d: &Daemon) -> String {
    reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first metric line starting with `prefix`, 0 when absent.
async fn metric(d: &Daemon, prefix: &str) -> f64 {
    let text = metrics(d).await;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// How many WhatsApp observations ended with `result`.
async fn observed(d: &Daemon, result: &str) -> f64 {
    let line = format!("optout_observations_total{{source=\"whatsapp\",result=\"{result}\"}}");
    metric(d, &line).await
}

/// "Stop promotions" in every form stops marketing and leaves utility messages allowed;
/// STOP ALL afterwards stops everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_promotions_stops_marketing_only_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let (mut d, sender) = daemon(dir.path(), &graph, None).await;
    let t = now_s() - 60;
    let forms: Vec<(&str, Vec<u8>)> = vec![
        (
            "14155550101",
            envelope::button(
                &Who::wa("14155550101"),
                "wamid.SP1",
                t,
                "Stop promotions",
                "Stop promotions",
            ),
        ),
        (
            "14155550102",
            envelope::button(
                &Who::wa("14155550102"),
                "wamid.SP2",
                t,
                "MKT_OPT_OUT_7",
                "Detener promociones",
            ),
        ),
        (
            "14155550103",
            envelope::button(
                &Who::wa("14155550103"),
                "wamid.SP3",
                t,
                "MKT_OPT_OUT_7",
                "Parar promoções",
            ),
        ),
        (
            "14155550104",
            envelope::button_reply(
                &Who::wa("14155550104"),
                "wamid.SP4",
                t,
                "promo-stop",
                "Stop promotions",
            ),
        ),
        (
            "14155550105",
            envelope::text(&Who::wa("14155550105"), "wamid.SP5", t, "Stop promotions"),
        ),
        (
            "14155550106",
            envelope::text(
                &Who::wa("14155550106"),
                "wamid.SP6",
                t,
                "detener promociones por favor",
            ),
        ),
    ];
    for (_, body) in &forms {
        deliver(&sender, body).await;
    }
    for (wa, _) in &forms {
        let id = format!("wa:{wa}");
        d.until("the marketing stop is applied", WITHIN, async || {
            blocked(&d, &id, "marketing").await
        })
        .await;
        let m = gate(&d, &id, "marketing").await;
        assert_eq!(m.blocked_by.as_deref(), Some("marketing"), "{wa}: {m:?}");
        for category in ["utility", "authentication", "service"] {
            let g = gate(&d, &id, category).await;
            assert_eq!(g.allowed, Some(true), "{wa} {category}: {g:?}");
        }
        let v = lookup(&d, &id).await;
        assert_eq!(v["decisions"]["marketing"]["decision"], "opted_out", "{v}");
        assert_eq!(v["decisions"]["all"]["decision"], "unknown", "{v}");
    }
    // Each is confirmed once, saying that promotions (not every message) stop.
    d.until("the confirmations are sent", WITHIN, async || {
        graph.sent().len() >= forms.len()
    })
    .await;
    let sent = graph.sent();
    assert_eq!(sent.len(), forms.len(), "{sent:?}");
    let text_to = |wa: &str| {
        sent.iter()
            .find(|m| m.to.as_deref() == Some(wa))
            .unwrap()
            .text
            .clone()
    };
    assert!(
        text_to("14155550101").starts_with("You will receive no more promotional"),
        "{sent:?}"
    );
    assert!(
        text_to("14155550102").starts_with("No recibirás más mensajes promocionales"),
        "{sent:?}"
    );
    assert!(
        text_to("14155550103").starts_with("Você não receberá mais mensagens promocionais"),
        "{sent:?}"
    );
    // STOP ALL after the marketing stop: every category is blocked.
    deliver(
        &sender,
        &envelope::text(&Who::wa("14155550101"), "wamid.SA1", t + 30, "STOP ALL"),
    )
    .await;
    d.until("STOP ALL blocks utility", WITHIN, async || {
        blocked(&d, "wa:14155550101", "utility").await
    })
    .await;
    for category in ["marketing", "utility", "authentication", "service"] {
        let g = gate(&d, "+14155550101", category).await;
        assert_eq!(g.blocked_by.as_deref(), Some("all"), "{category}: {g:?}");
    }
    let s = d.status().await;
    assert_eq!(s.people("marketing", "opted_out"), 6, "{s:?}");
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    assert_eq!(s.possible_opt_outs, 0, "{s:?}");
    assert!(d.terminate().await.success());
}

/// A revocation in a sentence stops every message; look-alikes stop nothing and are not
/// even possible opt-outs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_in_a_sentence_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let (mut d, sender) = daemon(dir.path(), &graph, None).await;
    let t = now_s() - 60;
    let revocations = [
        ("14155550201", "I want to opt out"),
        ("14155550202", "please stop messaging me"),
        ("14155550203", "cancel my subscription"),
        ("14155550204", "No more messages, thanks"),
        ("14155550205", "quiero darme de baja"),
    ];
    let look_alikes = [
        ("14155550211", "don't stop"),
        ("14155550212", "I'll stop by the store tomorrow"),
        ("14155550213", "I can't stop laughing 😂"),
    ];
    for (i, (wa, text)) in revocations.iter().chain(&look_alikes).enumerate() {
        let body = envelope::text(&Who::wa(wa), &format!("wamid.R{i}"), t, text);
        deliver(&sender, &body).await;
    }
    for (wa, text) in revocations {
        let id = format!("wa:{wa}");
        d.until("the sentence is applied", WITHIN, async || {
            blocked(&d, &id, "utility").await
        })
        .await;
        let g = gate(&d, &id, "utility").await;
        assert_eq!(g.blocked_by.as_deref(), Some("all"), "{text}: {g:?}");
    }
    d.until("every message is read", WITHIN, async || {
        observed(&d, "no_consent_value").await >= 3.0
    })
    .await;
    for (wa, text) in look_alikes {
        let g = gate(&d, &format!("wa:{wa}"), "marketing").await;
        assert_eq!(g.allowed, Some(true), "{text}: {g:?}");
    }
    assert_eq!(d.status().await.possible_opt_outs, 0);
    // Each clear opt-out is confirmed once; the look-alikes get nothing.
    d.until("the confirmations are sent", WITHIN, async || {
        graph.sent().len() >= revocations.len()
    })
    .await;
    let sent = graph.sent();
    assert_eq!(sent.len(), revocations.len(), "{sent:?}");
    assert!(
        sent.iter().all(|m| !m.text.starts_with("Reply STOP")),
        "{sent:?}"
    );
    assert!(d.terminate().await.success());
}

/// A message that may be an opt-out is never applied, is shown by `status`, `lookup`,
/// `/metrics` and the audit history, and gets one clarification in its language.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_possible_opt_out_is_recorded_shown_and_asked_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let (mut d, sender) = daemon(dir.path(), &graph, None).await;
    let t = now_s() - 60;
    let en = envelope::text(
        &Who::wa("14155550301"),
        "wamid.P1",
        t,
        "stop sending me the catalogue, I only want my order updates",
    );
    let es = envelope::text(
        &Who::wa("5215512345678"),
        "wamid.P2",
        t,
        "¿cómo puedo desuscribirme del boletín?",
    );
    deliver(&sender, &en).await;
    deliver(&sender, &es).await;
    // Meta redelivers the first one: it is the same message, asked about once.
    deliver(&sender, &en).await;
    d.until("two possible opt-outs are recorded", WITHIN, async || {
        d.status().await.possible_opt_outs == 2
    })
    .await;
    d.until("both clarifications are sent", WITHIN, async || {
        graph.sent().len() >= 2
    })
    .await;
    d.until("the redelivery is read", WITHIN, async || {
        observed(&d, "duplicate").await >= 1.0
    })
    .await;
    let sent = graph.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let to = |wa: &str| sent.iter().find(|m| m.to.as_deref() == Some(wa)).unwrap();
    assert!(to("14155550301").text.starts_with("Reply STOP"), "{sent:?}");
    assert_eq!(
        to("14155550301").context_message_id.as_deref(),
        Some("wamid.P1")
    );
    assert!(
        to("5215512345678").text.starts_with("Responde BAJA"),
        "{sent:?}"
    );
    // Never applied, either way.
    for id in ["wa:14155550301", "wa:5215512345678"] {
        for category in ["marketing", "utility"] {
            let g = gate(&d, id, category).await;
            assert_eq!(g.allowed, Some(true), "{id} {category}: {g:?}");
        }
    }
    let v = lookup(&d, "wa:14155550301").await;
    let possible = v["possible_opt_outs"].as_array().unwrap();
    assert_eq!(possible.len(), 1, "{v}");
    assert_eq!(possible[0]["kind"], "possible_opt_out");
    assert_eq!(possible[0]["record"], "wamid.P1");
    assert!(
        possible[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("may be an opt-out"),
        "{v}"
    );
    assert_eq!(v["decisions"]["all"]["decision"], "unknown", "{v}");
    let m = metric(&d, "optout_possible_optouts_total{connector=\"whatsapp\"}").await;
    assert_eq!(m, 2.0, "{}", metrics(&d).await);
    // When the customer answers STOP, that is applied as usual.
    deliver(
        &sender,
        &envelope::text(&Who::wa("14155550301"), "wamid.P3", t + 20, "STOP"),
    )
    .await;
    d.until("the answer is applied", WITHIN, async || {
        blocked(&d, "wa:14155550301", "utility").await
    })
    .await;
    assert_eq!(d.status().await.possible_opt_outs, 2);
    // Once stopped, another possible opt-out is recorded but asked about no more.
    deliver(
        &sender,
        &envelope::text(
            &Who::wa("14155550301"),
            "wamid.P4",
            t + 40,
            "why didn't my stop work?",
        ),
    )
    .await;
    d.until("the third one is recorded", WITHIN, async || {
        d.status().await.possible_opt_outs == 3
    })
    .await;
    d.until("nothing waits to be sent", WITHIN, async || {
        d.status()
            .await
            .connectors
            .iter()
            .all(|c| c.outbox_depth == 0)
    })
    .await;
    let sent = graph.sent();
    assert_eq!(
        sent.len(),
        3,
        "two clarifications and the STOP's confirmation: {sent:?}"
    );
    assert!(
        !sent
            .iter()
            .any(|m| m.context_message_id.as_deref() == Some("wamid.P4"))
    );
    assert!(d.terminate().await.success());
}

/// A `user_preferences` webhook delivered again counts once; a new one that repeats the
/// person's state decides nothing and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_preference_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let hook = optout_webhook::fake::start(optout_webhook::fake::FakeOptions::default()).await;
    let (mut d, sender) = daemon(dir.path(), &graph, Some(&hook.url())).await;
    let who = Who::wa("14155550401");
    let t = now_s() - 120;
    deliver(&sender, &envelope::user_preference(&who, "stop", t)).await;
    d.until("the marketing stop is announced", WITHIN, async || {
        !hook.events().is_empty()
    })
    .await;
    assert!(blocked(&d, "wa:14155550401", "marketing").await);
    assert!(!blocked(&d, "wa:14155550401", "utility").await);
    let decisions = |v: &Value| {
        (v["history"].as_array().unwrap().iter())
            .filter(|a| a["kind"] == "decision")
            .count()
    };
    let before = lookup(&d, "wa:14155550401").await;
    assert_eq!(decisions(&before), 1, "{before}");
    // The same webhook again, then the same preference sent anew a minute later.
    deliver(&sender, &envelope::user_preference(&who, "stop", t)).await;
    deliver(&sender, &envelope::user_preference(&who, "stop", t + 60)).await;
    d.until("both are read", WITHIN, async || {
        observed(&d, "duplicate").await >= 1.0 && observed(&d, "repeated").await >= 1.0
    })
    .await;
    d.until("nothing waits to be pushed", WITHIN, async || {
        d.status()
            .await
            .connectors
            .iter()
            .all(|c| c.outbox_depth == 0)
    })
    .await;
    let events = hook.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].scope.as_str(), events[0].status.as_str()),
        ("marketing", "opted_out")
    );
    let after = lookup(&d, "wa:14155550401").await;
    assert_eq!(decisions(&after), 1, "{after}");
    assert!(graph.sent().is_empty(), "{:?}", graph.sent());
    assert_eq!(observed(&d, "accepted").await, 1.0);
    assert!(d.terminate().await.success());
}

/// `check-config` names each bad keyword setting at its line: an unknown scope, a scope for
/// a word that is no keyword, a word listed twice, an empty word, an unlisted payload.
#[test]
fn check_config_locates_bad_keyword_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optout-sync.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &path,
        format!(
            r#"[daemon]
state_dir = "{}"

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{{ env = "PATH" }}]
verify_token = {{ env = "HOME" }}

[connectors.whatsapp.keywords]
opt_out = {{ en = ["HALT", "halt!", ""] }}
opt_out_payloads = ["MKT_STOP"]

[connectors.whatsapp.keywords.scopes]
HALT = "promotions"
"STOP PROMOTIONS" = "marketing"
WHATEVER = "all"

[connectors.whatsapp.keywords.payload_scopes]
MKT_STOP = "marketing"
OTHER = "all"
"#,
            state.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .arg("check-config")
        .arg(&path)
        .env_remove("OPTOUT_SYNC_CONFIG")
        .output()
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(2), "{t}");
    for want in [
        "optout-sync.toml:10:18: connectors.whatsapp.keywords.opt_out.en: \"halt!\" is listed twice",
        "optout-sync.toml:10:18: connectors.whatsapp.keywords.opt_out.en: keyword \"\" has no letters or digits",
        "optout-sync.toml:14:8: connectors.whatsapp.keywords.scopes.HALT: unknown scope \"promotions\": use \"all\" or \"marketing\"",
        "optout-sync.toml:16:12: connectors.whatsapp.keywords.scopes.WHATEVER: \"WHATEVER\" is not an opt-out or opt-in keyword",
        "optout-sync.toml:20:9: connectors.whatsapp.keywords.payload_scopes.OTHER: \"OTHER\" is not listed",
        "5 problems found",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
}
