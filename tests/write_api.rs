//! The consent write API (`POST /v1/consent/events`) end to end: the real binary against
//! the HubSpot and Salesforce fakes and an automation-webhook receiver, on 127.0.0.1.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::config::Config;
use common::{GATE_TOKEN, eventually};
use serde_json::{Value, json};

const WRITE_TOKEN: &str = "write-token-for-tests-0123";
const PHONE: &str = "+1 415 555 2671";

use common::{Fakes, fakes};

fn config(dir: &Path, f: &Fakes) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .set("daemon", r#"write_token = { env = "OPTOUT_WRITE_TOKEN" }"#)
        .env_var("OPTOUT_WRITE_TOKEN", WRITE_TOKEN)
        .hubspot(&f.hubspot.base_url())
        .salesforce(&f.salesforce.base_url())
        .automations(&f.hook.url())
}

async fn post(
    d: &common::Daemon,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(d.url("/v1/consent/events"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// The audit log as the running daemon exports it (JSON lines).
fn audit(d: &common::Daemon, args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["audit", "export", "--config"])
        .arg(&d.config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8(out.stdout).unwrap().lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn opt_out(key: &str) -> Value {
    json!({
        "id": PHONE,
        "status": "opted_out",
        "event_time": optout_core::Timestamp::now().to_rfc3339(),
        "source": "call-centre",
        "evidence": "agent 17: caller asked to stop all WhatsApp messages",
        "idempotency_key": key,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_opt_out_reaches_both_crms_and_the_automation_webhook_and_a_retry_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let hs = f
        .hubspot
        .create_contact(&[("firstname", "Ada"), ("phone", PHONE)]);
    let sf = f.salesforce.insert(
        "Contact",
        json!({"LastName": "Lovelace", "Phone": "(415) 555-2671", "WhatsApp_Opt_Out__c": false}),
    );
    let c = config(dir.path(), &f);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until("both CRMs read", Duration::from_secs(30), async || {
        d.crms_polled_since(None).await
    })
    .await;

    let event = opt_out("ticket-4711");
    let (code, first) = post(&d, Some(WRITE_TOKEN), event.to_string()).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["result"], "accepted", "{first}");
    assert!(
        first["receipt"].is_string() && first["recorded_at"].is_string(),
        "{first}"
    );

    d.until(
        "HubSpot, Salesforce and the automation webhook suppressed",
        Duration::from_secs(30),
        async || {
            f.hubspot.property(&hs, "whatsapp_consent").as_deref() == Some("opted_out")
                && f.salesforce
                    .get(&sf)
                    .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
                && f.hook.events().iter().any(|e| e.status == "opted_out")
        },
    )
    .await;
    let hook_event = f
        .hook
        .events()
        .into_iter()
        .find(|e| e.status == "opted_out")
        .unwrap();
    assert!(hook_event.source.starts_with("api"), "{hook_event:?}");

    // The audit log names the API, the caller's source and the evidence.
    let history = audit(&d, &["--subject", PHONE]);
    let accepted = (history.iter())
        .find(|e| e["kind"] == "accepted")
        .unwrap_or_else(|| panic!("{history:#?}"));
    assert_eq!(accepted["source"], "api");
    let evidence = accepted["evidence"].as_str().unwrap();
    assert!(
        evidence.contains("call-centre") && evidence.contains("agent 17"),
        "{evidence}"
    );

    // A retry with the same key is answered with the first receipt and changes nothing.
    let entries = audit(&d, &[]).len();
    let hook_events = f.hook.events().len();
    let (code, again) = post(&d, Some(WRITE_TOKEN), event.to_string()).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["result"], "duplicate", "{again}");
    assert_eq!(
        (&again["receipt"], &again["recorded_at"]),
        (&first["receipt"], &first["recorded_at"])
    );
    assert_eq!(d.status().await.webhook_inbox, 0, "a retry records nothing");
    assert_eq!(audit(&d, &[]).len(), entries, "a retry adds no audit entry");
    assert_eq!(f.hook.events().len(), hook_events);

    // The same key for another event is a conflict, and changes nothing either.
    let mut other = event.clone();
    other["evidence"] = json!("something else");
    let (code, v) = post(&d, Some(WRITE_TOKEN), other.to_string()).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["result"], "rejected");
    assert_eq!(audit(&d, &[]).len(), entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_token_cannot_write_and_bad_requests_get_clear_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let c = config(dir.path(), &f);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let body = opt_out("k1").to_string();

    let (code, v) = post(&d, Some(GATE_TOKEN), body.clone()).await;
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("write_token"), "{v}");
    assert_eq!(post(&d, None, body.clone()).await.0, 401);
    assert_eq!(
        post(&d, Some("not-the-token-at-all"), body.clone()).await.0,
        401
    );
    // The write token does not open the send gate either.
    let r = reqwest::Client::new()
        .get(d.url("/v1/consent/+14155552671"))
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    for (body, code, says) in [
        ("", 400, "empty body"),
        ("{not json", 400, "not JSON"),
        ("42", 400, "one event"),
        ("[]", 400, "no events"),
        (r#"{"events": {}}"#, 400, "must be an array"),
    ] {
        let (got, v) = post(&d, Some(WRITE_TOKEN), body).await;
        assert_eq!(got, code, "{body:?}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body:?}: {v}");
    }
    let many: Vec<Value> = (0..1001).map(|i| opt_out(&format!("k{i}"))).collect();
    let (code, v) = post(&d, Some(WRITE_TOKEN), json!({ "events": many }).to_string()).await;
    assert_eq!(code, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at most 1000"), "{v}");

    // A single bad event is a 422 that says which field; an opt-in is refused unless
    // policy.accept_opt_ins_from names `api`.
    for (field, value, says) in [
        ("id", json!("not a phone"), "id:"),
        ("status", json!("maybe"), "status"),
        ("scope", json!("sms"), "scope"),
        ("event_time", json!("yesterday"), "event_time"),
        ("event_time", json!("2999-01-01T00:00:00Z"), "future"),
        ("source", json!(""), "source"),
        ("status", json!("opted_in"), "accept_opt_ins_from"),
    ] {
        let mut e = opt_out("k-bad");
        e[field] = value;
        let (code, v) = post(&d, Some(WRITE_TOKEN), e.to_string()).await;
        assert_eq!(code, 422, "{field}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{field}: {v}");
    }
    let (code, v) = post(&d, Some(WRITE_TOKEN), r#"{"id": "+14155552671"}"#).await;
    assert_eq!(code, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("missing field"),
        "{v}"
    );

    // A batch is answered item by item, in order.
    let mut bad = opt_out("b2");
    bad["id"] = json!("wa:");
    let mut reused = opt_out("b1");
    reused["evidence"] = json!("another call");
    let batch = json!([opt_out("b1"), bad, reused, opt_out("b3")]);
    let (code, v) = post(&d, Some(WRITE_TOKEN), batch.to_string()).await;
    assert_eq!(code, 200, "{v}");
    let results: Vec<&str> = (v["results"].as_array().unwrap().iter())
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results,
        ["accepted", "rejected", "rejected", "accepted"],
        "{v}"
    );
    assert_eq!(v["results"][1]["idempotency_key"], "b2");
    // b1 again for another event: refused, the first one stands.
    assert!(
        v["results"][2]["error"]
            .as_str()
            .unwrap()
            .contains("different event"),
        "{v}"
    );
}

#[test]
fn the_write_token_must_differ_from_the_gate_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::new(dir.path())
        .set("daemon", r#"write_token = { env = "OPTOUT_WRITE_TOKEN" }"#)
        .set("policy", r#"accept_opt_ins_from = ["api"]"#);
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, c.toml()).unwrap();
    let check = |write: &str| {
        Command::new(env!("CARGO_BIN_EXE_optout-sync"))
            .arg("check-config")
            .arg(&path)
            .env("OPTOUT_GATE_TOKEN", GATE_TOKEN)
            .env("OPTOUT_WRITE_TOKEN", write)
            .output()
            .unwrap()
    };
    let out = check(GATE_TOKEN);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("daemon.write_token: has the same value as daemon.gate_token"),
        "{text}"
    );
    assert!(!text.contains(GATE_TOKEN), "{text}");
    let out = check("short");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("daemon.write_token: too short"));
    let out = check(WRITE_TOKEN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An opt-in through the API counts when the policy lists `api`, and a later opt-in
/// outranks an earlier opt-out sent in the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_opt_ins_count_when_the_policy_lists_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let c = config(dir.path(), &f).set("policy", r#"accept_opt_ins_from = ["api", "hubspot"]"#);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let mut out = opt_out("o1");
    out["event_time"] = json!("2025-01-01T10:00:00Z");
    let mut back = opt_out("o2");
    back["status"] = json!("opted_in");
    back["event_time"] = json!("2025-01-02T10:00:00Z");
    back["source"] = json!("preference-centre");
    let (code, v) = post(
        &d,
        Some(WRITE_TOKEN),
        json!({"events": [out, back]}).to_string(),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    eventually("the opt-in decided", Duration::from_secs(20), async || {
        let r = reqwest::Client::new()
            .get(d.url("/v1/consent/+14155552671?category=marketing"))
            .bearer_auth(GATE_TOKEN)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["decisions"]["all"] == "opted_in" && v["allowed"] == json!(true)
    })
    .await;
}

/// The answer comes only once the event is on disk: a daemon killed right after it applies
/// the event when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_event_survives_sigkill_right_after_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let c = config(dir.path(), &f);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let event = opt_out("k-kill").to_string();
    let (code, v) = post(&d, Some(WRITE_TOKEN), event.clone()).await;
    assert_eq!(code, 200, "{v}");
    d.child.start_kill().unwrap();
    d.child.wait().await.unwrap();
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    eventually(
        "the event applied after the restart",
        Duration::from_secs(20),
        async || {
            let r = reqwest::Client::new()
                .get(d.url("/v1/consent/+14155552671?category=utility"))
                .bearer_auth(GATE_TOKEN)
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            v["allowed"] == json!(false)
        },
    )
    .await;
    // The key is remembered across the restart.
    let (code, again) = post(&d, Some(WRITE_TOKEN), event).await;
    assert_eq!(
        (code, &again["result"]),
        (200, &json!("duplicate")),
        "{again}"
    );
    assert_eq!(again["receipt"], v["receipt"]);
}

/// `POST /v1/consent/erasures`: the gate's token cannot erase, a bad id is a 422, and an
/// erasure through the API leaves the person suppressed at the gate and erased in `lookup`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_through_the_api_keeps_the_suppression() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes().await;
    let c = config(dir.path(), &f);
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let (code, answer) = post(&d, Some(WRITE_TOKEN), opt_out("ticket-1").to_string()).await;
    assert_eq!(code, 200, "{answer}");
    let gate = async || {
        let r = reqwest::Client::new()
            .get(d.url("/v1/consent/+14155552671?category=utility"))
            .bearer_auth(GATE_TOKEN)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    };
    eventually(
        "the API opt-out applied",
        Duration::from_secs(30),
        async || gate().await["allowed"] == json!(false),
    )
    .await;

    let erase = async |token: &str, body: Value| {
        let r = reqwest::Client::new()
            .post(d.url("/v1/consent/erasures"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (code, _) = erase(GATE_TOKEN, json!({"id": PHONE})).await;
    assert_eq!(code, 403);
    let (code, answer) = erase(WRITE_TOKEN, json!({"id": "not a number"})).await;
    assert_eq!(code, 422, "{answer}");
    let (code, answer) = erase(
        WRITE_TOKEN,
        json!({"id": PHONE, "source": "privacy-portal"}),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["suppressed"], json!(true), "{answer}");
    assert_eq!(answer["already_erased"], json!(false), "{answer}");

    let g = gate().await;
    assert_eq!(g["allowed"], json!(false), "{g}");
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["lookup", "--json", "--config"])
        .arg(&d.config)
        .arg(PHONE)
        .output()
        .unwrap();
    let l: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l["erased"]["suppressed"], json!(true), "{l}");
    let erased = audit(&d, &[]);
    let entry = (erased.iter())
        .find(|e| e["kind"] == "erased")
        .expect("the erasure audited");
    assert_eq!(entry["source"], "api:privacy-portal", "{entry}");
    assert!(
        !serde_json::to_string(&erased)
            .unwrap()
            .contains("4155552671")
    );
}
