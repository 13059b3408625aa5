//! Bad input of every kind, against the real daemon (a child process) and the connectors'
//! fakes on 127.0.0.1: each gets a clear refusal, a quarantine or a visible rejection —
//! never a crash, a hang, a stall or a silent loss — and no secret ever shows.
//!
//! - WhatsApp webhooks: unsigned and mis-signed bodies, oversized bodies, malformed JSON and
//!   JSON that is no WhatsApp envelope, unknown payload types and fields, invalid `wa_id`s
//!   and BSUIDs, hostile strings in every field, a 1 MB text message. Afterwards the daemon
//!   is healthy and a normal STOP still reaches HubSpot.
//! - CRM data with hostile names, phones and field values, and Salesforce record ids that
//!   hold `'` and `\` (the SOQL that resumes after an expired query locator is built from an
//!   id): polling neither crashes nor stalls, and the opt-out reaches every record that
//!   holds the number, quoted names included.
//! - Malformed configuration files: `check-config` locates each problem and exits 2; `run`
//!   refuses the same file without a panic.
//! - A damaged store or one of an unknown schema version: `run` refuses clearly and does not
//!   start afresh.
//! - Secrets: distinctive secret values, trace-level logs, auth failures, expired tokens,
//!   wrong tokens; no value appears in the log, `status`, `/metrics` or any CLI output.
//!
//! Run with `cargo test --test bad_input` (about 10 s; 15 s with three copies running at
//! once on two cores). Everything is sized for CI; there is no larger variant. The tests
//! marked `#[ignore = "bug: …"]` show defects still open: `-- --ignored` runs them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_core::Timestamp;
use optout_sync::report::{ConnectorReport, GateReply, StatusReport};
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{GraphOptions, WebhookSender, sign, start_graph};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

/// Hostile strings put in every field the daemon reads: SQL and SOQL quoting, control
/// characters, bidirectional overrides, zero-width and non-characters, emoji sequences,
/// format-string and template syntax.
const HOSTILE: &[&str] = &[
    "Robert'); DROP TABLE contacts;--",
    r#"O'Brien \' \\ ' "quoted" \"#,
    "\u{0}\u{1}\u{7}\u{8}\u{1b}[31mred\r\n\t\u{7f}\u{85}",
    "\u{202E}\u{200F}evil\u{202C}\u{200E}\u{2066}x\u{2069}",
    "\u{FEFF}\u{200B}\u{FFFF}\u{10FFFF}\u{FFFD}",
    "🙂👨‍👩‍👧‍👦🏳️‍🌈🇺🇸",
    "%s%n%x {0} ${jndi:ldap://127.0.0.1/a} {{7*7}} <script>alert(1)</script>",
    "' OR Id != '",
];

fn hostile_joined() -> String {
    HOSTILE.join(" | ")
}

fn now_s() -> i64 {
    Timestamp::now().millis() / 1000
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    c.env_remove("OPTOUT_SYNC_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("OPTOUT_SYNC_LOG");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts the daemon like `common::start`, with this log filter and environment (the gate
/// token variable included), waiting for READY=1 and the listening address.
async fn start_with(dir: &Path, config: &str, env: &[(&str, String)], log: &str) -> Daemon {
    use tokio::net::UnixDatagram;
    let config_path = dir.join("optout-sync.toml");
    std::fs::write(&config_path, config).unwrap();
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log_path = dir.join("daemon-0.log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    // A new store's directory, as systemd's StateDirectory= provides it.
    cmd.arg("run")
        .arg("--create-state-dir")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("OPTOUT_SYNC_LOG", log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut d = Daemon {
        child: cmd.spawn().unwrap(),
        notify,
        addr: String::new(),
        config: config_path,
        socket: dir.join("control.sock"),
        log: log_path,
    };
    let mut ready = false;
    while !ready || d.addr.is_empty() {
        let msg = d.next_notification(Duration::from_secs(60)).await;
        for line in msg.lines() {
            ready |= line == "READY=1";
            if let Some(rest) = line.strip_prefix("STATUS=running; listening on ") {
                d.addr = rest.to_string();
            }
        }
    }
    d
}

async fn gate(d: &Daemon, token: &str, id: &str, category: &str) -> GateReply {
    let r = reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/{id}?category={category}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "gate answered {}", r.status());
    r.json().await.unwrap()
}

async fn metrics(d: &Daemon) -> String {
    reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one metric line (`name{labels} value`), 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn connector<'a>(status: &'a StatusReport, name: &str) -> &'a ConnectorReport {
    status
        .connector(name)
        .unwrap_or_else(|| panic!("no connector {name} in {status:?}"))
}

// ---------------------------------------------------------------------------------------
// WhatsApp webhooks

const WA_SECRET: &str = "meta-app-secret-for-bad-input";
/// The person whose HubSpot contact the final, normal STOP must reach.
const WA_NORMAL: &str = "14155552671";
/// Sends the hostile-but-valid STOP.
const WA_HOSTILE_STOP: &str = "14155552672";
/// Sends hostile text that is no keyword.
const WA_HOSTILE_TEXT: &str = "14155552673";
/// Sends the 1 MB message.
const WA_BIG: &str = "14155552674";
/// Sends unknown payload types and fields.
const WA_UNKNOWN: &str = "14155552675";
/// Whose STOPs only ever arrive unsigned, mis-signed or oversized.
const WA_REFUSED: &str = "14155552676";

fn whatsapp_config(dir: &Path, hubspot: &str, graph: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(WA_SECRET)
        .graph(graph)
        .hubspot(hubspot)
}

/// A `messages` change with exactly these message objects and no `contacts` (so each
/// message names exactly the identities written in it).
fn messages(items: Vec<Value>) -> Vec<u8> {
    envelope::wrap("messages", json!({ "messages": items }))
}

fn text_message(from: Value, id: &str, body: &str) -> Value {
    json!({"from": from, "id": id, "timestamp": now_s().to_string(), "type": "text", "text": {"body": body}})
}

fn deeply_nested() -> Vec<u8> {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{}{}]}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    )
    .into_bytes()
}

struct Intake {
    http: reqwest::Client,
    url: String,
}

impl Intake {
    async fn post(&self, body: &[u8], signature: Option<&[u8]>) -> reqwest::Result<StatusCode> {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header(
                "X-Hub-Signature-256",
                reqwest::header::HeaderValue::from_bytes(s).unwrap(),
            );
        }
        Ok(req.send().await?.status())
    }

    async fn signed(&self, body: &[u8]) -> StatusCode {
        self.post(body, Some(sign(WA_SECRET, body).as_bytes()))
            .await
            .unwrap()
    }
}

/// Waits until every stored webhook has been processed (the inbox is trimmed after each
/// page is applied).
async fn inbox_drained(d: &Daemon) {
    d.until("the webhook inbox is drained", WITHIN, async || {
        d.status().await.webhook_inbox == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_intake_refuses_quarantines_or_survives_every_kind_of_bad_body() {
    let dir = tempfile::tempdir().unwrap();
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let graph = start_graph(GraphOptions::default()).await;
    let contact = hs.create_contact(&[("firstname", HOSTILE[1]), ("phone", "+1 415 555 2671")]);
    let c = whatsapp_config(dir.path(), &hs.base_url(), &graph.base_url());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let intake = Intake {
        // No connection reuse: the server may close a connection after refusing a body early.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        url: d.url("/webhooks/whatsapp"),
    };

    // 1. Unsigned and mis-signed: refused before anything is stored.
    let stop = envelope::text(&Who::wa(WA_REFUSED), "wamid.REFUSED", now_s(), "STOP");
    let good = sign(WA_SECRET, &stop);
    let hex = good.strip_prefix("sha256=").unwrap();
    let other_body = envelope::text(&Who::wa(WA_REFUSED), "wamid.OTHER", now_s(), "STOP");
    let sha1_like = format!("sha1={}", &hex[..40]);
    let cases: Vec<(&str, Option<Vec<u8>>, u16)> = vec![
        ("no signature", None, 401),
        ("empty signature", Some(b"".to_vec()), 401),
        (
            "signed with another secret",
            Some(sign("not-the-app-secret", &stop).into_bytes()),
            403,
        ),
        (
            "the signature of another body",
            Some(sign(WA_SECRET, &other_body).into_bytes()),
            403,
        ),
        (
            "truncated signature",
            Some(good.as_bytes()[..good.len() - 2].to_vec()),
            401,
        ),
        (
            "signature one digit too long",
            Some(format!("{good}0").into_bytes()),
            401,
        ),
        (
            "bare hex without prefix",
            Some(hex.as_bytes().to_vec()),
            401,
        ),
        (
            "not hex",
            Some(format!("sha256={}", "zz".repeat(32)).into_bytes()),
            401,
        ),
        ("sha1= prefix", Some(sha1_like.into_bytes()), 401),
        (
            "sha1= prefix on the right digest",
            Some(format!("sha1={hex}").into_bytes()),
            401,
        ),
        (
            "non-ASCII bytes",
            Some([b"sha256=".as_slice(), &[0xff; 64]].concat()),
            401,
        ),
        (
            "one flipped digit",
            Some(
                format!(
                    "sha256={}{}",
                    if hex.starts_with('0') { '1' } else { '0' },
                    &hex[1..]
                )
                .into_bytes(),
            ),
            403,
        ),
    ];
    for (what, sig, want) in &cases {
        let got = intake.post(&stop, sig.as_deref()).await.unwrap();
        assert_eq!(got.as_u16(), *want, "{what}");
    }

    // 2. Oversized (over the default 1 MiB), correctly signed: 413, or the connection is
    //    closed before the client finished sending.
    let huge = envelope::text(
        &Who::wa(WA_REFUSED),
        "wamid.HUGE",
        now_s(),
        &"STOP ".repeat((1 << 20) / 5 + 10),
    );
    assert!(huge.len() > 1 << 20);
    match intake
        .post(&huge, Some(sign(WA_SECRET, &huge).as_bytes()))
        .await
    {
        Ok(s) => assert_eq!(s, 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }

    // 3. Signed bodies that are not WhatsApp envelopes: quarantined and acknowledged.
    let unusable: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        b"".to_vec(),
        b"null".to_vec(),
        b"42".to_vec(),
        b"\"whatsapp_business_account\"".to_vec(),
        b"[]".to_vec(),
        b"[{\"object\":\"whatsapp_business_account\",\"entry\":[]}]".to_vec(),
        br#"{"object":"page","entry":[]}"#.to_vec(),
        br#"{"entry":[]}"#.to_vec(),
        br#"{"object":"whatsapp_business_account"}"#.to_vec(),
        br#"{"object":"whatsapp_business_account","entry":"nope"}"#.to_vec(),
        br#"{"object":"whatsapp_business_account","entry":{}}"#.to_vec(),
        br#"{"object":"whatsapp_business_account","entry":[]} trailing"#.to_vec(),
        br#"{"object":["whatsapp_business_account"],"entry":[]}"#.to_vec(),
        b"\xff\xfe{\"object\":\"whatsapp_business_account\",\"entry\":[]}".to_vec(),
        b"<?xml version=\"1.0\"?><object>whatsapp_business_account</object>".to_vec(),
        format!(
            r#"{{"object":"whatsapp_business_account","entry":[],"x":"{}"}}"#,
            "\u{0}"
        )
        .into_bytes(),
    ];
    for (i, body) in unusable.iter().enumerate() {
        assert_eq!(
            intake.signed(body).await,
            200,
            "unusable body #{i} is acknowledged so Meta stops retrying"
        );
    }
    let quarantined = unusable.len();
    d.until("every unusable body is quarantined", WITHIN, async || {
        d.status().await.quarantined_webhooks == quarantined
    })
    .await;

    // 4. Valid envelopes with payloads the daemon does not know, and unknown fields at
    //    every level: stored, read, and no consent change.
    let wa_unknown = json!(WA_UNKNOWN);
    let strange: Vec<Vec<u8>> = vec![
        br#"{"object":"whatsapp_business_account","entry":[]}"#.to_vec(),
        envelope::wrap("account_update", json!({"event": "VERIFIED_ACCOUNT", "ban_info": {"x": [1, 2]}})),
        envelope::wrap("message_template_status_update", json!({"event": "APPROVED", "message_template_id": 1})),
        envelope::wrap("messages_v99", json!({"messages": [text_message(wa_unknown.clone(), "wamid.U0", "hello")]})),
        messages(vec![
            json!({"from": WA_UNKNOWN, "id": "wamid.U1", "timestamp": now_s(), "type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "🛑"}}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U2", "timestamp": now_s(), "type": "sticker", "sticker": {"id": "1", "animated": true}}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U3", "timestamp": now_s(), "type": "holographic_v7", "holographic_v7": {"depth": 3}}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U4", "timestamp": now_s(), "type": "text", "text": {"body": "hello", "future": true}, "future_field": {"nested": [null]}}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U5", "timestamp": now_s(), "type": "text"}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U6", "timestamp": now_s(), "type": "text", "text": "STOP as a bare string"}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U7", "timestamp": now_s(), "type": "interactive", "interactive": {"type": "nfm_reply", "nfm_reply": {"response_json": "{}"}}}),
            json!({"from": WA_UNKNOWN, "id": "wamid.U8", "timestamp": now_s(), "type": "button", "button": {"payload": 7, "text": ["x"]}}),
            json!("a message that is a string"),
            json!(null),
            json!([1, 2, 3]),
        ]),
        envelope::wrap(
            "messages",
            json!({"statuses": [
                {"id": "wamid.S1", "status": "read", "timestamp": now_s(), "recipient_id": WA_UNKNOWN, "pricing": {"new": 1}},
                {"id": "wamid.S2", "status": "failed", "timestamp": now_s(), "recipient_id": WA_UNKNOWN, "errors": [{"code": 131026, "title": "undeliverable"}]},
                {"id": "wamid.S3", "status": "failed", "recipient_id": WA_UNKNOWN, "errors": "not an array"},
                {"id": "wamid.S4", "status": "teleported", "recipient_id": WA_UNKNOWN}
            ], "errors": [{"code": 1, "title": "value-level error"}]}),
        ),
        envelope::wrap(
            "user_preferences",
            json!({"user_preferences": [
                {"wa_id": WA_UNKNOWN, "category": "utility_messages", "value": "stop", "timestamp": now_s()},
                {"wa_id": WA_UNKNOWN, "category": "marketing_messages", "value": "pause_for_a_while", "timestamp": now_s()},
                {"wa_id": WA_UNKNOWN, "category": "marketing_messages", "value": ["stop"], "timestamp": now_s()}
            ]}),
        ),
        serde_json::to_vec(&json!({
            "object": "whatsapp_business_account",
            "future_top_level": {"a": 1},
            "entry": [
                {"id": "1", "changes": "not an array"},
                {"id": "2"},
                "an entry that is a string",
                {"id": "3", "time": 1, "changes": [
                    {"field": 42, "value": {}},
                    {"value": {"messages": []}},
                    {"field": "messages", "value": "a string value"},
                    {"field": "messages", "value": {"messages": "not an array", "contacts": {"x": 1}}},
                    {"field": "messages", "future_change_field": true, "value": {
                        "messaging_product": "whatsapp", "future_value_field": [1],
                        "contacts": [{"wa_id": WA_UNKNOWN, "profile": {"name": "x", "future": 1}, "future_contact_field": 2}],
                        "messages": [text_message(wa_unknown.clone(), "wamid.U9", "thanks for the update")]
                    }}
                ]}
            ]
        }))
        .unwrap(),
    ];
    for (i, body) in strange.iter().enumerate() {
        assert_eq!(intake.signed(body).await, 200, "strange envelope #{i}");
    }
    // An entry nested 5,000 levels deep passes the intake's shape check and is stored;
    // the reader refuses it (serde's recursion limit) without a stack overflow, quarantines
    // it and goes on.
    assert_eq!(intake.signed(&deeply_nested()).await, 200);
    inbox_drained(&d).await;
    // The deep body, and one record for each strange body above whose unreadable parts
    // (a `changes` that is not an array, an entry that is a string, a value that is a
    // string, messages that are not an array) are kept for the operator rather than
    // skipped; their readable parts were applied.
    let quarantined = quarantined + 5;
    assert_eq!(d.status().await.quarantined_webhooks, quarantined);

    // 5. Invalid identities, hostile ones included: each STOP is refused as an identity and
    //    audited, nothing else happens.
    let bad_ids: Vec<Value> = vec![
        json!("abc"),
        json!("12345"),
        json!("1234567890123456"),
        json!("'; DROP TABLE subjects;--"),
        json!("1415555\u{7}2671"),
        json!("\u{0}"),
        json!("9".repeat(300)),
        json!(12),
        json!(r#"\' \\ '"#),
    ];
    let n_bad_wa = bad_ids.len();
    let mut items: Vec<Value> = bad_ids
        .into_iter()
        .enumerate()
        .map(|(i, from)| text_message(from, &format!("wamid.BADID{i}"), "STOP"))
        .collect();
    let bad_bsuids = [
        "US.1'; DROP TABLE aliases;--",
        "\u{202E}US.13491208655302741918",
        "US",
        "US.1349\u{0}",
    ];
    for (i, b) in bad_bsuids.iter().enumerate() {
        items.push(json!({"from_user_id": b, "id": format!("wamid.BADB{i}"), "timestamp": now_s(), "type": "text", "text": {"body": "STOP"}}));
    }
    // Named nobody at all, or with an id of the wrong type: kept in the quarantine (one
    // record for this body's unreadable parts), not guessed.
    items.push(text_message(json!(""), "wamid.NOBODY", "STOP"));
    items.push(text_message(
        json!({"wa_id": WA_UNKNOWN}),
        "wamid.OBJ",
        "STOP",
    ));
    let rejected_identities = n_bad_wa + bad_bsuids.len();
    assert_eq!(intake.signed(&messages(items)).await, 200);
    // A user preference and a failed status naming invalid identities.
    assert_eq!(
        intake
            .signed(&envelope::user_preference(
                &Who::wa("not-a-number"),
                "stop",
                now_s()
            ))
            .await,
        200
    );
    assert_eq!(
        intake
            .signed(&envelope::failed_status(
                &Who::bsuid("no dot here"),
                "wamid.F1",
                now_s(),
                131050
            ))
            .await,
        200
    );
    let rejected_identities = rejected_identities + 2;
    inbox_drained(&d).await;
    let m = metrics(&d).await;
    assert_eq!(
        metric(
            &m,
            r#"optout_observations_total{source="whatsapp",result="identity_rejected"}"#
        ),
        rejected_identities as f64,
        "{m}"
    );

    // 6. Hostile strings in every field of an ordinary message: no consent change.
    let mut hostile_items = Vec::new();
    for (i, h) in HOSTILE.iter().enumerate() {
        hostile_items.push(json!({
            "from": WA_HOSTILE_TEXT, "id": format!("wamid.{h}.{i}"), "timestamp": h,
            "type": "text", "text": {"body": format!("{h} {}", hostile_joined())},
            "context": {"from": h, "id": h}
        }));
        hostile_items.push(json!({
            "from": WA_HOSTILE_TEXT, "id": format!("wamid.btn.{i}"), "timestamp": now_s(),
            "type": "button", "button": {"payload": h, "text": h}
        }));
        hostile_items.push(json!({
            "from": WA_HOSTILE_TEXT, "id": format!("wamid.int.{i}"), "timestamp": now_s(),
            "type": "interactive", "interactive": {"type": h, "list_reply": {"id": h, "title": h, "description": h}}
        }));
    }
    let body = envelope::wrap(
        "messages",
        json!({
            "metadata": {"display_phone_number": HOSTILE[0], "phone_number_id": HOSTILE[2]},
            "contacts": [{"wa_id": WA_HOSTILE_TEXT, "profile": {"name": hostile_joined()}}],
            "messages": hostile_items
        }),
    );
    assert_eq!(intake.signed(&body).await, 200);
    // A lone surrogate escape: valid JSON syntax, but no valid string (read with the broken
    // character replaced).
    let surrogate = format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messages":[{{"from":"{WA_HOSTILE_TEXT}","id":"wamid.SURR","timestamp":"{}","type":"text","text":{{"body":"\ud800 \udfff"}}}}]}}}}]}}]}}"#,
        now_s()
    );
    assert_eq!(intake.signed(surrogate.as_bytes()).await, 200);

    // 7. A 1 MB text message. The intake's bound is max_body_bytes (1 MiB by default): a body
    //    within it is accepted, stored and read like any message — a long text is no
    //    keyword, so it changes nothing — without holding up what comes after it.
    let big_text: String = "I have a question about my order, please call me back. "
        .chars()
        .cycle()
        .take(1_000_000)
        .collect();
    let big = envelope::text(&Who::wa(WA_BIG), "wamid.BIG", now_s(), &big_text);
    assert!(big.len() < 1 << 20 && big.len() > 1_000_000);
    assert_eq!(intake.signed(&big).await, 200);

    // 8. A STOP whose every other field is hostile is still a STOP.
    let body = envelope::wrap(
        "messages",
        json!({
            "metadata": {"display_phone_number": HOSTILE[3], "phone_number_id": HOSTILE[1]},
            "contacts": [{"wa_id": WA_HOSTILE_STOP, "profile": {"name": hostile_joined()}}],
            "messages": [{
                "from": WA_HOSTILE_STOP, "id": format!("wamid.{}", hostile_joined()),
                "timestamp": "'; DROP TABLE audit;--", "type": "text", "text": {"body": "STOP"},
                "context": {"id": HOSTILE[0]}, "referral": {"headline": HOSTILE[2]}
            }]
        }),
    );
    assert_eq!(intake.signed(&body).await, 200);
    inbox_drained(&d).await;

    // Nothing but the hostile STOP changed consent.
    assert_eq!(
        gate(&d, GATE_TOKEN, &format!("+{WA_HOSTILE_STOP}"), "utility")
            .await
            .allowed,
        Some(false)
    );
    for (who, what) in [
        (WA_HOSTILE_TEXT, "hostile text"),
        (WA_BIG, "the 1 MB message"),
        (WA_UNKNOWN, "unknown payloads"),
    ] {
        for category in ["utility", "marketing"] {
            let v = gate(&d, GATE_TOKEN, &format!("+{who}"), category).await;
            assert_eq!(v.allowed, Some(true), "{what} changed consent: {v:?}");
        }
    }
    let v = gate(&d, GATE_TOKEN, &format!("+{WA_REFUSED}"), "utility").await;
    assert_eq!(v.known, Some(false), "a refused body was applied: {v:?}");
    let status = d.status().await;
    assert_eq!(status.people("all", "opted_out"), 1, "{status:?}");
    assert_eq!(status.people("marketing", "opted_out"), 0, "{status:?}");
    let quarantined = quarantined + 1; // section 5's messages that name nobody
    assert_eq!(status.quarantined_webhooks, quarantined, "{status:?}");

    // 9. Still healthy, and a normal STOP still goes end to end.
    let http = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http.get(d.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    assert!(status.ready);
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), WA_SECRET);
    let delivery = sender
        .deliver(&envelope::text(
            &Who::wa(WA_NORMAL),
            "wamid.NORMAL",
            now_s(),
            "STOP",
        ))
        .await;
    assert!(delivery.delivered, "{:?}", delivery.attempts);
    d.until("the normal STOP reaches HubSpot", WITHIN, async || {
        hs.property(&contact, "whatsapp_consent").as_deref() == Some("opted_out")
    })
    .await;
    assert_eq!(
        gate(&d, GATE_TOKEN, "+14155552671", "marketing")
            .await
            .allowed,
        Some(false)
    );
    let m = metrics(&d).await;
    assert_eq!(
        metric(
            &m,
            r#"optout_webhooks_total{source="whatsapp",result="quarantined"}"#
        ),
        quarantined as f64,
        "{m}"
    );
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");

    // The audit log records each refused identity, with its evidence free of control
    // characters, and every line of the export is valid JSON despite the hostile input.
    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
    let out = bin()
        .args(["audit", "export", "--format", "jsonl", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let entries: Vec<Value> = String::from_utf8(out.stdout)
        .expect("the export is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let rejected: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "identity_rejected")
        .collect();
    assert_eq!(rejected.len(), rejected_identities, "{rejected:#?}");
    for e in &rejected {
        assert!(!e["reason"].as_str().unwrap_or("").is_empty(), "{e}");
        let evidence = e["evidence"].as_str().unwrap_or("");
        assert!(!evidence.chars().any(char::is_control), "{e}");
        assert!(evidence.chars().count() <= 65, "bounded: {e}");
    }
    assert!(
        rejected
            .iter()
            .any(|e| e["evidence"] == "'; DROP TABLE subjects;--"),
        "{rejected:#?}"
    );
}

/// A stored body that the shape check lets through but the reader cannot use is quarantined
/// (visible in `status`) like any other unusable body, not dropped with a log line; and a
/// broken string in one message (a lone surrogate escape, which serde_json refuses) does
/// not take a valid STOP in the same body with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_envelope_is_quarantined_and_a_stop_beside_a_lone_surrogate_counts() {
    let dir = tempfile::tempdir().unwrap();
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let graph = start_graph(GraphOptions::default()).await;
    let c = whatsapp_config(dir.path(), &hs.base_url(), &graph.base_url());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let intake = Intake {
        http: reqwest::Client::new(),
        url: d.url("/webhooks/whatsapp"),
    };
    // One STOP, and in the same body a message from someone else whose text holds a lone
    // surrogate escape (no valid string; serde_json refuses it).
    let body = format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messages":[{{"from":"{WA_NORMAL}","id":"wamid.S","timestamp":"{t}","type":"text","text":{{"body":"STOP"}}}},{{"from":"{WA_BIG}","id":"wamid.L","timestamp":"{t}","type":"text","text":{{"body":"\ud83d"}}}}]}}}}]}}]}}"#,
        t = now_s()
    );
    assert_eq!(intake.signed(body.as_bytes()).await, 200);
    assert_eq!(intake.signed(&deeply_nested()).await, 200);
    inbox_drained(&d).await;
    let v = gate(&d, GATE_TOKEN, &format!("+{WA_NORMAL}"), "utility").await;
    assert_eq!(
        v.allowed,
        Some(false),
        "the STOP beside the broken string was lost: {v:?}"
    );
    let v = gate(&d, GATE_TOKEN, &format!("+{WA_BIG}"), "utility").await;
    assert_eq!(v.allowed, Some(true), "{v:?}");
    let status = d.status().await;
    assert_eq!(
        status.quarantined_webhooks, 1,
        "the nested body is not quarantined: {status:?}"
    );
    let m = metrics(&d).await;
    assert_eq!(
        metric(
            &m,
            r#"optout_webhooks_total{source="whatsapp",result="quarantined"}"#
        ),
        1.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------
// CRM data

const PHONE: &str = "+1 415 555 2671";
/// Held by the Salesforce row read only after the query locator expired.
const PHONE_LATE: &str = "+1 415 555 2680";
/// Held by a HubSpot contact created as opted out after the first sync.
const PHONE_NEW: &str = "+1 415 555 2681";

fn crm_config(dir: &Path, hs: &str, sf: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .hubspot(hs)
        .salesforce(sf)
        .set("salesforce", "page_size = 200")
        .set("salesforce", "messaging_end_user = true")
}

fn sf_opted_out(sf: &optout_salesforce::fake::FakeHandle, id: &str) -> bool {
    sf.get(id)
        .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_crm_records_neither_crash_nor_stall_polling_and_quoted_names_get_the_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let sf = optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let ten_kb = |s: &str| s.chars().cycle().take(10_000).collect::<String>();
    let quotes = r"O'Brien \' \\ ' \";

    // HubSpot: hostile names, phones and consent values around valid contacts.
    let hs_valid = hs.create_contact(&[("firstname", "Ada"), ("phone", PHONE)]);
    let hs_hostile_same_person = hs.create_contact(&[
        ("firstname", HOSTILE[0]),
        ("lastname", &ten_kb(quotes)),
        ("phone", "'; DROP TABLE contacts;--"),
        ("mobilephone", PHONE),
        ("hs_whatsapp_phone_number", HOSTILE[2]),
        ("whatsapp_consent_source", HOSTILE[3]),
    ]);
    let hs_garbage_consent = hs.create_contact(&[
        ("firstname", &hostile_joined()),
        ("phone", &"9".repeat(10_000)),
        ("mobilephone", "+1 415\u{0} 555 2671"),
        ("whatsapp_consent", "opted_out'; --"),
        ("whatsapp_consent_changed_at", "yesterday\u{0}"),
    ]);
    hs.create_contact(&[
        ("lastname", HOSTILE[4]),
        ("phone", "+1 415 555 26"),
        ("mobilephone", "☎️ 🙂"),
        ("hs_whatsapp_phone_number", &ten_kb("\u{202E}1")),
        ("whatsapp_consent", &ten_kb("opted_out")),
    ]);
    let hs_late = hs.create_contact(&[("firstname", "Late"), ("phone", PHONE_LATE)]);

    // Salesforce: the same kinds of values, and names with quotes and backslashes on the
    // records the opt-out must reach.
    let sf_contact = sf.insert(
        "Contact",
        json!({"FirstName": ten_kb(HOSTILE[2]), "LastName": quotes, "Phone": "'; DELETE FROM Contact WHERE Id != '",
               "MobilePhone": PHONE, "WhatsApp_Consent_Source__c": HOSTILE[6]}),
    );
    let sf_lead = sf.insert(
        "Lead",
        json!({"LastName": HOSTILE[2], "Company": r"Acme \'s ' OR Name LIKE '%", "Phone": "(415) 555-2671"}),
    );
    let sf_meu = sf.insert(
        "MessagingEndUser",
        json!({"Name": r"Ana O'Hara \\ 'on' WhatsApp \", "MessageType": "WhatsApp",
               "MessagingPlatformKey": "whatsapp:+14155552671", "MessagingConsentStatus": "ImplicitlyOptedIn"}),
    );
    let sf_garbage = sf.insert(
        "Contact",
        json!({"LastName": ten_kb(quotes), "Phone": ten_kb("5"), "MobilePhone": HOSTILE[3],
               "Email": HOSTILE[0], "WhatsApp_Consent_Changed_At__c": "not a time"}),
    );
    // 250 rows on one SystemModstamp whose ids hold quotes and backslashes: the first query
    // returns 200 of them; when its locator expires the next query resumes after the last
    // id read, a SOQL literal built from data. The last row (by id) holds an opt-out.
    let at = Timestamp::now().minus(Duration::from_secs(3600));
    let ids: Vec<String> = (0..250).map(|i| format!(r"003'\{i:03}'\")).collect();
    for (i, id) in ids.iter().enumerate() {
        let mut fields = json!({"LastName": format!("{quotes}{i}")});
        if i == ids.len() - 1 {
            fields["MobilePhone"] = json!(PHONE_LATE);
            fields["WhatsApp_Opt_Out__c"] = json!(true);
        }
        sf.insert_with_id("Contact", id, fields, at);
    }
    // Every data call answers after 1.5 s, so the test can expire the locator while the
    // daemon's `query more` waits.
    sf.set_faults(optout_salesforce::fake::Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_millis(1500),
        ..Default::default()
    });

    let c = crm_config(dir.path(), &hs.base_url(), &sf.base_url());
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until("the daemon asks for the second page", WITHIN, async || {
        sf.counters().query_more > 0
    })
    .await;
    sf.expire_locators();
    d.until("the expired locator is noticed", WITHIN, async || {
        d.log_text()
            .contains("query locator expired; resuming after the last row read")
    })
    .await;
    sf.set_faults(optout_salesforce::fake::Faults::default());

    // The row after the resume point was read: its opt-out reaches HubSpot.
    d.until(
        "the opt-out read after the resumed query reaches HubSpot",
        WITHIN,
        async || hs.property(&hs_late, "whatsapp_consent").as_deref() == Some("opted_out"),
    )
    .await;
    d.until("both CRMs polled", WITHIN, async || {
        let s = d.status().await;
        ["hubspot", "salesforce"]
            .iter()
            .all(|c| connector(&s, c).last_poll_ok.is_some())
    })
    .await;

    // An agent records the opt-out on the ordinary HubSpot contact.
    hs.edit_contact(
        &hs_valid,
        &[
            ("whatsapp_consent", "opted_out"),
            (
                "whatsapp_consent_changed_at",
                &Timestamp::now().to_rfc3339(),
            ),
        ],
    );
    // And a new contact arrives already opted out: polling goes on past the hostile rows.
    let hs_new = hs.create_contact(&[
        ("firstname", HOSTILE[1]),
        ("phone", PHONE_NEW),
        ("whatsapp_consent", "opted_out"),
    ]);
    d.until(
        "the opt-out reaches every record of the person, quoted names included",
        WITHIN,
        async || {
            sf_opted_out(&sf, &sf_contact)
                && sf_opted_out(&sf, &sf_lead)
                && sf.get(&sf_meu).unwrap()["MessagingConsentStatus"] == "OptedOut"
                && hs
                    .property(&hs_hostile_same_person, "whatsapp_consent")
                    .as_deref()
                    == Some("opted_out")
        },
    )
    .await;
    d.until("the new opted-out contact is read", WITHIN, async || {
        gate(&d, GATE_TOKEN, "+14155552681", "utility")
            .await
            .allowed
            == Some(false)
    })
    .await;
    let _ = hs_new;

    // Records with no valid number of an opted-out person are left alone.
    assert!(!sf_opted_out(&sf, &sf_garbage));
    assert_eq!(
        hs.property(&hs_garbage_consent, "whatsapp_consent")
            .as_deref(),
        Some("opted_out'; --")
    );
    for (i, id) in ids.iter().enumerate().take(ids.len() - 1) {
        assert!(!sf_opted_out(&sf, id), "row {i} was touched");
    }
    // A garbage consent value is no opt-out.
    let v = gate(&d, GATE_TOKEN, "+14155552671", "utility").await;
    assert_eq!(v.allowed, Some(false), "{v:?}");

    d.until("every push is done", WITHIN, async || {
        let s = d.status().await;
        ["hubspot", "salesforce"]
            .iter()
            .all(|c| connector(&s, c).outbox_depth == 0)
    })
    .await;
    let s = d.status().await;
    for c in ["hubspot", "salesforce"] {
        let c = connector(&s, c);
        assert_eq!(c.dead_letters, 0, "{c:?}");
        assert!(c.alarm.is_none(), "{c:?}");
    }
    assert!(s.ready);
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("MALFORMED_QUERY"), "{log}");
}

// ---------------------------------------------------------------------------------------
// Configuration files

const BASE_CONFIG: &str = r#"[daemon]
state_dir = "STATE"
listen = "127.0.0.1:0"
control_socket = "SOCKET"
gate_token = { env = "T_GATE" }

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{ env = "T_WA" }]
verify_token = { env = "T_WA_VERIFY" }

[connectors.hubspot]
kind = "hubspot"
poll_interval = "30s"
full_resync_cron = "0 0 3 * * Sun"
token = { env = "T_HS" }

[connectors.salesforce]
kind = "salesforce"
login_url = "https://example.my.salesforce.com"
auth = { flow = "client_credentials", client_id = "id", client_secret = { env = "T_SF" } }

[connectors.automations]
kind = "webhook"
url = "https://automations.example.com/hook"
secret = { env = "T_HOOK" }
"#;

const CONFIG_ENV: [(&str, &str); 8] = [
    ("T_GATE", "gate-value-of-the-tests"),
    ("T_SHORT", "short-gate"),
    ("T_BLANK", " \t "),
    ("T_WA", "wa-value"),
    ("T_WA_VERIFY", "wa-verify-value"),
    ("T_HS", "hs-value"),
    ("T_SF", "sf-value"),
    ("T_HOOK", "hook-value"),
];

/// Runs a command to its end; panics if it is still running after `within` (a daemon that
/// started although it should have refused).
fn run_to_exit(cmd: &mut Command, within: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {within:?}: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn no_panic(out: &str) {
    for needle in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!out.contains(needle), "{needle} in:\n{out}");
    }
}

#[test]
fn malformed_configuration_is_located_by_check_config_and_refused_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = BASE_CONFIG
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace(
            "SOCKET",
            &dir.path().join("control.sock").display().to_string(),
        );
    let open_secret = dir.path().join("open-secret");
    std::fs::write(&open_secret, "file-secret-value\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = dir.path().join("optout-sync.toml");
    let check = |config: &str| {
        std::fs::write(&path, config).unwrap();
        let check = bin()
            .arg("check-config")
            .arg(&path)
            .envs(CONFIG_ENV)
            .output()
            .unwrap();
        let run = run_to_exit(
            bin().args(["run", "--config"]).arg(&path).envs(CONFIG_ENV),
            Duration::from_secs(30),
        );
        (check, run)
    };

    std::fs::write(&path, &base).unwrap();
    let good = bin()
        .arg("check-config")
        .arg(&path)
        .envs(CONFIG_ENV)
        .output()
        .unwrap();
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("ok (4 connectors)"), "{}", text(&good));

    let file = path.display().to_string();
    // (what, the file, lines every output must hold). Locations are file:line:column of the
    // offending key or value.
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "unknown key",
            base.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nlisten_port = 8080",
            ),
            vec![format!(
                "{file}:4:1: daemon.listen_port: unknown field `listen_port`, expected one of `state_dir`"
            )],
        ),
        (
            "unknown key in a connector",
            base.replace(
                "token = { env = \"T_HS\" }",
                "token = { env = \"T_HS\" }\ntokn = 1",
            ),
            vec![format!(
                "{file}:17:8: connectors.hubspot.tokn: unknown field `tokn`"
            )],
        ),
        (
            "wrong type",
            base.replace("poll_interval = \"30s\"", "poll_interval = 30"),
            vec![format!(
                "{file}:14:17: connectors.hubspot.poll_interval: invalid type: integer `30`, expected a duration"
            )],
        ),
        (
            "push_max_linger shorter than push_linger",
            base.replace(
                "poll_interval = \"30s\"",
                "poll_interval = \"30s\"\npush_linger = \"1s\"\npush_max_linger = \"100ms\"",
            ),
            vec![format!(
                "{file}:16:19: connectors.hubspot.push_max_linger: must be at least push_linger"
            )],
        ),
        (
            "inline secret",
            base.replace(
                "gate_token = { env = \"T_GATE\" }",
                "gate_token = \"inline-gate-value\"",
            ),
            vec![format!(
                "{file}:5:14: daemon.gate_token: secrets must not be written in the configuration file; use {{ env = \"NAME\" }}"
            )],
        ),
        (
            "inline secret in a connector",
            base.replace("token = { env = \"T_HS\" }", "token = \"inline-hs-value\""),
            vec![
                format!("{file}:"),
                ": connectors.hubspot".into(),
                "secrets must not be written in the configuration file".into(),
            ],
        ),
        (
            "missing environment variable",
            base.replace("T_SF", "T_SURELY_UNSET_SF"),
            vec![format!(
                "{file}:21:73: connectors.salesforce.auth.client_secret: environment variable T_SURELY_UNSET_SF is not set"
            )],
        ),
        (
            "bad cron",
            base.replace("0 0 3 * * Sun", "every sunday at 3"),
            vec![format!(
                "{file}:15:20: connectors.hubspot.full_resync_cron: `every sunday at 3` is not a cron expression"
            )],
        ),
        (
            "world-readable secret file",
            base.replace(
                "token = { env = \"T_HS\" }",
                &format!("token = {{ file = \"{}\" }}", open_secret.display()),
            ),
            vec![format!(
                "{file}:16:9: connectors.hubspot.token: secret file {} is readable by group or others (mode 644); run chmod 600 on it",
                open_secret.display()
            )],
        ),
        (
            "unknown connector kind",
            base.replace("kind = \"webhook\"", "kind = \"zapier\""),
            vec![format!(
                "{file}:24:8: connectors.automations.kind: unknown variant `zapier`, expected one of `whatsapp`, `hubspot`, `salesforce`, `webhook`"
            )],
        ),
        (
            "salesforce auth without flow",
            base.replace("flow = \"client_credentials\", ", ""),
            vec![
                format!("{file}:"),
                ": connectors.salesforce".into(),
                "missing field `flow`".into(),
            ],
        ),
        (
            "salesforce auth with an unknown flow",
            base.replace("flow = \"client_credentials\"", "flow = \"password\""),
            vec![
                format!("{file}:"),
                ": connectors.salesforce".into(),
                "unknown variant `password`, expected `client_credentials` or `jwt_bearer`".into(),
            ],
        ),
        (
            "not TOML at all",
            base.replace("[connectors.hubspot]", "[connectors.hubspot"),
            vec![format!("{file}:12:")],
        ),
        (
            "a gate token too short to be secret",
            base.replace("{ env = \"T_GATE\" }", "{ env = \"T_SHORT\" }"),
            vec![format!(
                "{file}:5:14: daemon.gate_token: too short (10 characters); use at least 16 random characters"
            )],
        ),
        (
            "a secret of only whitespace",
            base.replace("{ env = \"T_GATE\" }", "{ env = \"T_BLANK\" }"),
            vec![format!(
                "{file}:5:14: daemon.gate_token: environment variable T_BLANK holds only whitespace"
            )],
        ),
        (
            "one secret in two roles",
            base.replace("{ env = \"T_WA_VERIFY\" }", "{ env = \"T_WA\" }"),
            vec![format!(
                "{file}:10:16: connectors.whatsapp.verify_token: has the same value as connectors.whatsapp.app_secrets[0]"
            )],
        ),
        (
            "a future tolerance of a century",
            base.replace(
                "[connectors.whatsapp]",
                "[policy]\nfuture_tolerance = \"100y\"\n\n[connectors.whatsapp]",
            ),
            vec![format!("{file}:8:20: policy.future_tolerance: at most 1h")],
        ),
        (
            "a full resync every second",
            base.replace("0 0 3 * * Sun", "* * * * * *"),
            vec![format!(
                "{file}:15:20: connectors.hubspot.full_resync_cron: runs a full resync every 1s"
            )],
        ),
        (
            "a reserved connector name",
            base.replace("[connectors.automations]", "[connectors.import]"),
            vec![format!("connectors.import: `import` is reserved")],
        ),
        (
            "the control socket inside the store",
            base.replace(
                &dir.path().join("control.sock").display().to_string(),
                &dir.path().join("state/db").display().to_string(),
            ),
            vec![format!(
                "{file}:4:18: daemon.control_socket: must not be inside daemon.state_dir"
            )],
        ),
    ];
    for (what, config, expect) in &cases {
        let (check, run) = check(config);
        let c = text(&check);
        assert_eq!(check.status.code(), Some(2), "{what}: {c}");
        assert!(c.contains("1 problem found"), "{what}: {c}");
        let r = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(!run.status.success(), "{what}: run started: {}", text(&run));
        assert!(r.contains("bad configuration"), "{what}: {r}");
        for line in expect {
            assert!(
                c.contains(line.as_str()),
                "{what}: check-config lacks {line:?}:\n{c}"
            );
            assert!(
                r.contains(line.as_str()),
                "{what}: run lacks {line:?}:\n{r}"
            );
        }
        no_panic(&c);
        no_panic(&text(&run));
        for value in ["inline-gate-value", "inline-hs-value", "file-secret-value"] {
            assert!(
                !c.contains(value) && !r.contains(value),
                "{what} repeats a secret"
            );
        }
        assert!(
            !dir.path().join("state").exists(),
            "{what}: run created the store before refusing"
        );
    }
}

/// Every problem names the key it is about and points at it, also inside a connector's own
/// table (README: `file:line:column: key: message`).
#[test]
fn connector_settings_problems_name_and_locate_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = BASE_CONFIG
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace(
            "SOCKET",
            &dir.path().join("control.sock").display().to_string(),
        );
    let path = dir.path().join("optout-sync.toml");
    let file = path.display().to_string();
    for (config, expect) in [
        (
            base.replace("token = { env = \"T_HS\" }", "token = \"inline-hs-value\""),
            format!("{file}:16:9: connectors.hubspot.token: secrets must not be written"),
        ),
        (
            base.replace(
                "token = { env = \"T_HS\" }",
                "token = { env = \"T_HS\" }\npage_size = \"big\"",
            ),
            format!("{file}:17:13: connectors.hubspot.page_size: invalid type"),
        ),
        (
            base.replace("flow = \"client_credentials\", ", ""),
            format!("{file}:21:8: connectors.salesforce.auth: missing field `flow`"),
        ),
        (
            base.replace("flow = \"client_credentials\"", "flow = \"password\""),
            format!("{file}:21:17: connectors.salesforce.auth.flow: unknown variant `password`"),
        ),
    ] {
        std::fs::write(&path, &config).unwrap();
        let out = bin()
            .arg("check-config")
            .arg(&path)
            .envs(CONFIG_ENV)
            .output()
            .unwrap();
        assert!(
            text(&out).contains(&expect),
            "want {expect:?} in:\n{}",
            text(&out)
        );
    }
}

/// The same for the daemon's own secret: an inline `gate_token` names its key.
#[test]
fn an_inline_gate_token_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optout-sync.toml");
    let config = BASE_CONFIG
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace(
            "SOCKET",
            &dir.path().join("control.sock").display().to_string(),
        )
        .replace(
            "gate_token = { env = \"T_GATE\" }",
            "gate_token = \"inline-gate-value\"",
        );
    std::fs::write(&path, config).unwrap();
    let out = bin()
        .arg("check-config")
        .arg(&path)
        .envs(CONFIG_ENV)
        .output()
        .unwrap();
    let want = format!(
        "{}:5:14: daemon.gate_token: secrets must not be written",
        path.display()
    );
    assert!(
        text(&out).contains(&want),
        "want {want:?} in:\n{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------
// A damaged store

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Opens a sled database directly. sled's flusher thread lets go of the file lock a moment
/// after the last handle is dropped, so an earlier handle of this process may still hold it.
fn open_sled(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

/// Every (tree, key) → value of a sled database, opened directly.
fn contents(db: &sled::Db) -> BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>> {
    let mut out = BTreeMap::new();
    for name in db.tree_names() {
        for kv in db.open_tree(&name).unwrap().iter() {
            let (k, v) = kv.unwrap();
            out.insert((name.to_vec(), k.to_vec()), v.to_vec());
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for (p, bytes) in files(from) {
        let dest = to.join(p.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
}

fn store_config(dir: &Path, state: &Path) -> PathBuf {
    let path = dir.join(format!(
        "{}.toml",
        state.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &path,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\n\n[connectors.hubspot]\nkind = \"hubspot\"\npoll_interval = \"1h\"\nbase_url = \"http://127.0.0.1:9\"\ntoken = {{ env = \"PATH\" }}\n",
            state.display(),
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    path
}

/// A store with content: two imported opt-outs.
fn seeded_store(dir: &Path) -> PathBuf {
    let state = dir.join("pristine");
    let config = store_config(dir, &state);
    let csv = dir.join("list.csv");
    std::fs::write(
        &csv,
        "phone,status,time\n+14155552671,opted_out,2024-05-01T10:00:00Z\n+14155552672,opted_out,2024-05-02T10:00:00Z\n",
    )
    .unwrap();
    let o = bin()
        .args(["import", "--config"])
        .arg(&config)
        .arg(&csv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        state.join("db").exists(),
        "sled's layout changed: {:?}",
        files(&state).keys()
    );
    state
}

/// Runs the daemon on `state` (expected to refuse) and returns its output.
fn refused_run(dir: &Path, state: &Path) -> String {
    let config = store_config(dir, state);
    let out = run_to_exit(
        bin().args(["run", "--config"]).arg(&config),
        Duration::from_secs(30),
    );
    let t = text(&out);
    assert!(
        !out.status.success(),
        "the daemon started on a damaged store:\n{t}"
    );
    no_panic(&t);
    t
}

/// Overwrites `len` bytes of `file` at `at` (clamped to the file) with seeded garbage.
fn scribble(file: &Path, at: usize, len: usize, seed: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = at.min(bytes.len().saturating_sub(len));
    let mut x = seed.max(1);
    for b in bytes.iter_mut().skip(at).take(len) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_damaged_or_future_store_is_refused_clearly_and_never_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = seeded_store(dir.path());

    // An unknown schema version, written with sled directly.
    let future = dir.path().join("future");
    copy_dir(&pristine, &future);
    let before = {
        let db = open_sled(&future);
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            meta.get("schema_version").unwrap().as_deref(),
            Some(&b"2"[..]),
            "the store's meta tree changed"
        );
        meta.insert("schema_version", "3").unwrap();
        db.flush().unwrap();
        contents(&db)
    };
    for attempt in 0..2 {
        let t = refused_run(dir.path(), &future);
        assert!(
            t.contains("has schema version 3, this build understands 2; refusing to start"),
            "attempt {attempt}: {t}"
        );
        assert!(t.contains(&future.display().to_string()), "{t}");
    }
    // The store commands refuse it the same way.
    let o = bin()
        .args(["audit", "export", "--config"])
        .arg(store_config(dir.path(), &future))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("schema version 3"), "{}", text(&o));
    no_panic(&text(&o));
    // Not a single key was changed, added or removed.
    assert!(
        before.len() > 5,
        "the seeded store is too small: {before:?}"
    );
    assert!(
        contents(&open_sled(&future)) == before,
        "the refused store's contents changed"
    );

    // Garbage over sled's data, a truncated log, a deleted log: each refused as corrupt,
    // on every attempt (a refused start must not leave a fresh, empty store behind).
    let db_len = std::fs::metadata(pristine.join("db")).unwrap().len() as usize;
    type Damage = Box<dyn Fn(&Path)>;
    // Garbage in the middle of the log is the subtle one: sled takes it for a torn write at
    // the end, keeps the prefix (schema version included) and drops the rest.
    let damages: Vec<(&str, Damage)> = vec![
        (
            "garbage in the middle of the log",
            Box::new(move |s: &Path| scribble(&s.join("db"), db_len / 2, 256, 7)),
        ),
        (
            "garbage over the whole log",
            Box::new(move |s: &Path| scribble(&s.join("db"), 0, db_len, 11)),
        ),
        (
            "log truncated to nothing",
            Box::new(|s: &Path| std::fs::write(s.join("db"), b"").unwrap()),
        ),
        (
            "log deleted",
            Box::new(|s: &Path| std::fs::remove_file(s.join("db")).unwrap()),
        ),
    ];
    for (i, (what, damage)) in damages.iter().enumerate() {
        let state = dir.path().join(format!("damaged-{i}"));
        copy_dir(&pristine, &state);
        damage(&state);
        for attempt in 0..2 {
            let t = refused_run(dir.path(), &state);
            assert!(
                t.contains("the store is corrupt"),
                "{what}, attempt {attempt}: {t}"
            );
            assert!(t.contains("restore it from a backup"), "{what}: {t}");
            assert!(t.contains(&state.display().to_string()), "{what}: {t}");
        }
        assert!(
            state.join("optout-sync.store").exists(),
            "{what}: the marker is gone"
        );
        let o = bin()
            .args(["lookup", "--config"])
            .arg(store_config(dir.path(), &state))
            .arg("+14155552671")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{what}: lookup read a damaged store");
        assert!(
            text(&o).contains("the store is corrupt"),
            "{what}: {}",
            text(&o)
        );
    }

    // The undamaged copy still opens with its data.
    let o = bin()
        .args(["lookup", "--json", "--config"])
        .arg(store_config(dir.path(), &pristine))
        .arg("+14155552672")
        .output()
        .unwrap();
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["decisions"]["all"]["decision"], "opted_out", "{v}");
}

/// A refused start leaves the damaged store exactly as it found it, so that whatever can
/// still be recovered from it (by an operator or a backup tool) is not overwritten.
#[test]
#[ignore = "bug: opening a damaged store lets sled rewrite its files before the refusal"]
fn a_refused_start_leaves_the_store_files_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = seeded_store(dir.path());
    let db_len = std::fs::metadata(pristine.join("db")).unwrap().len() as usize;
    let damaged = dir.path().join("damaged");
    copy_dir(&pristine, &damaged);
    scribble(&damaged.join("db"), 0, db_len, 11);
    let before = files(&damaged);
    refused_run(dir.path(), &damaged);
    let after = files(&damaged);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files added or removed"
    );
    for (p, bytes) in &before {
        assert!(after[p] == *bytes, "{} was rewritten", p.display());
    }
}

// ---------------------------------------------------------------------------------------
// Secrets

/// Distinctive values for every secret the daemon holds (variable, value).
const SECRETS: [(&str, &str); 11] = [
    ("S_GATE", "gatetok-Qx7Ra1-secret"),
    ("S_HS_TOKEN", "pat-na1-Hx4Kp9-secret"),
    ("S_HS_CLIENT", "hsclient-Zr5Lm3-secret"),
    ("S_HS_REFRESH", "hsrefresh-Wq2Jn8-secret"),
    ("S_SF_SECRET", "sfclient-Vb6Tc4-secret"),
    ("S_SF_WRONG", "sfwrong-Pm9Ye2-secret"),
    ("S_WA_APP", "waapp-Nd3Fs7-secret"),
    ("S_WA_VERIFY", "waverify-Kt8Gb5-secret"),
    ("S_WA_TOKEN", "watoken-Jc1Uh6-secret"),
    ("S_HOOK", "hookhmac-Ly4Ei9-secret"),
    ("S_HOOK_BEARER", "hookbearer-Ao2Wd7-secret"),
];
/// In the automation webhook's URL, which only ever shows its host.
const URL_KEY: &str = "urlkey-Mf6Rx3-secret";

fn secret(name: &str) -> &'static str {
    SECRETS.iter().find(|(k, _)| *k == name).unwrap().1
}

/// Every secret value, the issued access tokens (prefixes of the fakes' token formats) and
/// a distinctive fragment of each value, found anywhere in `haystack`.
fn leaks(haystack: &str) -> Vec<String> {
    let mut needles: Vec<&str> = SECRETS.iter().map(|(_, v)| *v).collect();
    // The middle fragment of each value: a secret shown in part is still a leak.
    needles.extend(SECRETS.iter().map(|(_, v)| v.rsplit('-').nth(1).unwrap()));
    needles.extend([
        URL_KEY,
        "Mf6Rx3",
        "fake-access-",       // HubSpot OAuth access tokens
        "00DFK0000000001!AR", // Salesforce sessions
    ]);
    needles
        .into_iter()
        .filter(|n| haystack.contains(n))
        .map(String::from)
        .collect()
}

fn secrets_config(
    dir: &Path,
    hs: &str,
    hs_oauth: &str,
    sf: &str,
    graph: &str,
    hook: &str,
) -> String {
    format!(
        r#"
[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
control_socket = "{sock}"
gate_token = {{ env = "S_GATE" }}
shutdown_timeout = "5s"
unverified_after = "1m"

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{{ env = "S_WA_APP" }}]
verify_token = {{ env = "S_WA_VERIFY" }}
access_token = {{ env = "S_WA_TOKEN" }}
phone_number_id = "106540352242922"
base_url = "{graph}"
[connectors.whatsapp.confirmations]
enabled = true

[connectors.hubspot]
kind = "hubspot"
poll_interval = "200ms"
base_url = "{hs}"
token = {{ env = "S_HS_TOKEN" }}
overlap = "1s"

[connectors.hubspot_oauth]
kind = "hubspot"
poll_interval = "200ms"
base_url = "{hs_oauth}"
oauth = {{ client_id = "oauth-client", client_secret = {{ env = "S_HS_CLIENT" }}, refresh_token = {{ env = "S_HS_REFRESH" }} }}
overlap = "1s"

[connectors.salesforce]
kind = "salesforce"
poll_interval = "200ms"
login_url = "{sf}"
auth = {{ flow = "client_credentials", client_id = "fake-client-id", client_secret = {{ env = "S_SF_SECRET" }} }}
overlap = "1s"

[connectors.salesforce_wrong]
kind = "salesforce"
poll_interval = "200ms"
login_url = "{sf}"
auth = {{ flow = "client_credentials", client_id = "fake-client-id", client_secret = {{ env = "S_SF_WRONG" }} }}

[connectors.automations]
kind = "webhook"
url = "{hook}?key={URL_KEY}"
secret = {{ env = "S_HOOK" }}
bearer_token = {{ env = "S_HOOK_BEARER" }}
"#,
        state = dir.join("state").display(),
        sock = dir.join("control.sock").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_status_metrics_or_cli_output() {
    let dir = tempfile::tempdir().unwrap();
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        token: Some(secret("S_HS_TOKEN").into()),
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let hs_oauth = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        token: None,
        oauth: Some(optout_hubspot::fake::FakeOAuth {
            client_id: "oauth-client".into(),
            client_secret: secret("S_HS_CLIENT").into(),
            refresh_token: secret("S_HS_REFRESH").into(),
            expires_in: Duration::from_secs(1800),
        }),
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let sf = optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions {
        client_secret: secret("S_SF_SECRET").into(),
        ..Default::default()
    })
    .await;
    let graph = start_graph(GraphOptions {
        token: secret("S_WA_TOKEN").into(),
        ..Default::default()
    })
    .await;
    let hook = optout_webhook::fake::start(optout_webhook::fake::FakeOptions {
        secret: secret("S_HOOK").as_bytes().to_vec(),
        ..Default::default()
    })
    .await;
    let hs_a = hs.create_contact(&[("phone", PHONE)]);
    let hs_b = hs.create_contact(&[("phone", "+1 415 555 2672")]);
    let oa_a = hs_oauth.create_contact(&[("phone", PHONE)]);
    let oa_b = hs_oauth.create_contact(&[("phone", "+1 415 555 2672")]);
    let sf_a = sf.insert("Contact", json!({"LastName": "A", "Phone": PHONE}));
    let sf_b = sf.insert(
        "Contact",
        json!({"LastName": "B", "Phone": "+1 415 555 2672"}),
    );

    // The detector finds a whole value and a fragment of one.
    assert_eq!(
        leaks(&format!("token={} ", secret("S_HS_TOKEN"))),
        ["pat-na1-Hx4Kp9-secret", "Hx4Kp9"]
    );
    assert_eq!(leaks("Bearer fake-access-3"), ["fake-access-"]);
    let env: Vec<(&str, String)> = SECRETS.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let log = "debug,optout_sync=trace,optout_hubspot=trace,optout_salesforce=trace,optout_whatsapp=trace,optout_webhook=trace";
    let config = secrets_config(
        dir.path(),
        &hs.base_url(),
        &hs_oauth.base_url(),
        &sf.base_url(),
        &graph.base_url(),
        &hook.url(),
    );
    let mut d = start_with(dir.path(), &config, &env, log).await;
    let mut seen = String::new(); // every output to search at the end
    d.until("the first polls", WITHIN, async || {
        let s = d.status().await;
        ["hubspot", "hubspot_oauth", "salesforce"]
            .iter()
            .all(|c| connector(&s, c).last_poll_ok.is_some())
    })
    .await;
    d.until(
        "the wrong Salesforce secret is refused",
        WITHIN,
        async || {
            connector(&d.status().await, "salesforce_wrong")
                .last_error
                .is_some()
        },
    )
    .await;

    // The send gate: no token, a wrong token, the right one.
    let http = reqwest::Client::new();
    let url = d.url("/v1/consent/+14155552671?category=marketing");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let r = http
        .get(&url)
        .bearer_auth("wrong-gate-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    seen += &r.text().await.unwrap();
    let r = http
        .get(&url)
        .bearer_auth(secret("S_GATE"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    seen += &r.text().await.unwrap();

    // Meta's handshake with the right and a wrong verify token; unsigned and mis-signed
    // webhooks.
    let wh = d.url("/webhooks/whatsapp");
    let r = http
        .get(format!(
            "{wh}?hub.mode=subscribe&hub.verify_token={}&hub.challenge=4242",
            secret("S_WA_VERIFY")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "4242");
    let r = http
        .get(format!(
            "{wh}?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=4242"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    seen += &r.text().await.unwrap();
    let stop = envelope::text(&Who::wa(WA_NORMAL), "wamid.SEC1", now_s(), "STOP");
    for sig in [None, Some(sign("guessed-secret", &stop))] {
        let mut req = http.post(&wh).body(stop.clone());
        if let Some(s) = sig {
            req = req.header("X-Hub-Signature-256", s);
        }
        let r = req.send().await.unwrap();
        assert!(r.status() == 401 || r.status() == 403);
        seen += &r.text().await.unwrap();
    }

    // A signed STOP: a confirmation through Graph (the access token), pushes to both
    // portals, Salesforce and the automation webhook (HMAC and bearer token).
    let sender = WebhookSender::new(wh.clone(), secret("S_WA_APP"));
    assert!(sender.deliver(&stop).await.delivered);
    d.until("the STOP reaches every system", WITHIN, async || {
        graph.sent().len() == 1
            && hs.property(&hs_a, "whatsapp_consent").as_deref() == Some("opted_out")
            && hs_oauth.property(&oa_a, "whatsapp_consent").as_deref() == Some("opted_out")
            && sf_opted_out(&sf, &sf_a)
            && hook.events().iter().any(|e| e.status == "opted_out")
    })
    .await;
    let delivery = &hook.deliveries()[0];
    assert_eq!(
        delivery.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {}", secret("S_HOOK_BEARER")).as_str()),
        "the bearer token is sent"
    );

    // Expired tokens: renewed, and the next opt-out still goes everywhere.
    hs_oauth.expire_access_tokens();
    sf.expire_tokens();
    let (hs_tokens, sf_tokens) = (hs_oauth.counts().token, sf.counters().token);
    hs.edit_contact(&hs_b, &[("whatsapp_consent", "opted_out")]);
    d.until(
        "the second opt-out after token expiry",
        WITHIN,
        async || {
            hs_oauth.property(&oa_b, "whatsapp_consent").as_deref() == Some("opted_out")
                && sf_opted_out(&sf, &sf_b)
        },
    )
    .await;
    assert!(hs_oauth.counts().token > hs_tokens, "no OAuth refresh");
    assert!(sf.counters().token > sf_tokens, "no Salesforce login");

    // CLI commands while everything works.
    let cli = |args: &[&str]| {
        let o = bin()
            .args(args)
            .arg("--config")
            .arg(&d.config)
            .output()
            .unwrap();
        text(&o)
    };
    seen += &cli(&["resync", "--connector", "hubspot"]);
    seen += &cli(&["lookup", PHONE]);
    seen += &cli(&["lookup", "--json", PHONE]);

    // Credentials refused mid-run: the OAuth app is uninstalled, Salesforce refuses every
    // session, Graph no longer accepts the access token.
    hs_oauth.revoke_refresh_token();
    hs_oauth.expire_access_tokens();
    sf.refuse_sessions(true);
    graph.set_token("a-rotated-token");
    let stop2 = envelope::text(&Who::wa("14155552673"), "wamid.SEC2", now_s(), "STOP");
    assert!(sender.deliver(&stop2).await.delivered);
    d.until("every refusal is noticed", WITHIN, async || {
        let s = d.status().await;
        graph.errors_returned(190) > 0
            && ["hubspot_oauth", "salesforce"]
                .iter()
                .all(|c| connector(&s, c).last_error.is_some() || connector(&s, c).alarm.is_some())
    })
    .await;

    // What operators and scrapers see.
    seen += &cli(&["status"]);
    let status_json = cli(&["status", "--json"]);
    let v: StatusReport =
        serde_json::from_str(&status_json[..status_json.rfind('}').map(|i| i + 1).unwrap_or(0)])
            .unwrap_or_else(|e| panic!("{e}: {status_json}"));
    assert!(
        connector(&v, "salesforce_wrong").last_error.is_some(),
        "{v:?}"
    );
    seen += &status_json;
    // The status answer as the daemon serialises it, not as the report type would.
    let raw =
        optout_sync::control::request(&d.socket, &optout_sync::control::Request::Status, |_| {})
            .await;
    seen += &raw.unwrap().to_string();
    let m = metrics(&d).await;
    assert!(m.contains("optout_poll_errors_total"), "{m}");
    seen += &m;

    // check-config and run on broken copies of the configuration.
    let broken = dir.path().join("broken.toml");
    let open_file = dir.path().join("open-secret");
    std::fs::write(&open_file, format!("{}\n", secret("S_SF_SECRET"))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    for bad in [
        config.replace(
            "token = { env = \"S_HS_TOKEN\" }",
            &format!("token = \"{}\"", secret("S_HS_TOKEN")),
        ),
        config.replace(
            "gate_token = { env = \"S_GATE\" }",
            &format!("gate_token = \"{}\"", secret("S_GATE")),
        ),
        config.replace(
            "client_secret = { env = \"S_SF_SECRET\" }",
            &format!("client_secret = {{ file = \"{}\" }}", open_file.display()),
        ),
        config.replace("S_WA_TOKEN", "S_UNSET_VARIABLE"),
        config.replace(
            "verify_token = { env = \"S_WA_VERIFY\" }",
            &format!("verify_token = {}", secret("S_WA_VERIFY")),
        ),
    ] {
        std::fs::write(&broken, &bad).unwrap();
        let o = bin()
            .arg("check-config")
            .arg(&broken)
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        seen += &text(&o);
        let o = run_to_exit(
            bin()
                .args(["run", "--config"])
                .arg(&broken)
                .envs(env.iter().cloned()),
            Duration::from_secs(30),
        );
        assert!(!o.status.success());
        seen += &text(&o);
    }

    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}");
    let daemon_log = d.log_text();
    // The log really is at debug/trace level and covers every connector.
    for needle in [
        "DEBUG",
        "SELECT ",
        "hubspot_oauth",
        "salesforce_wrong",
        "automations",
    ] {
        assert!(daemon_log.contains(needle), "no {needle} in the log");
    }
    let found = leaks(&daemon_log);
    assert!(
        found.is_empty(),
        "secrets {found:?} in the daemon log:\n{daemon_log}"
    );
    let found = leaks(&seen);
    assert!(found.is_empty(), "secrets {found:?} in outputs:\n{seen}");
}

/// The control socket's path never costs the file that is there: a regular file (a store
/// file, a configuration) is refused, not replaced; inside the state directory the path
/// is refused by check-config already (see the malformed-configuration table).
#[test]
fn the_control_socket_never_replaces_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.db");
    std::fs::write(&precious, "acknowledged opt-outs").unwrap();
    let config = BASE_CONFIG
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace("SOCKET", &precious.display().to_string());
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, config).unwrap();
    let run = run_to_exit(
        bin()
            .args(["run", "--create-state-dir", "--config"])
            .arg(&path)
            .envs(CONFIG_ENV),
        Duration::from_secs(30),
    );
    assert!(!run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("is not a socket"), "{}", text(&run));
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "acknowledged opt-outs"
    );
}

/// A listener beyond loopback is allowed, with a warning that names the key and why.
#[test]
fn a_listener_beyond_loopback_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let config = BASE_CONFIG
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace(
            "SOCKET",
            &dir.path().join("control.sock").display().to_string(),
        )
        .replace("127.0.0.1:0", "0.0.0.0:0");
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, config).unwrap();
    let check = bin()
        .arg("check-config")
        .arg(&path)
        .envs(CONFIG_ENV)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("warning: ")
            && text(&check).contains("daemon.listen: 0.0.0.0:0 is reachable from other hosts"),
        "{}",
        text(&check)
    );
}
