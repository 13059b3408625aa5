//! `audit export` and `import` while the daemon runs (through its control socket) and
//! serves signed WhatsApp webhooks at the same time: nothing lost, no errors; and the same
//! commands once it has stopped.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::GATE_TOKEN;
use common::config::Config;
use optout_core::Timestamp;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::{Value, json};

const APP_SECRET: &str = "meta-app-secret-for-tests";
const STOPS: usize = 300;
const ROWS: usize = 3000;
/// A CRM phone value a spreadsheet would run as a formula.
const FORMULA: &str = "=2+3*cmd";

fn wa(i: usize) -> String {
    format!("1415201{i:04}")
}

fn imported(i: usize) -> String {
    format!("+1 212 555 {i:04}")
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn jsonl(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn csv_rows(out: &Output) -> Vec<Vec<String>> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    csv::Reader::from_reader(out.stdout.as_slice())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn suppression_list(dir: &Path) -> std::path::PathBuf {
    let mut text = String::from("phone,status,time,source\n");
    for i in 0..ROWS {
        text += &format!("{},opted_out,2024-05-01T10:00:00Z,old ESP\n", imported(i));
    }
    text += "not a number,opted_out,2024-05-01T10:00:00Z,old ESP\n";
    text += "+1 212 555 9999,maybe,2024-05-01T10:00:00Z,old ESP\n";
    let path = dir.join("suppression.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// Delivers one signed STOP per person, eight at a time, each once: every one must be
/// acknowledged with 200 at the first attempt.
async fn send_stops(url: String) -> Vec<Vec<Result<u16, String>>> {
    let sender = std::sync::Arc::new(
        WebhookSender::new(url, APP_SECRET).with_retries(1, Duration::from_millis(10)),
    );
    let mut attempts = Vec::new();
    for chunk in (0..STOPS).collect::<Vec<_>>().chunks(8) {
        let mut sends = tokio::task::JoinSet::new();
        for &i in chunk {
            let s = sender.clone();
            let now = Timestamp::now().millis() / 1000;
            let body = envelope::text(&Who::wa(&wa(i)), &format!("wamid.L{i}"), now, "STOP");
            sends.spawn(async move { s.deliver(&body).await.attempts });
        }
        attempts.extend(sends.join_all().await);
    }
    attempts
}

/// What the running daemon's commands print while the webhooks arrive.
struct Live {
    import: Output,
    jsonl: Output,
    csv: Output,
}

/// The import, then exports in both formats, again and again until the webhooks are all
/// sent (so that exports overlap them whatever the timing); the last ones are kept.
fn commands_while_serving(config: &Path, list: &Path, sent: &AtomicBool) -> Live {
    let import = cli(config, &["import", list.to_str().unwrap()]);
    loop {
        let done = sent.load(Ordering::Acquire);
        let jsonl = cli(config, &["audit", "export"]);
        let csv = cli(config, &["audit", "export", "--format", "csv"]);
        if done || !jsonl.status.success() || !csv.status.success() {
            return Live { import, jsonl, csv };
        }
    }
}

async fn gate_blocks(d: &common::Daemon, ids: Vec<String>) -> bool {
    let r = reqwest::Client::new()
        .post(d.url("/v1/consent/batch"))
        .bearer_auth(GATE_TOKEN)
        .json(&json!({"category": "utility", "ids": ids}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    (v["results"].as_array().unwrap().iter()).all(|r| r["allowed"] == json!(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_through_the_running_daemon_lose_nothing_while_webhooks_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let suppressed = hs.create_contact(&[("firstname", "Imported"), ("phone", &imported(100))]);
    hs.create_contact(&[("firstname", "Typo"), ("phone", FORMULA)]);
    let c = Config::new(dir.path())
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .hubspot(&hs.base_url());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until("HubSpot read", Duration::from_secs(30), async || {
        d.crms_polled_since(None).await
    })
    .await;
    let list = suppression_list(dir.path());
    let started = Timestamp::now();

    let sent = Arc::new(AtomicBool::new(false));
    let s = sent.clone();
    let url = d.url("/webhooks/whatsapp");
    let stops = tokio::spawn(async move {
        let attempts = send_stops(url).await;
        s.store(true, Ordering::Release);
        attempts
    });
    let (config, l, s) = (d.config.clone(), list.clone(), sent.clone());
    let live = tokio::task::spawn_blocking(move || commands_while_serving(&config, &l, &s))
        .await
        .unwrap();
    let attempts = stops.await.unwrap();
    assert!(
        attempts.iter().all(|a| a == &[Ok(200)]),
        "every webhook acknowledged at once: {:?}",
        attempts.iter().find(|a| a != &&[Ok(200)])
    );

    check_import(&live.import, 0);
    d.until(
        "the imported opt-out pushed to HubSpot",
        Duration::from_secs(30),
        async || hs.property(&suppressed, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;

    // Exports taken during the traffic are whole and well-formed, oldest first.
    let during = jsonl(&live.jsonl);
    let seqs: Vec<u64> = during.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    let rows = csv_rows(&live.csv);
    assert!(
        rows.len() >= during.len(),
        "the later CSV export has every earlier entry"
    );

    // Every STOP and every row is applied; the final export has them all.
    let wa_ids: Vec<String> = (0..STOPS).map(|i| format!("wa:{}", wa(i))).collect();
    d.until("every STOP applied", Duration::from_secs(60), async || {
        gate_blocks(&d, wa_ids.clone()).await
    })
    .await;
    let all = jsonl(&cli(&d.config, &["audit", "export"]));
    let accepted = |source: &str| {
        (all.iter())
            .filter(|e| e["kind"] == "accepted" && e["source"] == source)
            .count()
    };
    assert_eq!(accepted("whatsapp"), STOPS);
    assert_eq!(accepted("import"), ROWS);

    check_csv(&d.config, &all);
    check_filters(&d.config, &all, started);
    let log = d.log_text();
    assert!(!log.contains(" ERROR "), "{log}");

    // With the daemon stopped, the same commands open the store themselves.
    assert!(d.terminate().await.success());
    let offline = jsonl(&cli(&d.config, &["audit", "export"]));
    assert!(offline.len() >= all.len());
    assert_eq!(offline[..all.len()], all[..]);
    check_import(&cli(&d.config, &["import", list.to_str().unwrap()]), ROWS);
}

/// An import's report: its rows applied (or `already` imported) and its two bad rows,
/// each by line.
fn check_import(out: &Output, already: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "imported {} row(s); {already} already imported; 2 bad row(s)",
            ROWS - already
        )),
        "{stdout}"
    );
    let line = ROWS + 2;
    assert!(
        stderr.contains(&format!("suppression.csv:{line}: phone")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("suppression.csv:{}: status", line + 1)),
        "{stderr}"
    );
}

/// The CSV export: every entry of the (earlier) JSON one, in order, the formula a CRM held
/// made text, and no cell a spreadsheet would run.
fn check_csv(config: &Path, all: &[Value]) {
    let rows = csv_rows(&cli(config, &["audit", "export", "--format", "csv"]));
    let seqs = |n: usize| (all.iter().take(n)).map(|e| e["seq"].to_string());
    assert!(
        rows.len() >= all.len(),
        "pushes may have added entries since"
    );
    assert!(seqs(all.len()).eq(rows.iter().take(all.len()).map(|r| r[0].clone())));
    assert!(
        rows.iter().flatten().any(|c| c == &format!("'{FORMULA}")),
        "the CRM's formula is in the export, neutralised"
    );
    assert!(
        (rows.iter().flatten()).all(|c| !c.starts_with(['=', '+', '-', '@', '\t', '\r'])),
        "no cell a spreadsheet would run"
    );
}

/// Filters: one person (JSON and CSV alike), a time window, an unknown person.
fn check_filters(config: &Path, all: &[Value], started: Timestamp) {
    let one = jsonl(&cli(
        config,
        &["audit", "export", "--subject", &format!("wa:{}", wa(7))],
    ));
    assert!(!one.is_empty());
    let subject = one[0]["subject"].clone();
    assert!(one.iter().all(|e| e["subject"] == subject), "{one:#?}");
    assert!(
        one.iter().any(|e| e["kind"] == "accepted"
            && e["evidence"].as_str().is_some_and(|t| t.contains("STOP")))
    );
    let csv_one = csv_rows(&cli(
        config,
        &[
            "audit",
            "export",
            "--format",
            "csv",
            "--subject",
            &format!("wa:{}", wa(7)),
        ],
    ));
    assert_eq!(csv_one.len(), one.len());
    let until = Timestamp::now();
    let (from, to) = (started.to_rfc3339(), until.to_rfc3339());
    let window = jsonl(&cli(
        config,
        &["audit", "export", "--since", &from, "--until", &to],
    ));
    let inside =
        |e: &Value| (started.millis()..until.millis()).contains(&e["stored_at"].as_i64().unwrap());
    assert!(window.iter().all(inside), "only the window");
    // Every entry of the earlier full export that lies in the window (later ones may too).
    let seqs: std::collections::BTreeSet<u64> =
        window.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!((all.iter().filter(|e| inside(e))).all(|e| seqs.contains(&e["seq"].as_u64().unwrap())));
    assert!(window.len() >= STOPS + ROWS);
    let unknown = cli(config, &["audit", "export", "--subject", "+1 917 555 0199"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no one is known"));
}
