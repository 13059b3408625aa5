//! The HTTP listener and the control socket under hostile or careless clients, against the
//! real binary on loopback: accept loops that back off when descriptors run out, a send
//! gate that refuses categories it does not know, connection limits and header, body and
//! idle timeouts, authentication before any body is read, and webhook signature refusals
//! counted and logged at a bounded rate.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::GATE_TOKEN;
use common::config::Config;
use optout_sync::report::GateReply;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_SECRET: &str = "meta-app-secret-for-tests";
const WA: &str = "14155552671";

fn config(dir: &Path) -> Config {
    Config::new(dir).shutdown_timeout("5s").whatsapp(APP_SECRET)
}

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

/// Sends `head` (and nothing more) on a fresh connection to the daemon.
async fn send_raw(d: &common::Daemon, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(&d.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// The response head the server sends first (up to the blank line), within `within`.
async fn first_head(s: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a response head");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("a response in time");
    String::from_utf8_lossy(&got).into_owned()
}

/// How long until the server closes `s` (reading and dropping whatever it sends), or
/// `None` if it is still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let drain = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, drain)
        .await
        .ok()
        .map(|()| t0.elapsed())
}

async fn metrics(d: &common::Daemon) -> String {
    reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line of the exposition (`name{labels}`), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

mod rlimit {
    /// `struct rlimit` on 64-bit Linux.
    #[repr(C)]
    pub struct Rlimit {
        pub cur: u64,
        pub max: u64,
    }
    pub const NOFILE: i32 = 7;
    unsafe extern "C" {
        pub fn prlimit(pid: i32, resource: i32, new: *const Rlimit, old: *mut Rlimit) -> i32;
    }

    /// Sets another process's soft descriptor limit (the hard one stays, so it can be
    /// raised again).
    pub fn set_nofile(pid: u32, n: u64) {
        let mut old = Rlimit { cur: 0, max: 0 };
        // SAFETY: prlimit(2) on a child we own, with valid structs.
        let rc = unsafe { prlimit(pid as i32, NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        let new = Rlimit {
            cur: n.min(old.max),
            max: old.max,
        };
        // SAFETY: as above.
        let rc = unsafe { prlimit(pid as i32, NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
}

/// Finding 3: with descriptors exhausted, the HTTP and control accept loops back off
/// instead of spinning (one `status` once wrote millions of WARN lines); `status` is served
/// once descriptors come back, and each loop logged its episode once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loops_back_off_when_descriptors_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path()).set("daemon", r#"header_timeout = "60s""#);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let pid = d.child.id().unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    rlimit::set_nofile(pid, open + 16);

    // Idle connections until accept fails: far more than the 16 descriptors left.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(TcpStream::connect(&d.addr).await.unwrap());
    }
    let logged = |d: &common::Daemon, what: &str, listener: &str| {
        (d.log_text().lines())
            .filter(|l| l.contains(what) && l.contains(listener))
            .count()
    };
    d.until(
        "the HTTP accept fails",
        Duration::from_secs(10),
        async || logged(&d, "accept failed", "HTTP listener") > 0,
    )
    .await;
    let socket = d.socket.clone();
    let status = tokio::spawn(async move { optout_sync::control::status(&socket).await });
    d.until(
        "the control accept fails",
        Duration::from_secs(10),
        async || logged(&d, "accept failed", "control socket") > 0,
    )
    .await;
    // Exhausted for a second: a spinning loop would write thousands of lines in it. (The
    // `status` may already have slipped through a descriptor the daemon freed meanwhile.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(idle);

    let report = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .expect("status answers once descriptors are back")
        .unwrap()
        .expect("status succeeds");
    assert!(report.ready);
    // Accepting without failures for a while ends the episode with a count.
    d.until(
        "the control socket's episode ends",
        Duration::from_secs(20),
        async || {
            d.status().await;
            logged(&d, "accepting connections again", "control socket") > 0
        },
    )
    .await;
    let log = d.log_text();
    let failures = log.lines().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 2, "one line per listener per episode:\n{log}");
    let ended = log
        .lines()
        .filter(|l| l.contains("accepting connections again"))
        .count();
    assert!(ended <= 2, "{log}");
    rlimit::set_nofile(pid, 4096);
    assert!(d.terminate().await.success());
}

async fn gate(d: &common::Daemon, id: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/{id}?{query}")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap()
}

/// Finding 4: for a person who stopped marketing, Meta's own category name is blocked like
/// `marketing`, and a category the gate does not know — another word, a typo, a trailing
/// space, an empty value — is a 400, never "allowed"; the batch form likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_categories_it_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    let stop = envelope::user_preference(&Who::wa(WA), "stop", now_s());
    assert!(sender.deliver(&stop).await.delivered);
    let id = format!("+{WA}");
    d.until(
        "the marketing stop applies",
        Duration::from_secs(20),
        async || {
            let r: GateReply = gate(&d, &id, "category=marketing")
                .await
                .json()
                .await
                .unwrap();
            r.allowed == Some(false)
        },
    )
    .await;

    for query in ["category=marketing_messages", "category=MARKETING", ""] {
        let r: GateReply = gate(&d, &id, query).await.json().await.unwrap();
        assert_eq!(r.allowed, Some(false), "{query}: {r:?}");
        assert_eq!(r.blocked_by.as_deref(), Some("marketing"), "{query}");
        assert_eq!(r.category.as_deref(), Some("marketing"), "{query}");
    }
    let utility: GateReply = gate(&d, &id, "category=utility")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(utility.allowed, Some(true));

    for query in [
        "category=promotional",
        "category=marketting",
        "category=marketing%20",
        "category=",
    ] {
        let r = gate(&d, &id, query).await;
        assert_eq!(r.status(), 400, "{query}");
        let body: serde_json::Value = r.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("unknown category"), "{query}: {error}");
        assert!(body.get("allowed").is_none(), "{query}: {body}");
    }

    let batch = async |category: serde_json::Value| {
        reqwest::Client::new()
            .post(d.url("/v1/consent/batch"))
            .bearer_auth(GATE_TOKEN)
            .json(&json!({"category": category, "ids": [id]}))
            .send()
            .await
            .unwrap()
    };
    for bad in ["promotional", "marketing ", ""] {
        assert_eq!(batch(json!(bad)).await.status(), 400, "{bad:?}");
    }
    let ok: serde_json::Value = batch(json!("marketing_messages"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ok["results"][0]["allowed"], json!(false), "{ok}");
    assert!(d.terminate().await.success());
}

/// Finding 11 (part): the scheme of `Authorization` is case-insensitive (RFC 9110); the
/// token itself is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_in_any_case() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let url = d.url("/v1/consent/+14155552671?category=utility");
    let with = async |value: String| {
        reqwest::Client::new()
            .get(&url)
            .header("Authorization", value)
            .send()
            .await
            .unwrap()
            .status()
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(
            with(format!("{scheme} {GATE_TOKEN}")).await,
            200,
            "{scheme}"
        );
    }
    assert_eq!(
        with(format!("bearer {}", GATE_TOKEN.to_uppercase())).await,
        401
    );
    assert_eq!(with(format!("Basic {GATE_TOKEN}")).await, 401);
    assert!(d.terminate().await.success());
}

/// Finding 5: headers that never finish, idle keep-alive connections and stalled uploads
/// are cut off by their timeouts; an announced body that will be refused gets its answer at
/// once, without `100 Continue`; the batch gate checks its token before reading a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_requests_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path())
        .set("daemon", r#"header_timeout = "1s""#)
        .set("daemon", r#"body_timeout = "2s""#);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let patience = Duration::from_secs(10);

    // Slowloris: headers begun, never finished.
    let mut slow = send_raw(&d, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ").await;
    let t = closed_within(&mut slow, patience).await.expect("closed");
    assert!(t >= Duration::from_millis(900), "{t:?}");
    // Idle after a keep-alive request.
    let mut idle = send_raw(&d, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        first_head(&mut idle, patience)
            .await
            .starts_with("HTTP/1.1 200")
    );
    closed_within(&mut idle, patience).await.expect("closed");

    // A signed-looking upload that stops after 1 KB of its announced 900 KB.
    let sig = format!("sha256={}", "0".repeat(64));
    let mut stalled = send_raw(
        &d,
        &format!("POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: {sig}\r\nContent-Length: 900000\r\n\r\n"),
    )
    .await;
    stalled.write_all(&[b'{'; 1024]).await.unwrap();
    let t0 = Instant::now();
    let head = first_head(&mut stalled, patience).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    closed_within(&mut stalled, patience).await.expect("closed");

    // Refused from the headers alone: the first line back is the refusal, not a 100.
    let at_once = Duration::from_millis(900);
    for (head, want) in [
        (
            format!("POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: {sig}\r\nContent-Length: 100000000000\r\nExpect: 100-continue\r\n\r\n"),
            "HTTP/1.1 413",
        ),
        (
            "POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n".to_string(),
            "HTTP/1.1 401",
        ),
        (
            "POST /v1/consent/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n".to_string(),
            "HTTP/1.1 401",
        ),
        (
            format!("POST /v1/consent/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GATE_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n"),
            "HTTP/1.1 413",
        ),
    ] {
        let mut s = send_raw(&d, &head).await;
        let got = first_head(&mut s, at_once).await;
        assert!(got.starts_with(want), "{head}\n→ {got}");
    }
    // Without `Expect`, a 2 MB body the token does not allow is not waited for either.
    let mut s = send_raw(&d, "POST /v1/consent/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n[").await;
    assert!(
        first_head(&mut s, at_once)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(d.terminate().await.success());
}

/// Finding 5: at `max_connections`, a further connection is not served until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path())
        .set("daemon", "max_connections = 4")
        .set("daemon", r#"header_timeout = "60s""#);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = send_raw(&d, request).await;
        assert!(
            first_head(&mut s, Duration::from_secs(5))
                .await
                .starts_with("HTTP/1.1 200")
        );
        held.push(s);
    }
    let mut fifth = send_raw(&d, request).await;
    let mut buf = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(700), fifth.read(&mut buf)).await;
    assert!(waited.is_err(), "a fifth connection was served: {waited:?}");
    held.pop();
    let head = first_head(&mut fifth, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(held);
    assert!(d.terminate().await.success());
}

/// Finding 11 (part): badly signed webhooks are counted by connector and reason, and one
/// source hammering the endpoint gets one log line, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_refusals_are_counted_and_logged_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let missing =
        r#"optout_webhook_signature_failures_total{connector="whatsapp",reason="missing"}"#;
    let invalid =
        r#"optout_webhook_signature_failures_total{connector="whatsapp",reason="invalid"}"#;
    let before = metrics(&d).await;
    assert_eq!(sample(&before, missing), Some(0.0), "{before}");
    assert_eq!(sample(&before, invalid), Some(0.0), "{before}");

    let body = envelope::text(&Who::wa(WA), "wamid.X", now_s(), "STOP");
    let wrong = WebhookSender::new(d.url("/webhooks/whatsapp"), "not-the-app-secret")
        .with_retries(1, Duration::ZERO);
    for _ in 0..150 {
        assert_eq!(wrong.deliver(&body).await.attempts, [Ok(403)]);
    }
    for _ in 0..50 {
        assert_eq!(wrong.deliver_with(&body, None).await.attempts, [Ok(401)]);
    }
    let after = metrics(&d).await;
    assert_eq!(sample(&after, invalid), Some(150.0), "{after}");
    assert_eq!(sample(&after, missing), Some(50.0), "{after}");
    let log = d.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("webhooks refused for"))
        .count();
    assert_eq!(lines, 1, "{log}");
    assert!(log.contains("source=127.0.0.1"), "{log}");
    assert!(d.terminate().await.success());
}
