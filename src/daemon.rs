//! `optout-sync run`: the long-running service.
//!
//! Start-up order: open the store (abandoning replies a crash left in flight), build the
//! connectors, start one poll worker and one push worker per connector instance, bind the
//! HTTP listener and the control socket, then tell systemd READY=1. On SIGTERM or SIGINT:
//! STOPPING=1, stop polling, let in-flight pushes finish within the shutdown deadline
//! (unfinished ones simply stay in the outbox), flush the store and exit 0. SIGHUP does not
//! reload the configuration: a restart applies it, and restarting loses nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use optout_core::{Connector, Timestamp};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConnectorConfig, Kind, Settings};
use crate::control::{self, Request};
use crate::inbox::StoreInbox;
use crate::metrics::{Metrics, ScopeDecision};
use crate::reconcile::{Engine, Takes};
use crate::systemd::Notifier;
use crate::workers::{
    self, ConnectorStatus, PageHook, PollSettings, Schedule, StatusCell, Trigger, WorkerContext,
};

/// Default poll interval of CRM connectors when the configuration sets none.
const DEFAULT_CRM_INTERVAL: Duration = Duration::from_secs(30);
/// WhatsApp is woken by each webhook; this tick only catches a missed wake-up.
const WHATSAPP_SAFETY_TICK: Duration = Duration::from_secs(5);

/// Everything the control socket and the metrics scrape need.
pub struct Daemon {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub statuses: BTreeMap<String, StatusCell>,
    pub triggers: BTreeMap<String, mpsc::Sender<Trigger>>,
    pub ready: Arc<AtomicBool>,
    pub started: Timestamp,
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // The handlers are installed now, before READY=1: a SIGTERM that follows READY at once
    // must stop the daemon cleanly, not kill it with the default action.
    let stop = stop_signals()?;
    run_until(config, stop, None).await
}

/// Runs until `stop` completes; sends the HTTP listener's address on `bound_tx` once ready
/// (the demo and tests run the daemon in-process).
pub async fn run_until(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    bound_tx: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<()> {
    let notifier = Notifier::from_env();
    let started = Timestamp::now();
    let engine = Arc::new(crate::cli::open_engine(&config)?);
    let abandoned = engine.abandon_in_flight(started)?;
    if abandoned > 0 {
        tracing::warn!(
            count = abandoned,
            "confirmation replies interrupted by the last stop were abandoned, not re-sent"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let push_wakers: BTreeMap<String, Arc<Notify>> = config
        .connectors
        .iter()
        .map(|c| (c.name.clone(), Arc::new(Notify::new())))
        .collect();
    let ctx = Arc::new(WorkerContext {
        engine: engine.clone(),
        metrics: metrics.clone(),
        push_wakers,
        cancel: cancel.clone(),
    });
    let targets = crate::cli::targets(&config);
    let mut statuses = BTreeMap::new();
    let mut triggers = BTreeMap::new();
    let mut webhook_routes = None;
    for c in &config.connectors {
        let status: StatusCell = Arc::new(Mutex::new(ConnectorStatus {
            name: c.name.clone(),
            kind: c.common.kind.as_str().to_string(),
            healthy: true,
            cursor: engine.store().cursor(&c.name)?,
            ..ConnectorStatus::default()
        }));
        let (tx, rx) = mpsc::channel(16);
        let takes = targets.get(&c.name).cloned().unwrap_or(Takes::Nothing);
        let spawn = Spawn {
            tracker: &tracker,
            ctx: &ctx,
            c,
            status: status.clone(),
            triggers: rx,
            takes,
        };
        let what = format!("starting connector {}", c.name);
        match &c.settings {
            Settings::Hubspot(s) => spawn.start(
                optout_hubspot::HubSpot::new(&c.name, s.clone()).context(what)?,
                None,
            ),
            Settings::Salesforce(s) => spawn.start(
                optout_salesforce::SalesforceConnector::new(&c.name, s.clone()).context(what)?,
                None,
            ),
            Settings::Webhook(s) => spawn.start(
                optout_webhook::WebhookConnector::new(&c.name, s.clone()).context(what)?,
                None,
            ),
            Settings::Whatsapp(s) => {
                let inbox = Arc::new(StoreInbox {
                    store: engine.store().clone(),
                    metrics: metrics.clone(),
                });
                let wa = optout_whatsapp::WhatsApp::new(&c.name, s.clone(), inbox).context(what)?;
                webhook_routes = Some(wa.router());
                // Each stored webhook wakes the poll worker: an opt-out never waits for a tick.
                let appended = wa.webhook().appended();
                let wake = tx.clone();
                let stop = cancel.clone();
                tracker.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = appended.notified() => {
                                let _ = wake.try_send(Trigger::Incremental { done: None });
                            }
                        }
                    }
                });
                // Applied bodies leave the inbox (their cursor is saved already).
                let store = engine.store().clone();
                let trim: PageHook = Arc::new(move |page: &optout_core::Page| {
                    if let Ok(seq) = page.cursor.0.parse::<u64>()
                        && let Err(e) = store.inbox_trim(seq)
                    {
                        tracing::warn!(error = %e, "cannot trim the webhook inbox; will retry after the next page");
                    }
                });
                spawn.start(wa, Some(trim))
            }
        }
        statuses.insert(c.name.clone(), status);
        triggers.insert(c.name.clone(), tx);
    }

    let ready = Arc::new(AtomicBool::new(false));
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        engine: engine.clone(),
        metrics: metrics.clone(),
        statuses,
        triggers,
        ready: ready.clone(),
        started,
    });

    // HTTP listener.
    let gate_token = match &config.daemon.gate_token {
        Some(r) => Some(r.resolve().context("reading daemon.gate_token")?),
        None => None,
    };
    let d = daemon.clone();
    let http_state = Arc::new(crate::http::HttpState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        gate_token,
        ready: ready.clone(),
        refresh: Arc::new(move |m: &Metrics| d.refresh_metrics(m)),
    });
    let mut app = crate::http::router(http_state);
    if let Some(routes) = webhook_routes {
        app = app.merge(routes);
    }
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", config.daemon.listen))?;
    let bound = listener.local_addr()?;
    let c2 = cancel.clone();
    tracker.spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(c2.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });

    // Control socket.
    let socket_path = config.daemon.control_socket.clone();
    let control_listener = control::bind(&socket_path)
        .with_context(|| format!("binding the control socket {}", socket_path.display()))?;
    tracker.spawn(control::serve(
        control_listener,
        socket_path.clone(),
        daemon.clone(),
        cancel.clone(),
    ));

    // Remember how far the audit log reaches, so a store damaged later is noticed.
    tracker.spawn(workers::high_water_worker(
        engine.store().clone(),
        cancel.clone(),
    ));

    ready.store(true, Ordering::Release);
    tracing::info!(listen = %bound, control = %socket_path.display(), connectors = config.connectors.len(), "optout-sync is ready");
    notifier.ready();
    notifier.status(&format!("running; listening on {bound}"));
    let d = daemon.clone();
    tracker.spawn(crate::systemd::watchdog_loop(
        notifier.clone(),
        move || d.ready.load(Ordering::Acquire),
        cancel.clone(),
    ));

    if let Some(tx) = bound_tx {
        let _ = tx.send(bound);
    }
    stop.await;
    notifier.stopping();
    notifier.status("stopping");
    ready.store(false, Ordering::Release);
    tracing::info!("stopping: no new polls; letting in-flight pushes finish");
    cancel.cancel();
    tracker.close();
    let deadline = config.daemon.shutdown_timeout;
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?deadline, "shutdown deadline reached; unfinished pushes stay in the outbox for the next start");
    }
    engine.store().flush().await?;
    engine.store().save_high_water()?;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the signal handlers and returns a future that completes on SIGTERM or SIGINT;
/// SIGHUP is logged (not a reload).
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => tracing::warn!("SIGHUP ignored: configuration reload is not supported; restart the service to apply changes (nothing is lost)"),
            }
        }
    })
}

struct Spawn<'a> {
    tracker: &'a TaskTracker,
    ctx: &'a Arc<WorkerContext>,
    c: &'a ConnectorConfig,
    status: StatusCell,
    triggers: mpsc::Receiver<Trigger>,
    takes: Takes,
}

impl Spawn<'_> {
    fn start<C: Connector>(self, connector: C, after_page: Option<PageHook>) {
        let connector = Arc::new(connector);
        let name = self.c.name.clone();
        let common = &self.c.common;
        let schedule = match (&common.poll_cron, common.poll_interval, common.kind) {
            (Some(expr), _, _) => Schedule::cron(expr).unwrap_or(Schedule::OnDemand),
            (None, Some(i), _) => Schedule::Interval(i),
            (None, None, Kind::Whatsapp) => Schedule::Interval(WHATSAPP_SAFETY_TICK),
            (None, None, Kind::Webhook) => Schedule::OnDemand,
            (None, None, _) => Schedule::Interval(DEFAULT_CRM_INTERVAL),
        };
        let full = common.full_resync_cron.as_deref().and_then(Schedule::cron);
        if common.kind != Kind::Webhook {
            let settings = PollSettings {
                name: name.clone(),
                status: self.status.clone(),
                triggers: self.triggers,
                schedule,
                full_resync: full,
                after_page,
            };
            self.tracker.spawn(workers::poll_worker(
                connector.clone(),
                self.ctx.clone(),
                settings,
            ));
        }
        self.tracker.spawn(workers::health_worker(
            name.clone(),
            connector.clone(),
            self.status.clone(),
            self.ctx.cancel.clone(),
        ));
        self.tracker.spawn(workers::push_worker(
            name,
            connector,
            self.ctx.clone(),
            self.status,
            self.takes,
            common.linger(),
        ));
    }
}

impl Daemon {
    /// Sets the gauges that mirror the store, just before a scrape.
    pub fn refresh_metrics(&self, m: &Metrics) {
        let (depth, dead, unverified) = self.pending_counts();
        for name in self.statuses.keys() {
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
            let since = s.last_poll_ok.unwrap_or(self.started);
            m.cursor_lag
                .get_or_create(&l)
                .set(Timestamp::now().since(since).as_secs_f64());
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
    fn pending_counts(
        &self,
    ) -> (
        BTreeMap<String, i64>,
        BTreeMap<String, i64>,
        BTreeMap<String, i64>,
    ) {
        let store = self.engine.store();
        let mut depth = BTreeMap::new();
        for (c, _, _) in store.outbox().flatten() {
            *depth.entry(c).or_insert(0) += 1;
        }
        let mut dead = BTreeMap::new();
        for (c, _, _) in store.dead_letters().flatten() {
            *dead.entry(c).or_insert(0) += 1;
        }
        let overdue = Timestamp::now().minus(self.config.daemon.unverified_after);
        let mut unverified = BTreeMap::new();
        for (c, _, at) in store.unverified().flatten() {
            if at < overdue {
                *unverified.entry(c).or_insert(0) += 1;
            }
        }
        (depth, dead, unverified)
    }

    pub fn status_json(&self) -> Value {
        let (depth, dead, unverified) = self.pending_counts();
        let store = self.engine.store();
        let connectors: Vec<Value> = self
            .statuses
            .iter()
            .map(|(name, cell)| {
                let s = cell.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let lag = s.last_poll_ok.map(|t| Timestamp::now().since(t).as_secs());
                json!({
                    "name": s.name, "kind": s.kind, "healthy": s.healthy && s.alarm.is_none() && s.health.as_ref().is_none_or(|h| h.ok),
                    "alarm": s.alarm, "last_poll_ok": s.last_poll_ok.map(|t| t.to_rfc3339()),
                    "poll_lag_seconds": lag, "last_push_ok": s.last_push_ok.map(|t| t.to_rfc3339()),
                    "cursor": s.cursor, "poll_errors": s.poll_errors, "push_errors": s.push_errors,
                    "last_error": s.last_error, "resync": s.resync, "health": s.health,
                    "outbox_depth": depth.get(name).copied().unwrap_or(0),
                    "dead_letters": dead.get(name).copied().unwrap_or(0),
                    "unverified_pushes": unverified.get(name).copied().unwrap_or(0),
                })
            })
            .collect();
        let counts = store.counts().unwrap_or_default();
        let people = counts
            .iter()
            .find(|(k, _)| k == crate::reconcile::PEOPLE)
            .map_or(0, |(_, v)| *v);
        let subjects: serde_json::Map<String, Value> = counts
            .into_iter()
            .filter(|(k, _)| k.contains(':'))
            .map(|(k, v)| (k, json!(v)))
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": self.ready.load(Ordering::Acquire),
            "started": self.started.to_rfc3339(),
            "subjects_total": people,
            "subjects": subjects,
            "webhook_inbox": store.inbox_len(),
            "quarantined_webhooks": store.quarantine_len(),
            "connectors": connectors,
        })
    }
}

impl control::Handler for Daemon {
    async fn handle(
        &self,
        request: Request,
        progress: mpsc::Sender<String>,
    ) -> Result<Value, String> {
        match request {
            Request::Status => Ok(self.status_json()),
            Request::Lookup { id } => {
                let engine = self.engine.clone();
                tokio::task::spawn_blocking(move || crate::lookup::lookup(&engine, &id))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Request::Resync { connector, full } => {
                let names: Vec<String> = match &connector {
                    Some(n) if self.triggers.contains_key(n) => vec![n.clone()],
                    Some(n) => {
                        let known: Vec<_> = self.triggers.keys().cloned().collect();
                        return Err(format!(
                            "no connector named `{n}` (configured: {})",
                            known.join(", ")
                        ));
                    }
                    None => self.triggers.keys().cloned().collect(),
                };
                let mut waiting = Vec::new();
                for name in names {
                    let kind = self.config.connector(&name).map(|c| c.common.kind);
                    if kind == Some(Kind::Webhook) {
                        // Push-only: a resync re-queues its dead letters.
                        let engine = self.engine.clone();
                        let n = name.clone();
                        let k = tokio::task::spawn_blocking(move || {
                            engine.retry_dead_letters(Some(&n), Timestamp::now())
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                        let _ = progress
                            .send(format!("{name}: push-only; {k} dead letter(s) re-queued"))
                            .await;
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
                    waiting.push((name, rx));
                }
                let mut finished = Vec::new();
                for (_, rx) in waiting {
                    if let Some(done) = workers::relay_progress(rx, &progress).await {
                        finished.push(done);
                    }
                }
                Ok(json!({ "resynced": finished, "full": full }))
            }
        }
    }
}
