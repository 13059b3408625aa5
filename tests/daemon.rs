//! The daemon end to end: the real binary against the HubSpot and Salesforce fakes and an
//! automation-webhook receiver, all on 127.0.0.1.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::Config;
use common::{GATE_TOKEN, eventually};
use optout_core::Timestamp;
use optout_sync::report::{GateBatchReply, GateReply};
use serde_json::json;

const PHONE: &str = "+1 415 555 2671";

use common::{Fakes, fakes};

fn config(dir: &Path, f: &Fakes, shutdown: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout(shutdown)
        .set("policy", r#"opt_in_margin = "5s""#)
        .hubspot(&f.hubspot.base_url())
        .salesforce(&f.salesforce.base_url())
        .automations(&f.hook.url())
}

/// Starts the daemon on `dir` with [`config`].
async fn start(dir: &Path, f: &Fakes, shutdown: &str) -> common::Daemon {
    let c = config(dir, f, shutdown);
    common::start(dir, &c.toml(), &c.env()).await
}

fn sf_opted_out(f: &Fakes, id: &str) -> bool {
    f.salesforce
        .get(id)
        .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
}

async fn synced(d: &common::Daemon) -> bool {
    let s = d.status().await;
    s.connectors
        .iter()
        .filter(|c| c.kind != "webhook")
        .all(|c| c.last_poll_ok.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_opt_out_reaches_every_system_the_gate_status_and_metrics_then_full_resync_repairs_drift()
 {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let hs_id = f
        .hubspot
        .create_contact(&[("firstname", "Ada"), ("phone", PHONE)]);
    let sf_contact = f.salesforce.insert(
        "Contact",
        json!({"LastName": "Lovelace", "Phone": "(415) 555-2671", "WhatsApp_Opt_Out__c": false}),
    );
    let sf_lead = f.salesforce.insert("Lead", json!({"LastName": "Lovelace", "Company": "AE", "MobilePhone": "4155552671", "WhatsApp_Opt_Out__c": false}));
    let other = f.salesforce.insert(
        "Contact",
        json!({"LastName": "Other", "Phone": "+1 212 555 0100", "WhatsApp_Opt_Out__c": false}),
    );

    let mut d = start(dir.path(), &f, "10s").await;
    eventually(
        "first full sync of both CRMs",
        Duration::from_secs(30),
        async || synced(&d).await,
    )
    .await;

    // An agent records the opt-out in HubSpot.
    let now = Timestamp::now();
    f.hubspot.edit_contact(
        &hs_id,
        &[
            ("whatsapp_consent", "opted_out"),
            ("whatsapp_consent_changed_at", &now.to_rfc3339()),
        ],
    );
    eventually(
        "Salesforce contact and lead suppressed",
        Duration::from_secs(30),
        async || sf_opted_out(&f, &sf_contact) && sf_opted_out(&f, &sf_lead),
    )
    .await;
    assert!(!sf_opted_out(&f, &other), "an unrelated record was touched");
    eventually(
        "the automation webhook heard of it",
        Duration::from_secs(30),
        async || f.hook.events().iter().any(|e| e.status == "opted_out"),
    )
    .await;

    // The send gate blocks every category, and needs its token.
    let http = reqwest::Client::new();
    let r = http
        .get(d.url("/v1/consent/+14155552671?category=utility"))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: GateReply = r.json().await.unwrap();
    assert_eq!(v.allowed, Some(false), "{v:?}");
    assert_eq!(v.blocked_by.as_deref(), Some("all"));
    let r = http
        .get(d.url("/v1/consent/+14155552671"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(d.url("/v1/consent/+12125550100?category=marketing"))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    let v: GateReply = r.json().await.unwrap();
    assert_eq!(v.allowed, Some(true), "{v:?}");
    let r = http
        .post(d.url("/v1/consent/batch"))
        .bearer_auth(GATE_TOKEN)
        .json(&json!({"category": "marketing", "ids": ["(415) 555-2671", "+12125550100", "nonsense"]}))
        .send()
        .await
        .unwrap();
    let v: GateBatchReply = r.json().await.unwrap();
    let allowed: Vec<Option<bool>> = v.results.iter().map(|r| r.allowed).collect();
    assert_eq!(allowed, [Some(false), Some(true), None], "{v:?}");
    // A full batch is read in shares on several threads at once; its answers keep the
    // order the ids were asked in.
    let ids: Vec<String> = (0..1000)
        .map(|i| match i % 3 {
            0 => "(415) 555-2671".to_string(),
            1 => "+12125550100".to_string(),
            _ => format!("nonsense {i}"),
        })
        .collect();
    let r = http
        .post(d.url("/v1/consent/batch"))
        .bearer_auth(GATE_TOKEN)
        .json(&json!({"category": "marketing", "ids": ids}))
        .send()
        .await
        .unwrap();
    let v: GateBatchReply = r.json().await.unwrap();
    assert_eq!(v.results.len(), ids.len());
    for (i, (asked, got)) in ids.iter().zip(&v.results).enumerate() {
        let expected = [Some(false), Some(true), None][i % 3];
        assert_eq!((&got.id, got.allowed), (asked, expected), "answer {i}");
    }

    // status and /metrics report what happened.
    eventually("pushes settle", Duration::from_secs(30), async || {
        let s = d.status().await;
        s.connectors.iter().all(|c| c.outbox_depth == 0)
    })
    .await;
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    assert!(s.ready);
    for c in &s.connectors {
        assert_eq!(c.health.as_ref().map(|h| h.ok), Some(true), "{c:?}");
        assert!(c.healthy, "{c:?}");
    }
    let metrics = http
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"optout_decisions_total{scope="all",decision="opted_out"} 1"#,
        r#"optout_pushes_total{connector="salesforce",outcome="done"} 2"#,
        r#"optout_subjects{scope="all",decision="opted_out"} 1"#,
        r#"optout_outbox_depth{connector="salesforce"} 0"#,
        "optout_propagation_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!(
        http.get(d.url("/readyz")).send().await.unwrap().status(),
        200
    );

    // The pushes are read back (verified) by the next polls.
    eventually(
        "pushes verified by read-back",
        Duration::from_secs(30),
        async || {
            let v = optout_sync::control::request(
                &d.socket,
                &optout_sync::control::Request::Lookup { id: PHONE.into() },
                |_| {},
            )
            .await
            .unwrap();
            let records = v["records"].as_array().unwrap().clone();
            records.len() == 3
                && records
                    .iter()
                    .all(|r| r["last_seen"] == "opted_out" && r["awaiting_readback"] == false)
        },
    )
    .await;

    // Someone clears the flag behind the daemon's back, with a modification time the
    // incremental poll will never look at again.
    f.salesforce
        .update(&sf_lead, json!({"WhatsApp_Opt_Out__c": false}));
    f.salesforce
        .set_modstamp(&sf_lead, Timestamp::now().minus(Duration::from_secs(3600)));
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["resync", "--full", "--connector", "salesforce", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("salesforce: done"), "{text}");
    eventually(
        "full resync repairs the lead",
        Duration::from_secs(30),
        async || sf_opted_out(&f, &sf_lead),
    )
    .await;

    // Lookup through the running daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["lookup", "--config"])
        .arg(&d.config)
        .arg(PHONE)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("opted_out") && text.contains(&format!("Lead/{sf_lead}")),
        "{text}"
    );

    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_pushes_loses_nothing_and_notifies_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let hs_id = f.hubspot.create_contact(&[("phone", PHONE)]);
    let mut leads = Vec::new();
    for i in 0..30 {
        leads.push(f.salesforce.insert("Lead", json!({"LastName": format!("L{i}"), "Company": "X", "Phone": PHONE, "WhatsApp_Opt_Out__c": false})));
    }
    let mut d = start(dir.path(), &f, "1s").await;
    eventually("first sync", Duration::from_secs(30), async || {
        synced(&d).await
    })
    .await;

    // Salesforce answers slowly: pushes will be in flight when SIGTERM arrives.
    f.salesforce.set_faults(optout_salesforce::fake::Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_secs(5),
        ..Default::default()
    });
    let before = f.salesforce.counters().collections;
    f.hubspot
        .edit_contact(&hs_id, &[("whatsapp_consent", "opted_out")]);
    eventually(
        "a collections push is in flight",
        Duration::from_secs(30),
        async || f.salesforce.counters().collections > before,
    )
    .await;
    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("shutdown deadline reached"),
        "the push was not in flight:\n{log}"
    );
    assert!(log.contains("stopped"), "{log}");
    // The slow push never completed: the leads still hold the old value.
    assert!(
        leads.iter().any(|l| !sf_opted_out(&f, l)),
        "nothing was left to lose"
    );

    // Restart with a healthy Salesforce: every lead ends suppressed.
    f.salesforce
        .set_faults(optout_salesforce::fake::Faults::default());
    let mut d2 = start(dir.path(), &f, "10s").await;
    eventually(
        "every lead suppressed after restart",
        Duration::from_secs(30),
        async || leads.iter().all(|l| sf_opted_out(&f, l)),
    )
    .await;
    let status = d2.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_then_stopping_and_refuses_a_second_instance() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let c = config(dir.path(), &f, "5s");
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    // A second daemon on the same store and socket fails clearly instead of stealing them.
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["run", "--config"])
        .arg(&d.config)
        .envs(c.env())
        .env("OPTOUT_GATE_TOKEN", "second-instance-gate-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");

    let pid = d.child.id().unwrap() as i32;
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: signalling our own child.
    unsafe { kill(pid, 15) };
    let mut got = Vec::new();
    while !got.iter().any(|m: &String| m.contains("STOPPING=1")) {
        got.push(d.next_notification(Duration::from_secs(20)).await);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), d.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // Not running any more: status says so with exit code 3.
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_terminal_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let mut d = start(dir.path(), &f, "5s").await;
    let status = d.terminate().await;
    assert!(status.success());
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("optout-sync is ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log that is not a terminal:\n{log}"
    );
}
