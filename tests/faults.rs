//! Every remote system misbehaving at once, at configured rates, while opt-outs pour in;
//! and the cost of it compared with the same workload fault-free.
//!
//! The workload: `n` customers, each number held by one HubSpot contact and one Salesforce
//! Contact. Most opt out by a signed WhatsApp STOP, delivered by a Meta-like sender (eight
//! deliveries at a time, each retried until acknowledged) as fast as the daemon
//! acknowledges; a seeded 5 % opt out by an agent's edit in HubSpot, interleaved. The
//! daemon must suppress every record in both CRMs and announce every decision to an
//! automation webhook receiver.
//!
//! The faults, by [`Mix`] (the fault-free run has the same workload and configuration, and
//! both mixes compare against one fault-free run):
//! - whole requests (`crm_outages_…`): HubSpot's 10-second window and per-second search
//!   limit set below what the daemon is configured to use (150 per 10 s, 4 searches a
//!   second), so the fake really answers 429s, with `Retry-After` for the window; 5 % 503s,
//!   3 % connections dropped mid-body, 3 % answers slower than the connector's 2 s timeout;
//!   OAuth access tokens expired at each quarter of the sending and once after it.
//!   Salesforce: 5 % 503s, 3 % connections cut after the work was done, 3 % truncated JSON
//!   after the work was done, 3 % answers slower than the 2 s timeout; sessions expired like
//!   HubSpot's tokens.
//! - all (`every_fault_at_once_…`): those, plus per-record failures: 2 % of the records of
//!   each Salesforce collections update refused with `UNABLE_TO_LOCK_ROW`, and the automation
//!   receiver's 4 % 500s, 1 % 429s with `Retry-After: 1`, 0.5 % answers slower than the 2 s
//!   timeout (the event is recorded first, so a duplicate follows) and 3 % dropped
//!   connections. The receiver's rates are lower than the CRMs' because each event is its
//!   own request and the connector (rightly) sends nothing more of a batch after a 429 and
//!   waits for a slow answer before the next batch: at 4 % 429s and 2 % slow answers a
//!   compliant sender gets about 25 events a second through, and the 10,000-event run
//!   spends seven minutes waiting for the receiver rather than testing the daemon.
//!
//! What must hold in both runs: every record suppressed in both fakes, every decision
//! delivered to the receiver (deduplicated by event id), the send gate blocking every
//! number, the outbox and the webhook inbox empty, no dead letter, no alarm.
//!
//! No retry storm: per system, `requests(faulty) ≤ 2 × requests(fault-free) + idle polls of
//! the longer run + 100`. Why this bound: a fault costs the request it hit and, when it hits
//! a push, one repeat of that batch, so at fault rates of about 15 % per request the work
//! grows by well under a half; retried entries go out in batches of their own, which at most
//! doubles the number of push requests. Polling is paced by the clock, not by the work: each
//! CRM polls every `POLL` when idle, so a run that takes longer because it waited out
//! `Retry-After`s and back-offs may spend `extra seconds / POLL × 2` more requests on polls
//! (a poll with an overlap window can take two requests); the constant covers token
//! refreshes and health checks. A storm (retrying at once, or ignoring `Retry-After`)
//! multiplies requests by far more than this. Token refreshes are bounded too: five
//! expiries may cost a few refreshes each, not one per request.
//!
//! Sizes, in CI too: 10,000 opt-outs per run with every fault at once (its fault-free run
//! has the same size), and 1,000 for the whole-request subset. `OPTOUT_FAULTS_N` sets both,
//! for a quick run while iterating:
//!
//! ```sh
//! OPTOUT_FAULTS_N=1000 cargo test --test faults -- --nocapture
//! ```
//!
//! The fakes' fault dice are seeded; `OPTOUT_SEED=<u64>` changes this test's seeded choices
//! (which customers opt out in HubSpot, and the fakes' seeds).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::GATE_TOKEN;
use common::config::Config;
use common::rng::{Rng, seed};
use optout_hubspot::fake as hsfake;
use optout_salesforce::fake as sffake;
use optout_sync::report::GateBatchReply;
use optout_webhook::fake as hookfake;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::json;

const APP_SECRET: &str = "meta-app-secret-for-fault-tests";
const DEFAULT_SEED: u64 = 0xfa17_5eed_2026;
/// Concurrent webhook deliveries while sending (the `tokio::join!` in [`run`] has this many).
const LANES: usize = 8;
/// The CRMs' poll interval.
const POLL: Duration = Duration::from_secs(1);

/// The `wa_id` of customer `i`: +1 415 230-0000 onwards (valid US numbers).
fn wa_id(i: usize) -> String {
    format!("1415{:03}{:04}", 230 + i / 10_000, i % 10_000)
}

/// The daemon's configuration, the same for the fault-free run and the faulty ones: HubSpot
/// is told 150 requests per 10 s and 4 searches a second (above what the faulty fake
/// allows), every connector times out after 2 s, and pushes linger 50 ms to fill a batch.
fn config(dir: &Path, hubspot: &str, salesforce: &str, hook: &str) -> Config {
    let poll = format!("poll_interval = \"{}ms\"", POLL.as_millis());
    let mut c = Config::new(dir)
        .shutdown_timeout("5s")
        .whatsapp(APP_SECRET)
        .hubspot_oauth(hubspot, "hs-client", "hs-client-secret", "hs-refresh-token")
        .set("hubspot", &poll)
        .set("hubspot", "requests_per_10s = 150")
        .set("hubspot", "search_per_second = 4")
        .salesforce(salesforce)
        .set("salesforce", &poll)
        .automations(hook);
    for connector in ["hubspot", "salesforce", "automations"] {
        c = c
            .set(connector, r#"push_linger = "50ms""#)
            .set(connector, r#"timeout = "2s""#);
    }
    c
}

/// What one run cost, per system.
#[derive(Debug, Clone, Copy)]
struct Figures {
    elapsed: Duration,
    hubspot: hsfake::Counts,
    salesforce: sffake::Counters,
    hook: hookfake::Counters,
    /// Automation deliveries accepted, duplicates included.
    hook_deliveries: usize,
}

impl Figures {
    fn hubspot_requests(&self) -> u64 {
        let c = self.hubspot;
        c.search + c.batch_update + c.other
    }

    fn salesforce_requests(&self) -> u64 {
        let c = self.salesforce;
        c.query + c.query_more + c.collections + c.limits
    }
}

/// `Ok` when nobody is left, else who is left (at most ten) and how they opted out.
fn missing(left: &[usize], origin: impl Fn(usize) -> &'static str) -> Result<(), String> {
    if left.is_empty() {
        return Ok(());
    }
    let some: Vec<String> = left
        .iter()
        .take(10)
        .map(|i| format!("#{i} {} ({})", wa_id(*i), origin(*i)))
        .collect();
    Err(format!("{} left, e.g. {}", left.len(), some.join(", ")))
}

/// The fault runs are heavy (thousands of requests with injected delays); on a 2-core
/// machine they run one at a time so their deadlines measure the daemon, not the queue.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until `check` passes, re-checking every 100 ms; on timeout panics with what is
/// still wrong and the end of the daemon's log.
async fn converge(
    d: &common::Daemon,
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let problem = match check().await {
            Ok(()) => return,
            Err(p) => p,
        };
        if tokio::time::Instant::now() > deadline {
            let log = d.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(300)..].join("\n");
            panic!("timed out waiting for: {what}: {problem}\nend of the daemon log:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the workload against fresh fakes and a fresh daemon; returns what it cost once
/// everything has converged.
async fn run(n: usize, seed: u64, mix: Mix, within: Duration) -> Figures {
    let faulty = mix != Mix::None;
    let label = if faulty { "faulty" } else { "fault-free" };
    let mut rng = Rng(seed);
    let in_hubspot: Vec<bool> = (0..n).map(|_| rng.chance(0.05)).collect();
    let norm = optout_sync::identity::Normalizer::new(
        optout_sync::identity::Normalizer::parse_region("US").unwrap(),
    );
    let phones: Vec<String> = (0..n)
        .map(|i| {
            norm.phone(&format!("+{}", wa_id(i)))
                .expect("a valid number")
        })
        .collect();

    let hs = hsfake::start(hsfake::FakeOptions {
        token: None,
        oauth: Some(hsfake::FakeOAuth {
            client_id: "hs-client".into(),
            client_secret: "hs-client-secret".into(),
            refresh_token: "hs-refresh-token".into(),
            expires_in: Duration::from_secs(1800),
        }),
        limits: hsfake::Limits::off(),
        ..Default::default()
    })
    .await;
    let sf = sffake::start(sffake::FakeOptions {
        seed: seed | 1,
        ..Default::default()
    })
    .await;
    let hook = hookfake::start(hookfake::FakeOptions {
        seed,
        ..Default::default()
    })
    .await;
    let hs_ids = hs.create_contacts((0..n).map(|i| {
        let w = wa_id(i);
        hsfake::NewContact::new()
            .with("firstname", &format!("C{i}"))
            .with("phone", &format!("({}) {}-{}", &w[1..4], &w[4..7], &w[7..]))
    }));
    let sf_ids: Vec<String> = (0..n)
        .map(|i| {
            let w = wa_id(i);
            sf.insert(
                "Contact",
                json!({"LastName": format!("C{i}"), "MobilePhone": format!("+1{}", &w[1..]), "WhatsApp_Opt_Out__c": false}),
            )
        })
        .collect();
    if mix != Mix::None {
        // Limits below the daemon's configured 150 per 10 s and 4 searches a second: the
        // fake answers real 429s (with `Retry-After` for the window) whenever it bursts.
        hs.set_limits(hsfake::Limits {
            per_window: Some(100),
            window: Duration::from_secs(10),
            search_per_second: Some(2),
            daily: None,
        });
        hs.set_faults(hsfake::Faults {
            error_rate: 0.05,
            drop_rate: 0.03,
            slow_rate: 0.03,
            slow_by: Duration::from_secs(3),
            ..Default::default()
        });
        sf.set_faults(sffake::Faults {
            server_error_rate: 0.05,
            drop_rate: 0.03,
            malformed_rate: 0.03,
            slow_rate: 0.03,
            slow_delay: Duration::from_secs(3),
            lock_rate: 0.0,
        });
    }
    if mix == Mix::All {
        sf.set_faults(sffake::Faults {
            server_error_rate: 0.05,
            drop_rate: 0.03,
            malformed_rate: 0.03,
            slow_rate: 0.03,
            slow_delay: Duration::from_secs(3),
            lock_rate: 0.02,
        });
        hook.set_rates(hookfake::FaultRates {
            server_error: 0.04,
            too_many_requests: 0.01,
            retry_after_secs: 1,
            slow: 0.005,
            slow_for: Duration::from_secs(3),
            drop: 0.03,
            gone: 0.0,
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &hs.base_url(), &sf.base_url(), &hook.url());
    let started = Instant::now();
    let d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until(
        &format!("{label}: the first sync of both CRMs"),
        Duration::from_secs(120),
        async || d.crms_polled_since(None).await,
    )
    .await;

    // The opt-outs, in customer order over `LANES` concurrent lanes (Meta delivers a
    // number's webhooks concurrently too): a Meta-like sender delivers each STOP as fast as
    // the daemon acknowledges, and agents edit HubSpot for some.
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET)
        .with_retries(5, Duration::from_millis(50));
    let (hs, sf, sender, in_hubspot, hs_ids) = (&hs, &sf, &sender, &in_hubspot, &hs_ids);
    let lane = |k: usize| async move {
        for i in (k..n).step_by(LANES) {
            if in_hubspot[i] {
                let at = optout_core::Timestamp::now().to_rfc3339();
                assert!(hs.edit_contact(
                    &hs_ids[i],
                    &[
                        ("whatsapp_consent", "opted_out"),
                        ("whatsapp_consent_changed_at", &at),
                    ],
                ));
            } else {
                let body = envelope::text(
                    &Who::wa(&wa_id(i)),
                    &format!("wamid.FAULT{i:06}"),
                    now_s,
                    "STOP",
                );
                let delivery = sender.deliver(&body).await;
                assert!(delivery.delivered, "{i}: {:?}", delivery.attempts);
            }
            // Tokens and sessions expire at each quarter of the sending.
            if faulty && (i + 1) % (n / 4) == 0 {
                hs.expire_access_tokens();
                sf.expire_tokens();
            }
        }
    };
    tokio::join!(
        lane(0),
        lane(1),
        lane(2),
        lane(3),
        lane(4),
        lane(5),
        lane(6),
        lane(7)
    );
    let sending = started.elapsed();
    if faulty {
        hs.expire_access_tokens();
        sf.expire_tokens();
    }

    let http = reqwest::Client::new();
    let gate_url = d.url("/v1/consent/batch");
    let origin = |i: usize| {
        if in_hubspot[i] {
            "HubSpot edit"
        } else {
            "WhatsApp STOP"
        }
    };
    converge(
        &d,
        &format!("{label}: every HubSpot contact suppressed"),
        within,
        async || {
            let left: Vec<usize> = (0..n)
                .filter(|i| {
                    hs.property(&hs_ids[*i], "whatsapp_consent").as_deref() != Some("opted_out")
                })
                .collect();
            missing(&left, origin)
        },
    )
    .await;
    converge(
        &d,
        &format!("{label}: every Salesforce Contact suppressed"),
        within,
        async || {
            let left: Vec<usize> = (0..n)
                .filter(|i| {
                    !sf.get(&sf_ids[*i])
                        .is_some_and(|v| v["WhatsApp_Opt_Out__c"] == json!(true))
                })
                .collect();
            missing(&left, origin)
        },
    )
    .await;
    converge(
        &d,
        &format!("{label}: every decision announced to the automation webhook"),
        within,
        async || {
            let told: HashSet<String> = hook
                .events()
                .into_iter()
                .filter(|e| e.status == "opted_out" && e.scope == "all")
                .flat_map(|e| e.identities.phones)
                .collect();
            let left: Vec<usize> = (0..n).filter(|i| !told.contains(&phones[*i])).collect();
            missing(&left, origin)
        },
    )
    .await;
    converge(
        &d,
        &format!("{label}: the outbox is empty"),
        within,
        async || {
            let s = d.status().await;
            if s.connectors.iter().all(|c| c.outbox_depth == 0) {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let figures = Figures {
        elapsed: started.elapsed(),
        hubspot: hs.counts(),
        salesforce: sf.counters(),
        hook: hook.counters(),
        hook_deliveries: hook.deliveries().len(),
    };

    // Nothing lost, nothing rejected, nobody alarmed; the gate blocks every number.
    let s = d.status().await;
    for c in &s.connectors {
        assert_eq!(c.dead_letters, 0, "{label}: {c:?}");
        assert!(c.alarm.is_none(), "{label}: {c:?}");
    }
    assert_eq!(s.people("all", "opted_out"), n as i64, "{label}: {s:?}");
    assert_eq!(s.webhook_inbox, 0, "{label}: {s:?}");
    assert_eq!(hook.events().len(), n, "{label}: one event per decision");
    for chunk in phones.chunks(1000) {
        let v: GateBatchReply = http
            .post(&gate_url)
            .bearer_auth(GATE_TOKEN)
            .json(&json!({"category": "marketing", "ids": chunk}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let results = &v.results;
        assert_eq!(results.len(), chunk.len());
        assert!(
            results.iter().all(|r| r.allowed == Some(false)),
            "{label}: the gate lets someone through"
        );
    }
    if faulty {
        // The faults really happened.
        assert!(figures.hubspot.rate_limited > 0, "{figures:?}");
        assert!(figures.hubspot.faults > 0, "{figures:?}");
        assert!(figures.hubspot.unauthorized > 0, "{figures:?}");
        assert!(figures.salesforce.unauthorized > 0, "{figures:?}");
        // Both CRMs' workers met failures and retried (the status counts them).
        for c in &s.connectors {
            if c.kind == "hubspot" || c.kind == "salesforce" {
                let errors = c.poll_errors + c.push_errors;
                assert!(errors > 0, "{label}: {c:?}");
            }
        }
        assert!(mix != Mix::All || figures.hook.faults > 0, "{figures:?}");
    }
    eprintln!(
        "{label}: {n} opt-outs sent in {:.1}s, converged after {:.1}s\n  hubspot {:?}\n  salesforce {:?}\n  hook {:?}, {} deliveries",
        sending.as_secs_f64(),
        figures.elapsed.as_secs_f64(),
        figures.hubspot,
        figures.salesforce,
        figures.hook,
        figures.hook_deliveries,
    );
    let mut d = d;
    let exit = d.terminate().await;
    assert!(exit.success(), "{label}: exit {exit:?}");
    figures
}

/// Which faults a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    None,
    /// Faults that fail a whole request: HubSpot's 429s, 5xx, drops, timeouts and expired
    /// tokens; Salesforce's 5xx, drops, malformed JSON, timeouts and expired sessions.
    WholeRequests,
    /// All of those, plus per-record failures: Salesforce's `UNABLE_TO_LOCK_ROW` and every
    /// fault of the automation receiver (each event is its own request in a batch).
    All,
}

/// Opt-outs per run: 10,000 with every fault at once (the size the fault tests are specified
/// at); 1,000 for the whole-request subset, kept to tell the two kinds of fault apart when one
/// fails. `OPTOUT_FAULTS_N` sets both.
fn size(mix: Mix) -> usize {
    std::env::var("OPTOUT_FAULTS_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if mix == Mix::All { 10_000 } else { 1_000 })
}

/// Fault-free runs by size, shared by the tests that compare against them (they run one at a
/// time): each size is run once per process.
static BASELINES: tokio::sync::Mutex<Vec<(usize, Figures)>> =
    tokio::sync::Mutex::const_new(Vec::new());

/// Runs the workload fault-free (once per size), then with `mix`; asserts the request bound.
async fn compare(mix: Mix) {
    let (n, seed) = (size(mix), seed(DEFAULT_SEED));
    eprintln!("faults: {n} opt-outs per run, {mix:?}, OPTOUT_SEED={seed}");
    let within = Duration::from_secs(if n > 5_000 { 900 } else { 120 });
    let known = BASELINES
        .lock()
        .await
        .iter()
        .find(|b| b.0 == n)
        .map(|b| b.1);
    let clean = match known {
        Some(f) => f,
        None => {
            let f = run(n, seed, Mix::None, within).await;
            BASELINES.lock().await.push((n, f));
            f
        }
    };
    let faulty = run(n, seed, mix, within).await;

    let extra = faulty.elapsed.saturating_sub(clean.elapsed);
    let idle_polls = (extra.as_secs_f64() / POLL.as_secs_f64()).ceil() as u64 * 2;
    let bound = |fault_free: u64| 2 * fault_free + idle_polls + 100;
    let checks = [
        (
            "HubSpot",
            clean.hubspot_requests(),
            faulty.hubspot_requests(),
        ),
        (
            "Salesforce",
            clean.salesforce_requests(),
            faulty.salesforce_requests(),
        ),
        (
            "automation webhook",
            clean.hook.hook_requests,
            faulty.hook.hook_requests,
        ),
    ];
    for (system, fault_free, with_faults) in checks {
        eprintln!(
            "{system}: {with_faults} requests with faults, {fault_free} without (bound {})",
            bound(fault_free)
        );
        assert!(
            with_faults <= bound(fault_free),
            "{system}: {with_faults} requests with faults against {fault_free} without: a retry storm"
        );
    }
    // Tokens: five expiries cost about one refresh each (a few more when a poll and a push
    // meet the expired token at once), not one per request.
    assert!(
        faulty.hubspot.token <= clean.hubspot.token + 15,
        "{faulty:?}"
    );
    assert!(
        faulty.salesforce.token <= clean.salesforce.token + 15,
        "{faulty:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_outages_rate_limits_and_expired_tokens_converge_without_loss_or_retry_storm() {
    let _serial = SERIAL.lock().await;
    compare(Mix::WholeRequests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_at_once_converges_without_loss_or_retry_storm() {
    let _serial = SERIAL.lock().await;
    compare(Mix::All).await;
}

/// Concurrent deliveries, no faults at all: every acknowledged STOP must be applied. The
/// inbox numbers a webhook before writing it, so a poll can read a later number first,
/// move its cursor past one still being written, and that STOP is never read (then trimmed
/// away or left in the inbox). With 16 concurrent senders a few in a thousand are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrently_acknowledged_stops_are_all_applied() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    const CONCURRENT: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let c = Config::new(dir.path()).whatsapp(APP_SECRET);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    let mut tasks = Vec::new();
    for k in 0..CONCURRENT {
        let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
        tasks.push(tokio::spawn(async move {
            for i in (k..N).step_by(CONCURRENT) {
                let body = envelope::text(
                    &Who::wa(&wa_id(i)),
                    &format!("wamid.C{i:06}"),
                    now_s,
                    "STOP",
                );
                let delivery = sender.deliver(&body).await;
                assert!(delivery.delivered, "{i}: {:?}", delivery.attempts);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every STOP was acknowledged; each must become a decision and leave the inbox.
    converge(
        &d,
        "every acknowledged STOP applied",
        Duration::from_secs(60),
        async || {
            let s = d.status().await;
            let opted_out = s.people("all", "opted_out");
            if opted_out == N as i64 && s.webhook_inbox == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{opted_out} of {N} opted out, {} webhooks left in the inbox",
                    s.webhook_inbox
                ))
            }
        },
    )
    .await;
    assert!(d.terminate().await.success());
}

/// A healthy receiver that answers 429 (`Retry-After: 1`) to exactly one event of each
/// batch of 50, the last one sent, so nothing else is held back. Every batch makes progress,
/// yet the push worker resets its back-off only after an entirely done batch: each batch
/// doubles the delay given to its one retried event (about 0.2 s × 2^(k-1) for the k-th),
/// so after sixteen batches retried events wait minutes although the receiver asked for
/// one second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_429_per_batch_delays_the_retried_event_by_about_its_retry_after() {
    let _serial = SERIAL.lock().await;
    const N: usize = 800;
    let hook = hookfake::start(hookfake::FakeOptions::default()).await;
    // A zero-length slow answer is a plain 200 (the event is recorded).
    let ok = hookfake::Fault::Slow(Duration::ZERO);
    let limited = hookfake::Fault::TooManyRequests {
        retry_after_secs: 1,
    };
    for _ in 0..N / 50 {
        hook.script(std::iter::repeat_n(ok.clone(), 49).chain([limited.clone()]));
    }
    let dir = tempfile::tempdir().unwrap();
    // A long linger: every STOP is in the outbox before the first batch goes, so the
    // batches go out back to back, 50 events each.
    let c = Config::new(dir.path())
        .whatsapp(APP_SECRET)
        .automations(&hook.url())
        .set("automations", r#"push_linger = "15s""#);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
    let now_s = optout_core::Timestamp::now().millis() / 1000;
    for i in 0..N {
        let body = envelope::text(
            &Who::wa(&wa_id(i)),
            &format!("wamid.R{i:06}"),
            now_s,
            "STOP",
        );
        assert!(sender.deliver(&body).await.delivered);
    }
    // The batches go after the linger; the retried events after their second and one more
    // linger: about 25 s from here. With the back-off growing, the last wait minutes.
    converge(
        &d,
        "every event delivered",
        Duration::from_secs(45),
        async || {
            let got = hook.events().len();
            if got == N {
                Ok(())
            } else {
                Err(format!("{got} of {N} events delivered"))
            }
        },
    )
    .await;
    assert_eq!(hook.counters().faults as usize, N, "the script was used up");
    assert!(d.terminate().await.success());
}
