//! The real daemon against hostile WhatsApp content, on 127.0.0.1:
//! - one damaged message (invalid UTF-8, nesting too deep, a wrong shape) is quarantined
//!   alone; the other customers' STOPs in the same signed body are applied;
//! - acts dated 0, -1, year 0001 or before the configured floor are refused as evidence:
//!   audited with the reason, never decided on; `check-config` refuses a bad floor;
//! - at trace level, no phone number and no message text reaches the log, and the
//!   quarantine's reasons quote nothing from the body.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{GraphOptions, WebhookSender, start_graph};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);
const APP_SECRET: &str = "meta-app-secret-for-hardening";

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

fn config(dir: &Path, graph: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .graph(graph)
}

fn sender(d: &Daemon) -> WebhookSender {
    WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET)
}

async fn gate(d: &Daemon, number: &str) -> GateReply {
    let r = reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/+{number}?category=utility")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn metric(d: &Daemon, series: &str) -> f64 {
    let text = reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn message(from: &str, id: &str, timestamp: &str, text: &str) -> String {
    format!(
        r#"{{"from":"{from}","id":"{id}","timestamp":{timestamp},"type":"text","text":{{"body":"{text}"}}}}"#
    )
}

/// One signed body: entries of one `messages` change each.
fn body(entries: &[Vec<String>]) -> Vec<u8> {
    let entries: Vec<String> = entries
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                r#"{{"id":"{i}","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","messages":[{}]}}}}]}}"#,
                m.join(",")
            )
        })
        .collect();
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{}]}}"#,
        entries.join(",")
    )
    .into_bytes()
}

/// `lookup --json` through the CLI (the daemon answers it on the control socket).
fn lookup(d: &Daemon, number: &str) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["lookup", "--json", &format!("+{number}"), "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_message_is_quarantined_alone_and_the_other_stops_apply() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let c = config(dir.path(), &graph.base_url());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let t = format!("\"{}\"", now_s());
    let mut raw = body(&[
        vec![
            message("14155550101", "wamid.A", &t, "STOP"),
            // Its text gets a byte that is not UTF-8 (patched below).
            message("14155550102", "wamid.B", &t, "STOP @"),
            // 300 levels deep where the sender belongs.
            format!(
                r#"{{"from":{}"14155550103"{},"id":"wamid.C","type":"text","text":{{"body":"STOP"}}}}"#,
                "[".repeat(300),
                "]".repeat(300)
            ),
        ],
        vec![message("14155550104", "wamid.D", &t, "STOP")],
    ]);
    let at = raw.iter().position(|&b| b == b'@').unwrap();
    raw[at] = 0xff;
    assert!(sender(&d).deliver(&raw).await.delivered);
    d.until("the body is read", WITHIN, async || {
        d.status().await.webhook_inbox == 0 && d.status().await.quarantined_webhooks == 1
    })
    .await;
    for applied in ["14155550101", "14155550104"] {
        let v = gate(&d, applied).await;
        assert_eq!(v.allowed, Some(false), "{applied}'s STOP was lost: {v:?}");
    }
    for damaged in ["14155550102", "14155550103"] {
        let v = gate(&d, damaged).await;
        assert_eq!(v.allowed, Some(true), "{damaged}: {v:?}");
    }
    let q = metric(
        &d,
        r#"optout_webhooks_total{source="whatsapp",result="quarantined"}"#,
    )
    .await;
    assert_eq!(
        q, 1.0,
        "one quarantine record for the body's two damaged messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acts_dated_before_the_floor_are_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let c =
        config(dir.path(), &graph.base_url()).set("policy", r#"event_time_floor = "2015-06-01""#);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let cases = [
        ("14155550201", "0"),
        ("14155550202", "-1"),
        ("14155550203", "\"-62135596800\""), // 0001-01-01T00:00:00Z
        ("14155550204", "1400000000"),       // 2014: before the configured floor
    ];
    let mut msgs: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (n, ts))| message(n, &format!("wamid.old{i}"), ts, "STOP"))
        .collect();
    let fine = "14155550205";
    msgs.push(message(fine, "wamid.fine", &now_s().to_string(), "STOP"));
    assert!(sender(&d).deliver(&body(&[msgs])).await.delivered);
    d.until("the body is read", WITHIN, async || {
        d.status().await.webhook_inbox == 0
    })
    .await;
    assert_eq!(gate(&d, fine).await.allowed, Some(false));
    for (number, ts) in cases {
        let v = gate(&d, number).await;
        assert_eq!(
            v.allowed,
            Some(true),
            "a STOP dated {ts} was taken as evidence: {v:?}"
        );
        let l = lookup(&d, number);
        let history = l["history"].as_array().unwrap();
        let refused = history
            .iter()
            .find(|e| e["kind"] == "ignored")
            .unwrap_or_else(|| panic!("no audit entry for {ts}: {l:#}"));
        let reason = refused["reason"].as_str().unwrap();
        assert!(reason.contains("before the floor 2015-06-01"), "{reason}");
        assert_ne!(
            l["decisions"]["all"]["decision"],
            json!("opted_out"),
            "{l:#}"
        );
    }
    let refused = metric(
        &d,
        r#"optout_observations_total{source="whatsapp",result="refused"}"#,
    )
    .await;
    assert_eq!(refused, 4.0);
    assert_eq!(d.status().await.quarantined_webhooks, 0);

    // check-config refuses a floor that is no date, or one in the future.
    for (floor, why) in [
        ("\"last tuesday\"", "not a date"),
        ("\"2999-01-01\"", "lies in the future"),
    ] {
        let text = c
            .clone()
            .set("policy", &format!("event_time_floor = {floor}"))
            .toml()
            .replace("event_time_floor = \"2015-06-01\"\n", "");
        let path = dir.path().join("floor.toml");
        std::fs::write(&path, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
            .arg("check-config")
            .arg(&path)
            .envs(c.env())
            .env("OPTOUT_GATE_TOKEN", GATE_TOKEN)
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(2), "{out}");
        assert!(
            out.contains("policy.event_time_floor") && out.contains(why),
            "{out}"
        );
    }
}

/// Numbers and texts that must appear in no log line, at any level.
const PRIVATE_NUMBERS: [&str; 6] = [
    "4155550301",
    "4155550302",
    "4155550303",
    "4155550304",
    "4155550305",
    "4155550306",
];
const PRIVATE_TEXTS: [&str; 3] = ["Zebracorn", "Quokkafish", "Marmotwhale"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_number_or_message_text_reaches_the_log_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let graph = start_graph(GraphOptions::default()).await;
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let sf = optout_salesforce::fake::start(Default::default()).await;
    // CRM records holding the same people, and two more opted out in the CRM.
    let contact = hs.create_contact(&[("phone", "+1 415 555 0301")]);
    hs.create_contact(&[
        ("phone", "(415) 555-0305"),
        ("whatsapp_consent", "opted_out"),
    ]);
    sf.insert(
        "Contact",
        json!({"LastName": "Marmotwhale", "Phone": "+1 415 555 0304"}),
    );
    sf.insert(
        "Contact",
        json!({"LastName": "Quokkafish", "Phone": "415.555.0306", "WhatsApp_Opt_Out__c": true}),
    );
    let c = config(dir.path(), &graph.base_url())
        .set("whatsapp", "confirmations.enabled = true")
        .hubspot(&hs.base_url())
        .salesforce(&sf.base_url());
    let mut env = c.env();
    env.push(("OPTOUT_SYNC_LOG", "trace".to_string()));
    let mut d = common::start(dir.path(), &c.toml(), &env).await;
    let t = format!("\"{}\"", now_s());
    let [a, b, c_, e, _, _] = PRIVATE_NUMBERS.map(|n| format!("1{n}"));
    // A STOP (confirmed through Graph), an ordinary message, a message that is no
    // keyword, a damaged message with private text, a failed send (131050), a
    // preference stop, a message without a sender.
    let mut raw = body(&[
        vec![
            message(&a, "wamid.P1", &t, "STOP"),
            message(&b, "wamid.P2", &t, "Zebracorn says hello"),
            message(&c_, "wamid.P3", &t, "Quokkafish @"),
            r#"{"id":"wamid.P4","timestamp":"1","type":"text","text":{"body":"Marmotwhale"}}"#
                .into(),
            // serde's own message would quote this value.
            format!(
                r#"{{"from":"{b}","id":"wamid.P6","type":"text","text":"Zebracorn as a bare string"}}"#
            ),
        ],
        vec![message(&e, "wamid.P5", &t, "STOP")],
    ]);
    let at = raw.iter().position(|&b| b == b'@').unwrap();
    raw[at] = 0xfe;
    let s = sender(&d);
    assert!(s.deliver(&raw).await.delivered);
    assert!(
        s.deliver(&envelope::failed_status(
            &Who::wa(&b),
            "wamid.S1",
            now_s(),
            131050
        ))
        .await
        .delivered
    );
    assert!(
        s.deliver(&envelope::user_preference(&Who::wa(&c_), "stop", now_s()))
            .await
            .delivered
    );
    // Signed but unusable as a whole: the reason must not quote it either.
    assert!(
        s.deliver(format!(r#"{{"object":"Zebracorn {a}","entry":[]}}"#).as_bytes())
            .await
            .delivered
    );
    d.until("everything is read and confirmed", WITHIN, async || {
        let st = d.status().await;
        st.webhook_inbox == 0 && st.quarantined_webhooks == 2 && graph.sent().len() == 2
    })
    .await;
    d.until("the CRMs hear of it", WITHIN, async || {
        hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out")
    })
    .await;
    for n in [&a, &b, &c_, &e, "14155550305", "14155550306"] {
        gate(&d, n).await;
        lookup(&d, n);
    }
    let exit = d.terminate().await;
    let log = d.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    assert!(
        exit.success(),
        "exit {exit:?}; the log's end:\n{}",
        tail.join("\n")
    );
    assert!(log.contains("TRACE"), "the log is not at trace level");
    assert!(log.contains("quarantined"), "no quarantine in the log");
    let mut leaks = Vec::new();
    for needle in PRIVATE_NUMBERS.iter().chain(&PRIVATE_TEXTS) {
        for line in log.lines().filter(|l| l.contains(needle)) {
            leaks.push(format!("{needle}: {line}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "personal data in the log:\n{}",
        leaks.join("\n")
    );
}
