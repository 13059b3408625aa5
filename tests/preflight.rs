//! `check-config --connect` (the pre-flight) as the real binary against the fakes, correct
//! and seeded with each misconfiguration; and the daemon against a HubSpot portal without
//! the consent property: a precise alarm, and a bounded number of requests (no split
//! storm).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::config::Config;
use optout_hubspot::fake::{self as hubspot, NewContact};
use optout_salesforce::fake as salesforce;
use optout_whatsapp::fake::{GraphOptions, start_graph};

/// The fakes of every vendor, correct unless a test seeds a misconfiguration.
struct Fakes {
    hubspot: hubspot::FakeHandle,
    salesforce: salesforce::FakeHandle,
    graph: optout_whatsapp::fake::FakeGraph,
    hook: optout_webhook::fake::FakeHandle,
}

async fn fakes(graph: GraphOptions) -> Fakes {
    Fakes {
        hubspot: hubspot::start(hubspot::FakeOptions::default()).await,
        salesforce: salesforce::start(salesforce::FakeOptions::default()).await,
        graph: start_graph(graph).await,
        hook: optout_webhook::fake::start(Default::default()).await,
    }
}

/// Every connector against its fake; WhatsApp with confirmations on (so its Graph token
/// is used) and the account id whose webhook subscription is checked.
fn config(dir: &Path, f: &Fakes) -> Config {
    Config::new(dir)
        .whatsapp("app-secret-for-preflight")
        .graph(&f.graph.base_url())
        .set("whatsapp", "confirmations.enabled = true")
        .set("whatsapp", r#"waba_id = "102290129340398""#)
        .hubspot(&f.hubspot.base_url())
        .salesforce(&f.salesforce.base_url())
        .automations(&f.hook.url())
}

async fn check_connect(dir: &Path, c: &Config) -> Output {
    let path = dir.join("optout-sync.toml");
    std::fs::write(&path, c.toml()).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    cmd.arg("check-config")
        .arg("--connect")
        .arg(&path)
        .env("OPTOUT_GATE_TOKEN", common::GATE_TOKEN);
    for (k, v) in c.env() {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("check-config --connect finishes")
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn correct_fakes_pass_every_live_check() {
    let dir = tempfile::tempdir().unwrap();
    let f = fakes(GraphOptions::default()).await;
    let o = check_connect(dir.path(), &config(dir.path(), &f)).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    for group in [
        "[whatsapp] (whatsapp)",
        "[hubspot] (hubspot)",
        "[salesforce] (salesforce)",
        "[automations] (webhook)",
    ] {
        assert!(t.contains(group), "{t}");
    }
    assert!(t.contains("every live check passed"), "{t}");
    assert!(!t.contains("FAIL"), "{t}");
    assert!(
        t.contains("ok: HubSpot accepts the credentials")
            && t.contains("ok: contact property whatsapp_consent (enumeration")
            && t.contains("ok: Lead: every configured field exists")
            && t.contains("app(s) subscribed to the webhooks")
            && t.contains("accepts connections (http: no TLS; nothing sent)"),
        "{t}"
    );
    assert_eq!(
        f.hook.deliveries().len(),
        0,
        "no event sent to the automation"
    );
}

#[tokio::test]
async fn each_seeded_misconfiguration_is_named_with_its_fix_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    // An expired access token: Meta answers 190 to the one configured.
    let f = fakes(GraphOptions {
        token: "a-newer-token".into(),
        ..GraphOptions::default()
    })
    .await;
    f.hubspot.remove_property("whatsapp_consent_source");
    f.hubspot
        .set_property_options("whatsapp_consent", &["optedout", "opted_in"]);
    f.hubspot.set_scopes(&["crm.objects.contacts.read"]);
    f.salesforce.remove_field("Lead", "WhatsApp_Opt_Out__c");
    let o = check_connect(dir.path(), &config(dir.path(), &f)).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    for line in [
        // Missing property.
        "FAIL: contact property whatsapp_consent_source does not exist",
        // Wrong option.
        "FAIL: property whatsapp_consent has no option `opted_out` (opted_out_value); its options: optedout, opted_in",
        // Missing scope.
        "FAIL: the token lacks the crm.objects.contacts.write scope",
        // Missing field.
        "FAIL: field WhatsApp_Opt_Out__c does not exist on Lead",
        // Expired token.
        "FAIL: Meta refused the access token: graph error 190",
    ] {
        assert!(t.contains(line), "missing {line:?} in:\n{t}");
    }
    assert_eq!(t.matches("FAIL:").count(), 5, "{t}");
    assert_eq!(t.matches("    fix: ").count(), 5, "each with its fix: {t}");
    assert!(t.contains("5 problems found"), "{t}");
    for secret in [
        hubspot::TOKEN,
        "fake-access-token",
        "fake-client-secret",
        "app-secret-for-preflight",
    ] {
        assert!(!t.contains(secret), "a secret was printed: {t}");
    }
}

#[tokio::test]
async fn the_daemon_raises_a_precise_alarm_and_sends_no_split_storm() {
    let dir = tempfile::tempdir().unwrap();
    let hs = hubspot::start(hubspot::FakeOptions {
        limits: hubspot::Limits::off(),
        ..hubspot::FakeOptions::default()
    })
    .await;
    hs.remove_property("whatsapp_consent");
    let numbers: Vec<String> = (0..150).map(|i| format!("+1415555{i:04}")).collect();
    hs.create_contacts(numbers.iter().map(|n| NewContact::new().with("phone", n)));
    let c = Config::new(dir.path()).hubspot(&hs.base_url());
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, c.toml()).unwrap();
    // 150 opt-outs already known: once the contacts are read, 150 pushes are due.
    let csv = dir.path().join("list.csv");
    let rows: String = (numbers.iter())
        .map(|n| format!("{n},opted_out,2024-05-01T10:00:00Z\n"))
        .collect();
    std::fs::write(&csv, format!("phone,status,time\n{rows}")).unwrap();
    let imported = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["import", "--config"])
        .arg(&path)
        .arg(&csv)
        .output()
        .unwrap();
    assert!(imported.status.success(), "{}", text(&imported));

    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let started = tokio::time::Instant::now();
    common::eventually(
        "a push refused for the missing property",
        Duration::from_secs(30),
        async || {
            let s = d.status().await;
            let hubspot = s.connector("hubspot").unwrap();
            hubspot.push_errors > 0
                && hubspot.last_error.as_deref().is_some_and(|e| {
                    e.contains("HubSpot refused the whole batch update, not split")
                        && e.contains("contact property whatsapp_consent does not exist")
                })
        },
    )
    .await;
    // A few more seconds of retries with back-off: still no split.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let elapsed = started.elapsed();
    let requests = hs.counts().batch_update;
    println!("{requests} batch requests in {elapsed:?} for 150 refused pushes");
    // One probe by the pre-flight, then whole batches (two of at most 100) retried with
    // back-off from 200 ms: a split would have sent up to 199 per 100 contacts at once.
    assert!((2..=30).contains(&requests), "{requests} batch requests");

    let s = d.status().await;
    let alarm = s
        .connector("hubspot")
        .unwrap()
        .alarm
        .clone()
        .unwrap_or_default();
    assert!(alarm.contains("whatsapp_consent"), "{alarm}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("whatsapp_consent"), "{t}");
    // The start-up pre-flight logs it too, once its re-runs have confirmed it.
    common::eventually(
        "the start-up pre-flight's confirmed failure in the log",
        Duration::from_secs(30),
        async || d.log_text().contains("pre-flight check failed"),
    )
    .await;
    assert_eq!(
        hs.property(&hs.contact_ids()[0], "whatsapp_consent_source"),
        None
    );
}

/// A vendor's passing error during the start-up pre-flight (every Salesforce data call
/// answering malformed JSON for a while) is checked again before it is an alarm: once
/// the org answers, the pre-flight passes and no alarm is ever raised or logged.
#[tokio::test]
async fn a_passing_vendor_error_at_start_raises_no_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let sf = salesforce::start(salesforce::FakeOptions {
        faults: salesforce::Faults {
            server_error_rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let c = Config::new(dir.path()).salesforce(&sf.base_url());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    common::eventually(
        "the pre-flight finding the error and checking again",
        Duration::from_secs(30),
        async || d.log_text().contains("checking again in"),
    )
    .await;
    let s = d.status().await;
    assert_eq!(s.connector("salesforce").unwrap().alarm, None, "{s:?}");
    sf.set_faults(salesforce::Faults::default());
    common::eventually(
        "the pre-flight passing",
        Duration::from_secs(30),
        async || d.log_text().contains("logged in to Salesforce"),
    )
    .await;
    let s = d.status().await;
    assert_eq!(s.connector("salesforce").unwrap().alarm, None, "{s:?}");
    assert!(!d.log_text().contains("pre-flight check failed"));
}
