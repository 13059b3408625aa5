//! WhatsApp end to end: signed webhooks into the real daemon, durability across SIGKILL,
//! BSUID linking, confirmation replies, and what unsigned or unusable bodies get.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::GATE_TOKEN;
use common::config::Config;
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{GraphOptions, WebhookSender, start_graph};

const APP_SECRET: &str = "meta-app-secret-for-tests";
const WA: &str = "14155552671";

fn config(dir: &Path, hubspot: &str, graph: &str, confirmations: bool) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        // A retired app secret, still accepted while Meta's secret is being rotated.
        .set(
            "whatsapp",
            r#"app_secrets = [{ env = "WA_OLD_SECRET" }, { env = "WA_APP_SECRET" }]"#,
        )
        .env_var("WA_OLD_SECRET", "retired-secret")
        .graph(graph)
        .set(
            "whatsapp",
            &format!("confirmations.enabled = {confirmations}"),
        )
        .hubspot(hubspot)
}

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

async fn hubspot() -> optout_hubspot::fake::FakeHandle {
    optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await
}

async fn gate(d: &common::Daemon, id: &str, category: &str) -> GateReply {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_stop_survives_sigkill_right_after_the_200() {
    let dir = tempfile::tempdir().unwrap();
    let hs = hubspot().await;
    let graph = start_graph(GraphOptions::default()).await;
    let contact = hs.create_contact(&[("phone", "+1 (415) 555-2671")]);
    let c = config(dir.path(), &hs.base_url(), &graph.base_url(), false);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET)
        .with_retries(1, Duration::from_millis(10));
    let delivery = sender
        .deliver(&envelope::text(
            &Who::wa(WA),
            "wamid.STOP1",
            now_s(),
            "STOP",
        ))
        .await;
    assert!(delivery.delivered, "{:?}", delivery.attempts);
    // SIGKILL at once: no chance to process, flush or clean up.
    d.child.start_kill().unwrap();
    d.child.wait().await.unwrap();

    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until(
        "the STOP is applied after the restart",
        Duration::from_secs(30),
        async || gate(&d, "+14155552671", "utility").await.allowed == Some(false),
    )
    .await;
    d.until(
        "the HubSpot contact is suppressed",
        Duration::from_secs(30),
        async || hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bsuid_only_stop_is_linked_to_the_phone_later_and_replies_are_sent_once() {
    let dir = tempfile::tempdir().unwrap();
    let hs = hubspot().await;
    let graph = start_graph(GraphOptions::default()).await;
    let contact = hs.create_contact(&[("mobilephone", "415-555-2671")]);
    let c = config(dir.path(), &hs.base_url(), &graph.base_url(), true);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);

    // A username user (no phone number) sends STOP.
    let stop = envelope::text(
        &Who::bsuid("US.13491208655302741918"),
        "wamid.B1",
        now_s(),
        "stop please",
    );
    assert!(sender.deliver(&stop).await.delivered);
    d.until(
        "the BSUID is blocked",
        Duration::from_secs(30),
        async || gate(&d, "US.13491208655302741918", "utility").await.allowed == Some(false),
    )
    .await;
    // Meta redelivers the same message: still exactly one confirmation.
    assert!(sender.deliver(&stop).await.delivered);
    d.until(
        "one confirmation reply",
        Duration::from_secs(30),
        async || graph.sent().len() == 1,
    )
    .await;
    let reply = &graph.sent()[0];
    assert_eq!(reply.recipient.as_deref(), Some("US.13491208655302741918"));
    assert_eq!(reply.context_message_id.as_deref(), Some("wamid.B1"));
    // The phone is not yet known to be that person.
    assert_eq!(
        gate(&d, "+14155552671", "utility").await.allowed,
        Some(true)
    );
    assert_eq!(hs.property(&contact, "whatsapp_consent"), None);

    // A later message shows both ids: one person, and the CRM contact is suppressed.
    let hello = envelope::text(
        &Who::both(WA, "US.13491208655302741918"),
        "wamid.B2",
        now_s(),
        "thanks",
    );
    assert!(sender.deliver(&hello).await.delivered);
    d.until(
        "the contact holding the number is suppressed",
        Duration::from_secs(30),
        async || hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;
    assert_eq!(
        gate(&d, "+14155552671", "marketing").await.allowed,
        Some(false)
    );
    assert_eq!(
        graph.sent().len(),
        1,
        "no message to an opted-out person but the one confirmation"
    );
    let status = d.status().await;
    assert_eq!(status.people("all", "opted_out"), 1, "{status:?}");
    let _ = d.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_bodies_are_refused_and_unusable_ones_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let hs = hubspot().await;
    let graph = start_graph(GraphOptions::default()).await;
    let c = config(dir.path(), &hs.base_url(), &graph.base_url(), false);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    // No connection reuse: the server closes a connection after refusing a body early.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = d.url("/webhooks/whatsapp");
    let body = envelope::text(&Who::wa(WA), "wamid.X", now_s(), "STOP");
    let r = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .header(
            "X-Hub-Signature-256",
            optout_whatsapp::fake::sign("wrong", &body),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // An oversized body is refused with 413; the server may close the connection before
    // the client has finished sending, which the client sees as a cut-off request.
    let big = vec![b'x'; 2 << 20];
    match http
        .post(&url)
        .header(
            "X-Hub-Signature-256",
            optout_whatsapp::fake::sign(APP_SECRET, &big),
        )
        .body(big)
        .send()
        .await
    {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    let garbage = b"{not json".to_vec();
    let r = http
        .post(&url)
        .header(
            "X-Hub-Signature-256",
            optout_whatsapp::fake::sign(APP_SECRET, &garbage),
        )
        .body(garbage)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "signed garbage is acknowledged so Meta stops retrying"
    );
    let r = http
        .get(format!(
            "{url}?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=12345"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "12345");
    let r = http
        .get(format!(
            "{url}?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=12345"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let status = d.status().await;
    assert_eq!(status.quarantined_webhooks, 1, "{status:?}");
    assert_eq!(
        status.subjects_total, 0,
        "nothing from refused bodies was applied: {status:?}"
    );
    assert_eq!(gate(&d, "+14155552671", "utility").await.known, Some(false));
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 quarantined"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
