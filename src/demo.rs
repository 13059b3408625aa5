//! `optout-sync demo`: the whole flow on this machine, with no credentials and no setup.
//!
//! Starts the fakes of every connector on 127.0.0.1 (WhatsApp Graph API, HubSpot,
//! Salesforce, an automation-webhook receiver) with seeded records, runs the daemon
//! in-process against them with a temporary store, sends a signed "STOP" webhook the way
//! Meta does, and prints what happened in each system and how long it took.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::control;
use crate::report::GateReply;

const PHONE: &str = "+1 415 555 2671";
const WA_ID: &str = "14155552671";
const APP_SECRET: &str = "demo-app-secret";
const GATE: &str = "demo-send-gate-token";

fn secret_file(dir: &Path, name: &str, value: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, value)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path.display().to_string())
}

/// The fakes of every system, on 127.0.0.1.
struct Fakes {
    graph: optout_whatsapp::fake::FakeGraph,
    hubspot: optout_hubspot::fake::FakeHandle,
    salesforce: optout_salesforce::fake::FakeHandle,
    hook: optout_webhook::fake::FakeHandle,
}

/// The records seeded for the customer (and one for somebody else).
struct Seeded {
    hs_ada: String,
    hs_dup: String,
    hs_other: String,
    sf_contact: String,
    sf_lead: String,
    sf_meu: String,
}

pub async fn demo(out: &mut (impl Write + Send)) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    writeln!(
        out,
        "optout-sync demo: every system is a fake on 127.0.0.1; nothing leaves this machine.\n"
    )?;
    let fakes = start_fakes().await;
    let seeded = seed(&fakes, out)?;
    let checked = crate::app::load(&write_config(dir.path(), &fakes)?)?;
    let socket = checked.daemon.control_socket.clone();

    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let stop = async {
        let _ = stop_rx.await;
    };
    let daemon = tokio::spawn(crate::daemon::run_until(checked, stop, Some(bound_tx)));
    let addr = bound_rx.await.context("the daemon did not start")?;
    let ms = started.elapsed().as_millis();
    writeln!(out, "\ndaemon ready in {ms} ms, listening on {addr}")?;
    wait_for_first_sync(&socket, out).await?;

    let t0 = send_stop(addr, out).await?;
    let seen = watch(&fakes, &seeded, addr, t0, out).await?;
    report(&socket, out).await?;
    let _ = stop_tx.send(());
    daemon.await??;
    anyhow::ensure!(seen == 8, "the opt-out did not reach every system");
    Ok(())
}

async fn start_fakes() -> Fakes {
    use optout_hubspot::fake as hs;
    Fakes {
        graph: optout_whatsapp::fake::start_graph(Default::default()).await,
        hubspot: hs::start(hs::FakeOptions {
            limits: hs::Limits::off(),
            ..Default::default()
        })
        .await,
        salesforce: optout_salesforce::fake::start(Default::default()).await,
        hook: optout_webhook::fake::start(Default::default()).await,
    }
}

fn seed(f: &Fakes, out: &mut impl Write) -> Result<Seeded> {
    let contact = |props: &[(&str, &str)]| f.hubspot.create_contact(props);
    let s = Seeded {
        hs_ada: contact(&[("firstname", "Ada"), ("lastname", "Lovelace"), ("phone", PHONE)]),
        hs_dup: contact(&[
            ("firstname", "A."),
            ("lastname", "Lovelace"),
            ("mobilephone", "(415) 555-2671"),
        ]),
        hs_other: contact(&[
            ("firstname", "Grace"),
            ("lastname", "Hopper"),
            ("phone", "+1 212 555 0100"),
        ]),
        sf_contact: f.salesforce.insert(
            "Contact",
            json!({"FirstName": "Ada", "LastName": "Lovelace", "Phone": "415.555.2671"}),
        ),
        sf_lead: f.salesforce.insert("Lead", json!({"LastName": "Lovelace", "Company": "Analytical Engines", "MobilePhone": "+14155552671"})),
        sf_meu: f.salesforce.insert(
            "MessagingEndUser",
            json!({"Name": "Ada on WhatsApp", "MessageType": "WhatsApp", "MessagingPlatformKey": "whatsapp:+14155552671", "MessagingConsentStatus": "ImplicitlyOptedIn"}),
        ),
    };
    writeln!(out, "seeded:")?;
    writeln!(
        out,
        "  HubSpot      3 contacts; {} and {} hold {PHONE} in different formats",
        s.hs_ada, s.hs_dup
    )?;
    writeln!(
        out,
        "  Salesforce   Contact {}, Lead {} and WhatsApp MessagingEndUser {} hold the number",
        s.sf_contact, s.sf_lead, s.sf_meu
    )?;
    writeln!(
        out,
        "  WhatsApp     the customer {WA_ID} is in conversation with the business"
    )?;
    Ok(s)
}

/// Writes the daemon's configuration (secrets in 0600 files) and returns its path.
fn write_config(d: &Path, f: &Fakes) -> Result<std::path::PathBuf> {
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
        graph = f.graph.base_url(),
        hubspot = f.hubspot.base_url(),
        hs_token = secret_file(d, "hs-token", optout_hubspot::fake::TOKEN)?,
        salesforce = f.salesforce.base_url(),
        sf_secret = secret_file(d, "sf-secret", "fake-client-secret")?,
        hook = f.hook.url(),
        hook_secret = secret_file(d, "hook-secret", "fake-webhook-secret")?,
    );
    let path = d.join("optout-sync.toml");
    std::fs::write(&path, &config)?;
    Ok(path)
}

/// Waits for the first full sync of both CRMs (it builds the phone → records index).
async fn wait_for_first_sync(socket: &Path, out: &mut impl Write) -> Result<()> {
    let t = Instant::now();
    loop {
        let s = control::status(socket).await?;
        let synced = (s.connectors.iter())
            .filter(|c| c.kind == "hubspot" || c.kind == "salesforce")
            .all(|c| c.last_poll_ok.is_some());
        if synced {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the first sync did not finish: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = t.elapsed().as_millis();
    writeln!(out, "first sync of HubSpot and Salesforce done in {ms} ms")?;
    Ok(())
}

/// The customer replies STOP: a webhook signed the way Meta signs it. Returns when it was
/// sent.
async fn send_stop(addr: SocketAddr, out: &mut impl Write) -> Result<Instant> {
    use optout_whatsapp::fake::{WebhookSender, envelope};
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    let body = envelope::text(&envelope::Who::wa(WA_ID), "wamid.DEMO-STOP", now_s, "STOP");
    let sender = WebhookSender::new(format!("http://{addr}/webhooks/whatsapp"), APP_SECRET);
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
    Ok(t0)
}

/// What has shown the opt-out so far, with when.
#[derive(Default)]
struct Seen {
    done: Vec<(u128, String)>,
    keys: std::collections::BTreeSet<String>,
}

impl Seen {
    fn check(&mut self, t0: Instant, key: &str, ok: bool, what: String) {
        if ok && self.keys.insert(key.to_string()) {
            self.done.push((t0.elapsed().as_millis(), what));
        }
    }
}

/// Watches every system until each shows the opt-out (30 s at most); prints the timeline
/// and returns how many of the eight did.
async fn watch(
    f: &Fakes,
    s: &Seeded,
    addr: SocketAddr,
    t0: Instant,
    out: &mut impl Write,
) -> Result<usize> {
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && seen.keys.len() < 8 {
        if !seen.keys.contains("gate") {
            check_gate(addr, t0, &mut seen).await?;
        }
        check_systems(f, s, t0, &mut seen);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen.done.sort();
    for (ms, what) in &seen.done {
        writeln!(out, "  +{ms:>4} ms  {what}")?;
    }
    let untouched = f
        .hubspot
        .property(&s.hs_other, "whatsapp_consent")
        .is_none();
    writeln!(
        out,
        "  (HubSpot contact {}, another person, untouched: {untouched})",
        s.hs_other
    )?;
    if seen.keys.len() < 8 {
        writeln!(
            out,
            "\nnot every system showed the opt-out within 30 s; see `optout-sync status`"
        )?;
    }
    Ok(seen.keys.len())
}

async fn check_gate(addr: SocketAddr, t0: Instant, seen: &mut Seen) -> Result<()> {
    let url = format!("http://{addr}/v1/consent/{WA_ID}?category=utility");
    let reply: GateReply = (reqwest::Client::new().get(&url).bearer_auth(GATE))
        .send()
        .await?
        .json()
        .await?;
    let evidence = (reply.evidence.as_ref())
        .and_then(|e| e["evidence"].as_str())
        .unwrap_or("")
        .to_string();
    seen.check(
        t0,
        "gate",
        reply.allowed == Some(false),
        format!("send gate: {WA_ID} blocked for every category ({evidence})"),
    );
    Ok(())
}

fn check_systems(f: &Fakes, s: &Seeded, t0: Instant, seen: &mut Seen) {
    for (id, name) in [(&s.hs_ada, "Ada Lovelace"), (&s.hs_dup, "A. Lovelace")] {
        let ok = f.hubspot.property(id, "whatsapp_consent").as_deref() == Some("opted_out");
        let what = format!("HubSpot      contact {id} ({name}): whatsapp_consent = opted_out");
        seen.check(t0, &format!("hs{id}"), ok, what);
    }
    for (id, what) in [(&s.sf_contact, "Contact"), (&s.sf_lead, "Lead")] {
        let ok = (f.salesforce.get(id)).is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true));
        let what = format!("Salesforce   {what} {id}: WhatsApp_Opt_Out__c = true");
        seen.check(t0, &format!("sf{id}"), ok, what);
    }
    let meu = (f.salesforce.get(&s.sf_meu))
        .is_some_and(|v| v["MessagingConsentStatus"] == json!("OptedOut"));
    let what = format!(
        "Salesforce   MessagingEndUser {}: MessagingConsentStatus = OptedOut",
        s.sf_meu
    );
    seen.check(t0, "meu", meu, what);
    if let Some(m) = f.graph.sent().first() {
        let text = m.body["text"]["body"].as_str().unwrap_or("");
        let to = m.to.clone().unwrap_or_default();
        let what = format!("WhatsApp     one confirmation reply to {to}: \"{text}\"");
        seen.check(t0, "reply", true, what);
    }
    if let Some(e) = f.hook.events().first() {
        let what = format!(
            "automations  signed event consent.changed: {} {} (from {})",
            e.scope, e.status, e.source
        );
        seen.check(t0, "hook", true, what);
    }
}

/// The systems show the writes a moment before the daemon has recorded the outcomes: wait
/// (5 s at most) for an empty outbox, then print the totals.
async fn report(socket: &Path, out: &mut impl Write) -> Result<()> {
    let settle = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = control::status(socket).await?;
        let empty = s.connectors.iter().all(|c| c.outbox_depth == 0);
        if empty || Instant::now() > settle {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    writeln!(
        out,
        "\nstatus: {} person opted out of all messages; outbox empty: {}",
        status.people("all", "opted_out"),
        status.connectors.iter().all(|c| c.outbox_depth == 0)
    )?;
    Ok(())
}
