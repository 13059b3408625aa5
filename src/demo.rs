//! `optout-sync demo`: the whole flow on this machine, with no credentials and no setup.
//!
//! Starts the fakes of every connector on 127.0.0.1 (WhatsApp Graph API, HubSpot,
//! Salesforce, an automation-webhook receiver) with seeded records, runs the daemon
//! in-process against them with a temporary store, sends a signed "STOP" webhook the way
//! Meta does, and prints what happened in each system and how long it took.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::control::{self, Request};

const PHONE: &str = "+1 415 555 2671";
const WA_ID: &str = "14155552671";
const APP_SECRET: &str = "demo-app-secret";
const GATE: &str = "demo-gate-token";

fn secret_file(dir: &Path, name: &str, value: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, value)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path.display().to_string())
}

pub async fn demo(out: &mut (impl Write + Send)) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let d = dir.path();
    writeln!(
        out,
        "optout-sync demo: every system is a fake on 127.0.0.1; nothing leaves this machine.\n"
    )?;

    let graph =
        optout_whatsapp::fake::start_graph(optout_whatsapp::fake::GraphOptions::default()).await;
    let hubspot = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let salesforce =
        optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let hook = optout_webhook::fake::start(optout_webhook::fake::FakeOptions::default()).await;

    let hs_ada = hubspot.create_contact(&[
        ("firstname", "Ada"),
        ("lastname", "Lovelace"),
        ("phone", PHONE),
    ]);
    let hs_dup = hubspot.create_contact(&[
        ("firstname", "A."),
        ("lastname", "Lovelace"),
        ("mobilephone", "(415) 555-2671"),
    ]);
    let hs_other = hubspot.create_contact(&[
        ("firstname", "Grace"),
        ("lastname", "Hopper"),
        ("phone", "+1 212 555 0100"),
    ]);
    let sf_contact = salesforce.insert(
        "Contact",
        json!({"FirstName": "Ada", "LastName": "Lovelace", "Phone": "415.555.2671"}),
    );
    let sf_lead = salesforce.insert("Lead", json!({"LastName": "Lovelace", "Company": "Analytical Engines", "MobilePhone": "+14155552671"}));
    let sf_meu = salesforce.insert(
        "MessagingEndUser",
        json!({"Name": "Ada on WhatsApp", "MessageType": "WhatsApp", "MessagingPlatformKey": "whatsapp:+14155552671", "MessagingConsentStatus": "ImplicitlyOptedIn"}),
    );
    writeln!(out, "seeded:")?;
    writeln!(
        out,
        "  HubSpot      {} contacts; {hs_ada} and {hs_dup} hold {PHONE} in different formats",
        3
    )?;
    writeln!(
        out,
        "  Salesforce   Contact {sf_contact}, Lead {sf_lead} and WhatsApp MessagingEndUser {sf_meu} hold the number"
    )?;
    writeln!(
        out,
        "  WhatsApp     the customer {WA_ID} is in conversation with the business"
    )?;

    let config = format!(
        r#"
[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
control_socket = "{socket}"
gate_token = {{ file = "{gate}" }}
shutdown_timeout = "5s"

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{{ file = "{app}" }}]
verify_token = {{ file = "{verify}" }}
access_token = {{ file = "{access}" }}
phone_number_id = "106540352242922"
base_url = "{graph}"
[connectors.whatsapp.confirmations]
enabled = true

[connectors.hubspot]
kind = "hubspot"
poll_interval = "250ms"
base_url = "{hubspot}"
token = {{ file = "{hs_token}" }}

[connectors.salesforce]
kind = "salesforce"
poll_interval = "250ms"
login_url = "{salesforce}"
auth = {{ flow = "client_credentials", client_id = "fake-client-id", client_secret = {{ file = "{sf_secret}" }} }}
messaging_end_user = true

[connectors.automations]
kind = "webhook"
url = "{hook}"
secret = {{ file = "{hook_secret}" }}
"#,
        state = d.join("state").display(),
        socket = d.join("control.sock").display(),
        gate = secret_file(d, "gate", GATE)?,
        app = secret_file(d, "app-secret", APP_SECRET)?,
        verify = secret_file(d, "verify", "demo-verify")?,
        access = secret_file(d, "access", "fake-access-token")?,
        graph = graph.base_url(),
        hubspot = hubspot.base_url(),
        hs_token = secret_file(d, "hs-token", optout_hubspot::fake::TOKEN)?,
        salesforce = salesforce.base_url(),
        sf_secret = secret_file(d, "sf-secret", "fake-client-secret")?,
        hook = hook.url(),
        hook_secret = secret_file(d, "hook-secret", "fake-webhook-secret")?,
    );
    let config_path = d.join("optout-sync.toml");
    std::fs::write(&config_path, &config)?;
    let config = crate::app::load(&config_path)?;
    let socket = config.daemon.control_socket.clone();

    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(crate::daemon::run_until(
        config,
        async {
            let _ = stop_rx.await;
        },
        Some(bound_tx),
    ));
    let addr = bound_rx.await.context("the daemon did not start")?;
    writeln!(
        out,
        "\ndaemon ready in {} ms, listening on {addr}",
        started.elapsed().as_millis()
    )?;

    // Wait for the first full sync of both CRMs (it builds the phone → records index).
    let t = Instant::now();
    loop {
        let s = control::request(&socket, &Request::Status, |_| {}).await?;
        let synced = s["connectors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["kind"] == "hubspot" || c["kind"] == "salesforce")
            .all(|c| !c["last_poll_ok"].is_null());
        if synced {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the first sync did not finish: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writeln!(
        out,
        "first sync of HubSpot and Salesforce done in {} ms",
        t.elapsed().as_millis()
    )?;

    // The customer replies STOP.
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    let body = optout_whatsapp::fake::envelope::text(
        &optout_whatsapp::fake::envelope::Who::wa(WA_ID),
        "wamid.DEMO-STOP",
        now_s,
        "STOP",
    );
    let sender = optout_whatsapp::fake::WebhookSender::new(
        format!("http://{addr}/webhooks/whatsapp"),
        APP_SECRET,
    );
    let t0 = Instant::now();
    let delivery = sender.deliver(&body).await;
    anyhow::ensure!(
        delivery.delivered,
        "the webhook was not acknowledged: {:?}",
        delivery.attempts
    );
    writeln!(
        out,
        "\nthe customer sends \"STOP\" on WhatsApp; signed webhook acknowledged (stored durably) in {} ms",
        t0.elapsed().as_millis()
    )?;

    let http = reqwest::Client::new();
    let gate_url = format!("http://{addr}/v1/consent/{WA_ID}?category=utility");

    // Watch every system until each shows the opt-out.
    let mut done: Vec<(u128, String)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gate_blocked = false;
    while Instant::now() < deadline {
        let mut check = |key: &str, ok: bool, what: String| {
            if ok && seen.insert(key.to_string()) {
                done.push((t0.elapsed().as_millis(), what));
            }
        };
        if !gate_blocked {
            let v: serde_json::Value = http
                .get(&gate_url)
                .bearer_auth(GATE)
                .send()
                .await?
                .json()
                .await?;
            gate_blocked = v["allowed"] == false;
            check(
                "gate",
                gate_blocked,
                format!(
                    "send gate: {WA_ID} blocked for every category ({})",
                    v["evidence"]["evidence"].as_str().unwrap_or("")
                ),
            );
        }
        for (id, name) in [(&hs_ada, "Ada Lovelace"), (&hs_dup, "A. Lovelace")] {
            let ok = hubspot.property(id, "whatsapp_consent").as_deref() == Some("opted_out");
            check(
                &format!("hs{id}"),
                ok,
                format!("HubSpot      contact {id} ({name}): whatsapp_consent = opted_out"),
            );
        }
        for (id, what) in [(&sf_contact, "Contact"), (&sf_lead, "Lead")] {
            let ok = salesforce
                .get(id)
                .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true));
            check(
                &format!("sf{id}"),
                ok,
                format!("Salesforce   {what} {id}: WhatsApp_Opt_Out__c = true"),
            );
        }
        let meu = salesforce
            .get(&sf_meu)
            .is_some_and(|v| v["MessagingConsentStatus"] == json!("OptedOut"));
        check(
            "meu",
            meu,
            format!("Salesforce   MessagingEndUser {sf_meu}: MessagingConsentStatus = OptedOut"),
        );
        let sent = graph.sent();
        if let Some(m) = sent.first() {
            let text = m.body["text"]["body"].as_str().unwrap_or("").to_string();
            check(
                "reply",
                true,
                format!(
                    "WhatsApp     one confirmation reply to {}: \"{text}\"",
                    m.to.clone().unwrap_or_default()
                ),
            );
        }
        let events = hook.events();
        if let Some(e) = events.first() {
            check(
                "hook",
                true,
                format!(
                    "automations  signed event consent.changed: {} {} (from {})",
                    e.scope, e.status, e.source
                ),
            );
        }
        if seen.len() == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.sort();
    for (ms, what) in &done {
        writeln!(out, "  +{ms:>4} ms  {what}")?;
    }
    let untouched = hubspot.property(&hs_other, "whatsapp_consent").is_none();
    writeln!(
        out,
        "  (HubSpot contact {hs_other}, another person, untouched: {untouched})"
    )?;
    if seen.len() < 8 {
        writeln!(
            out,
            "\nnot every system showed the opt-out within 30 s; see `optout-sync status`"
        )?;
    }
    // The systems show the writes a moment before the daemon has recorded the outcomes.
    let settle = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = control::request(&socket, &Request::Status, |_| {}).await?;
        let empty = s["connectors"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["outbox_depth"] == 0);
        if empty || Instant::now() > settle {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    writeln!(
        out,
        "\nstatus: {} person opted out of all messages; outbox empty: {}",
        status["subjects"]["all:opted_out"],
        status["connectors"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["outbox_depth"] == 0)
    )?;
    let _ = stop_tx.send(());
    daemon.await??;
    anyhow::ensure!(seen.len() == 8, "the opt-out did not reach every system");
    Ok(())
}
