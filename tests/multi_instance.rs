//! Several daemons on one PostgreSQL database, one leader by lease.
//!
//! Two and three instances of the real binary (distinct names, state directories, ports
//! and control sockets) share one fresh database and one set of fakes (HubSpot,
//! Salesforce, WhatsApp's Graph API for confirmation replies). Signed WhatsApp STOPs are
//! delivered like Meta delivers them, spread over every instance that is up (a delivery
//! not acknowledged with 200 is delivered again, to another instance), while:
//!
//! - the leader is SIGKILLed at seeded moments and restarted, as systemd would, as a
//!   follower; the time from the kill to the new leader's first push is measured;
//! - the leader is SIGSTOPped until another instance has taken over and pushed, then
//!   resumed while the new leader is briefly stopped too (so that any push reaching the
//!   fakes in that window can only be the old leader's): it must exit with the
//!   lease-lost code and push nothing.
//!
//! Throughout, the send gate is asked on every live instance every 50 ms (the longest
//! stretch without an answer is reported) and the cursors in `status` are sampled (none
//! may move backwards). At the end every acknowledged STOP is applied (the gate blocks
//! it) and pushed to both CRMs, the outbox and the inbox are empty, nothing is a dead
//! letter, and no confirmation reply went out twice.
//!
//! Needs PostgreSQL: `OPTOUT_TEST_PG` is an administrator's URL (each test creates its
//! own database). Without it the tests are skipped with a message, except under `CI`.
//! `OPTOUT_SEED=<u64>` replays another plan (the seed is printed).

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::GATE_TOKEN;
use common::config::Config;
use common::rng::{Rng, seed};
use optout_sync::report::{GateBatchReply, StatusReport};
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::json;

const APP_SECRET: &str = "meta-app-secret-for-multi-instance-tests";
const DEFAULT_SEED: u64 = 0x5eed_0018_2026;
/// The lease: a failover takes about this long plus a third of it.
const LEASE: Duration = Duration::from_secs(3);
/// The exit code of an instance that lost the lease.
const LEASE_LOST: i32 = 75;

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn signal(d: &common::Daemon, sig: i32) {
    let pid = d.child.id().expect("running") as i32;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { kill(pid, sig) }, 0);
}

const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

/// The `wa_id` of customer `i`: +1 415 240-0000 onwards (valid US numbers).
fn wa_id(i: usize) -> String {
    format!("1415{:03}{:04}", 240 + i / 10_000, i % 10_000)
}

/// The fakes every instance shares, and the customers seeded in them.
struct World {
    hs: optout_hubspot::fake::FakeHandle,
    sf: optout_salesforce::fake::FakeHandle,
    graph: optout_whatsapp::fake::FakeGraph,
    hs_ids: Vec<String>,
    sf_ids: Vec<String>,
    phones: Vec<String>,
    db_url: String,
    root: tempfile::TempDir,
}

impl World {
    /// `n` customers, each on one HubSpot contact and one Salesforce Contact.
    async fn new(n: usize, db_url: String) -> World {
        let norm = optout_sync::identity::Normalizer::new(
            optout_sync::identity::Normalizer::parse_region("US").unwrap(),
        );
        let phones = (0..n)
            .map(|i| norm.phone(&format!("+{}", wa_id(i))).expect("valid"))
            .collect();
        let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
            limits: optout_hubspot::fake::Limits::off(),
            ..Default::default()
        })
        .await;
        let sf =
            optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
        let graph =
            optout_whatsapp::fake::start_graph(optout_whatsapp::fake::GraphOptions::default())
                .await;
        let hs_ids = hs.create_contacts((0..n).map(|i| {
            let w = wa_id(i);
            optout_hubspot::fake::NewContact::new()
                .with("firstname", &format!("C{i}"))
                .with("phone", &format!("({}) {}-{}", &w[1..4], &w[4..7], &w[7..]))
        }));
        let sf_ids = (0..n)
            .map(|i| {
                let w = wa_id(i);
                sf.insert(
                    "Contact",
                    json!({"LastName": format!("C{i}"), "MobilePhone": format!("+1 {} {} {}", &w[1..4], &w[4..7], &w[7..]), "WhatsApp_Opt_Out__c": false}),
                )
            })
            .collect();
        // Some pushes take a while: a stop or a kill lands while they are in flight.
        hs.set_faults(optout_hubspot::fake::Faults {
            slow_rate: 0.2,
            slow_by: Duration::from_millis(200),
            ..Default::default()
        });
        World {
            hs,
            sf,
            graph,
            hs_ids,
            sf_ids,
            phones,
            db_url,
            root: tempfile::tempdir().unwrap(),
        }
    }

    /// Instance `name`'s configuration: the same for every instance but the name (and
    /// where its own files and listener are).
    fn config(&self, name: &str) -> (PathBuf, String, Vec<(&'static str, String)>) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let c = Config::new(&dir)
            .shutdown_timeout("5s")
            .whatsapp(APP_SECRET)
            .graph(&self.graph.base_url())
            .set("whatsapp", "confirmations.enabled = true")
            .set("whatsapp", r#"confirmations.default_language = "en""#)
            .hubspot(&self.hs.base_url())
            .set("hubspot", "requests_per_10s = 1000")
            .set("hubspot", "search_per_second = 20")
            .set("hubspot", r#"timeout = "5s""#)
            .salesforce(&self.sf.base_url())
            .set("salesforce", r#"timeout = "5s""#)
            .env_var("OPTOUT_TEST_STORE_URL", &self.db_url);
        let toml = format!(
            "{}\n[store]\nbackend = \"postgres\"\nurl = {{ env = \"OPTOUT_TEST_STORE_URL\" }}\ninstance = \"{name}\"\nlease = \"{}s\"\n",
            c.toml(),
            LEASE.as_secs()
        );
        (dir, toml, c.env())
    }

    /// Push requests that reached the fakes: HubSpot batch updates, Salesforce
    /// collection writes, WhatsApp sends.
    fn pushes(&self) -> u64 {
        self.hs.counts().batch_update
            + self.sf.counters().collections
            + self.graph.requests("messages")
    }
}

/// Where a live instance is reached (`None` while it is down or stopped).
#[derive(Clone)]
struct Endpoint {
    addr: String,
    socket: PathBuf,
}

type Live = Arc<Mutex<Vec<Option<Endpoint>>>>;

/// The instances of one test.
struct Cluster {
    names: Vec<String>,
    daemons: Vec<Option<common::Daemon>>,
    live: Live,
}

impl Cluster {
    /// The instances started, one of them leading, and the leader's first sync of both
    /// CRMs done; `status` lists them all.
    async fn start_synced(world: &World, names: &[&str]) -> Cluster {
        let cluster = Cluster::start(world, names).await;
        let first = cluster.leader(Duration::from_secs(10), None).await;
        let d = cluster.daemon(first);
        d.until(
            "the first sync of both CRMs",
            Duration::from_secs(30),
            async || d.crms_polled_since(None).await,
        )
        .await;
        assert_status_lists(&cluster, first).await;
        cluster
    }

    async fn start(world: &World, names: &[&str]) -> Cluster {
        let mut c = Cluster {
            names: names.iter().map(|n| n.to_string()).collect(),
            daemons: names.iter().map(|_| None).collect(),
            live: Arc::new(Mutex::new(vec![None; names.len()])),
        };
        for i in 0..names.len() {
            c.start_one(world, i).await;
        }
        c
    }

    async fn start_one(&mut self, world: &World, i: usize) {
        let (dir, toml, env) = world.config(&self.names[i]);
        let d = common::start(&dir, &toml, &env).await;
        self.live.lock().unwrap()[i] = Some(Endpoint {
            addr: d.addr.clone(),
            socket: d.socket.clone(),
        });
        self.daemons[i] = Some(d);
    }

    fn daemon(&self, i: usize) -> &common::Daemon {
        self.daemons[i].as_ref().expect("running")
    }

    /// Every instance's log, for a failure message.
    fn logs(&self) -> String {
        (self.daemons.iter().flatten())
            .map(|d| d.log_text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the instance that says it leads, among those live, once one does.
    async fn leader(&self, within: Duration, except: Option<usize>) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let live = self.live.lock().unwrap().clone();
            for (i, e) in live.iter().enumerate() {
                let Some(e) = e else { continue };
                if Some(i) == except {
                    continue;
                }
                if status_at(&e.socket).await.is_some_and(|s| s.leader) {
                    return i;
                }
            }
            if Instant::now() > deadline {
                panic!("no instance leads; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs instance `i` (taking it out of the live set first).
    async fn sigkill(&mut self, i: usize) {
        self.live.lock().unwrap()[i] = None;
        let mut d = self.daemons[i].take().expect("running");
        d.child.start_kill().unwrap();
        d.child.wait().await.unwrap();
        // Its logs stay in its directory for a failure message.
        self.daemons[i] = Some(d);
    }

    /// Stops every instance with SIGTERM; each must exit cleanly.
    async fn terminate(&mut self) {
        for d in self.daemons.iter_mut().flatten() {
            if d.child.try_wait().unwrap().is_none() {
                let exit = d.terminate().await;
                assert!(exit.success(), "exit {exit:?}; log:\n{}", d.log_text());
            }
        }
    }
}

async fn status_at(socket: &std::path::Path) -> Option<StatusReport> {
    let f = optout_sync::control::status(socket);
    tokio::time::timeout(Duration::from_secs(2), f)
        .await
        .ok()?
        .ok()
}

/// Delivers STOP `i` (its body in `bodies`) until acknowledged with 200, to live
/// instances in turn, at most `rate` deliveries a second, four at a time.
struct Sender {
    acked: Arc<Mutex<Vec<bool>>>,
    refused: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

fn spawn_sender(bodies: Vec<Vec<u8>>, live: Live, rate: f64) -> Sender {
    let n = bodies.len();
    let acked = Arc::new(Mutex::new(vec![false; n]));
    let refused = Arc::new(Mutex::new(0u64));
    let (a, r, bodies) = (acked.clone(), refused.clone(), Arc::new(bodies));
    let task = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let permits = Arc::new(tokio::sync::Semaphore::new(4));
        let queue = Arc::new(Mutex::new((0..n).collect::<VecDeque<usize>>()));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut turn = 0usize;
        loop {
            tick.tick().await;
            if a.lock().unwrap().iter().all(|x| *x) {
                return;
            }
            let Some(i) = queue.lock().unwrap().pop_front() else {
                continue;
            };
            let urls: Vec<String> = (live.lock().unwrap().iter().flatten())
                .map(|e| format!("http://{}/webhooks/whatsapp", e.addr))
                .collect();
            turn += 1;
            let url = (!urls.is_empty()).then(|| urls[turn % urls.len()].clone());
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (http, bodies, a, r, queue) = (
                http.clone(),
                bodies.clone(),
                a.clone(),
                r.clone(),
                queue.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                let ok = match url {
                    None => false,
                    Some(url) => common::deliver_signed(&http, &url, APP_SECRET, &bodies[i]).await,
                };
                if ok {
                    a.lock().unwrap()[i] = true;
                } else {
                    *r.lock().unwrap() += 1;
                    // Meta delivers an unacknowledged webhook again later.
                    queue.lock().unwrap().push_back(i);
                }
            });
        }
    });
    Sender {
        acked,
        refused,
        task,
    }
}

fn stop_bodies(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    range
        .map(|i| {
            envelope::text(
                &Who::wa(&wa_id(i)),
                &format!("wamid.MI{i:06}"),
                now_s,
                "STOP",
            )
        })
        .collect()
}

/// What the watchers saw while the test ran.
#[derive(Default)]
struct Watched {
    /// The longest stretch without an answer from the gate of any live instance.
    gate_gap: Duration,
    gate_answers: u64,
    /// Cursor samples that went backwards.
    backwards: Vec<String>,
    cursor_samples: u64,
}

/// Asks the gate on every live instance every 50 ms (without waiting for answers, so a
/// stopped instance delays nothing), and samples the cursors in `status` on a task of its
/// own, until `stop`.
fn spawn_watchers(
    live: Live,
    phone: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Watched> {
    let cursors = tokio::spawn(sample_cursors(live.clone(), stop.clone()));
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(400))
            .build()
            .unwrap();
        let answers: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let started = Instant::now();
        let mut asks = tokio::task::JoinSet::new();
        while !stop.load(Ordering::Acquire) {
            let endpoints: Vec<Endpoint> = live.lock().unwrap().iter().flatten().cloned().collect();
            for e in &endpoints {
                let url = format!("http://{}/v1/consent/{phone}", e.addr);
                let (http, answers) = (http.clone(), answers.clone());
                asks.spawn(async move {
                    let r = http.get(url).bearer_auth(GATE_TOKEN).send().await;
                    if r.is_ok_and(|r| r.status() == 200) {
                        answers.lock().unwrap().push(Instant::now());
                    }
                });
            }
            while asks.try_join_next().is_some() {}
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while asks.join_next().await.is_some() {}
        let mut at = answers.lock().unwrap().clone();
        at.sort();
        let mut w = cursors.await.unwrap();
        w.gate_answers = at.len() as u64;
        w.gate_gap = (at.windows(2).map(|p| p[1] - p[0]))
            .chain(at.first().map(|f| *f - started))
            .max()
            .unwrap_or(Duration::MAX);
        w
    })
}

/// Samples the cursors in `status` (of each live instance in turn) every 200 ms: none may
/// be before the one sampled last.
async fn sample_cursors(live: Live, stop: Arc<AtomicBool>) -> Watched {
    let mut w = Watched::default();
    let mut cursors: BTreeMap<String, String> = BTreeMap::new();
    let mut turn = 0usize;
    while !stop.load(Ordering::Acquire) {
        turn += 1;
        let endpoints: Vec<Endpoint> = live.lock().unwrap().iter().flatten().cloned().collect();
        if let Some(e) = endpoints.get(turn % endpoints.len().max(1))
            && let Some(s) = status_at(&e.socket).await
        {
            w.cursor_samples += 1;
            for c in &s.connectors {
                let Some(cur) = &c.cursor else { continue };
                if let Some(prev) = cursors.get(&c.name)
                    && cursor_before(cur, prev)
                {
                    w.backwards.push(format!("{}: {prev} then {cur}", c.name));
                }
                cursors.insert(c.name.clone(), cur.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w
}

/// Whether cursor `a` is before `b`: as numbers, as times, else as text of equal length
/// (a cursor neither can be compared by is never counted).
fn cursor_before(a: &str, b: &str) -> bool {
    if let (Ok(x), Ok(y)) = (a.parse::<i128>(), b.parse::<i128>()) {
        return x < y;
    }
    if let (Some(x), Some(y)) = (
        optout_core::Timestamp::parse(a),
        optout_core::Timestamp::parse(b),
    ) {
        return x < y;
    }
    a.len() == b.len() && a < b
}

/// One failover by SIGKILL: which instance led and was killed, which took over, how long
/// the take-over took, and when the first push after the kill reached the fakes.
struct Failover {
    old: usize,
    new: usize,
    takeover: Duration,
    push: Duration,
}

async fn kill_the_leader(cluster: &mut Cluster, world: &World) -> Failover {
    let old = cluster.leader(Duration::from_secs(10), None).await;
    let killed = Instant::now();
    cluster.sigkill(old).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let base = world.pushes();
    let new = cluster.leader(Duration::from_secs(15), Some(old)).await;
    let takeover = killed.elapsed();
    let push = first_push_after(world, base, killed).await;
    Failover {
        old,
        new,
        takeover,
        push,
    }
}

/// Waits until the fakes have received a push more than `base`; the time it took.
async fn first_push_after(world: &World, base: u64, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.pushes() <= base {
        assert!(Instant::now() < deadline, "no push after the failover");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed()
}

/// The end state: every acknowledged STOP applied (the gate blocks it) and pushed to
/// both CRMs; nothing left in the outbox or the inbox; no dead letter; no confirmation
/// sent twice.
async fn assert_converged(world: &World, cluster: &Cluster, sender: &Sender) {
    let acked = sender.acked.lock().unwrap().clone();
    let n = acked.len();
    assert!(acked.iter().all(|a| *a), "every STOP was acknowledged");
    let i = cluster.leader(Duration::from_secs(20), None).await;
    let d = cluster.daemon(i);
    let http = reqwest::Client::new();
    let gate_url = d.url("/v1/consent/batch");
    let phones = &world.phones[..n];
    d.until(
        "the gate blocks every acknowledged number",
        Duration::from_secs(30),
        async || {
            let r = http
                .post(&gate_url)
                .bearer_auth(GATE_TOKEN)
                .json(&json!({"category": "utility", "ids": phones}))
                .send()
                .await
                .unwrap();
            let v: GateBatchReply = r.json().await.unwrap();
            v.results.len() == phones.len() && v.results.iter().all(|r| r.allowed == Some(false))
        },
    )
    .await;
    let s = d
        .until_suppressed_everywhere(
            (&world.hs, &world.hs_ids[..n]),
            (&world.sf, &world.sf_ids[..n]),
            Duration::from_secs(30),
        )
        .await;
    for c in &s.connectors {
        assert_eq!(c.dead_letters, 0, "{c:?}");
    }
    assert_eq!(s.people("all", "opted_out"), phones.len() as i64, "{s:?}");
    let sent = world.graph.sent();
    let mut replied: HashMap<String, usize> = HashMap::new();
    for m in &sent {
        let to = m
            .context_message_id
            .clone()
            .or(m.to.clone())
            .unwrap_or_default();
        *replied.entry(to).or_default() += 1;
    }
    let twice: Vec<_> = replied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "confirmations sent more than once: {twice:?}"
    );
    eprintln!(
        "converged: {} opt-outs applied and pushed; {} confirmation replies sent (at most one each)",
        phones.len(),
        sent.len()
    );
}

/// The `status` of one instance shows every instance and the leader with its lease.
async fn assert_status_lists(cluster: &Cluster, leader: usize) {
    let s = cluster.daemon(leader).status().await;
    let roll = s.cluster.as_ref().expect("the roll call on PostgreSQL");
    let lease = roll.lease.as_ref().expect("a lease");
    assert_eq!(lease.holder, cluster.names[leader]);
    assert!(lease.expires_in_seconds > 0.0, "{lease:?}");
    let live = cluster.live.lock().unwrap().clone();
    for (i, name) in cluster.names.iter().enumerate() {
        let row = (roll.instances.iter().find(|r| &r.name == name))
            .unwrap_or_else(|| panic!("{name} in {roll:?}"));
        if live[i].is_some() {
            assert!(!row.gone, "{row:?}");
            assert_eq!(row.leader, i == leader, "{row:?}");
            // Each instance's own view: `status` and the `optout_leader` gauge.
            let d = cluster.daemon(i);
            assert_eq!(d.status().await.leader, i == leader);
            let metrics = reqwest::get(d.url("/metrics")).await.unwrap();
            let text = metrics.text().await.unwrap();
            let gauge = format!(
                "optout_leader{{instance=\"{name}\"}} {}",
                u8::from(i == leader)
            );
            assert!(text.contains(&gauge), "{gauge} in:\n{text}");
        }
    }
    // The command, as an operator runs it on any instance.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .arg("status")
        .arg("--config")
        .arg(&cluster.daemon(leader).config)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let leads = format!("leader: {} (lease epoch", cluster.names[leader]);
    assert!(text.contains(&leads), "{text}");
    for name in &cluster.names {
        assert!(text.contains(&format!("instance {name}")), "{text}");
    }
}

/// Two instances; the leader is SIGKILLed twice at seeded moments under load and comes
/// back as a follower each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_fail_over_when_the_leader_is_killed() {
    let Some(url) = tokio::task::block_in_place(common::fresh_pg_database) else {
        return;
    };
    let seed = seed(DEFAULT_SEED);
    eprintln!("multi_instance (two): OPTOUT_SEED={seed}");
    let mut rng = Rng(seed);
    let n = 160;
    let extra = 8;
    let world = World::new(n + extra, url).await;
    let mut cluster = Cluster::start_synced(&world, &["alpha", "beta"]).await;

    let load = Load::start(&world, &cluster, n);
    let mut failovers = Vec::new();
    for k in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.range(800, 2500))).await;
        let f = kill_the_leader(&mut cluster, &world).await;
        eprintln!(
            "kill {}: {} killed; {} leads after {:.2}s, first push after {:.2}s",
            k + 1,
            cluster.names[f.old],
            cluster.names[f.new],
            f.takeover.as_secs_f64(),
            f.push.as_secs_f64()
        );
        failovers.push(f.push);
        cluster.start_one(&world, f.old).await;
    }
    cluster.leader(Duration::from_secs(10), None).await;
    let leader = load.settle("two", &world, &cluster, &failovers).await;

    // Propagation from a follower's webhook to the CRM push, in quiet conditions.
    let follower = 1 - leader;
    // A resync needs the poll workers: a follower refuses it and names the leader.
    let resync = optout_sync::control::Request::Resync {
        connector: None,
        full: false,
    };
    let refused = optout_sync::control::request(&cluster.daemon(follower).socket, &resync, |_| {})
        .await
        .expect_err("a follower refuses a resync")
        .to_string();
    let named = format!("on the leader (instance {})", cluster.names[leader]);
    assert!(refused.contains(&named), "{refused}");
    let url = cluster.daemon(follower).url("/webhooks/whatsapp");
    let http = reqwest::Client::new();
    let mut took = Vec::new();
    for (j, body) in (n..n + extra).zip(stop_bodies(n..n + extra)) {
        let sent = Instant::now();
        assert!(
            common::deliver_signed(&http, &url, APP_SECRET, &body).await,
            "the follower answered the signed STOP with a 200"
        );
        let id = &world.hs_ids[j];
        common::eventually(
            "the follower's opt-out pushed",
            Duration::from_secs(10),
            async || world.hs.property(id, "whatsapp_consent").as_deref() == Some("opted_out"),
        )
        .await;
        took.push(sent.elapsed());
    }
    eprintln!(
        "propagation, follower webhook → HubSpot push: {:?} ms",
        took.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    cluster.terminate().await;
}

/// The load a failover test runs under: `n` signed STOPs at 20 a second to the live
/// instances, and watchers asking the gate and sampling the cursors meanwhile.
struct Load {
    stop: Arc<AtomicBool>,
    watchers: tokio::task::JoinHandle<Watched>,
    sender: Sender,
}

impl Load {
    fn start(world: &World, cluster: &Cluster, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let watchers = spawn_watchers(cluster.live.clone(), world.phones[0].clone(), stop.clone());
        let sender = spawn_sender(stop_bodies(0..n), cluster.live.clone(), 20.0);
        Load {
            stop,
            watchers,
            sender,
        }
    }

    /// Every STOP acknowledged, the watchers stopped, everything converged and `status`
    /// listing every instance; then the figures. Returns the leader.
    async fn settle(
        self,
        test: &str,
        world: &World,
        cluster: &Cluster,
        failovers: &[Duration],
    ) -> usize {
        let sender = &self.sender;
        common::eventually(
            "every STOP acknowledged",
            Duration::from_secs(40),
            async || sender.task.is_finished(),
        )
        .await;
        self.stop.store(true, Ordering::Release);
        let watched = self.watchers.await.unwrap();
        assert_converged(world, cluster, sender).await;
        let leader = cluster.leader(Duration::from_secs(5), None).await;
        assert_status_lists(cluster, leader).await;
        report_watched(test, &watched, failovers, *sender.refused.lock().unwrap());
        leader
    }
}

fn report_watched(test: &str, w: &Watched, failovers: &[Duration], refused: u64) {
    eprintln!(
        "{test}: failover (kill → first push) {:?} ms with a {}s lease; gate: {} answers, longest gap {} ms; {} cursor samples; {refused} deliveries refused and redelivered",
        failovers.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        LEASE.as_secs(),
        w.gate_answers,
        w.gate_gap.as_millis(),
        w.cursor_samples
    );
    assert!(
        w.backwards.is_empty(),
        "cursors moved backwards: {:?}",
        w.backwards
    );
    assert!(w.cursor_samples > 0);
    assert!(
        w.gate_gap < Duration::from_secs(2),
        "the gate went unanswered for {:?}",
        w.gate_gap
    );
    for f in failovers {
        assert!(*f < LEASE * 3, "a failover took {f:?}");
    }
}

/// Three instances; the leader is SIGSTOPped past its lease, another takes over and
/// pushes; the old leader is resumed while the new one is briefly stopped too: it must
/// exit with the lease-lost code and no push may reach the fakes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_and_a_paused_leader_resumed_after_its_lease_never_pushes() {
    let Some(url) = tokio::task::block_in_place(common::fresh_pg_database) else {
        return;
    };
    let seed = seed(DEFAULT_SEED);
    eprintln!("multi_instance (three): OPTOUT_SEED={seed}");
    let mut rng = Rng(seed ^ 0x3);
    let n = 120;
    let world = World::new(n, url).await;
    let mut cluster = Cluster::start_synced(&world, &["ant", "bee", "cat"]).await;

    let load = Load::start(&world, &cluster, n);
    let mut failovers = Vec::new();

    // One SIGKILL first, at a seeded moment.
    tokio::time::sleep(Duration::from_millis(rng.range(500, 1500))).await;
    let f = kill_the_leader(&mut cluster, &world).await;
    failovers.push(f.push);
    cluster.start_one(&world, f.old).await;

    // The leader paused past its lease.
    tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
    let paused = cluster.leader(Duration::from_secs(10), None).await;
    cluster.live.lock().unwrap()[paused] = None;
    signal(cluster.daemon(paused), SIGSTOP);
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let base = world.pushes();
    let successor = cluster.leader(Duration::from_secs(15), Some(paused)).await;
    failovers.push(first_push_after(&world, base, stopped).await);
    eprintln!(
        "{} paused; {} took over and pushed after {:.2}s",
        cluster.names[paused],
        cluster.names[successor],
        failovers[1].as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The successor stops for a moment: any push reaching the fakes now is the old
    // leader's. Requests it had already sent land first.
    let endpoint = cluster.live.lock().unwrap()[successor].take();
    signal(cluster.daemon(successor), SIGSTOP);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = world.pushes();
    signal(cluster.daemon(paused), SIGCONT);
    let resumed = Instant::now();
    let mut old_leader = cluster.daemons[paused].take().expect("paused");
    let exit = tokio::time::timeout(Duration::from_secs(5), old_leader.child.wait())
        .await
        .expect("the resumed old leader exits")
        .unwrap();
    let exited = resumed.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = world.pushes();
    signal(cluster.daemon(successor), SIGCONT);
    cluster.live.lock().unwrap()[successor] = endpoint;
    assert_eq!(
        exit.code(),
        Some(LEASE_LOST),
        "the old leader exits with the lease-lost code; log:\n{}",
        old_leader.log_text()
    );
    assert_eq!(
        after, before,
        "the resumed old leader pushed after its lease expired"
    );
    assert!(old_leader.log_text().contains("no longer leads"));
    eprintln!(
        "{} resumed {:.1}s after its pause: exited with {LEASE_LOST} after {} ms, no push",
        cluster.names[paused],
        (resumed - stopped).as_secs_f64(),
        exited.as_millis()
    );
    // As systemd would: it comes back, as a follower.
    cluster.daemons[paused] = Some(old_leader);
    cluster.start_one(&world, paused).await;

    load.settle("three", &world, &cluster, &failovers).await;
    cluster.terminate().await;
}
