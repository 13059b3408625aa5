//! Crash safety of the whole daemon: signed WhatsApp STOPs keep arriving while the daemon
//! pushes suppressions to HubSpot, Salesforce and an automation webhook, and the daemon is
//! SIGKILLed at seeded random moments and restarted on the same state directory each time.
//!
//! Every customer's `wa_id` is held by one HubSpot contact and one Salesforce Contact,
//! seeded before the first start. A sender delivers the STOPs like Meta: a delivery not
//! acknowledged with 200 (the daemon was down, or died mid-request) is delivered again
//! later, with the same message id. Both fakes answer a share of requests slowly, so kills
//! also land while pushes are in flight. After the last restart the test waits for the
//! daemon to converge and checks that every acknowledged STOP is in the store (the send
//! gate blocks each number), every CRM record holding a number is suppressed in both fakes,
//! every automation event was delivered, the outbox and the webhook inbox are empty, nothing
//! is a dead letter, and sampled records were read back (verified) after their push.
//!
//! Each kill is decided by a seeded generator: after a number of newly acknowledged
//! webhooks, or after a number of milliseconds of uptime, whichever the plan says.
//!
//! Sizes: CI runs 400 opt-outs and 20 kills (about 20 s in a debug build). The full run is
//! 2,000 opt-outs and 40 kills:
//!
//! ```sh
//! OPTOUT_FULL=1 cargo test --test crash -- --nocapture
//! ```
//!
//! `OPTOUT_SEED=<u64>` replays another plan (the seed is printed on every run).

mod common;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::GATE_TOKEN;
use common::config::Config;
use common::rng::{Rng, seed};
use optout_sync::report::{GateBatchReply, StatusReport};
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::json;
use tokio::sync::watch;

const APP_SECRET: &str = "meta-app-secret-for-crash-tests";
const DEFAULT_SEED: u64 = 0x0c4a_5eed_2026;

/// The `wa_id` of customer `i`: +1 415 230-0000 onwards (valid US numbers).
fn wa_id(i: usize) -> String {
    format!("1415{:03}{:04}", 230 + i / 10_000, i % 10_000)
}

fn config(dir: &Path, hubspot: &str, salesforce: &str, hook: &str) -> Config {
    Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .hubspot(hubspot)
        .set("hubspot", "requests_per_10s = 1000")
        .set("hubspot", "search_per_second = 20")
        .set("hubspot", r#"timeout = "5s""#)
        .salesforce(salesforce)
        .set("salesforce", r#"timeout = "5s""#)
        .automations(hook)
        .set("automations", r#"timeout = "5s""#)
}

/// What the Meta-like sender knows: where the daemon listens now, and what was acknowledged.
struct SendState {
    /// The webhook URL of the running daemon; `None` while it is down.
    url: Option<String>,
    next_new: usize,
    /// Deliveries to make again: (not before, customer).
    redeliver: VecDeque<(Instant, usize)>,
    acked: Vec<bool>,
    attempts: u64,
    refused: u64,
}

/// Delivers every STOP until each is acknowledged with 200, at most `rate` deliveries a
/// second (new ones and redeliveries alike), one at a time.
fn spawn_sender(
    bodies: Arc<Vec<Vec<u8>>>,
    state: Arc<Mutex<SendState>>,
    acks: watch::Sender<usize>,
    rate: f64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let acks = Arc::new(acks);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let job = {
                let mut s = state.lock().unwrap();
                if s.acked.iter().all(|a| *a) {
                    return;
                }
                let now = Instant::now();
                if s.redeliver.front().is_some_and(|(at, _)| *at <= now) {
                    s.redeliver.pop_front().map(|(_, i)| (i, s.url.clone()))
                } else if s.next_new < s.acked.len() {
                    s.next_new += 1;
                    Some((s.next_new - 1, s.url.clone()))
                } else {
                    None
                }
            };
            let Some((i, url)) = job else { continue };
            let permit = permits.clone().acquire_owned().await.unwrap();
            let (http, bodies, state, acks) =
                (http.clone(), bodies.clone(), state.clone(), acks.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let ok = match url {
                    None => false,
                    Some(url) => common::deliver_signed(&http, &url, APP_SECRET, &bodies[i]).await,
                };
                let mut s = state.lock().unwrap();
                s.attempts += 1;
                if ok {
                    if !s.acked[i] {
                        s.acked[i] = true;
                        acks.send_modify(|n| *n += 1);
                    }
                } else {
                    s.refused += 1;
                    // Meta retries unacknowledged deliveries later.
                    s.redeliver
                        .push_back((Instant::now() + Duration::from_millis(150), i));
                }
            });
        }
    })
}

/// How one kill is decided.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After this many more acknowledged webhooks (or `cap_ms`, if sending has ended).
    Acks { more: usize, cap_ms: u64 },
    /// After this long up (READY=1 received).
    Millis(u64),
}

async fn status_of(d: &common::Daemon) -> Option<StatusReport> {
    let f = optout_sync::control::status(&d.socket);
    tokio::time::timeout(Duration::from_secs(2), f)
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_stops_survive_repeated_sigkills_during_pushes_and_converge() {
    let full = std::env::var_os("OPTOUT_FULL").is_some();
    let (n, kills) = if full { (2_000, 40) } else { (400, 20) };
    let seed = seed(DEFAULT_SEED);
    eprintln!("crash: {n} opt-outs, {kills} kills, OPTOUT_SEED={seed}");
    let mut rng = Rng(seed);

    let norm = optout_sync::identity::Normalizer::new(
        optout_sync::identity::Normalizer::parse_region("US").unwrap(),
    );
    let phones: Vec<String> = (0..n)
        .map(|i| {
            norm.phone(&format!("+{}", wa_id(i)))
                .expect("a valid number")
        })
        .collect();

    // Fakes: every number on one HubSpot contact and one Salesforce Contact, in other forms.
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let sf = optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default()).await;
    let hook = optout_webhook::fake::start(optout_webhook::fake::FakeOptions::default()).await;
    let hs_ids = hs.create_contacts((0..n).map(|i| {
        let w = wa_id(i);
        optout_hubspot::fake::NewContact::new()
            .with("firstname", &format!("C{i}"))
            .with("phone", &format!("({}) {}-{}", &w[1..4], &w[4..7], &w[7..]))
    }));
    let sf_ids: Vec<String> = (0..n)
        .map(|i| {
            let w = wa_id(i);
            sf.insert(
                "Contact",
                json!({"LastName": format!("C{i}"), "MobilePhone": format!("+1 {} {} {}", &w[1..4], &w[4..7], &w[7..]), "WhatsApp_Opt_Out__c": false}),
            )
        })
        .collect();
    // Pushes take a while now and then: kills land while some are in flight.
    hs.set_faults(optout_hubspot::fake::Faults {
        slow_rate: 0.3,
        slow_by: Duration::from_millis(300),
        ..Default::default()
    });
    sf.set_faults(optout_salesforce::fake::Faults {
        slow_rate: 0.3,
        slow_delay: Duration::from_millis(300),
        ..Default::default()
    });

    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &hs.base_url(), &sf.base_url(), &hook.url());
    let started = Instant::now();
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until(
        "the first sync of both CRMs",
        Duration::from_secs(60),
        async || d.crms_polled_since(None).await,
    )
    .await;

    let now_s = optout_core::Timestamp::now().millis() / 1000;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| {
                envelope::text(
                    &Who::wa(&wa_id(i)),
                    &format!("wamid.CRASH{i:06}"),
                    now_s,
                    "STOP",
                )
            })
            .collect(),
    );
    let state = Arc::new(Mutex::new(SendState {
        url: Some(d.url("/webhooks/whatsapp")),
        next_new: 0,
        redeliver: VecDeque::new(),
        acked: vec![false; n],
        attempts: 0,
        refused: 0,
    }));
    let (acks_tx, acks) = watch::channel(0usize);
    // Spread the sending over most of the kills (restarts and downtime included).
    let rate = n as f64 / (kills as f64 * 0.3);
    let sender = spawn_sender(bodies, state.clone(), acks_tx, rate);

    let plan: Vec<KillAt> = (0..kills)
        .map(|_| {
            if rng.range(0, 1) == 0 {
                KillAt::Acks {
                    more: rng.range(1, (2 * n / kills) as u64) as usize,
                    cap_ms: rng.range(300, 1500),
                }
            } else {
                KillAt::Millis(rng.range(0, 1200))
            }
        })
        .collect();
    let mut with_pending_pushes = 0;
    for (k, at) in plan.iter().enumerate() {
        let up = tokio::time::Instant::now();
        match *at {
            KillAt::Millis(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            KillAt::Acks { more, cap_ms } => {
                let target = *acks.borrow() + more;
                let mut rx = acks.clone();
                let _ = tokio::time::timeout_at(
                    up + Duration::from_millis(cap_ms),
                    rx.wait_for(|a| *a >= target),
                )
                .await;
            }
        }
        // Is anything waiting to be pushed at this moment? (Only reported.)
        let pending: i64 = match status_of(&d).await {
            Some(s) => s.connectors.iter().map(|c| c.outbox_depth).sum(),
            None => 0,
        };
        if pending > 0 {
            with_pending_pushes += 1;
        }
        d.child.start_kill().unwrap();
        d.child.wait().await.unwrap();
        state.lock().unwrap().url = None;
        eprintln!(
            "kill {:>2}: {at:?}, {} acknowledged, {pending} pushes pending",
            k + 1,
            *acks.borrow()
        );
        d = common::start(dir.path(), &c.toml(), &c.env()).await;
        state.lock().unwrap().url = Some(d.url("/webhooks/whatsapp"));
    }

    // After the last restart: every STOP acknowledged, then convergence.
    d.until(
        "every STOP acknowledged with 200",
        Duration::from_secs(60),
        async || sender.is_finished(),
    )
    .await;
    let (attempts, refused) = {
        let s = state.lock().unwrap();
        assert!(s.acked.iter().all(|a| *a));
        (s.attempts, s.refused)
    };
    let http = reqwest::Client::new();
    let gate_url = d.url("/v1/consent/batch");
    d.until(
        "the gate blocks every acknowledged number",
        Duration::from_secs(60),
        async || {
            for chunk in phones.chunks(1000) {
                let r = http
                    .post(&gate_url)
                    .bearer_auth(GATE_TOKEN)
                    .json(&json!({"category": "utility", "ids": chunk}))
                    .send()
                    .await
                    .unwrap();
                let v: GateBatchReply = r.json().await.unwrap();
                let results = &v.results;
                if results.len() != chunk.len()
                    || results
                        .iter()
                        .any(|r| r.allowed != Some(false) || r.blocked_by.as_deref() != Some("all"))
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let s = d
        .until_suppressed_everywhere((&hs, &hs_ids), (&sf, &sf_ids), Duration::from_secs(60))
        .await;
    for c in &s.connectors {
        assert_eq!(c.dead_letters, 0, "{c:?}");
        assert_eq!(c.unverified_pushes, 0, "{c:?}");
        assert!(c.alarm.is_none(), "{c:?}");
    }
    assert_eq!(s.people("all", "opted_out"), n as i64, "{s:?}");
    assert_eq!(s.quarantined_webhooks, 0, "{s:?}");

    // Every automation event arrived (duplicates from retries are dropped by event id).
    let events = hook.events();
    let told: HashSet<&str> = events
        .iter()
        .filter(|e| e.status == "opted_out" && e.scope == "all")
        .flat_map(|e| e.identities.phones.iter().map(String::as_str))
        .collect();
    let missing: Vec<&String> = phones
        .iter()
        .filter(|p| !told.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} numbers never announced, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(events.len(), n, "one event per decision");

    // Sampled people: both records were read back after their push (verified), nothing
    // pending or rejected.
    for _ in 0..10 {
        let i = rng.range(0, n as u64 - 1) as usize;
        d.until(
            "sampled records verified by read-back",
            Duration::from_secs(30),
            async || {
                let v = optout_sync::control::request(
                    &d.socket,
                    &optout_sync::control::Request::Lookup {
                        id: phones[i].clone(),
                    },
                    |_| {},
                )
                .await
                .unwrap();
                let records = v["records"].as_array().cloned().unwrap_or_default();
                records.len() == 2
                    && records
                        .iter()
                        .all(|r| r["last_seen"] == "opted_out" && r["awaiting_readback"] == false)
            },
        )
        .await;
    }

    eprintln!(
        "crash: {n} opt-outs acknowledged after {attempts} deliveries ({refused} not acknowledged), \
         {kills} kills ({with_pending_pushes} with pushes pending), converged in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        refused > 0,
        "no delivery ever met a dead daemon: the kills did not interrupt the sending"
    );
    let exit = d.terminate().await;
    assert!(exit.success(), "exit {exit:?}");
}
