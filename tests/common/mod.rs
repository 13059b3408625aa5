//! Helpers for tests that run the real `optout-sync` binary as a child process against
//! the connectors' fakes on 127.0.0.1.

#![allow(dead_code)]

pub mod config;
pub mod rng;
pub mod store;

/// The binary under test, without the caller's `OPTOUT_SYNC_CONFIG`.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    c.env_remove("OPTOUT_SYNC_CONFIG");
    c
}

/// Delivers the WhatsApp webhook `body` to `url` signed with `secret`, as Meta does:
/// whether the daemon acknowledged it (a 200).
pub async fn deliver_signed(http: &reqwest::Client, url: &str, secret: &str, body: &[u8]) -> bool {
    let sent = http
        .post(url)
        .header("Content-Type", "application/json")
        .header(
            "X-Hub-Signature-256",
            optout_whatsapp::fake::sign(secret, body),
        )
        .body(body.to_vec())
        .send()
        .await;
    sent.is_ok_and(|r| r.status() == 200)
}

/// A finished command's standard output and error, as text.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// Each test file uses the few it needs.
#[allow(unused_imports)]
pub use store::{fresh_pg_database, pg_admin_url, sled_only};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use optout_sync::report::StatusReport;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

pub const GATE_TOKEN: &str = "gate-token-for-tests";

/// A running daemon with its systemd notification socket.
pub struct Daemon {
    pub child: Child,
    pub notify: UnixDatagram,
    pub addr: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// Writes `config` into `dir` and starts the daemon with `env`, waiting for READY=1. Under
/// `OPTOUT_TEST_STORE=postgres` a configuration without a `[store]` table gets one (see
/// [`store`]).
pub async fn start(dir: &Path, config: &str, env: &[(&str, String)]) -> Daemon {
    let config_path = dir.join("optout-sync.toml");
    let mut config = config.to_string();
    if !config.lines().any(|l| l.trim() == "[store]") {
        config += &store::store_table(dir);
    }
    std::fs::write(&config_path, &config).unwrap();
    let notify_path = dir.join(format!("notify-{}.sock", rand_suffix()));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.join(format!("daemon-{}.log", rand_suffix()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("OPTOUT_SYNC_LOG", "info,optout_sync=debug")
        .env("OPTOUT_GATE_TOKEN", GATE_TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let mut d = Daemon {
        child,
        notify,
        addr: String::new(),
        config: config_path,
        socket: dir.join("control.sock"),
        log,
    };
    let mut ready = false;
    while !ready || d.addr.is_empty() {
        let msg = d.next_notification(Duration::from_secs(60)).await;
        for line in msg.lines() {
            if line == "READY=1" {
                ready = true;
            }
            if let Some(rest) = line.strip_prefix("STATUS=running; listening on ") {
                d.addr = rest.to_string();
            }
        }
    }
    store::check_on_postgres(dir, &config, || d.log_text());
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 1000
}

impl Daemon {
    /// The next sd_notify datagram, or a panic with the daemon's log.
    pub async fn next_notification(&mut self, within: Duration) -> String {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(within, self.notify.recv(&mut buf)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => panic!("no notification from the daemon; log:\n{}", self.log_text()),
        }
    }

    /// This daemon's log, preceded by the logs of earlier daemons on the same directory.
    pub fn log_text(&self) -> String {
        let dir = self.log.parent().expect("log in a directory");
        let mut logs: Vec<_> = std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("daemon-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        logs.iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.file_name().unwrap().to_string_lossy(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { kill(pid, 15) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the daemon stops within its deadline")
            .unwrap()
    }

    /// Like [`eventually`], with the daemon's log in the failure message.
    pub async fn until(&self, what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !check().await {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for: {what}; daemon log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every listed HubSpot contact and Salesforce Contact is suppressed and
    /// the outbox and webhook inbox are empty; returns the `status` then.
    pub async fn until_suppressed_everywhere(
        &self,
        hs: (&optout_hubspot::fake::FakeHandle, &[String]),
        sf: (&optout_salesforce::fake::FakeHandle, &[String]),
        within: Duration,
    ) -> StatusReport {
        self.until("every HubSpot contact suppressed", within, async || {
            (hs.1.iter())
                .all(|id| hs.0.property(id, "whatsapp_consent").as_deref() == Some("opted_out"))
        })
        .await;
        self.until("every Salesforce Contact suppressed", within, async || {
            (sf.1.iter()).all(|id| {
                (sf.0.get(id)).is_some_and(|v| v["WhatsApp_Opt_Out__c"] == serde_json::json!(true))
            })
        })
        .await;
        self.until("outbox and webhook inbox empty", within, async || {
            let s = self.status().await;
            s.webhook_inbox == 0 && s.connectors.iter().all(|c| c.outbox_depth == 0)
        })
        .await;
        self.status().await
    }

    pub async fn status(&self) -> StatusReport {
        optout_sync::control::status(&self.socket).await.unwrap()
    }

    /// Whether every CRM connector finished a poll after `t` (or at all, for `None`): the
    /// point from which a test may count on the daemon knowing the CRMs' records.
    pub async fn crms_polled_since(&self, t: Option<optout_core::Timestamp>) -> bool {
        self.status()
            .await
            .connectors
            .iter()
            .filter(|c| c.kind == "hubspot" || c.kind == "salesforce")
            .all(|c| {
                c.last_poll_ok
                    .as_deref()
                    .and_then(optout_core::Timestamp::parse)
                    .is_some_and(|p| t.is_none_or(|t| p > t))
            })
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Waits until `check` holds, re-checking every 50 ms; panics with `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// HubSpot (rate limits off), Salesforce and an automation-webhook receiver, each a
/// fresh fake on 127.0.0.1.
pub struct Fakes {
    pub hubspot: optout_hubspot::fake::FakeHandle,
    pub salesforce: optout_salesforce::fake::FakeHandle,
    pub hook: optout_webhook::fake::FakeHandle,
}

pub async fn fakes() -> Fakes {
    let hubspot = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let salesforce =
        optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let hook = optout_webhook::fake::start(optout_webhook::fake::FakeOptions::default()).await;
    Fakes {
        hubspot,
        salesforce,
        hook,
    }
}
