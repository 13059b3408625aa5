//! Erasure end to end, as the real binary: a person who said STOP on WhatsApp is erased
//! through the running daemon; `lookup` and the gate say erased and suppressed; after a
//! restart no readable trace of the number or the message text is left in the store's
//! files or the audit export; a CRM record that brings the number back is corrected.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::GATE_TOKEN;
use common::config::Config;
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{GraphOptions, WebhookSender, start_graph};
use serde_json::Value;

const APP_SECRET: &str = "meta-app-secret-for-tests";
const WA: &str = "14155552671";
const TEXT: &str = "Unsubscribe me!";
/// Every form of the number a file could hold it in.
const TRACES: [&str; 4] = ["14155552671", "4155552671", "415-555-2671", "415) 555"];

fn config(dir: &Path, hubspot: &str, graph: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .graph(graph)
        .set("whatsapp", "confirmations.enabled = false")
        .hubspot(hubspot)
}

async fn gate(d: &common::Daemon, id: &str) -> GateReply {
    reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/{id}?category=utility")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs a command of the real binary; returns (exit code, stdout).
fn cli(config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some(), "{stderr}");
    (out.status.code().unwrap(), format!("{stdout}{stderr}"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Where the store of the daemon in `test_dir` still holds any of `needles`: sled's files
/// under `state`, or PostgreSQL's rows and table files.
fn traces(test_dir: &Path, state: &Path, needles: &[&str]) -> Vec<String> {
    common::store::traces_in_database(test_dir, needles)
        .unwrap_or_else(|| traces_in(state, needles))
}

/// Every file under `dir`, and which of `needles` each holds.
fn traces_in(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            found.extend(traces_in(&path, needles));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push(format!("{} holds `{n}`", path.display()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_person_stays_suppressed_and_leaves_no_trace_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let graph = start_graph(GraphOptions::default()).await;
    // Someone else, so that HubSpot's cursor moves on.
    hs.create_contact(&[("phone", "+1 212 555 0100")]);
    let c = config(dir.path(), &hs.base_url(), &graph.base_url());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    let now = optout_core::Timestamp::now().millis() / 1000;
    let stop = envelope::text(&Who::wa(WA), "wamid.ERASE1", now, TEXT);
    assert!(sender.deliver(&stop).await.delivered);
    d.until("the STOP is applied", Duration::from_secs(30), async || {
        gate(&d, "+14155552671").await.allowed == Some(false)
    })
    .await;
    let needles: Vec<&str> = TRACES.iter().copied().chain([TEXT]).collect();
    assert!(
        !traces(dir.path(), &state, &needles).is_empty(),
        "the store holds the number and the text before the erasure"
    );

    // Erased through the running daemon.
    let (code, out) = cli(&d.config, &["erase", "+1 (415) 555-2671", "--json"]);
    assert_eq!(code, 0, "{out}");
    let erased = json(&out);
    assert_eq!(erased["suppressed"], true, "{out}");
    assert_eq!(erased["compaction_pending"], true, "{out}");
    assert_eq!(erased["tombstones"].as_array().unwrap().len(), 2, "{out}");
    assert!(!out.contains(WA) && !out.contains(TEXT), "{out}");
    // `lookup` and the gate: erased, and suppressed.
    let (code, out) = cli(&d.config, &["lookup", "wa:14155552671", "--json"]);
    assert_eq!(code, 0, "{out}");
    let found = json(&out);
    assert_eq!(found["known"], false, "{out}");
    assert_eq!(found["erased"]["suppressed"], true, "{out}");
    let (_, text) = cli(&d.config, &["lookup", "+14155552671"]);
    assert!(
        text.contains("erased on") && text.contains("suppressed"),
        "{text}"
    );
    let g = gate(&d, "+14155552671").await;
    assert_eq!(g.allowed, Some(false), "{g:?}");
    assert_eq!(g.blocked_by.as_deref(), Some("all"));
    assert!(d.terminate().await.success());

    // Stopped: the audit export holds no trace of the person.
    let (code, export) = cli(&c_path(dir.path()), &["audit", "export"]);
    assert_eq!(code, 0, "{export}");
    assert!(export.contains(r#""kind":"erased""#), "{export}");
    for n in &needles {
        assert!(
            !export.contains(n),
            "the audit export holds `{n}`:\n{export}"
        );
    }

    // The next start compacts the store: nothing readable is left in its files.
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let left = traces(dir.path(), &state, &needles);
    assert!(left.is_empty(), "{left:?}");
    assert!(
        d.log_text()
            .contains("compacted the store after an erasure")
    );

    // A CRM record brings the number back as opted in: corrected, and the gate blocks.
    let contact = hs.create_contact(&[
        ("phone", "+1 415 555 2671"),
        ("whatsapp_consent", "opted_in"),
    ]);
    d.until(
        "the HubSpot contact is corrected to opted_out",
        Duration::from_secs(30),
        async || hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;
    let g = gate(&d, "+14155552671").await;
    assert_eq!(g.allowed, Some(false), "{g:?}");
    assert!(
        g.subject.is_some(),
        "a subject holds the number again: {g:?}"
    );
}

/// The configuration file `common::start` wrote.
fn c_path(dir: &Path) -> std::path::PathBuf {
    dir.join("optout-sync.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_erasure_compacts_at_once_and_store_compact_is_offline_only() {
    if common::sled_only("it searches sled's files for traces and runs sled's compaction") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let graph = start_graph(GraphOptions::default()).await;
    let contact = hs.create_contact(&[("mobilephone", "415-555-2671")]);
    let c = config(dir.path(), &hs.base_url(), &graph.base_url());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    let now = optout_core::Timestamp::now().millis() / 1000;
    assert!(
        (sender
            .deliver(&envelope::text(&Who::wa(WA), "wamid.E2", now, TEXT))
            .await)
            .delivered
    );
    d.until(
        "the contact is suppressed",
        Duration::from_secs(30),
        async || hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;
    // While the daemon runs, compaction is refused (it holds the store).
    let (code, out) = cli(&d.config, &["store", "compact"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("in use"), "{out}");
    assert!(d.terminate().await.success());

    let (code, out) = cli(&c_path(dir.path()), &["erase", "wa:14155552671"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the store was compacted"), "{out}");
    let needles: Vec<&str> = TRACES.iter().copied().chain([TEXT]).collect();
    let left = traces(dir.path(), &state, &needles);
    assert!(left.is_empty(), "{left:?}");
    let (code, out) = cli(&c_path(dir.path()), &["store", "compact"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("compacted the store"), "{out}");
    let (_, out) = cli(&c_path(dir.path()), &["erase", "+14155552671"]);
    assert!(out.contains("already erased"), "{out}");
}
