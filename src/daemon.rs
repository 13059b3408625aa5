//! `optout-sync run`: the long-running service.
//!
//! Start-up order: open the store, build the connectors, bind the HTTP listener and the
//! control socket, then lead (at once on sled; on a shared PostgreSQL store when the lease
//! is won, see `leader.rs`): abandon replies a crash or a previous leader left in flight,
//! start one poll worker and one push worker per connector instance; then tell systemd
//! READY=1 (a follower is ready too: it serves webhooks, the gate and commands). On
//! SIGTERM or SIGINT: STOPPING=1, stop polling, let in-flight pushes finish within the
//! shutdown deadline (unfinished ones simply stay in the outbox), give the lease up, flush
//! the store and exit 0, all within the shutdown deadline. SIGHUP does not reload the
//! configuration: a restart applies it, and restarting loses nothing; SIGUSR1, SIGUSR2
//! and SIGALRM are logged and ignored.
//!
//! Readiness (`/readyz`, the watchdog pings) holds while the daemon runs *and* its store
//! works: a failing store (a full disk) makes it not ready until the store health worker
//! has brought the store back; damage it finds then, or a store it cannot reopen, stops
//! the daemon with an error ([`StoreFatal`]).

mod live;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use optout_core::{DynConnector, Host, Timestamp};
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Checked, CheckedConnector, PollSchedule};
use crate::control::{self, Request};
use crate::inbox::StoreInbox;
use crate::leader::Leadership;
use crate::metrics::{Metrics, ScopeDecision};
use crate::reconcile::Engine;
use crate::report::{ConnectorReport, DryRunReport, ResyncReport, StatusReport};
use crate::systemd::Notifier;
use crate::workers::store_health::{StoreFatal, StoreHooks};
use crate::workers::{
    self, ConnectorStatus, PollSettings, Schedule, StatusCell, Trigger, WorkerContext,
};

/// Everything the control socket and the metrics scrape need.
pub struct Daemon {
    pub checked: Checked,
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub statuses: BTreeMap<String, StatusCell>,
    pub triggers: BTreeMap<String, mpsc::Sender<Trigger>>,
    /// What the workers share: bookkeeping after an operator's change (released holds, an
    /// import through the daemon).
    pub workers: Arc<WorkerContext>,
    /// What `/readyz` and the watchdog read: running and the store works.
    pub ready: Arc<AtomicBool>,
    /// Between READY=1 and the start of shutdown.
    running: AtomicBool,
    pub started: Timestamp,
    /// Wakes the worker that applies the write API's recorded events.
    api_wake: Arc<Notify>,
    /// Notified by the write API when it records an event: passed on to the apply
    /// worker here, or to the leader when another instance leads.
    api_recorded: Arc<Notify>,
    /// Whether this instance leads (runs the workers), and the lease.
    pub leadership: Arc<Leadership>,
    /// The poll triggers of connectors woken by stored webhooks (WhatsApp).
    wake_polls: Vec<mpsc::Sender<Trigger>>,
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(checked: Checked) -> Result<()> {
    // The handlers are installed now, before READY=1: a SIGTERM that follows READY at once
    // must stop the daemon cleanly, not kill it with the default action.
    let stop = stop_signals()?;
    run_until(checked, stop, None).await
}

/// Runs until `stop` completes; sends the HTTP listener's address on `bound_tx` once ready
/// (the demo and tests run the daemon in-process).
pub async fn run_until(
    checked: Checked,
    stop: impl std::future::Future<Output = ()>,
    bound_tx: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<()> {
    let notifier = Notifier::from_env();
    let started = Timestamp::now();
    let engine = Arc::new(open_compacted(&checked, &notifier)?);
    let (instance, lease) = instance_and_lease(&checked);
    let leadership = Leadership::new(engine.store().clone(), instance, lease, started);
    let metrics = Arc::new(Metrics::new());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ctx = Arc::new(WorkerContext {
        engine: engine.clone(),
        metrics: metrics.clone(),
        push_wakers: (checked.connectors.iter())
            .map(|c| (c.name.clone(), Arc::new(Notify::new())))
            .collect(),
        cancel: cancel.clone(),
    });
    let started_connectors = start_connectors(&checked, &ctx, &tracker, &leadership)?;
    let daemon = Arc::new(Daemon {
        checked,
        engine,
        metrics,
        statuses: started_connectors.statuses,
        triggers: started_connectors.triggers,
        workers: ctx.clone(),
        ready: Arc::new(AtomicBool::new(false)),
        running: AtomicBool::new(false),
        started,
        api_wake: Arc::new(Notify::new()),
        api_recorded: Arc::new(Notify::new()),
        leadership,
        wake_polls: started_connectors.wake_polls,
    });
    spawn_api_router(&daemon, &tracker, &cancel);
    let bound = serve_http(&daemon, started_connectors.routes, &tracker, &cancel).await?;
    serve_control(&daemon, &tracker, &cancel)?;
    spawn_high_water(&daemon, &tracker, &cancel);
    let mut fatal = spawn_store_health(&daemon, &ctx, &tracker, &cancel);
    let lead = leader_work(&daemon, &ctx, &tracker, &cancel, started_connectors.pending);
    daemon.leadership.start(lead, &tracker, &cancel).await?;
    announce_ready(&daemon, &notifier, bound, &tracker, &cancel);
    if let Some(tx) = bound_tx {
        let _ = tx.send(bound);
    }
    let fatal = tokio::select! {
        _ = stop => None,
        f = fatal.recv() => f,
    };
    if let Some(f) = &fatal {
        tracing::error!(error = %f, "stopping: the store cannot be used");
    }
    shut_down(&daemon, &notifier, &tracker, &cancel).await?;
    fatal.map_or(Ok(()), |f| Err(f.into()))
}

/// Opens the store and builds the engine. After an erasure, old copies of the erased data
/// remain in the store's files until they are rewritten: that happens here, first.
/// A compaction takes minutes for millions of people: systemd is told, every few seconds,
/// that start-up is still progressing, so `TimeoutStartSec=` does not end it half-way (and
/// a restart begin it again).
fn open_compacted(checked: &Checked, notifier: &Notifier) -> Result<Engine> {
    let store = crate::store::Store::open_with(&checked.daemon.state_dir, &checked.store)
        .context("opening the store")?;
    let (tick, ticks) = std::sync::mpsc::channel::<()>();
    let compacted = std::thread::scope(|scope| {
        scope.spawn(move || {
            use std::sync::mpsc::RecvTimeoutError::Timeout;
            while let Err(Timeout) = ticks.recv_timeout(std::time::Duration::from_secs(5)) {
                notifier.status("compacting the store after an erasure");
                notifier.extend_start(std::time::Duration::from_secs(30));
            }
        });
        let r = crate::store::compact_if_pending(store);
        drop(tick);
        r
    });
    let (store, done) = compacted.context("opening the store")?;
    if let Some(c) = done {
        tracing::info!(
            entries = c.entries,
            bytes_before = c.bytes_before,
            bytes_after = c.bytes_after,
            millis = c.millis,
            "compacted the store after an erasure"
        );
    }
    Ok(crate::app::engine(checked, store))
}

/// This instance's name and the lease's length (`[store]`; on sled the host's name, and
/// no lease is ever taken).
fn instance_and_lease(checked: &Checked) -> (String, std::time::Duration) {
    match &checked.store {
        crate::store::Backend::Postgres(s) => (s.instance.clone(), s.lease),
        crate::store::Backend::Sled => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            (host, std::time::Duration::from_secs(10))
        }
    }
}

/// The leader's work, started once this instance leads (at once on sled): replies a
/// previous leader left in flight are abandoned first, then the connectors' workers,
/// the write API's apply worker and retention start, and on PostgreSQL the listener that
/// wakes them for work stored by other instances.
fn leader_work(
    daemon: &Arc<Daemon>,
    ctx: &Arc<WorkerContext>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    pending: Vec<PendingWorkers>,
) -> impl FnOnce() -> Result<()> + Send + 'static {
    let (daemon, ctx) = (daemon.clone(), ctx.clone());
    let (tracker, cancel) = (tracker.clone(), cancel.clone());
    move || {
        abandon_in_flight(&daemon.engine, Timestamp::now())?;
        for p in pending {
            spawn_workers(
                &tracker,
                &ctx,
                &p.checked,
                p.connector,
                p.status,
                p.triggers,
            );
        }
        tracker.spawn(crate::api::apply_worker(
            ctx.clone(),
            daemon.api_wake.clone(),
        ));
        spawn_retention(&daemon, &tracker, &cancel);
        let d = daemon.clone();
        daemon.leadership.listen(move || d.wake_all(), &cancel);
        Ok(())
    }
}

/// Passes the write API's "event recorded" on: to the apply worker while this instance
/// leads, else to the leader.
fn spawn_api_router(daemon: &Arc<Daemon>, tracker: &TaskTracker, cancel: &CancellationToken) {
    let (d, cancel) = (daemon.clone(), cancel.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = d.api_recorded.notified() => {}
            }
            if d.leadership.leading() {
                d.api_wake.notify_one();
            } else {
                d.leadership.wake_leader();
            }
        }
    });
}

/// Confirmation replies a crash left in flight are abandoned (and audited), never re-sent.
fn abandon_in_flight(engine: &Engine, now: Timestamp) -> Result<()> {
    let abandoned = engine.abandon_in_flight(now)?;
    if abandoned > 0 {
        tracing::warn!(
            count = abandoned,
            "confirmation replies interrupted by the last stop were abandoned, not re-sent"
        );
    }
    Ok(())
}

/// What starting the connectors gives the rest of the daemon.
struct StartedConnectors {
    statuses: BTreeMap<String, StatusCell>,
    triggers: BTreeMap<String, mpsc::Sender<Trigger>>,
    /// HTTP routes connectors mount on the listener (WhatsApp's webhook).
    routes: Vec<axum::Router>,
    /// The poll triggers of connectors woken by stored webhooks.
    wake_polls: Vec<mpsc::Sender<Trigger>>,
    /// The workers, started once this instance leads.
    pending: Vec<PendingWorkers>,
}

/// One connector's workers, not yet started.
struct PendingWorkers {
    checked: CheckedConnector,
    connector: Arc<dyn DynConnector>,
    status: StatusCell,
    triggers: mpsc::Receiver<Trigger>,
}

/// Builds every configured connector; its workers start when this instance leads.
fn start_connectors(
    checked: &Checked,
    ctx: &Arc<WorkerContext>,
    tracker: &TaskTracker,
    leadership: &Arc<Leadership>,
) -> Result<StartedConnectors> {
    let mut started = StartedConnectors {
        statuses: BTreeMap::new(),
        triggers: BTreeMap::new(),
        routes: Vec::new(),
        wake_polls: Vec::new(),
        pending: Vec::new(),
    };
    for c in &checked.connectors {
        let host = host_for(checked, c, ctx);
        let connector = crate::app::connector(c, &host)?;
        let status: StatusCell = Arc::new(Mutex::new(ConnectorStatus {
            name: c.name.clone(),
            kind: c.kind.clone(),
            healthy: true,
            cursor: ctx.engine.store().cursor(&c.name)?,
            ..ConnectorStatus::default()
        }));
        let (tx, rx) = mpsc::channel(16);
        if let Some(wake) = connector.wake_up() {
            let to = (tx.clone(), leadership.clone());
            spawn_wake_forwarder(wake, to, tracker, ctx.cancel.clone());
            started.wake_polls.push(tx.clone());
        }
        started.routes.extend(connector.routes());
        started.pending.push(PendingWorkers {
            checked: c.clone(),
            connector,
            status: status.clone(),
            triggers: rx,
        });
        started.statuses.insert(c.name.clone(), status);
        started.triggers.insert(c.name.clone(), tx);
    }
    Ok(started)
}

/// What the daemon offers connector `c`: the store's inbox, read and trimmed as `c`'s own
/// (the first connector of its kind also owns entries written before inboxes were
/// told apart), and whether it is the only one of its kind.
fn host_for(checked: &Checked, c: &CheckedConnector, ctx: &WorkerContext) -> Host {
    let mut same_kind = checked.connectors.iter().filter(|o| o.kind == c.kind);
    let first = same_kind.next().is_some_and(|o| o.name == c.name);
    Host {
        inbox: Arc::new(StoreInbox {
            store: ctx.engine.store().clone(),
            metrics: ctx.metrics.clone(),
            owner: c.name.clone(),
            legacy: first,
        }),
        sole_of_kind: first && same_kind.next().is_none(),
    }
}

/// Turns a connector's wake-ups (a stored webhook) into polls: an opt-out never waits for
/// a tick. While another instance leads, that instance is woken instead.
fn spawn_wake_forwarder(
    wake: Arc<Notify>,
    (tx, leadership): (mpsc::Sender<Trigger>, Arc<Leadership>),
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {
                    if leadership.leading() {
                        let _ = tx.try_send(Trigger::Incremental { done: None });
                    } else {
                        leadership.wake_leader();
                    }
                }
            }
        }
    });
}

/// The poll worker (unless push-only), the health worker and the push worker of one
/// connector.
fn spawn_workers(
    tracker: &TaskTracker,
    ctx: &Arc<WorkerContext>,
    c: &CheckedConnector,
    connector: Arc<dyn DynConnector>,
    status: StatusCell,
    triggers: mpsc::Receiver<Trigger>,
) {
    if let Some(poll) = &c.poll {
        let settings = PollSettings {
            name: c.name.clone(),
            status: status.clone(),
            triggers,
            schedule: match poll {
                PollSchedule::Every(d) => Schedule::Interval(*d),
                PollSchedule::Cron(s) => Schedule::Cron(s.clone()),
            },
            full_resync: c.full_resync.clone().map(|s| Schedule::Cron(Box::new(s))),
        };
        tracker.spawn(workers::poll_worker(
            connector.clone(),
            ctx.clone(),
            settings,
        ));
    }
    tracker.spawn(workers::health_worker(
        c.name.clone(),
        connector.clone(),
        status.clone(),
        ctx.cancel.clone(),
    ));
    tracker.spawn(preflight(
        c.name.clone(),
        connector.clone(),
        status.clone(),
        ctx.metrics.clone(),
        ctx.cancel.clone(),
    ));
    tracker.spawn(workers::push_worker(
        c.name.clone(),
        connector,
        ctx.clone(),
        status,
        c.takes.clone(),
        c.linger,
        c.pipeline,
    ));
}

/// How often a connector's pre-flight runs again while it finds problems.
const PREFLIGHT_RECHECK: std::time::Duration = std::time::Duration::from_secs(300);

/// The pauses before re-running checks that found a problem, before it is an alarm: a
/// vendor's passing error (a 503, a malformed answer, a reset connection) fails a check as
/// surely as a missing field does, and must not raise a five-minute alarm over nothing.
const PREFLIGHT_CONFIRM: [std::time::Duration; 2] = [
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(6),
];

/// Runs the connector's pre-flight checks (the same as `check-config --connect`) at start,
/// in the background so that READY=1 does not wait on vendors. Each finding is logged;
/// problems found by [`PREFLIGHT_CONFIRM`]'s runs in a row raise the connector's alarm
/// (`status`, metrics, `STATUS=`), and the checks run again every [`PREFLIGHT_RECHECK`]
/// until they pass, which lowers it.
async fn preflight(
    name: String,
    connector: Arc<dyn DynConnector>,
    status: StatusCell,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut confirm = PREFLIGHT_CONFIRM.iter();
    loop {
        let findings = tokio::select! {
            f = connector.preflight() => f,
            _ = cancel.cancelled() => return,
        };
        if findings.iter().any(|f| f.is_problem()) {
            if let Some(pause) = confirm.next() {
                tracing::info!(connector = %name, "pre-flight found a problem; checking again in {pause:?} before raising an alarm");
                tokio::select! {
                    _ = tokio::time::sleep(*pause) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        }
        confirm = PREFLIGHT_CONFIRM.iter();
        let problems: Vec<String> = (findings.iter())
            .filter(|f| f.is_problem())
            .map(|f| match &f.fix {
                Some(fix) => format!("{} (fix: {fix})", f.what),
                None => f.what.clone(),
            })
            .collect();
        for f in &findings {
            match f.verdict {
                optout_core::Verdict::Fail => {
                    tracing::error!(connector = %name, problem = %f.what, fix = f.fix.as_deref().unwrap_or(""), "pre-flight check failed")
                }
                _ => tracing::info!(connector = %name, "pre-flight: {f}"),
            }
        }
        let alarm = (!problems.is_empty()).then(|| format!("pre-flight: {}", problems.join("; ")));
        set_preflight_alarm(&name, &status, &metrics, alarm.clone());
        if alarm.is_none() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(PREFLIGHT_RECHECK) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Raises or lowers the pre-flight's alarm, leaving one a poll or a push raised alone.
fn set_preflight_alarm(name: &str, status: &StatusCell, metrics: &Metrics, alarm: Option<String>) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    let ours = s.alarm.is_none() || s.alarm_from.as_deref() == Some("preflight");
    if !ours {
        return;
    }
    let raised = alarm.is_some();
    s.alarm_from = alarm.as_ref().map(|_| "preflight".to_string());
    s.alarm = alarm;
    metrics
        .alarm
        .get_or_create(&Metrics::connector(name))
        .set(i64::from(raised));
}

/// Binds the HTTP listener (gate, metrics, health, connectors' routes) and serves it with
/// its connection limit and timeouts.
async fn serve_http(
    daemon: &Arc<Daemon>,
    routes: Vec<axum::Router>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<std::net::SocketAddr> {
    let d = daemon.clone();
    let http_state = Arc::new(crate::http::HttpState {
        engine: daemon.engine.clone(),
        metrics: daemon.metrics.clone(),
        gate_token: daemon.checked.gate_token.clone(),
        ready: daemon.ready.clone(),
        refresh: Arc::new(move |m: &Metrics| d.refresh_metrics(m)),
    });
    let cfg = &daemon.checked.daemon;
    // Present from the start (at 0) for every WhatsApp connector: an alert rule can tell
    // "no failures" from "no data".
    for c in (daemon.checked.connectors.iter()).filter(|c| c.kind == "whatsapp") {
        for reason in ["missing", "invalid"] {
            daemon.metrics.signature_failure(&c.name, reason);
        }
    }
    let guard = Arc::new(crate::http::Guard::new(
        cfg.body_timeout,
        crate::http::Refusals::new(daemon.metrics.clone()),
    ));
    let write = Arc::new(crate::http::write::WriteState {
        engine: daemon.engine.clone(),
        write_token: daemon.checked.write_token.clone(),
        gate_token: daemon.checked.gate_token.clone(),
        applied: daemon.api_recorded.clone(),
    });
    let mut routes = routes;
    routes.push(crate::http::write::routes(write));
    let app = crate::http::app(http_state, routes, guard);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", cfg.listen))?;
    let bound = listener.local_addr()?;
    let limits = crate::http::Limits {
        max_connections: crate::http::connection_budget(
            cfg.max_connections,
            crate::http::descriptor_limit(),
        ),
        header_timeout: cfg.header_timeout,
    };
    tracker.spawn(crate::http::serve(listener, app, limits, cancel.clone()));
    Ok(bound)
}

/// Binds the control socket and serves it.
fn serve_control(
    daemon: &Arc<Daemon>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<()> {
    let path = daemon.checked.daemon.control_socket.clone();
    let listener = control::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    tracker.spawn(control::serve(
        listener,
        path,
        daemon.clone(),
        cancel.clone(),
    ));
    Ok(())
}

/// Remembers how far the audit log reaches, so a store damaged later is noticed.
fn spawn_high_water(daemon: &Daemon, tracker: &TaskTracker, cancel: &CancellationToken) {
    tracker.spawn(workers::high_water_worker(
        daemon.engine.store().clone(),
        cancel.clone(),
    ));
}

/// Prunes delivery keys and quarantined bodies past their retention.
fn spawn_retention(daemon: &Daemon, tracker: &TaskTracker, cancel: &CancellationToken) {
    let d = &daemon.checked.daemon;
    tracker.spawn(workers::retention_worker(
        daemon.engine.store().clone(),
        d.dedup_retention,
        d.quarantine_retention,
        daemon.checked.audit_retention,
        cancel.clone(),
    ));
}

/// Starts the store health worker; returns where it reports a store the daemon cannot use.
fn spawn_store_health(
    daemon: &Arc<Daemon>,
    ctx: &Arc<WorkerContext>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> mpsc::UnboundedReceiver<StoreFatal> {
    let (fatal, rx) = mpsc::unbounded_channel();
    let (d, wake) = (daemon.clone(), daemon.clone());
    let pushes: Vec<_> = ctx.push_wakers.values().cloned().collect();
    let hooks = StoreHooks {
        changed: Box::new(move || d.update_ready()),
        // Every poll reads what it missed (WhatsApp: the inbox), every push worker
        // looks at its outbox again.
        recovered: Box::new(move || {
            for tx in wake.triggers.values() {
                let _ = tx.try_send(Trigger::Incremental { done: None });
            }
            pushes.iter().for_each(|w| w.notify_one());
        }),
        fatal,
    };
    tracker.spawn(workers::store_health::store_health_worker(
        daemon.engine.store().clone(),
        daemon.metrics.clone(),
        hooks,
        cancel.clone(),
    ));
    rx
}

/// Marks the daemon ready, tells systemd, and starts the watchdog pings.
fn announce_ready(
    daemon: &Arc<Daemon>,
    notifier: &Notifier,
    bound: std::net::SocketAddr,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    daemon.running.store(true, Ordering::Release);
    daemon.update_ready();
    let socket = daemon.checked.daemon.control_socket.display().to_string();
    let count = daemon.checked.connectors.len();
    tracing::info!(listen = %bound, control = %socket, connectors = count, "optout-sync is ready");
    notifier.ready();
    notifier.status(&format!("running; listening on {bound}"));
    spawn_status_line(daemon, notifier, bound, tracker, cancel);
    let d = daemon.clone();
    tracker.spawn(crate::systemd::watchdog_loop(
        notifier.clone(),
        move || d.ready.load(Ordering::Acquire),
        cancel.clone(),
    ));
}

/// How often systemd's `STATUS=` line is brought up to date.
const STATUS_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Keeps systemd's `STATUS=` line (`systemctl status`) saying which connectors need
/// attention and why; sent only when it changes.
fn spawn_status_line(
    daemon: &Arc<Daemon>,
    notifier: &Notifier,
    bound: std::net::SocketAddr,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let (d, notifier, cancel) = (daemon.clone(), notifier.clone(), cancel.clone());
    tracker.spawn(async move {
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(STATUS_LINE_INTERVAL) => {}
            }
            let attention: Vec<(String, String)> = (d.statuses.iter())
                .filter_map(|(name, cell)| {
                    let s = cell.lock().unwrap_or_else(|p| p.into_inner());
                    crate::systemd::connector_attention(&s).map(|why| (name.clone(), why))
                })
                .collect();
            let mut text = crate::systemd::status_text(&bound.to_string(), &attention);
            if let Some(why) = d.engine.store().failure() {
                text = format!("STORE FAILING ({why}): webhooks get 503 — {text}");
            }
            if text != last {
                notifier.status(&text);
                last = text;
            }
        }
    });
}

/// Stops polling, lets in-flight pushes finish, flushes the store: all within the
/// shutdown deadline, so a store stuck on a failing disk cannot hold the exit.
async fn shut_down(
    daemon: &Daemon,
    notifier: &Notifier,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<()> {
    notifier.stopping();
    notifier.status("stopping");
    daemon.running.store(false, Ordering::Release);
    daemon.update_ready();
    tracing::info!("stopping: no new polls; letting in-flight pushes finish");
    cancel.cancel();
    tracker.close();
    let deadline = daemon.checked.daemon.shutdown_timeout;
    let end = tokio::time::Instant::now() + deadline;
    // The last quarter (at most 2 s) is kept for the final flush.
    let flush_time = (deadline / 4).min(std::time::Duration::from_secs(2));
    if tokio::time::timeout_at(end - flush_time, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?deadline, "shutdown deadline reached; unfinished pushes stay in the outbox for the next start");
    }
    daemon.leadership.release().await;
    let store = daemon.engine.store().clone();
    let last = async move {
        store.flush().await?;
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.save_high_water())
            .await
            .map_err(|e| crate::store::StoreError::Io(e.to_string()))?
    };
    match tokio::time::timeout_at(end, last).await {
        Ok(Ok(())) => tracing::info!("stopped"),
        // Everything acknowledged is already durable; the next start replays the log.
        Ok(Err(e)) => tracing::warn!(error = %e, "stopped without a final flush of the store"),
        Err(_) => tracing::warn!(
            "stopped without a final flush of the store: it did not finish within the deadline"
        ),
    }
    Ok(())
}

/// Installs the signal handlers and returns a future that completes on SIGTERM or SIGINT;
/// SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM are logged and ignored.
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Their default action ends the process; a stray `kill -USR1` must not.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut alrm = signal(SignalKind::alarm())?;
    Ok(async move {
        loop {
            let ignored = tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    tracing::warn!("SIGHUP ignored: configuration reload is not supported; restart the service to apply changes (nothing is lost)");
                    continue;
                }
                _ = usr1.recv() => "SIGUSR1",
                _ = usr2.recv() => "SIGUSR2",
                _ = alrm.recv() => "SIGALRM",
            };
            tracing::warn!(
                signal = ignored,
                "signal ignored: it has no meaning to optout-sync (SIGTERM stops it)"
            );
        }
    })
}

impl Daemon {
    /// Wakes every worker that may find work another instance stored: the polls woken by
    /// webhooks (the inbox), the push workers (their outboxes) and the write API's apply
    /// worker. Each looks at the store and goes back to waiting if there is nothing.
    fn wake_all(&self) {
        for tx in &self.wake_polls {
            let _ = tx.try_send(Trigger::Incremental { done: None });
        }
        for w in self.workers.push_wakers.values() {
            w.notify_one();
        }
        self.api_wake.notify_one();
    }

    /// Ready while running and while the store works.
    fn update_ready(&self) {
        let now_ready =
            || self.running.load(Ordering::Acquire) && self.engine.store().failure().is_none();
        // Stored, then checked again: a change racing with the store is never left behind.
        loop {
            let ready = now_ready();
            self.ready.store(ready, Ordering::Release);
            if now_ready() == ready {
                return;
            }
        }
    }

    /// Sets the gauges that mirror the store, just before a scrape.
    pub fn refresh_metrics(&self, m: &Metrics) {
        let me = crate::metrics::InstanceLabel {
            instance: self.leadership.instance().to_string(),
        };
        m.leader
            .get_or_create(&me)
            .set(i64::from(self.leadership.leading()));
        let (depth, dead, unverified) = self.pending_counts();
        let unreadable = self.engine.store().unreadable_counts();
        for name in self.statuses.keys() {
            let n = unreadable.get(name).copied().unwrap_or(0);
            m.unreadable_numbers
                .get_or_create(&Metrics::connector(name))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            let l = Metrics::connector(name);
            m.outbox_depth
                .get_or_create(&l)
                .set(*depth.get(name).unwrap_or(&0));
            m.dead_letters
                .get_or_create(&l)
                .set(*dead.get(name).unwrap_or(&0));
            m.unverified
                .get_or_create(&l)
                .set(*unverified.get(name).unwrap_or(&0));
            let s = self.statuses[name]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // Present for every connector, 0 without an alarm: an alert rule can then tell
            // "no alarm" from "no data".
            m.alarm.get_or_create(&l).set(i64::from(s.alarm.is_some()));
            let since = s.last_poll_ok.unwrap_or(self.started);
            m.cursor_lag
                .get_or_create(&l)
                .set(Timestamp::now().since(since).as_secs_f64());
        }
        // Every connector and `import` present (0 when none is held), and any other
        // source that ever had an opt-in counted.
        let mut held: BTreeMap<String, u64> = (self.statuses.keys().cloned())
            .chain([crate::import::SOURCE.to_string()])
            .map(|s| (s, 0))
            .collect();
        for (source, w) in self.engine.store().guard_windows().unwrap_or_default() {
            held.insert(source, w.held);
        }
        for (source, n) in held {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            m.guard
                .held_opt_ins
                .get_or_create(&Metrics::source(&source))
                .set(n);
        }
        for (key, n) in self.engine.store().counts().unwrap_or_default() {
            if let Some((scope, decision)) = key.split_once(':') {
                m.subjects
                    .get_or_create(&ScopeDecision {
                        scope: scope.into(),
                        decision: decision.into(),
                    })
                    .set(n);
            }
        }
    }

    /// Outbox depth, dead letters and overdue unverified pushes per connector.
    fn pending_counts(&self) -> Pending {
        pending_counts(self.engine.store(), self.checked.daemon.unverified_after)
    }

    /// The `status` report. The store is read off the async threads.
    pub async fn status(&self) -> StatusReport {
        let store = self.engine.store().clone();
        let after = self.checked.daemon.unverified_after;
        let leadership = self.leadership.clone();
        // On a shared store the cursors are whichever instance's led last: read there.
        let names: Vec<String> = if store.is_shared() {
            self.statuses.keys().cloned().collect()
        } else {
            Vec::new()
        };
        let facts = tokio::task::spawn_blocking(move || {
            let mut facts = StoreFacts::read(&store, after);
            facts.cluster = leadership.roll_call().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the instances' roll call");
                None
            });
            for name in names {
                facts
                    .cursors
                    .insert(name.clone(), store.cursor(&name).ok().flatten());
            }
            facts
        })
        .await
        .unwrap_or_else(|e| StoreFacts::failed(e.to_string()));
        self.report(facts)
    }

    fn report(&self, facts: StoreFacts) -> StatusReport {
        let (depth, dead, unverified) = facts.pending;
        let connectors = (self.statuses.iter())
            .map(|(name, cell)| {
                let s = cell.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let count = |m: &BTreeMap<String, i64>| m.get(name).copied().unwrap_or(0);
                ConnectorReport {
                    healthy: s.healthy
                        && s.alarm.is_none()
                        && s.health.as_ref().is_none_or(|h| h.ok),
                    last_poll_ok: s.last_poll_ok.map(|t| t.to_rfc3339()),
                    poll_lag_seconds: s.last_poll_ok.map(|t| Timestamp::now().since(t).as_secs()),
                    last_push_ok: s.last_push_ok.map(|t| t.to_rfc3339()),
                    outbox_depth: count(&depth),
                    dead_letters: count(&dead),
                    unverified_pushes: count(&unverified),
                    unreadable_numbers: (facts.unreadable.get(name).copied())
                        .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
                    cursor: facts.cursors.get(&s.name).cloned().unwrap_or(s.cursor),
                    name: s.name,
                    kind: s.kind,
                    alarm: s.alarm,
                    poll_errors: s.poll_errors,
                    push_errors: s.push_errors,
                    last_error: s.last_error,
                    resync: s.resync,
                    health: s.health,
                }
            })
            .collect();
        let counts = facts.counts;
        let counter = |name: &str| {
            (counts.iter())
                .find(|(k, _)| k == name)
                .map_or(0, |(_, v)| *v)
        };
        let people = counter(crate::reconcile::PEOPLE);
        let possible_opt_outs = counter(crate::reconcile::POSSIBLE_OPT_OUTS);
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: self.ready.load(Ordering::Acquire),
            started: self.started.to_rfc3339(),
            subjects_total: people,
            subjects: counts
                .into_iter()
                .filter(|(k, _)| k.contains(':'))
                .collect(),
            possible_opt_outs,
            webhook_inbox: facts.inbox,
            quarantined_webhooks: facts.quarantined,
            templates_known: facts.templates,
            store_alarm: facts.alarm,
            connectors,
            held_opt_ins: facts.held,
            instance: self.leadership.instance().to_string(),
            leader: self.leadership.leading(),
            cluster: facts.cluster,
        }
    }
}

/// Outbox depth, dead letters and overdue unverified pushes, per connector.
type Pending = (
    BTreeMap<String, i64>,
    BTreeMap<String, i64>,
    BTreeMap<String, i64>,
);

fn pending_counts(store: &crate::store::Store, unverified_after: std::time::Duration) -> Pending {
    let mut depth = BTreeMap::new();
    for (c, _, _) in store.outbox().flatten() {
        *depth.entry(c).or_insert(0) += 1;
    }
    let mut dead = BTreeMap::new();
    for (c, _, _) in store.dead_letters().flatten() {
        *dead.entry(c).or_insert(0) += 1;
    }
    let overdue = Timestamp::now().minus(unverified_after);
    let mut unverified = BTreeMap::new();
    for (c, _, at) in store.unverified().flatten() {
        if at < overdue {
            *unverified.entry(c).or_insert(0) += 1;
        }
    }
    (depth, dead, unverified)
}

/// Opt-ins held by the mass re-opt-in guard, per source that has any.
fn held_by_source(store: &crate::store::Store) -> BTreeMap<String, u64> {
    (store.guard_windows().unwrap_or_default().into_iter())
        .filter(|(_, w)| w.held > 0)
        .map(|(s, w)| (s, w.held))
        .collect()
}

/// What `status` reads from the store.
struct StoreFacts {
    pending: Pending,
    unreadable: BTreeMap<String, u64>,
    counts: Vec<(String, i64)>,
    inbox: usize,
    quarantined: usize,
    templates: usize,
    alarm: Option<String>,
    /// Held opt-ins per source.
    held: BTreeMap<String, u64>,
    /// Every instance on the shared store, and the lease.
    cluster: Option<crate::store::lease::RollCall>,
    /// Cursors read from the store (shared by instances: this one's workers may not run).
    cursors: BTreeMap<String, Option<String>>,
}

impl StoreFacts {
    fn read(store: &crate::store::Store, unverified_after: std::time::Duration) -> StoreFacts {
        StoreFacts {
            pending: pending_counts(store, unverified_after),
            unreadable: store.unreadable_counts(),
            counts: store.counts().unwrap_or_default(),
            inbox: store.inbox_len(),
            quarantined: store.quarantine_len(),
            templates: store.template_names().unwrap_or(0),
            alarm: store.failure(),
            held: held_by_source(store),
            cluster: None,
            cursors: BTreeMap::new(),
        }
    }

    fn failed(why: String) -> StoreFacts {
        StoreFacts {
            pending: Default::default(),
            unreadable: Default::default(),
            counts: Vec::new(),
            inbox: 0,
            quarantined: 0,
            templates: 0,
            alarm: Some(format!("the store could not be read: {why}")),
            held: BTreeMap::new(),
            cluster: None,
            cursors: BTreeMap::new(),
        }
    }
}

impl control::Handler for Daemon {
    async fn handle(
        &self,
        request: Request,
        progress: mpsc::Sender<String>,
    ) -> Result<Value, String> {
        // Pushes these enqueue are the leader's to send.
        let enqueues = matches!(
            request,
            Request::Erase { .. } | Request::Holds { .. } | Request::Resync { .. }
        );
        let r = self.answer(request, progress).await;
        if enqueues {
            self.leadership.wake_leader();
        }
        r
    }

    async fn stream(
        &self,
        request: Request,
        input: control::Input,
        lines: mpsc::Sender<String>,
    ) -> Result<Value, String> {
        let enqueues = matches!(request, Request::Import);
        let r = self.answer_stream(request, input, lines).await;
        if enqueues {
            self.leadership.wake_leader();
        }
        r
    }
}

impl Daemon {
    async fn answer(
        &self,
        request: Request,
        progress: mpsc::Sender<String>,
    ) -> Result<Value, String> {
        match request {
            Request::Status => serde_json::to_value(self.status().await).map_err(|e| e.to_string()),
            Request::Lookup { id } => {
                let engine = self.engine.clone();
                tokio::task::spawn_blocking(move || crate::lookup::lookup(&engine, &id))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Request::Numbers { connector } => {
                let store = self.engine.store().clone();
                tokio::task::spawn_blocking(move || {
                    crate::lookup::unreadable(&store, connector.as_deref())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
            Request::Erase { id } => {
                let engine = self.engine.clone();
                let done: crate::reconcile::Erasure = tokio::task::spawn_blocking(move || {
                    engine.erase(&id, "operator", Timestamp::now())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e: crate::reconcile::EraseError| e.to_string())?;
                if let Some(subject) = &done.subject {
                    tracing::info!(subject = %subject, "erased a person's personal data");
                }
                serde_json::to_value(done).map_err(|e| e.to_string())
            }
            Request::Resync { connector, full } => {
                let report = self.resync(connector, full, progress).await?;
                serde_json::to_value(report).map_err(|e| e.to_string())
            }
            Request::DryRun { connector } => {
                let report = self.dry_run(connector, progress).await?;
                serde_json::to_value(report).map_err(|e| e.to_string())
            }
            Request::Holds { selection, resolve } => {
                let reply = self.holds(selection, resolve, progress).await?;
                serde_json::to_value(reply).map_err(|e| e.to_string())
            }
            Request::AuditExport { .. } | Request::Import => {
                Err("a streaming request (see control::stream)".into())
            }
        }
    }

    async fn answer_stream(
        &self,
        request: Request,
        input: control::Input,
        lines: mpsc::Sender<String>,
    ) -> Result<Value, String> {
        match request {
            Request::AuditExport {
                since,
                until,
                subject,
            } => {
                let filter = crate::audit::Filter {
                    since,
                    until,
                    subject,
                };
                live::export(self.workers.clone(), filter, lines).await
            }
            Request::Import => live::import(self.workers.clone(), input, lines).await,
            _ => Err("this request does not stream".into()),
        }
    }
}

impl Daemon {
    /// Polls now (all connectors, or one) and relays progress until each has read to the
    /// end; a push-only connector has its dead letters queued again instead.
    async fn resync(
        &self,
        connector: Option<String>,
        full: bool,
        progress: mpsc::Sender<String>,
    ) -> Result<ResyncReport, String> {
        self.leading_only("resync")?;
        let names = self.resync_names(connector.as_ref())?;
        let mut waiting = Vec::new();
        for name in names {
            let push_only = (self.checked.connector(&name)).is_some_and(|c| c.poll.is_none());
            if push_only {
                let k = self.requeue_dead_letters(&name).await?;
                let line = format!("{name}: push-only; {k} dead letter(s) re-queued");
                let _ = progress.send(line).await;
                continue;
            }
            let (tx, rx) = mpsc::channel(64);
            let t = if full {
                Trigger::Full { done: Some(tx) }
            } else {
                Trigger::Incremental { done: Some(tx) }
            };
            self.triggers[&name]
                .send(t)
                .await
                .map_err(|_| format!("{name}: its worker has stopped"))?;
            waiting.push(rx);
        }
        let mut resynced = Vec::new();
        for rx in waiting {
            resynced.extend(workers::relay_progress(rx, &progress).await);
        }
        Ok(ResyncReport { resynced, full })
    }

    /// Refuses `what` on a follower: the poll workers it needs run on the leader only.
    fn leading_only(&self, what: &str) -> Result<(), String> {
        if self.leadership.leading() {
            return Ok(());
        }
        let leader = (self.leadership.roll_call().ok().flatten())
            .and_then(|r| r.lease.filter(|l| l.expires_in_seconds > 0.0))
            .map_or("another instance".to_string(), |l| {
                format!("instance {}", l.holder)
            });
        Err(format!(
            "this instance ({}) follows: {what} runs where the poll workers run, on the leader ({leader}); run it there",
            self.leadership.instance()
        ))
    }

    /// Connector names a resync or dry run covers: `connector`, or all.
    fn resync_names(&self, connector: Option<&String>) -> Result<Vec<String>, String> {
        match connector {
            Some(n) if self.triggers.contains_key(n) => Ok(vec![n.clone()]),
            Some(n) => {
                let known: Vec<_> = self.triggers.keys().cloned().collect();
                let known = known.join(", ");
                Err(format!("no connector named `{n}` (configured: {known})"))
            }
            None => Ok(self.triggers.keys().cloned().collect()),
        }
    }

    /// `resync --full --dry-run`: each CRM connector's poll worker re-reads everything and
    /// rehearses each page (decided, then discarded); progress is relayed as for a resync.
    async fn dry_run(
        &self,
        connector: Option<String>,
        progress: mpsc::Sender<String>,
    ) -> Result<DryRunReport, String> {
        self.leading_only("resync --dry-run")?;
        let mut waiting = Vec::new();
        for name in self.resync_names(connector.as_ref())? {
            // Only systems of records: a push-only connector reads nothing, and WhatsApp's
            // inbox holds messages already applied or about to be (its reads quarantine).
            let records = (self.checked.connector(&name))
                .is_some_and(|c| c.poll.is_some() && c.takes == crate::reconcile::Takes::Records);
            if !records {
                let _ = progress
                    .send(format!("{name}: holds no records; skipped"))
                    .await;
                continue;
            }
            let (tx, rx) = mpsc::channel(64);
            let cell = workers::DryRunCell::default();
            cell.lock().unwrap_or_else(|p| p.into_inner()).name = name.clone();
            let t = Trigger::DryRun {
                done: tx,
                report: cell.clone(),
            };
            self.triggers[&name]
                .send(t)
                .await
                .map_err(|_| format!("{name}: its worker has stopped"))?;
            waiting.push((name, rx, cell));
        }
        let mut report = DryRunReport::default();
        for (name, rx, cell) in waiting {
            if workers::relay_progress(rx, &progress).await.is_none() {
                return Err(format!("{name}: the dry run did not complete"));
            }
            let c = std::mem::take(&mut *cell.lock().unwrap_or_else(|p| p.into_inner()));
            report.connectors.push(c);
        }
        Ok(report)
    }

    /// `holds`: lists, releases or discards held opt-ins; released ones are pushed.
    async fn holds(
        &self,
        selection: crate::holds::HoldSelection,
        resolve: Option<control::Resolve>,
        progress: mpsc::Sender<String>,
    ) -> Result<crate::holds::HoldsReply, String> {
        let engine = self.engine.clone();
        let (reply, report) = tokio::task::spawn_blocking(move || {
            crate::holds::holds(&engine, &selection, resolve, |n| {
                let _ = progress.blocking_send(format!("{n} resolved"));
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.workers.after_apply("operator", &report);
        Ok(reply)
    }

    async fn requeue_dead_letters(&self, name: &str) -> Result<usize, String> {
        let (engine, n) = (self.engine.clone(), name.to_string());
        tokio::task::spawn_blocking(move || engine.retry_dead_letters(Some(&n), Timestamp::now()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
