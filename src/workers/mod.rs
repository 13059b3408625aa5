//! Background workers: per connector instance a poll worker, a push worker and a health
//! check; for the daemon, the store's high-water saver.
//!
//! Every worker is a small [`runner::Worker`]: a struct whose `step` does one unit of work
//! and says what comes next, and whose `wait` blocks until there is work again. One
//! function, [`runner::run`], drives them all: it stops them at shutdown (no wait outlives
//! a cancellation), backs off after a failed step (the one retry module) and keeps each
//! connector's status and metrics (errors, alarms, recovery).
//!
//! - [`poll`]: reads a connector's changes page by page on its schedule or a [`Trigger`],
//!   applying each page with its cursor in one transaction.
//! - [`push`]: drains the connector's outbox in batches, several in flight at once (never
//!   two of one record), holding a partial batch only while a burst fills it ([`Linger`]),
//!   and records every outcome; an unfinished push stays in the outbox.
//! - [`health`]: the connector's own health check, every few minutes.
//! - [`high_water`]: records how far the audit log reaches, every half minute.
//! - [`retention`]: prunes delivery keys and quarantined bodies past their retention.
//! - [`store_health`]: turns a failing store into "not ready" and brings it back.
//!
//! The daemon starts them with [`poll_worker`], [`push_worker`], [`health_worker`],
//! [`high_water_worker`], [`retention_worker`] and [`store_health::store_health_worker`].

pub mod health;
pub mod high_water;
pub mod poll;
pub mod push;
pub mod retention;
pub mod runner;
pub mod store_health;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use optout_core::{Connector, Progress, Timestamp};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ScopeDecision, SourceResult};
use crate::reconcile::{ApplyReport, Engine, Takes};
use crate::store::Store;

#[cfg(test)]
pub use health::HEALTH_INTERVAL;
pub use high_water::HIGH_WATER_INTERVAL;
pub use poll::PollSettings;
pub use push::Linger;
use runner::Bookkeeping;

/// Why a poll worker should poll now.
#[derive(Debug)]
pub enum Trigger {
    /// Read what changed since the cursor (a tick, a webhook, `resync`). `done` receives
    /// the read's progress, ending with [`ResyncProgress::Done`] if it completes.
    Incremental {
        done: Option<mpsc::Sender<ResyncProgress>>,
    },
    /// Re-read everything from the beginning and repair drift (`resync --full`).
    Full {
        done: Option<mpsc::Sender<ResyncProgress>>,
    },
    /// Re-read everything and note what a full resync would change, changing nothing
    /// (`resync --full --dry-run`): no push, no record, no cursor.
    DryRun {
        done: mpsc::Sender<ResyncProgress>,
        report: DryRunCell,
    },
}

/// Where a dry run collects its connector's report.
pub type DryRunCell = Arc<Mutex<crate::report::DryRunConnector>>;

/// What a poll worker reports to an operator waiting on a resync. An incremental read that
/// fails ends after `Retrying` (the channel closes); a full one carries on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncProgress {
    /// A page was stored; `source` is the source's own count, when it gives one.
    Reading {
        connector: String,
        records: u64,
        pages: u64,
        source: Option<Progress>,
    },
    /// A read failed; the next attempt is in `delay`.
    Retrying {
        connector: String,
        error: String,
        delay: Duration,
    },
    /// The read reached the end of what the source has.
    Done {
        connector: String,
        records: u64,
        pages: u64,
    },
}

impl ResyncProgress {
    /// How far a read has come, as `status` shows it (`resync`).
    fn text(&self) -> String {
        match self {
            ResyncProgress::Reading {
                source: Some(p), ..
            } => format!(
                "{} of {} records",
                p.done,
                p.total.map_or("?".into(), |t| t.to_string())
            ),
            ResyncProgress::Reading { records, pages, .. } => {
                format!("{records} records in {pages} pages")
            }
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for ResyncProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResyncProgress::Reading { connector, .. } => write!(f, "{connector}: {}", self.text()),
            ResyncProgress::Retrying {
                connector,
                error,
                delay,
            } => write!(
                f,
                "{connector}: poll failed ({error}); retrying in {:.1}s",
                delay.as_secs_f64()
            ),
            ResyncProgress::Done {
                connector,
                records,
                pages,
            } => write!(
                f,
                "{connector}: done ({records} records read in {pages} pages)"
            ),
        }
    }
}

/// Passes a resync's progress on as text lines until it is done or the worker gives up
/// (the channel closes). Returns the final line when the read completed.
pub async fn relay_progress(
    mut rx: mpsc::Receiver<ResyncProgress>,
    to: &mpsc::Sender<String>,
) -> Option<String> {
    while let Some(p) = rx.recv().await {
        let line = p.to_string();
        let _ = to.send(line.clone()).await;
        if matches!(p, ResyncProgress::Done { .. }) {
            return Some(line);
        }
    }
    None
}

/// The poll worker of one connector instance; see [`poll`].
pub async fn poll_worker<C: Connector + ?Sized>(
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    settings: PollSettings,
) {
    let book = ctx.bookkeeping(&settings.status);
    let cancel = ctx.cancel.clone();
    runner::run(
        poll::Poll::new(connector, ctx, settings),
        cancel,
        Some(book),
    )
    .await
}

/// The push worker of one connector instance; see [`push`].
pub async fn push_worker<C: Connector + ?Sized>(
    name: String,
    connector: Arc<C>,
    ctx: Arc<WorkerContext>,
    status: StatusCell,
    takes: Takes,
    linger: Linger,
    pipeline: usize,
) {
    let book = ctx.bookkeeping(&status);
    let cancel = ctx.cancel.clone();
    let worker = push::Push::new(name, connector, ctx, status, takes, linger, pipeline);
    runner::run(worker, cancel, Some(book)).await
}

/// Runs the connector's health check at start and every [`HEALTH_INTERVAL`]; see
/// [`health`].
pub async fn health_worker<C: Connector + ?Sized>(
    name: String,
    connector: Arc<C>,
    status: StatusCell,
    cancel: CancellationToken,
) {
    let worker = health::HealthCheck::new(name, connector, status);
    runner::run(worker, cancel, None).await
}

/// Records the store's high-water mark every [`HIGH_WATER_INTERVAL`]; see [`high_water`].
pub async fn high_water_worker(store: Store, cancel: CancellationToken) {
    let worker = high_water::HighWater::new(store, HIGH_WATER_INTERVAL);
    runner::run(worker, cancel, None).await
}

/// Prunes expired delivery keys and quarantined bodies every hour; see [`retention`].
pub async fn retention_worker(
    store: Store,
    dedup: Duration,
    quarantine: Duration,
    audit: Option<Duration>,
    cancel: CancellationToken,
) {
    let worker = retention::Retention::new(store, dedup, quarantine).with_audit_retention(audit);
    runner::run(worker, cancel, None).await
}

/// When a poll worker polls on its own.
#[derive(Clone, Debug)]
pub enum Schedule {
    Interval(Duration),
    Cron(Box<cron::Schedule>),
    /// Only when triggered (tests drive the worker by triggers alone).
    #[cfg(test)]
    OnDemand,
}

impl Schedule {
    /// Time until the next tick.
    fn next(&self) -> Option<Duration> {
        match self {
            Schedule::Interval(d) => Some(*d),
            Schedule::Cron(c) => until_next(c),
            #[cfg(test)]
            Schedule::OnDemand => None,
        }
    }
}

fn until_next(c: &cron::Schedule) -> Option<Duration> {
    let next = c.upcoming(chrono::Utc).next()?;
    (next - chrono::Utc::now()).to_std().ok()
}

/// What `status` shows of one connector.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectorStatus {
    pub name: String,
    pub kind: String,
    pub healthy: bool,
    pub last_poll_ok: Option<Timestamp>,
    pub last_push_ok: Option<Timestamp>,
    pub cursor: Option<String>,
    pub poll_errors: u64,
    pub push_errors: u64,
    pub last_error: Option<String>,
    /// Set when the connector needs an operator (credentials, quota, configuration).
    pub alarm: Option<String>,
    /// Which worker raised the alarm (`poll`, `push`, `preflight`): only its own success
    /// lowers it.
    #[serde(skip)]
    pub alarm_from: Option<String>,
    /// Progress of a running full resync.
    pub resync: Option<String>,
    /// The connector's own health check (credentials, reachability), refreshed every few
    /// minutes.
    pub health: Option<optout_core::Health>,
}

pub type StatusCell = Arc<Mutex<ConnectorStatus>>;

/// What the workers share with the rest of the daemon.
pub struct WorkerContext {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    /// Wakes each connector's push worker when its outbox gains entries.
    pub push_wakers: std::collections::BTreeMap<String, Arc<Notify>>,
    pub cancel: CancellationToken,
}

impl WorkerContext {
    pub(crate) fn bookkeeping(&self, status: &StatusCell) -> Bookkeeping {
        Bookkeeping {
            metrics: self.metrics.clone(),
            status: status.clone(),
        }
    }

    /// Bookkeeping after a page or an import: metrics, logs, and waking push workers.
    pub fn after_apply(&self, source: &str, report: &ApplyReport) {
        for (result, n) in &report.results {
            self.metrics
                .observations
                .get_or_create(&SourceResult {
                    source: source.to_string(),
                    result: result.to_string(),
                })
                .inc_by(*n);
        }
        if let Some(n) = report.results.get("possible_opt_out") {
            let c = self
                .metrics
                .possible_opt_outs
                .get_or_create(&Metrics::connector(source));
            c.inc_by(*n);
            tracing::info!(connector = %source, count = n, "possible opt-out recorded for review");
        }
        for d in &report.decisions {
            self.metrics
                .decisions
                .get_or_create(&ScopeDecision {
                    scope: d.scope.as_str().into(),
                    decision: d.to.as_str().into(),
                })
                .inc();
            tracing::info!(
                subject = %d.subject, scope = %d.scope, from = d.from.as_str(), to = d.to.as_str(),
                source = %d.source, event_at = ?d.event_at.map(|t| t.to_rfc3339()),
                "decision changed"
            );
        }
        for (connector, record, delay) in &report.verified {
            self.metrics
                .verification
                .get_or_create(&Metrics::connector(connector))
                .observe(delay.as_secs_f64());
            tracing::debug!(connector = %connector, record = %record, "push verified by read-back");
        }
        for (from, to) in &report.recategorised {
            let labels = crate::metrics::FromTo {
                from: from.clone(),
                to: to.clone(),
            };
            self.metrics
                .template_recategorisations
                .get_or_create(&labels)
                .inc();
            tracing::info!(source, from = %from, to = %to, "a message template was re-categorised");
        }
        for (source, n) in &report.held {
            self.metrics
                .guard
                .opt_ins_held
                .get_or_create(&Metrics::source(source))
                .inc_by(*n);
            if report.tripped.contains(source) {
                // Once per episode: the guard stays tripped until an operator resolves it.
                tracing::warn!(
                    source = %source, held = n,
                    "mass re-opt-in guard tripped: this source re-enabled more people than policy.opt_in_guard allows; its further opt-ins are held, not applied (review: optout-sync holds)"
                );
            } else {
                tracing::debug!(source = %source, held = n, "opt-ins held by the mass re-opt-in guard");
            }
        }
        for connector in report.enqueued.keys() {
            if let Some(w) = self.push_wakers.get(connector) {
                w.notify_one();
            }
        }
    }
}

/// Runs blocking store work off the async threads (sled flushes to disk).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down (a start-up that failed, or the end of the
        // shutdown deadline) and drops this task with it. Not an internal error: exiting 70
        // here would hide the reason the daemon stopped.
        Err(_) => std::future::pending().await,
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
