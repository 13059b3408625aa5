//! The store under hostile conditions, against the real binary: a full disk that is then
//! freed, descriptor exhaustion, a damaged store, a missing state directory, a careless
//! umask, and stray signals.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::sign;

const APP_SECRET: &str = "meta-app-secret-for-tests";
const BIN: &str = env!("CARGO_BIN_EXE_optout-sync");

fn now_s() -> i64 {
    optout_core::Timestamp::now().millis() / 1000
}

/// Starts the daemon like [`common::start`], through `wrapper` (a command that ends by
/// running its arguments), with `args` after `run`.
async fn start_wrapped(dir: &Path, config: &Config, wrapper: &[String], args: &[&str]) -> Daemon {
    let config_path = dir.join("optout-sync.toml");
    std::fs::write(&config_path, config.toml()).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.join("daemon-0.log");
    let mut cmd = tokio::process::Command::new(wrapper.first().map_or(BIN, |w| w.as_str()));
    cmd.args(wrapper.iter().skip(1));
    if !wrapper.is_empty() {
        cmd.arg(BIN);
    }
    cmd.arg("run")
        .args(args)
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("OPTOUT_SYNC_LOG", "info,optout_sync=debug")
        .env("OPTOUT_GATE_TOKEN", GATE_TOKEN)
        .envs(config.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    let mut d = Daemon {
        child: cmd.spawn().unwrap(),
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
            ready |= line == "READY=1";
            if let Some(rest) = line.strip_prefix("STATUS=running; listening on ") {
                d.addr = rest.to_string();
            }
        }
    }
    d
}

/// A wrapper that runs the daemon with a small tmpfs mounted on `state` in a mount
/// namespace of its own; `None` where mounting is not allowed.
fn on_tmpfs(state: &Path, size: &str) -> Option<Vec<String>> {
    let script =
        format!(r#"mount -t tmpfs -o size={size},mode=0700 tmpfs "$1" && shift && exec "$@""#);
    for userns in [&[][..], &["--map-root-user"][..]] {
        let mut wrapper: Vec<String> = ["unshare", "--mount", "--propagation", "private"]
            .iter()
            .chain(userns)
            .map(|s| s.to_string())
            .collect();
        wrapper.extend(["sh".into(), "-c".into(), script.clone(), "sh".into()]);
        wrapper.push(state.display().to_string());
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

async fn post_webhook(d: &Daemon, body: &[u8]) -> u16 {
    reqwest::Client::new()
        .post(d.url("/webhooks/whatsapp"))
        .header("Content-Type", "application/json")
        .header("X-Hub-Signature-256", sign(APP_SECRET, body))
        .body(body.to_vec())
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn get_status(d: &Daemon, path: &str) -> u16 {
    reqwest::Client::new()
        .get(d.url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn gate(d: &Daemon, phone: &str) -> Option<GateReply> {
    let r = reqwest::Client::new()
        .get(d.url(&format!("/v1/consent/{phone}?category=marketing")))
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// `optout-sync status` against the running daemon: exit code and output.
fn status_cli(d: &Daemon) -> (i32, String) {
    let o = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code().unwrap_or(-1), text)
}

/// Fills the file system of `path` until it refuses more.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_daemon_unready_and_it_recovers_when_space_returns() {
    if common::sled_only("it fills the file system of sled's state directory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = Config::new(dir.path())
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET);
    let Some(wrapper) = on_tmpfs(&state, "8m") else {
        eprintln!("skipped: mounting a tmpfs is not allowed here");
        return;
    };
    let mut d = start_wrapped(dir.path(), &config, &wrapper, &[]).await;
    let pid = d.child.id().unwrap();
    // The daemon's view of its state directory (its own mount namespace).
    let filler = PathBuf::from(format!("/proc/{pid}/root{}/filler", state.display()));
    let first = envelope::text(&Who::wa("14155550001"), "wamid.first", now_s(), "STOP");
    assert_eq!(post_webhook(&d, &first).await, 200);

    fill(&filler);
    // The next webhooks cannot be stored: 503, so Meta retries them.
    let mut refused = None;
    for i in 0..50 {
        let who = Who::wa(&format!("1415555{:04}", 100 + i));
        let body = envelope::text(&who, &format!("wamid.full.{i}"), now_s(), "STOP");
        if post_webhook(&d, &body).await == 503 {
            refused = Some((who, body));
            break;
        }
    }
    let (who, refused) = refused.expect("a webhook refused on a full disk");
    d.until("readyz answers 503", Duration::from_secs(10), async || {
        get_status(&d, "/readyz").await == 503
    })
    .await;
    let (code, text) = status_cli(&d);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("STORE ALARM"), "{text}");
    let metrics = reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("optout_store_healthy 0"), "{metrics}");
    assert_eq!(get_status(&d, "/healthz").await, 200);
    // It retries while the disk is still full, in vain.
    d.until(
        "a failed recovery attempt",
        Duration::from_secs(10),
        async || d.log_text().contains("the store still fails"),
    )
    .await;
    assert_eq!(get_status(&d, "/readyz").await, 503);

    std::fs::remove_file(&filler).unwrap();
    // Meta's retry is accepted once space is back, without a restart, and applied.
    d.until(
        "the retried webhook is stored",
        Duration::from_secs(30),
        async || post_webhook(&d, &refused).await == 200,
    )
    .await;
    d.until("readyz answers 200", Duration::from_secs(10), async || {
        get_status(&d, "/readyz").await == 200
    })
    .await;
    let phone = format!("+{}", who.wa_id.as_deref().unwrap());
    d.until("the STOP is applied", Duration::from_secs(30), async || {
        gate(&d, &phone)
            .await
            .is_some_and(|g| g.allowed == Some(false))
    })
    .await;
    let (code, text) = status_cli(&d);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("STORE ALARM"), "{text}");
    assert!(d.terminate().await.success());
}

/// Descriptors exhausted by idle connections: a large signed webhook is answered (stored,
/// or refused with 503 to be retried), the runtime keeps serving connections already open,
/// and SIGTERM ends the daemon within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_neither_freezes_the_runtime_nor_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    // Opening hundreds of connections against a full backlog can take longer than the
    // default header timeout, which would close the connection kept for the webhook.
    let config = Config::new(dir.path())
        .shutdown_timeout("5s")
        .set("daemon", "header_timeout = \"5m\"")
        .whatsapp(APP_SECRET)
        .set("whatsapp", "max_body_bytes = 2000000");
    let wrapper: Vec<String> = ["prlimit", "--nofile=300:300"].map(String::from).to_vec();
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit is not installed");
        return;
    }
    let mut d = start_wrapped(dir.path(), &config, &wrapper, &[]).await;
    let addr = d.addr.clone();
    // Two connections opened before the flood, kept alive.
    let mut hook = std::net::TcpStream::connect(&addr).unwrap();
    let mut health = std::net::TcpStream::connect(&addr).unwrap();
    for s in [&hook, &health] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    assert!(
        request(&mut health, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .starts_with("HTTP/1.1 200")
    );
    // More connections than the daemon's 300 descriptors could hold: it serves as many as
    // its connection limit allows (the limit minus a reserve for the store) and the rest
    // wait in the kernel's backlog; once that is full, connecting times out.
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let idle: Vec<_> = (0..400)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(200)).ok()
        })
        .collect();
    assert!(idle.len() > 250, "only {} idle connections", idle.len());

    let text = "STOP ".to_string() + &"x".repeat(900_000);
    let body = envelope::text(&Who::wa("14155550002"), "wamid.large", now_s(), &text);
    let head = format!(
        "POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        sign(APP_SECRET, &body),
        body.len()
    );
    hook.write_all(head.as_bytes()).unwrap();
    // A daemon that answers before reading the whole body (a refusal) closes the
    // connection: the answer is still there to read.
    let _ = hook.write_all(&body);
    let answer = read_head(&mut hook);
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 503"),
        "{answer}"
    );
    let started = std::time::Instant::now();
    let reply = request(&mut health, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let stopping = std::time::Instant::now();
    let status = d.terminate().await;
    assert!(status.success(), "{status:?}\n{}", d.log_text());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    drop(idle);
}

/// Sends `req` and returns the response head.
fn request(s: &mut std::net::TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).unwrap();
    read_head(s)
}

/// Reads one response (head and a Content-Length body) and returns its head.
fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = (head.lines())
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    head
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn store_config(dir: &Path, state: &Path) -> PathBuf {
    let path = dir.join("store.toml");
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

fn run_to_exit(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A damaged store: refused with exit code 65 (the unit does not restart on it), no panic
/// text, and its files as they were, on every attempt.
#[test]
fn a_damaged_store_is_refused_with_a_distinct_code_and_left_as_it_was() {
    if common::sled_only("it damages sled's log file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = store_config(dir.path(), &state);
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "phone,status,time\n+14155552671,opted_out,2024-05-01\n+14155552672,opted_out,2024-05-01\n",
    )
    .unwrap();
    let o = run_to_exit(
        Command::new(BIN)
            .args(["import", "--config"])
            .arg(&config)
            .arg(&csv),
    );
    assert!(o.status.success(), "{o:?}");
    // Garbage in the middle of sled's log.
    let log = state.join("db");
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 256].iter_mut().for_each(|b| *b = 0x5a);
    std::fs::write(&log, bytes).unwrap();
    let before = files(&state);
    for attempt in 0..2 {
        let o = run_to_exit(Command::new(BIN).args(["run", "--config"]).arg(&config));
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(65), "attempt {attempt}: {text}");
        assert!(text.contains("the store is corrupt"), "{text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(
            files(&state) == before,
            "attempt {attempt}: the store's files changed"
        );
    }
}

/// A missing state directory is refused (a typo must not start an empty store); the flag
/// creates it. Under umask 000 the store is still private: files 0600, directories 0700.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_state_dir_is_refused_unless_asked_and_the_store_is_private_under_any_umask() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new(dir.path())
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET);
    let state = dir.path().join("state");
    std::fs::remove_dir(&state).unwrap();
    let path = dir.path().join("optout-sync.toml");
    std::fs::write(&path, config.toml()).unwrap();
    let o = run_to_exit(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .envs(config.env())
            .env("OPTOUT_GATE_TOKEN", GATE_TOKEN),
    );
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("does not exist") && text.contains("--create-state-dir"),
        "{text}"
    );
    assert!(!state.exists(), "the refused start created the directory");

    let umask_000: Vec<String> = ["sh", "-c", "umask 000 && exec \"$@\"", "sh"]
        .map(String::from)
        .to_vec();
    let mut d = start_wrapped(dir.path(), &config, &umask_000, &["--create-state-dir"]).await;
    let body = envelope::text(&Who::wa("14155550003"), "wamid.private", now_s(), "STOP");
    assert_eq!(post_webhook(&d, &body).await, 200);
    assert!(d.terminate().await.success());
    if common::sled_only("the rest reads the modes of sled's files") {
        return;
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    let mut seen = 0;
    let mut stack = vec![state.clone()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let q = e.path();
            seen += 1;
            if q.is_dir() {
                assert_eq!(mode(&q), 0o700, "{}", q.display());
                stack.push(q);
            } else {
                assert_eq!(mode(&q), 0o600, "{}", q.display());
            }
        }
    }
    assert!(seen >= 3, "the store has files");
}

/// SIGUSR1, SIGUSR2 and SIGALRM are logged and ignored; SIGTERM still stops the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_signals_do_not_kill_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new(dir.path()).shutdown_timeout("5s");
    let mut d = common::start(dir.path(), &config.toml(), &config.env()).await;
    let pid = d.child.id().unwrap().to_string();
    for sig in ["USR1", "USR2", "ALRM"] {
        assert!(
            Command::new("kill")
                .args(["-s", sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
    d.until(
        "three signals logged",
        Duration::from_secs(10),
        async || d.log_text().matches("signal ignored").count() == 3,
    )
    .await;
    assert_eq!(get_status(&d, "/healthz").await, 200);
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");
    assert!(d.terminate().await.success());
}
