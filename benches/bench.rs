//! Benchmark harness: prints figures (latency percentiles, throughput, requests per batch,
//! memory, start-up time); it asserts nothing. BENCHMARKS.md holds the latest figures and
//! explains the method.
//!
//! ```sh
//! cargo bench --bench bench                       # every benchmark, full sizes (~6 min)
//! cargo bench --bench bench -- intake requests    # only the named benchmarks
//! cargo bench --bench bench -- --quick            # small sizes: seconds, for iterating
//! ```
//!
//! Benchmarks: `propagation`, `requests`, `intake`, `resync`, `store`, `gate`, `export`,
//! `failover` (in that order). `store` and `gate` need the store `resync` leaves behind;
//! selected without it they run `resync` first.
//!
//! Stores: `BENCH_STORES=sled,postgres` runs `propagation`, `intake`, `resync`, `store` and
//! `gate` once per store, one after the other, and ends with a table of their figures side
//! by side (default: `sled` only). PostgreSQL needs the admin URL of a server in `BENCH_PG`
//! (or `OPTOUT_TEST_PG`); every daemon directory gets a fresh database, dropped at the end.
//! `failover` (PostgreSQL only) kills the leader of two instances on one database, when the
//! daemon's `status` reports a leader. The others (and sled's raw ceiling) run on sled.
//!
//! Environment: `OPTOUT_BENCH_PEOPLE=10000000` (or `BENCH_RESYNC_N`) sets how many people
//! the resync builds the big store from, which `store` and `gate` then use (default
//! 1,000,000, or 20,000 with `--quick`; ten million takes the better part of an hour); `BENCH_PERF_DIR=/some/dir` attaches `perf record -g` to the
//! daemon during the resync, each intake level and each gate level and leaves `<name>.perf.data` there
//! (read with `perf report -i`), or only the recordings `BENCH_PERF_ONLY=gate-128,gate-batch-4`
//! names; `BENCH_DAEMON_ENV="MALLOC_ARENA_MAX=2"` adds environment
//! variables (space-separated `K=V`) to every daemon the harness starts;
//! `BENCH_PROP_POLL=1h` sets the CRMs' poll interval in the propagation benchmark (5 s).
//!
//! The daemon is the real release binary (`target/release/optout-sync`, built by cargo
//! for this bench) started as a child process with a generated configuration, exactly as
//! systemd would start it (READY=1 on a notify socket). The fakes of HubSpot, Salesforce
//! and the load generators run in this process, on 127.0.0.1. Seeded randomness: the same
//! customers, numbers and arrival times on every run.

#[path = "bench/hubstub.rs"]
mod hubstub;
#[path = "bench/stores.rs"]
mod stores;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use optout_core::Timestamp;
use optout_sync::report::{GateBatchReply, GateReply, StatusReport};
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::{Value, json};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_optout-sync");
const APP_SECRET: &str = "bench-meta-app-secret";
const GATE_TOKEN: &str = "bench-gate-token";
/// Production's default log level: the daemon logs every decision and push at `info`.
const LOG_LEVEL: &str = "info";

// ---------------------------------------------------------------------------------------
// Sizes and arguments

#[derive(Clone, Debug)]
struct Sizes {
    /// Opt-outs measured per propagation scenario, after `prop_warmup` unmeasured ones.
    prop_n: usize,
    prop_warmup: usize,
    /// Suppressions pushed per system in the request-count benchmark.
    requests_n: usize,
    /// Webhooks per concurrency level in the intake benchmark.
    intake_n: usize,
    intake_concurrency: Vec<usize>,
    /// Contacts in the bulk resync (indexed stand-in) and in the HubSpot fake itself.
    resync_n: usize,
    resync_fake_n: usize,
    /// Daemon restarts on the big store, and send-gate queries on it.
    store_restarts: usize,
    gate_queries: usize,
    /// Single gate lookups per concurrency level, and 1,000-id batch requests per level.
    gate_load: usize,
    gate_batches: usize,
    /// Audit entries exported through the running daemon (each imported row adds two).
    export_entries: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            prop_n: 1_000,
            prop_warmup: 50,
            requests_n: 10_000,
            intake_n: 20_000,
            intake_concurrency: vec![1, 16, 64],
            resync_n: 1_000_000,
            resync_fake_n: 100_000,
            store_restarts: 3,
            gate_queries: 2_000,
            gate_load: 60_000,
            gate_batches: 200,
            export_entries: 1_000_000,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            prop_n: 100,
            prop_warmup: 10,
            requests_n: 1_000,
            intake_n: 2_000,
            intake_concurrency: vec![1, 16, 64],
            resync_n: 20_000,
            resync_fake_n: 5_000,
            store_restarts: 2,
            gate_queries: 200,
            gate_load: 5_000,
            gate_batches: 20,
            export_entries: 40_000,
        }
    }
}

const ALL: [&str; 8] = [
    "propagation",
    "requests",
    "intake",
    "resync",
    "store",
    "gate",
    "export",
    "failover",
];

/// The benchmarks run once per store of `BENCH_STORES`; the others run on sled only.
const PER_STORE: [&str; 5] = ["propagation", "intake", "resync", "store", "gate"];

fn main() {
    if std::env::args().nth(1).as_deref() == Some(RAW_SLED_ARG) {
        raw_sled_child();
        return;
    }
    let mut quick = false;
    let mut selected: Vec<String> = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--quick" => quick = true,
            // cargo passes --bench to every bench executable.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench bench -- [--quick] [{}]",
                    ALL.join("|")
                );
                return;
            }
            name if ALL.contains(&name) => selected.push(name.to_string()),
            other => {
                eprintln!("unknown argument {other:?}; benchmarks: {}", ALL.join(", "));
                std::process::exit(2);
            }
        }
    }
    if selected.is_empty() {
        selected = ALL.iter().map(|s| s.to_string()).collect();
    }
    let mut sizes = if quick { Sizes::quick() } else { Sizes::full() };
    if let Some(n) = ["OPTOUT_BENCH_PEOPLE", "BENCH_RESYNC_N"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
    {
        sizes.resync_n = n;
    }
    let stores = stores::from_env().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    stores::init(&stores);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(selected, sizes, quick, &stores));
    stores::drop_all();
}

async fn run(selected: Vec<String>, sizes: Sizes, quick: bool, stores: &stores::Stores) {
    println!(
        "# optout-sync benchmarks{}\n",
        if quick { " (--quick sizes)" } else { "" }
    );
    machine();
    println!(
        "daemon binary: `{BIN}` (release build), run as a child process; fakes and load generators in the harness process; log level `{LOG_LEVEL}`"
    );
    let labels: Vec<&str> = stores.list.iter().map(|b| b.label()).collect();
    println!(
        "stores: {} (`{}` run once per store)",
        labels.join(", "),
        PER_STORE.join("`, `")
    );
    if stores.list.contains(&stores::Backend::Postgres) {
        println!(
            "PostgreSQL: {}; a fresh database per daemon directory",
            stores::server_summary()
        );
    }
    if let Ok(extra) = std::env::var("BENCH_DAEMON_ENV") {
        println!("daemon environment added: `{extra}`");
    }
    println!();
    let mut big_stores: Vec<(stores::Backend, BigStore)> = Vec::new();
    for name in ALL {
        if !selected.iter().any(|s| s == name) {
            continue;
        }
        let backends = if PER_STORE.contains(&name) {
            stores.list.clone()
        } else {
            vec![stores::Backend::Sled]
        };
        for backend in backends {
            stores::set_current(backend);
            let started = Instant::now();
            run_one(name, &sizes, &mut big_stores, stores).await;
            println!(
                "_{name}{} took {:.0} s; load average at its end: {}_\n",
                suffix(),
                started.elapsed().as_secs_f64(),
                loadavg()
            );
        }
        stores::set_current(stores::Backend::Sled);
    }
    stores::print_side_by_side(&stores.list);
}

/// One benchmark on the current backend.
async fn run_one(
    name: &str,
    sizes: &Sizes,
    big_stores: &mut Vec<(stores::Backend, BigStore)>,
    stores: &stores::Stores,
) {
    let backend = stores::current();
    match name {
        "propagation" => propagation(sizes).await,
        "requests" => requests(sizes).await,
        "intake" => intake(sizes).await,
        "export" => export_bench(sizes).await,
        "failover" => failover(stores).await,
        "resync" => {
            big_stores.retain(|(b, _)| *b != backend);
            big_stores.push((backend, resync(sizes).await));
        }
        "store" | "gate" => {
            if !big_stores.iter().any(|(b, _)| *b == backend)
                && backend == stores::Backend::Sled
                && let Some(kept) = kept_store(sizes).await
            {
                big_stores.push((backend, kept));
            }
            if !big_stores.iter().any(|(b, _)| *b == backend) {
                println!(
                    "(`{name}` needs the store a bulk resync leaves: running `resync` first)\n"
                );
                big_stores.push((backend, resync(sizes).await));
            }
            let store = &big_stores
                .iter()
                .find(|(b, _)| *b == backend)
                .expect("a big store")
                .1;
            if name == "store" {
                store_bench(sizes, store).await;
            } else {
                gate_bench(sizes, store).await;
                gate_baseline(sizes, store).await;
            }
        }
        _ => unreachable!(),
    }
}

/// ` (sled)` or ` (PostgreSQL)` after a title, when the run compares stores or is not on
/// sled; nothing otherwise (the titles stay as they were).
fn suffix() -> String {
    static MULTI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let multi =
        *MULTI.get_or_init(|| stores::from_env().is_ok_and(|s| s.list != [stores::Backend::Sled]));
    match (multi, stores::current()) {
        (false, _) => String::new(),
        (true, stores::Backend::Sled) => " — sled".into(),
        (true, stores::Backend::Postgres) => " — PostgreSQL".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Machine and process figures

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("?")
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cmd = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let rustc = cmd("rustc", &["--version"]);
    let commit = cmd("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = cmd(
        "git",
        &[
            "status",
            "--porcelain",
            "--",
            "src",
            "connectors",
            "Cargo.toml",
        ],
    );
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("| machine | |\n|---|---|");
    println!(
        "| date (UTC) | {} |",
        chrono::Utc::now().format("%Y-%m-%d %H:%M")
    );
    println!("| CPUs (nproc) | {cpus} |");
    println!("| CPU model | {model} |");
    println!("| memory | {mem} |");
    println!("| kernel | {kernel} |");
    println!("| rustc | {rustc} |");
    println!(
        "| commit | {commit}{} |",
        if dirty.is_empty() {
            ""
        } else {
            " (with uncommitted changes to the product)"
        }
    );
    println!("| load average at start | {} |\n", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn header(title: &str, what: &str) {
    println!("## {title}{}\n", suffix());
    println!("load average at start: {}\n", loadavg());
    println!("{what}\n");
}

/// A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in MiB.
fn proc_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// User + system CPU seconds a process has used (clock ticks are 1/100 s on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn dir_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

// ---------------------------------------------------------------------------------------
// Statistics and output

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// `[n, p50, p90, p99, max]` of latencies in milliseconds.
fn dist_row(label: &str, v: Vec<f64>) -> Vec<String> {
    let s = sorted(v);
    vec![
        label.to_string(),
        s.len().to_string(),
        format!("{:.1}", pct(&s, 50.0)),
        format!("{:.1}", pct(&s, 90.0)),
        format!("{:.1}", pct(&s, 99.0)),
        format!("{:.1}", s.last().copied().unwrap_or(f64::NAN)),
    ]
}

fn table(headers: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", headers.join(" | "));
    println!(
        "|{}|",
        headers.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
    println!();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A small seeded generator (splitmix64): the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Customers: distinct, valid US numbers written the way each system writes them

const AREAS: [u16; 12] = [212, 213, 305, 312, 415, 510, 617, 646, 702, 718, 917, 206];

/// Customer `i` of a population (`offset` separates populations of one run).
#[derive(Clone, Debug)]
struct Customer {
    area: u16,
    exchange: u16,
    line: u16,
}

impl Customer {
    fn new(i: usize) -> Customer {
        let j = i / AREAS.len();
        Customer {
            area: AREAS[i % AREAS.len()],
            exchange: 201 + (j / 10_000) as u16 * 3 % 700,
            line: (j % 10_000) as u16,
        }
    }

    /// As an agent typed it in HubSpot.
    fn hubspot(&self) -> String {
        format!("+1 {}-{}-{:04}", self.area, self.exchange, self.line)
    }

    /// As it sits in Salesforce: national format, no country code.
    fn salesforce(&self) -> String {
        format!("({}) {}-{:04}", self.area, self.exchange, self.line)
    }

    /// WhatsApp's `wa_id`.
    fn wa_id(&self) -> String {
        format!("1{}{}{:04}", self.area, self.exchange, self.line)
    }
}

/// Every generated number must be one the daemon accepts, or the figures mean nothing.
fn check_customers(range: std::ops::Range<usize>) {
    let n = optout_sync::identity::Normalizer::new(
        optout_sync::identity::Normalizer::parse_region("US").expect("US"),
    );
    let step = (range.len() / 500).max(1);
    let mut seen = std::collections::HashSet::new();
    for i in range.step_by(step) {
        let c = Customer::new(i);
        let a = n.phone(&c.hubspot()).expect("valid generated number");
        let b = n.phone(&c.salesforce()).expect("valid generated number");
        assert_eq!(a, b, "one number in two formats");
        assert!(seen.insert(a), "distinct numbers");
    }
}

// ---------------------------------------------------------------------------------------
// The daemon as a child process

struct Daemon {
    child: Child,
    pid: u32,
    notify: UnixDatagram,
    addr: String,
    socket: PathBuf,
    log: PathBuf,
    /// Spawn to READY=1.
    ready_after: Duration,
}

static SPAWNS: AtomicUsize = AtomicUsize::new(0);

fn env_vars() -> Vec<(&'static str, String)> {
    vec![
        ("OPTOUT_GATE_TOKEN", GATE_TOKEN.into()),
        ("OPTOUT_SYNC_LOG", LOG_LEVEL.into()),
        ("WA_APP_SECRET", APP_SECRET.into()),
        ("WA_VERIFY", "bench-verify".into()),
        ("HS_TOKEN", optout_hubspot::fake::TOKEN.into()),
        ("SF_SECRET", "fake-client-secret".into()),
    ]
}

/// Another daemon binary to start instead of [`BIN`] (the gate's A/B comparison).
static DAEMON_BIN: Mutex<Option<String>> = Mutex::new(None);

/// With `BENCH_GATE_BASELINE_BIN=<another build of the daemon>`, the gate benchmark again
/// on the same store with that binary: a before/after at the same size and load.
async fn gate_baseline(sizes: &Sizes, big: &BigStore) {
    let Ok(bin) = std::env::var("BENCH_GATE_BASELINE_BIN") else {
        return;
    };
    println!("(the gate benchmark again with the baseline binary `{bin}`)\n");
    *DAEMON_BIN.lock().expect("bin") = Some(bin);
    gate_bench(sizes, big).await;
    *DAEMON_BIN.lock().expect("bin") = None;
}

/// Writes `config` in `dir` and starts the daemon; returns at READY=1.
async fn spawn_daemon(dir: &Path, config: &str) -> Daemon {
    let n = SPAWNS.fetch_add(1, Ordering::Relaxed);
    let config_path = dir.join("optout-sync.toml");
    std::fs::write(&config_path, config).expect("write config");
    let notify_path = dir.join(format!("notify-{n}.sock"));
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let log = dir.join(format!("daemon-{n}.log"));
    let bin = (DAEMON_BIN.lock().expect("bin").clone()).unwrap_or_else(|| BIN.to_string());
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--create-state-dir")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .envs(env_vars())
        .envs(
            std::env::var("BENCH_DAEMON_ENV")
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|kv| kv.split_once('=')),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true);
    let spawned = Instant::now();
    let child = cmd.spawn().expect("spawn optout-sync");
    let pid = child.id().expect("pid");
    let mut d = Daemon {
        child,
        pid,
        notify,
        addr: String::new(),
        socket: dir.join("control.sock"),
        log,
        ready_after: Duration::ZERO,
    };
    let mut ready = false;
    let mut buf = vec![0u8; 4096];
    while !ready || d.addr.is_empty() {
        let got = tokio::time::timeout(Duration::from_secs(300), d.notify.recv(&mut buf)).await;
        let Ok(Ok(len)) = got else {
            panic!("the daemon did not get ready; log:\n{}", d.log_tail());
        };
        for line in String::from_utf8_lossy(&buf[..len]).lines() {
            if line == "READY=1" {
                ready = true;
                d.ready_after = spawned.elapsed();
            }
            if let Some(rest) = line.strip_prefix("STATUS=running; listening on ") {
                d.addr = rest.to_string();
            }
        }
    }
    d
}

impl Daemon {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn rss(&self) -> f64 {
        proc_mib(self.pid, "VmRSS:")
    }

    fn hwm(&self) -> f64 {
        proc_mib(self.pid, "VmHWM:")
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.pid)
    }

    async fn status(&self) -> StatusReport {
        optout_sync::control::status(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("status: {e}; log:\n{}", self.log_tail()))
    }

    async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Waits (polling every 100 ms) until every named connector finished a poll.
    async fn synced(&self, names: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status().await;
            let done = names
                .iter()
                .all(|n| s.connector(n).is_some_and(|c| c.last_poll_ok.is_some()));
            if done {
                return;
            }
            if Instant::now() > deadline {
                panic!("first sync not done: {s:?}\nlog:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM; returns how long the daemon took to exit.
    async fn terminate(mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: kill(2) on our own child with a valid signal number.
        unsafe { kill(self.pid as i32, 15) };
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the daemon stops")
            .expect("exit status");
        if !status.success() {
            println!(
                "(daemon exited with {status}; log tail:\n{}\n)",
                self.log_tail()
            );
        }
        t.elapsed()
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// `perf record -g` attached to a process while it lives, when `BENCH_PERF_DIR` is set.
struct Perf(Option<std::process::Child>);

fn perf_attach(pid: u32, name: &str) -> Perf {
    let Ok(dir) = std::env::var("BENCH_PERF_DIR") else {
        return Perf(None);
    };
    // Only the named recordings, when given: the others' figures stay free of perf.
    if let Ok(only) = std::env::var("BENCH_PERF_ONLY")
        && !only.split(',').any(|n| n.trim() == name)
    {
        return Perf(None);
    }
    let out = Path::new(&dir).join(format!("{name}.perf.data"));
    let child = std::process::Command::new("perf")
        .args([
            "record",
            "-F",
            "199",
            "--call-graph",
            "dwarf,16384",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            println!("(perf recording the daemon into {})\n", out.display());
            Perf(Some(c))
        }
        Err(e) => {
            println!("(perf not available: {e})\n");
            Perf(None)
        }
    }
}

impl Perf {
    fn stop(self) {
        if let Some(mut c) = self.0 {
            // SAFETY: SIGINT to our own child; perf writes its file and exits.
            unsafe { kill(c.id() as i32, 2) };
            let _ = c.wait();
        }
    }
}

/// Sum of every sample of a metric family whose labels contain `labels`.
fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many of these customers the send gate does NOT block (1,000 per batch request).
async fn not_blocked(d: &Daemon, customers: impl Iterator<Item = usize>) -> usize {
    let client = reqwest::Client::new();
    let ids: Vec<String> = customers
        .map(|i| format!("+{}", Customer::new(i).wa_id()))
        .collect();
    let mut open = 0;
    for chunk in ids.chunks(1000) {
        let v: GateBatchReply = client
            .post(d.url("/v1/consent/batch"))
            .bearer_auth(GATE_TOKEN)
            .json(&json!({ "category": "marketing", "ids": chunk }))
            .send()
            .await
            .expect("gate batch")
            .json()
            .await
            .expect("gate batch json");
        open += v
            .results
            .iter()
            .filter(|x| x.allowed != Some(false))
            .count();
    }
    open
}

fn daemon_section(dir: &Path) -> String {
    format!(
        r#"[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
control_socket = "{sock}"
gate_token = {{ env = "OPTOUT_GATE_TOKEN" }}
shutdown_timeout = "20s"
"#,
        state = dir.join("state").display(),
        sock = dir.join("control.sock").display(),
    ) + &stores::store_table(dir)
}

fn whatsapp_section() -> String {
    r#"
[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{ env = "WA_APP_SECRET" }]
verify_token = { env = "WA_VERIFY" }
"#
    .to_string()
}

/// The daemon's client-side limiter is opened wide: these runs measure the daemon, not
/// HubSpot's published limits (which would cap a 1M resync at 5 searches a second).
fn hubspot_section(base: &str, poll: &str) -> String {
    format!(
        r#"
[connectors.hubspot]
kind = "hubspot"
poll_interval = "{poll}"
base_url = "{base}"
token = {{ env = "HS_TOKEN" }}
requests_per_10s = 1000000
search_per_second = 1000
"#
    )
}

fn salesforce_section(base: &str, poll: &str) -> String {
    format!(
        r#"
[connectors.salesforce]
kind = "salesforce"
poll_interval = "{poll}"
login_url = "{base}"
auth = {{ flow = "client_credentials", client_id = "fake-client-id", client_secret = {{ env = "SF_SECRET" }} }}
"#
    )
}

// ---------------------------------------------------------------------------------------
// The two CRM fakes seeded with one record per customer

struct Crms {
    hubspot: Arc<optout_hubspot::fake::FakeHandle>,
    salesforce: Arc<optout_salesforce::fake::FakeHandle>,
    /// Per customer: (HubSpot contact id, Salesforce Contact id).
    ids: Vec<(String, String)>,
}

async fn crms(n: usize) -> Crms {
    use optout_hubspot::fake as hf;
    let hubspot = hf::start(hf::FakeOptions {
        limits: hf::Limits::off(),
        ..Default::default()
    })
    .await;
    let salesforce = optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions {
        api_limit: 1_000_000_000,
        ..Default::default()
    })
    .await;
    let customers: Vec<Customer> = (0..n).map(Customer::new).collect();
    let hs_ids = hubspot.create_contacts(customers.iter().enumerate().map(|(i, c)| {
        hf::NewContact::new()
            .with("firstname", &format!("Customer{i}"))
            .with("phone", &c.hubspot())
    }));
    let ids = customers
        .iter()
        .zip(hs_ids)
        .enumerate()
        .map(|(i, (c, hs))| {
            let sf = salesforce.insert(
                "Contact",
                json!({"LastName": format!("Customer{i}"), "Phone": c.salesforce()}),
            );
            (hs, sf)
        })
        .collect();
    Crms {
        hubspot: Arc::new(hubspot),
        salesforce: Arc::new(salesforce),
        ids,
    }
}

impl Crms {
    fn hs_opted_out(&self, id: &str) -> bool {
        self.hubspot.property(id, "whatsapp_consent").as_deref() == Some("opted_out")
    }

    fn sf_opted_out(&self, id: &str) -> bool {
        self.salesforce
            .get(id)
            .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
    }

    /// WhatsApp + HubSpot + Salesforce; `push` is extra TOML for both CRMs' tables (their
    /// push settings, `push_linger = "0s"`).
    fn config(&self, dir: &Path, poll: &str, push: Option<&str>) -> String {
        let extra = push.map(|l| format!("{l}\n")).unwrap_or_default();
        format!(
            "{}{}{}{extra}{}{extra}",
            daemon_section(dir),
            whatsapp_section(),
            hubspot_section(&self.hubspot.base_url(), poll),
            salesforce_section(&self.salesforce.base_url(), poll)
        )
    }
}

fn stop_body(c: &Customer, message_id: &str) -> Vec<u8> {
    envelope::text(
        &Who::wa(&c.wa_id()),
        message_id,
        Timestamp::now().millis() / 1000,
        "STOP",
    )
}

// ---------------------------------------------------------------------------------------
// 1. Propagation latency

#[derive(Clone, Default)]
struct Track {
    sent: Option<Instant>,
    ack: Option<Instant>,
    acked_ok: bool,
    hs: Option<Instant>,
    sf: Option<Instant>,
}

async fn propagation(sizes: &Sizes) {
    header(
        "1. Opt-out propagation latency",
        &format!(
            "A signed WhatsApp STOP webhook per customer, one every 10–20 ms (seeded uniform), each a different customer whose number is on a HubSpot contact and a Salesforce Contact. Latency from just before the webhook is sent until the HubSpot fake's `whatsapp_consent` and the Salesforce fake's `WhatsApp_Opt_Out__c` show the opt-out, watched every 1 ms from a dedicated thread. {} measured opt-outs after {} unmeasured warm-up ones. Daemon: real binary, WhatsApp + HubSpot + Salesforce connectors, CRM polls every {}, default `push_linger` (10 ms). Times in ms.",
            sizes.prop_n,
            sizes.prop_warmup,
            std::env::var("BENCH_PROP_POLL").unwrap_or_else(|_| "5s".into())
        ),
    );
    for (label, delay, linger) in [
        ("fakes answer at once", Duration::ZERO, None),
        ("fakes answer after 80 ms", Duration::from_millis(80), None),
        (
            "fakes answer at once, `push_linger = \"0s\"` (where the floor comes from)",
            Duration::ZERO,
            Some("push_linger = \"0s\""),
        ),
    ] {
        let rows = propagation_run(sizes, delay, linger).await;
        let short = match (delay.is_zero(), linger.is_some()) {
            (true, false) => "fakes at once",
            (false, _) => "fakes after 80 ms",
            (true, true) => "fakes at once, linger 0",
        };
        for (row, what) in [
            (&rows.0[0], "webhook 200"),
            (&rows.0[3], "both CRMs confirmed"),
        ] {
            stores::record(
                "propagation",
                &format!("{short}: {what} p50 / p99 ms"),
                format!("{} / {}", row[2], row[4]),
            );
        }
        println!("### {label}\n");
        table(&["latency (ms)", "n", "p50", "p90", "p99", "max"], &rows.0);
        println!("{}\n", rows.1);
    }
}

/// Returns (table rows, notes).
async fn propagation_run(
    sizes: &Sizes,
    delay: Duration,
    linger: Option<&str>,
) -> (Vec<Vec<String>>, String) {
    let total = sizes.prop_warmup + sizes.prop_n;
    check_customers(0..total);
    let crms = crms(total).await;
    if !delay.is_zero() {
        crms.hubspot.set_faults(optout_hubspot::fake::Faults {
            slow_rate: 1.0,
            slow_by: delay,
            ..Default::default()
        });
        crms.salesforce.set_faults(optout_salesforce::fake::Faults {
            slow_rate: 1.0,
            slow_delay: delay,
            ..Default::default()
        });
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // `BENCH_PROP_POLL=1h` leaves the CRM polls out of the measured window (they run every
    // 5 s by default, as in production, and read back what the pushes changed).
    let poll = std::env::var("BENCH_PROP_POLL").unwrap_or_else(|_| "5s".into());
    let d = spawn_daemon(dir.path(), &crms.config(dir.path(), &poll, linger)).await;
    d.synced(&["hubspot", "salesforce"], Duration::from_secs(120))
        .await;

    let mut rng = Rng(0x0b70_u64.wrapping_add(delay.as_millis() as u64));
    let mut order: Vec<usize> = (0..total).collect();
    rng.shuffle(&mut order);
    let tracks = Arc::new(Mutex::new(vec![Track::default(); total]));
    let stop = Arc::new(AtomicBool::new(false));

    // The watcher: every 1 ms, checks the customers sent and not yet confirmed.
    let watcher = {
        let tracks = tracks.clone();
        let stop = stop.clone();
        let hubspot = crms.hubspot.clone();
        let salesforce = crms.salesforce.clone();
        let ids: Vec<(String, String)> = order.iter().map(|&i| crms.ids[i].clone()).collect();
        std::thread::spawn(move || {
            let mut checks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pending: Vec<(usize, bool, bool)> = tracks
                    .lock()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.sent.is_some() && (t.hs.is_none() || t.sf.is_none()))
                    .map(|(k, t)| (k, t.hs.is_none(), t.sf.is_none()))
                    .collect();
                let mut seen = Vec::new();
                for (k, need_hs, need_sf) in pending {
                    let (hs_id, sf_id) = &ids[k];
                    let hs = need_hs
                        && hubspot.property(hs_id, "whatsapp_consent").as_deref()
                            == Some("opted_out");
                    let sf = need_sf
                        && salesforce
                            .get(sf_id)
                            .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true));
                    if hs || sf {
                        seen.push((k, hs, sf, Instant::now()));
                    }
                }
                {
                    let mut t = tracks.lock().unwrap();
                    for (k, hs, sf, at) in seen {
                        if hs {
                            t[k].hs = Some(at);
                        }
                        if sf {
                            t[k].sf = Some(at);
                        }
                    }
                }
                checks += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            checks
        })
    };

    let sender = Arc::new(
        optout_whatsapp::fake::WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET)
            .with_retries(1, Duration::from_millis(10)),
    );
    let cpu0 = d.cpu();
    let started = tokio::time::Instant::now();
    let mut at = started;
    let mut sends = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        tokio::time::sleep_until(at).await;
        at += Duration::from_micros(10_000 + rng.below(10_001));
        let tracks = tracks.clone();
        let sender = sender.clone();
        sends.push(tokio::spawn(async move {
            // Built at send time: Meta stamps the message when the customer sends it.
            let body = stop_body(&Customer::new(i), &format!("wamid.prop{i}"));
            tracks.lock().unwrap()[k].sent = Some(Instant::now());
            let delivery = sender.deliver(&body).await;
            let mut t = tracks.lock().unwrap();
            t[k].ack = Some(Instant::now());
            t[k].acked_ok = delivery.delivered;
        }));
    }
    let send_secs = started.elapsed().as_secs_f64();
    for s in sends {
        let _ = s.await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = tracks
            .lock()
            .unwrap()
            .iter()
            .all(|t| t.hs.is_some() && t.sf.is_some());
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let checks = watcher.join().expect("watcher");
    let daemon_cpu = d.cpu() - cpu0;
    let metrics = d.metrics().await;
    let rss = d.rss();
    d.terminate().await;

    let t = tracks.lock().unwrap().clone();
    let measured = &t[sizes.prop_warmup..];
    let lat = |f: &dyn Fn(&Track) -> Option<Instant>| -> Vec<f64> {
        measured
            .iter()
            .filter_map(|x| Some(ms(f(x)?.duration_since(x.sent?))))
            .collect()
    };
    let both = lat(&|x| Some(x.hs?.max(x.sf?)));
    let rows = vec![
        dist_row("webhook acknowledged (200)", lat(&|x| x.ack)),
        dist_row("HubSpot contact shows opted_out", lat(&|x| x.hs)),
        dist_row("Salesforce Contact shows opted out", lat(&|x| x.sf)),
        dist_row("**both CRMs confirmed**", both),
    ];
    let unconfirmed = measured
        .iter()
        .filter(|x| x.hs.is_none() || x.sf.is_none())
        .count();
    let refused = t.iter().filter(|x| !x.acked_ok).count();
    let mean = |c: &str| {
        let sum = metric_sum(&metrics, "optout_propagation_seconds_sum", c);
        let n = metric_sum(&metrics, "optout_propagation_seconds_count", c);
        sum / n * 1000.0
    };
    let notes = format!(
        "sent {total} over {send_secs:.1} s; not confirmed within 120 s: {unconfirmed}; webhooks not acknowledged: {refused}; watcher passes: {checks}; daemon CPU during the run: {daemon_cpu:.1} s; daemon RSS at the end: {rss:.0} MiB; the daemon's own `optout_propagation_seconds` mean (event time, 1 s resolution, → push done): HubSpot {:.0} ms, Salesforce {:.0} ms",
        mean("connector=\"hubspot\""),
        mean("connector=\"salesforce\""),
    );
    (rows, notes)
}

// ---------------------------------------------------------------------------------------
// 2. Requests per 10,000 pushed suppressions

async fn requests(sizes: &Sizes) {
    let n = sizes.requests_n;
    header(
        &format!("2. Requests per {n} pushed suppressions"),
        &format!(
            "Each scenario seeds fresh fakes and a fresh daemon (WhatsApp + HubSpot + Salesforce, polls every 5 s, HubSpot `batch_size` 100, Salesforce `batch_size` 200). Counters are reset after the first sync; the run ends when every targeted record shows the opt-out. Minimum: {} HubSpot batch updates (100 per request), {} Salesforce collections requests (200 per request).",
            n.div_ceil(100),
            n.div_ceil(200)
        ),
    );
    let mut rows = Vec::new();
    rows.extend(requests_webhooks(n, None).await);
    rows.extend(requests_webhooks(n, Some("push_max_linger = \"10ms\"")).await);
    rows.extend(requests_agents(n).await);
    table(
        &[
            "scenario",
            "system",
            "push requests",
            "minimum",
            "over minimum",
            "records pushed",
            "poll requests",
            "time to the last confirmation",
        ],
        &rows,
    );
}

fn over(count: u64, min: usize) -> String {
    format!("{:+.1} %", (count as f64 / min as f64 - 1.0) * 100.0)
}

/// Polls `remaining` (which drops what is done) every 200 ms until it is empty or has not
/// shrunk for `stalled`.
async fn wait_all(what: &str, stalled: Duration, mut remaining: impl FnMut() -> usize) {
    let mut last = (usize::MAX, Instant::now());
    loop {
        let left = remaining();
        if left == 0 {
            return;
        }
        if left < last.0 {
            last = (left, Instant::now());
        } else if last.1.elapsed() > stalled {
            println!(
                "(gave up waiting for: {what}; {left} left, none done for {} s)",
                stalled.as_secs()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// n STOP webhooks, 16 at a time: both CRMs get n suppressions.
async fn requests_webhooks(n: usize, linger: Option<&str>) -> Vec<Vec<String>> {
    check_customers(0..n);
    let crms = crms(n).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let d = spawn_daemon(dir.path(), &crms.config(dir.path(), "5s", linger)).await;
    d.synced(&["hubspot", "salesforce"], Duration::from_secs(300))
        .await;
    crms.hubspot.reset_counts();
    crms.salesforce.reset_counters();
    let t = Instant::now();
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| stop_body(&Customer::new(i), &format!("wamid.req{i}")))
        .collect();
    let acks = load(&d.url("/webhooks/whatsapp"), bodies, 16).await;
    let sent_secs = t.elapsed().as_secs_f64();
    let mut remaining: Vec<usize> = (0..n).collect();
    // Counters as of the last confirmation: polls while waiting on a lost one don't count.
    let mut done_at = Instant::now();
    let mut hc = crms.hubspot.counts();
    let mut sc = crms.salesforce.counters();
    wait_all("every record suppressed", Duration::from_secs(30), || {
        let before = remaining.len();
        remaining.retain(|&i| {
            let (hs, sf) = &crms.ids[i];
            !(crms.hs_opted_out(hs) && crms.sf_opted_out(sf))
        });
        if remaining.len() < before {
            done_at = Instant::now();
            hc = crms.hubspot.counts();
            sc = crms.salesforce.counters();
        }
        remaining.len()
    })
    .await;
    let all = done_at - t;
    d.terminate().await;
    let label = format!(
        "{n} WhatsApp STOPs, {} (16 concurrent senders; all acknowledged in {sent_secs:.1} s, {} not 200; {} customers never suppressed)",
        linger.map_or(
            "default `push_linger` 10 ms, `push_max_linger` 250 ms".into(),
            |l| format!("`{l}`: no burst hold")
        ),
        acks.iter().filter(|a| a.1 != 200).count(),
        remaining.len()
    );
    vec![
        vec![
            label.clone(),
            "HubSpot".into(),
            hc.batch_update.to_string(),
            n.div_ceil(100).to_string(),
            over(hc.batch_update, n.div_ceil(100)),
            "—".into(),
            format!("{} searches", hc.search),
            format!("{:.1} s", all.as_secs_f64()),
        ],
        vec![
            label,
            "Salesforce".into(),
            sc.collections.to_string(),
            n.div_ceil(200).to_string(),
            over(sc.collections, n.div_ceil(200)),
            sc.collection_records.to_string(),
            format!("{} queries + {} query-more", sc.query, sc.query_more),
            format!("{:.1} s", all.as_secs_f64()),
        ],
    ]
}

/// Agents record n opt-outs in HubSpot (pushed to Salesforce) and n others in Salesforce
/// (pushed to HubSpot), all at once.
async fn requests_agents(n: usize) -> Vec<Vec<String>> {
    let linger = None;
    check_customers(0..2 * n);
    let crms = crms(2 * n).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let d = spawn_daemon(dir.path(), &crms.config(dir.path(), "5s", linger)).await;
    d.synced(&["hubspot", "salesforce"], Duration::from_secs(300))
        .await;
    crms.hubspot.reset_counts();
    crms.salesforce.reset_counters();
    let t = Instant::now();
    let now = Timestamp::now().to_rfc3339();
    for (hs, _) in &crms.ids[..n] {
        crms.hubspot.edit_contact(
            hs,
            &[
                ("whatsapp_consent", "opted_out"),
                ("whatsapp_consent_changed_at", &now),
            ],
        );
    }
    for (_, sf) in &crms.ids[n..] {
        crms.salesforce.update(
            sf,
            json!({"WhatsApp_Opt_Out__c": true, "WhatsApp_Consent_Changed_At__c": now}),
        );
    }
    let mut remaining: Vec<usize> = (0..2 * n).collect();
    let mut done_at = Instant::now();
    wait_all("every record suppressed", Duration::from_secs(60), || {
        let before = remaining.len();
        remaining.retain(|&i| {
            let (hs, sf) = &crms.ids[i];
            !(crms.hs_opted_out(hs) && crms.sf_opted_out(sf))
        });
        if remaining.len() < before {
            done_at = Instant::now();
        }
        remaining.len()
    })
    .await;
    let all = done_at - t;
    let hc = crms.hubspot.counts();
    let sc = crms.salesforce.counters();
    d.terminate().await;
    vec![
        vec![
            format!("{n} agent edits in Salesforce → HubSpot"),
            "HubSpot".into(),
            hc.batch_update.to_string(),
            n.div_ceil(100).to_string(),
            over(hc.batch_update, n.div_ceil(100)),
            "—".into(),
            format!("{} searches", hc.search),
            format!("{:.1} s", all.as_secs_f64()),
        ],
        vec![
            format!("{n} agent edits in HubSpot → Salesforce"),
            "Salesforce".into(),
            sc.collections.to_string(),
            n.div_ceil(200).to_string(),
            over(sc.collections, n.div_ceil(200)),
            sc.collection_records.to_string(),
            format!("{} queries + {} query-more", sc.query, sc.query_more),
            format!("{:.1} s", all.as_secs_f64()),
        ],
    ]
}

// ---------------------------------------------------------------------------------------
// Load generator: signed webhooks over N keep-alive connections

/// Posts every body (pre-signed) with `concurrency` workers; returns (latency, status) per
/// body, in completion order. Status 0 is a transport error.
async fn load(url: &str, bodies: Vec<Vec<u8>>, concurrency: usize) -> Vec<(Duration, u16)> {
    let signed: Arc<Vec<(bytes::Bytes, String)>> = Arc::new(
        bodies
            .into_iter()
            .map(|b| {
                let sig = optout_whatsapp::fake::sign(APP_SECRET, &b);
                (bytes::Bytes::from(b), sig)
            })
            .collect(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, next, signed, url) = (
            client.clone(),
            next.clone(),
            signed.clone(),
            url.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, sig)) = signed.get(i) else {
                    return out;
                };
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", sig)
                    .body(body.clone())
                    .send()
                    .await;
                let status = match r {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                out.push((t.elapsed(), status));
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("load worker"));
    }
    all
}

// ---------------------------------------------------------------------------------------
// 4. Webhook intake

async fn intake(sizes: &Sizes) {
    header(
        "4. Webhook intake",
        &format!(
            "Signed STOP webhooks (each a different customer, ~600 bytes) posted over keep-alive HTTP/1.1 connections by a reqwest load generator in the harness (bodies signed beforehand), {} per concurrency level, to a daemon with only the WhatsApp connector (no CRM pushes). A 200 means the body is flushed to disk. \"applied\" is until the daemon has also read every body back and recorded the decisions (its inbox empty again). Generator and daemon share the machine's CPUs.",
            sizes.intake_n
        ),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!("{}{}", daemon_section(dir.path()), whatsapp_section());
    let d = spawn_daemon(dir.path(), &config).await;
    let db = stores::database_of(dir.path());
    let mut pg_notes = Vec::new();
    let mut pg_before = pg_settled(db.as_deref()).await;
    let mut rows = Vec::new();
    let mut offset = 0usize;
    for &c in &sizes.intake_concurrency {
        let n = sizes.intake_n;
        let bodies: Vec<Vec<u8>> = (offset..offset + n)
            .map(|i| stop_body(&Customer::new(i), &format!("wamid.in{i}")))
            .collect();
        offset += n;
        let cpu_d = d.cpu();
        let cpu_h = cpu_secs(std::process::id());
        let perf = perf_attach(d.pid, &format!("intake-{c}"));
        let t = Instant::now();
        let res = load(&d.url("/webhooks/whatsapp"), bodies, c).await;
        let wall = t.elapsed();
        perf.stop();
        let cpu_d = d.cpu() - cpu_d;
        let cpu_h = cpu_secs(std::process::id()) - cpu_h;
        // Until the daemon has applied everything it acknowledged.
        loop {
            let s = d.status().await;
            if s.webhook_inbox == 0 || t.elapsed() > Duration::from_secs(600) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let applied = t.elapsed();
        if let (Some(db), Some(before)) = (db.as_deref(), pg_before) {
            let after = pg_settled(Some(db)).await.expect("stats");
            let delta = after.minus(before);
            pg_notes.push(format!(
                "{c} connection(s): {}",
                delta.per(n as f64, "webhook")
            ));
            stores::record(
                "intake",
                &format!(
                    "{c} conn: commits / index scans / rows written per webhook (server counters)"
                ),
                format!(
                    "{:.2} / {:.1} / {:.2}",
                    delta.commits as f64 / n as f64,
                    delta.idx_scans as f64 / n as f64,
                    (delta.inserted + delta.updated + delta.deleted) as f64 / n as f64
                ),
            );
            pg_before = Some(after);
        }
        let ok = res.iter().filter(|r| r.1 == 200).count();
        let lost = not_blocked(&d, offset - n..offset).await;
        let lat = sorted(res.iter().filter(|r| r.1 == 200).map(|r| ms(r.0)).collect());
        stores::record(
            "intake",
            &format!("{c} conn: acknowledged / s"),
            format!("{:.0}", ok as f64 / wall.as_secs_f64()),
        );
        stores::record(
            "intake",
            &format!("{c} conn: p50 / p99 ms"),
            format!("{:.2} / {:.2}", pct(&lat, 50.0), pct(&lat, 99.0)),
        );
        stores::record(
            "intake",
            &format!("{c} conn: applied / s"),
            format!("{:.0}", n as f64 / applied.as_secs_f64()),
        );
        stores::record(
            "intake",
            &format!("{c} conn: CPU s daemon"),
            format!("{cpu_d:.1}"),
        );
        rows.push(vec![
            c.to_string(),
            format!("{ok} / {}", res.len()),
            format!("**{:.0}**", ok as f64 / wall.as_secs_f64()),
            format!("{:.2}", pct(&lat, 50.0)),
            format!("{:.2}", pct(&lat, 90.0)),
            format!("**{:.2}**", pct(&lat, 99.0)),
            format!("{:.2}", lat.last().copied().unwrap_or(f64::NAN)),
            format!("{:.0}", n as f64 / applied.as_secs_f64()),
            lost.to_string(),
            format!("{cpu_d:.1} / {cpu_h:.1}"),
        ]);
    }
    let s = d.status().await;
    let rss = d.rss();
    let hwm = d.hwm();
    let threads = proc_mib(d.pid, "Threads:") * 1024.0;
    d.terminate().await;
    table(
        &[
            "connections",
            "200s",
            "acknowledged / s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "applied / s",
            "acknowledged but not applied",
            "CPU s daemon / generator",
        ],
        &rows,
    );
    println!(
        "subjects opted out at the end: {}; daemon RSS {rss:.0} MiB (peak {hwm:.0} MiB), {threads:.0} threads\n",
        s.people("all", "opted_out")
    );
    stores::record("intake", "daemon peak RSS MiB", format!("{hwm:.0}"));
    if !pg_notes.is_empty() {
        println!(
            "PostgreSQL's counters for the database (`pg_stat_database`, read {} s after each level so that every session has flushed them):\n",
            stores::STATS_SETTLE.as_secs()
        );
        for note in pg_notes {
            println!("- {note}");
        }
        println!();
    }
}

/// On PostgreSQL (`db` set): the database's counters once the idle daemon's sessions have
/// flushed theirs ([`stores::STATS_SETTLE`]); `None` on sled.
async fn pg_settled(db: Option<&str>) -> Option<stores::DbStats> {
    let db = db?;
    tokio::time::sleep(stores::STATS_SETTLE).await;
    Some(stores::db_stats(db))
}

// ---------------------------------------------------------------------------------------
// 3. Bulk resync, and the raw store ceiling

/// What a bulk resync leaves for the store benchmark.
struct BigStore {
    dir: StoreDir,
    config: String,
    /// Keeps the HubSpot stand-in alive for the daemon's polls after restarts.
    _stub: hubstub::HubStub,
    n: usize,
}

/// Where a big store lives: built by this run, or kept by an earlier one.
enum StoreDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl StoreDir {
    fn path(&self) -> &Path {
        match self {
            StoreDir::Temp(t) => t.path(),
            StoreDir::Kept(p) => p,
        }
    }
}

fn stub_contacts(n: usize) -> Vec<hubstub::StubContact> {
    // One distinct modification time per contact, all at least an hour ago; one in fifty
    // carries an existing opt-out.
    let base = Timestamp::now().millis() - 3_600_000 - n as i64;
    (0..n)
        .map(|i| {
            let c = Customer::new(i);
            let mut props = vec![
                ("firstname", format!("Customer{i}")),
                ("phone", c.hubspot()),
            ];
            if i % 50 == 0 {
                props.push(("whatsapp_consent", "opted_out".to_string()));
            }
            hubstub::StubContact {
                id: i as u64 + 1,
                modified: base + i as i64,
                props,
            }
        })
        .collect()
}

struct ResyncFigures {
    secs: f64,
    hwm: f64,
    rss_samples: Vec<(f64, f64)>,
    daemon_cpu: f64,
    harness_cpu: f64,
    searches: u64,
}

/// Starts a daemon with only the HubSpot connector at `base` and measures its first sync
/// (a full read: the store is empty) of `n` contacts.
async fn timed_resync(dir: &Path, config: &str, n: usize, name: &str) -> (Daemon, ResyncFigures) {
    let cpu_h = cpu_secs(std::process::id());
    let t = Instant::now();
    let d = spawn_daemon(dir, config).await;
    let perf = perf_attach(d.pid, name);
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    loop {
        let m = d.metrics().await;
        let read = metric_sum(&m, "optout_observations_total", "source=\"hubspot\"");
        samples.push((t.elapsed().as_secs_f64(), d.rss()));
        if read >= n as f64 {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(60) {
            println!(
                "(… {read:.0} of {n} after {:.0} s, RSS {:.0} MiB)",
                t.elapsed().as_secs_f64(),
                d.rss()
            );
            last_print = Instant::now();
        }
        if t.elapsed() > Duration::from_secs(3600) {
            println!("(gave up after an hour at {read} records)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    perf.stop();
    println!(
        "({name}: daemon threads at the end: {:.0})\n",
        proc_mib(d.pid, "Threads:") * 1024.0
    );
    let fig = ResyncFigures {
        secs,
        hwm: d.hwm(),
        rss_samples: samples,
        daemon_cpu: d.cpu(),
        harness_cpu: cpu_secs(std::process::id()) - cpu_h,
        searches: 0,
    };
    (d, fig)
}

async fn resync(sizes: &Sizes) -> BigStore {
    let n = sizes.resync_n;
    let on_sled = stores::current() == stores::Backend::Sled;
    header(
        &format!("3. Full resync of {n} HubSpot contacts"),
        &format!(
            "A daemon with an empty store and only a HubSpot connector (limiter opened wide, as with `Limits::off()`) reads every contact: search pages of 200, each applied in one durable store transaction. Each contact has one distinct number; one in fifty carries an existing opt-out. Timed from spawn until `/metrics` counts every contact observed (sampled every 0.25 s, with the daemon's RSS). The HubSpot fake scans and sorts every contact on each search, so at this size it would measure itself (its page time is timed below): the pages come from an indexed stand-in with the same wire format (`benches/bench/hubstub.rs`){}",
            if on_sled {
                "; the same sync against the fake itself, at a size it can serve, is the second row. The raw ceiling writes the same records straight into sled in a child process."
            } else {
                ". On PostgreSQL the fake's row and the raw ceiling (sled's) are not run; the server's counters for the database (`pg_stat_database`) are read after the resync."
            }
        ),
    );
    check_customers(0..n);
    let stub = hubstub::start(stub_contacts(n)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "{}{}",
        daemon_section(dir.path()),
        hubspot_section(&stub.base_url(), "1h")
    );
    let db = stores::database_of(dir.path());
    let (d, mut fig) = timed_resync(dir.path(), &config, n, "resync").await;
    fig.searches = stub.counts().0;
    let status = d.status().await;
    let after_first = pg_settled(db.as_deref()).await;
    let second = second_full_resync(&d).await;
    d.terminate().await;
    stores::record(
        "resync",
        "records / s",
        format!("{:.0}", n as f64 / fig.secs),
    );
    stores::record("resync", "time s", format!("{:.1}", fig.secs));
    stores::record("resync", "peak RSS MiB", format!("{:.0}", fig.hwm));
    stores::record("resync", "CPU s daemon", format!("{:.1}", fig.daemon_cpu));
    stores::record(
        "resync",
        "second full resync (all known) s",
        format!("{:.1}", second.0),
    );
    match (db, after_first) {
        (Some(db), Some(first)) => resync_pg_report(n, &db, &fig, first, &second, &status),
        _ => resync_sled_report(sizes, dir.path(), &fig, &second, &status).await,
    }
    keep_store(dir.path());
    BigStore {
        dir: StoreDir::Temp(dir),
        config,
        _stub: stub,
        n,
    }
}

/// With `BENCH_KEEP_STORE=<dir>` (sled), a copy of the resync's store in `<dir>/state`,
/// for `BENCH_STORE_FROM` to run `store` and `gate` on again without building it.
fn keep_store(dir: &Path) {
    let Ok(keep) = std::env::var("BENCH_KEEP_STORE") else {
        return;
    };
    let keep = PathBuf::from(keep);
    std::fs::create_dir_all(&keep).expect("BENCH_KEEP_STORE directory");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.join("state"))
        .arg(&keep)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the store to {}", keep.display());
    println!(
        "The store is kept in {} (BENCH_KEEP_STORE).\n",
        keep.display()
    );
}

/// The store `BENCH_KEEP_STORE` kept, named by `BENCH_STORE_FROM=<dir>`, with a HubSpot
/// stand-in that has no contacts (the daemon's incremental polls find nothing, as after a
/// resync). The restarts and lookups of `store` and `gate` write to it.
async fn kept_store(sizes: &Sizes) -> Option<BigStore> {
    let from = std::env::var("BENCH_STORE_FROM").ok()?;
    let dir = StoreDir::Kept(PathBuf::from(from));
    assert!(
        dir.path().join("state").is_dir(),
        "BENCH_STORE_FROM: no state directory in {}",
        dir.path().display()
    );
    let stub = hubstub::start(Vec::new()).await;
    let config = format!(
        "{}{}",
        daemon_section(dir.path()),
        hubspot_section(&stub.base_url(), "1h")
    );
    let n = sizes.resync_n;
    println!(
        "(`store` and `gate` on the kept store in {} of {n} people: BENCH_STORE_FROM)\n",
        dir.path().display()
    );
    Some(BigStore {
        dir,
        config,
        _stub: stub,
        n,
    })
}

/// The PostgreSQL rows of the resync: the daemon's figures, the server's counters per
/// page, and the rows per tree.
fn resync_pg_report(
    n: usize,
    db: &str,
    fig: &ResyncFigures,
    first: stores::DbStats,
    second: &(f64, Vec<(f64, f64)>),
    status: &StatusReport,
) {
    stores::wait_disconnected(db);
    let end = stores::db_stats(db);
    let pages = n.div_ceil(200) as f64;
    let rate = n as f64 / fig.secs;
    table(
        &[
            "run",
            "records",
            "time s",
            "records / s",
            "peak RSS (VmHWM) MiB",
            "CPU s daemon / harness",
            "search requests",
        ],
        &[vec![
            "**daemon ← indexed stand-in**".into(),
            n.to_string(),
            format!("{:.1}", fig.secs),
            format!("**{rate:.0}**"),
            format!("**{:.0}**", fig.hwm),
            format!("{:.1} / {:.1}", fig.daemon_cpu, fig.harness_cpu),
            fig.searches.to_string(),
        ]],
    );
    println!(
        "Daemon RSS during the resync (MiB, sampled every 0.25 s): {}\n",
        memory_flatness(&fig.rss_samples)
    );
    println!(
        "Then `resync --full --connector hubspot` on the same daemon: the same {n} contacts read again, now all known: {:.1} s ({:.0} records/s); daemon RSS {}\n",
        second.0,
        n as f64 / second.0,
        memory_flatness(&second.1)
    );
    println!(
        "PostgreSQL's counters (`pg_stat_database`): first resync (with start-up), {}; second resync, {}.\n",
        first.per(pages, "page of 200"),
        end.minus(first).per(pages, "page of 200")
    );
    stores::record(
        "resync",
        "commits / index scans / rows written per page of 200 (server counters)",
        format!(
            "{:.1} / {:.0} / {:.0}",
            first.commits as f64 / pages,
            first.idx_scans as f64 / pages,
            (first.inserted + first.updated + first.deleted) as f64 / pages
        ),
    );
    let (trees, table_bytes, index_bytes) = stores::tree_stats(db);
    println!(
        "Store after the resync: subjects {}, decisions {:?}; per tree (`optout_kv.tree`: rows, average key + value bytes): {}; table {:.0} MiB, its primary key {:.0} MiB, database {:.0} MiB.\n",
        status.subjects_total,
        status.subjects,
        trees
            .iter()
            .map(|t| format!("{} {} ({:.0} + {:.0})", t.0, t.1, t.2, t.3))
            .collect::<Vec<_>>()
            .join(", "),
        table_bytes as f64 / (1 << 20) as f64,
        index_bytes as f64 / (1 << 20) as f64,
        end.size as f64 / (1 << 20) as f64,
    );
}

/// The sled rows of the resync: the fake's row, the raw sled ceiling and the trees.
async fn resync_sled_report(
    sizes: &Sizes,
    dir: &Path,
    fig: &ResyncFigures,
    second: &(f64, Vec<(f64, f64)>),
    status: &StatusReport,
) {
    let n = sizes.resync_n;
    let stats = tree_stats(&dir.join("state"));

    // The same sync against the HubSpot fake, at a size it can serve.
    let fake = fake_resync(sizes.resync_fake_n).await;

    // The raw ceiling: the same number of records written straight into sled.
    let raw = raw_sled(n, &stats, false).await;
    let raw_tx = raw_sled(n, &stats, true).await;
    let rate = n as f64 / fig.secs;
    let flat = memory_flatness(&fig.rss_samples);
    table(
        &[
            "run",
            "records",
            "time s",
            "records / s",
            "vs raw ceiling",
            "peak RSS (VmHWM) MiB",
            "CPU s daemon / harness",
            "search requests",
        ],
        &[
            vec![
                "**daemon ← indexed stand-in**".into(),
                n.to_string(),
                format!("{:.1}", fig.secs),
                format!("**{rate:.0}**"),
                format!("**{:.0} %**", rate / raw.rate * 100.0),
                format!("**{:.0}**", fig.hwm),
                format!("{:.1} / {:.1}", fig.daemon_cpu, fig.harness_cpu),
                fig.searches.to_string(),
            ],
            vec![
                "daemon ← HubSpot fake".into(),
                fake.n.to_string(),
                format!("{:.1}", fake.fig.secs),
                format!("{:.0}", fake.n as f64 / fake.fig.secs),
                "—".into(),
                format!("{:.0}", fake.fig.hwm),
                format!("{:.1} / {:.1}", fake.fig.daemon_cpu, fake.fig.harness_cpu),
                fake.fig.searches.to_string(),
            ],
            vec![
                "raw sled: plain inserts, flush per 200 records (ceiling)".into(),
                n.to_string(),
                format!("{:.1}", raw.secs),
                format!("{:.0}", raw.rate),
                "100 %".into(),
                format!("{:.0}", raw.hwm),
                "—".into(),
                "—".into(),
            ],
            vec![
                "raw sled: one transaction over the trees per 200 records, flushed".into(),
                n.to_string(),
                format!("{:.1}", raw_tx.secs),
                format!("{:.0}", raw_tx.rate),
                format!("{:.0} %", raw_tx.rate / raw.rate * 100.0),
                format!("{:.0}", raw_tx.hwm),
                "—".into(),
                "—".into(),
            ],
        ],
    );
    println!(
        "HubSpot fake, one search page of 200 (lastmodifieddate ≥ t, sorted) timed directly: {:.1} ms at {} contacts, {:.1} ms at {} contacts; a {n}-contact sync needs {} pages.\n",
        fake.page_ms.0,
        fake.page_ms.1,
        fake.page_ms.2,
        fake.page_ms.3,
        n.div_ceil(200)
    );
    println!("Daemon RSS during the stand-in resync (MiB, sampled every 0.25 s): {flat}\n");
    println!(
        "Then `resync --full --connector hubspot` on the same daemon: the same {n} contacts read again, now all known, so the store hardly grows: {:.1} s ({:.0} records/s); daemon RSS {}\n",
        second.0,
        n as f64 / second.0,
        memory_flatness(&second.1)
    );
    println!(
        "Raw sled RSS during its loop (plain inserts): {}; with transactions: {}\n",
        memory_flatness(&raw.samples),
        memory_flatness(&raw_tx.samples)
    );
    println!(
        "Store after the resync: subjects {}, decisions {:?}; per tree (entries, average key + value bytes): {}\n",
        status.subjects_total,
        status.subjects,
        stats
            .iter()
            .filter(|t| t.entries > 0)
            .map(|t| format!(
                "{} {} ({:.0} + {:.0})",
                t.name,
                t.entries,
                t.key_bytes as f64 / t.entries as f64,
                t.value_bytes as f64 / t.entries as f64
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn memory_flatness(samples: &[(f64, f64)]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    let at = |frac: f64| {
        let i = ((samples.len() - 1) as f64 * frac).round() as usize;
        samples[i]
    };
    let points: Vec<String> = [0.1, 0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|&f| {
            let (t, r) = at(f);
            format!("{r:.0} at {t:.0} s")
        })
        .collect();
    let max = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    format!("{}; max {max:.0}", points.join(", "))
}

/// Asks the daemon for a full HubSpot resync and samples its RSS every 0.25 s until the
/// resync reports done: (seconds, samples).
async fn second_full_resync(d: &Daemon) -> (f64, Vec<(f64, f64)>) {
    let t = Instant::now();
    let full = optout_sync::control::Request::Resync {
        connector: Some("hubspot".into()),
        full: true,
    };
    let req = optout_sync::control::request(&d.socket, &full, |_| {});
    tokio::pin!(req);
    let mut samples = vec![(0.0, d.rss())];
    loop {
        tokio::select! {
            r = &mut req => {
                if let Err(e) = r {
                    println!("(second resync: {e})");
                }
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                samples.push((t.elapsed().as_secs_f64(), d.rss()));
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    samples.push((secs, d.rss()));
    (secs, samples)
}

struct FakeResync {
    n: usize,
    fig: ResyncFigures,
    /// (ms per page, at contacts, ms per page, at contacts)
    page_ms: (f64, usize, f64, usize),
}

async fn fake_resync(n: usize) -> FakeResync {
    use optout_hubspot::fake as hf;
    let hubspot = hf::start(hf::FakeOptions {
        limits: hf::Limits::off(),
        ..Default::default()
    })
    .await;
    let contacts = stub_contacts(n);
    let half = n / 2;
    let seed = |cs: &[hubstub::StubContact]| {
        hubspot.create_contacts(cs.iter().map(|c| {
            c.props
                .iter()
                .fold(hf::NewContact::new(), |nc, (k, v)| nc.with(k, v))
                .modified_at(c.modified)
        }));
    };
    seed(&contacts[..half]);
    let page_half = time_fake_page(&hubspot.base_url()).await;
    seed(&contacts[half..]);
    let page_full = time_fake_page(&hubspot.base_url()).await;
    hubspot.reset_counts();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "{}{}",
        daemon_section(dir.path()),
        hubspot_section(&hubspot.base_url(), "1h")
    );
    let (d, mut fig) = timed_resync(dir.path(), &config, n, "resync-fake").await;
    fig.searches = hubspot.counts().search;
    d.terminate().await;
    FakeResync {
        n,
        fig,
        page_ms: (page_half, half, page_full, n),
    }
}

/// Median of five search requests for the first page of a full read.
async fn time_fake_page(base: &str) -> f64 {
    let client = reqwest::Client::new();
    let body = json!({
        "filterGroups": [{ "filters": [{ "propertyName": "lastmodifieddate", "operator": "GTE", "value": "0" }] }],
        "sorts": [{ "propertyName": "lastmodifieddate", "direction": "ASCENDING" }],
        "properties": ["phone", "mobilephone", "hs_whatsapp_phone_number", "whatsapp_consent", "whatsapp_consent_changed_at", "whatsapp_consent_source", "lastmodifieddate", "hs_object_id"],
        "limit": 200,
    });
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = client
            .post(format!("{base}/crm/v3/objects/contacts/search"))
            .bearer_auth(optout_hubspot::fake::TOKEN)
            .json(&body)
            .send()
            .await
            .expect("search");
        let _ = r.bytes().await;
        times.push(ms(t.elapsed()));
    }
    pct(&sorted(times), 50.0)
}

struct TreeStat {
    name: String,
    entries: u64,
    key_bytes: u64,
    value_bytes: u64,
}

/// Entries and bytes per tree of a (closed) store.
fn tree_stats(state: &Path) -> Vec<TreeStat> {
    let db = sled::Config::new()
        .path(state)
        .cache_capacity(64 << 20)
        .open()
        .expect("open the store read-only for statistics");
    let mut out = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("tree");
        let mut s = TreeStat {
            name: String::from_utf8_lossy(&name).into_owned(),
            entries: 0,
            key_bytes: 0,
            value_bytes: 0,
        };
        for (k, v) in tree.iter().flatten() {
            s.entries += 1;
            s.key_bytes += k.len() as u64;
            s.value_bytes += v.len() as u64;
        }
        out.push(s);
    }
    out
}

struct RawFigures {
    secs: f64,
    rate: f64,
    hwm: f64,
    samples: Vec<(f64, f64)>,
}

/// Writes `n` records into a fresh sled database (same settings as the store) with, per
/// record, as many entries of the same average sizes in as many trees as the daemon's
/// resync wrote; flushed once per 200 records (the daemon's page). `tx` groups each 200
/// records in one transaction over those trees, like the daemon's page transaction.
async fn raw_sled(n: usize, stats: &[TreeStat], tx: bool) -> RawFigures {
    // Per-record trees: those holding at least a tenth of an entry per record.
    let shapes: Vec<Value> = stats
        .iter()
        .filter(|t| t.entries as f64 >= n as f64 * 0.1 && t.name != "__sled__default")
        .map(|t| {
            json!([
                t.name,
                (t.key_bytes as f64 / t.entries as f64).round() as usize,
                (t.value_bytes as f64 / t.entries as f64).round() as usize,
                t.entries as f64 / n as f64,
            ])
        })
        .collect();
    // In a child process of this harness, so that its peak RSS is sled's alone.
    let out = Command::new(std::env::current_exe().expect("own path"))
        .arg(RAW_SLED_ARG)
        .env(
            "BENCH_RAW",
            json!({ "n": n, "tx": tx, "shapes": shapes }).to_string(),
        )
        .output()
        .await
        .expect("raw sled child");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "raw sled child: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let secs = v["secs"].as_f64().unwrap_or(f64::NAN);
    RawFigures {
        secs,
        rate: n as f64 / secs,
        hwm: v["hwm"].as_f64().unwrap_or(f64::NAN),
        samples: v["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect(),
    }
}

const RAW_SLED_ARG: &str = "__raw_sled";

/// The child's side: writes the records described by `BENCH_RAW` into a fresh sled
/// database (same settings as the store) with, per record, as many entries of the same
/// average sizes in as many trees as the daemon's resync wrote; flushed once per 200
/// records (the daemon's page). With `tx`, each 200 records are one transaction over
/// those trees, like the daemon's page transaction. Prints JSON: secs, hwm, samples.
fn raw_sled_child() {
    let spec: Value =
        serde_json::from_str(&std::env::var("BENCH_RAW").expect("BENCH_RAW")).expect("spec");
    let n = spec["n"].as_u64().expect("n") as usize;
    let tx = spec["tx"].as_bool().unwrap_or(false);
    let shapes: Vec<(String, usize, usize, f64)> = spec["shapes"]
        .as_array()
        .expect("shapes")
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap_or("t").to_string(),
                s[1].as_u64().unwrap_or(8) as usize,
                s[2].as_u64().unwrap_or(0) as usize,
                s[3].as_f64().unwrap_or(1.0),
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path())
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(64 << 20)
        .open()
        .expect("open raw sled");
    let trees: Vec<sled::Tree> = shapes
        .iter()
        .map(|s| db.open_tree(&s.0).expect("tree"))
        .collect();
    let mut rng = Rng(0x5_1ed);
    let key = |i: u64, len: usize, salt: u8| {
        let mut k = vec![salt; len.max(8)];
        k[..8].copy_from_slice(&i.to_be_bytes());
        k
    };
    let mut next_key = vec![0u64; shapes.len()];
    let mut samples = Vec::new();
    let t = Instant::now();
    let mut i = 0;
    let mut carry = vec![0.0f64; shapes.len()];
    let pid = std::process::id();
    while i < n {
        let end = (i + 200).min(n);
        // Entries per tree for this page (fractional counts carried over).
        let mut writes: Vec<(usize, Vec<u8>, Vec<u8>)> = Vec::new();
        for (ti, s) in shapes.iter().enumerate() {
            carry[ti] += s.3 * (end - i) as f64;
            let count = carry[ti].floor() as usize;
            carry[ti] -= count as f64;
            for _ in 0..count {
                let mut v = vec![0u8; s.2];
                for b in v.iter_mut().step_by(8) {
                    *b = rng.next() as u8;
                }
                next_key[ti] += 1;
                writes.push((ti, key(next_key[ti], s.1, ti as u8), v));
            }
        }
        if tx {
            use sled::Transactional;
            let r: sled::transaction::TransactionResult<()> =
                trees.as_slice().transaction(|view| {
                    for (ti, k, v) in &writes {
                        view[*ti].insert(k.as_slice(), v.as_slice())?;
                    }
                    view[0].flush();
                    Ok(())
                });
            r.expect("raw transaction");
        } else {
            for (ti, k, v) in writes {
                trees[ti].insert(k, v).expect("raw insert");
            }
            db.flush().expect("flush");
        }
        if i % (n / 20).max(200) < 200 {
            samples.push(json!([t.elapsed().as_secs_f64(), proc_mib(pid, "VmRSS:")]));
        }
        i = end;
    }
    let secs = t.elapsed().as_secs_f64();
    samples.push(json!([secs, proc_mib(pid, "VmRSS:")]));
    println!(
        "{}",
        json!({ "secs": secs, "hwm": proc_mib(pid, "VmHWM:"), "samples": samples })
    );
}

// ---------------------------------------------------------------------------------------
// 5. The store with 1,000,000 subjects: size, RSS, start-up

async fn store_bench(sizes: &Sizes, big: &BigStore) {
    let n = big.n;
    header(
        &format!("5. Store with {n} subjects: size on disk, RSS, start-up"),
        &format!(
            "The store the resync left ({n} subjects, each with an alias and a HubSpot link), restarted {} times with the same configuration. Start-up is spawn → READY=1 on the notify socket. RSS is VmRSS right after READY and after 10 s idle (one incremental poll, which finds nothing); peak is VmHWM. Then {} send-gate queries (`GET /v1/consent/{{phone}}`, one connection, sequential, random known customers) and one `status` over the control socket.",
            sizes.store_restarts, sizes.gate_queries
        ),
    );
    let state = big.dir.path().join("state");
    let (apparent, allocated) = dir_bytes(&state);
    let db = stores::database_of(big.dir.path());
    let db_size = db.as_deref().map(|db| stores::db_stats(db).size);
    let mut rows = Vec::new();
    let mut rng = Rng(0x6a7e);
    let client = reqwest::Client::new();
    for run in 1..=sizes.store_restarts {
        let d = spawn_daemon(big.dir.path(), &big.config).await;
        let ready = d.ready_after;
        let rss_ready = d.rss();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss_idle = d.rss();
        let mut lat = Vec::new();
        let mut blocked = 0;
        for _ in 0..sizes.gate_queries {
            let i = rng.below(n as u64) as usize;
            let c = Customer::new(i);
            let t = Instant::now();
            let v: GateReply = client
                .get(d.url(&format!(
                    "/v1/consent/+1{}{}{:04}?category=marketing",
                    c.area, c.exchange, c.line
                )))
                .bearer_auth(GATE_TOKEN)
                .send()
                .await
                .expect("gate")
                .json()
                .await
                .expect("gate json");
            lat.push(ms(t.elapsed()));
            if v.allowed == Some(false) {
                blocked += 1;
            }
        }
        let t = Instant::now();
        let s = d.status().await;
        let status_ms = ms(t.elapsed());
        let hwm = d.hwm();
        let stop = d.terminate().await;
        let lat = sorted(lat);
        let this = |f: &str, v: String| stores::record("store", &format!("restart {run}: {f}"), v);
        this("spawn → READY ms", format!("{:.0}", ms(ready)));
        this("RSS after 10 s MiB", format!("{rss_idle:.0}"));
        this(
            "sequential gate p50 / p99 ms",
            format!("{:.2} / {:.2}", pct(&lat, 50.0), pct(&lat, 99.0)),
        );
        this("`status` ms", format!("{status_ms:.0}"));
        this("SIGTERM → exit ms", format!("{:.0}", ms(stop)));
        rows.push(vec![
            run.to_string(),
            format!("**{:.0}**", ms(ready)),
            format!("{rss_ready:.0}"),
            format!("**{rss_idle:.0}**"),
            format!("{hwm:.0}"),
            format!(
                "{:.2} / {:.2} ({blocked} blocked)",
                pct(&lat, 50.0),
                pct(&lat, 99.0)
            ),
            format!("{status_ms:.0} ({} subjects)", s.subjects_total),
            format!("{:.0}", ms(stop)),
        ]);
    }
    let (apparent2, allocated2) = dir_bytes(&state);
    table(
        &[
            "restart",
            "spawn → READY ms",
            "RSS at READY MiB",
            "RSS after 10 s MiB",
            "peak MiB",
            "gate p50 / p99 ms",
            "`status` ms",
            "SIGTERM → exit ms",
        ],
        &rows,
    );
    if let (Some(db), Some(before)) = (db, db_size) {
        let after = stores::db_stats(&db).size;
        let mib = |b: i64| b as f64 / (1 << 20) as f64;
        println!(
            "Database size (`pg_database_size`): {:.0} MiB after the resync; {:.0} MiB after the restarts ({:.0} bytes per subject). The sled directory holds only the daemon's own files here ({:.1} MiB).\n",
            mib(before),
            mib(after),
            after as f64 / n as f64,
            allocated2 as f64 / (1 << 20) as f64,
        );
        stores::record(
            "store",
            "size MiB (sled: allocated on disk; PostgreSQL: pg_database_size)",
            format!("{:.0}", mib(after)),
        );
        stores::record(
            "store",
            "bytes per subject",
            format!("{:.0}", after as f64 / n as f64),
        );
        return;
    }
    stores::record(
        "store",
        "size MiB (sled: allocated on disk; PostgreSQL: pg_database_size)",
        format!("{:.0}", allocated2 as f64 / (1 << 20) as f64),
    );
    stores::record(
        "store",
        "bytes per subject",
        format!("{:.0}", allocated2 as f64 / n as f64),
    );
    println!(
        "Size on disk: {:.0} MiB apparent, {:.0} MiB allocated after the resync; {:.0} / {:.0} MiB after the restarts ({:.0} bytes per subject allocated).\n",
        apparent as f64 / (1 << 20) as f64,
        allocated as f64 / (1 << 20) as f64,
        apparent2 as f64 / (1 << 20) as f64,
        allocated2 as f64 / (1 << 20) as f64,
        allocated2 as f64 / n as f64
    );
}

// ---------------------------------------------------------------------------------------
// 6. The send gate under concurrent load

/// One keep-alive HTTP/1.1 connection speaking just enough of the protocol for the gate:
/// a request written in one piece, the answer read by its `Content-Length`. Far cheaper
/// per request than a general client, so the figures measure the daemon.
struct RawConn {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    host: String,
}

impl RawConn {
    async fn open(addr: &str) -> RawConn {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        RawConn {
            stream: tokio::io::BufReader::new(s),
            host: addr.to_string(),
        }
    }

    /// Sends a request and returns (status, body).
    async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {GATE_TOKEN}\r\n",
            self.host
        );
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream
            .get_mut()
            .write_all(&bytes)
            .await
            .expect("write");
        let mut line = String::new();
        self.stream.read_line(&mut line).await.expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut len = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().expect("content-length");
            }
        }
        let mut out = vec![0u8; len];
        self.stream.read_exact(&mut out).await.expect("body");
        (status, out)
    }
}

/// The gate path of customer `i`.
fn gate_path(i: usize) -> String {
    let c = Customer::new(i);
    format!(
        "/v1/consent/+1{}{}{:04}?category=marketing",
        c.area, c.exchange, c.line
    )
}

struct GateLoad {
    per_sec: f64,
    lat: Vec<f64>,
    blocked: usize,
    daemon_cpu: f64,
    harness_cpu: f64,
}

/// `total` single lookups of random known customers over `conns` connections, each
/// sending its next request when the last is answered (closed loop).
async fn gate_load(d: &Daemon, n: usize, total: usize, conns: usize, seed: u64) -> GateLoad {
    let per = total.div_ceil(conns);
    let mut conns_open = Vec::new();
    for _ in 0..conns {
        conns_open.push(RawConn::open(&d.addr).await);
    }
    let (cpu_d, cpu_h) = (d.cpu(), cpu_secs(std::process::id()));
    let t = Instant::now();
    let tasks: Vec<_> = conns_open
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            tokio::spawn(async move {
                let mut rng = Rng(seed ^ ((k as u64 + 1) * 0x9e37_79b9));
                let (mut lat, mut blocked) = (Vec::with_capacity(per), 0);
                for _ in 0..per {
                    let path = gate_path(rng.below(n as u64) as usize);
                    let t = Instant::now();
                    let (status, body) = conn.call("GET", &path, b"").await;
                    lat.push(ms(t.elapsed()));
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    let no = b"\"allowed\":false";
                    if body.windows(no.len()).any(|w| w == no) {
                        blocked += 1;
                    }
                }
                (lat, blocked)
            })
        })
        .collect();
    let (mut lat, mut blocked) = (Vec::new(), 0);
    for task in tasks {
        let (l, b) = task.await.expect("gate task");
        lat.extend(l);
        blocked += b;
    }
    let secs = t.elapsed().as_secs_f64();
    GateLoad {
        per_sec: lat.len() as f64 / secs,
        lat: sorted(lat),
        blocked,
        daemon_cpu: d.cpu() - cpu_d,
        harness_cpu: cpu_secs(std::process::id()) - cpu_h,
    }
}

/// `requests` batch lookups of 1,000 random known customers each, over `conns` connections.
async fn gate_batches(d: &Daemon, n: usize, requests: usize, conns: usize) -> Vec<f64> {
    let per = requests.div_ceil(conns);
    let mut tasks = Vec::new();
    for k in 0..conns {
        let mut conn = RawConn::open(&d.addr).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xba7c ^ (k as u64 + 1));
            let mut lat = Vec::new();
            for _ in 0..per {
                let ids: Vec<String> = (0..1000)
                    .map(|_| format!("+{}", Customer::new(rng.below(n as u64) as usize).wa_id()))
                    .collect();
                let body = serde_json::to_vec(&json!({ "category": "marketing", "ids": ids }))
                    .expect("json");
                let t = Instant::now();
                let (status, reply) = conn.call("POST", "/v1/consent/batch", &body).await;
                lat.push(ms(t.elapsed()));
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("batch task"));
    }
    sorted(lat)
}

async fn gate_bench(sizes: &Sizes, big: &BigStore) {
    let n = big.n;
    header(
        &format!("6. The send gate under load, {n} subjects"),
        &format!(
            "The store the resync left, a fresh daemon on it. Single lookups (`GET /v1/consent/{{phone}}?category=marketing`, random known customers, numbers in E.164) over 1, 32 and 128 keep-alive connections, each sending its next request as soon as the last is answered; {} lookups per level. The load generator is a minimal HTTP/1.1 client in the harness process (one task per connection) and shares the 2 CPUs with the daemon. Then 1,000-id batch lookups (`POST /v1/consent/batch`), and `status` and `lookup` over the control socket.",
            sizes.gate_load
        ),
    );
    let d = spawn_daemon(big.dir.path(), &big.config).await;
    // Warm the connection paths and the store's cache a little, unmeasured.
    let _ = gate_load(&d, n, 2_000, 8, 1).await;
    let db = stores::database_of(big.dir.path());
    let pg_before = pg_settled(db.as_deref()).await;
    let mut lookups_done = 0usize;
    let mut rows = Vec::new();
    for (k, conns) in [1usize, 32, 128].into_iter().enumerate() {
        let perf = perf_attach(d.pid, &format!("gate-{conns}"));
        let g = gate_load(&d, n, sizes.gate_load, conns, 0x6a7e + k as u64).await;
        perf.stop();
        lookups_done += g.lat.len();
        stores::record(
            "gate",
            &format!("{conns} conn: lookups / s"),
            format!("{:.0}", g.per_sec),
        );
        stores::record(
            "gate",
            &format!("{conns} conn: p50 / p99 ms"),
            format!("{:.2} / {:.2}", pct(&g.lat, 50.0), pct(&g.lat, 99.0)),
        );
        stores::record(
            "gate",
            &format!("{conns} conn: daemon CPU µs per lookup"),
            format!("{:.0}", g.daemon_cpu / g.lat.len() as f64 * 1e6),
        );
        rows.push(vec![
            conns.to_string(),
            g.lat.len().to_string(),
            format!("**{:.0}**", g.per_sec),
            format!("{:.2}", pct(&g.lat, 50.0)),
            format!("{:.2}", pct(&g.lat, 90.0)),
            format!("**{:.2}**", pct(&g.lat, 99.0)),
            format!("{:.2}", g.lat.last().copied().unwrap_or(0.0)),
            g.blocked.to_string(),
            format!("{:.1} / {:.1}", g.daemon_cpu, g.harness_cpu),
        ]);
    }
    table(
        &[
            "connections",
            "lookups",
            "lookups / s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "blocked",
            "CPU s daemon / harness",
        ],
        &rows,
    );
    if let (Some(db), Some(before)) = (db.as_deref(), pg_before) {
        let lookups = lookups_done as f64;
        let after = pg_settled(Some(db)).await.expect("stats").minus(before);
        println!(
            "PostgreSQL's counters over the single lookups (`pg_stat_database`), {}\n",
            after.per(lookups, "lookup")
        );
        stores::record(
            "gate",
            "commits / index scans / buffer hits per single lookup (server counters)",
            format!(
                "{:.2} / {:.1} / {:.1}",
                after.commits as f64 / lookups,
                after.idx_scans as f64 / lookups,
                after.blks_hit as f64 / lookups
            ),
        );
    }
    let mut rows = Vec::new();
    for conns in [1usize, 4] {
        let perf = perf_attach(d.pid, &format!("gate-batch-{conns}"));
        let lat = gate_batches(&d, n, sizes.gate_batches, conns).await;
        perf.stop();
        stores::record(
            "gate",
            &format!("1,000-id batch, {conns} conn: p50 / p99 ms"),
            format!("{:.1} / {:.1}", pct(&lat, 50.0), pct(&lat, 99.0)),
        );
        rows.push(dist_row(&format!("1,000 ids, {conns} connection(s)"), lat));
    }
    table(
        &["batch lookup (ms)", "n", "p50", "p90", "p99", "max"],
        &rows,
    );
    let t = Instant::now();
    let s = d.status().await;
    let status_ms = ms(t.elapsed());
    let mut lookup_ms = Vec::new();
    for i in [0usize, n / 3, n - 1] {
        let req = optout_sync::control::Request::Lookup {
            id: format!("+{}", Customer::new(i).wa_id()),
        };
        let t = Instant::now();
        optout_sync::control::request(&d.socket, &req, |_| {})
            .await
            .expect("lookup");
        lookup_ms.push(format!("{:.1}", ms(t.elapsed())));
    }
    stores::record("gate", "`status` ms", format!("{status_ms:.1}"));
    stores::record(
        "gate",
        "`lookup` ms (three customers)",
        lookup_ms.join(" / "),
    );
    stores::record("gate", "daemon peak RSS MiB", format!("{:.0}", d.hwm()));
    println!(
        "`status` {status_ms:.1} ms ({} subjects); `lookup` of three customers {} ms; daemon RSS at the end {:.0} MiB, peak {:.0} MiB.\n",
        s.subjects_total,
        lookup_ms.join(" / "),
        d.rss(),
        d.hwm()
    );
    d.terminate().await;
}

// ---------------------------------------------------------------------------------------
// 8. Audit export through the running daemon

/// What one `audit export` run through the daemon's control socket cost.
struct ExportRun {
    entries: u64,
    bytes: u64,
    secs: f64,
    client_peak: f64,
    daemon_peak: f64,
    /// The daemon's RSS (seconds into the export, MiB), sampled with the client's peak.
    daemon_rss: Vec<(f64, f64)>,
}

/// Runs `optout-sync audit export` against the running daemon, counting its output without
/// keeping it, and sampling the client's peak RSS (VmHWM) every 20 ms until it exits.
async fn export_run(d: &Daemon, config: &Path, args: &[&str]) -> ExportRun {
    use tokio::io::AsyncReadExt;
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .args(["audit", "export", "--config"])
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn audit export");
    let pid = child.id().expect("pid");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 16];
    let (mut bytes, mut lines, mut peak) = (0u64, 0u64, 0f64);
    let mut daemon_rss = Vec::new();
    let mut sampled = Instant::now();
    loop {
        let n = out.read(&mut buf).await.expect("read the export");
        if sampled.elapsed() > Duration::from_millis(20) || n == 0 {
            peak = peak.max(proc_mib(pid, "VmHWM:").max(0.0));
            daemon_rss.push((t.elapsed().as_secs_f64(), d.rss()));
            sampled = Instant::now();
        }
        if n == 0 {
            break;
        }
        bytes += n as u64;
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let status = child.wait().await.expect("export exit");
    assert!(status.success(), "audit export failed: {status}");
    ExportRun {
        entries: lines,
        bytes,
        secs: t.elapsed().as_secs_f64(),
        client_peak: peak,
        daemon_peak: d.hwm(),
        daemon_rss,
    }
}

/// A store with at least `entries` audit entries, made by offline imports (an accepted
/// opt-out and a decision per row) before the daemon starts: a tenth of the rows, then
/// the rest. Returns the time taken and a time between the two (an import stamps all its
/// entries with its start time).
fn export_store(dir: &Path, config: &Path, entries: usize) -> (Duration, Timestamp) {
    let rows = entries.div_ceil(2);
    check_customers(0..rows);
    let import = |range: std::ops::Range<usize>| {
        let mut csv = String::with_capacity(range.len() * 48);
        csv.push_str("phone,status,time,source\n");
        for i in range {
            let c = Customer::new(i);
            csv += &format!(
                "{},opted_out,2024-05-01T10:00:00Z,bench list\n",
                c.hubspot()
            );
        }
        let list = dir.join("list.csv");
        std::fs::write(&list, csv).expect("write the list");
        let out = std::process::Command::new(BIN)
            .arg("import")
            .arg(&list)
            .arg("--config")
            .arg(config)
            .output()
            .expect("import");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let t = Instant::now();
    import(0..rows / 10);
    std::thread::sleep(Duration::from_millis(20));
    let between = Timestamp::now();
    std::thread::sleep(Duration::from_millis(20));
    import(rows / 10..rows);
    (t.elapsed(), between)
}

async fn export_bench(sizes: &Sizes) {
    let n = sizes.export_entries;
    header(
        &format!("8. Audit export of {n} entries through the running daemon"),
        "A store filled by an offline `import` (an accepted opt-out and a decision per row), then a daemon on it (no connector: idle) and `optout-sync audit export` run as an operator would while the daemon holds the store: the request goes over the control socket, the daemon streams one line per entry, the client formats and writes to a pipe the harness drains and counts. Peak RSS is VmHWM: the client's sampled every 20 ms until it exits, the daemon's after each export; the daemon's current RSS is sampled every 20 ms too (below the table: at 10, 25, 50, 75 and 100 % of each export). Each format is exported whole, then with `--until` at a tenth of the log (which still scans the whole log: the filter is on the entries' store time), then whole again.",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // No connector: nothing competes with the export for the 2 CPUs.
    let config = daemon_section(dir.path());
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    let config_path = dir.path().join("optout-sync.toml");
    std::fs::write(&config_path, &config).expect("config");
    let (built, between) = export_store(dir.path(), &config_path, n);
    let until = between.to_rfc3339();
    let d = spawn_daemon(dir.path(), &config).await;
    let rss_ready = d.rss();
    let first = export_run(&d, &config_path, &[]).await;
    let mut rows = Vec::new();
    let mut row = |label: &str, r: &ExportRun| {
        rows.push(vec![
            label.to_string(),
            r.entries.to_string(),
            format!("{:.0}", r.bytes as f64 / (1 << 20) as f64),
            format!("{:.1}", r.secs),
            format!("**{:.0}**", r.entries as f64 / r.secs),
            format!("**{:.1}**", r.client_peak),
            format!("**{:.1}**", r.daemon_peak),
        ]);
    };
    row("jsonl, all (first, cold)", &first);
    let mut during = vec![format!(
        "jsonl, all (first, cold): {}",
        memory_flatness(&first.daemon_rss)
    )];
    for (label, args) in [
        ("jsonl, `--until` a tenth", vec!["--until", until.as_str()]),
        ("jsonl, all", vec![]),
        ("csv, all", vec!["--format", "csv"]),
        (
            "csv, `--until` a tenth",
            vec!["--format", "csv", "--until", until.as_str()],
        ),
        ("csv, all", vec!["--format", "csv"]),
    ] {
        let r = export_run(&d, &config_path, &args).await;
        during.push(format!("{label}: {}", memory_flatness(&r.daemon_rss)));
        row(label, &r);
    }
    table(
        &[
            "export",
            "entries",
            "MiB written",
            "seconds",
            "entries/s",
            "client peak RSS MiB",
            "daemon peak RSS MiB (since start)",
        ],
        &rows,
    );
    println!("Daemon RSS MiB during each export (at 10/25/50/75/100 % of its samples):\n");
    for line in during {
        println!("- {line}");
    }
    println!(
        "\nStore built by the offline import in {:.0} s; daemon RSS at READY {rss_ready:.0} MiB; after the exports {:.0} MiB.\n",
        built.as_secs_f64(),
        d.rss()
    );
    d.terminate().await;
}

// ---------------------------------------------------------------------------------------
// 9. Failover between two instances on one PostgreSQL database

/// Two daemons on one database; the leader is SIGKILLed and the time until the survivor's
/// `status` names itself leader is measured. Needs PostgreSQL in `BENCH_STORES` and a
/// daemon whose `status` reports its instances and leader; otherwise it says why it skips.
async fn failover(stores: &stores::Stores) {
    if !stores.list.contains(&stores::Backend::Postgres) {
        println!("(failover: skipped, it needs `postgres` in BENCH_STORES)\n");
        return;
    }
    stores::set_current(stores::Backend::Postgres);
    header(
        "9. Failover",
        "Two daemons (instances `bench-a` and `bench-b`, `lease = \"3s\"`, only the WhatsApp connector) on one database; once `status` names a leader, the leader is SIGKILLed and the survivor's `status` is polled every 50 ms until it names itself leader. Three rounds; the killed instance is started again between them.",
    );
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    let config = |dir: &Path, name: &str| {
        format!("{}{}", daemon_section(dir), whatsapp_section())
            .replace("instance = \"bench\"", &format!("instance = \"{name}\""))
            .replace("lease = \"10s\"", "lease = \"3s\"")
    };
    let config_a = config(a.path(), "bench-a");
    // The second instance names the first one's database.
    let config_b = config(b.path(), "bench-b").replace(
        &b.path().join("store-url").display().to_string(),
        &a.path().join("store-url").display().to_string(),
    );
    let mut d = [
        Some(spawn_daemon(a.path(), &config_a).await),
        Some(spawn_daemon(b.path(), &config_b).await),
    ];
    let raw = raw_status(d[0].as_ref().expect("a")).await;
    if leader_of(&raw).is_none() && raw.get("cluster").is_none() {
        println!(
            "(failover: skipped: this build's `status` reports no instances and no leader, so there is no leader to kill; the multi-instance test suite measures the take-over)\n"
        );
        stores::record(
            "failover",
            "leader killed → survivor leads",
            "not run (no leader election in this build)",
        );
        for x in d.into_iter().flatten() {
            x.terminate().await;
        }
        return;
    }
    let names = ["bench-a", "bench-b"];
    let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
    let configs = [config_a.clone(), config_b.clone()];
    let mut times = Vec::new();
    for round in 0..3 {
        let Some(leader) = wait_leader(d[0].as_ref().or(d[1].as_ref()).expect("one")).await else {
            println!("(failover round {round}: no leader named within 30 s)\n");
            break;
        };
        let Some(k) = names.iter().position(|n| *n == leader) else {
            println!("(failover: the leader {leader:?} is neither instance)\n");
            break;
        };
        let mut killed = d[k].take().expect("leader");
        let survivor = d[1 - k].as_ref().expect("survivor");
        let t = Instant::now();
        // SAFETY: kill(2) on our own child with a valid signal number.
        unsafe { kill(killed.pid as i32, 9) };
        let _ = killed.child.wait().await;
        let took = loop {
            if leader_of(&raw_status(survivor).await).as_deref() == Some(names[1 - k]) {
                break Some(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(60) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match took {
            Some(x) => times.push(ms(x)),
            None => println!("(failover round {round}: the survivor did not lead within 60 s)"),
        }
        d[k] = Some(spawn_daemon(&dirs[k], &configs[k]).await);
    }
    let times = sorted(times);
    table(
        &["failover (ms)", "n", "p50", "p90", "p99", "max"],
        &[dist_row("leader SIGKILLed → survivor leads", times.clone())],
    );
    stores::record(
        "failover",
        "leader killed → survivor leads, ms (lease 3 s)",
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    for x in d.into_iter().flatten() {
        x.terminate().await;
    }
}

/// The daemon's `status` as it sends it (fields this harness does not know included).
async fn raw_status(d: &Daemon) -> Value {
    optout_sync::control::request(&d.socket, &optout_sync::control::Request::Status, |_| {})
        .await
        .unwrap_or_else(|e| panic!("status: {e}"))
}

/// The leading instance's name in a raw `status`: this instance when it says it leads,
/// else the holder of an unexpired lease.
fn leader_of(v: &Value) -> Option<String> {
    if v.get("leader").and_then(Value::as_bool) == Some(true) {
        return v.get("instance")?.as_str().map(str::to_string);
    }
    let lease = v.get("cluster")?.get("lease")?;
    (lease.get("expires_in_seconds")?.as_f64()? > 0.0)
        .then(|| lease.get("holder")?.as_str().map(str::to_string))
        .flatten()
}

/// Waits up to 30 s for `status` to name a leader.
async fn wait_leader(d: &Daemon) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(l) = leader_of(&raw_status(d).await) {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
