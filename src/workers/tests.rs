//! The workers against a real engine over a store in a temporary directory, with a
//! scripted connector, in tokio's paused time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use optout_core::retry::Backoff;
use optout_core::{
    ConnectorError, Cursor, Health, Page, PushItem, PushOutcome, Scope, Status, Timestamp,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::runner::{self, Failure, Next, Step, StepCx, Worker};
use super::*;
use crate::audit::{AuditEntry, AuditKind};
use crate::identity::Normalizer;
use crate::metrics::ConnectorOutcome;
use crate::policy::PolicyConfig;
use crate::store::{DeadLetter, OutboxEntry};

const CRM: &str = "crm";
const SECOND: Duration = Duration::from_secs(1);

/// A call the scripted connector received, and when (tokio's clock).
#[derive(Debug)]
enum Call {
    Poll(Option<Cursor>, Instant),
    Push(Vec<String>, Instant),
    Health(Instant),
}

/// A connector that answers from a script. With no poll scripted it never answers (the
/// worker is then only cancelled); with no push scripted every item is done.
struct Scripted {
    polls: Mutex<VecDeque<Result<Page, ConnectorError>>>,
    pushes: Mutex<VecDeque<Result<Vec<PushOutcome>, ConnectorError>>>,
    batch: usize,
    /// How long each push takes to answer (tokio's clock).
    push_delay: Mutex<Duration>,
    calls: mpsc::UnboundedSender<Call>,
}

impl Scripted {
    fn new(batch: usize) -> (Arc<Self>, mpsc::UnboundedReceiver<Call>) {
        let (calls, rx) = mpsc::unbounded_channel();
        let c = Scripted {
            polls: Mutex::default(),
            pushes: Mutex::default(),
            batch,
            push_delay: Mutex::new(Duration::ZERO),
            calls,
        };
        (Arc::new(c), rx)
    }

    fn poll_then(self: &Arc<Self>, r: Result<Page, ConnectorError>) -> &Arc<Self> {
        self.polls.lock().unwrap().push_back(r);
        self
    }

    fn push_then(self: &Arc<Self>, r: Result<Vec<PushOutcome>, ConnectorError>) {
        self.pushes.lock().unwrap().push_back(r);
    }
}

impl Connector for Scripted {
    async fn poll(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        let _ = self.calls.send(Call::Poll(cursor.cloned(), Instant::now()));
        let next = self.polls.lock().unwrap().pop_front();
        match next {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    async fn push(&self, batch: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        let keys = batch.iter().map(|i| i.key.clone()).collect();
        let _ = self.calls.send(Call::Push(keys, Instant::now()));
        let delay = *self.push_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let next = self.pushes.lock().unwrap().pop_front();
        next.unwrap_or_else(|| Ok(vec![PushOutcome::Done; batch.len()]))
    }

    async fn health(&self) -> Health {
        let _ = self.calls.send(Call::Health(Instant::now()));
        Health {
            ok: false,
            detail: "token expires tomorrow".into(),
        }
    }

    fn max_batch(&self) -> usize {
        self.batch
    }
}

fn page(cursor: &str, more: bool) -> Result<Page, ConnectorError> {
    Ok(Page {
        observations: Vec::new(),
        cursor: Cursor(cursor.into()),
        more,
        progress: None,
    })
}

/// A worker context over a fresh store in `dir`; `crm` takes records.
fn context(dir: &std::path::Path) -> Arc<WorkerContext> {
    let store = crate::store::testing::open(dir);
    let targets = BTreeMap::from([(CRM.to_string(), Takes::Records)]);
    let normalizer = Normalizer::new(Normalizer::parse_region("US").unwrap());
    let engine = Engine::new(store, PolicyConfig::default(), normalizer, targets);
    Arc::new(WorkerContext {
        engine: Arc::new(engine),
        metrics: Arc::new(Metrics::new()),
        push_wakers: BTreeMap::from([(CRM.to_string(), Arc::new(Notify::new()))]),
        cancel: CancellationToken::new(),
    })
}

fn status() -> StatusCell {
    Arc::new(Mutex::new(ConnectorStatus {
        name: CRM.into(),
        healthy: true,
        ..ConnectorStatus::default()
    }))
}

fn snapshot(s: &StatusCell) -> ConnectorStatus {
    s.lock().unwrap().clone()
}

fn poll_settings(status: &StatusCell) -> (PollSettings, mpsc::Sender<Trigger>) {
    let (tx, rx) = mpsc::channel(4);
    let settings = PollSettings {
        name: CRM.into(),
        status: status.clone(),
        triggers: rx,
        schedule: Schedule::OnDemand,
        full_resync: None,
    };
    (settings, tx)
}

fn item(key: &str) -> PushItem {
    PushItem {
        key: key.into(),
        record: format!("record-{key}"),
        status: Status::OptedOut,
        scope: Scope::All,
        changed_at: Timestamp::now(),
        source: "whatsapp:keyword".into(),
        subject: "1".into(),
        identities: Vec::new(),
        reply: None,
    }
}

fn enqueue(ctx: &WorkerContext, keys: &[&str]) {
    enqueue_version(ctx, keys, 1);
}

/// Enqueues `keys` as version `first` onwards (a later version replaces an entry).
fn enqueue_version(ctx: &WorkerContext, keys: &[&str], first: u64) {
    let now = Timestamp::now();
    for (version, key) in keys.iter().enumerate() {
        let e = OutboxEntry {
            item: item(key),
            version: version as u64 + first,
            enqueued_at: now,
            not_before: now,
            attempts: 0,
            last_error: None,
            in_flight: false,
        };
        let put = |tx: &mut crate::store::Txn<'_>| tx.put_outbox(CRM, key, &e);
        ctx.engine.store().transaction(true, put).unwrap();
    }
}

fn outbox(ctx: &WorkerContext, key: &str) -> Option<OutboxEntry> {
    ctx.engine.store().outbox_entry(CRM, key).unwrap()
}

fn cx() -> StepCx {
    StepCx::new(Backoff::for_http(), CancellationToken::new())
}

async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    calls.recv().await.expect("the connector is still held")
}

async fn polled_at(calls: &mut mpsc::UnboundedReceiver<Call>) -> (Option<Cursor>, Instant) {
    match next_call(calls).await {
        Call::Poll(c, at) => (c, at),
        other => panic!("expected a poll, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn poll_reads_pages_until_the_source_has_no_more_and_saves_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(10);
    conn.poll_then(page("1", true))
        .poll_then(page("2", true))
        .poll_then(page("3", false));
    let status = status();
    let (settings, _triggers) = poll_settings(&status);
    let mut poll = poll::Poll::new(conn, ctx.clone(), settings);
    let mut cx = cx();

    assert_eq!(poll.step(&mut cx).await.unwrap(), Step::from(Next::Now));
    assert_eq!(
        snapshot(&status).resync.as_deref(),
        Some("0 records in 1 pages")
    );
    assert_eq!(poll.step(&mut cx).await.unwrap(), Step::from(Next::Now));
    assert_eq!(
        poll.step(&mut cx).await.unwrap(),
        Step::recovered(Next::Idle)
    );
    // Nothing is pending: the worker waits for a trigger or a tick.
    assert_eq!(poll.step(&mut cx).await.unwrap(), Step::from(Next::Idle));

    let mut cursors = Vec::new();
    while let Ok(Call::Poll(c, _)) = calls.try_recv() {
        cursors.push(c.map(|c| c.0));
    }
    assert_eq!(cursors, [None, Some("1".into()), Some("2".into())]);
    assert_eq!(
        ctx.engine.store().cursor(CRM).unwrap().as_deref(),
        Some("3")
    );
    let s = snapshot(&status);
    assert_eq!(s.cursor.as_deref(), Some("3"));
    assert!(s.last_poll_ok.is_some());
    assert_eq!(s.resync, None);
}

#[tokio::test(start_paused = true)]
async fn a_poll_error_backs_off_and_retries_raising_then_clearing_the_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(10);
    conn.poll_then(Err(ConnectorError::Unauthorized("token revoked".into())))
        .poll_then(page("1", false));
    let status = status();
    let (settings, _triggers) = poll_settings(&status);
    let worker = tokio::spawn(poll_worker(conn, ctx.clone(), settings));
    let alarm = || {
        let label = crate::metrics::Metrics::connector(CRM);
        ctx.metrics.alarm.get_or_create(&label).get()
    };

    let (_, first) = polled_at(&mut calls).await;
    let (cursor, second) = polled_at(&mut calls).await;
    // The poll back-off starts at half a second, with jitter.
    let waited = second - first;
    assert!((350..=650).contains(&waited.as_millis()), "{waited:?}");
    assert_eq!(cursor, None, "retried from the saved cursor");
    let s = snapshot(&status);
    assert_eq!((s.poll_errors, s.healthy), (1, false));
    assert_eq!(s.alarm.as_deref(), Some("unauthorized: token revoked"));
    assert_eq!(alarm(), 1);
    let errors = ctx.metrics.poll_errors.get_or_create(&ConnectorOutcome {
        connector: CRM.into(),
        outcome: "poll_unauthorized".into(),
    });
    assert_eq!(errors.get(), 1);

    ctx.cancel.cancel();
    worker.await.unwrap();
    let s = snapshot(&status);
    assert_eq!((s.alarm, s.healthy), (None, true));
    assert_eq!(
        s.last_error.as_deref(),
        Some("poll: unauthorized: token revoked")
    );
    assert!(s.last_poll_ok.is_some());
    assert_eq!(alarm(), 0);
}

#[tokio::test(start_paused = true)]
async fn cancellation_during_a_poll_back_off_ends_the_worker_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(10);
    conn.poll_then(Err(ConnectorError::QuotaExhausted {
        retry_after: Duration::from_secs(3600),
        detail: "daily API requests".into(),
    }));
    let status = status();
    let (settings, _triggers) = poll_settings(&status);
    let worker = tokio::spawn(poll_worker(conn, ctx.clone(), settings));

    let (_, at) = polled_at(&mut calls).await;
    ctx.cancel.cancel();
    tokio::time::timeout(SECOND, worker)
        .await
        .expect("the worker stops within a second, not after the hour")
        .unwrap();
    assert!(at.elapsed() < SECOND);
    assert!(snapshot(&status).alarm.is_some());
}

/// A worker whose every step fails in the store.
struct Stubborn {
    steps: Arc<Mutex<u32>>,
}

impl Worker for Stubborn {
    fn name(&self) -> &str {
        CRM
    }

    fn what(&self) -> &'static str {
        "push"
    }

    async fn step(&mut self, _cx: &mut StepCx) -> Result<Step, Failure> {
        *self.steps.lock().unwrap() += 1;
        Err(Failure::Store {
            doing: "cannot mark replies in flight; not sending",
            error: crate::store::StoreError::Io("disk full".into()),
        })
    }

    async fn wait(&mut self) -> Next {
        Next::Now
    }
}

#[tokio::test(start_paused = true)]
async fn cancellation_during_an_error_back_off_ends_the_worker_promptly() {
    let steps = Arc::new(Mutex::new(0));
    let cancel = CancellationToken::new();
    let worker = Stubborn {
        steps: steps.clone(),
    };
    let run = tokio::spawn(runner::run(worker, cancel.clone(), None));
    // The back-off grows from 200 ms: a few retries in two seconds, then a stop at once.
    tokio::time::sleep(2 * SECOND).await;
    let before = *steps.lock().unwrap();
    assert!((2..=6).contains(&before), "{before} steps");
    cancel.cancel();
    tokio::time::timeout(Duration::from_millis(1), run)
        .await
        .expect("no back-off outlives the cancellation")
        .unwrap();
    assert_eq!(*steps.lock().unwrap(), before);
}

#[tokio::test(start_paused = true)]
async fn a_full_resync_requeues_dead_letters_and_resumes_where_it_failed() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let dead = DeadLetter {
        item: item("k1"),
        reason: "record deleted".into(),
        at: Timestamp::now(),
        attempts: 1,
    };
    let put = |tx: &mut crate::store::Txn<'_>| tx.put_dead(CRM, "k1", &dead);
    ctx.engine.store().transaction(true, put).unwrap();
    let (conn, mut calls) = Scripted::new(10);
    let counted = optout_core::Progress {
        done: 1,
        total: Some(2),
    };
    conn.poll_then(page("0", false))
        .poll_then(page("1", true).map(|p| Page {
            progress: Some(counted),
            ..p
        }))
        // A vendor's error text that looks like the end of a resync.
        .poll_then(Err(ConnectorError::Transient("upstream said: done".into())))
        .poll_then(page("2", false));
    let status = status();
    let (settings, triggers) = poll_settings(&status);
    let worker = tokio::spawn(poll_worker(conn, ctx.clone(), settings));

    let (tx, rx) = mpsc::channel(64);
    triggers
        .send(Trigger::Full { done: Some(tx) })
        .await
        .unwrap();
    let (lines_tx, mut lines) = mpsc::channel(64);
    let done = relay_progress(rx, &lines_tx).await;
    assert_eq!(
        done.as_deref(),
        Some("crm: done (0 records read in 2 pages)")
    );
    let mut texts = Vec::new();
    while let Ok(l) = lines.try_recv() {
        texts.push(l);
    }
    assert_eq!(texts.len(), 4, "{texts:?}");
    assert_eq!(texts[0], "crm: 1 of 2 records");
    assert!(
        texts[1].starts_with("crm: poll failed (transient: upstream said: done); retrying in "),
        "{texts:?}"
    );
    assert_eq!(texts[2], "crm: 0 records in 2 pages");

    let mut cursors = Vec::new();
    while let Ok(Call::Poll(c, _)) = calls.try_recv() {
        cursors.push(c.map(|c| c.0));
    }
    let one = Some("1".to_string());
    assert_eq!(cursors, [None, None, one.clone(), one]);
    assert!(
        outbox(&ctx, "k1").is_some(),
        "the dead letter is queued again"
    );
    assert_eq!(ctx.engine.store().dead_letters().count(), 0);
    ctx.cancel.cancel();
    worker.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_incremental_resync_that_fails_ends_without_done() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, _calls) = Scripted::new(10);
    conn.poll_then(page("0", false))
        .poll_then(Err(ConnectorError::Transient("503".into())));
    let status = status();
    let (settings, triggers) = poll_settings(&status);
    let worker = tokio::spawn(poll_worker(conn, ctx.clone(), settings));

    let (tx, rx) = mpsc::channel(64);
    let trigger = Trigger::Incremental { done: Some(tx) };
    triggers.send(trigger).await.unwrap();
    let (lines_tx, mut lines) = mpsc::channel(64);
    assert_eq!(relay_progress(rx, &lines_tx).await, None);
    let line = lines.try_recv().unwrap();
    assert!(
        line.starts_with("crm: poll failed (transient: 503)"),
        "{line}"
    );
    ctx.cancel.cancel();
    worker.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn push_sends_due_entries_and_records_each_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    enqueue(&ctx, &["k1", "k2", "k3"]);
    let (conn, mut calls) = Scripted::new(3);
    conn.push_then(Ok(vec![
        PushOutcome::Done,
        PushOutcome::Rejected {
            reason: "record deleted".into(),
        },
        PushOutcome::RetryLater {
            after: None,
            reason: "locked".into(),
        },
    ]));
    let status = status();
    let linger = Linger {
        min: SECOND,
        max: 10 * SECOND,
    };
    let mut push = push::Push::new(
        CRM.into(),
        conn,
        ctx.clone(),
        status.clone(),
        Takes::Records,
        linger,
        4,
    );
    let mut cx = cx();

    // The batch is sent in the background; the step after its landing records it.
    assert_eq!(push.step(&mut cx).await.unwrap(), Step::from(Next::Now));
    assert_eq!(push.wait().await, Next::Now);
    assert_eq!(
        push.step(&mut cx).await.unwrap(),
        Step::recovered(Next::Now)
    );
    match next_call(&mut calls).await {
        Call::Push(keys, _) => assert_eq!(keys, ["k1", "k2", "k3"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(outbox(&ctx, "k1"), None);
    assert_eq!(outbox(&ctx, "k2"), None);
    assert!(ctx.engine.store().dead_letter(CRM, "k2").unwrap().is_some());
    let retried = outbox(&ctx, "k3").expect("k3 is retried later");
    assert_eq!(
        (retried.attempts, retried.last_error.as_deref()),
        (1, Some("locked"))
    );
    assert!(snapshot(&status).last_push_ok.is_some());
    for outcome in ["done", "rejected", "retry"] {
        let label = ConnectorOutcome {
            connector: CRM.into(),
            outcome: outcome.into(),
        };
        assert_eq!(
            ctx.metrics.pushes.get_or_create(&label).get(),
            1,
            "{outcome}"
        );
    }
    // k3 is not due yet: the worker waits.
    assert_eq!(push.step(&mut cx).await.unwrap(), Step::from(Next::Idle));
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_deferred_by_the_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    enqueue(&ctx, &["k1", "k2"]);
    let (conn, _calls) = Scripted::new(2);
    conn.push_then(Err(ConnectorError::Transient("503".into())));
    let status = status();
    let linger = Linger {
        min: SECOND,
        max: 10 * SECOND,
    };
    let mut push = push::Push::new(
        CRM.into(),
        conn,
        ctx.clone(),
        status,
        Takes::Records,
        linger,
        4,
    );

    assert_eq!(push.step(&mut cx()).await.unwrap(), Step::from(Next::Now));
    assert_eq!(push.wait().await, Next::Now);
    let failure = push.step(&mut cx()).await.unwrap_err();
    assert!(matches!(
        failure,
        Failure::Connector(ConnectorError::Transient(_))
    ));
    let before = Timestamp::now();
    assert_eq!(push.failed(&failure, 60 * SECOND).await, Next::Now);
    for key in ["k1", "k2"] {
        let e = outbox(&ctx, key).expect("still queued");
        assert_eq!(
            (e.attempts, e.last_error.as_deref()),
            (1, Some("transient: 503"))
        );
        assert!(e.not_before >= before.plus(59 * SECOND), "{key} deferred");
    }
    assert_eq!(push.step(&mut cx()).await.unwrap(), Step::from(Next::Idle));
}

#[tokio::test(start_paused = true)]
async fn a_lone_entry_goes_at_once_and_its_push_completes_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    enqueue(&ctx, &["k1"]);
    let (conn, mut calls) = Scripted::new(100);
    let linger = Linger {
        min: 10 * SECOND,
        max: 60 * SECOND,
    };
    let start = Instant::now();
    let worker = tokio::spawn(push_worker(
        CRM.into(),
        conn,
        ctx.clone(),
        status(),
        Takes::Records,
        linger,
        4,
    ));

    let Call::Push(keys, at) = next_call(&mut calls).await else {
        panic!("expected a push");
    };
    assert_eq!(keys, ["k1"]);
    // The connector was idle and nothing else was arriving: no linger at all.
    assert_eq!(at, start, "held for {:?}", at - start);
    // The daemon stops while the push is under way: its outcome is still recorded.
    ctx.cancel.cancel();
    worker.await.unwrap();
    assert_eq!(outbox(&ctx, "k1"), None);
}

/// Pushes the scripted connector received until `n` keys went out: (keys, when).
async fn pushes_of(
    calls: &mut mpsc::UnboundedReceiver<Call>,
    n: usize,
) -> Vec<(Vec<String>, Instant)> {
    let mut got = Vec::new();
    let mut keys = 0;
    while keys < n {
        match next_call(calls).await {
            Call::Push(k, at) => {
                keys += k.len();
                got.push((k, at));
            }
            other => panic!("expected a push, got {other:?}"),
        }
    }
    got
}

#[tokio::test(start_paused = true)]
async fn a_stream_faster_than_a_round_trip_goes_out_in_full_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(10);
    let linger = Linger {
        min: 10 * Duration::from_millis(1),
        max: 250 * Duration::from_millis(1),
    };
    let worker = tokio::spawn(push_worker(
        CRM.into(),
        conn,
        ctx.clone(),
        status(),
        Takes::Records,
        linger,
        4,
    ));
    let start = Instant::now();
    // One entry every 2 ms: 500 a second, five per `min`.
    for i in 0..21 {
        enqueue(&ctx, &[&format!("k{i:02}")]);
        ctx.push_wakers[CRM].notify_one();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pushes = pushes_of(&mut calls, 21).await;
    let sizes: Vec<usize> = pushes.iter().map(|(k, _)| k.len()).collect();
    // The first went alone at once (nothing was arriving yet); then the stream was
    // measured and every later batch went full.
    assert_eq!(sizes, [1, 10, 10], "{pushes:?}");
    assert_eq!(pushes[0].1, start);
    // A full batch goes as soon as it is seen full, well before `max`.
    let last = pushes[2].1 - start;
    assert!(last < Duration::from_millis(60), "{last:?}");
    ctx.cancel.cancel();
    worker.await.unwrap();
}

/// A push worker over `conn` that never lingers, with `pipeline` batches in flight.
fn pipelined(
    ctx: &Arc<WorkerContext>,
    conn: Arc<Scripted>,
    pipeline: usize,
) -> tokio::task::JoinHandle<()> {
    let never = Linger {
        min: Duration::ZERO,
        max: Duration::ZERO,
    };
    let (name, ctx) = (CRM.to_string(), ctx.clone());
    tokio::spawn(push_worker(
        name,
        conn,
        ctx,
        status(),
        Takes::Records,
        never,
        pipeline,
    ))
}

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn a_second_batch_goes_while_the_first_is_in_flight_up_to_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(2);
    *conn.push_delay.lock().unwrap() = 80 * MS;
    let worker = pipelined(&ctx, conn, 2);
    let start = Instant::now();
    enqueue(&ctx, &["k1", "k2"]);
    ctx.push_wakers[CRM].notify_one();
    tokio::time::sleep(10 * MS).await;
    enqueue(&ctx, &["k3", "k4"]);
    ctx.push_wakers[CRM].notify_one();
    tokio::time::sleep(10 * MS).await;
    enqueue(&ctx, &["k5"]);
    ctx.push_wakers[CRM].notify_one();

    let pushes = pushes_of(&mut calls, 5).await;
    let got: Vec<(Vec<String>, u128)> = pushes
        .into_iter()
        .map(|(k, at)| (k, (at - start).as_millis()))
        .collect();
    let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Two batches in flight at once; the third waits for a slot: the first landing.
    assert_eq!(
        got,
        [
            (keys(&["k1", "k2"]), 0),
            (keys(&["k3", "k4"]), 10),
            (keys(&["k5"]), 80)
        ]
    );
    tokio::time::sleep(200 * MS).await;
    for k in ["k1", "k2", "k3", "k4", "k5"] {
        assert_eq!(outbox(&ctx, k), None, "{k} recorded");
    }
    ctx.cancel.cancel();
    worker.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_record_in_flight_is_not_pushed_again_and_its_newer_value_survives_the_landing() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(10);
    *conn.push_delay.lock().unwrap() = 80 * MS;
    let worker = pipelined(&ctx, conn, 4);
    let start = Instant::now();
    enqueue(&ctx, &["k1"]);
    ctx.push_wakers[CRM].notify_one();
    tokio::time::sleep(10 * MS).await;
    // A newer value of k1 while its first push is in flight, and another record.
    enqueue_version(&ctx, &["k1"], 2);
    enqueue(&ctx, &["k2"]);
    ctx.push_wakers[CRM].notify_one();

    let mut pushes = pushes_of(&mut calls, 2).await.into_iter();
    let (first, at) = pushes.next().unwrap();
    assert_eq!(
        (first, at - start),
        (vec!["k1".to_string()], Duration::ZERO)
    );
    // k2 goes in a second batch at once; k1's newer value is left out of it.
    let (second, at) = pushes.next().unwrap();
    assert_eq!((second, at - start), (vec!["k2".to_string()], 10 * MS));
    // The first push's success (version 1) leaves version 2 in the outbox, and only
    // then is version 2 pushed.
    let Call::Push(third, at) = next_call(&mut calls).await else {
        panic!("expected a push");
    };
    assert_eq!((third, at - start), (vec!["k1".to_string()], 80 * MS));
    assert_eq!(outbox(&ctx, "k1").map(|e| e.version), Some(2));
    tokio::time::sleep(100 * MS).await;
    assert_eq!(outbox(&ctx, "k1"), None, "version 2 recorded in its turn");
    ctx.cancel.cancel();
    worker.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_every_batch_in_flight_lands_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let (conn, mut calls) = Scripted::new(1);
    *conn.push_delay.lock().unwrap() = 80 * MS;
    let worker = pipelined(&ctx, conn, 3);
    enqueue(&ctx, &["k1", "k2", "k3", "k4"]);
    ctx.push_wakers[CRM].notify_one();
    assert_eq!(pushes_of(&mut calls, 3).await.len(), 3);
    ctx.cancel.cancel();
    worker.await.unwrap();
    for k in ["k1", "k2", "k3"] {
        assert_eq!(outbox(&ctx, k), None, "{k} recorded");
    }
    assert!(outbox(&ctx, "k4").is_some(), "not sent after the stop");
    assert!(calls.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn the_health_check_records_its_result_every_five_minutes() {
    let (conn, mut calls) = Scripted::new(10);
    let status = status();
    let cancel = CancellationToken::new();
    let worker = tokio::spawn(health_worker(
        CRM.into(),
        conn,
        status.clone(),
        cancel.clone(),
    ));

    let Call::Health(first) = next_call(&mut calls).await else {
        panic!("expected a health check");
    };
    let Call::Health(second) = next_call(&mut calls).await else {
        panic!("expected a health check");
    };
    assert_eq!(second - first, HEALTH_INTERVAL);
    let health = snapshot(&status).health.expect("recorded");
    assert_eq!(
        (health.ok, health.detail.as_str()),
        (false, "token expires tomorrow")
    );
    cancel.cancel();
    worker.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_high_water_mark_is_saved_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    // sled only: the mark is a file beside sled's (PostgreSQL does not lose a log's tail).
    let store = crate::store::Store::open(dir.path()).unwrap();
    let entry = AuditEntry::new(AuditKind::Accepted, CRM, Timestamp::now());
    let audit = |tx: &mut crate::store::Txn<'_>| tx.audit(&entry, &[]);
    store.transaction(true, audit).unwrap();
    let marker = || std::fs::read_to_string(dir.path().join("optout-sync.store")).unwrap();

    for (run_for, saved) in [(29, false), (31, true)] {
        let cancel = CancellationToken::new();
        let worker = tokio::spawn(high_water_worker(store.clone(), cancel.clone()));
        tokio::time::sleep(Duration::from_secs(run_for)).await;
        cancel.cancel();
        worker.await.unwrap();
        assert_eq!(marker().contains("audit_high"), saved, "after {run_for} s");
    }
}
