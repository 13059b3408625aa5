//! What operations rely on, checked against the files shipped in `config/`: the systemd
//! unit's restart policy, logs in the journal, and the alert rules and dashboard naming only
//! metrics the daemon exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::Config;
use common::eventually;
use serde_json::{Value, json};

const UNIT: &str = "config/optout-sync.service";
const RULES: &str = "config/prometheus/optout-sync.rules.yml";
const DASHBOARD: &str = "config/grafana/optout-sync.json";
const PHONE: &str = "+1 415 555 2671";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The unit's settings as `(section, key) → values` (a key may repeat), comments skipped.
fn unit_settings(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut settings: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = line.split_once('=') {
            (settings.entry((section.clone(), key.trim().to_string())))
                .or_default()
                .push(value.trim().to_string());
        }
    }
    settings
}

/// The exit code of `check-config` on a configuration with an error in it.
fn check_config_exit_code_on_a_bad_file() -> i32 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[daemon]\nstate_dir = 42\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    out.status.code().expect("exited, not killed")
}

/// The restart policy's reasoning, setting by setting: crashes, watchdog kills and panics
/// restart forever with a delay, while the exit code of a broken configuration (from
/// `ExecStartPre=check-config`, measured here on the real binary) fails the unit at once.
#[test]
fn unit_restarts_after_crashes_forever_and_stops_on_a_broken_configuration() {
    let s = unit_settings(&std::fs::read_to_string(repo_file(UNIT)).unwrap());
    let one = |section: &str, key: &str| -> Option<String> {
        let values = s.get(&(section.to_string(), key.to_string()))?;
        assert_eq!(values.len(), 1, "{key}= set more than once");
        Some(values[0].clone())
    };

    // No start limit: it would count automatic restarts and, once hit, leave the daemon
    // down until `systemctl reset-failed`.
    assert_eq!(one("Unit", "StartLimitIntervalSec").as_deref(), Some("0"));
    assert_eq!(one("Unit", "StartLimitBurst"), None);

    // on-abnormal: signals (crashes, OOM kills), watchdog kills and start timeouts restart;
    // exit codes do not, unless forced back in.
    assert_eq!(one("Service", "Restart").as_deref(), Some("on-abnormal"));
    let forced: BTreeSet<i32> = one("Service", "RestartForceExitStatus")
        .expect("RestartForceExitStatus= set")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(forced.contains(&70), "a panic (exit 70) must restart");
    assert!(forced.contains(&1), "a runtime error (exit 1) must restart");
    assert!(
        forced.contains(&75),
        "a store that cannot be reopened (exit 75) must restart"
    );
    // A damaged store is refused at every start: no restart loop.
    let prevented =
        one("Service", "RestartPreventExitStatus").expect("RestartPreventExitStatus= set");
    assert_eq!(prevented.trim(), "65");
    assert!(!forced.contains(&65));

    // The configuration is checked before the daemon starts, and its failure code is not
    // among those that restart: the unit fails on the first attempt.
    let pre = one("Service", "ExecStartPre").expect("ExecStartPre= set");
    assert!(pre.contains(" check-config "), "{pre}");
    let bad_config = check_config_exit_code_on_a_bad_file();
    assert_eq!(bad_config, 2);
    assert!(!forced.contains(&bad_config));

    // A delay between attempts, so a crash loop neither spins nor gives up.
    let delay = humantime::parse_duration(&one("Service", "RestartSec").unwrap()).unwrap();
    assert!(delay >= Duration::from_secs(5), "{delay:?}");
    // The watchdog is on (its kills are among the abnormal ends that restart).
    assert!(one("Service", "WatchdogSec").is_some());
    // systemd 252 (Debian 12) does not know RestartSteps=/RestartMaxDelaySec=: they are
    // offered commented out, not set.
    assert_eq!(one("Service", "RestartSteps"), None);
    assert_eq!(one("Service", "RestartMaxDelaySec"), None);
}

/// `systemd-analyze verify` accepts the unit without a warning (with the binary's path
/// pointed at this build, since verify checks that it exists).
#[test]
fn unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("optout-sync.service");
    let text = std::fs::read_to_string(repo_file(UNIT)).unwrap();
    std::fs::write(
        &unit,
        text.replace("/usr/bin/optout-sync", env!("CARGO_BIN_EXE_optout-sync")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("optout-sync.service"),
        "warnings:\n{stderr}"
    );
}

/// One native-protocol journal entry: `KEY=value` lines, or `KEY\n`, a little-endian u64
/// length, the value and `\n` for values with newlines (systemd's native protocol).
fn journal_fields(mut datagram: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !datagram.is_empty() {
        let end = datagram.iter().position(|&b| b == b'\n').unwrap();
        let line = &datagram[..end];
        datagram = &datagram[end + 1..];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8_lossy(&line[..eq]).into_owned();
            fields.insert(key, String::from_utf8_lossy(&line[eq + 1..]).into_owned());
        } else {
            let len = u64::from_le_bytes(datagram[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&datagram[8..8 + len]).into_owned();
            fields.insert(String::from_utf8_lossy(line).into_owned(), value);
            datagram = &datagram[8 + len + 1..];
        }
    }
    fields
}

/// How to run a command with `dir` mounted over `/run` (a private mount namespace), so
/// that `/run/systemd/journal/socket` is a socket the test binds; `None` where mount
/// namespaces are not allowed (then the test is skipped).
fn over_run(dir: &Path) -> Option<Vec<String>> {
    let script = r#"mount --bind "$1" /run && shift && exec "$@""#;
    for userns in [&[][..], &["--map-root-user"][..]] {
        let mut wrapper: Vec<String> = ["unshare", "--mount", "--propagation", "private"]
            .iter()
            .chain(userns)
            .map(|s| s.to_string())
            .collect();
        wrapper.extend(["sh", "-c", script, "sh"].map(String::from));
        wrapper.push(dir.display().to_string());
        let probe = Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg("true")
            .stderr(Stdio::null())
            .status();
        if probe.is_ok_and(|s| s.success()) {
            return Some(wrapper);
        }
    }
    None
}

/// Starts the daemon like [`common::start`], through `wrapper`, with `JOURNAL_STREAM`
/// naming its standard error (as systemd does when the output goes to the journal).
async fn start_on_journal(dir: &Path, config: &Config, wrapper: &[String]) -> common::Daemon {
    let config_path = dir.join("optout-sync.toml");
    std::fs::write(&config_path, config.toml()).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.join("daemon-stderr.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut cmd = tokio::process::Command::new(
        wrapper
            .first()
            .map_or(env!("CARGO_BIN_EXE_optout-sync"), |w| w.as_str()),
    );
    cmd.args(wrapper.iter().skip(1));
    if !wrapper.is_empty() {
        cmd.arg(env!("CARGO_BIN_EXE_optout-sync"));
    }
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("OPTOUT_SYNC_LOG", "info")
        .env("OPTOUT_GATE_TOKEN", common::GATE_TOKEN)
        .envs(config.env())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut d = common::Daemon {
        child: cmd.spawn().unwrap(),
        notify,
        addr: String::new(),
        config: config_path,
        socket: dir.join("control.sock"),
        log,
    };
    while d.addr.is_empty() {
        let msg = d.next_notification(Duration::from_secs(60)).await;
        if let Some(addr) = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS=running; listening on "))
        {
            d.addr = addr.to_string();
        }
    }
    d
}

/// Under systemd (standard error is the journal) the daemon writes native journal entries:
/// each field a field, a priority from the level, no timestamp of its own, and nothing
/// on standard error. A CRM opt-out is followed through to the push's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_journal_the_daemon_writes_structured_entries_without_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let Some(wrapper) = over_run(run.path()) else {
        eprintln!("skipped: mount namespaces are not allowed here (unshare --mount)");
        return;
    };
    std::fs::create_dir_all(run.path().join("systemd/journal")).unwrap();
    let journal =
        std::os::unix::net::UnixDatagram::bind(run.path().join("systemd/journal/socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let hubspot = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let salesforce =
        optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let hs_id = hubspot.create_contact(&[("firstname", "Ada"), ("phone", PHONE)]);
    salesforce.insert(
        "Contact",
        json!({"LastName": "Lovelace", "Phone": "(415) 555-2671", "WhatsApp_Opt_Out__c": false}),
    );
    let config = Config::new(dir.path())
        .hubspot(&hubspot.base_url())
        .salesforce(&salesforce.base_url());
    let mut d = start_on_journal(dir.path(), &config, &wrapper).await;
    eventually("both CRMs polled", Duration::from_secs(30), async || {
        d.crms_polled_since(None).await
    })
    .await;
    let now = optout_core::Timestamp::now();
    hubspot.edit_contact(
        &hs_id,
        &[
            ("whatsapp_consent", "opted_out"),
            ("whatsapp_consent_changed_at", &now.to_rfc3339()),
        ],
    );

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !entries
        .iter()
        .any(|e: &BTreeMap<String, String>| e.get("MESSAGE").is_some_and(|m| m == "push done"))
    {
        let n = journal.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no push entry in the journal ({e}); entries so far: {entries:#?}")
        });
        if n > 0 {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    assert!(d.terminate().await.success());

    let ready = entries
        .iter()
        .find(|e| e["MESSAGE"] == "optout-sync is ready")
        .expect("the ready entry");
    assert_eq!(ready["PRIORITY"], "5", "info is notice (5)");
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "optout-sync");
    assert_eq!(ready["LISTEN"], d.addr);
    let push = entries
        .iter()
        .find(|e| e["MESSAGE"] == "push done")
        .unwrap();
    assert_eq!(push["CONNECTOR"], "salesforce");
    assert!(
        push.contains_key("SUBJECT") && push.contains_key("RECORD"),
        "{push:?}"
    );
    let decision = entries
        .iter()
        .find(|e| e["MESSAGE"] == "decision changed")
        .expect("the decision entry");
    assert_eq!(decision["TO"], "opted_out");
    assert_eq!(decision["SUBJECT"], push["SUBJECT"]);
    // journald stamps entries itself: none carries a time of its own, in a field or at the
    // start of its message.
    for e in &entries {
        assert!(!e["MESSAGE"].starts_with(char::is_numeric), "{e:?}");
        assert!(!e.keys().any(|k| k.contains("TIME")), "{e:?}");
    }
    // And nothing goes to standard error, which is the journal too.
    assert_eq!(std::fs::read_to_string(&d.log).unwrap(), "");
}

/// When the journal's socket cannot be reached although standard error is the journal,
/// the daemon says so and writes readable lines there, without a timestamp of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_journal_without_its_socket_the_daemon_writes_text_without_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let Some(wrapper) = over_run(run.path()) else {
        eprintln!("skipped: mount namespaces are not allowed here (unshare --mount)");
        return;
    };
    let mut d = start_on_journal(dir.path(), &Config::new(dir.path()), &wrapper).await;
    assert!(d.terminate().await.success());

    let log = std::fs::read_to_string(&d.log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines[0].contains("WARN") && lines[0].contains("cannot reach the journal's socket"),
        "{log}"
    );
    assert!(log.contains("optout-sync is ready"), "{log}");
    for line in &lines {
        assert!(
            !line.starts_with(char::is_numeric),
            "a timestamp in {line:?}"
        );
        assert!(!line.contains('\x1b'), "colours in {line:?}");
    }
}

/// The metric names `/metrics` exposes, as PromQL sees them (`_total` on counters,
/// `_bucket`/`_sum`/`_count` on histograms).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `optout_…` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("optout_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The alert rules' expressions (`expr:` values, folded `>` blocks included).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = value.trim().trim_start_matches('>').to_string();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent;
            if !(deeper || next.trim().is_empty()) {
                break;
            }
            expr = format!("{expr} {}", next.trim());
            lines.next();
        }
        exprs.push(expr);
    }
    exprs
}

/// The dashboard's panels, with their queries, and its Prometheus data-source variable.
fn check_dashboard_shape(dashboard: &Value) -> Vec<String> {
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 39);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["name"] == "datasource"
        && v["type"] == "datasource"
        && v["query"] == "prometheus"));
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} is wider than the grid", panel["title"]);
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        exprs.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string()),
        );
    }
    exprs
}

/// Every family the rules and the dashboard use, as the daemon exposes it once it has
/// something to count (families appear at their first value).
const FAMILIES: &[&str] = &[
    "optout_observations_total",
    "optout_decisions_total",
    "optout_pushes_total",
    "optout_poll_errors_total",
    "optout_webhooks_total",
    "optout_outbox_depth",
    "optout_dead_letters",
    "optout_unverified_pushes",
    "optout_connector_alarm",
    "optout_cursor_lag_seconds",
    "optout_subjects",
    "optout_propagation_seconds_bucket",
    "optout_verification_seconds_bucket",
];

/// `/metrics` once every family has a value: a CRM opt-out pushed to the other CRM (and
/// read back), an automation webhook that cannot be reached (push errors), a HubSpot token
/// that is refused (an alarm), and one signed WhatsApp webhook.
async fn exposition_with_every_family(dir: &Path) -> String {
    let hubspot = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let salesforce =
        optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let hs_id = hubspot.create_contact(&[("firstname", "Ada"), ("phone", PHONE)]);
    salesforce.insert(
        "Contact",
        json!({"LastName": "Lovelace", "Phone": "(415) 555-2671", "WhatsApp_Opt_Out__c": false}),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = Config::new(dir)
        .whatsapp("app-secret")
        .hubspot(&hubspot.base_url())
        .salesforce(&salesforce.base_url())
        .automations(&format!("http://{closed}/hook"))
        // A second HubSpot account whose token is refused: an alarm.
        .set("refused", r#"kind = "hubspot""#)
        .set("refused", &format!("base_url = \"{}\"", hubspot.base_url()))
        .set("refused", r#"token = { env = "REFUSED_TOKEN" }"#)
        .env_var("REFUSED_TOKEN", "not-the-token");
    let mut d = common::start(dir, &config.toml(), &config.env()).await;
    d.until(
        "both working CRMs polled",
        Duration::from_secs(30),
        async || {
            (d.status().await.connectors.iter())
                .filter(|c| c.name == "hubspot" || c.name == "salesforce")
                .all(|c| c.last_poll_ok.is_some())
        },
    )
    .await;
    let now = optout_core::Timestamp::now();
    hubspot.edit_contact(
        &hs_id,
        &[
            ("whatsapp_consent", "opted_out"),
            ("whatsapp_consent_changed_at", &now.to_rfc3339()),
        ],
    );
    optout_whatsapp::fake::WebhookSender::new(d.url("/webhooks/whatsapp"), "app-secret")
        .deliver(b"{}")
        .await;
    let mut exposition = String::new();
    d.until(
        "every metric family exposed",
        Duration::from_secs(60),
        async || {
            exposition = reqwest::get(d.url("/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let names = exported_names(&exposition);
            FAMILIES.iter().all(|f| names.contains(*f))
        },
    )
    .await;
    assert!(d.terminate().await.success());
    exposition
}

/// The alert rules and the dashboard name only metrics the daemon's `/metrics` exposes, and
/// the dashboard covers what operators watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_name_only_exported_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let exposition = exposition_with_every_family(dir.path()).await;
    let exported = exported_names(&exposition);
    assert!(exported.contains("optout_pushes_total"), "{exported:?}");
    assert!(
        exported.contains("optout_propagation_seconds_bucket"),
        "{exported:?}"
    );

    let rules = rule_expressions(&std::fs::read_to_string(repo_file(RULES)).unwrap());
    assert!(rules.len() >= 8, "{rules:#?}");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file(DASHBOARD)).unwrap()).unwrap();
    let panels = check_dashboard_shape(&dashboard);

    for (file, exprs) in [(RULES, &rules), (DASHBOARD, &panels)] {
        for expr in exprs {
            for name in metric_names(expr) {
                assert!(
                    exported.contains(&name),
                    "{file}: {name} is not exported (in {expr})"
                );
            }
        }
    }
    let used: BTreeSet<String> = panels.iter().flat_map(|e| metric_names(e)).collect();
    for watched in [
        "optout_propagation_seconds_bucket",
        "optout_outbox_depth",
        "optout_pushes_total",
        "optout_decisions_total",
        "optout_webhooks_total",
        "optout_cursor_lag_seconds",
    ] {
        assert!(
            used.contains(watched),
            "the dashboard does not show {watched}"
        );
    }
}
